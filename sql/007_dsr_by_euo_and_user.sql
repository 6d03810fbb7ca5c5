-- Data-subject requests and restrictions belong to a user of an EUO: the same `sub` in two
-- EUOs is two people. Look-ups go by (euo_id, user_sub), and the NOTIFY payload names both
-- (a JSON array [euo_id, user_sub]) so every process reloads the right person.
create index dsr_requests_euo_user on dsr_requests (euo_id, user_sub, created_at desc);
drop index if exists dsr_requests_user;

create or replace function dsr_requests_notify() returns trigger language plpgsql as $$
begin
    if coalesce(new.type, old.type) = 'restriction' then
        perform pg_notify('gateway_restrictions',
                          json_build_array(coalesce(new.euo_id, old.euo_id),
                                           coalesce(new.user_sub, old.user_sub))::text);
    end if;
    return null;
end $$;
