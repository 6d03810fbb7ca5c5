-- Data-subject requests (rectification, erasure, restriction, objection), answered within
-- 30 days. An open or accepted restriction stops provider staff and partners from
-- receiving the user's personal data; every gateway process mirrors the restricted users
-- and hears of changes by NOTIFY.
create table dsr_requests (
    id          uuid primary key default gen_random_uuid(),
    user_sub    text not null,
    euo_id      text not null,
    type        text not null check (type in ('rectification', 'erasure', 'restriction', 'objection')),
    data_sets   text[] not null,
    detail      text not null default '',
    status      text not null default 'open'
                check (status in ('open', 'accepted', 'rejected', 'completed')),
    created_at  timestamptz not null default now(),
    due_at      timestamptz not null default now() + interval '30 days',
    updated_at  timestamptz not null default now(),
    resolved_by text,
    resolution  text
);
create index dsr_requests_euo on dsr_requests (euo_id, due_at);
create index dsr_requests_user on dsr_requests (user_sub, created_at desc);

create function dsr_requests_notify() returns trigger language plpgsql as $$
begin
    if coalesce(new.type, old.type) = 'restriction' then
        perform pg_notify('gateway_restrictions', coalesce(new.user_sub, old.user_sub));
    end if;
    return null;
end $$;
create trigger dsr_requests_notify after insert or update or delete on dsr_requests
    for each row execute function dsr_requests_notify();
