-- Signed checkpoints: at a fixed interval and at clean shutdown, each writer's chain head
-- (chain, seq, last row hash, time, closed) is signed with an Ed25519 key; whoever holds
-- the public key can check rows against it without trusting this database. The public
-- keys ever used are kept (rotation: old keys stay for verification). Both tables are
-- append-only.
create table audit_signing_keys (
    key_id      text primary key,
    public_key  bytea not null,         -- raw 32-byte Ed25519 public key
    first_used  timestamptz not null default now()
);

create table audit_checkpoints (
    id          bigserial primary key,
    chain_id    uuid not null,
    seq         bigint not null,
    row_hash    bytea not null,
    at          timestamptz not null,
    closed      boolean not null,
    key_id      text not null references audit_signing_keys (key_id),
    signature   bytea not null
);
create index audit_checkpoints_chain on audit_checkpoints (chain_id, seq);

create function audit_checkpoints_append_only() returns trigger language plpgsql as $$
begin
    raise exception '% is append-only', tg_table_name;
end $$;
create trigger audit_checkpoints_append_only before update or delete on audit_checkpoints
    for each row execute function audit_checkpoints_append_only();
create trigger audit_signing_keys_append_only before update or delete on audit_signing_keys
    for each row execute function audit_checkpoints_append_only();
revoke update, delete, truncate on audit_checkpoints, audit_signing_keys from public;
