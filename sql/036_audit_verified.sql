-- Where `gateway audit verify` last found each chain whole: its last verified row (seq and
-- row_hash). `verify --incremental` walks only the rows after it (starting from that hash),
-- so a daily run reads a day of rows, not the whole log; a full `verify` (the default)
-- walks everything and moves the watermark too. Keyed by chain_id like the chain's other
-- tables (distributed with them: tests/test_citus_ready.py).
create table audit_verified (
    chain_id     uuid primary key,
    seq          bigint not null,
    row_hash     bytea not null,
    verified_at  timestamptz not null default now()
);
