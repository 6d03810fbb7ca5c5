-- The redaction receipt of each request: how many elements were withheld and why, as
-- canonical JSON text {"retention": {"call_history": 3}, "scope": {"user_mobile": 1}, ...}
-- (reasons: scope, retention, restriction, masking; `*` where no data set is known), null
-- when nothing was. Text, not jsonb, so the bytes hashed into the chain are the bytes read
-- back (jsonb would reorder keys); `gateway retention report` reads it with ::jsonb. Hashed
-- only when set (gateway/audit/chain.py), so rows written before stay verifiable.
alter table audit_log add column withheld text;
