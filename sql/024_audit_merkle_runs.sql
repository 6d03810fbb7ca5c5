-- The Merkle trees' perfect nodes, stored a run at a time: each checkpoint completes, at
-- each level, a run of consecutive nodes (level, first_idx), (level, first_idx + 1), …,
-- and stores them as one row, their hashes concatenated (32 bytes each, in order). That is
-- a few rows per checkpoint (one per level of the tree) instead of about two per audit
-- row, which was most of what sealing cost the database. Nodes stored one per row
-- before (audit_merkle_nodes, 017) stay where they are and are read as they were.
create table audit_merkle_runs (
    chain_id  uuid not null,
    level     smallint not null check (level between 0 and 62),
    first_idx bigint not null check (first_idx >= 0),
    hashes    bytea not null check (length(hashes) > 0 and length(hashes) % 32 = 0),
    primary key (chain_id, level, first_idx)
);
create trigger audit_merkle_runs_append_only before update or delete on audit_merkle_runs
    for each row execute function audit_checkpoints_append_only();
revoke update, delete, truncate on audit_merkle_runs from public;
