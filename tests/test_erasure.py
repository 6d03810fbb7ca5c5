"""Erasure that acts: accepting an erasure request calls the delete routes the route table
declares for its data sets on real loopback backends (demo data of this module's own, so
nothing another test reads is deleted), records each call's outcome, and says what no
backend can erase. A backend that fails leaves the request `failed`, nothing of that data
set claimed erased; accepting again retries."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from gateway.demo import data as demo_data
from gateway.demo.backends import meeting_app, telephony_app
from gateway.demo.run import start_site

from .conftest import Seen, call, gateway_process, gateway_settings, running_gateway, wait_for

DIRK = {"role": "user", "sub": "u-dirk", "euo": "euo-globex"}
EVA = {"role": "user", "sub": "u-eva", "euo": "euo-globex"}
GLOBEX_ADMIN = {"role": "euo_admin", "sub": "admin@globex", "euo": "euo-globex"}
CARLA = {"role": "user", "sub": "u-carla", "euo": "euo-acme"}
ACME_ADMIN = {"role": "euo_admin", "sub": "admin@acme", "euo": "euo-acme"}


class Faults:
    """Backend paths that answer 500 while listed, or that wait for `release` while held."""

    def __init__(self):
        self.failing: set[str] = set()
        self.held: set[tuple[str, str]] = set()
        self.arrived = asyncio.Event()     # a held call has come in
        self.release = asyncio.Event()
        self.urls: dict[str, str] = {}

    def middleware(self):
        @web.middleware
        async def fail(request, handler):
            if (request.method, request.path) in self.failing:
                return web.json_response({"error": "disk full"}, status=500)
            if (request.method, request.path) in self.held:
                self.arrived.set()
                await self.release.wait()
            return await handler(request)
        return fail


@pytest_asyncio.fixture(scope="module")
async def erasable(database_url):
    """(gateway URL, the backends' data, what they received, faults) — data of our own."""
    data, seen, faults = demo_data.build(), Seen(), Faults()
    runners, urls = [], {}
    for service, make in (("telephony", telephony_app), ("meeting", meeting_app)):
        runner, port = await start_site(make(data, [seen.middleware(), faults.middleware()]),
                                        "127.0.0.1", 0)
        runners.append(runner)
        urls[service] = f"http://127.0.0.1:{port}"
    faults.urls = urls
    async with running_gateway(gateway_settings(urls), database_url) as gw:
        yield gw, data, seen, faults
    for r in runners:
        await r.cleanup()


@contextlib.contextmanager
def holding(faults: Faults, method: str, path: str):
    faults.held, faults.arrived, faults.release = {(method, path)}, asyncio.Event(), asyncio.Event()
    try:
        yield
    finally:
        faults.held = set()
        faults.release.set()


async def file_erasure(http, gw, token_for, who, data_sets) -> str:
    """The id of an erasure request `who` files for `data_sets`."""
    status, _, body = await call(http, "POST", gw + "/v1/me/requests", token_for(**who),
                                 json={"type": "erasure", "data_sets": data_sets})
    assert status == 201, body
    return orjson.loads(body)["id"]


async def file_and_accept(http, gw, token_for, who, data_sets, admin=GLOBEX_ADMIN):
    req = await file_erasure(http, gw, token_for, who, data_sets)
    status, headers, body = await call(http, "PATCH", f"{gw}/v1/requests/{req}",
                                       token_for(**admin), json={"status": "accepted"})
    assert status == 200, body
    return orjson.loads(body), headers["X-Request-Id"]


async def test_accepted_erasure_calls_the_declared_delete_routes(erasable, http, token_for, db):
    gw, data, seen, _ = erasable
    seen.requests.clear()
    done, request_id = await file_and_accept(
        http, gw, token_for, DIRK, ["voicemails", "call_recordings", "organizer_documents",
                                    "address_book", "meeting_list", "faxes_outgoing", "user_name"])
    assert done["status"] == "completed"
    deletes = sorted(p for m, p, _ in seen.requests if m == "DELETE")
    assert deletes == sorted([
        "/euos/euo-globex/users/u-dirk/voicemails/vm-u-dirk-1",
        "/euos/euo-globex/users/u-dirk/recordings/rec-u-dirk-1",
        "/accounts/euo-globex/organizers/u-dirk/documents/doc-u-dirk-1",
        "/accounts/euo-globex/organizers/u-dirk/address-book/client3@customer.example",
        "/accounts/euo-globex/organizers/u-dirk/address-book/team@ops.example",
        "/accounts/euo-globex/organizers/u-dirk/meetings/mtg-globex-1",
    ])
    # really gone from the backends
    assert data.voicemails["u-dirk"] == [] and data.recordings["u-dirk"] == []
    assert data.organizers["u-dirk"]["documents"] == []
    assert data.organizers["u-dirk"]["address_book"] == []
    assert "mtg-globex-1" not in data.meetings
    assert data.faxes["u-dirk"] and data.users["u-dirk"]["first_name"] == "Dirk"
    # every call's outcome, and what no backend can erase, in the answer and the database
    outcomes = {(c["method"], c["path"]): c["outcome"] for c in done["erasure_calls"]}
    assert outcomes[("DELETE", "/meeting/accounts/euo-globex/organizers/u-dirk/meetings/"
                               "mtg-globex-1")] == "erased"
    assert set(outcomes.values()) == {"erased"} and len(outcomes) == 6
    assert "cannot be erased through a backend" in done["resolution"]
    assert "faxes_outgoing, user_name" in done["resolution"]
    assert "voicemails (1 item)" in done["resolution"]
    assert [(t["from"], t["to"]) for t in done["transitions"]] == [
        (None, "open"), ("open", "accepted"), ("accepted", "completed")]
    rows = await db.fetch("select method, route, decision, actor_role, subject_users from audit_log"
                          " where request_id = $1", request_id)
    deleted = [r for r in rows if r["method"] == "DELETE"]
    assert len(deleted) == 6 and {r["decision"] for r in deleted} == {"allow"}
    assert {r["actor_role"] for r in rows} == {"euo_admin"}           # who caused it
    assert all(r["subject_users"] == ["u-dirk"] for r in deleted)
    patches = [r for r in rows if r["route"] == "gateway:/v1/requests/{id}"]
    assert len(patches) == 2                                          # accepted, completed
    assert await db.fetchval("select count(*) from dsr_erasure_calls where request_id = $1::uuid",
                             done["id"]) == 6


async def test_a_failing_backend_leaves_the_erasure_failed_and_a_retry_finishes_it(
        erasable, http, token_for, db):
    gw, data, _, faults = erasable
    recording = "/euos/euo-globex/users/u-eva/recordings/rec-u-eva-1"
    faults.failing.add(("DELETE", recording))
    try:
        done, request_id = await file_and_accept(http, gw, token_for, EVA,
                                                 ["voicemails", "call_recordings"])
    finally:
        faults.failing.clear()
    assert done["status"] == "failed"
    assert data.recordings["u-eva"] and data.voicemails["u-eva"] == []
    by_path = {c["path"]: c for c in done["erasure_calls"]}
    failed = by_path["/telephony" + recording]
    assert failed["outcome"] == "failed" and failed["reason"] == "backend_error"
    assert failed["status"] == 502
    assert "NOT erased" in done["resolution"] and "call_recordings (backend_error)" in done["resolution"]
    assert "erased through the backends: voicemails" in done["resolution"]
    assert "call_recordings (1" not in done["resolution"]              # not claimed erased
    row = await db.fetchrow("select decision, reason from audit_log where request_id = $1 and "
                            "method = 'DELETE' and path like '%recordings%'", request_id)
    assert row["decision"] == "error" and row["reason"] == "backend_error"

    status, _, body = await call(http, "PATCH", f"{gw}/v1/requests/{done['id']}",
                                 token_for(**GLOBEX_ADMIN), json={"status": "accepted"})
    again = orjson.loads(body)
    assert status == 200 and again["status"] == "completed"
    assert data.recordings["u-eva"] == []
    assert [t["to"] for t in again["transitions"]] == ["open", "accepted", "failed", "accepted",
                                                       "completed"]


async def test_only_the_gateway_completes_an_erasure(erasable, http, token_for):
    gw, *_ = erasable
    req = await file_erasure(http, gw, token_for, EVA, ["user_name"])
    status, _, body = await call(http, "PATCH", f"{gw}/v1/requests/{req}",
                                 token_for(**GLOBEX_ADMIN), json={"status": "completed"})
    assert status == 409 and orjson.loads(body)["error"]["code"] == "invalid_transition"


async def test_the_organizer_deletes_meetings_documents_addresses_and_notes(
        erasable, http, token_for):
    """The seed's organizer deletions, self-service through the gateway; a colleague cannot."""
    gw, data, _, _ = erasable
    acme = "/meeting/accounts/euo-acme"
    alice = {"role": "user", "sub": "u-alice", "euo": "euo-acme"}
    bob = {"role": "user", "sub": "u-bob", "euo": "euo-acme"}
    note = f"{acme}/meetings/mtg-acme-1/notes/u-bob"
    assert (await call(http, "DELETE", gw + note, token_for(**alice)))[0] == 403
    assert (await call(http, "DELETE", gw + note, token_for(**bob)))[0] == 204
    assert "u-bob" not in {n["author_id"] for n in data.meetings["mtg-acme-1"]["private_notes"]}
    for path in (f"{acme}/organizers/u-alice/address-book/team@ops.example",
                 f"{acme}/organizers/u-alice/documents/doc-u-alice-1",
                 f"{acme}/organizers/u-alice/meetings/mtg-acme-1"):
        status, _, body = await call(http, "DELETE", gw + path, token_for(**bob))
        assert status == 403, path
        assert (await call(http, "DELETE", gw + path, token_for("admin")))[0] == 403
        assert (await call(http, "DELETE", gw + path, token_for(**alice)))[0] == 204, path
    assert "mtg-acme-1" not in data.meetings
    assert data.organizers["u-alice"]["documents"] == []
    assert "team@ops.example" not in data.organizers["u-alice"]["address_book"]


FARID = {"role": "user", "sub": "u-farid", "euo": "euo-initech"}
GREET = {"role": "user", "sub": "u-greet", "euo": "euo-initech"}
INITECH_ADMIN = {"role": "euo_admin", "sub": "admin@initech", "euo": "euo-initech"}


async def test_an_erasure_cut_off_by_a_killed_gateway_is_failed_and_accepting_again_finishes_it(
        erasable, http, token_for, db, database_url, tmp_path):
    """`gateway serve` is SIGKILLed while an erasure's second delete is under way: what it
    did is recorded (the first delete), and a gateway's request scan later moves the request,
    stuck in `accepted`, to `failed` (audited, by `gateway`), so an admin can accept it again."""
    _, data, _, faults = erasable
    recording = "/euos/euo-initech/users/u-farid/recordings/rec-u-farid-1"
    with holding(faults, "DELETE", recording):
        async with gateway_process(http, {"urls": faults.urls}, database_url, tmp_path) as (
                proc, base):
            request_id = await file_erasure(http, base, token_for, FARID,
                                            ["voicemails", "call_recordings"])
            accepting = asyncio.ensure_future(call(
                http, "PATCH", f"{base}/v1/requests/{request_id}", token_for(**INITECH_ADMIN),
                json={"status": "accepted"}))
            await asyncio.wait_for(faults.arrived.wait(), 20)
            proc.kill()
            proc.wait()
            with pytest.raises(aiohttp.ClientError):
                await accepting
    assert data.voicemails["u-farid"] == [] and data.recordings["u-farid"]
    req = await db.fetchrow("select status from dsr_requests where id = $1::uuid", request_id)
    assert req["status"] == "accepted"
    calls = await db.fetch("select method, path, outcome from dsr_erasure_calls "
                           "where request_id = $1::uuid", request_id)
    assert [(c["method"], c["outcome"]) for c in calls] == [("DELETE", "erased")]   # kept

    settings = gateway_settings(faults.urls, erasure_deadline_s=0.1, backend_deadline_s=0.3,
                                dsr_scan_s=0.1)
    async with running_gateway(settings, database_url) as gw:
        async def failed():
            return await db.fetchval("select status = 'failed' from dsr_requests "
                                     "where id = $1::uuid", request_id)
        assert await wait_for(failed, timeout=10)
        _, _, body = await call(http, "GET", f"{gw}/v1/requests/{request_id}",
                                token_for(**INITECH_ADMIN))
        seen = orjson.loads(body)
        assert seen["transitions"][-1] == {**seen["transitions"][-1], "from": "accepted",
                                           "to": "failed", "by": "gateway"}
        assert seen["resolution"].startswith("interrupted")
        row = await db.fetchrow("select actor_role, route, reason, subject_euo, subject_users "
                                "from audit_log where reason = 'erasure_interrupted' and "
                                "path = $1", f"/v1/requests/{request_id}")
        assert dict(row) == {"actor_role": None, "route": "gateway:/v1/requests/{id}",
                             "reason": "erasure_interrupted", "subject_euo": "euo-initech",
                             "subject_users": ["u-farid"]}
        status, _, body = await call(http, "PATCH", f"{gw}/v1/requests/{request_id}",
                                     token_for(**INITECH_ADMIN), json={"status": "accepted"})
        assert status == 200 and orjson.loads(body)["status"] == "completed", body
    assert data.recordings["u-farid"] == []


async def test_an_erasure_past_its_deadline_calls_no_more_and_is_failed(
        erasable, http, token_for, database_url):
    _, data, seen, faults = erasable
    voicemail = "/euos/euo-initech/users/u-greet/voicemails/vm-u-greet-1"
    deadline_s = 0.2
    settings = gateway_settings(faults.urls, erasure_deadline_s=deadline_s)
    async with running_gateway(settings, database_url) as gw:
        with holding(faults, "DELETE", voicemail):
            accepting = asyncio.ensure_future(
                file_and_accept(http, gw, token_for, GREET, ["voicemails", "call_recordings"],
                                INITECH_ADMIN))
            await asyncio.wait_for(faults.arrived.wait(), 20)
            held_at = time.monotonic()

            async def past():
                return time.monotonic() > held_at + deadline_s
            assert await wait_for(past)
        done, _ = await accepting
    assert done["status"] == "failed"
    outcomes = [(c["method"], c["outcome"], c["reason"]) for c in done["erasure_calls"]]
    assert outcomes == [("DELETE", "erased", None), ("GET", "failed", "erasure_deadline")]
    assert data.voicemails["u-greet"] == [] and data.recordings["u-greet"]   # not called
    assert "call_recordings (erasure_deadline)" in done["resolution"]


async def test_an_erasure_under_way_is_not_accepted_again(erasable, http, token_for, db):
    """While an accepted erasure's calls run, a second admin's accept is 409
    invalid_transition (accepted → accepted is no move of the state table): it would run the
    same erasure twice at once. Retrying is accepting a `failed` one."""
    gw, data, seen, faults = erasable
    voicemail = "/euos/euo-acme/users/u-carla/voicemails/vm-u-carla-1"
    req = await file_erasure(http, gw, token_for, CARLA, ["voicemails"])
    with holding(faults, "DELETE", voicemail):
        first = asyncio.create_task(call(http, "PATCH", f"{gw}/v1/requests/{req}",
                                         token_for(**ACME_ADMIN), json={"status": "accepted"}))
        await asyncio.wait_for(faults.arrived.wait(), 5)
        seen.requests.clear()
        status, _, body = await call(http, "PATCH", f"{gw}/v1/requests/{req}", token_for("staff"),
                                     json={"status": "accepted"})
        assert status == 409 and orjson.loads(body)["error"]["code"] == "invalid_transition"
        assert not seen.requests                     # no second run reached the backends
        faults.release.set()
        status, _, body = await first
    assert status == 200 and orjson.loads(body)["status"] == "completed", body
    assert data.voicemails["u-carla"] == []
    transitions = await db.fetch("select from_status, to_status from dsr_transitions"
                                 " where request_id = $1::uuid order by id", req)
    assert [(t["from_status"], t["to_status"]) for t in transitions] == [
        (None, "open"), ("open", "accepted"), ("accepted", "completed")]
    assert await db.fetchval("select count(*) from dsr_erasure_calls where request_id = $1::uuid",
                             req) == 1


async def test_an_erasure_withdrawn_while_its_calls_run_answers_409_audited(
        erasable, http, token_for, db):
    """The user withdraws while the accepted erasure's calls run: the admin's accept then
    cannot record `completed` (the request left `accepted`) and answers 409
    invalid_transition — audited under the PATCH's request id — never a 502 internal_error
    with a traceback; what was called stays in the erasure calls."""
    gw, data, _, faults = erasable
    recording = "/euos/euo-acme/users/u-carla/recordings/rec-u-carla-1"
    req = await file_erasure(http, gw, token_for, CARLA, ["call_recordings"])
    with holding(faults, "DELETE", recording):
        accept = asyncio.create_task(call(http, "PATCH", f"{gw}/v1/requests/{req}",
                                          token_for(**ACME_ADMIN), json={"status": "accepted"}))
        await asyncio.wait_for(faults.arrived.wait(), 5)
        status, _, body = await call(http, "PATCH", f"{gw}/v1/me/requests/{req}",
                                     token_for(**CARLA), json={"status": "withdrawn"})
        assert status == 200, body
        faults.release.set()
        status, headers, body = await accept
    assert status == 409 and orjson.loads(body)["error"]["code"] == "invalid_transition", body
    rows = await db.fetch("select decision, reason, status from audit_log where request_id = $1"
                          " and route = 'gateway:/v1/requests/{id}' order by seq",
                          headers["X-Request-Id"])
    assert [(r["decision"], r["reason"], r["status"]) for r in rows] == [
        ("allow", None, 200), ("deny", "invalid_transition", 409)]
    _, _, body = await call(http, "GET", f"{gw}/v1/me/requests/{req}", token_for(**CARLA))
    details = orjson.loads(body)
    assert details["status"] == "withdrawn"
    assert [c["outcome"] for c in details["erasure_calls"]] == ["erased"]
