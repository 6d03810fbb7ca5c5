-- An erasure's backend DELETE is written ahead (docs/data-subject-rights.md): before it
-- is sent, its dsr_erasure_calls row is committed with outcome 'unknown' (in the same
-- transaction as its intent's audit row), and once the backend has answered the row gets
-- its outcome. A row still 'unknown' is a DELETE whose outcome nobody recorded (the gateway
-- stopped while it was under way): it stays so, and the next run of the erasure reports it.
-- An item whose delete route would remove more than the request names is not called at
-- all: its row says 'needs_wider'.
alter table dsr_erasure_calls drop constraint dsr_erasure_calls_outcome_check;
alter table dsr_erasure_calls add constraint dsr_erasure_calls_outcome_check
    check (outcome in ('erased', 'not_held', 'failed', 'unknown', 'needs_wider'));
alter table dsr_erasure_calls add column outcome_at timestamptz;   -- when the outcome was written

-- The runtime role now holds UPDATE on dsr_erasure_calls (runtime_grants.sql), for one
-- move only: an 'unknown' row gets its outcome, once; nothing else of a row ever changes.
create function dsr_erasure_calls_guard() returns trigger language plpgsql as $$
begin
    if old.outcome <> 'unknown' then
        raise exception 'dsr_erasure_calls: a call''s outcome, once written, never changes'
            using errcode = 'check_violation';
    end if;
    if new.outcome not in ('erased', 'not_held', 'failed') then
        raise exception 'dsr_erasure_calls: an intent becomes erased, not_held or failed'
            using errcode = 'check_violation';
    end if;
    if (new.id, new.request_id, new.at, new.data_sets, new.method, new.path)
       is distinct from (old.id, old.request_id, old.at, old.data_sets, old.method, old.path) then
        raise exception 'dsr_erasure_calls: a call''s request, time, data sets and path never change'
            using errcode = 'check_violation';
    end if;
    new.outcome_at := now();
    return new;
end $$;
create trigger dsr_erasure_calls_guard before update on dsr_erasure_calls
    for each row execute function dsr_erasure_calls_guard();
