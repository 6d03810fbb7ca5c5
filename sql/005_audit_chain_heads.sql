-- Where each audit hash chain ends, so that `gateway audit verify` sees rows missing at
-- the END of a chain (a truncated tail, or a whole chain deleted), not only in its middle.
--
-- The writer advances a chain's head in the same transaction as the COPY of its batch, so
-- a batch and its head commit together; a clean shutdown closes the head. A chain the
-- writer abandoned after a failed write keeps the head of what was committed.
create table audit_chain_heads (
    chain_id   uuid primary key,
    last_seq   bigint not null check (last_seq >= 0),
    last_hash  bytea not null,
    opened_at  timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    closed_at  timestamptz,
    closed     boolean not null default false
);

-- Heads only move forward: no going back, no rewriting the last hash at the same seq, no
-- reopening or extending a closed chain, no deleting. (A superuser can still switch the
-- trigger off; signed checkpoints outside the database are what would catch that.)
create function audit_chain_heads_forward_only() returns trigger language plpgsql as $$
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
create trigger audit_chain_heads_forward_only before update or delete on audit_chain_heads
    for each row execute function audit_chain_heads_forward_only();
create trigger audit_chain_heads_no_truncate before truncate on audit_chain_heads
    for each statement execute function audit_chain_heads_forward_only();
revoke update, delete, truncate on audit_chain_heads from public;

-- Chains written before this migration get the head of what they hold now (closed: their
-- writers are gone or will start new chains). Tails cut before today cannot be seen.
insert into audit_chain_heads (chain_id, last_seq, last_hash, opened_at, updated_at,
                               closed_at, closed)
select distinct on (chain_id) chain_id, seq, row_hash, now(), now(), now(), true
  from audit_log
 order by chain_id, seq desc;
