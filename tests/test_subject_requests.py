"""Data-subject requests: the ledger, its scopes, restriction enforced live, and
self-service rectification and erasure."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg
import orjson
import pytest

from .conftest import call, gateway_settings, move_due_date, running_gateway, wait_for

GREET = {"role": "user", "sub": "u-greet", "euo": "euo-initech"}
FARID = {"role": "user", "sub": "u-farid", "euo": "euo-initech"}
INITECH_ADMIN = {"role": "euo_admin", "sub": "admin@initech", "euo": "euo-initech"}
BLUESKY = {"role": "partner", "sub": "bea", "partner": "p-bluesky"}


async def file_request(http, gateway, token, **body):
    status, _, answer = await call(http, "POST", gateway + "/v1/me/requests", token, json=body)
    return status, orjson.loads(answer)


async def test_a_user_files_a_request_due_in_30_days(gateway, http, token_for):
    status, req = await file_request(http, gateway, token_for("alice"), type="rectification",
                                     data_sets=["user_address"], detail="I moved to Ghent")
    assert status == 201
    assert req["status"] == "open" and req["user_sub"] == "u-alice"
    days = (datetime.fromisoformat(req["due_at"]) - datetime.fromisoformat(req["created_at"])).days
    assert days == 30
    _, _, body = await call(http, "GET", gateway + "/v1/me/requests", token_for("alice"))
    assert req["id"] in {r["id"] for r in orjson.loads(body)["requests"]}
    _, _, body = await call(http, "GET", gateway + "/v1/me/requests", token_for("bob"))
    assert req["id"] not in {r["id"] for r in orjson.loads(body)["requests"]}


@pytest.mark.parametrize("body", [
    {"type": "forget-me", "data_sets": ["user_address"]},
    {"type": "erasure", "data_sets": []},
    {"type": "erasure", "data_sets": ["not_a_data_set"]},
    {"type": "erasure", "data_sets": ["voicemails", "voicemails"]},
])
async def test_malformed_requests_are_refused(gateway, http, token_for, body):
    status, answer = await file_request(http, gateway, token_for("alice"), **body)
    assert status == 400 and answer["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("detail", [5, "nul\x00byte", "x" * 500_000, "bell\x07"])
async def test_detail_that_is_not_plain_text_is_refused(gateway, http, token_for, detail):
    """A NUL, a control character, a non-string or 500 kB of text is the caller's mistake
    (400 invalid_text), never a database error."""
    status, answer = await file_request(http, gateway, token_for("alice"), type="erasure",
                                        data_sets=["voicemails"], detail=detail)
    assert status == 400 and answer["error"]["code"] == "invalid_text"


def somebody(euo: str = "euo-acme") -> dict:
    """A user of no other test: an open objection or restriction of theirs blocks nothing
    another test reads."""
    return {"role": "user", "sub": f"u-ledger-{uuid.uuid4().hex[:8]}", "euo": euo}


async def test_admins_see_only_requests_in_their_scope(gateway, http, token_for):
    _, acme = await file_request(http, gateway, token_for(**somebody()), type="objection",
                                 data_sets=["call_history"])
    _, initech = await file_request(http, gateway, token_for(**FARID), type="erasure",
                                    data_sets=["voicemails"])

    async def ids(who):
        status, _, body = await call(http, "GET", gateway + "/v1/requests", who)
        assert status == 200
        return {r["id"] for r in orjson.loads(body)["requests"]}
    assert acme["id"] in await ids(token_for("admin"))
    assert initech["id"] not in await ids(token_for("admin"))
    assert initech["id"] in await ids(token_for(**INITECH_ADMIN))
    assert acme["id"] not in await ids(token_for(**INITECH_ADMIN))
    assert acme["id"] in await ids(token_for("partner"))
    assert initech["id"] not in await ids(token_for("partner"))
    assert {acme["id"], initech["id"]} <= await ids(token_for("staff"))
    status, _, _ = await call(http, "PATCH", f"{gateway}/v1/requests/{initech['id']}",
                              token_for("admin"), json={"status": "rejected"})
    assert status == 404
    assert (await call(http, "GET", gateway + "/v1/requests", token_for("bob")))[0] == 403


async def test_overdue_requests_come_first(gateway, http, token_for, db):
    _, late = await file_request(http, gateway, token_for("alice"), type="erasure",
                                 data_sets=["address_book"])
    await move_due_date(db, late["id"], "-1 day")
    _, _, body = await call(http, "GET", gateway + "/v1/requests", token_for("admin"))
    first = orjson.loads(body)["requests"][0]
    assert first["id"] == late["id"]


async def test_a_restriction_blocks_only_its_data_sets_and_lifting_is_seen_everywhere(
        gateway, backends, database_url, http, token_for):
    """A restriction of ["user_mobile"]: staff and partners get the user's record without the
    mobile number (everything else stays), a write of it is refused, and a resource of which
    nothing else would remain (the call history, restricted by an objection) is refused with
    403 and its list elements removed. The user and their EUO admin still see everything.
    Lifting restores access at once, in every gateway process."""
    path = "/telephony/euos/euo-initech/users/u-greet"
    staff, partner = token_for("staff"), token_for(**BLUESKY)
    status, _, body = await call(http, "GET", gateway + path, staff)
    assert status == 200 and orjson.loads(body)["mobile"]
    async with running_gateway(gateway_settings(backends["urls"]), database_url) as other:
        _, req = await file_request(http, gateway, token_for(**GREET), type="restriction",
                                    data_sets=["user_mobile"], detail="dispute")
        _, objection = await file_request(http, gateway, token_for(**GREET), type="objection",
                                          data_sets=["call_history"], detail="no marketing")
        for who in (staff, partner):
            status, _, body = await call(http, "GET", gateway + path, who)
            record = orjson.loads(body)
            assert status == 200 and "mobile" not in record
            assert record["first_name"] == "Greet" and record["email"]
        status, _, body = await call(http, "PATCH", gateway + path, staff,
                                     json={"mobile": "+32000000000"})
        assert status == 403 and orjson.loads(body)["error"]["code"] == "processing_restricted"

        async def restricted_there():
            _, _, body = await call(http, "GET", other + path, staff)
            return "mobile" not in orjson.loads(body)
        assert await wait_for(restricted_there, timeout=1.0)

        _, _, body = await call(http, "GET", gateway + "/telephony/euos/euo-initech/users", staff)
        users = {u["id"]: u for u in orjson.loads(body)["users"]}
        assert "mobile" not in users["u-greet"] and users["u-greet"]["last_name"] == "Wouters"
        assert users["u-farid"]["mobile"]                       # someone else's: untouched
        _, _, body = await call(http, "GET", gateway + "/telephony/euos/euo-initech/cdrs", partner)
        owners = {c["user_id"] for c in orjson.loads(body)["cdrs"]}
        assert "u-greet" not in owners and "u-farid" in owners
        status, _, body = await call(http, "GET", gateway + "/telephony/euos/euo-initech/cdrs",
                                     partner, params={"user": "u-greet"})
        assert status == 200 and orjson.loads(body)["cdrs"] == []
        for who in (token_for(**GREET), token_for(**INITECH_ADMIN)):
            status, _, body = await call(http, "GET", gateway + path, who)
            assert status == 200 and orjson.loads(body)["mobile"]

        status, _, _ = await call(http, "PATCH", f"{gateway}/v1/requests/{req['id']}",
                                  token_for(**INITECH_ADMIN),
                                  json={"status": "rejected", "resolution": "lifted"})
        assert status == 200
        assert "mobile" in orjson.loads((await call(http, "GET", gateway + path, staff))[2])

        async def lifted_there():
            _, _, body = await call(http, "GET", other + path, partner)
            return "mobile" in orjson.loads(body)
        assert await wait_for(lifted_there, timeout=1.0)
        status, _, _ = await call(http, "PATCH", f"{gateway}/v1/me/requests/{objection['id']}",
                                  token_for(**GREET), json={"status": "withdrawn"})
        assert status == 200


async def test_a_restriction_of_a_file_data_set_refuses_the_file(gateway, http, token_for):
    """A partner may read call recordings; restricted, a recording (a file cannot be partly
    served) and the list of them are refused, the user's record is not."""
    carla = {"role": "user", "sub": "u-carla", "euo": "euo-acme"}
    _, req = await file_request(http, gateway, token_for(**carla), type="restriction",
                                data_sets=["call_recordings"])
    try:
        base = "/telephony/euos/euo-acme/users/u-carla"
        for path in (base + "/recordings", base + "/recordings/rec-u-carla-1"):
            status, _, body = await call(http, "GET", gateway + path, token_for("partner"))
            assert status == 403 and orjson.loads(body)["error"]["code"] == "processing_restricted"
        assert (await call(http, "GET", gateway + base, token_for("partner")))[0] == 200
        assert (await call(http, "GET", gateway + base + "/recordings", token_for(**carla)))[0] == 200
    finally:
        await call(http, "PATCH", f"{gateway}/v1/me/requests/{req['id']}", token_for(**carla),
                   json={"status": "withdrawn"})
    assert (await call(http, "GET", gateway + base + "/recordings", token_for("partner")))[0] == 200


async def test_the_user_withdraws_their_own_request_and_nothing_else(gateway, http, token_for, db):
    """Withdrawing is the data subject's move: recorded as a transition with its audit row;
    another user cannot, an admin cannot, and a final request stays final (409)."""
    me = somebody("euo-initech")
    _, req = await file_request(http, gateway, token_for(**me), type="restriction",
                                data_sets=["user_mobile"])
    url = f"{gateway}/v1/me/requests/{req['id']}"
    status, _, body = await call(http, "PATCH", url, token_for(**somebody("euo-initech")),
                                 json={"status": "withdrawn"})
    assert status == 404 and orjson.loads(body)["error"]["code"] == "no_such_request"
    status, _, body = await call(http, "PATCH", url, token_for(**me), json={"status": "completed"})
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_request"
    status, _, body = await call(http, "PATCH", f"{gateway}/v1/requests/{req['id']}",
                                 token_for(**INITECH_ADMIN), json={"status": "withdrawn"})
    assert status == 400
    status, headers, body = await call(http, "PATCH", url, token_for(**me),
                                       json={"status": "withdrawn"})
    assert status == 200
    done = orjson.loads(body)
    assert done["status"] == "withdrawn"
    assert [(t["from"], t["to"]) for t in done["transitions"]] == [(None, "open"),
                                                                    ("open", "withdrawn")]
    row = await db.fetchrow("select * from audit_log where request_id = $1", headers["X-Request-Id"])
    assert row["decision"] == "allow" and row["subject_users"] == [me["sub"]]
    assert row["route"] == "gateway:/v1/me/requests/{id}"
    status, _, body = await call(http, "PATCH", url, token_for(**me), json={"status": "withdrawn"})
    assert status == 409 and orjson.loads(body)["error"]["code"] == "invalid_transition"
    status, _, body = await call(http, "GET", url, token_for(**me))
    assert status == 200 and orjson.loads(body)["status"] == "withdrawn"


async def test_transitions_follow_the_state_table(gateway, http, token_for):
    """An admin accepts, then completes; a completed request cannot be reopened, a
    rectification cannot be completed twice, and a request an admin cannot see is 404."""
    me = somebody("euo-initech")
    _, req = await file_request(http, gateway, token_for(**me), type="rectification",
                                data_sets=["euo_identity"], detail="our address is wrong")
    url = f"{gateway}/v1/requests/{req['id']}"
    admin = token_for(**INITECH_ADMIN)
    assert (await call(http, "PATCH", url, token_for("admin"), json={"status": "accepted"}))[0] == 404
    assert (await call(http, "PATCH", url, admin, json={"status": "accepted"}))[0] == 200
    status, _, body = await call(http, "PATCH", url, admin,
                                 json={"status": "completed", "resolution": "fixed"})
    assert status == 200 and orjson.loads(body)["status"] == "completed"
    status, _, body = await call(http, "PATCH", url, admin, json={"status": "accepted"})
    assert status == 409 and orjson.loads(body)["error"]["code"] == "invalid_transition"
    status, _, body = await call(http, "GET", url, admin)
    assert [t["to"] for t in orjson.loads(body)["transitions"]] == ["open", "accepted", "completed"]


async def test_rectification_names_where_the_user_corrects_it_themself(gateway, http, token_for):
    """A rectification of data the user may write points at the gateway route that writes it;
    data they may not write (the EUO's identity) is left to the admins."""
    status, req = await file_request(http, gateway, token_for(**somebody()), type="rectification",
                                     data_sets=["user_mobile", "organizer_language",
                                                "euo_identity"])
    assert status == 201
    by_set = {s["data_set"]: s for s in req["self_service"]}
    assert set(by_set) == {"user_mobile", "organizer_language"}
    assert by_set["user_mobile"]["method"] == "PATCH"
    assert by_set["user_mobile"]["path"].startswith("/telephony/euos/euo-acme/users/u-ledger-")
    assert by_set["user_mobile"]["fields"] == ["mobile"]


async def test_request_changes_are_audited(gateway, http, token_for, db):
    who = somebody()
    _, headers, _ = await call(http, "POST", gateway + "/v1/me/requests", token_for(**who),
                               json={"type": "objection", "data_sets": ["user_email"]})
    row = await db.fetchrow("select * from audit_log where request_id = $1", headers["X-Request-Id"])
    assert row["route"] == "gateway:/v1/me/requests" and row["subject_users"] == [who["sub"]]
    assert row["decision"] == "allow" and row["data_sets"] == ["user_email"]


async def test_self_service_rectification_and_erasure(gateway, http, token_for, demo):
    me = {"role": "user", "sub": "u-dirk", "euo": "euo-globex"}
    organizer = "/meeting/accounts/euo-globex/organizers/u-dirk"
    status, _, body = await call(http, "PATCH", gateway + organizer, token_for(**me),
                                 json={"language": "fr", "address_book": []})
    assert status == 200 and orjson.loads(body)["language"] == "fr"
    status, _, body = await call(http, "PATCH", gateway + organizer, token_for(**me),
                                 json={"meetings": []})
    assert status == 403 and orjson.loads(body)["error"]["code"] == "write_not_permitted"
    recording = "/telephony/euos/euo-globex/users/u-dirk/recordings/rec-u-dirk-1"
    assert (await call(http, "DELETE", gateway + recording, token_for(**me)))[0] == 204
    assert demo.recordings["u-dirk"] == []
    other = {"role": "user", "sub": "u-eva", "euo": "euo-globex"}
    status, _, _ = await call(http, "PATCH", gateway + organizer, token_for(**other),
                              json={"language": "nl"})
    assert status == 403


ALLOWED_MOVES = {("open", "accepted"), ("open", "rejected"), ("open", "withdrawn"),
                 ("accepted", "completed"), ("accepted", "rejected"), ("accepted", "withdrawn"),
                 ("accepted", "failed"), ("failed", "accepted"), ("failed", "rejected"),
                 ("failed", "withdrawn")}
STATES = ("open", "accepted", "failed", "completed", "rejected", "withdrawn")


async def test_the_database_keeps_requests_to_their_state_table(gateway, db):
    """Whatever role updates dsr_requests (the runtime role holds UPDATE), the database
    allows only the state table's moves, keeps a final request final, and never lets a
    request's subject, type, data sets or due date change, nor a queued notice be unsaid."""
    async def filed(status: str) -> uuid.UUID:
        async with db.acquire() as conn, conn.transaction():
            await conn.execute("alter table dsr_requests disable trigger dsr_requests_guard")
            rid = await conn.fetchval(
                "insert into dsr_requests (user_sub, euo_id, type, data_sets, status) values "
                "('u-guard', 'euo-guard', 'rectification', array['user_address'], $1) "
                "returning id", status)
            await conn.execute("alter table dsr_requests enable trigger dsr_requests_guard")
        return rid

    for old in STATES:
        for new in STATES:
            if old == new:
                continue
            rid = await filed(old)
            move = db.execute("update dsr_requests set status = $2, resolved_by = 'x' "
                              "where id = $1", rid, new)
            if (old, new) in ALLOWED_MOVES:
                await move
            else:
                with pytest.raises(asyncpg.CheckViolationError):
                    await move
    rid = await filed("completed")
    with pytest.raises(asyncpg.CheckViolationError, match="final"):
        await db.execute("update dsr_requests set resolution = 'rewritten' where id = $1", rid)
    rid = await filed("open")
    for change in ("user_sub = 'u-other'", "euo_id = 'euo-other'", "type = 'erasure'",
                   "data_sets = array['user_name']", "detail = 'other'",
                   "due_at = due_at + interval '60 days'", "created_at = now()"):
        with pytest.raises(asyncpg.CheckViolationError, match="never change"):
            await db.execute(f"update dsr_requests set {change} where id = $1", rid)
    await db.execute("update dsr_requests set overdue_notified_at = now() where id = $1", rid)
    with pytest.raises(asyncpg.CheckViolationError, match="stays noted"):
        await db.execute("update dsr_requests set overdue_notified_at = null where id = $1", rid)
    assert await db.fetchval("select status from dsr_requests where id = $1", rid) == "open"
