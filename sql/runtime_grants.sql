-- What the runtime role (the one `gateway serve --no-migrate` connects as) may do, and
-- nothing more: read and write rows, never create, alter or drop anything. Not a
-- migration (no number): run it as the schema's owner after `gateway migrate`, naming
-- the role in the setting gateway.runtime_role:
--
--   gateway grant --role gateway_runtime
--   PGOPTIONS='-c gateway.runtime_role=gateway_runtime' psql "$OWNER_DSN" -f sql/runtime_grants.sql
--
-- Idempotent; run it again after a migration that adds a table. `gateway check` and `serve`,
-- run as this role, read the table grants below (gateway/check.py) and check each is held.
do $$
declare
    runtime text := nullif(current_setting('gateway.runtime_role', true), '');
begin
    if runtime is null then
        raise exception 'set gateway.runtime_role to the name of the runtime role';
    end if;
    execute format('grant usage on schema %I to %I', current_schema(), runtime);
    -- rows are inserted and read through the parent: its grants cover every partition
    execute format('grant select, insert on audit_log to %I', runtime);
    execute format('grant select, insert, update on audit_chain_heads to %I', runtime);
    -- where `gateway audit verify` last found each chain whole (036)
    execute format('grant select, insert, update on audit_verified to %I', runtime);
    -- provider staff change contracts through the admin API; contract_history is kept by
    -- a SECURITY DEFINER trigger (008_least_privilege.sql), so it is only read
    execute format('grant select, insert, update, delete on contracts to %I', runtime);
    execute format('grant select on contract_history to %I', runtime);
    execute format('grant select, insert, update on dsr_requests to %I', runtime);
    execute format('grant select on schema_migrations to %I', runtime);
    -- data-subject request states, erasure outcomes, webhooks (015, 016)
    execute format('grant select, insert on dsr_transitions to %I', runtime);
    execute format('grant usage on sequence dsr_transitions_id_seq to %I', runtime);
    -- … an erasure call's intent gets its outcome, once (031's trigger allows nothing else)
    execute format('grant select, insert, update on dsr_erasure_calls to %I', runtime);
    execute format('grant usage on sequence dsr_erasure_calls_id_seq to %I', runtime);
    execute format('grant select, insert, update on webhook_outbox to %I', runtime);
    execute format('grant usage on sequence webhook_outbox_id_seq to %I', runtime);
    execute format('grant select, insert on webhook_deliveries to %I', runtime);
    execute format('grant usage on sequence webhook_deliveries_id_seq to %I', runtime);
    -- finished events are deleted after GATEWAY_WEBHOOK_KEEP_DAYS by this owner's function
    -- only (022), never by a DELETE of the runtime role's own
    execute format('grant execute on function webhook_prune(interval) to %I', runtime);
    -- signed checkpoints (010): appended, never changed
    execute format('grant select, insert on audit_signing_keys to %I', runtime);
    execute format('grant select, insert on audit_checkpoints to %I', runtime);
    execute format('grant usage on sequence audit_checkpoints_id_seq to %I', runtime);
    -- break-glass grants (018): opened and ended through the API
    execute format('grant select, insert, update on break_glass to %I', runtime);
    -- the checkpoints' Merkle trees (017): appended, never changed
    execute format('grant select, insert on audit_merkle_nodes to %I', runtime);
    -- … stored a run of a level at a time since 024
    execute format('grant select, insert on audit_merkle_runs to %I', runtime);
    -- the audit writer's batch append (034)
    execute format('grant execute on function audit_append(audit_row_in[], uuid, bigint, bytea, double precision) to %I', runtime);
    -- idempotency keys of the gateway API's writes (027): recorded, answered, pruned
    execute format('grant select, insert, update, delete on idempotency_keys to %I', runtime);
    -- alerts (033): raised by the elected evaluator, acknowledged through the API
    execute format('grant select, insert, update on alerts to %I', runtime);
    execute format('grant select, insert, update on alert_watermark to %I', runtime);
    execute format('grant execute on function alert_rows(text, text, timestamptz, timestamptz) to %I', runtime);
    execute format('grant execute on function alert_counts(audit_log, text, time, time, integer[]) to %I', runtime);
    execute format('grant execute on function alert_counts_of(text, text, text, text, integer, timestamptz, text, time, time, integer[]) to %I', runtime);
end $$;
