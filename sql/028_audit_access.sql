-- What an audit row means for the data sets it names (README.md, The audit log): how they
-- were touched. `served` (data left to the caller: a read, a download, an export), `acted_upon`
-- (changed or deleted: a proxied write, an erasure's calls), `named` (a data-subject request
-- filed, answered or listed about them: nothing served), `explained` (an explain about a
-- user: the decision, not the data). Null on refusals and on rows written before this
-- migration. A user's access log shows what others served, acted upon and explained about
-- them, never rows that only name them.
--
-- Hashed only when set (gateway/audit/chain.py): rows written before stay verifiable.
alter table audit_log add column access text
    check (access is null or access in ('served', 'acted_upon', 'named', 'explained'));

-- the writer's batch row type gains it after `phase`, before the two hashes
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
    phase             text,
    access            text,
    prev_hash         bytea,
    row_hash          bytea
);
