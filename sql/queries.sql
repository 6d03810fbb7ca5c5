-- Named queries: `-- name: X` starts one; Python passes $n parameters only.

-- name: all_contracts
select euo_id, partner_id, contract_end from contracts;

-- name: one_contract
select euo_id, partner_id, contract_end from contracts where euo_id = $1;

-- name: put_contract
insert into contracts (euo_id, partner_id, contract_end) values ($1, $2, $3)
on conflict (euo_id) do update
    set partner_id = excluded.partner_id, contract_end = excluded.contract_end, updated_at = now()
returning euo_id, partner_id, contract_end, updated_at;

-- name: delete_contract
delete from contracts where euo_id = $1 returning euo_id;
