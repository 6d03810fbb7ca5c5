"""Erasure that acts: accepting an erasure request calls the delete routes the route table
declares for its data sets on real loopback backends (demo data of this module's own, so
nothing another test reads is deleted), records each call's outcome, and says what no
backend can erase. A backend that fails leaves the request `failed`, nothing of that data
set claimed erased; accepting again retries."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import aiohttp
import asyncpg
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from gateway.demo import data as demo_data
from gateway.demo.backends import meeting_app, telephony_app
from gateway.demo.run import start_site
from gateway.policy.catalog import PolicyError
from gateway.policy.catalog_files import load_catalog
from gateway.policy.erasers import load_erasers

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
        self.ignored: set[tuple[str, str]] = set()     # answered 204, nothing done
        self.held: set[tuple[str, str]] = set()
        self.arrived = asyncio.Event()     # a held call has come in
        self.release = asyncio.Event()
        self.urls: dict[str, str] = {}

    def middleware(self):
        @web.middleware
        async def fail(request, handler):
            if (request.method, request.path) in self.failing:
                return web.json_response({"error": "disk full"}, status=500)
            if (request.method, request.path) in self.ignored:
                return web.Response(status=204)
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
                                    "address_book", "faxes_outgoing", "user_name"])
    assert done["status"] == "completed"
    deletes = sorted(p for m, p, _ in seen.requests if m == "DELETE")
    assert deletes == sorted([
        "/euos/euo-globex/users/u-dirk/voicemails/vm-u-dirk-1",
        "/euos/euo-globex/users/u-dirk/recordings/rec-u-dirk-1",
        "/accounts/euo-globex/organizers/u-dirk/documents/doc-u-dirk-1",
        "/accounts/euo-globex/organizers/u-dirk/address-book/client3@customer.example",
        "/accounts/euo-globex/organizers/u-dirk/address-book/team@ops.example",
    ])
    # really gone from the backends, and nothing else
    assert data.voicemails["u-dirk"] == [] and data.recordings["u-dirk"] == []
    assert data.organizers["u-dirk"]["documents"] == []
    assert data.organizers["u-dirk"]["address_book"] == []
    assert "mtg-globex-1" in data.meetings
    assert data.faxes["u-dirk"] and data.users["u-dirk"]["first_name"] == "Dirk"
    # every call's outcome, and what no backend can erase, in the answer and the database
    outcomes = {(c["method"], c["path"]): c["outcome"] for c in done["erasure_calls"]}
    assert outcomes[("DELETE", "/meeting/accounts/euo-globex/organizers/u-dirk/address-book/"
                               "team@ops.example")] == "erased"
    assert set(outcomes.values()) == {"erased"} and len(outcomes) == 5
    assert "cannot be erased through a backend" in done["resolution"]
    assert "faxes_outgoing, user_name" in done["resolution"]
    assert "voicemails (1 item)" in done["resolution"]
    assert "address_book (2 items)" in done["resolution"]
    assert "still held" not in done["resolution"]
    assert [(t["from"], t["to"]) for t in done["transitions"]] == [
        (None, "open"), ("open", "accepted"), ("accepted", "completed")]
    rows = await db.fetch("select method, path, route, decision, reason, status, actor_role, "
                          "subject_users, phase, access from audit_log where request_id = $1 "
                          "order by at, seq", request_id)
    deleted = [r for r in rows if r["method"] == "DELETE"]
    # each DELETE written ahead: its intent's row, then its outcome's
    intents = [r for r in deleted if r["phase"] == "intent"]
    assert len(intents) == 5 and {(r["decision"], r["status"]) for r in intents} == {("allow", 0)}
    ended = [r for r in deleted if r["phase"] == "outcome"]
    # every call of the erasure reads "erased for request N", never as data served
    erasing = [r for r in rows if r["route"] != "gateway:/v1/requests/{id}"]
    assert {(r["access"], r["reason"]) for r in erasing} == {("acted_upon", f"erasure:{done['id']}")}
    assert len(ended) == 5 and {(r["decision"], r["status"]) for r in ended} == {("allow", 204)}
    assert sorted(r["path"] for r in intents) == sorted(r["path"] for r in ended)
    assert {r["actor_role"] for r in rows} == {"euo_admin"}           # who caused it
    assert all(r["subject_users"] == ["u-dirk"] for r in deleted)
    patches = [r for r in rows if r["route"] == "gateway:/v1/requests/{id}"]
    assert len(patches) == 2                                          # accepted, completed
    assert await db.fetchval("select count(*) from dsr_erasure_calls where request_id = $1::uuid",
                             done["id"]) == 5


ALICE = {"role": "user", "sub": "u-alice", "euo": "euo-acme"}
BOB = {"role": "user", "sub": "u-bob", "euo": "euo-acme"}
MEETING = ["meeting_list", "meeting_topic", "meeting_agenda", "meeting_invitees",
           "meeting_documents", "whiteboard_drawings", "meeting_minutes", "chat_messages",
           "participant_name", "participant_email", "private_notes"]


@pytest.fixture
def fresh(erasable):
    """The backends' data as seeded, before and after the test (it erases shared meetings)."""
    _, data, seen, _ = erasable

    def reset():
        seeded = demo_data.build()
        for f in dataclasses.fields(data):
            setattr(data, f.name, getattr(seeded, f.name))
    reset()
    seen.requests.clear()
    yield data
    reset()


def deletes_seen(seen: Seen) -> list[str]:
    return sorted(p for m, p, _ in seen.requests if m == "DELETE")


async def test_an_erasure_of_part_of_a_meeting_deletes_nothing_more(
        erasable, fresh, http, token_for):
    """u-alice erases `meeting_minutes` of the meeting she organises: its only delete route
    removes the whole meeting (topic, agenda, everyone's chat and private notes), so it is
    not called; the request is not completed and says the item needs a wider erasure."""
    gw, data, seen, _ = erasable
    done, _ = await file_and_accept(http, gw, token_for, ALICE, ["meeting_minutes"], ACME_ADMIN)
    assert deletes_seen(seen) == []
    meeting = data.meetings["mtg-acme-1"]
    assert meeting["minutes"] == "Budget approved." and meeting["topic"] == "Weekly planning"
    # Alice's, Bob's, Carla's and a guest's messages; the three users' notes
    assert len(meeting["chat"]) == 4 and len(meeting["private_notes"]) == 3
    assert done["status"] == "failed"
    path = "/meeting/accounts/euo-acme/organizers/u-alice/meetings/mtg-acme-1"
    assert [(c["method"], c["path"], c["outcome"], c["reason"]) for c in done["erasure_calls"]
            ] == [("DELETE", path, "needs_wider", "needs_wider_erasure")]
    assert "meeting_minutes (1 item" not in done["resolution"]
    assert "needs a wider erasure" in done["resolution"]
    assert (f"meeting_minutes in {path}, which also deletes chat_messages, meeting_agenda, "
            "meeting_documents, meeting_invitees, meeting_list, meeting_topic, participant_email, "
            "participant_name, private_notes, whiteboard_drawings and other people's "
            "chat_messages, participant_email, participant_name, private_notes"
            ) in done["resolution"], done["resolution"]
    assert "still held after the erasure (read back): meeting_minutes (1)" in done["resolution"]


async def test_an_erasure_finds_the_subjects_part_in_meetings_of_others(
        erasable, fresh, http, token_for):
    """u-bob organises no meeting but took part in u-alice's: his chat message and his
    participation are found through the participations route and deleted field by field;
    the meeting and everyone else's part of it stay."""
    gw, data, seen, _ = erasable
    done, _ = await file_and_accept(http, gw, token_for, BOB,
                                    ["chat_messages", "participant_name", "participant_email"],
                                    ACME_ADMIN)
    assert deletes_seen(seen) == ["/accounts/euo-acme/meetings/mtg-acme-1/chat/u-bob",
                                  "/accounts/euo-acme/meetings/mtg-acme-1/participants/u-bob"]
    meeting = data.meetings["mtg-acme-1"]
    assert [c["author_id"] for c in meeting["chat"]] == ["u-alice", "u-carla", None]  # a guest
    # (and the two without an account: a guest and a dial-in caller)
    assert [p["name"] for p in meeting["participants"] if p["user_id"]] == ["Alice Martin",
                                                                           "Carla Dubois"]
    assert {n["author_id"] for n in meeting["private_notes"]} == {"u-alice", "u-bob", "u-carla"}
    assert done["status"] == "completed", done["resolution"]
    assert done["resolution"] == (
        "erased through the backends: chat_messages (1 item), participant_email (1 item), "
        "participant_name (1 item); read back afterwards, nothing remains of chat_messages, "
        "participant_email, participant_name")
    assert [c["outcome"] for c in done["erasure_calls"]] == ["erased", "erased"]


async def test_the_organizer_erasing_a_whole_meeting_says_whose_data_went_with_it(
        erasable, fresh, http, token_for):
    """Named whole, the meeting u-alice organises is deleted, and with it the others' part
    of it (the data-set table keeps it until the organizer deletes the meeting): the
    resolution names whose."""
    gw, data, seen, _ = erasable
    done, _ = await file_and_accept(http, gw, token_for, ALICE, MEETING, ACME_ADMIN)
    assert done["status"] == "completed", done["resolution"]
    assert "mtg-acme-1" not in data.meetings
    assert "/accounts/euo-acme/organizers/u-alice/meetings/mtg-acme-1" in deletes_seen(seen)
    assert data.participations["u-bob"] == [] and data.participations["u-alice"] == []
    assert ("with /meeting/accounts/euo-acme/organizers/u-alice/meetings/mtg-acme-1 went other "
            "people's chat_messages, participant_email, participant_name, private_notes"
            ) in done["resolution"]
    assert "of u-bob, u-carla" in done["resolution"]
    assert "meeting_minutes (1 item)" in done["resolution"]


async def test_a_participant_deletes_their_own_chat_and_participation_and_nobody_elses(
        erasable, fresh, http, token_for):
    """The field-level delete routes, self-service through the gateway: only the user they
    name may call them (the organizer cannot take a participant's part away); a second
    call finds nothing (404)."""
    gw, data, _, _ = erasable
    meeting = "/meeting/accounts/euo-acme/meetings/mtg-acme-1"
    for part in ("chat", "participants"):
        path = f"{gw}{meeting}/{part}/u-bob"
        assert (await call(http, "DELETE", path, token_for(**ALICE)))[0] == 403
        assert (await call(http, "DELETE", path, token_for(**BOB)))[0] == 204
        assert (await call(http, "DELETE", path, token_for(**BOB)))[0] == 404
    assert "u-bob" not in {c["author_id"] for c in data.meetings["mtg-acme-1"]["chat"]}
    assert "Bob Peeters" not in {p["name"] for p in data.meetings["mtg-acme-1"]["participants"]}
    # his private note is still his there: the participation stays listed, without a name
    assert data.participations["u-bob"] == [{"id": "mtg-acme-1", "name": None, "email": None}]


async def test_a_delete_the_backend_did_not_carry_out_is_counted_and_not_completed(
        erasable, fresh, http, token_for):
    """The backend answers 204 to the DELETE but keeps the voicemail: the count after the
    deletes finds it, and the request is not completed."""
    gw, data, _, faults = erasable
    voicemail = "/euos/euo-acme/users/u-carla/voicemails/vm-u-carla-1"
    faults.ignored.add(("DELETE", voicemail))
    try:
        done, _ = await file_and_accept(http, gw, token_for, CARLA, ["voicemails"], ACME_ADMIN)
    finally:
        faults.ignored.clear()
    assert data.voicemails["u-carla"]
    assert done["status"] == "failed"
    assert "still held after the erasure (read back): voicemails (1)" in done["resolution"]


OTHERS = "      others: [chat_messages, participant_name, participant_email, private_notes]"
SUBJECT_END = "                participant_email, private_notes]\n"


@pytest.mark.parametrize("shipped, changed, refused", [
    # an entry may not take another person's data the data-set table does not make the
    # subject's to delete (connection statistics last 180 days, not until the organizer
    # deletes the meeting)
    (OTHERS, OTHERS.replace("]", ", connection_statistics]"),
     "deletes other people's connection_statistics, which the data-set table does not make "
     "theirs to delete"),
    # nor leave out what its delete route removes: the call would take more than it says
    (SUBJECT_END + OTHERS, "                private_notes]\n"
     + OTHERS.replace(" participant_email,", ""), "deletes: must name them all"),
])
def test_what_an_erasure_entry_says_its_delete_removes_is_checked_on_load(
        policy_dir, shipped, changed, refused):
    routes = policy_dir / "routes.yaml"
    text = routes.read_text()
    assert text.count(shipped) == 1
    routes.write_text(text.replace(shipped, changed))
    with pytest.raises(PolicyError, match=refused):
        load_erasers(policy_dir, load_catalog(policy_dir))
    routes.write_text(text)
    assert load_erasers(policy_dir, load_catalog(policy_dir))      # as shipped: loads


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
    rows = await db.fetch("select decision, reason, phase from audit_log where request_id = $1 "
                          "and method = 'DELETE' and path like '%recordings%' order by at, seq",
                          request_id)
    assert [(r["decision"], r["phase"], r["reason"]) for r in rows] == [
        ("allow", "intent", f"erasure:{done['id']}"), ("error", "outcome", "backend_error")]

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
    """`gateway serve` is SIGKILLed while an erasure's second DELETE is under way at the
    backend, which then carries it out. The DELETE was written ahead: its intent's audit
    row and its erasure call (outcome `unknown`) were committed before it was sent. The
    request scan later moves the request, stuck in `accepted`, to `failed` (audited, by
    `gateway`) saying a DELETE's outcome is unknown, and accepting again finishes it and
    reports that DELETE."""
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
    async def carried_out():           # the backend goes on with the DELETE it was sent
        return data.recordings["u-farid"] == []
    assert await wait_for(carried_out, timeout=10)
    assert data.voicemails["u-farid"] == []
    req = await db.fetchrow("select status from dsr_requests where id = $1::uuid", request_id)
    assert req["status"] == "accepted"
    calls = await db.fetch("select method, path, outcome from dsr_erasure_calls "
                           "where request_id = $1::uuid order by id", request_id)
    assert [(c["method"], c["path"], c["outcome"]) for c in calls] == [
        ("DELETE", "/telephony/euos/euo-initech/users/u-farid/voicemails/vm-u-farid-1", "erased"),
        ("DELETE", "/telephony" + recording, "unknown")]          # written ahead, no outcome
    intent = await db.fetchrow(
        "select request_id, decision, phase, status, actor_role, subject_users, data_sets "
        "from audit_log where path = $1 and method = 'DELETE'", "/telephony" + recording)
    assert dict(intent) | {"request_id": None} == {
        "request_id": None, "decision": "allow", "phase": "intent", "status": 0,
        "actor_role": "euo_admin", "subject_users": ["u-farid"], "data_sets": ["call_recordings"]}
    accepted_in = await db.fetchval(
        "select request_id from audit_log where path = $1 and status = 200",
        f"/v1/requests/{request_id}")
    assert intent["request_id"] == accepted_in                  # under the accept's request id

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
        assert seen["resolution"].endswith(
            "; 1 DELETE sent with no recorded outcome (outcome unknown): /telephony" + recording)
        row = await db.fetchrow("select actor_role, route, reason, subject_euo, subject_users "
                                "from audit_log where reason = 'erasure_interrupted' and "
                                "path = $1", f"/v1/requests/{request_id}")
        assert dict(row) == {"actor_role": None, "route": "gateway:/v1/requests/{id}",
                             "reason": "erasure_interrupted", "subject_euo": "euo-initech",
                             "subject_users": ["u-farid"]}
    settings = gateway_settings(faults.urls)
    async with running_gateway(settings, database_url) as gw:
        status, _, body = await call(http, "PATCH", f"{gw}/v1/requests/{request_id}",
                                     token_for(**INITECH_ADMIN), json={"status": "accepted"})
    again = orjson.loads(body)
    assert status == 200 and again["status"] == "completed", body
    assert again["resolution"] == (
        "read back afterwards, nothing remains of call_recordings, voicemails; an earlier run's "
        "DELETE has no recorded outcome (the gateway stopped while it was under way; what "
        "remains was counted in this run): /telephony" + recording)
    assert data.recordings["u-farid"] == []


async def test_no_delete_is_sent_while_its_intent_cannot_be_committed(
        erasable, fresh, http, token_for, db, database_url):
    """With dsr_erasure_calls locked, a DELETE's intent cannot commit within the audit
    deadline: the backend receives no DELETE at all, nothing is claimed erased, and the
    request is not completed."""
    _, data, seen, faults = erasable
    settings = gateway_settings(faults.urls, audit_commit_timeout_s=1.0)
    async with running_gateway(settings, database_url) as gw:
        req = await file_erasure(http, gw, token_for, CARLA, ["voicemails"])
        seen.requests.clear()
        async with db.acquire() as locker:
            lock = locker.transaction()
            await lock.start()
            accepting = None
            try:
                await locker.execute("lock table dsr_erasure_calls in exclusive mode")
                accepting = asyncio.ensure_future(call(
                    http, "PATCH", f"{gw}/v1/requests/{req}", token_for(**ACME_ADMIN),
                    json={"status": "accepted"}))
                await asyncio.wait({accepting}, timeout=10)
                assert deletes_seen(seen) == []
                assert accepting.done()           # not waiting for the lock: refused
                assert "/euos/euo-acme/users/u-carla/voicemails" in seen.paths()   # listed
            finally:
                await lock.rollback()
                if accepting is not None:
                    status, _, body = await accepting
        assert status in (200, 503), body
    assert data.voicemails["u-carla"]
    assert await db.fetchval("select status from dsr_requests where id = $1::uuid",
                             req) != "completed"
    assert await db.fetchval("select count(*) from dsr_erasure_calls where request_id = $1::uuid",
                             req) == 0


async def test_an_erasure_calls_intent_gets_its_outcome_once_and_nothing_else_changes(
        erasable, http, token_for, db):
    """The database holds dsr_erasure_calls to write-ahead (sql/031): an `unknown` row (an
    intent) becomes erased, not_held or failed once; no outcome, path or data set of a row
    changes after that, whoever updates it."""
    gw, *_ = erasable
    req = await file_erasure(http, gw, token_for, EVA, ["voicemails"])
    row = await db.fetchval(
        "insert into dsr_erasure_calls (request_id, data_sets, method, path, outcome) "
        "values ($1::uuid, '{voicemails}', 'DELETE', '/telephony/x', 'unknown') returning id", req)
    for change in ("outcome = 'needs_wider'", "path = '/telephony/y', outcome = 'erased'"):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(f"update dsr_erasure_calls set {change} where id = $1", row)
    await db.execute("update dsr_erasure_calls set outcome = 'erased', status = 204 "
                     "where id = $1", row)
    assert await db.fetchval("select outcome_at is not null from dsr_erasure_calls "
                             "where id = $1", row)
    for change in ("outcome = 'failed'", "status = 500", "outcome = 'unknown'"):
        with pytest.raises(asyncpg.CheckViolationError):
            await db.execute(f"update dsr_erasure_calls set {change} where id = $1", row)


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
