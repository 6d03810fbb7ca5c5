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
