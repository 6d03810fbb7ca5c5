"""Break-glass: a time-boxed grant with purpose and ticket unlocks what policy.csv gives the
`break_glass` relation (never a (**) data set), flags every request under it, shows in the
EUO admin's list and the touched user's access log, ends early on DELETE and on time."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest

from gateway.policy.authz import load_policy
from gateway.policy.catalog import PolicyError
from gateway.policy.catalog_files import load_catalog

from .conftest import call, gateway_settings, running_gateway, wait_for

ORGANIZER = "/meeting/accounts/euo-acme/organizers/u-alice"


def _code(body: bytes) -> str:
    return orjson.loads(body)["error"]["code"]


async def _open(http, base, token, **fields):
    body = {"euo": "euo-acme", "user": "u-alice", "purpose": "locked-out organizer",
            "ticket": f"INC-{uuid.uuid4().hex[:6]}", "minutes": 30} | fields
    return await call(http, "POST", base + "/v1/break-glass", token, json=body)


async def _same_language(http, base, token):
    """PATCH the organizer's language to what it is (the demo's data stays as it was)."""
    _, _, body = await call(http, "GET", base + ORGANIZER, token)
    language = orjson.loads(body)["language"]
    return await call(http, "PATCH", base + ORGANIZER, token, json={"language": language})


async def test_a_grant_unlocks_its_lines_is_flagged_and_ends_on_delete(gateway, http, token_for,
                                                                      db):
    sub = f"staff-{uuid.uuid4().hex[:6]}"
    staff = token_for(role="provider_staff", sub=sub)
    status, _, body = await _same_language(http, gateway, staff)
    assert status == 403 and _code(body) == "write_not_permitted"

    status, _, body = await _open(http, gateway, staff)
    assert status == 201, body
    grant = orjson.loads(body)
    assert grant["in_force"] and grant["euo"] == "euo-acme" and grant["user"] == "u-alice"
    status, _, body = await _same_language(http, gateway, staff)
    assert status == 200, body
    # every request under it names it; a request about another user does not
    status, _, _ = await call(http, "GET", gateway + ORGANIZER.replace("u-alice", "u-bob"), staff)
    assert status == 200
    flagged = await db.fetch(
        "select method, route, subject_users, phase from audit_log where break_glass = $1 "
        "order by at, seq", uuid.UUID(grant["id"]))
    # the write is two rows: its intent before the backend call, its outcome after
    assert [(r["method"], r["phase"]) for r in flagged] == [
        ("POST", None), ("GET", None), ("PATCH", "intent"), ("PATCH", "outcome")]
    assert all(r["subject_users"] == ["u-alice"] for r in flagged)
    for accept in ("application/json", "text/csv"):    # the audit API shows it too
        status, _, body = await call(http, "GET", f"{gateway}/v1/audit?actor={sub}", staff,
                                     headers={"Accept": accept})
        assert status == 200 and body.count(grant["id"].encode()) == 4, body

    # Alice sees it with purpose and ticket; the EUO's admin lists it, another EUO's does not
    async def alice_sees():
        _, _, body = await call(http, "GET", gateway + "/v1/me/access-log?limit=50",
                                token_for("alice"))
        return [a for a in orjson.loads(body)["accesses"]
                if a["break_glass"] and a["break_glass"]["id"] == grant["id"]]
    seen = await wait_for(alice_sees)
    assert seen and {a["action"] for a in seen} >= {"PATCH"}
    assert seen[0]["break_glass"]["ticket"] == grant["ticket"]
    assert seen[0]["break_glass"]["purpose"] == "locked-out organizer"
    _, _, body = await call(http, "GET", gateway + "/v1/break-glass", token_for("admin"))
    assert grant["id"] in [g["id"] for g in orjson.loads(body)["grants"]]
    other = token_for(role="euo_admin", sub="boss@globex", euo="euo-globex")
    _, _, body = await call(http, "GET", gateway + "/v1/break-glass", other)
    assert grant["id"] not in [g["id"] for g in orjson.loads(body)["grants"]]
    status, _, body = await call(http, "DELETE", f"{gateway}/v1/break-glass/{grant['id']}", other)
    assert status == 404 and _code(body) == "no_such_grant"

    # the EUO's admin ends it: at once, for this process
    status, _, body = await call(http, "DELETE", f"{gateway}/v1/break-glass/{grant['id']}",
                                 token_for("admin"))
    assert status == 200 and not orjson.loads(body)["in_force"]
    assert orjson.loads(body)["ended_by"] == "euo_admin:admin@acme"
    status, _, body = await _same_language(http, gateway, staff)
    assert status == 403 and _code(body) == "write_not_permitted"


async def test_a_grant_covers_only_its_euo_and_user(gateway, http, token_for):
    staff = token_for(role="provider_staff", sub=f"staff-{uuid.uuid4().hex[:6]}")
    status, _, body = await _open(http, gateway, staff, user="u-bob")
    assert status == 201, body
    status, _, body = await _same_language(http, gateway, staff)     # Alice's: not covered
    assert status == 403
    status, _, body = await _open(http, gateway, staff, euo="euo-globex", user=None)
    assert status == 201
    status, _, body = await _same_language(http, gateway, staff)     # another EUO's grant
    assert status == 403


@pytest.mark.parametrize(("caller", "fields", "status", "code"), [
    ("staff", {"minutes": 241}, 400, "invalid_break_glass"),
    ("staff", {"minutes": 0}, 400, "invalid_break_glass"),
    ("staff", {"minutes": "30"}, 400, "invalid_break_glass"),
    ("staff", {"ticket": "  "}, 400, "invalid_break_glass"),
    ("staff", {"purpose": None}, 400, "invalid_text"),
    ("staff", {"euo": "../x"}, 400, "bad_identifier"),
    ("admin", {}, 403, "role_not_permitted"),
    ("alice", {}, 403, "role_not_permitted"),
    ("partner", {}, 403, "role_not_permitted"),
])
async def test_what_break_glass_refuses(gateway, http, token_for, caller, fields, status, code):
    got, _, body = await _open(http, gateway, token_for(caller), **fields)
    assert (got, _code(body)) == (status, code)


async def test_a_grant_ends_on_time_without_a_notification(gateway, http, token_for, db):
    sub = f"staff-{uuid.uuid4().hex[:6]}"
    staff = token_for(role="provider_staff", sub=sub)
    # a grant of a few seconds (the API counts in minutes), written as the gateway writes it;
    # the mirror hears of it at once (a notification), of its end never: only the clock ends it
    await db.execute(
        "insert into break_glass (actor_role, actor_sub, euo_id, user_sub, purpose, ticket, "
        "ends_at) values ('provider_staff', $1, 'euo-acme', 'u-alice', 'test', 'INC-1', "
        "now() + interval '3 seconds')", sub)

    async def unlocked():
        return (await _same_language(http, gateway, staff))[0] == 200
    assert await wait_for(unlocked, timeout=3)

    async def refused():
        return (await _same_language(http, gateway, staff))[0] == 403
    assert await wait_for(refused, timeout=15)


async def test_a_grant_is_evidence_only_its_end_may_be_written_once(gateway, http, token_for,
                                                                   db):
    staff = token_for(role="provider_staff", sub=f"staff-{uuid.uuid4().hex[:6]}")
    status, _, body = await _open(http, gateway, staff)
    assert status == 201
    gid = uuid.UUID(orjson.loads(body)["id"])
    for statement in ("update break_glass set purpose = 'nothing to see' where id = $1",
                      "update break_glass set ends_at = ends_at + interval '1 day' where id = $1",
                      "update break_glass set ended_at = now() where id = $1",   # no ended_by
                      "delete from break_glass where id = $1"):
        with pytest.raises(asyncpg.RaiseError, match="break_glass"):
            await db.execute(statement, gid)
    status, _, _ = await call(http, "DELETE", f"{gateway}/v1/break-glass/{gid}", staff)
    assert status == 200
    with pytest.raises(asyncpg.RaiseError, match="only a grant's early end"):
        await db.execute("update break_glass set ended_at = now(), ended_by = 'x' "
                         "where id = $1", gid)
    with pytest.raises(asyncpg.RaiseError, match="never truncated"):
        await db.execute("truncate break_glass")


async def test_a_grant_opened_in_one_process_is_in_force_in_another(backends, database_url,
                                                                    gateway, http, token_for):
    staff = token_for(role="provider_staff", sub=f"staff-{uuid.uuid4().hex[:6]}")
    async with running_gateway(gateway_settings(backends["urls"]), database_url) as other:
        assert (await _same_language(http, other, staff))[0] == 403
        status, _, body = await _open(http, gateway, staff)
        assert status == 201

        async def unlocked():
            return (await _same_language(http, other, staff))[0] == 200
        assert await wait_for(unlocked, timeout=10)
        grant = orjson.loads(body)["id"]
        status, _, _ = await call(http, "DELETE", f"{gateway}/v1/break-glass/{grant}", staff)
        assert status == 200

        async def locked():
            return (await _same_language(http, other, staff))[0] == 403
        assert await wait_for(locked, timeout=10)


def test_break_glass_can_never_unlock_a_hidden_data_set(policy_dir):
    with open(policy_dir / "policy.csv", "a") as f:
        f.write("p, provider_staff, break_glass, voicemails, read\n")
    with pytest.raises(PolicyError, match="provider_staff may read voicemails, which "
                                          "datasets.yaml marks"):
        load_policy(policy_dir, load_catalog(policy_dir))


@pytest.mark.parametrize(("change", "message"), [
    (("    gateway_api: [audit, requests, assisted_export]\n",
      "    gateway_api: [audit, requests, assisted_export]\n"
      "    break_glass: true\n"), "not an EUO's own people"),
    (("break_glass:\n  max_minutes: 240\n", ""), "max_minutes: N}` is not set"),
    (("  max_minutes: 240\n", "  max_minutes: 99999\n"), "max_minutes must be 1 to 10080"),
])
def test_break_glass_settings_are_checked(policy_dir, change, message):
    path = policy_dir / "roles.yaml"
    text = path.read_text()
    old, new = change
    assert old in text
    # the EUO admin's entry is the second with these API groups (the partner's is first)
    at = text.rindex(old) if "gateway_api" in old else text.index(old)
    path.write_text(text[:at] + new + text[at + len(old):])
    with pytest.raises(PolicyError, match=message):
        load_catalog(policy_dir)


def test_a_line_for_break_glass_needs_a_role_that_may_open_grants(policy_dir):
    with open(policy_dir / "policy.csv", "a") as f:
        f.write("p, partner, break_glass, user_name, read\n")
    with pytest.raises(PolicyError, match="partner can never hold relation 'break_glass'"):
        load_policy(policy_dir, load_catalog(policy_dir))


# Who may see whom in a grant: as in the audit log, an organisation sees its own people by
# name and everyone else by role and organisation only.
NAME_SEEN_BY = {"staff": True, "partner": False, "admin": False, "other_staff": True}


async def test_a_grant_names_the_grantee_only_to_their_own_organisation(gateway, http,
                                                                          token_for):
    sub = f"staff-{uuid.uuid4().hex[:6]}"
    staff = token_for(role="provider_staff", sub=sub)
    status, _, body = await _open(http, gateway, staff)
    assert status == 201 and orjson.loads(body)["sub"] == sub       # the grantee's own
    gid = orjson.loads(body)["id"]
    viewers = {"staff": staff, "partner": token_for("partner"), "admin": token_for("admin"),
               "other_staff": token_for("staff")}
    for name, token in viewers.items():
        _, _, body = await call(http, "GET", gateway + "/v1/break-glass", token)
        [grant] = [g for g in orjson.loads(body)["grants"] if g["id"] == gid]
        assert grant["role"] == "provider_staff"
        assert (grant["sub"] == sub) is NAME_SEEN_BY[name], (name, grant)
        assert grant["sub"] in (sub, None)
    # the admin ends it: the answer does not name the grantee either
    status, _, body = await call(http, "DELETE", f"{gateway}/v1/break-glass/{gid}",
                                 token_for("admin"))
    assert status == 200 and orjson.loads(body)["sub"] is None
    assert orjson.loads(body)["ended_by"] == "euo_admin:admin@acme"    # their own name
    # who ended it: by name to the ender's organisation (and the Provider), else by role
    for name, token in viewers.items():
        _, _, body = await call(http, "GET", gateway + "/v1/break-glass", token)
        [grant] = [g for g in orjson.loads(body)["grants"] if g["id"] == gid]
        assert grant["ended_by"] == ("euo_admin" if name == "partner"
                                     else "euo_admin:admin@acme"), (name, grant)


async def test_a_partner_lists_the_grants_over_the_euos_it_held_while_it_held_them(
        gateway, http, token_for):
    """The grants a partner lists follow its audit scope: an EUO it took over shows no
    grant that ended before, an EUO it lost still shows those of its time."""
    staff = token_for(role="provider_staff", sub=f"staff-{uuid.uuid4().hex[:6]}")
    northwind, bluesky = token_for("partner"), token_for(
        role="partner", sub="bea@bluesky", partner="p-bluesky")
    euo = f"euo-bg-{uuid.uuid4().hex[:8]}"
    admin_euo = f"{gateway}/v1/admin/euos/{euo}"

    async def listed(token):
        _, _, body = await call(http, "GET", gateway + "/v1/break-glass", token)
        return {g["id"] for g in orjson.loads(body)["grants"]}
    assert (await call(http, "PUT", admin_euo, staff, json={"partner_id": "p-bluesky"}))[0] == 200
    try:
        status, _, body = await _open(http, gateway, staff, euo=euo, user=None)
        assert status == 201
        before = orjson.loads(body)["id"]
        assert (await call(http, "DELETE", f"{gateway}/v1/break-glass/{before}", staff))[0] == 200
        assert before in await listed(bluesky)
        status, _, body = await _open(http, gateway, staff, euo=euo, user=None)
        across = orjson.loads(body)["id"]           # still in force when the EUO changes hands
        status, _, _ = await call(http, "PUT", admin_euo, staff, json={"partner_id": "p-northwind"})
        assert status == 200
        status, _, body = await _open(http, gateway, staff, euo=euo, user=None)
        after = orjson.loads(body)["id"]
        assert before not in await listed(northwind)      # ended before it held the EUO
        assert after in await listed(northwind)
        assert before in await listed(bluesky)            # of its time
        assert after not in await listed(bluesky)
        assert across in await listed(northwind) and across in await listed(bluesky)
    finally:
        await call(http, "DELETE", admin_euo, staff)


@pytest.mark.parametrize("viewer", ["staff", "partner", "admin", "alice_admin_of_globex"])
async def test_a_grant_names_its_grantee_exactly_where_the_audit_log_does(gateway, http,
                                                                         token_for, viewer):
    """The grant's `sub` is shown to a viewer exactly when the audit row that opened it
    shows its actor_sub to that viewer (or neither is in the viewer's scope)."""
    sub = f"staff-{uuid.uuid4().hex[:6]}"
    staff = token_for(role="provider_staff", sub=sub)
    status, _, body = await _open(http, gateway, staff)
    gid = orjson.loads(body)["id"]
    token = (token_for(role="euo_admin", sub="boss@globex", euo="euo-globex")
             if viewer == "alice_admin_of_globex" else token_for(viewer))
    _, _, body = await call(http, "GET", gateway + "/v1/break-glass", token)
    grants = [g for g in orjson.loads(body)["grants"] if g["id"] == gid]
    _, _, body = await call(http, "GET", gateway + "/v1/audit?limit=1000&euo=euo-acme", token)
    rows = [r for r in orjson.loads(body)["rows"] if r["break_glass"] == gid
            and r["method"] == "POST"]
    assert len(grants) == len(rows) <= 1
    if rows:
        assert grants[0]["sub"] == rows[0]["actor_sub"] and grants[0]["sub"] in (sub, None)


async def test_a_grant_ended_by_two_at_once_stays_ended(gateway, http, token_for, db):
    """A DELETE that loses the race with another end answers the grant as ended and does not
    put it back in force in its process's mirror."""
    staff = token_for(role="provider_staff", sub=f"staff-{uuid.uuid4().hex[:6]}")
    status, _, body = await _open(http, gateway, staff)
    gid = orjson.loads(body)["id"]
    assert (await _same_language(http, gateway, staff))[0] == 200
    async with db.acquire() as other:
        tx = other.transaction()
        await tx.start()
        # the other ender: holds the grant's row until the gateway's DELETE waits for it
        await other.execute("update break_glass set ended_at = now(), ended_by = 'other:ender' "
                            "where id = $1", uuid.UUID(gid))
        deleting = asyncio.ensure_future(
            call(http, "DELETE", f"{gateway}/v1/break-glass/{gid}", staff))

        async def waiting():
            return await db.fetchval(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                "and query like '%update break_glass set ended_at%'")
        assert await wait_for(waiting, timeout=10)
        await tx.commit()
    status, _, body = await deleting
    grant = orjson.loads(body)
    assert status == 200 and not grant["in_force"] and grant["ended_by"] == "other:ender"

    async def refused():
        return (await _same_language(http, gateway, staff))[0] == 403
    assert await wait_for(refused, timeout=5)
    # and stays refused once every notification has been heard
    assert all([(await _same_language(http, gateway, staff))[0] == 403 for _ in range(5)])


def _partners_may_break_glass(policy_dir, *lines: str):
    """The shipped policy, with the partner role allowed break-glass and `lines` added."""
    path = policy_dir / "roles.yaml"
    text = path.read_text()
    old = "    tenant_claim: partner\n    gateway_api: [audit, requests]\n"
    assert old in text
    path.write_text(text.replace(old, old + "    break_glass: true\n"))
    with open(policy_dir / "policy.csv", "a") as f:
        f.writelines(line + "\n" for line in lines)


async def test_a_partner_breaks_glass_over_its_contracted_euos_if_the_policy_allows(
        gateway, backends, database_url, http, token_for, policy_dir, db):
    """roles.yaml gives the partner role `break_glass: true` and policy.csv a line for the
    relation: the partner opens a grant over a contracted EUO (never another partner's or an
    ended contract's), it unlocks that line only, is flagged and seen like staff's, and ends."""
    _partners_may_break_glass(policy_dir, "p, partner, break_glass, organizer_language, write")
    sub = f"pat-{uuid.uuid4().hex[:6]}@northwind"
    partner = token_for(role="partner", sub=sub, partner="p-northwind")
    async with running_gateway(gateway_settings(backends["urls"], policy_dir=policy_dir),
                               database_url) as gw:
        status, _, body = await _same_language(http, gw, partner)
        assert status == 403 and _code(body) == "write_not_permitted"
        for euo in ("euo-initech", "euo-umbrella"):     # another partner's; an ended contract
            status, _, body = await _open(http, gw, partner, euo=euo, user=None)
            assert (status, _code(body)) == (403, "no_active_contract"), euo
        status, _, body = await _open(http, gw, partner, minutes=241)
        assert (status, _code(body)) == (400, "invalid_break_glass")
        status, _, body = await _open(http, gw, partner)
        assert status == 201, body
        grant = orjson.loads(body)
        assert (grant["role"], grant["partner"], grant["sub"]) == ("partner", "p-northwind", sub)
        status, _, body = await _same_language(http, gw, partner)
        assert status == 200, body
        # only what the line gives: the organizer's name stays read-only
        status, _, body = await call(http, "PATCH", gw + ORGANIZER, partner,
                                     json={"first_name": "Alice"})
        assert status == 403 and _code(body) == "write_not_permitted"
        flagged = await db.fetch("select method from audit_log where break_glass = $1",
                                 uuid.UUID(grant["id"]))
        assert {r["method"] for r in flagged} >= {"POST", "PATCH"}
        # the EUO's admin lists it (the grantee by role and partner only), the partner too,
        # and Alice sees purpose and ticket beside the access
        _, _, body = await call(http, "GET", gw + "/v1/break-glass", token_for("admin"))
        [seen] = [g for g in orjson.loads(body)["grants"] if g["id"] == grant["id"]]
        assert (seen["role"], seen["partner"], seen["sub"]) == ("partner", "p-northwind", None)
        _, _, body = await call(http, "GET", gw + "/v1/break-glass", partner)
        assert grant["id"] in [g["id"] for g in orjson.loads(body)["grants"]]

        async def alice_sees():
            _, _, body = await call(http, "GET", gw + "/v1/me/access-log?limit=50",
                                    token_for("alice"))
            return [a for a in orjson.loads(body)["accesses"] if a["action"] == "PATCH"
                    and (a["break_glass"] or {}).get("id") == grant["id"]]
        seen = await wait_for(alice_sees)      # the allowed PATCH and the refused one
        assert {a["decision"] for a in seen} == {"allow", "deny"}
        assert all(a["accessor"] == {"role": "partner", "organisation": "p-northwind"}
                   and a["break_glass"]["ticket"] == grant["ticket"] for a in seen)
        # the grantee ends it early
        status, _, body = await call(http, "DELETE", f"{gw}/v1/break-glass/{grant['id']}", partner)
        assert status == 200 and orjson.loads(body)["ended_by"] == f"partner:{sub}"
        status, _, body = await _same_language(http, gw, partner)
        assert status == 403 and _code(body) == "write_not_permitted"
        # a grant in force counts only while the partner holds the EUO
        staff = token_for("staff")
        euo = f"euo-bg-{uuid.uuid4().hex[:8]}"
        contract = f"{gw}/v1/admin/euos/{euo}"
        assert (await call(http, "PUT", contract, staff, json={"partner_id": "p-northwind"}))[0] == 200
        try:
            status, _, body = await _open(http, gw, partner, euo=euo, user=None)
            assert status == 201, body
            assert (await call(http, "PUT", contract, staff, json={"partner_id": "p-bluesky"}))[0] == 200

            async def refused():
                status, _, body = await call(http, "PATCH", f"{gw}/meeting/accounts/{euo}/"
                                             "organizers/u-x", partner, json={"language": "en"})
                return status == 403 and _code(body) == "no_active_contract"
            assert await wait_for(refused)
        finally:
            await call(http, "DELETE", contract, staff)


def test_a_partners_break_glass_can_never_unlock_its_hidden_data_sets(policy_dir):
    _partners_may_break_glass(policy_dir, "p, partner, break_glass, address_book, read")
    with pytest.raises(PolicyError, match="partner may read address_book, which datasets.yaml "
                                          "marks"):
        load_policy(policy_dir, load_catalog(policy_dir))
