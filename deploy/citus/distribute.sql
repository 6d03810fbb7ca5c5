-- Distribute the audit log by chain_id on a Citus cluster (docs/scale.md), after
-- `gateway migrate` has run against the coordinator. Run once, as the schema's owner:
--
--   psql "$COORDINATOR_DSN" -f deploy/citus/distribute.sql
--
-- A batch is one chain: one shard, one local commit. A chain's head, checkpoints and Merkle
-- runs are co-located with its rows; signing keys are a reference table (every node holds
-- them). The other tables (contracts, requests, webhooks, break-glass, idempotency keys)
-- stay on the coordinator: they are small and change rarely.
select create_reference_table('audit_signing_keys');
select create_distributed_table('audit_log', 'chain_id');
select create_distributed_table('audit_chain_heads', 'chain_id', colocate_with => 'audit_log');
select create_distributed_table('audit_checkpoints', 'chain_id', colocate_with => 'audit_log');
select create_distributed_table('audit_merkle_nodes', 'chain_id', colocate_with => 'audit_log');
select create_distributed_table('audit_merkle_runs', 'chain_id', colocate_with => 'audit_log');
-- the writer's batch runs on the shard of its chain (the function's second argument)
select create_distributed_function(
    'audit_append(audit_row_in[], uuid, bigint, bytea, double precision)',
    distribution_arg_name => 'chain', colocate_with => 'audit_log');
