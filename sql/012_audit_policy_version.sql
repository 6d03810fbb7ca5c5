-- The policy that decided each request: a hash of the policy files in force (the version
-- /v1/catalog names and `gateway reload` logs), so an auditor can tell which rules applied.
alter table audit_log add column policy_version text;
