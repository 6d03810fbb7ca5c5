-- Webhooks: an event is a row of webhook_outbox, inserted in the transaction of the state
-- change it reports (a request filed, resolved, a restriction lifted) or by the reminder scan
-- (due in 7 days, overdue). A background task in every gateway process claims due rows
-- (a lease: next_attempt_at moves ahead, so a process that dies mid-delivery only delays
-- it), posts them signed, and records every attempt in webhook_deliveries. Nothing is lost
-- across a restart: an undelivered row stays until delivered or out of attempts.
create table webhook_outbox (
    id              bigserial primary key,
    event           text not null,
    request_id      uuid,
    payload         jsonb not null,
    created_at      timestamptz not null default now(),
    next_attempt_at timestamptz not null default now(),
    attempts        integer not null default 0,
    delivered_at    timestamptz,
    given_up_at     timestamptz,
    last_error      text
);
create index webhook_outbox_pending on webhook_outbox (next_attempt_at)
    where delivered_at is null and given_up_at is null;

create table webhook_deliveries (
    id           bigserial primary key,
    outbox_id    bigint not null references webhook_outbox (id),
    at           timestamptz not null default now(),
    attempt      integer not null,
    url          text not null,
    status       integer,             -- the receiver's HTTP status; null: no answer
    error        text,                -- why it failed (null: delivered)
    duration_ms  double precision not null
);
create index webhook_deliveries_outbox on webhook_deliveries (outbox_id, id);

-- What a webhook says about a data-subject request: identifiers, type, state and dates,
-- never the free text (detail, resolution) a person typed.
create function dsr_event_payload(r dsr_requests) returns jsonb language sql stable as $$
    select jsonb_build_object('id', r.id, 'type', r.type, 'status', r.status,
                              'euo_id', r.euo_id, 'user_sub', r.user_sub,
                              'data_sets', to_jsonb(r.data_sets), 'created_at', r.created_at,
                              'due_at', r.due_at, 'updated_at', r.updated_at)
$$;
