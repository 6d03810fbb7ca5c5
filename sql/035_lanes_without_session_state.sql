-- The audit lanes keep no session state (docs/operate.md, Connections): they set
-- `statement_timeout` for their whole session before, which a transaction-mode pooler
-- (PgBouncer) would leak to whichever client got that server connection next. The batch
-- append now bounds its own lock waits by the batch's deadline, for its transaction only
-- (a lock wait reads lock_timeout when it starts, so the setting made at the top of the
-- function holds for the insert below it); a statement that runs long otherwise is
-- cancelled by the writer's client-side deadline (asyncpg sends a cancel request).

create or replace function audit_append(batch audit_row_in[], chain uuid, last_seq bigint,
                                        last_hash bytea, left_s double precision)
returns bigint language plpgsql as $$
declare
    head bigint;
begin
    -- no lock waited for much past the deadline (a batch stuck behind `lock table
    -- audit_log` must not outlive the request that gave up on it): a quarter second past
    -- it, as the writer gives up first (at the deadline, and asks the server to cancel);
    -- set for this transaction only: the lane's connection keeps no session state, so a
    -- transaction pooler can carry it
    perform set_config('lock_timeout', greatest(1, ceil(left_s * 1000) + 250)::bigint || 'ms',
                       true);
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
