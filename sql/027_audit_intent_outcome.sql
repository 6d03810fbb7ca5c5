-- Write-ahead audit (docs/audit.md, Guarantees an auditor can quote). A call that can change
-- data — a proxied write — commits an *intent* row (phase 'intent': who, what, which
-- subject, the request id) before a single byte goes to the backend, and an *outcome* row
-- (phase 'outcome': the status and what was applied) after, with the same request id. A
-- streamed file is committed as its intent before the first byte and closed by an
-- outcome row with the bytes actually delivered (reason `cut` when cut). A call of one
-- row only has phase null, as every row written before this migration does. An intent
-- with no outcome row is "outcome unknown" (the gateway died, or the outcome could not be
-- written): /v1/audit, the access log and `gateway audit verify` say so.
--
-- Hashed only when set (gateway/audit/chain.py): rows written before stay verifiable.
alter table audit_log add column phase text
    check (phase is null or phase in ('intent', 'outcome'));

-- intents and their outcomes found by request id; only rows of two-row calls are indexed,
-- so a read (one row) pays nothing for it
create index audit_log_phased on audit_log (request_id, phase) where phase is not null;

-- Of an intent row: 'recorded' once its outcome row exists (same request id, method and
-- path: an export's or erasure's backend calls share their request's id), else 'unknown';
-- null for any other row.
create function outcome_of(r audit_log) returns text language sql stable as $$
    select case when r.phase = 'intent' then
        case when exists (select 1 from audit_log o
                           where o.request_id = r.request_id and o.phase = 'outcome'
                             and o.method = r.method and o.path = r.path)
             then 'recorded' else 'unknown' end
    end
$$;

-- (the writer's batch row type, audit_row_in, gains this column in 032)

-- Idempotency keys of the gateway API's writes: a key is recorded in the same transaction
-- as the change it carried, so a client whose answer was lost (503 outcome_unknown) can
-- send the request again with the same key and learn what happened: the first answer
-- replayed, never a second change. Keyed per caller (actor): one caller's key never
-- tells another anything.
create table idempotency_keys (
    actor        text not null,
    key          text not null,
    fingerprint  bytea not null,          -- sha256 of method, path and body
    request_id   text not null,
    created_at   timestamptz not null default now(),
    status       integer,                 -- the answer, once sent (null: committed, answer lost)
    body         bytea,
    primary key (actor, key)
);
create index idempotency_keys_created on idempotency_keys (created_at);
