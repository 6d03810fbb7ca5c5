-- Ready for the audit log's road past one primary (docs/scale.md): Citus, distributed by
-- `chain_id`. A batch is one chain, so it lands on one shard in one local commit; a chain's
-- head, checkpoints and Merkle runs live beside its rows. For that, every primary and
-- unique key of a table distributed by chain_id holds chain_id (tests/test_citus_ready.py
-- checks it on the migrated schema), and the batch append is one function whose chain
-- argument Citus can route it by (create_distributed_function(..., '$2', colocate_with
-- => 'audit_log')). On a single PostgreSQL nothing changes but the keys' shape.

-- checkpoints keyed (chain_id, id); `id` alone is still looked up (GET .../checkpoints/{id})
alter table audit_checkpoints drop constraint audit_checkpoints_pkey;
alter table audit_checkpoints add primary key (chain_id, id);
create index audit_checkpoints_id on audit_checkpoints (id);

-- One batch of one chain: its rows ($1, as audit_row_in) and the chain's new head ($2..$4),
-- together or not at all. `go` is evaluated once, after any lock wait: past the batch's
-- deadline ($5 seconds after the statement arrived) nothing is written, so a batch its
-- callers gave up on (and were answered 503 for) does not commit afterwards. The head's
-- seq, or null when nothing was written.
create function audit_append(batch audit_row_in[], chain uuid, last_seq bigint,
                             last_hash bytea, left_s double precision)
returns bigint language plpgsql as $$
declare
    head bigint;
begin
    -- plpgsql, not sql: its statement's plan is kept for the session (a sql function with
    -- a data-modifying statement is planned again at each call: ~100 µs a batch)
    with go as materialized (
        select 1 where clock_timestamp() < statement_timestamp() + make_interval(secs => left_s)
    ), written as (
        insert into audit_log (at, chain_id, seq, request_id, actor_sub, actor_role,
                               actor_partner, actor_euo, method, path, service, route, data_sets,
                               fields_removed, subject_euo, subject_users, decision, reason,
                               status, bytes, duration_ms, client_addr, client_request_id,
                               requests, trace_id, policy_version, break_glass, withheld,
                               phase, access, salt, prev_hash, row_hash)
        select r.at, r.chain_id, r.seq, r.request_id, r.actor_sub, r.actor_role,
               r.actor_partner, r.actor_euo, r.method, r.path, r.service, r.route,
               r.data_sets::text[], r.fields_removed::text[], r.subject_euo,
               r.subject_users::text[], r.decision, r.reason, r.status, r.bytes, r.duration_ms,
               r.client_addr, r.client_request_id, r.requests, r.trace_id, r.policy_version,
               r.break_glass, r.withheld, r.phase, r.access, r.salt, r.prev_hash, r.row_hash
          from unnest(batch) as r, go
    )
    insert into audit_chain_heads as h (chain_id, last_seq, last_hash)
    select chain, audit_append.last_seq, audit_append.last_hash from go
    on conflict (chain_id) do update
        set last_seq = excluded.last_seq, last_hash = excluded.last_hash, updated_at = now()
    returning h.last_seq into head;
    return head;
end $$;
