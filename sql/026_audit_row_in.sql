-- What the audit writer sends a batch as: audit_log's columns in the writer's order
-- (gateway/audit/writer.py, COLUMNS), the three text[] columns as array literals
-- ('{"a","b"}') that the insert casts back. asyncpg encodes a text[] value in a row at
-- ~0.6 µs an array plus ~0.35 µs an element (a Python-level isinstance check each); a
-- literal built in Python and sent as text costs a fraction of that. The writer refuses
-- to start if this type and COLUMNS disagree.
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
    prev_hash         bytea,
    row_hash          bytea
);
