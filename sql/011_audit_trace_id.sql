-- The W3C trace (traceparent's trace-id) each request belongs to, the caller's or one the
-- gateway started, so a row can be found from a backend's or a tracing system's records.
-- Hashed only when set (gateway/audit/chain.py), so rows written before stay verifiable.
alter table audit_log add column trace_id text;
