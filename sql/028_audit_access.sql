-- What an audit row means for the data sets it names (docs/audit.md): how they
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

-- (the writer's batch row type, audit_row_in, gains this column in 032)
