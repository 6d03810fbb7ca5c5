-- The schema sql/0NN_*.sql make, in order (tests/test_schema.py keeps this equal to them;
-- `python -m tests.test_schema` writes it again). Read it; never run it: the migrations
-- are what `gateway migrate` applies. The month partitions of audit_log
-- (audit_log_yYYYYmMM, made for the months ahead by `gateway migrate` and
-- `gateway audit maintain`) are left out: which ones exist depends on the day.

CREATE TYPE public.audit_row_in AS (
	at timestamp with time zone,
	chain_id uuid,
	seq bigint,
	request_id text,
	actor_sub text,
	actor_role text,
	actor_partner text,
	actor_euo text,
	method text,
	path text,
	service text,
	route text,
	data_sets text,
	fields_removed text,
	subject_euo text,
	subject_users text,
	decision text,
	reason text,
	status integer,
	bytes bigint,
	duration_ms double precision,
	client_addr text,
	client_request_id text,
	requests integer,
	trace_id text,
	policy_version text,
	break_glass uuid,
	withheld text,
	phase text,
	access text,
	salt text,
	prev_hash bytea,
	row_hash bytea
);

CREATE TABLE public.audit_log (
    at timestamp with time zone NOT NULL,
    chain_id uuid NOT NULL,
    seq bigint NOT NULL,
    request_id text NOT NULL,
    actor_sub text,
    actor_role text,
    actor_partner text,
    actor_euo text,
    method text NOT NULL,
    path text NOT NULL,
    service text,
    route text,
    data_sets text[] NOT NULL,
    fields_removed text[] NOT NULL,
    subject_euo text,
    subject_users text[] NOT NULL,
    decision text NOT NULL,
    reason text,
    status integer NOT NULL,
    bytes bigint NOT NULL,
    duration_ms double precision NOT NULL,
    client_addr text,
    prev_hash bytea NOT NULL,
    row_hash bytea NOT NULL,
    client_request_id text,
    requests integer,
    trace_id text,
    policy_version text,
    withheld text,
    break_glass uuid,
    phase text,
    access text,
    salt text,
    CONSTRAINT audit_log_access_check CHECK (((access IS NULL) OR (access = ANY (ARRAY['served'::text, 'acted_upon'::text, 'named'::text, 'explained'::text])))),
    CONSTRAINT audit_log_phase_check CHECK (((phase IS NULL) OR (phase = ANY (ARRAY['intent'::text, 'outcome'::text]))))
)
PARTITION BY RANGE (at);

CREATE FUNCTION public.alert_counts(a public.audit_log, measure text, wh_start time without time zone, wh_end time without time zone, wh_days integer[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    AS $$
    select alert_counts_of(a.decision, a.access, a.method, a.path, a.status, a.at, measure,
                           wh_start, wh_end, wh_days)
$$;

CREATE FUNCTION public.alert_counts_of(decision text, access text, method text, path text, status integer, at timestamp with time zone, measure text, wh_start time without time zone, wh_end time without time zone, wh_days integer[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    AS $$
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

CREATE FUNCTION public.alert_rows(per text, key text, t0 timestamp with time zone, t1 timestamp with time zone) RETURNS SETOF public.audit_log
    LANGUAGE plpgsql STABLE
    AS $$
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

CREATE FUNCTION public.audit_append(batch public.audit_row_in[], chain uuid, last_seq bigint, last_hash bytea, left_s double precision) RETURNS bigint
    LANGUAGE plpgsql
    AS $$
declare
    head bigint;
begin
    -- no lock waited for much past the deadline (a batch stuck behind `lock table
    -- audit_log` must not outlive the request that gave up on it): a quarter second past
    -- it, as the writer gives up first (at the deadline, and asks the server to cancel);
    -- set for this transaction only: the lane's connection keeps no session state, so a
    -- transaction pooler can carry it
    perform set_config('lock_timeout', greatest(1, ceil(left_s * 1000) + 250)::bigint || 'ms',
                       true);
    -- plpgsql, not sql: its statement's plan is kept for the session (a sql function with
    -- a data-modifying statement is planned again at each call: ~100 µs a batch)
    with go as materialized (
        select 1 where clock_timestamp() < statement_timestamp() + make_interval(secs => left_s)
    ), written as (
        insert into audit_log (at, chain_id, seq, request_id, actor_sub, actor_role,
                               actor_partner, actor_euo, method, path, service, route, data_sets,
                               fields_removed, subject_euo, subject_users, decision, reason,
                               status, bytes, duration_ms, client_addr, client_request_id,
                               requests, trace_id, policy_version, break_glass, withheld,
                               phase, access, salt, prev_hash, row_hash)
        select r.at, r.chain_id, r.seq, r.request_id, r.actor_sub, r.actor_role,
               r.actor_partner, r.actor_euo, r.method, r.path, r.service, r.route,
               r.data_sets::text[], r.fields_removed::text[], r.subject_euo,
               r.subject_users::text[], r.decision, r.reason, r.status, r.bytes, r.duration_ms,
               r.client_addr, r.client_request_id, r.requests, r.trace_id, r.policy_version,
               r.break_glass, r.withheld, r.phase, r.access, r.salt, r.prev_hash, r.row_hash
          from unnest(batch) as r, go
    )
    insert into audit_chain_heads as h (chain_id, last_seq, last_hash)
    select chain, audit_append.last_seq, audit_append.last_hash from go
    on conflict (chain_id) do update
        set last_seq = excluded.last_seq, last_hash = excluded.last_hash, updated_at = now()
    returning h.last_seq into head;
    return head;
end $$;

CREATE FUNCTION public.audit_chain_heads_forward_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
    if tg_op <> 'UPDATE' then
        raise exception 'audit_chain_heads rows cannot be removed';
    end if;
    if new.chain_id <> old.chain_id or new.opened_at <> old.opened_at
       or new.last_seq < old.last_seq
       or (new.last_seq = old.last_seq and new.last_hash <> old.last_hash)
       or (old.closed and (not new.closed or new.last_seq <> old.last_seq
                           or new.closed_at is distinct from old.closed_at)) then
        raise exception 'audit_chain_heads only move forward';
    end if;
    return new;
end $$;

CREATE FUNCTION public.audit_checkpoints_append_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
    raise exception '% is append-only', tg_table_name;
end $$;

CREATE FUNCTION public.audit_ensure_partition(month date) RETURNS text
    LANGUAGE plpgsql
    AS $$
declare
    first date := date_trunc('month', month)::date;
    name text := format('audit_log_y%sm%s', to_char(first, 'YYYY'), to_char(first, 'MM'));
begin
    if to_regclass(name) is null then
        execute format('create table %I partition of audit_log for values from (%L) to (%L)',
                       name, first, (first + interval '1 month')::date);
    end if;
    return name;
end $$;

CREATE FUNCTION public.audit_log_append_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
    raise exception 'audit_log is append-only';
end $$;

CREATE FUNCTION public.audit_prune(cutoff timestamp with time zone, dry_run boolean) RETURNS TABLE(partition text, ends timestamp with time zone)
    LANGUAGE plpgsql
    AS $_$
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
end $_$;

CREATE FUNCTION public.break_glass_end_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.break_glass_no_truncate() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
    raise exception 'break_glass is append-only: it is never truncated';
end $$;

CREATE FUNCTION public.break_glass_notify() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
    perform pg_notify('gateway_break_glass', coalesce(new.id, old.id)::text);
    return null;
end $$;

CREATE FUNCTION public.contracts_history() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'public', 'pg_temp'
    AS $$
begin
    if tg_op in ('UPDATE', 'DELETE') then
        update contract_history set ended_at = now()
         where euo_id = old.euo_id and ended_at is null;
    end if;
    if tg_op in ('INSERT', 'UPDATE') then
        insert into contract_history (euo_id, partner_id, started_at, contract_end)
        values (new.euo_id, new.partner_id, now(), new.contract_end);
    end if;
    return null;
end $$;

CREATE FUNCTION public.contracts_notify() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
    perform pg_notify('gateway_contracts', coalesce(new.euo_id, old.euo_id));
    return null;
end $$;

CREATE FUNCTION public.dsr_erasure_calls_guard() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
    if old.outcome <> 'unknown' then
        raise exception 'dsr_erasure_calls: a call''s outcome, once written, never changes'
            using errcode = 'check_violation';
    end if;
    if new.outcome not in ('erased', 'not_held', 'failed') then
        raise exception 'dsr_erasure_calls: an intent becomes erased, not_held or failed'
            using errcode = 'check_violation';
    end if;
    if (new.id, new.request_id, new.at, new.data_sets, new.method, new.path)
       is distinct from (old.id, old.request_id, old.at, old.data_sets, old.method, old.path) then
        raise exception 'dsr_erasure_calls: a call''s request, time, data sets and path never change'
            using errcode = 'check_violation';
    end if;
    new.outcome_at := now();
    return new;
end $$;

CREATE TABLE public.dsr_requests (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    user_sub text NOT NULL,
    euo_id text NOT NULL,
    type text NOT NULL,
    data_sets text[] NOT NULL,
    detail text DEFAULT ''::text NOT NULL,
    status text DEFAULT 'open'::text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    due_at timestamp with time zone DEFAULT (now() + '30 days'::interval) NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    resolved_by text,
    resolution text,
    due_soon_notified_at timestamp with time zone,
    overdue_notified_at timestamp with time zone,
    CONSTRAINT dsr_requests_status_check CHECK ((status = ANY (ARRAY['open'::text, 'accepted'::text, 'rejected'::text, 'completed'::text, 'withdrawn'::text, 'failed'::text]))),
    CONSTRAINT dsr_requests_type_check CHECK ((type = ANY (ARRAY['rectification'::text, 'erasure'::text, 'restriction'::text, 'objection'::text])))
);

CREATE FUNCTION public.dsr_event_payload(r public.dsr_requests) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
    select jsonb_build_object('id', r.id, 'type', r.type, 'status', r.status,
                              'euo_id', r.euo_id, 'user_sub', r.user_sub,
                              'data_sets', to_jsonb(r.data_sets), 'created_at', r.created_at,
                              'due_at', r.due_at, 'updated_at', r.updated_at)
$$;

CREATE FUNCTION public.dsr_requests_guard() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
    if (new.id, new.user_sub, new.euo_id, new.type, new.data_sets, new.detail, new.created_at,
        new.due_at) is distinct from (old.id, old.user_sub, old.euo_id, old.type,
        old.data_sets, old.detail, old.created_at, old.due_at) then
        raise exception 'a data-subject request''s subject, type, data sets, detail and due date never change'
            using errcode = 'check_violation';
    end if;
    if new.status is distinct from old.status and (old.status, new.status) not in (
            ('open', 'accepted'), ('open', 'rejected'), ('open', 'withdrawn'),
            ('accepted', 'completed'), ('accepted', 'rejected'), ('accepted', 'withdrawn'),
            ('accepted', 'failed'),
            ('failed', 'accepted'), ('failed', 'rejected'), ('failed', 'withdrawn')) then
        raise exception 'a data-subject request cannot move from % to %', old.status, new.status
            using errcode = 'check_violation';
    end if;
    if new.status = old.status and old.status in ('completed', 'rejected', 'withdrawn')
            and (new.resolution, new.resolved_by) is distinct from (old.resolution, old.resolved_by) then
        raise exception 'a % request is final', old.status using errcode = 'check_violation';
    end if;
    if (old.due_soon_notified_at is not null
            and new.due_soon_notified_at is distinct from old.due_soon_notified_at)
        or (old.overdue_notified_at is not null
            and new.overdue_notified_at is distinct from old.overdue_notified_at) then
        raise exception 'a notice, once queued, stays noted' using errcode = 'check_violation';
    end if;
    return new;
end $$;

CREATE FUNCTION public.dsr_requests_notify() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
begin
    if coalesce(new.type, old.type) in ('restriction', 'objection') then
        perform pg_notify('gateway_restrictions',
                          json_build_array(coalesce(new.euo_id, old.euo_id),
                                           coalesce(new.user_sub, old.user_sub))::text);
    end if;
    return null;
end $$;

CREATE FUNCTION public.outcome_of(r public.audit_log) RETURNS text
    LANGUAGE sql STABLE
    AS $$
    select case when r.phase = 'intent' then
        case when exists (select 1 from audit_log o
                           where o.request_id = r.request_id and o.phase = 'outcome'
                             and o.method = r.method and o.path = r.path)
             then 'recorded' else 'unknown' end
    end
$$;

CREATE FUNCTION public.webhook_outbox_guard() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.webhook_prune(keep interval) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'public', 'pg_temp'
    AS $$
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

CREATE TABLE public.alert_watermark (
    id boolean DEFAULT true NOT NULL,
    at timestamp with time zone NOT NULL,
    chain_id uuid NOT NULL,
    seq bigint NOT NULL,
    moved_at timestamp with time zone DEFAULT now() NOT NULL,
    evaluator text,
    CONSTRAINT alert_watermark_id_check CHECK (id)
);

CREATE TABLE public.alerts (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    rule text NOT NULL,
    per text NOT NULL,
    key text NOT NULL,
    window_start timestamp with time zone NOT NULL,
    observed_from timestamp with time zone NOT NULL,
    observed_to timestamp with time zone NOT NULL,
    observed bigint NOT NULL,
    limit_value bigint NOT NULL,
    baseline double precision,
    factor double precision,
    actor_sub text,
    actor_role text,
    actor_partner text,
    actor_euo text,
    subject_euos text[] DEFAULT '{}'::text[] NOT NULL,
    audit_query text NOT NULL,
    policy_version text,
    raised_at timestamp with time zone DEFAULT now() NOT NULL,
    acked_at timestamp with time zone,
    acked_by text,
    ack_note text,
    CONSTRAINT alerts_per_check CHECK ((per = ANY (ARRAY['actor'::text, 'partner'::text, 'euo'::text])))
);

CREATE TABLE public.audit_chain_heads (
    chain_id uuid NOT NULL,
    last_seq bigint NOT NULL,
    last_hash bytea NOT NULL,
    opened_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    closed_at timestamp with time zone,
    closed boolean DEFAULT false NOT NULL,
    CONSTRAINT audit_chain_heads_last_seq_check CHECK ((last_seq >= 0))
);

CREATE TABLE public.audit_checkpoints (
    id bigint NOT NULL,
    chain_id uuid NOT NULL,
    seq bigint NOT NULL,
    row_hash bytea NOT NULL,
    at timestamp with time zone NOT NULL,
    closed boolean NOT NULL,
    key_id text NOT NULL,
    signature bytea NOT NULL,
    version smallint DEFAULT 1 NOT NULL,
    tree_size bigint,
    root bytea,
    CONSTRAINT audit_checkpoints_tree CHECK ((((version = 1) AND (tree_size IS NULL) AND (root IS NULL)) OR ((version = 2) AND (tree_size = seq) AND (length(root) = 32)))),
    CONSTRAINT audit_checkpoints_version_check CHECK ((version = ANY (ARRAY[1, 2])))
);

CREATE SEQUENCE public.audit_checkpoints_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.audit_checkpoints_id_seq OWNED BY public.audit_checkpoints.id;

CREATE TABLE public.audit_log_default (
    at timestamp with time zone NOT NULL,
    chain_id uuid NOT NULL,
    seq bigint NOT NULL,
    request_id text NOT NULL,
    actor_sub text,
    actor_role text,
    actor_partner text,
    actor_euo text,
    method text NOT NULL,
    path text NOT NULL,
    service text,
    route text,
    data_sets text[] NOT NULL,
    fields_removed text[] NOT NULL,
    subject_euo text,
    subject_users text[] NOT NULL,
    decision text NOT NULL,
    reason text,
    status integer NOT NULL,
    bytes bigint NOT NULL,
    duration_ms double precision NOT NULL,
    client_addr text,
    prev_hash bytea NOT NULL,
    row_hash bytea NOT NULL,
    client_request_id text,
    requests integer,
    trace_id text,
    policy_version text,
    withheld text,
    break_glass uuid,
    phase text,
    access text,
    salt text,
    CONSTRAINT audit_log_access_check CHECK (((access IS NULL) OR (access = ANY (ARRAY['served'::text, 'acted_upon'::text, 'named'::text, 'explained'::text])))),
    CONSTRAINT audit_log_phase_check CHECK (((phase IS NULL) OR (phase = ANY (ARRAY['intent'::text, 'outcome'::text]))))
);

CREATE TABLE public.audit_merkle_nodes (
    chain_id uuid NOT NULL,
    level smallint NOT NULL,
    idx bigint NOT NULL,
    hash bytea NOT NULL,
    CONSTRAINT audit_merkle_nodes_hash_check CHECK ((length(hash) = 32)),
    CONSTRAINT audit_merkle_nodes_idx_check CHECK ((idx >= 0)),
    CONSTRAINT audit_merkle_nodes_level_check CHECK (((level >= 0) AND (level <= 62)))
);

CREATE TABLE public.audit_merkle_runs (
    chain_id uuid NOT NULL,
    level smallint NOT NULL,
    first_idx bigint NOT NULL,
    hashes bytea NOT NULL,
    CONSTRAINT audit_merkle_runs_first_idx_check CHECK ((first_idx >= 0)),
    CONSTRAINT audit_merkle_runs_hashes_check CHECK (((length(hashes) > 0) AND ((length(hashes) % 32) = 0))),
    CONSTRAINT audit_merkle_runs_level_check CHECK (((level >= 0) AND (level <= 62)))
);

CREATE TABLE public.audit_signing_keys (
    key_id text NOT NULL,
    public_key bytea NOT NULL,
    first_used timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.audit_verified (
    chain_id uuid NOT NULL,
    seq bigint NOT NULL,
    row_hash bytea NOT NULL,
    verified_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.break_glass (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    actor_role text NOT NULL,
    actor_sub text NOT NULL,
    actor_partner text,
    euo_id text NOT NULL,
    user_sub text,
    purpose text NOT NULL,
    ticket text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    ends_at timestamp with time zone NOT NULL,
    ended_at timestamp with time zone,
    ended_by text,
    CONSTRAINT break_glass_check CHECK ((ends_at > created_at))
);

CREATE TABLE public.contract_history (
    euo_id text NOT NULL,
    partner_id text NOT NULL,
    started_at timestamp with time zone NOT NULL,
    ended_at timestamp with time zone,
    contract_end date
);

CREATE TABLE public.contracts (
    euo_id text NOT NULL,
    partner_id text NOT NULL,
    contract_end date,
    updated_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.dsr_erasure_calls (
    id bigint NOT NULL,
    request_id uuid NOT NULL,
    at timestamp with time zone DEFAULT now() NOT NULL,
    data_sets text[] NOT NULL,
    method text NOT NULL,
    path text NOT NULL,
    status integer,
    outcome text NOT NULL,
    reason text,
    outcome_at timestamp with time zone,
    CONSTRAINT dsr_erasure_calls_outcome_check CHECK ((outcome = ANY (ARRAY['erased'::text, 'not_held'::text, 'failed'::text, 'unknown'::text, 'needs_wider'::text])))
);

CREATE SEQUENCE public.dsr_erasure_calls_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.dsr_erasure_calls_id_seq OWNED BY public.dsr_erasure_calls.id;

CREATE TABLE public.dsr_transitions (
    id bigint NOT NULL,
    request_id uuid NOT NULL,
    at timestamp with time zone DEFAULT now() NOT NULL,
    from_status text,
    to_status text NOT NULL,
    actor text NOT NULL,
    note text
);

CREATE SEQUENCE public.dsr_transitions_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.dsr_transitions_id_seq OWNED BY public.dsr_transitions.id;

CREATE TABLE public.idempotency_keys (
    actor text NOT NULL,
    key text NOT NULL,
    fingerprint bytea NOT NULL,
    request_id text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    status integer,
    body bytea
);

CREATE TABLE public.schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.webhook_deliveries (
    id bigint NOT NULL,
    outbox_id bigint NOT NULL,
    at timestamp with time zone DEFAULT now() NOT NULL,
    attempt integer NOT NULL,
    url text NOT NULL,
    status integer,
    error text,
    duration_ms double precision NOT NULL
);

CREATE SEQUENCE public.webhook_deliveries_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.webhook_deliveries_id_seq OWNED BY public.webhook_deliveries.id;

CREATE TABLE public.webhook_outbox (
    id bigint NOT NULL,
    event text NOT NULL,
    request_id uuid,
    payload jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    delivered_at timestamp with time zone,
    given_up_at timestamp with time zone,
    last_error text
);

CREATE SEQUENCE public.webhook_outbox_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.webhook_outbox_id_seq OWNED BY public.webhook_outbox.id;

ALTER TABLE ONLY public.audit_log ATTACH PARTITION public.audit_log_default DEFAULT;

ALTER TABLE ONLY public.audit_checkpoints ALTER COLUMN id SET DEFAULT nextval('public.audit_checkpoints_id_seq'::regclass);

ALTER TABLE ONLY public.dsr_erasure_calls ALTER COLUMN id SET DEFAULT nextval('public.dsr_erasure_calls_id_seq'::regclass);

ALTER TABLE ONLY public.dsr_transitions ALTER COLUMN id SET DEFAULT nextval('public.dsr_transitions_id_seq'::regclass);

ALTER TABLE ONLY public.webhook_deliveries ALTER COLUMN id SET DEFAULT nextval('public.webhook_deliveries_id_seq'::regclass);

ALTER TABLE ONLY public.webhook_outbox ALTER COLUMN id SET DEFAULT nextval('public.webhook_outbox_id_seq'::regclass);

ALTER TABLE ONLY public.alert_watermark
    ADD CONSTRAINT alert_watermark_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.alerts
    ADD CONSTRAINT alerts_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.alerts
    ADD CONSTRAINT alerts_rule_key_window_start_key UNIQUE (rule, key, window_start);

ALTER TABLE ONLY public.audit_chain_heads
    ADD CONSTRAINT audit_chain_heads_pkey PRIMARY KEY (chain_id);

ALTER TABLE ONLY public.audit_checkpoints
    ADD CONSTRAINT audit_checkpoints_pkey PRIMARY KEY (chain_id, id);

ALTER TABLE ONLY public.audit_merkle_nodes
    ADD CONSTRAINT audit_merkle_nodes_pkey PRIMARY KEY (chain_id, level, idx);

ALTER TABLE ONLY public.audit_merkle_runs
    ADD CONSTRAINT audit_merkle_runs_pkey PRIMARY KEY (chain_id, level, first_idx);

ALTER TABLE ONLY public.audit_signing_keys
    ADD CONSTRAINT audit_signing_keys_pkey PRIMARY KEY (key_id);

ALTER TABLE ONLY public.audit_verified
    ADD CONSTRAINT audit_verified_pkey PRIMARY KEY (chain_id);

ALTER TABLE ONLY public.break_glass
    ADD CONSTRAINT break_glass_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.contracts
    ADD CONSTRAINT contracts_pkey PRIMARY KEY (euo_id);

ALTER TABLE ONLY public.dsr_erasure_calls
    ADD CONSTRAINT dsr_erasure_calls_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.dsr_requests
    ADD CONSTRAINT dsr_requests_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.dsr_transitions
    ADD CONSTRAINT dsr_transitions_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.idempotency_keys
    ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY (actor, key);

ALTER TABLE ONLY public.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);

ALTER TABLE ONLY public.webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.webhook_outbox
    ADD CONSTRAINT webhook_outbox_pkey PRIMARY KEY (id);

CREATE INDEX alerts_raised ON public.alerts USING btree (raised_at DESC, id DESC);

CREATE INDEX alerts_subject_euos ON public.alerts USING gin (subject_euos);

CREATE INDEX audit_checkpoints_chain ON public.audit_checkpoints USING btree (chain_id, seq);

CREATE INDEX audit_checkpoints_id ON public.audit_checkpoints USING btree (id);

CREATE INDEX audit_checkpoints_tree ON public.audit_checkpoints USING btree (chain_id, tree_size DESC) WHERE (version = 2);

CREATE INDEX audit_log_actor ON ONLY public.audit_log USING btree (actor_sub, at DESC);

CREATE INDEX audit_log_actor_euo_at ON ONLY public.audit_log USING btree (actor_euo, at) WHERE (actor_euo IS NOT NULL);

CREATE INDEX audit_log_at ON ONLY public.audit_log USING btree (at DESC, chain_id DESC, seq DESC);

CREATE INDEX audit_log_chain ON ONLY public.audit_log USING btree (chain_id, seq);

CREATE INDEX audit_log_default_actor_euo_at_idx ON public.audit_log_default USING btree (actor_euo, at) WHERE (actor_euo IS NOT NULL);

CREATE INDEX audit_log_partner_at ON ONLY public.audit_log USING btree (actor_partner, at) WHERE (actor_partner IS NOT NULL);

CREATE INDEX audit_log_default_actor_partner_at_idx ON public.audit_log_default USING btree (actor_partner, at) WHERE (actor_partner IS NOT NULL);

CREATE INDEX audit_log_default_actor_sub_at_idx ON public.audit_log_default USING btree (actor_sub, at DESC);

CREATE INDEX audit_log_default_at_chain_id_seq_idx ON public.audit_log_default USING btree (at DESC, chain_id DESC, seq DESC);

CREATE INDEX audit_log_default_chain_id_seq_idx ON public.audit_log_default USING btree (chain_id, seq);

CREATE INDEX audit_log_phased ON ONLY public.audit_log USING btree (request_id, phase) WHERE (phase IS NOT NULL);

CREATE INDEX audit_log_default_request_id_phase_idx ON public.audit_log_default USING btree (request_id, phase) WHERE (phase IS NOT NULL);

CREATE INDEX audit_log_subject_euo ON ONLY public.audit_log USING btree (subject_euo, at DESC);

CREATE INDEX audit_log_default_subject_euo_at_idx ON public.audit_log_default USING btree (subject_euo, at DESC);

CREATE INDEX audit_log_subject_users ON ONLY public.audit_log USING gin (subject_users);

CREATE INDEX audit_log_default_subject_users_idx ON public.audit_log_default USING gin (subject_users);

CREATE INDEX break_glass_euo ON public.break_glass USING btree (euo_id, created_at DESC);

CREATE INDEX break_glass_in_force ON public.break_glass USING btree (ends_at) WHERE (ended_at IS NULL);

CREATE INDEX contract_history_partner ON public.contract_history USING btree (partner_id, euo_id);

CREATE INDEX contracts_partner ON public.contracts USING btree (partner_id);

CREATE INDEX dsr_erasure_calls_request ON public.dsr_erasure_calls USING btree (request_id, id);

CREATE INDEX dsr_requests_euo ON public.dsr_requests USING btree (euo_id, due_at);

CREATE INDEX dsr_requests_euo_user ON public.dsr_requests USING btree (euo_id, user_sub, created_at DESC);

CREATE INDEX dsr_requests_unresolved ON public.dsr_requests USING btree (due_at) WHERE (status = ANY (ARRAY['open'::text, 'accepted'::text, 'failed'::text]));

CREATE INDEX dsr_transitions_request ON public.dsr_transitions USING btree (request_id, id);

CREATE INDEX idempotency_keys_created ON public.idempotency_keys USING btree (created_at);

CREATE INDEX webhook_deliveries_outbox ON public.webhook_deliveries USING btree (outbox_id, id);

CREATE INDEX webhook_outbox_pending ON public.webhook_outbox USING btree (next_attempt_at) WHERE ((delivered_at IS NULL) AND (given_up_at IS NULL));

CREATE INDEX webhook_outbox_pending_by_subject ON public.webhook_outbox USING btree (COALESCE((request_id)::text, (payload ->> 'id'::text)), id) WHERE ((delivered_at IS NULL) AND (given_up_at IS NULL));

ALTER INDEX public.audit_log_actor_euo_at ATTACH PARTITION public.audit_log_default_actor_euo_at_idx;

ALTER INDEX public.audit_log_partner_at ATTACH PARTITION public.audit_log_default_actor_partner_at_idx;

ALTER INDEX public.audit_log_actor ATTACH PARTITION public.audit_log_default_actor_sub_at_idx;

ALTER INDEX public.audit_log_at ATTACH PARTITION public.audit_log_default_at_chain_id_seq_idx;

ALTER INDEX public.audit_log_chain ATTACH PARTITION public.audit_log_default_chain_id_seq_idx;

ALTER INDEX public.audit_log_phased ATTACH PARTITION public.audit_log_default_request_id_phase_idx;

ALTER INDEX public.audit_log_subject_euo ATTACH PARTITION public.audit_log_default_subject_euo_at_idx;

ALTER INDEX public.audit_log_subject_users ATTACH PARTITION public.audit_log_default_subject_users_idx;

CREATE TRIGGER audit_chain_heads_forward_only BEFORE DELETE OR UPDATE ON public.audit_chain_heads FOR EACH ROW EXECUTE FUNCTION public.audit_chain_heads_forward_only();

CREATE TRIGGER audit_chain_heads_no_truncate BEFORE TRUNCATE ON public.audit_chain_heads FOR EACH STATEMENT EXECUTE FUNCTION public.audit_chain_heads_forward_only();

CREATE TRIGGER audit_checkpoints_append_only BEFORE DELETE OR UPDATE ON public.audit_checkpoints FOR EACH ROW EXECUTE FUNCTION public.audit_checkpoints_append_only();

CREATE TRIGGER audit_log_append_only BEFORE DELETE OR UPDATE ON public.audit_log FOR EACH ROW EXECUTE FUNCTION public.audit_log_append_only();

CREATE TRIGGER audit_merkle_nodes_append_only BEFORE DELETE OR UPDATE ON public.audit_merkle_nodes FOR EACH ROW EXECUTE FUNCTION public.audit_checkpoints_append_only();

CREATE TRIGGER audit_merkle_runs_append_only BEFORE DELETE OR UPDATE ON public.audit_merkle_runs FOR EACH ROW EXECUTE FUNCTION public.audit_checkpoints_append_only();

CREATE TRIGGER audit_signing_keys_append_only BEFORE DELETE OR UPDATE ON public.audit_signing_keys FOR EACH ROW EXECUTE FUNCTION public.audit_checkpoints_append_only();

CREATE TRIGGER break_glass_end_only BEFORE DELETE OR UPDATE ON public.break_glass FOR EACH ROW EXECUTE FUNCTION public.break_glass_end_only();

CREATE TRIGGER break_glass_no_truncate BEFORE TRUNCATE ON public.break_glass FOR EACH STATEMENT EXECUTE FUNCTION public.break_glass_no_truncate();

CREATE TRIGGER break_glass_notify AFTER INSERT OR DELETE OR UPDATE ON public.break_glass FOR EACH ROW EXECUTE FUNCTION public.break_glass_notify();

CREATE TRIGGER contracts_history AFTER INSERT OR DELETE OR UPDATE ON public.contracts FOR EACH ROW EXECUTE FUNCTION public.contracts_history();

CREATE TRIGGER contracts_notify AFTER INSERT OR DELETE OR UPDATE ON public.contracts FOR EACH ROW EXECUTE FUNCTION public.contracts_notify();

CREATE TRIGGER dsr_erasure_calls_guard BEFORE UPDATE ON public.dsr_erasure_calls FOR EACH ROW EXECUTE FUNCTION public.dsr_erasure_calls_guard();

CREATE TRIGGER dsr_requests_guard BEFORE UPDATE ON public.dsr_requests FOR EACH ROW EXECUTE FUNCTION public.dsr_requests_guard();

CREATE TRIGGER dsr_requests_notify AFTER INSERT OR DELETE OR UPDATE ON public.dsr_requests FOR EACH ROW EXECUTE FUNCTION public.dsr_requests_notify();

CREATE TRIGGER webhook_outbox_guard BEFORE UPDATE ON public.webhook_outbox FOR EACH ROW EXECUTE FUNCTION public.webhook_outbox_guard();

ALTER TABLE ONLY public.audit_checkpoints
    ADD CONSTRAINT audit_checkpoints_key_id_fkey FOREIGN KEY (key_id) REFERENCES public.audit_signing_keys(key_id);

ALTER TABLE ONLY public.dsr_erasure_calls
    ADD CONSTRAINT dsr_erasure_calls_request_id_fkey FOREIGN KEY (request_id) REFERENCES public.dsr_requests(id);

ALTER TABLE ONLY public.dsr_transitions
    ADD CONSTRAINT dsr_transitions_request_id_fkey FOREIGN KEY (request_id) REFERENCES public.dsr_requests(id);

ALTER TABLE ONLY public.webhook_deliveries
    ADD CONSTRAINT webhook_deliveries_outbox_id_fkey FOREIGN KEY (outbox_id) REFERENCES public.webhook_outbox(id);
