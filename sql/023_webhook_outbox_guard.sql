-- 022 lets the runtime role delete events only through webhook_prune, "never one still to
-- be delivered", kept GATEWAY_WEBHOOK_KEEP_DAYS (at least 1). The runtime role chose the
-- keep itself, though (a keep of 0 or less deleted an event delivered a moment ago), and it
-- holds UPDATE on webhook_outbox (claims, outcomes), with which it could backdate a pending
-- event's delivered_at or given_up_at and have the prune delete it. Now the function keeps
-- at least a day whatever it is asked, and an event's finish can only be written as now
-- (never backdated), nor its event, request, payload or creation time changed.
create or replace function webhook_prune(keep interval) returns bigint language plpgsql as $$
declare
    n bigint;
begin
    with gone as (
        select id from webhook_outbox
         where coalesce(delivered_at, given_up_at) < now() - greatest(keep, interval '1 day')
         order by id
         limit 10000
    ), attempts as (
        delete from webhook_deliveries d using gone where d.outbox_id = gone.id
    )
    delete from webhook_outbox o using gone where o.id = gone.id;
    get diagnostics n = row_count;
    return n;
end $$;
do $$
begin
    execute format('alter function webhook_prune(interval) security definer set search_path = %I, pg_temp',
                   current_schema());
end $$;
revoke execute on function webhook_prune(interval) from public;

create function webhook_outbox_guard() returns trigger language plpgsql as $$
begin
    if (new.id, new.event, new.request_id, new.payload, new.created_at)
       is distinct from (old.id, old.event, old.request_id, old.payload, old.created_at) then
        raise exception 'webhook_outbox: an event, its request, payload and time are never changed';
    end if;
    if (new.delivered_at is distinct from old.delivered_at and new.delivered_at < now())
       or (new.given_up_at is distinct from old.given_up_at and new.given_up_at < now()) then
        raise exception 'webhook_outbox: delivered_at and given_up_at are written as now, never backdated';
    end if;
    return new;
end $$;
create trigger webhook_outbox_guard before update on webhook_outbox
    for each row execute function webhook_outbox_guard();
