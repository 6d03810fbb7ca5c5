-- The database keeps data-subject requests to their state table (015), whoever updates
-- them: the runtime role holds UPDATE on dsr_requests (to move a request and note what was
-- notified), and with it alone could otherwise reopen a completed erasure, turn a
-- rejection into an acceptance, or change whose request it is, what it asks and when it
-- is due. Now an update may only
--   * move the status along the state table (open -> accepted | rejected | withdrawn;
--     accepted -> completed | rejected | withdrawn | failed; failed -> accepted | rejected
--     | withdrawn; completed, rejected and withdrawn are final),
--   * set the resolution, who resolved it and when it was updated as it does so, and
--   * note, once each, when the due-soon and overdue notices were queued (never cleared);
-- a request's subject, type, data sets, detail and dates never change.
create function dsr_requests_guard() returns trigger language plpgsql as $$
begin
    if (new.id, new.user_sub, new.euo_id, new.type, new.data_sets, new.detail, new.created_at,
        new.due_at) is distinct from (old.id, old.user_sub, old.euo_id, old.type,
        old.data_sets, old.detail, old.created_at, old.due_at) then
        raise exception 'a data-subject request''s subject, type, data sets, detail and due date never change'
            using errcode = 'check_violation';
    end if;
    if new.status is distinct from old.status and (old.status, new.status) not in (
            ('open', 'accepted'), ('open', 'rejected'), ('open', 'withdrawn'),
            ('accepted', 'completed'), ('accepted', 'rejected'), ('accepted', 'withdrawn'),
            ('accepted', 'failed'),
            ('failed', 'accepted'), ('failed', 'rejected'), ('failed', 'withdrawn')) then
        raise exception 'a data-subject request cannot move from % to %', old.status, new.status
            using errcode = 'check_violation';
    end if;
    if new.status = old.status and old.status in ('completed', 'rejected', 'withdrawn')
            and (new.resolution, new.resolved_by) is distinct from (old.resolution, old.resolved_by) then
        raise exception 'a % request is final', old.status using errcode = 'check_violation';
    end if;
    if (old.due_soon_notified_at is not null
            and new.due_soon_notified_at is distinct from old.due_soon_notified_at)
        or (old.overdue_notified_at is not null
            and new.overdue_notified_at is distinct from old.overdue_notified_at) then
        raise exception 'a notice, once queued, stays noted' using errcode = 'check_violation';
    end if;
    return new;
end $$;
create trigger dsr_requests_guard before update on dsr_requests
    for each row execute function dsr_requests_guard();
