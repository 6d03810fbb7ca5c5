-- A random salt per row (32 hex digits), hashed into the row's chain hash as its last field
-- (gateway/audit/chain.py HASHED) and left out of the Merkle leaf's public digest with the
-- withheld fields (gateway/audit/leaves.py). Without it, whoever held a slice with a row
-- they may not see whole and its chain predecessor (whose row_hash is that row's
-- prev_hash) could confirm a guess of the withheld `actor_sub` and `client_addr` against
-- the row hash; with it, the row hash is a salted commitment, and the salt is shown only
-- to a caller who sees the row whole. Text, like `withheld`, so the bytes hashed are the
-- bytes read back. Hashed only when set: rows written before (null) still verify.
alter table audit_log add column salt text;

-- the writer's batch row type (026) gains the column before the two hashes: recreated,
-- as ALTER TYPE ... ADD ATTRIBUTE can only append
drop type audit_row_in;
create type audit_row_in as (
    at                timestamptz,
    chain_id          uuid,
    seq               bigint,
    request_id        text,
    actor_sub         text,
    actor_role        text,
    actor_partner     text,
    actor_euo         text,
    method            text,
    path              text,
    service           text,
    route             text,
    data_sets         text,     -- text[] literal
    fields_removed    text,     -- text[] literal
    subject_euo       text,
    subject_users     text,     -- text[] literal
    decision          text,
    reason            text,
    status            integer,
    bytes             bigint,
    duration_ms       double precision,
    client_addr       text,
    client_request_id text,
    requests          integer,
    trace_id          text,
    policy_version    text,
    break_glass       uuid,
    withheld          text,
    phase             text,     -- 027
    access            text,     -- 028
    salt              text,
    prev_hash         bytea,
    row_hash          bytea
);
