-- One row per request that reaches the gateway, allowed or denied (README.md, The audit log).
--
-- Append-only and tamper-evident: every gateway process writes its own hash chain
-- (chain_id, seq, prev_hash, row_hash = sha256(prev_hash || canonical row)), so processes
-- never serialise on one chain and `gateway audit verify` finds an altered or missing row.
-- Partitioned by month so that retention drops whole partitions, never single rows.
create table audit_log (
    at             timestamptz not null,
    chain_id       uuid not null,
    seq            bigint not null,
    request_id     text not null,
    actor_sub      text,
    actor_role     text,
    actor_partner  text,
    actor_euo      text,
    method         text not null,
    path           text not null,
    service        text,
    route          text,
    data_sets      text[] not null,
    fields_removed text[] not null,
    subject_euo    text,
    subject_users  text[] not null,
    decision       text not null,
    reason         text,
    status         integer not null,
    bytes          bigint not null,
    duration_ms    double precision not null,
    client_addr    text,
    prev_hash      bytea not null,
    row_hash       bytea not null
) partition by range (at);

create table audit_log_default partition of audit_log default;

-- keyset paging (newest first), the access-log and scope filters, chain verification
create index audit_log_at on audit_log (at desc, chain_id desc, seq desc);
create index audit_log_subject_users on audit_log using gin (subject_users);
create index audit_log_subject_euo on audit_log (subject_euo, at desc);
create index audit_log_actor on audit_log (actor_sub, at desc);
create index audit_log_chain on audit_log (chain_id, seq);

-- The month partition holding `month` (any day of it), created if missing.
create function audit_ensure_partition(month date) returns text language plpgsql as $$
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

select audit_ensure_partition((now() + make_interval(months => m))::date)
  from generate_series(0, 2) as m;

-- Append-only: no role may change or remove a row; retention drops whole partitions.
create function audit_log_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'audit_log is append-only';
end $$;
create trigger audit_log_append_only before update or delete on audit_log
    for each row execute function audit_log_append_only();
revoke update, delete, truncate on audit_log from public;

-- Retention: drop the month partitions that ended at or before `cutoff` (never the
-- default partition, never single rows). With dry_run, only say which.
create function audit_prune(cutoff timestamptz, dry_run boolean)
returns table (partition text, ends timestamptz) language plpgsql as $$
declare
    r record;
begin
    for r in select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid
              where i.inhparent = 'audit_log'::regclass
                and c.relname ~ '^audit_log_y[0-9]{4}m[0-9]{2}$'
              order by c.relname
    loop
        partition := r.relname;
        ends := (to_date(substr(r.relname, 12, 4) || substr(r.relname, 17, 2), 'YYYYMM')
                 + interval '1 month')::timestamptz;
        if ends <= cutoff then
            if not dry_run then
                execute format('drop table %I', r.relname);
            end if;
            return next;
        end if;
    end loop;
end $$;
