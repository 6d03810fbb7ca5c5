-- Named queries: `-- name: X` starts one; Python passes $n parameters only.

-- name: all_contracts
select euo_id, partner_id, contract_end from contracts;

-- name: one_contract
select euo_id, partner_id, contract_end from contracts where euo_id = $1;

-- name: put_contract
insert into contracts (euo_id, partner_id, contract_end) values ($1, $2, $3)
on conflict (euo_id) do update
    set partner_id = excluded.partner_id, contract_end = excluded.contract_end, updated_at = now()
returning euo_id, partner_id, contract_end, updated_at;

-- name: delete_contract
delete from contracts where euo_id = $1 returning euo_id;

-- name: ensure_audit_partition
select audit_ensure_partition($1::date);

-- name: audit_chains
select chain_id, count(*) as rows, min(seq) as first_seq, max(seq) as last_seq
  from audit_log group by chain_id order by chain_id;

-- name: audit_chain_rows
select * from audit_log where chain_id = $1 order by seq;

-- name: audit_chain_rows_from
-- A chain's rows after seq $2, in order (verify --incremental: after its watermark).
select * from audit_log where chain_id = $1 and seq > $2 order by seq;

-- name: audit_row_at
select * from audit_log where chain_id = $1 and seq = $2;

-- name: audit_verified
select chain_id, seq, row_hash from audit_verified;

-- name: audit_verified_set
-- verify found the chain whole up to this row (036).
insert into audit_verified (chain_id, seq, row_hash) values ($1, $2, $3)
on conflict (chain_id) do update
   set seq = excluded.seq, row_hash = excluded.row_hash, verified_at = now()
 where audit_verified.seq <= excluded.seq;

-- name: audit_query
-- Filters are optional ($n null: no filter). $11/$12 narrow to a caller's scope:
-- an EUO admin's EUO, or a partner's own actions and the EUOs it held while it held them.
-- $14: for callers other than the Provider's, the roles of their own kind of organisation
-- (roles.yaml, same tenant claim): the actor filter matches only actors of those roles in
-- their own organisation (the partner $12 or the EUO $11), so it cannot confirm who else
-- (provider staff above all) acted. `outcome` (outcome_of, below): of an intent row only.
select a.*, outcome_of(a) as outcome from audit_log a
 where ($1::text is null or (a.actor_sub = $1 and (
        $14::text[] is null
        or (a.actor_role = any($14::text[])
            and ($12::text is null or a.actor_partner = $12)
            and ($11::text is null or a.actor_euo = $11)))))
   and ($2::text is null or a.subject_users @> array[$2::text])
   and ($3::text is null or a.subject_euo = $3)
   and ($4::text is null or a.data_sets @> array[$4::text])
   and ($5::text is null or a.decision = $5)
   and ($15::text is null or a.access = $15)
   and ($6::timestamptz is null or a.at >= $6)
   and ($7::timestamptz is null or a.at < $7)
   and ($8::timestamptz is null or (a.at, a.chain_id, a.seq) < ($8, $9::uuid, $10::bigint))
   and ($11::text is null or a.subject_euo = $11)
   and ($12::text is null or a.actor_partner = $12 or exists (
        select 1 from contract_history h
         where h.partner_id = $12 and h.euo_id = a.subject_euo
           and a.at >= h.started_at
           and (h.ended_at is null or a.at < h.ended_at)
           and (h.contract_end is null or a.at < h.contract_end::timestamptz)))
 order by a.at desc, a.chain_id desc, a.seq desc
 limit $13;

-- name: access_log
-- What others did with one user's data (served, acted upon, named, explained): never the
-- user's own requests (a user is
-- (EUO, sub) under a data-subject role $9: someone of another organisation with the same
-- sub is someone else). Every column of the row: /v1/audit/slice proves these rows, the
-- access log shows a few (and the break-glass grant's purpose and ticket).
select a.*, outcome_of(a) as outcome, g.purpose, g.ticket
  from audit_log a
  left join break_glass g on g.id = a.break_glass
 where a.subject_users @> array[$1::text]
   and a.subject_euo = $2
   and not (a.actor_role = any($9::text[]) and a.actor_euo = $2 and a.actor_sub = $1)
   and ($3::timestamptz is null or a.at >= $3)
   and ($4::timestamptz is null or a.at < $4)
   and ($5::timestamptz is null or (a.at, a.chain_id, a.seq) < ($5, $6::uuid, $7::bigint))
 order by a.at desc, a.chain_id desc, a.seq desc
 limit $8;

-- name: audit_prune
-- $1: days to keep, counted back from the database's time (never the host's), $2: dry run.
select partition, ends from audit_prune(now() - make_interval(days => $1), $2);

-- name: audit_prune_cutoff
-- What `audit_prune` would count $1 days back from (to say so when nothing is dropped).
select now() - make_interval(days => $1);

-- name: restricted_users
-- Each restricted user with the data sets restricted (restrictions and objections, open or
-- accepted, restrict only what they name).
select r.euo_id, r.user_sub, array_agg(distinct ds order by ds) as data_sets
  from dsr_requests r, unnest(r.data_sets) ds
 where r.type in ('restriction', 'objection') and r.status in ('open', 'accepted')
 group by r.euo_id, r.user_sub;

-- name: restricted_data_sets
-- $1: EUO, $2: user. The data sets restricted for this user (empty: none).
select coalesce(array_agg(distinct ds order by ds), '{}'::text[])
  from dsr_requests r, unnest(r.data_sets) ds
 where r.euo_id = $1 and r.user_sub = $2 and r.type in ('restriction', 'objection')
   and r.status in ('open', 'accepted');

-- name: create_request
insert into dsr_requests (user_sub, euo_id, type, data_sets, detail)
values ($1, $2, $3, $4, $5)
returning *;

-- name: my_requests
-- $1: EUO, $2: user
select * from dsr_requests where euo_id = $1 and user_sub = $2 order by created_at desc limit 500;

-- name: requests_in_scope
-- $1: an EUO admin's EUO, $2: a partner (its EUOs under an active contract); both null:
-- provider staff. Overdue unresolved requests first, then by due date.
select * from dsr_requests r
 where ($1::text is null or r.euo_id = $1)
   and ($2::text is null or r.euo_id in (
        select c.euo_id from contracts c
         where c.partner_id = $2 and (c.contract_end is null or c.contract_end > current_date)))
   and ($3::text is null or r.status = $3)
 order by (r.status in ('open', 'accepted') and r.due_at < now()) desc, r.due_at, r.id
 limit 1000;

-- name: get_request
select * from dsr_requests where id = $1;

-- name: update_request
-- A transition: only from the state the caller saw ($5), so two admins cannot both move it.
update dsr_requests
   set status = $2, resolution = coalesce($3, resolution), resolved_by = $4, updated_at = now()
 where id = $1 and status = $5
returning *;

-- name: add_transition
insert into dsr_transitions (request_id, from_status, to_status, actor, note)
values ($1, $2, $3, $4, $5);

-- name: request_transitions
select from_status, to_status, at, actor from dsr_transitions where request_id = $1 order by id;

-- name: add_erasure_call
-- outcome 'unknown': a DELETE's intent, committed with its audit row before it is sent (031)
insert into dsr_erasure_calls (request_id, data_sets, method, path, status, outcome, reason)
values ($1, $2, $3, $4, $5, $6, $7)
returning id;

-- name: finish_erasure_call
-- a DELETE's outcome, written into its intent's row (the table's trigger allows only this)
update dsr_erasure_calls set status = $2, outcome = $3, reason = $4
 where id = $1 and outcome = 'unknown';

-- name: unknown_erasure_calls
-- the DELETEs of request $1 whose outcome was never written (the gateway stopped meanwhile)
select path from dsr_erasure_calls where request_id = $1 and outcome = 'unknown' order by id;

-- name: request_erasure_calls
select at, data_sets, method, path, status, outcome, reason
  from dsr_erasure_calls where request_id = $1 order by id;

-- name: outbox_add_request_event
-- $1: event, $2: request id. In the transaction of the change it reports.
insert into webhook_outbox (event, request_id, payload)
select $1, r.id, dsr_event_payload(r) from dsr_requests r where r.id = $2;

-- name: outbox_add_event
-- $1: event, $2: its payload (JSON text). In the transaction of the change it reports.
insert into webhook_outbox (event, payload) values ($1, $2::jsonb);

-- name: outbox_reminders
-- Queue "due in 7 days" and "overdue" once per unresolved request (run by processes with
-- webhooks configured). Returns how many were queued.
with due_soon as (
    update dsr_requests set due_soon_notified_at = now()
     where status in ('open', 'accepted', 'failed') and due_soon_notified_at is null
       and due_at > now() and due_at <= now() + interval '7 days'
    returning *
), overdue as (
    update dsr_requests set overdue_notified_at = now()
     where status in ('open', 'accepted', 'failed') and overdue_notified_at is null
       and due_at <= now()
    returning *
), queued as (
    insert into webhook_outbox (event, request_id, payload)
    select 'request.due_soon', r.id, dsr_event_payload(r::dsr_requests) from due_soon r
    union all
    select 'request.overdue', r.id, dsr_event_payload(r::dsr_requests) from overdue r
    returning 1
)
select (select count(*) from due_soon) + (select count(*) from overdue);

-- name: dsr_due_counts
select count(*) filter (where due_at > now() and due_at <= now() + interval '7 days') as due_soon,
       count(*) filter (where due_at <= now()) as overdue
  from dsr_requests where status in ('open', 'accepted', 'failed');

-- name: outbox_claim
-- $1: how many, $2: the lease in seconds. Claimed rows move ahead by the lease, so another
-- process takes them only if this one dies before recording the outcome. An event is
-- claimed only when no earlier event about the same request or grant (the payload's id)
-- is still to be delivered (030): a subject's events reach the receiver in order.
update webhook_outbox o
   set next_attempt_at = now() + make_interval(secs => $2), attempts = o.attempts + 1
 where o.id in (select w.id from webhook_outbox w
                 where w.delivered_at is null and w.given_up_at is null
                   and w.next_attempt_at <= now()
                   and not exists (
                       select 1 from webhook_outbox e
                        where coalesce(e.request_id::text, e.payload ->> 'id')
                              = coalesce(w.request_id::text, w.payload ->> 'id')
                          and e.id < w.id
                          and e.delivered_at is null and e.given_up_at is null)
                 order by w.next_attempt_at, w.id
                 limit $1
                   for update skip locked)
returning o.id, o.event, o.payload, o.created_at, o.attempts;

-- name: outbox_delivered
update webhook_outbox set delivered_at = now(), last_error = null where id = $1;

-- name: outbox_failed
-- $2: seconds until the next attempt, $3: the error, $4: give up now
update webhook_outbox
   set next_attempt_at = now() + make_interval(secs => $2), last_error = $3,
       given_up_at = case when $4 then now() end
 where id = $1;

-- name: delivery_log
insert into webhook_deliveries (outbox_id, attempt, url, status, error, duration_ms)
values ($1, $2, $3, $4, $5, $6);

-- name: audit_write_probe
-- Whether a COPY into audit_log could start now (run inside a transaction, then rolled back).
lock table only audit_log in row exclusive mode;

-- name: audit_write_batch
-- A batch in one statement (one round trip, its own transaction unless one is open): its
-- rows and its chain's new head together, nothing past its deadline (sql/034,
-- audit_append). The head's seq, or null when nothing was written.
select audit_append($1::audit_row_in[], $2, $3, $4, $5);

-- name: audit_row_in_fields
-- The fields of audit_row_in (the writer's batch row type), in order.
select a.attname from pg_type t join pg_attribute a on a.attrelid = t.typrelid
 where t.typname = 'audit_row_in' and t.typnamespace = current_schema()::regnamespace
   and a.attnum > 0 and not a.attisdropped
 order by a.attnum;

-- name: audit_chain_close
update audit_chain_heads set closed = true, closed_at = now() where chain_id = $1 and not closed;

-- name: audit_outcome_unknown
-- Intent rows with no outcome row (027), oldest first, at most $1 (verify lists them).
select at, chain_id, seq, request_id, method, path from audit_log a
 where phase = 'intent' and outcome_of(a) = 'unknown'
 order by at, chain_id, seq limit $1;

-- name: audit_abandoned_heads
-- Chains whose writer is gone: not closed, rows past their last checkpoint, no write for
-- $1 seconds (gateway audit maintain seals them).
select h.chain_id, h.last_seq, h.last_hash from audit_chain_heads h
 where not h.closed and h.last_seq > 0 and h.updated_at < now() - make_interval(secs => $1)
   and h.last_seq > coalesce((select max(c.seq) from audit_checkpoints c
                               where c.chain_id = h.chain_id), 0)
 order by h.chain_id;

-- name: audit_chains_close
update audit_chain_heads set closed = true, closed_at = now()
 where chain_id = any($1::uuid[]) and not closed;

-- name: audit_chain_heads
select chain_id, last_seq, last_hash, updated_at, closed from audit_chain_heads order by chain_id;

-- name: audit_oldest_month
-- Where the oldest month partition starts: rows before it went with pruned partitions.
select min(to_date(substr(c.relname, 12, 4) || substr(c.relname, 17, 2), 'YYYYMM'))::timestamptz
  from pg_inherits i join pg_class c on c.oid = i.inhrelid
 where i.inhparent = 'audit_log'::regclass and c.relname ~ '^audit_log_y[0-9]{4}m[0-9]{2}$';

-- name: deployment_heartbeat
-- The deployment's heartbeat (gateway/listener.py): "<seq> <sender> <the database's time>".
select pg_notify($1, $2 || ' ' || extract(epoch from clock_timestamp())::text);

-- name: connection_limits
-- What `gateway check` sizes the deployment's connections against: max_connections, less
-- the slots kept for superusers (and, from PostgreSQL 16, for pg_use_reserved_connections).
select current_setting('max_connections')::int as max_connections,
       (select coalesce(sum(setting::int), 0) from pg_settings
         where name in ('superuser_reserved_connections', 'reserved_connections'))::int
           as reserved;

-- name: heartbeat_lock
-- Whether this session is (now) the deployment's heartbeat sender.
select pg_try_advisory_lock($1);

-- name: recorded_migrations
select version from schema_migrations;

-- name: audit_partition_months
-- The month partitions that rows of this month and the $1 months after it go to, and
-- whether each exists (rows of a month without one land in audit_log_default).
select to_char(m, '"audit_log_y"YYYY"m"MM') as partition, m::date as month,
       exists (select 1 from pg_inherits i join pg_class c on c.oid = i.inhrelid
                where i.inhparent = 'audit_log'::regclass
                  and c.relname = to_char(m, '"audit_log_y"YYYY"m"MM')) as present
  from generate_series(date_trunc('month', now()),
                       date_trunc('month', now()) + make_interval(months => $1),
                       interval '1 month') as m
 order by m;

-- name: partition_lock_timeout
-- Creating or dropping a partition locks audit_log; waiting long behind a reader would
-- hold every audit write up behind it, so give up quickly and try again.
select set_config('lock_timeout', '500ms', true);

-- name: set_runtime_role
-- The role sql/runtime_grants.sql grants to, for this transaction.
select set_config('gateway.runtime_role', $1, true);

-- name: whoami
-- The connected role, and whether it owns (or is a member of the owner of) audit_log.
select current_user as role,
       (select pg_has_role(current_user, c.relowner, 'USAGE') from pg_class c
         where c.oid = to_regclass('audit_log')) as owner,
       has_schema_privilege(current_schema(), 'CREATE') as may_create,
       current_schema() as schema;

-- name: missing_privileges
-- Of the (table, privilege) pairs $1[i], $2[i], those the connected role lacks.
select t.tbl, t.priv from unnest($1::text[], $2::text[]) as t(tbl, priv)
 where case when to_regclass(t.tbl) is null then true
            else not has_table_privilege(t.tbl, t.priv) end;

-- name: audit_key_add
insert into audit_signing_keys (key_id, public_key) values ($1, $2) on conflict (key_id) do nothing;

-- name: audit_keys
select key_id, public_key, first_used from audit_signing_keys order by first_used, key_id;

-- name: audit_checkpoint_add
insert into audit_checkpoints (chain_id, seq, row_hash, at, closed, key_id, signature,
                               version, tree_size, root)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: audit_checkpoints
-- $1: only checkpoints after this id (paging); $2: at most this many
select * from audit_checkpoints where ($1::bigint is null or id > $1) order by id limit $2;

-- name: audit_all_checkpoints
select * from audit_checkpoints order by chain_id, seq;

-- name: audit_checkpoint
select * from audit_checkpoints where id = $1;

-- name: audit_tree_size
-- The size of a chain's tree as its last format 2 checkpoint signed it.
select max(tree_size) from audit_checkpoints where chain_id = $1 and version = 2;

-- name: audit_latest_trees
-- Each chain's last format 2 checkpoint (the root a slice's rows are proved against).
select distinct on (chain_id) * from audit_checkpoints
 where chain_id = any($1::uuid[]) and version = 2
 order by chain_id, tree_size desc, id desc;

-- name: audit_merkle_nodes
-- Stored perfect nodes ($2[i], $3[i]) = (level, idx) of a chain's tree: from the run that
-- holds it (024), else from the one-node-a-row table of before (017). One primary-key
-- look-up each (offset 0 keeps the planner from turning these into joins that read the
-- chain's whole tree).
select w.level, w.idx, coalesce(
       (select nullif(substring(r.hashes from (w.idx - r.first_idx)::int * 32 + 1 for 32), '')
          from audit_merkle_runs r
         where r.chain_id = $1 and r.level = w.level and r.first_idx <= w.idx
         order by r.first_idx desc limit 1 offset 0),
       (select n.hash from audit_merkle_nodes n
         where n.chain_id = $1 and n.level = w.level and n.idx = w.idx offset 0)) as hash
  from unnest($2::smallint[], $3::bigint[]) as w(level, idx);

-- name: audit_merkle_runs_add
-- A checkpoint's new perfect nodes, one run of consecutive nodes of a level per row.
insert into audit_merkle_runs (chain_id, level, first_idx, hashes)
select $1, r.level, r.first_idx, r.hashes
  from unnest($2::smallint[], $3::bigint[], $4::bytea[]) as r(level, first_idx, hashes);

-- name: audit_chain_rows_after
-- A chain's rows $2 < seq <= $3, in order (what a checkpoint adds to the chain's tree).
select * from audit_log where chain_id = $1 and seq > $2 and seq <= $3 order by seq;

-- name: audit_row_hash_at
select row_hash from audit_log where chain_id = $1 and seq = $2;

-- name: break_glass_in_force
select * from break_glass where ended_at is null and ends_at > now();

-- name: break_glass_get
select * from break_glass where id = $1;

-- name: break_glass_open
insert into break_glass (id, actor_role, actor_sub, actor_partner, euo_id, user_sub, purpose,
                         ticket, ends_at)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
returning *;

-- name: break_glass_end
-- Ends a grant still in force; null when it had already ended.
update break_glass set ended_at = now(), ended_by = $2
 where id = $1 and ended_at is null and ends_at > now()
returning *;

-- name: break_glass_list
-- $1: an EUO admin's EUO (or an EUO asked for), $2: a partner: its own grants and those in
-- force over an EUO at some time while it held it (its audit scope, contract_history); both
-- null: every grant. Newest first.
select * from break_glass g
 where ($1::text is null or g.euo_id = $1)
   and ($2::text is null or g.actor_partner = $2 or exists (
        select 1 from contract_history h
         where h.partner_id = $2 and h.euo_id = g.euo_id
           and h.started_at < coalesce(g.ended_at, g.ends_at)
           and g.created_at < coalesce(least(h.ended_at, h.contract_end::timestamptz),
                                       'infinity')))
 order by g.created_at desc, g.id
 limit 1000;

-- name: retention_report
-- What backends served past retention (or un-anonymised past the anonymisation age), from
-- the receipts of the audit rows in [$1, $2): per backend service, route and data set, how
-- many elements were withheld, in how many requests, about how many EUOs, first and last seen.
select a.service, a.route, r.key as reason, d.key as data_set,
       sum(d.value::bigint)::bigint as elements, count(*) as requests,
       count(distinct a.subject_euo) as euos,
       (array_agg(distinct a.subject_euo))[1:20] as some_euos,
       min(a.at) as first_seen, max(a.at) as last_seen
  from audit_log a
 cross join lateral jsonb_each(a.withheld::jsonb) r
 cross join lateral jsonb_each_text(r.value) d
 where a.withheld is not null and a.at >= $1 and a.at < $2
   and r.key = any($3::text[])
 group by a.service, a.route, r.key, d.key
 order by max(a.at) desc, a.service, a.route, d.key;

-- name: webhook_prune
select webhook_prune(make_interval(days => $1));

-- name: interrupted_erasures
-- $1: seconds. Erasures accepted longer ago than that and still `accepted`: the gateway that
-- ran their backend calls stopped midway (an erasure runs in the request that accepted it).
select * from dsr_requests
 where type = 'erasure' and status = 'accepted' and updated_at < now() - make_interval(secs => $1)
 order by updated_at
 limit 100;

-- name: idempotency_key_get
-- A caller's key as recorded by the change it carried (027); older than a day: forgotten.
select request_id, fingerprint, status, body from idempotency_keys
 where actor = $1 and key = $2 and created_at > now() - interval '24 hours';

-- name: idempotency_key_add
-- In the change's transaction: the key and the status it is answered with. A day-old use
-- of the key is forgotten and replaced; a live one (another request under way with it,
-- even in the same batch) leaves this one out: no row returned.
insert into idempotency_keys (actor, key, fingerprint, request_id, status)
values ($1, $2, $3, $4, $5)
on conflict (actor, key) do update
   set fingerprint = excluded.fingerprint, request_id = excluded.request_id,
       status = excluded.status, body = null, created_at = now()
 where idempotency_keys.created_at <= now() - interval '24 hours'
returning 1;

-- name: idempotency_key_answer
update idempotency_keys set body = $3 where actor = $1 and key = $2;

-- name: idempotency_keys_forget
-- gateway audit maintain: keys past their day (idempotency_key_get no longer reads them),
-- with the answers they kept; how many.
with gone as (delete from idempotency_keys where created_at <= now() - interval '24 hours'
              returning 1)
select count(*) from gone;

-- name: database_durability
-- What decides whether a commit survives a crash (gateway check, the audit writer).
select current_setting('fsync') as fsync, current_setting('full_page_writes') as full_page_writes,
       current_setting('synchronous_commit') as synchronous_commit;

-- name: database_clock
-- The database's time now (unix seconds): the one clock the gateway decides with
-- (gateway/clock.py), and what `gateway audit maintain` compares the host's clock with.
select extract(epoch from clock_timestamp())::float8;

-- name: alert_watermark_init
-- A new evaluator starts from now less the settling lag: no alert about the past
insert into alert_watermark (at, chain_id, seq)
values (now() - make_interval(secs => $1), '00000000-0000-0000-0000-000000000000', -1)
on conflict (id) do nothing;

-- name: alert_watermark
-- Where the evaluators are, who made the last pass ($1 takeover seconds: whether it is
-- recent enough that another process leaves the next pass to it)
select at, chain_id, seq, evaluator,
       moved_at > now() - make_interval(secs => $1) as recent
  from alert_watermark for update;

-- name: alert_watermark_move
-- A pass made by $4, the watermark at its last row read (unchanged when none was new)
update alert_watermark set at = $1, chain_id = $2, seq = $3, evaluator = $4,
                           moved_at = now();

-- name: alert_watermark_skip
-- A pass made by $2 with no rule in force: the watermark moves past every settled row
-- without reading them
update alert_watermark
   set at = greatest(at, now() - make_interval(secs => $1)),
       chain_id = case when at < now() - make_interval(secs => $1)
                       then 'ffffffff-ffff-ffff-ffff-ffffffffffff' else chain_id end,
       seq = case when at < now() - make_interval(secs => $1)
                  then 9223372036854775807 else seq end,
       evaluator = $2, moved_at = now();

-- name: alert_measure
-- One rule's value for one key over ($3, $4]: $1 per, $2 key, $5 measure, $6 data set
-- (null: any), $7 roles (null: any), $8/$9/$10 working hours (off_hours); with the EUOs
-- whose data the counted rows served or acted upon (a refusal touched none) and the last
-- counted row's actor.
with counted as (
    select a.* from alert_rows($1, $2, $3, $4) a
     where ($6::text is null or $6::text = any(a.data_sets))
       and ($7::text[] is null or a.actor_role = any($7::text[]))
       and alert_counts(a, $5, $8, $9, $10)
), last as (
    select actor_sub, actor_role, actor_partner, actor_euo from counted
     order by at desc, chain_id desc, seq desc limit 1
)
select case when $5 = 'distinct_subjects'
            then (select count(distinct u) from counted, unnest(counted.subject_users) u)
            else (select count(*) from counted) end as observed,
       (select coalesce(array_agg(distinct subject_euo), '{}') from counted
         where subject_euo is not null and decision = 'allow') as subject_euos,
       last.actor_sub, last.actor_role, last.actor_partner, last.actor_euo
  from (select 1) one left join last on true;

-- name: alert_baseline
-- The median of a measure among an actor's role peers ($1 role, $2 the actor left out),
-- per peer and window-long bucket ($7 seconds) in [$3, $4), over the buckets in which the
-- peer was counted at all; $5 measure, $6 data set, $8/$9/$10 working hours. Null: no peer.
with counted as (
    select a.* from audit_log a
     where a.at >= $3 and a.at < $4 and a.actor_role = $1 and a.actor_sub <> $2
       and a.phase is distinct from 'outcome'
       and ($6::text is null or $6::text = any(a.data_sets))
       and alert_counts(a, $5, $8, $9, $10)
), per_bucket as (
    select c.actor_sub, floor(extract(epoch from c.at) / $7::double precision) as bucket,
           count(distinct u) as subjects, count(distinct (c.chain_id, c.seq)) as calls
      from counted c left join lateral unnest(c.subject_users) u on true
     group by 1, 2
)
select percentile_cont(0.5) within group (
           order by case when $5 = 'distinct_subjects' then subjects else calls end)
  from per_bucket;

-- name: alert_recent
-- The end of the latest window this rule alerted about this key for, when it overlaps
-- ($3, ...]; else null
select max(observed_to) from alerts where rule = $1 and key = $2 and observed_to > $3;

-- name: alert_raise
insert into alerts (rule, per, key, window_start, observed_from, observed_to, observed,
                    limit_value, baseline, factor, actor_sub, actor_role, actor_partner,
                    actor_euo, subject_euos, audit_query, policy_version)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
on conflict (rule, key, window_start) do nothing
returning *;

-- name: alert_list
-- The alerts in a caller's scope, newest first: $1 an EUO admin's EUO (alerts about its
-- people or its data), $2 a partner (about its people, or its customers' data while it
-- held them); $3 acknowledged or not (null: both), $4 rule (null: any), $5 limit, $6 one
-- alert's id (null: any). With the
-- EUOs named that are in the caller's scope (never another partner's customers).
select al.*, array(
           select e from unnest(al.subject_euos) e
            where ($1::text is null or e = $1)
              and ($2::text is null or exists (
                   select 1 from contract_history h
                    where h.partner_id = $2 and h.euo_id = e
                      and al.observed_to >= h.started_at
                      and (h.ended_at is null or al.observed_from < h.ended_at)))
       ) as euos_in_scope
  from alerts al
 where ($1::text is null or al.actor_euo = $1 or $1 = any(al.subject_euos))
   and ($2::text is null or al.actor_partner = $2 or exists (
        select 1 from contract_history h
         where h.partner_id = $2 and h.euo_id = any(al.subject_euos)
           and al.observed_to >= h.started_at
           and (h.ended_at is null or al.observed_from < h.ended_at)))
   and ($3::boolean is null or (al.acked_at is not null) = $3)
   and ($4::text is null or al.rule = $4)
   and ($6::uuid is null or al.id = $6)
 order by al.raised_at desc, al.id desc
 limit $5;

-- name: alert_ack
-- Acknowledged once: a second acknowledgement changes nothing (null)
update alerts set acked_at = now(), acked_by = $2, ack_note = $3
 where id = $1 and acked_at is null
returning *;

-- name: primary_wal_position
-- Where the primary's WAL is flushed to: every commit it acknowledged lies at or before it
-- (gateway/reads.py waits for a standby to replay past it before reading there).
select pg_current_wal_flush_lsn()::text;

-- name: standby_replayed
-- Whether this standby has replayed the primary's WAL up to $1; null when this server is
-- not in recovery (a primary: not a standby to read from).
select case when pg_is_in_recovery() then pg_last_wal_replay_lsn() >= $1::text::pg_lsn end;

-- name: report_accesses
-- The monthly report (gateway/audit/report.py, GET /v1/reports/monthly): $1..$2 the month
-- [start, end), $3 an EUO (null: any), $4 a partner (null: any): rows about the EUO, or
-- about the partner's customers while it held them (as audit_query narrows a partner).
-- Allowed calls by the caller's role and the data sets they touched (an outcome row
-- repeats its intent: counted once).
select a.actor_role as role, ds as item, count(*) as count
  from audit_log a cross join unnest(a.data_sets) ds
 where a.at >= $1 and a.at < $2 and a.decision = 'allow' and a.phase is distinct from 'outcome'
   and ($3::text is null or a.subject_euo = $3)
   and ($4::text is null or exists (
        select 1 from contract_history h
         where h.partner_id = $4 and h.euo_id = a.subject_euo and a.at >= h.started_at
           and (h.ended_at is null or a.at < h.ended_at)))
 group by 1, 2 order by 1, 2;

-- name: report_refusals
select a.actor_role as role, a.reason as item, count(*) as count
  from audit_log a
 where a.at >= $1 and a.at < $2 and a.decision = 'deny'
   and ($3::text is null or a.subject_euo = $3)
   and ($4::text is null or exists (
        select 1 from contract_history h
         where h.partner_id = $4 and h.euo_id = a.subject_euo and a.at >= h.started_at
           and (h.ended_at is null or a.at < h.ended_at)))
 group by 1, 2 order by 1, 2;

-- name: report_break_glass
select g.created_at, g.actor_role, g.euo_id, g.user_sub, g.purpose, g.ticket, g.ends_at,
       g.ended_at
  from break_glass g
 where g.created_at >= $1 and g.created_at < $2
   and ($3::text is null or g.euo_id = $3)
   and ($4::text is null or exists (
        select 1 from contract_history h
         where h.partner_id = $4 and h.euo_id = g.euo_id and g.created_at >= h.started_at
           and (h.ended_at is null or g.created_at < h.ended_at)))
 order by g.created_at;

-- name: report_requests
-- Whether each met its 30-day deadline: resolved (completed, rejected, withdrawn) by its due
-- date; still open past it: no; still open before it: null (not yet known).
select r.id, r.euo_id, r.user_sub, r.type, r.status, r.created_at, r.due_at,
       case when r.status in ('completed', 'rejected', 'withdrawn') then r.updated_at <= r.due_at
            when now() > r.due_at then false end as met_deadline
  from dsr_requests r
 where r.created_at >= $1 and r.created_at < $2
   and ($3::text is null or r.euo_id = $3)
   and ($4::text is null or exists (
        select 1 from contract_history h
         where h.partner_id = $4 and h.euo_id = r.euo_id and r.created_at >= h.started_at
           and (h.ended_at is null or r.created_at < h.ended_at)))
 order by r.created_at;

-- name: report_alerts
select al.raised_at, al.rule, al.observed, al.limit_value, al.acked_at, al.acked_by, al.ack_note
  from alerts al
 where al.raised_at >= $1 and al.raised_at < $2
   and ($3::text is null or $3 = any(al.subject_euos) or al.actor_euo = $3)
   and ($4::text is null or al.actor_partner = $4 or exists (
        select 1 from contract_history h
         where h.partner_id = $4 and h.euo_id = any(al.subject_euos)
           and al.observed_to >= h.started_at
           and (h.ended_at is null or al.observed_from < h.ended_at)))
 order by al.raised_at;

-- name: report_partner_held
-- Whether partner $1 held EUO $2 at some time in [$3, $4).
select exists (select 1 from contract_history h
                where h.partner_id = $1 and h.euo_id = $2 and h.started_at < $4
                  and (h.ended_at is null or h.ended_at > $3));
