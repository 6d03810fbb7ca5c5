-- Alerts (docs/audit.md, Alerts): the auditor's early warning. One elected evaluator per
-- database (an advisory lock, gateway/alerts.py) reads the audit rows written since its
-- watermark, measures alerts.yaml's rules over their sliding windows, and raises an alert
-- at most once per rule, actor (or organisation) and window: the unique key below.

-- Where the evaluator stopped: the last audit row evaluated, in (at, chain_id, seq) order.
-- One row; a new evaluator starts from now (no alert about the past at first start).
create table alert_watermark (
    id        boolean primary key default true check (id),
    at        timestamptz not null,
    chain_id  uuid not null,
    seq       bigint not null,
    moved_at  timestamptz not null default now()
);

create table alerts (
    id             uuid primary key default gen_random_uuid(),
    rule           text not null,
    per            text not null check (per in ('actor', 'partner', 'euo')),
    key            text not null,              -- the actor's sub, or the partner or EUO id
    window_start   timestamptz not null,       -- the tumbling window the alert belongs to
    observed_from  timestamptz not null,       -- the sliding window measured: (from, to]
    observed_to    timestamptz not null,
    observed       bigint not null,
    limit_value    bigint not null,
    baseline       double precision,           -- the role peers' median; null: no baseline
    factor         double precision,
    actor_sub      text,                       -- of the last row counted
    actor_role     text,
    actor_partner  text,
    actor_euo      text,
    subject_euos   text[] not null default '{}',   -- EUOs whose data the rows counted touch
    audit_query    text not null,              -- /v1/audit?... listing the rows counted
    policy_version text,
    raised_at      timestamptz not null default now(),
    acked_at       timestamptz,
    acked_by       text,
    ack_note       text,
    unique (rule, key, window_start)
);
create index alerts_raised on alerts (raised_at desc, id desc);
create index alerts_subject_euos on alerts using gin (subject_euos);

-- an organisation's calls over a window, for the rules counted per partner or per EUO
create index audit_log_partner_at on audit_log (actor_partner, at) where actor_partner is not null;
create index audit_log_actor_euo_at on audit_log (actor_euo, at) where actor_euo is not null;

-- The audit rows a rule counts for one key in (t0, t1]: the actor's, the partner's or the
-- EUO's calls, once each (an outcome row repeats its intent's call). Each branch is a
-- static query, so each uses its own index.
create function alert_rows(per text, key text, t0 timestamptz, t1 timestamptz)
returns setof audit_log language plpgsql stable as $$
begin
    if per = 'actor' then
        return query select * from audit_log a where a.actor_sub = key and a.at > t0
            and a.at <= t1 and a.phase is distinct from 'outcome';
    elsif per = 'partner' then
        return query select * from audit_log a where a.actor_partner = key and a.at > t0
            and a.at <= t1 and a.phase is distinct from 'outcome';
    elsif per = 'euo' then
        return query select * from audit_log a where a.actor_euo = key and a.at > t0
            and a.at <= t1 and a.phase is distinct from 'outcome';
    else
        raise exception 'alert_rows: per must be actor, partner or euo, not %', per;
    end if;
end $$;

-- Whether an audit row counts for a measure (the other filters, data set and roles, are
-- the rule's): the working hours are UTC, `wh_days` ISO weekdays. Off hours count calls
-- that served or acted upon data, not a look at the gateway's own API (an alert list).
create function alert_counts(a audit_log, measure text, wh_start time, wh_end time,
                             wh_days integer[]) returns boolean language sql immutable as $$
    select case measure
        when 'distinct_subjects' then a.decision = 'allow'
                                      and a.access in ('served', 'acted_upon')
        when 'rows' then a.decision = 'allow'
        when 'refusals' then a.decision = 'deny'
        when 'break_glass' then a.decision = 'allow' and a.method = 'POST'
                                and a.path = '/v1/break-glass' and a.status < 300
        when 'off_hours' then a.decision = 'allow' and a.access in ('served', 'acted_upon') and (
            extract(isodow from a.at at time zone 'UTC')::integer <> all(wh_days)
            or (a.at at time zone 'UTC')::time < wh_start
            or (a.at at time zone 'UTC')::time >= wh_end)
        else false
    end
$$;
