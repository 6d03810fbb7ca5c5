-- Retention by the database's clock, never below last month; webhook events of one subject
-- delivered in order.
--
-- `gateway audit maintain` counted the retention back from the host's clock: with that
-- clock 800 days ahead, every partition "ended" more than 400 days ago and all were
-- dropped, this month's included. The cut-off is now computed in SQL from now(), and
-- audit_prune itself never drops this month's or last month's partition (by the
-- database's clock), whatever cut-off it is given: a mistaken --older-than, a clock set
-- wrong in the database too, cannot take the rows still being written and read.
create or replace function audit_prune(cutoff timestamptz, dry_run boolean)
returns table (partition text, ends timestamptz) language plpgsql as $$
declare
    r record;
    floor timestamptz := date_trunc('month', now()) - interval '1 month';
begin
    for r in select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
              where i.inhparent = 'audit_log'::regclass
                and c.relname ~ '^audit_log_y[0-9]{4}m[0-9]{2}$'
              order by c.relname
    loop
        partition := r.relname;
        ends := (to_date(substr(r.relname, 12, 4) || substr(r.relname, 17, 2), 'YYYYMM')
                 + interval '1 month')::timestamptz;
        if ends <= cutoff and ends <= floor then
            if not dry_run then
                execute format('drop table %I', r.relname);
            end if;
            return next;
        end if;
    end loop;
end $$;

-- Webhooks: each process claims due events with SKIP LOCKED and a retry waits its backoff,
-- so a request's `request.resolved` could be posted before its `request.filed` (another
-- process had it, or its first attempt failed). An event is now claimed only once every
-- earlier event about the same request or break-glass grant is delivered or given up;
-- this index finds those.
create index webhook_outbox_pending_by_subject
    on webhook_outbox ((coalesce(request_id::text, payload ->> 'id')), id)
    where delivered_at is null and given_up_at is null;
