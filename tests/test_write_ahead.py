"""Write-ahead audit: no change reaches a backend without its intent row, whatever fails,
and an outcome nobody can vouch for is said to be unknown, never "failed".

These tests lock the audit table, hold a backend mid-write and make PostgreSQL's commits
wait for a standby that does not exist, so they use a PostgreSQL of their own (started
once for the module); whatever they lock or change is undone in a `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from gateway.app import create_app
from gateway.audit.chain import verify
from gateway.db import POOL
from gateway.demo.backends import meeting_app, telephony_app

from .conftest import (
    call,
    connected,
    gateway_settings,
    private_database,
    running_gateway,
    start_site,
    wait_for,
)

pytestmark = pytest.mark.slow

COMMIT_TIMEOUT_S = 1.0
USERS = [("euo-acme", "u-alice"), ("euo-acme", "u-bob"), ("euo-acme", "u-carla"),
         ("euo-globex", "u-eva")]


@pytest_asyncio.fixture(scope="module")
async def private_db(tmp_path_factory, demo):
    """A PostgreSQL for this module alone (its audit table gets locked), demo contracts seeded."""
    async with private_database(tmp_path_factory.mktemp("write-ahead-db"), demo) as server:
        yield server.dsn


class Recording:
    """Demo backends that note each change they apply (its X-Request-Id) and can hold a
    change until the test lets it go."""

    def __init__(self):
        self.applied: list[str] = []       # request ids of changes the backend carried out
        self.arrived = asyncio.Event()     # a change reached the backend
        self.hold: asyncio.Event | None = None

    def middleware(self):
        @web.middleware
        async def record(request, handler):
            if request.method in ("GET", "HEAD"):
                return await handler(request)
            self.arrived.set()
            if self.hold is not None:
                await self.hold.wait()
            response = await handler(request)
            if response.status < 300:
                self.applied.append(request.headers["X-Request-Id"])
            return response
        return record


@pytest_asyncio.fixture
async def recording(demo):
    backend = Recording()
    runners, urls = [], {}
    for service, make in (("telephony", telephony_app), ("meeting", meeting_app)):
        runner, port = await start_site(make(demo, [backend.middleware()]), "127.0.0.1", 0)
        runners.append(runner)
        urls[service] = f"http://127.0.0.1:{port}"
    backend.urls = urls
    yield backend
    for runner in runners:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def audit_locked(dsn: str):
    """audit_log locked against every writer until the block ends."""
    async with connected(dsn) as locker:
        lock = locker.transaction()
        await lock.start()
        try:
            await locker.execute("lock table audit_log in access exclusive mode")
            yield
        finally:
            await lock.rollback()


def user_token(token_for, euo: str, sub: str) -> str:
    return token_for(role="user", sub=sub, euo=euo)


async def patch_self(http, gw, token_for, euo: str, sub: str, language: str):
    url = f"{gw}/telephony/euos/{euo}/users/{sub}"
    return await call(http, "PATCH", url, user_token(token_for, euo, sub),
                      json={"language": language})


async def test_no_write_reaches_a_backend_without_its_intent_row(recording, private_db, http,
                                                                 token_for):
    """Under a write load, the audit table is locked twice for a while: every change the
    backend carried out has its intent row (committed before it was sent) and its outcome;
    while the log cannot be written no change is sent at all, and the callers get 503
    audit_unavailable."""
    settings = gateway_settings(recording.urls, audit_commit_timeout_s=COMMIT_TIMEOUT_S)
    answered: list[tuple[int, str, str]] = []
    stop = asyncio.Event()

    async def writer(n: int):
        euo, sub = USERS[n % len(USERS)]
        i = 0
        while not stop.is_set():
            i += 1
            status, headers, body = await patch_self(http, gw, token_for, euo, sub,
                                                     ("en", "fr", "de")[i % 3])
            code = orjson.loads(body)["error"]["code"] if status >= 400 else ""
            answered.append((status, code, headers["X-Request-Id"]))

    async with running_gateway(settings, private_db) as gw:
        load = [asyncio.create_task(writer(n)) for n in range(8)]
        try:
            async def applied():
                return bool(recording.applied)

            async def refused():     # the writer has failed: every write is refused at once
                return any(code == "audit_unavailable" for _, code, _ in answered[-8:])

            async def more():
                return len(answered) >= mark + 20
            for _ in range(2):
                assert await wait_for(applied, timeout=10)
                async with audit_locked(private_db):
                    assert await wait_for(refused, timeout=10)
                    sent_while_locked = len(recording.applied)
                    mark = len(answered)
                    assert await wait_for(more, timeout=10)
                    assert len(recording.applied) == sent_while_locked
                    assert all(code == "audit_unavailable" for status, code, _ in answered[mark:])
                recording.applied.clear()
        finally:
            stop.set()
            await asyncio.gather(*load)
    statuses = {status for status, _, _ in answered}
    assert statuses <= {200, 503}, statuses
    async with connected(private_db) as conn:
        intents = {r["request_id"] for r in await conn.fetch(
            "select request_id from audit_log where phase = 'intent' and method = 'PATCH'")}
        outcomes = {r["request_id"]: (r["decision"], r["status"]) for r in await conn.fetch(
            "select request_id, decision, status from audit_log where phase = 'outcome'")}
        ok = [rid for status, _, rid in answered if status == 200]
        assert ok and all(rid in intents and outcomes[rid] == ("allow", 200) for rid in ok)
        assert all(rid in intents for rid in recording.applied)
        assert (await verify(conn)).ok


async def test_an_outcome_that_cannot_be_written_is_outcome_unknown_and_shown_so(
        recording, private_db, http, token_for):
    """The intent commits and the backend is called; while it works the audit table is
    locked, so the outcome cannot be written: the caller gets 503 outcome_unknown (not
    audit_unavailable: the change may well be made), and /v1/audit and verify show the
    intent as "outcome unknown"."""
    settings = gateway_settings(recording.urls, audit_commit_timeout_s=COMMIT_TIMEOUT_S)
    recording.hold = asyncio.Event()
    async with running_gateway(settings, private_db) as gw:
        write = asyncio.create_task(patch_self(http, gw, token_for, "euo-acme", "u-carla", "nl"))
        try:
            await asyncio.wait_for(recording.arrived.wait(), 10)
            async with audit_locked(private_db):
                recording.hold.set()
                status, headers, body = await write
        finally:
            recording.hold.set()
        assert status == 503, body
        error = orjson.loads(body)["error"]
        assert error["code"] == "outcome_unknown"
        request_id = headers["X-Request-Id"]
        assert request_id in error["message"]
        assert recording.applied == [request_id]        # the backend did change it

        async def listed():
            status, _, body = await call(http, "GET", gw + "/v1/audit?subject_user=u-carla",
                                         token_for("staff"))
            return status == 200 and [r for r in orjson.loads(body)["rows"]
                                      if r["request_id"] == request_id]
        rows = await wait_for(listed, timeout=10)
        assert [(r["phase"], r["outcome"]) for r in rows] == [("intent", "unknown")]
        status, _, body = await call(http, "GET", gw + "/v1/audit/verify", token_for("staff"))
        report = orjson.loads(body)
        assert status == 200 and report["ok"]
        assert request_id in {u["request_id"] for u in report["outcome_unknown"]}


async def test_a_lost_commit_confirmation_is_outcome_unknown_and_the_key_tells_what_happened(
        recording, private_db, http, token_for):
    """A contract change whose COMMIT is never confirmed (synchronous replication to a
    standby that does not exist) is answered 503 outcome_unknown; it did commit, and the
    same request with the same Idempotency-Key says so instead of changing it again."""
    euo = f"euo-lost-{uuid.uuid4().hex[:6]}"
    key = uuid.uuid4().hex
    staff = token_for("staff")
    settings = gateway_settings(recording.urls, audit_commit_timeout_s=COMMIT_TIMEOUT_S)
    async with running_gateway(settings, private_db) as gw, connected(private_db) as admin:
        try:
            await admin.execute("alter system set synchronous_standby_names = 'nobody'")
            await admin.execute("select pg_reload_conf()")
            assert await wait_for(lambda: _commits_wait(private_db), timeout=10)
            status, headers, body = await call(
                http, "PUT", f"{gw}/v1/admin/euos/{euo}", staff,
                json={"partner_id": "p-northwind"}, headers={"Idempotency-Key": key})
        finally:
            await admin.execute("alter system reset synchronous_standby_names")
            await admin.execute("select pg_reload_conf()")
        assert status == 503, body
        assert orjson.loads(body)["error"]["code"] == "outcome_unknown"
        first = headers["X-Request-Id"]
        # it committed locally before waiting for the standby: once the wait is called
        # off, the change is there

        async def landed():
            return await admin.fetchval("select partner_id from contracts where euo_id = $1",
                                        euo) == "p-northwind"
        assert await wait_for(landed, timeout=10)

        async def retried():
            got = await call(http, "PUT", f"{gw}/v1/admin/euos/{euo}", staff,
                             json={"partner_id": "p-northwind"}, headers={"Idempotency-Key": key})
            return got if got[0] != 503 else None
        status, _, body = await wait_for(retried, timeout=10)
        assert status == 409, body
        error = orjson.loads(body)["error"]
        assert error["code"] == "idempotency_answer_lost" and first in error["message"]
        assert await admin.fetchval("select count(*) from contract_history where euo_id = $1",
                                    euo) == 1


async def _commits_wait(dsn: str) -> bool:
    """Whether a commit now waits for the (missing) synchronous standby."""
    async with connected(dsn) as conn:
        try:
            async with asyncio.timeout(0.5):
                await conn.execute("create temp table probe (x int)")
        except TimeoutError:
            return True
    return False


async def test_an_idempotency_key_replays_the_first_answer_and_never_changes_twice(
        recording, private_db, http, token_for):
    """The same write with the same key gets the first answer again (marked replayed) and
    changes nothing more; the key with another body is 422; a malformed key is 400; another
    caller's identical key is theirs alone."""
    euo = f"euo-idem-{uuid.uuid4().hex[:6]}"
    key = {"Idempotency-Key": uuid.uuid4().hex}
    staff = token_for("staff")
    url = f"/v1/admin/euos/{euo}"
    settings = gateway_settings(recording.urls)
    async with running_gateway(settings, private_db) as gw, connected(private_db) as db:
        body = {"partner_id": "p-northwind", "contract_end": "2030-01-01"}
        first = await call(http, "PUT", gw + url, staff, json=body, headers=key)
        assert first[0] == 200
        again = await call(http, "PUT", gw + url, staff, json=body, headers=key)
        assert again[0] == 200 and again[2] == first[2]
        assert again[1]["Idempotency-Replayed"] == "true"
        assert again[1]["X-Original-Request-Id"] == first[1]["X-Request-Id"]
        assert await db.fetchval("select count(*) from contract_history where euo_id = $1",
                                 euo) == 1
        replay = await db.fetchrow("select decision, reason from audit_log where request_id = $1",
                                   again[1]["X-Request-Id"])
        assert tuple(replay) == ("allow", "idempotent_replay")
        other = await call(http, "PUT", gw + url, staff, json=dict(body, partner_id="p-contoso"),
                           headers=key)
        assert other[0] == 422
        assert orjson.loads(other[2])["error"]["code"] == "idempotency_key_reused"
        for bad in ("", "a b", "x" * 129, "é"):
            got = await call(http, "PUT", gw + url, staff, json=body,
                             headers={"Idempotency-Key": bad})
            assert got[0] == 400 and orjson.loads(got[2])["error"]["code"] == "bad_idempotency_key"
        # the same key from someone else is a request of its own
        euo2 = f"euo-idem-{uuid.uuid4().hex[:6]}"
        got = await call(http, "PUT", f"{gw}/v1/admin/euos/{euo2}",
                         token_for("staff", sub="staff-other"), json=body, headers=key)
        assert got[0] == 200 and "Idempotency-Replayed" not in got[1]
        assert await db.fetchval("select partner_id from contracts where euo_id = $1",
                                 euo) == "p-northwind"


async def test_a_download_is_written_ahead_and_its_outcome_says_what_left(
        private_db, http, token_for, backends):
    """A file is its intent row before the first byte and an outcome row after: the bytes
    delivered, and reason `cut` when the client went away early or the backend trickled
    past GATEWAY_STREAM_DEADLINE_S."""
    wav = b"RIFF" + b"\0" * (8 << 20)

    async def file(request):
        if request.path.endswith("/vm-slow"):
            response = web.StreamResponse(headers={"Content-Type": "audio/wav"})
            response.content_length = 1000
            await response.prepare(request)
            for _ in range(1000):
                await response.write(b"\0")
                await asyncio.sleep(0.05)
            return response
        return web.Response(body=wav, content_type="audio/wav")
    app = web.Application()
    app.router.add_get("/{tail:.*}", file)
    runner, port = await start_site(app, "127.0.0.1", 0)
    settings = gateway_settings(dict(backends["urls"], telephony=f"http://127.0.0.1:{port}"),
                                stream_deadline_s=1.0)
    base = "/telephony/euos/euo-acme/users/u-alice/voicemails/"
    alice = token_for("alice")
    try:
        async with running_gateway(settings, private_db) as gw, connected(private_db) as db:
            status, headers, body = await call(http, "GET", gw + base + "vm-1", alice)
            assert status == 200 and body == wav
            whole = headers["X-Request-Id"]
            async with http.get(gw + base + "vm-2",
                                headers={"Authorization": f"Bearer {alice}"}) as r:
                left = r.headers["X-Request-Id"]
                await r.content.readexactly(64 << 10)
                r.close()                                 # the client goes away
            with contextlib.suppress(Exception):
                await call(http, "GET", gw + base + "vm-slow", alice)

            async def rows(request_id):
                found = await db.fetch("select phase, bytes, reason, data_sets from audit_log "
                                       "where request_id = $1 order by at, seq", request_id)
                return [tuple(r) for r in found] if len(found) == 2 else None
            assert await wait_for(lambda: rows(whole), timeout=10) == [
                ("intent", len(wav), None, ["voicemails"]),
                ("outcome", len(wav), None, ["voicemails"])]
            (intent, outcome) = await wait_for(lambda: rows(left), timeout=10)
            assert intent[:3] == ("intent", len(wav), None)
            assert outcome[0] == "outcome" and outcome[2] == "cut" and outcome[1] < len(wav)
            slow = await db.fetchval("select request_id from audit_log where path like '%vm-slow'"
                                     " and phase = 'intent'")
            (_, outcome) = await wait_for(lambda: rows(slow), timeout=10)
            assert outcome[0] == "outcome" and outcome[2] == "cut" and outcome[1] < 1000
    finally:
        await runner.cleanup()


async def test_the_audit_writer_does_not_use_a_connection_the_server_closed(
        recording, private_db, http, token_for):
    """After the database ends the writer's connection (a restart, a terminated backend),
    the next request is served: the writer sees the connection is closed and takes a new
    one instead of failing one batch (and its callers) on it."""
    settings = gateway_settings(recording.urls, audit_commit_timeout_s=COMMIT_TIMEOUT_S)
    alice = "/telephony/euos/euo-acme/users/u-alice"
    async with running_gateway(settings, private_db) as gw, connected(private_db) as admin:
        assert (await call(http, "GET", gw + alice, token_for("alice")))[0] == 200
        pids = [r[0] for r in await admin.fetch(
            "select pid from pg_stat_activity where query like '%audit_append%'"
            " and pid <> pg_backend_pid()")]
        assert pids
        await admin.execute("select pg_terminate_backend(p) from unnest($1::int[]) p", pids)

        async def gone():
            return not await admin.fetchval(
                "select count(*) from pg_stat_activity where pid = any($1::int[])", pids)
        assert await wait_for(gone, timeout=10)
        status, _, body = await call(http, "GET", gw + alice, token_for("alice"))
        assert status == 200, body


async def test_every_connection_commits_durably_whatever_the_servers_default(
        recording, private_db, http):
    """A server whose default is synchronous_commit=off does not make the gateway's commits
    asynchronous: every connection sets it back to on. A server with fsync off is not
    ready (`database_not_durable`)."""
    async with connected(private_db) as admin:
        try:
            await admin.execute("alter system set synchronous_commit = off")
            await admin.execute("select pg_reload_conf()")
            assert await wait_for(lambda: _setting(private_db), timeout=10) == "off"
            app = create_app(gateway_settings(recording.urls), private_db)
            runner, _ = await start_site(app, "127.0.0.1", 0)
            try:
                async with app[POOL].acquire() as conn:
                    assert await conn.fetchval("show synchronous_commit") == "on"
            finally:
                await runner.cleanup()
            await admin.execute("alter system set fsync = off")
            await admin.execute("select pg_reload_conf()")

            async def fsync_off():
                async with connected(private_db) as conn:
                    return await conn.fetchval("show fsync") == "off"
            assert await wait_for(fsync_off, timeout=10)
            async with running_gateway(gateway_settings(recording.urls), private_db) as gw:
                async def not_durable():
                    status, _, body = await call(http, "GET", gw + "/readyz")
                    return status == 503 and "database_not_durable" in orjson.loads(body)["reasons"]
                assert await wait_for(not_durable, timeout=10)
        finally:
            await admin.execute("alter system reset synchronous_commit")
            await admin.execute("alter system reset fsync")
            await admin.execute("select pg_reload_conf()")


async def _setting(dsn: str) -> str:
    async with connected(dsn) as conn:
        return await conn.fetchval("show synchronous_commit")
