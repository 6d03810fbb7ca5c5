-- A break-glass grant is evidence: once opened, only its early end may be written, once
-- (ended_at and ended_by from null to set, and nothing else); it is never deleted. The
-- runtime role keeps UPDATE for that end alone.
create function break_glass_end_only() returns trigger language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        raise exception 'break_glass is append-only: a grant is never deleted';
    end if;
    if old.ended_at is not null
       or new.ended_at is null or new.ended_by is null
       or (new.id, new.actor_role, new.actor_sub, new.actor_partner, new.euo_id, new.user_sub,
           new.purpose, new.ticket, new.created_at, new.ends_at)
          is distinct from
          (old.id, old.actor_role, old.actor_sub, old.actor_partner, old.euo_id, old.user_sub,
           old.purpose, old.ticket, old.created_at, old.ends_at) then
        raise exception 'break_glass: only a grant''s early end may be written, once';
    end if;
    return new;
end $$;
create trigger break_glass_end_only before update or delete on break_glass
    for each row execute function break_glass_end_only();
create function break_glass_no_truncate() returns trigger language plpgsql as $$
begin
    raise exception 'break_glass is append-only: it is never truncated';
end $$;
create trigger break_glass_no_truncate before truncate on break_glass
    for each statement execute function break_glass_no_truncate();
