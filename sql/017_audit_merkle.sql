-- Verifiable slices: each audit chain is also an RFC 6962 Merkle tree (SHA-256, leaf
-- prefix 0x00, node prefix 0x01) whose leaf i is the chain's row seq = i + 1. A checkpoint
-- of format 2 signs the tree's size (its seq) and root beside the chain head, so a tenant
-- can check its own rows with inclusion proofs, and anyone can check with consistency
-- proofs that the tree only grew. Format 1 checkpoints (no tree) stay as they were.
alter table audit_checkpoints
    add column version smallint not null default 1 check (version in (1, 2)),
    add column tree_size bigint,
    add column root bytea,
    add constraint audit_checkpoints_tree check (
        (version = 1 and tree_size is null and root is null)
        or (version = 2 and tree_size = seq and length(root) = 32));

-- The tree's perfect subtrees: node (level, idx) hashes leaves [idx * 2^level,
-- (idx + 1) * 2^level). Written once when the checkpoint that completes them is signed,
-- never changed; every hash an inclusion or consistency proof needs is one of them or a
-- fold of a few of them. Hashes only: no personal data.
create table audit_merkle_nodes (
    chain_id  uuid not null,
    level     smallint not null check (level between 0 and 62),
    idx       bigint not null check (idx >= 0),
    hash      bytea not null check (length(hash) = 32),
    primary key (chain_id, level, idx)
);
create trigger audit_merkle_nodes_append_only before update or delete on audit_merkle_nodes
    for each row execute function audit_checkpoints_append_only();
revoke update, delete, truncate on audit_merkle_nodes from public;
create index audit_checkpoints_tree on audit_checkpoints (chain_id, tree_size desc)
    where version = 2;
