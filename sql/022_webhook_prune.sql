-- Webhook events name a request's user (euo_id and user_sub in the payload): they are
-- transport, not the record (dsr_requests and dsr_transitions are). Once delivered or given
-- up, an event and its delivery attempts are kept GATEWAY_WEBHOOK_KEEP_DAYS and then deleted
-- by the request scan. The runtime role deletes nothing itself: it calls this function, run
-- as the owner, which deletes only finished events (never one still to be delivered), at
-- most 10,000 a call.
create function webhook_prune(keep interval) returns bigint language plpgsql as $$
declare
    n bigint;
begin
    with gone as (
        select id from webhook_outbox
         where coalesce(delivered_at, given_up_at) < now() - keep
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
