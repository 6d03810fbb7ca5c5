-- The gateway can run as a role that owns nothing (deploy/README.md, Running with least
-- privilege): the schema's owner migrates and keeps partitions, the runtime role only reads
-- and writes rows (sql/runtime_grants.sql).
--
-- contract_history is written by a trigger on contracts. Run as the caller, it would need
-- INSERT and UPDATE on contract_history, and then the runtime role could rewrite when a
-- partner held an EUO (which decides what that partner may read of the audit log). Run as
-- the owner instead, with a fixed search_path so a caller cannot slip in its own tables.
do $$
begin
    execute format('alter function contracts_history() security definer set search_path = %I, pg_temp',
                   current_schema());
end $$;

-- Partitions are created and dropped by the owner only (`gateway migrate`, `gateway audit
-- maintain`), never on the request path.
revoke execute on function audit_ensure_partition(date) from public;
revoke execute on function audit_prune(timestamptz, boolean) from public;
