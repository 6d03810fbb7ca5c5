"""Webhooks: signed (the receiver here recomputes the HMAC itself), retried with backoff
after a receiver failure, every attempt logged, never in the way of the request that caused
them, and not lost when the gateway is killed before it could deliver."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
import uuid

import asyncpg
import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from gateway.demo.run import start_site
from gateway.webhooks import Webhooks

from .conftest import (
    call,
    free_port,
    gateway_process,
    gateway_settings,
    move_due_date,
    running_gateway,
    wait_for,
)
from .roles import migrated_with_grants, two_roles

SECRET = b"webhook-test-key-" + b"k" * 32           # a test key, not a secret


class Receiver:
    """A webhook receiver on loopback: checks each signature, can be told to fail."""

    def __init__(self, secret: bytes = SECRET):
        self.secret = secret
        self.events: list[dict] = []              # verified deliveries
        self.attempts: list[tuple[str, int]] = []   # (event, status answered)
        self.fail: dict[str, int] = {}            # user sub -> deliveries to refuse

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        stamp = request.headers.get("X-Gateway-Timestamp", "")
        given = request.headers.get("X-Gateway-Signature", "")
        expected = "v1=" + hmac.new(self.secret, stamp.encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
        fresh = stamp.isdigit() and abs(time.time() - int(stamp)) < 300
        event = orjson.loads(body)
        status = 204
        if not (hmac.compare_digest(given, expected) and fresh):
            status = 401
        elif self.fail.get(event.get("request", {}).get("user_sub"), 0) > 0:
            self.fail[event["request"]["user_sub"]] -= 1
            status = 500
        self.attempts.append((event["event"], status))
        if status == 204:
            self.events.append(event)
        return web.Response(status=status)

    def about(self, request_id: str, event: str | None = None) -> list[dict]:
        """The events about this request (or break-glass grant)."""
        return [e for e in self.events if e.get("request", e.get("break_glass"))["id"] == request_id
                and (event is None or e["event"] == event)]


@contextlib.asynccontextmanager
async def receiving(port: int = 0, secret: bytes = SECRET):
    receiver = Receiver(secret)
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner, port = await start_site(app, "127.0.0.1", port)
    try:
        yield receiver, f"http://127.0.0.1:{port}/hooks"
    finally:
        await runner.cleanup()


def secret_file(tmp_path, secret: bytes = SECRET):
    path = tmp_path / "webhook.key"
    path.write_bytes(secret + b"\n")
    return path


def hook_settings(backends, url: str, tmp_path, **changes):
    """Settings posting webhooks to `url`, signed with the test key, retried quickly."""
    return gateway_settings(backends["urls"], webhook_url=url,
                            webhook_secret_file=secret_file(tmp_path),
                            webhook_backoff_s=0.05, webhook_poll_s=0.05, **changes)


@pytest_asyncio.fixture
async def hooked(backends, database_url, tmp_path):
    """A gateway posting webhooks to a receiver of this test; (gateway URL, receiver)."""
    async with receiving() as (receiver, url):
        settings = hook_settings(backends, url, tmp_path, dsr_scan_s=0.1)
        async with running_gateway(settings, database_url) as gw:
            yield gw, receiver


def somebody() -> dict:
    return {"role": "user", "sub": f"u-hook-{uuid.uuid4().hex[:8]}", "euo": "euo-acme"}


async def file(http, gw, token, **body) -> dict:
    status, _, answer = await call(http, "POST", gw + "/v1/me/requests", token, json=body)
    assert status == 201
    return orjson.loads(answer)


async def test_filing_a_request_posts_a_signed_webhook_and_logs_it(hooked, http, token_for, db):
    gw, receiver = hooked
    req = await file(http, gw, token_for(**somebody()), type="erasure", data_sets=["voicemails"],
                     detail="my-private-words")
    assert await wait_for(lambda: _true(receiver.about(req["id"], "request.filed")))
    event = receiver.about(req["id"])[0]
    assert event["request"]["type"] == "erasure" and event["request"]["status"] == "open"
    assert event["request"]["data_sets"] == ["voicemails"]
    assert "my-private-words" not in orjson.dumps(event).decode()    # free text stays home
    log = await db.fetch("select d.status, d.error, d.attempt, o.delivered_at from "
                         "webhook_deliveries d join webhook_outbox o on o.id = d.outbox_id "
                         "where o.request_id = $1::uuid", req["id"])
    assert [(r["status"], r["error"], r["attempt"]) for r in log] == [(204, None, 1)]
    assert log[0]["delivered_at"] is not None


async def test_a_receiver_with_another_key_refuses_every_delivery(backends, database_url, tmp_path,
                                                                 http, token_for, db):
    """The signature depends on the key: a receiver holding another key refuses (401), the
    attempt is logged as failed and retried, never counted as delivered."""
    async with receiving(secret=b"another-key-" + b"z" * 32) as (receiver, url):
        settings = hook_settings(backends, url, tmp_path, webhook_max_attempts=2)
        async with running_gateway(settings, database_url) as gw:
            req = await file(http, gw, token_for(**somebody()), type="objection",
                             data_sets=["connection_statistics"])

            async def given_up():
                return await db.fetchval("select given_up_at is not null from webhook_outbox "
                                         "where request_id = $1::uuid and event = 'request.filed'",
                                         req["id"])
            assert await wait_for(given_up)
    statuses = await db.fetch("select d.status from webhook_deliveries d join webhook_outbox o "
                              "on o.id = d.outbox_id where o.request_id = $1::uuid", req["id"])
    assert [r["status"] for r in statuses] == [401, 401]
    assert receiver.about(req["id"]) == []


async def test_a_failing_receiver_gets_the_event_again_with_backoff(hooked, http, token_for, db):
    gw, receiver = hooked
    who = somebody()
    receiver.fail[who["sub"]] = 2
    started = time.monotonic()
    req = await file(http, gw, token_for(**who), type="restriction", data_sets=["user_mobile"])
    assert time.monotonic() - started < 5           # the request never waited for delivery
    assert await wait_for(lambda: _true(receiver.about(req["id"], "request.filed")), timeout=10)

    async def delivered():   # the delivery is logged just after the receiver has it
        return len(await db.fetch(
            "select 1 from webhook_deliveries d join webhook_outbox o on o.id = d.outbox_id "
            "where o.request_id = $1::uuid and d.status = 204", req["id"])) == 1
    assert await wait_for(delivered, timeout=10)
    log = await db.fetch("select d.attempt, d.status, d.error, d.at from webhook_deliveries d "
                         "join webhook_outbox o on o.id = d.outbox_id "
                         "where o.request_id = $1::uuid order by d.id", req["id"])
    assert [(r["attempt"], r["status"]) for r in log] == [(1, 500), (2, 500), (3, 204)]
    assert log[0]["error"] == "the receiver answered 500" and log[2]["error"] is None
    # exponential: the second wait is at least twice the base delay
    assert (log[2]["at"] - log[1]["at"]).total_seconds() >= 0.1
    await call(http, "PATCH", f"{gw}/v1/me/requests/{req['id']}", token_for(**who),
               json={"status": "withdrawn"})


async def test_the_events_of_one_request_arrive_in_the_order_they_happened(
        backends, database_url, tmp_path, http, token_for):
    """`request.filed` failed once and waits its backoff; the request is withdrawn meanwhile.
    `request.resolved` (and `restriction.lifted`) wait for `request.filed`: the receiver
    never hears that a request was resolved before hearing that it was filed."""
    async with receiving() as (receiver, url):
        settings = hook_settings(backends, url, tmp_path).with_(webhook_backoff_s=1.0)
        async with running_gateway(settings, database_url) as gw:
            who = somebody()
            receiver.fail[who["sub"]] = 1                    # the first delivery fails
            req = await file(http, gw, token_for(**who), type="restriction",
                             data_sets=["user_mobile"])
            assert await wait_for(lambda: _true(receiver.attempts), timeout=10)
            status, _, _ = await call(http, "PATCH", f"{gw}/v1/me/requests/{req['id']}",
                                      token_for(**who), json={"status": "withdrawn"})
            assert status == 200
            assert await wait_for(lambda: _true(len(receiver.about(req["id"])) == 3), timeout=10)
            order = [e["event"] for e in receiver.about(req["id"])]
            assert order[0] == "request.filed", order
            assert set(order[1:]) == {"request.resolved", "restriction.lifted"}
            ids = [e["id"] for e in receiver.about(req["id"])]
            assert ids == sorted(ids)            # in the order they were queued


async def test_a_receiver_answering_2xx_with_an_endless_body_is_delivered_not_read(
        backends, database_url, tmp_path, http, token_for, db):
    """The status is the answer: the gateway does not read the receiver's body (a receiver
    streaming without end once had the gateway buffer it until the attempt's timeout, in
    memory, and then count a 200 as failed and post the event again)."""
    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        answer = web.StreamResponse(status=200)
        await answer.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await answer.write(b"x" * 65536)
        return answer
    app = web.Application()
    app.router.add_post("/hooks", endless)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        settings = hook_settings(backends, f"http://127.0.0.1:{port}/hooks", tmp_path,
                                 webhook_timeout_s=3)
        async with running_gateway(settings, database_url) as gw:
            req = await file(http, gw, token_for(**somebody()), type="objection",
                             data_sets=["connection_statistics"])

            async def attempted():
                return await db.fetch(
                    "select d.status, d.error, d.duration_ms, o.delivered_at from "
                    "webhook_deliveries d join webhook_outbox o on o.id = d.outbox_id where "
                    "o.request_id = $1::uuid and o.event = 'request.filed'", req["id"])
            assert await wait_for(attempted, timeout=10)
            (attempt,) = await attempted()
            assert (attempt["status"], attempt["error"]) == (200, None)
            assert attempt["delivered_at"] is not None and attempt["duration_ms"] < 3000
    finally:
        await runner.cleanup()


async def test_an_event_failed_a_thousand_times_is_retried_and_delivery_goes_on(
        backends, database_url, tmp_path, http, token_for, db):
    """The backoff doubles up to an hour: past attempt 1025 the doubling once overflowed
    a float, the exception escaped the delivery task and ended it, so the process
    delivered nothing more (with GATEWAY_WEBHOOK_MAX_ATTEMPTS set that high)."""
    async with receiving() as (receiver, url):
        stuck = f"u-hook-stuck-{uuid.uuid4().hex[:6]}"
        receiver.fail[stuck] = 10 ** 6
        settings = hook_settings(backends, url, tmp_path, webhook_max_attempts=5000)
        async with running_gateway(settings, database_url) as gw:
            oid = await db.fetchval(
                "insert into webhook_outbox (event, payload, attempts) values ('request.filed',"
                " jsonb_build_object('id', gen_random_uuid(), 'user_sub', $1::text), 1100) "
                "returning id", stuck)
            async def retried():
                return await db.fetchrow(
                    "select attempts, last_error, next_attempt_at > now() + interval '30 "
                    "minutes' as later from webhook_outbox where id = $1 and attempts > 1100 "
                    "and last_error is not null",
                    oid)
            assert await wait_for(retried, timeout=10)
            row = await retried()
            assert row["last_error"] == "the receiver answered 500" and row["later"]
            req = await file(http, gw, token_for(**somebody()), type="objection",
                             data_sets=["connection_statistics"])
            assert await wait_for(lambda: _true(receiver.about(req["id"], "request.filed")),
                                  timeout=10)
    await db.execute("update webhook_outbox set given_up_at = now() where id = $1", oid)


async def test_lifting_a_restriction_and_resolving_are_told(hooked, http, token_for):
    gw, receiver = hooked
    who = somebody()
    req = await file(http, gw, token_for(**who), type="restriction", data_sets=["user_email"])
    status, _, _ = await call(http, "PATCH", f"{gw}/v1/me/requests/{req['id']}", token_for(**who),
                              json={"status": "withdrawn"})
    assert status == 200
    assert await wait_for(lambda: _true(receiver.about(req["id"], "restriction.lifted")
                                        and receiver.about(req["id"], "request.resolved")))
    lifted = receiver.about(req["id"], "restriction.lifted")[0]
    assert lifted["request"]["status"] == "withdrawn" and lifted["request"]["user_sub"] == who["sub"]


async def test_due_soon_and_overdue_are_told_once_and_counted(hooked, http, token_for, db):
    gw, receiver = hooked
    req = await file(http, gw, token_for(**somebody()), type="rectification",
                     data_sets=["user_address"])
    await move_due_date(db, req["id"], "3 days")
    assert await wait_for(lambda: _true(receiver.about(req["id"], "request.due_soon")))
    _, _, metrics = await call(http, "GET", gw + "/metrics")
    due_soon = [line for line in metrics.decode().splitlines()
                if line.startswith("gateway_dsr_requests_due_soon ")]
    assert due_soon and float(due_soon[0].split()[1]) >= 1
    await move_due_date(db, req["id"], "-1 day")
    assert await wait_for(lambda: _true(receiver.about(req["id"], "request.overdue")))
    assert len(receiver.about(req["id"], "request.due_soon")) == 1
    await db.execute("update dsr_requests set status = 'rejected' where id = $1::uuid", req["id"])


@pytest.mark.slow
async def test_an_event_survives_a_killed_gateway(backends, database_url, tmp_path, http,
                                                 token_for, db):
    """The receiver is down; the gateway that committed the event is killed (SIGKILL); a
    gateway started later delivers it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks"
    who = somebody()
    async with gateway_process(http, backends, database_url, tmp_path,
                               GATEWAY_WEBHOOK_URL=url,
                               GATEWAY_WEBHOOK_SECRET_FILE=str(secret_file(tmp_path)),
                               GATEWAY_WEBHOOK_BACKOFF_S="0.2") as (proc, gw):
        req = await file(http, gw, token_for(**who), type="objection", data_sets=["user_email"])

        async def tried():
            return await db.fetchval(
                "select count(*) from webhook_deliveries d join webhook_outbox o on "
                "o.id = d.outbox_id where o.request_id = $1::uuid and d.status is null", req["id"])
        assert await wait_for(tried, timeout=10)
        proc.kill()
        proc.wait()
    assert await db.fetchval("select delivered_at from webhook_outbox where request_id = $1::uuid",
                             req["id"]) is None
    async with receiving(port) as (receiver, _):
        settings = hook_settings(backends, url, tmp_path)
        async with running_gateway(settings, database_url) as gw:
            assert await wait_for(lambda: _true(receiver.about(req["id"], "request.filed")),
                                  timeout=10)
            await call(http, "PATCH", f"{gw}/v1/me/requests/{req['id']}", token_for(**who),
                       json={"status": "withdrawn"})


async def _true(value) -> bool:
    return bool(value)


def test_a_webhook_url_needs_a_readable_key_of_32_bytes(tmp_path):
    """`gateway serve` and `check` name the problem before listening: webhooks are always
    signed, with a key from a file (never from the repository)."""
    from gateway.settings import ConfigError, Settings

    base = {"GATEWAY_JWT_SECRET": "j" * 32, "GATEWAY_WEBHOOK_URL": "https://hooks.example/in"}
    short = tmp_path / "short.key"
    short.write_bytes(b"too short\n")
    for extra, problem in (({}, "GATEWAY_WEBHOOK_SECRET_FILE is not"),
                           ({"GATEWAY_WEBHOOK_SECRET_FILE": str(tmp_path / "none")}, "not readable"),
                           ({"GATEWAY_WEBHOOK_SECRET_FILE": str(short)}, "fewer than 32 bytes")):
        settings = Settings.from_env({**base, **extra})
        with pytest.raises(ConfigError, match=problem):
            settings.check_for_serving()
    good = Settings.from_env({**base, "GATEWAY_WEBHOOK_SECRET_FILE": str(secret_file(tmp_path)),
                              "GATEWAY_WEBHOOK_BACKOFF_S": "0.5"})
    good.check_for_serving()
    assert good.webhook_url == "https://hooks.example/in" and good.webhook_backoff_s == 0.5
    with pytest.raises(ConfigError, match="GATEWAY_WEBHOOK_URL"):
        Settings.from_env({**base, "GATEWAY_WEBHOOK_URL": "ftp://nope"})


@contextlib.asynccontextmanager
async def owner_and_runtime(database_url):
    """A database migrated by its owner with the runtime role's grants; (the roles, a
    connection as the owner, one as the runtime role)."""
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        owner = await asyncpg.connect(roles.owner_dsn)
        runtime = await asyncpg.connect(roles.runtime_dsn)
        try:
            yield roles, owner, runtime
        finally:
            await runtime.close()
            await owner.close()


async def test_finished_events_are_deleted_after_the_keep_days_and_pending_ones_never(
        database_url):
    """Events name a request's user: transport, not record. Delivered or given up longer ago
    than GATEWAY_WEBHOOK_KEEP_DAYS, an event and its attempts go; one still to be delivered
    stays however old. The runtime role (least privilege) does it through the owner's
    function, and still cannot DELETE an event itself."""
    async with owner_and_runtime(database_url) as (roles, owner, runtime):
        ids = {}
        for name, delivered, given_up in (
                ("old_delivered", "40 days", None), ("old_given_up", None, "40 days"),
                ("recent", "2 days", None), ("old_pending", None, None)):
            ids[name] = await owner.fetchval(
                "insert into webhook_outbox (event, payload, created_at, delivered_at, "
                "given_up_at) values ('request.filed', '{}', now() - interval '41 days', "
                "now() - $1::text::interval, now() - $2::text::interval) returning id",
                delivered, given_up)
            await owner.execute("insert into webhook_deliveries (outbox_id, attempt, url, "
                                "duration_ms) values ($1, 1, 'http://x', 1)", ids[name])
        async with asyncpg.create_pool(roles.runtime_dsn, min_size=1, max_size=1) as pool:
            await Webhooks(pool, None, None, None, keep_days=30).scan()   # the periodic scan
        left = {r["id"] for r in await owner.fetch("select id from webhook_outbox")}
        assert left == {ids["recent"], ids["old_pending"]}
        attempts = {r["outbox_id"] for r in
                    await owner.fetch("select outbox_id from webhook_deliveries")}
        assert attempts == left
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await runtime.execute("delete from webhook_outbox where id = $1", ids["recent"])


async def test_the_runtime_role_cannot_make_the_prune_delete_early_or_pending_events(
        database_url):
    """The prune is the runtime role's only way to delete an event: it cannot hand it a
    keep of zero (or less) to delete an event delivered a moment ago, nor backdate an
    event's delivery or giving up (or rewrite it) so that one still to be delivered goes."""
    async with owner_and_runtime(database_url) as (roles, owner, runtime):
        ids = {}
        for name, delivered in (("just_delivered", "1 second"), ("pending", None)):
            ids[name] = await owner.fetchval(
                "insert into webhook_outbox (event, payload, delivered_at) values "
                "('request.filed', '{}', now() - $1::text::interval) returning id",
                delivered)
        for keep in ("0", "-100 years", "-1 second"):
            await runtime.fetchval("select webhook_prune($1::text::interval)", keep)
        for column in ("delivered_at", "given_up_at"):
            with pytest.raises(asyncpg.RaiseError, match="webhook_outbox"):
                await runtime.execute(f"update webhook_outbox set {column} = now() - "
                                      "interval '100 days' where id = $1", ids["pending"])
        for change in ("payload = '{\"x\": 1}'", "event = 'request.resolved'",
                       "created_at = now() - interval '1 year'"):
            with pytest.raises(asyncpg.RaiseError, match="webhook_outbox"):
                await runtime.execute(f"update webhook_outbox set {change} where id = $1",
                                      ids["pending"])
        await runtime.fetchval("select webhook_prune(make_interval(days => 1))")
        left = {r["id"] for r in await owner.fetch("select id from webhook_outbox")}
        assert left == set(ids.values())
        # what the gateway itself writes still goes through: claim, fail, deliver
        await runtime.execute("update webhook_outbox set next_attempt_at = now(), "
                              "attempts = attempts + 1 where id = $1", ids["pending"])
        await runtime.execute("update webhook_outbox set last_error = 'x', given_up_at = "
                              "null where id = $1", ids["pending"])
        await runtime.execute("update webhook_outbox set delivered_at = now() where id = $1",
                              ids["pending"])


async def test_break_glass_opened_and_ended_early_are_told_with_the_grant(
        hooked, http, token_for, db):
    """In the transaction of the grant (and of its early end), never for a refused one; the
    provider's person by role only, as the EUO's admins see them."""
    gw, receiver = hooked
    staff = token_for("staff")
    ticket = f"INC-{uuid.uuid4().hex[:8]}"
    status, _, body = await call(http, "POST", gw + "/v1/break-glass", staff, json={
        "euo": "euo-acme", "purpose": "too long", "ticket": ticket, "minutes": 100000})
    assert status == 400
    status, _, body = await call(http, "POST", gw + "/v1/break-glass", staff, json={
        "euo": "euo-acme", "user": "u-alice", "purpose": "organizer locked out",
        "ticket": ticket, "minutes": 5})
    assert status == 201, body
    grant = orjson.loads(body)["id"]
    assert await wait_for(lambda: _true(receiver.about(grant, "break_glass.opened")))
    opened = receiver.about(grant)[0]["break_glass"]
    assert {k: opened[k] for k in ("euo", "user", "role", "purpose", "ticket", "ended_at")} == {
        "euo": "euo-acme", "user": "u-alice", "role": "provider_staff",
        "purpose": "organizer locked out", "ticket": ticket, "ended_at": None}
    assert "staff-sam" not in orjson.dumps(receiver.about(grant)).decode()
    status, _, _ = await call(http, "DELETE", f"{gw}/v1/break-glass/{grant}", staff)
    assert status == 200
    assert await wait_for(lambda: _true(receiver.about(grant, "break_glass.ended")))
    ended = receiver.about(grant, "break_glass.ended")[0]["break_glass"]
    assert ended["ended_at"] and ended["ended_by"] == "provider_staff"
    status, _, _ = await call(http, "DELETE", f"{gw}/v1/break-glass/{grant}", staff)
    assert status == 200                                   # ended already: no second event
    queued = await db.fetch("select event from webhook_outbox where payload->>'ticket' = $1 "
                            "order by id", ticket)
    assert [r["event"] for r in queued] == ["break_glass.opened", "break_glass.ended"]
