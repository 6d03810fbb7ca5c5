-- Data-subject requests move through explicit states, each transition kept in
-- dsr_transitions (with its audit row, in the same transaction):
--
--   open -> accepted | rejected | withdrawn
--   accepted -> completed | rejected | withdrawn | failed (erasure: a backend call failed)
--   failed -> accepted (the erasure is tried again) | rejected | withdrawn
--
-- completed, rejected and withdrawn are final. An accepted erasure runs the backend delete
-- calls the route table declares for its data sets; each call's outcome is a row of
-- dsr_erasure_calls. Restrictions and objections (open or accepted) restrict only the data
-- sets they name; every process hears of a change of either by NOTIFY.
alter table dsr_requests drop constraint if exists dsr_requests_status_check;
alter table dsr_requests add constraint dsr_requests_status_check
    check (status in ('open', 'accepted', 'rejected', 'completed', 'withdrawn', 'failed'));
-- when the due-in-7-days and overdue notifications were queued (each at most once)
alter table dsr_requests add column due_soon_notified_at timestamptz;
alter table dsr_requests add column overdue_notified_at timestamptz;
create index dsr_requests_unresolved on dsr_requests (due_at)
    where status in ('open', 'accepted', 'failed');

create table dsr_transitions (
    id          bigserial primary key,
    request_id  uuid not null references dsr_requests (id),
    at          timestamptz not null default now(),
    from_status text,                 -- null: filed
    to_status   text not null,
    actor       text not null,        -- role:organisation (never a person's sub but the user's own)
    note        text
);
create index dsr_transitions_request on dsr_transitions (request_id, id);

create table dsr_erasure_calls (
    id          bigserial primary key,
    request_id  uuid not null references dsr_requests (id),
    at          timestamptz not null default now(),
    data_sets   text[] not null,
    method      text not null,
    path        text not null,       -- the gateway path called (/service/...)
    status      integer,             -- the backend's (or the gateway's refusal) status
    outcome     text not null check (outcome in ('erased', 'not_held', 'failed')),
    reason      text                 -- the reason id when it failed
);
create index dsr_erasure_calls_request on dsr_erasure_calls (request_id, id);

create or replace function dsr_requests_notify() returns trigger language plpgsql as $$
begin
    if coalesce(new.type, old.type) in ('restriction', 'objection') then
        perform pg_notify('gateway_restrictions',
                          json_build_array(coalesce(new.euo_id, old.euo_id),
                                           coalesce(new.user_sub, old.user_sub))::text);
    end if;
    return null;
end $$;
