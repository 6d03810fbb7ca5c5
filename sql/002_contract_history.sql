-- When each partner held each EUO: a partner may read the access log of an EUO only for
-- the time it had an active contract. Kept by trigger from the contracts table: each
-- change closes the running period and opens a new one. A period covers
-- [started_at, ended_at) and, when contract_end is set, stops at that date too.
create table contract_history (
    euo_id       text not null,
    partner_id   text not null,
    started_at   timestamptz not null,
    ended_at     timestamptz,              -- null: still running
    contract_end date
);
create index contract_history_partner on contract_history (partner_id, euo_id);

create function contracts_history() returns trigger language plpgsql as $$
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
create trigger contracts_history after insert or update or delete on contracts
    for each row execute function contracts_history();
