-- The alert evaluator matches a pass's new audit rows with every rule in one query
-- (alerts.py, _pass_sql), reading only the columns a rule looks at: carrying whole rows
-- through it cost more than the matching. Whether a row counts for a measure is now
-- alert_counts_of, on those columns; alert_counts (033), which alert_measure and
-- alert_baseline use, calls it, so both read one definition.
create function alert_counts_of(decision text, access text, method text, path text,
                                status integer, at timestamptz, measure text, wh_start time,
                                wh_end time, wh_days integer[])
    returns boolean language sql immutable as $$
    select case measure
        when 'distinct_subjects' then decision = 'allow' and access in ('served', 'acted_upon')
        when 'rows' then decision = 'allow'
        when 'refusals' then decision = 'deny'
        when 'break_glass' then decision = 'allow' and method = 'POST'
                                and path = '/v1/break-glass' and status < 300
        when 'off_hours' then decision = 'allow' and access in ('served', 'acted_upon') and (
            date_part('isodow', at at time zone 'UTC')::integer <> all(wh_days)
            or (at at time zone 'UTC')::time < wh_start
            or (at at time zone 'UTC')::time >= wh_end)
        else false
    end
$$;

create or replace function alert_counts(a audit_log, measure text, wh_start time,
                                        wh_end time, wh_days integer[])
    returns boolean language sql immutable as $$
    select alert_counts_of(a.decision, a.access, a.method, a.path, a.status, a.at, measure,
                           wh_start, wh_end, wh_days)
$$;

-- One evaluator at a time, and the same one while it lives: a pass by another process
-- would start without what the last one knew (each rule and key measured again). Each
-- pass records who made it; another process takes over only when the last pass is older
-- than the takeover time (alerts.py).
alter table alert_watermark add column evaluator text;
