-- Break-glass: a time-boxed grant of the `break_glass` relation to one caller (role, sub,
-- and partner for a partner's role) over one EUO, or one user of it, with a purpose and a
-- ticket. Every process mirrors the grants in force and hears of changes by NOTIFY; every
-- request served under a grant names it in its audit row, so the EUO's admin and the users
-- touched see it with its purpose and ticket.
create table break_glass (
    id            uuid primary key default gen_random_uuid(),
    actor_role    text not null,
    actor_sub     text not null,
    actor_partner text,
    euo_id        text not null,
    user_sub      text,                        -- null: the whole EUO
    purpose       text not null,
    ticket        text not null,
    created_at    timestamptz not null default now(),
    ends_at       timestamptz not null,
    ended_at      timestamptz,                 -- ended early (DELETE)
    ended_by      text,
    check (ends_at > created_at)
);
create index break_glass_euo on break_glass (euo_id, created_at desc);
create index break_glass_in_force on break_glass (ends_at) where ended_at is null;

create function break_glass_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('gateway_break_glass', coalesce(new.id, old.id)::text);
    return null;
end $$;
create trigger break_glass_notify after insert or update or delete on break_glass
    for each row execute function break_glass_notify();

-- the grant a request was served under (hashed, appended after policy_version)
alter table audit_log add column break_glass uuid;
