-- The client's own X-Request-Id is kept beside the gateway's (which is always its own and
-- unique), and refusals of callers without a valid token are written as one row per
-- source address, minute and reason, with how many there were in `requests`.
alter table audit_log add column client_request_id text, add column requests integer;
