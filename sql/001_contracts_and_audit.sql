-- The partner <-> EUO commercial relationships, managed through PUT/DELETE /v1/admin/euos/{euo}.
-- A contract is active while contract_end is null or in the future.
create table contracts (
    euo_id       text primary key,
    partner_id   text not null,
    contract_end date,
    updated_at   timestamptz not null default now()
);
create index contracts_partner on contracts (partner_id);

-- Every gateway process caches contracts in memory and reloads one EUO when told here.
create function contracts_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('gateway_contracts', coalesce(new.euo_id, old.euo_id));
    return null;
end $$;
create trigger contracts_notify after insert or update or delete on contracts
    for each row execute function contracts_notify();

-- One row per request that reaches the gateway, allowed or denied (SPEC §5).
create table audit_log (
    id             bigint generated always as identity primary key,
    at             timestamptz not null,
    request_id     text not null,
    actor_sub      text,
    actor_role     text,
    actor_partner  text,
    actor_euo      text,
    method         text not null,
    path           text not null,
    service        text,
    route          text,
    data_sets      text[] not null default '{}',
    fields_removed text[] not null default '{}',
    subject_euo    text,
    subject_users  text[] not null default '{}',
    decision       text not null check (decision in ('allow', 'deny')),
    reason         text,
    status         integer not null,
    bytes          bigint not null default 0,
    duration_ms    real not null,
    client_addr    text
);
create index audit_log_at on audit_log (at);
create index audit_log_subject_users on audit_log using gin (subject_users);

-- Rows are append-only.
create function audit_log_append_only() returns trigger language plpgsql as $$
begin
    raise exception 'audit_log is append-only';
end $$;
create trigger audit_log_append_only before update or delete on audit_log
    for each row execute function audit_log_append_only();
