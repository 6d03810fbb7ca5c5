"""Data-subject requests: the ledger, its scopes, restriction enforced live, and
self-service rectification and erasure."""

from __future__ import annotations

import uuid
from datetime import datetime

import orjson
import pytest

from .conftest import call, gateway_settings, running_gateway, wait_for

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


async def test_admins_see_only_requests_in_their_scope(gateway, http, token_for):
    _, acme = await file_request(http, gateway, token_for("bob"), type="objection",
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
    await db.execute("update dsr_requests set due_at = now() - interval '1 day' where id = $1",
                     uuid.UUID(late["id"]))
    _, _, body = await call(http, "GET", gateway + "/v1/requests", token_for("admin"))
    first = orjson.loads(body)["requests"][0]
    assert first["id"] == late["id"]


async def test_restriction_blocks_staff_and_partners_not_the_user_or_admin(
        gateway, backends, database_url, http, token_for):
    """While open, staff and partners get 403 processing_restricted and lose the user's rows
    from lists; the user and their EUO admin still see everything. Lifting it restores
    access at once, in every gateway process."""
    path = "/telephony/euos/euo-initech/users/u-greet"
    staff, partner = token_for("staff"), token_for(**BLUESKY)
    assert (await call(http, "GET", gateway + path, staff))[0] == 200
    async with running_gateway(gateway_settings(backends["urls"]), database_url) as other:
        _, req = await file_request(http, gateway, token_for(**GREET), type="restriction",
                                    data_sets=["user_name"], detail="dispute")
        for who in (staff, partner):
            status, _, body = await call(http, "GET", gateway + path, who)
            assert status == 403 and orjson.loads(body)["error"]["code"] == "processing_restricted"

        async def restricted_there():
            return (await call(http, "GET", other + path, staff))[0] == 403
        assert await wait_for(restricted_there, timeout=1.0)

        _, _, body = await call(http, "GET", gateway + "/telephony/euos/euo-initech/users", staff)
        assert "u-greet" not in {u["id"] for u in orjson.loads(body)["users"]}
        _, _, body = await call(http, "GET", gateway + "/telephony/euos/euo-initech/cdrs", partner)
        assert "u-greet" not in {c["user_id"] for c in orjson.loads(body)["cdrs"]}
        for who in (token_for(**GREET), token_for(**INITECH_ADMIN)):
            assert (await call(http, "GET", gateway + path, who))[0] == 200

        status, _, _ = await call(http, "PATCH", f"{gateway}/v1/requests/{req['id']}",
                                  token_for(**INITECH_ADMIN),
                                  json={"status": "completed", "resolution": "lifted"})
        assert status == 200
        assert (await call(http, "GET", gateway + path, staff))[0] == 200

        async def lifted_there():
            return (await call(http, "GET", other + path, partner))[0] == 200
        assert await wait_for(lifted_there, timeout=1.0)


async def test_request_changes_are_audited(gateway, http, token_for, db):
    _, headers, _ = await call(http, "POST", gateway + "/v1/me/requests", token_for("alice"),
                               json={"type": "objection", "data_sets": ["user_email"]})
    row = await db.fetchrow("select * from audit_log where request_id = $1", headers["X-Request-Id"])
    assert row["route"] == "gateway:/v1/me/requests" and row["subject_users"] == ["u-alice"]
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
