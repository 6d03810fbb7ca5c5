"""Webhooks (docs/operate.md, Notifications): events about data-subject requests, posted signed.

An event is a row of `webhook_outbox`, inserted in the same transaction as the change it
reports (`Webhooks.queue`), or by the reminder scan (due in 7 days, overdue). A task
in every gateway process claims due rows with a lease, posts each to GATEWAY_WEBHOOK_URL
signed with HMAC-SHA256, and records every attempt in `webhook_deliveries`; a failed
attempt is retried with exponential backoff up to GATEWAY_WEBHOOK_MAX_ATTEMPTS. Delivery
never runs in a request: a receiver that is down, slow or wrong delays only the webhook,
and an undelivered row waits in the database across restarts.

Signature: `X-Gateway-Signature: v1=<hex HMAC-SHA256(key, "<timestamp>." + body)>` with
`X-Gateway-Timestamp: <unix seconds>`; a receiver recomputes it over the raw body and
refuses old timestamps (replays).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from . import clock
from .db import DATABASE_ERRORS, query

log = logging.getLogger("gateway.webhooks")

EVENTS = ("request.filed", "request.due_soon", "request.overdue", "request.resolved",
          "request.erasure_failed", "restriction.lifted", "break_glass.opened",
          "break_glass.ended", "alert.raised")
SIGNATURE_HEADER = "X-Gateway-Signature"
TIMESTAMP_HEADER = "X-Gateway-Timestamp"
BATCH = 20
MAX_BACKOFF_S = 3600.0
_DB_ERRORS = DATABASE_ERRORS


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value for a body sent at `timestamp` (unix seconds, text)."""
    return "v1=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str,
           tolerance_s: float = 300, now: float | None = None) -> bool:
    """What a receiver checks: the signature over this body and a recent timestamp."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


class Webhooks:
    """The outbox's delivery task and the reminder scan of one process."""

    def __init__(self, pool: asyncpg.Pool, session: aiohttp.ClientSession, url: str | None,
                 secret: bytes | None, max_attempts: int = 10, backoff_s: float = 5.0,
                 timeout_s: float = 10.0, poll_s: float = 1.0, scan_s: float = 60.0,
                 observe: Callable[[str], None] | None = None, keep_days: int = 30):
        self.pool, self.session = pool, session
        self.url, self.secret = url, secret
        self.max_attempts, self.backoff_s, self.timeout_s = max_attempts, backoff_s, timeout_s
        self.poll_s, self.scan_s, self.keep_days = poll_s, scan_s, keep_days
        self.observe = observe                  # told each attempt's outcome (metrics)
        self.due_soon = 0                       # unresolved requests due within 7 days
        self.overdue = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # more periodic checks of the requests, run at each scan (an interrupted erasure)
        self.sweeps: list[Callable[[], Awaitable[Any]]] = []

    @property
    def enabled(self) -> bool:
        return self.url is not None

    async def queue(self, conn: asyncpg.Connection, event: str, request_id) -> None:
        """Queue an event about a request in the caller's transaction (with the change it
        reports); nothing when no receiver is configured."""
        assert event in EVENTS, event
        if self.enabled:
            await conn.execute(query("outbox_add_request_event"), event, request_id)

    async def queue_payload(self, conn: asyncpg.Connection, event: str,
                            payload: dict[str, Any]) -> None:
        """Queue an event about something else than a request (a break-glass grant), its
        payload as given, in the caller's transaction; nothing without a receiver."""
        assert event in EVENTS and not event.startswith("request."), event
        if self.enabled:
            await conn.execute(query("outbox_add_event"), event, orjson.dumps(payload).decode())

    def wake(self) -> None:
        """An event was committed: deliver now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._scanning()))
        if self.enabled:
            self._tasks.append(asyncio.create_task(self._delivering()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def scan(self) -> int:
        """Queue the due-soon and overdue reminders not queued yet, refresh the counts, run
        the other periodic checks of requests (`sweeps`); return how many reminders were
        queued."""
        for sweep in (self.prune, *self.sweeps):
            try:
                await sweep()
            except _DB_ERRORS as e:   # one check failing keeps none of the others from running
                log.warning("request scan: %s failed: %s", getattr(sweep, "__name__", sweep), e)
        queued = 0
        async with self.pool.acquire() as conn:
            if self.enabled:      # a process without webhooks leaves the reminders to others
                queued = await conn.fetchval(query("outbox_reminders"))
            counts = await conn.fetchrow(query("dsr_due_counts"))
        self.due_soon, self.overdue = counts["due_soon"], counts["overdue"]
        if queued:
            self.wake()
        return queued

    async def prune(self) -> int:
        """Delete the events delivered or given up more than keep_days ago (and their
        delivery attempts); return how many."""
        return await self.pool.fetchval(query("webhook_prune"), self.keep_days)

    async def _scanning(self) -> None:
        while True:
            try:
                await self.scan()
            except _DB_ERRORS as e:
                log.warning("data-subject request reminders not scanned: %s", e)
            await asyncio.sleep(self.scan_s)

    async def _delivering(self) -> None:
        while True:
            try:
                # an event delivered may let the next one about its subject go (030)
                busy = await self.deliver_due() > 0
            except _DB_ERRORS as e:
                log.warning("webhook outbox not read: %s", e)
                busy = False
            except Exception:     # one event must never end delivery for the process
                log.exception("webhook delivery failed; going on")
                busy = False
            if not busy:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self._wake.wait()
                self._wake.clear()

    async def deliver_due(self) -> int:
        """Claim the events due now and attempt each once; return how many were claimed."""
        lease = self.timeout_s + 30
        rows = await self.pool.fetch(query("outbox_claim"), BATCH, lease)
        for row in rows:
            await self._attempt(row)
        return len(rows)

    async def _attempt(self, row) -> None:
        # the payload under the name of what the event is about: "request" (request.*,
        # restriction.lifted) or "break_glass" (break_glass.*)
        about = "break_glass" if row["event"].startswith("break_glass.") else "request"
        body = orjson.dumps({"id": row["id"], "event": row["event"],
                             "created_at": row["created_at"].isoformat(),
                             about: orjson.loads(row["payload"])})
        timestamp = str(int(clock.now_utc().timestamp()))   # the database's time
        headers = {"Content-Type": "application/json", "User-Agent": "partner-gateway-webhooks",
                   "X-Gateway-Event": row["event"], "X-Gateway-Delivery": str(row["id"]),
                   TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(self.secret, timestamp, body)}
        started = time.perf_counter()
        status = error = None
        try:
            async with asyncio.timeout(self.timeout_s):
                # the status is the answer: the body is never read (a receiver could
                # stream one without end, to be buffered until the timeout)
                async with self.session.post(self.url, data=body, headers=headers,
                                             allow_redirects=False) as answer:
                    status = answer.status
            if not 200 <= status < 300:
                error = f"the receiver answered {status}"
        except TimeoutError:
            error = f"no answer within {self.timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as e:
            error = f"{type(e).__name__}: {e}"[:500]
        took_ms = (time.perf_counter() - started) * 1000
        attempt = row["attempts"]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(query("delivery_log"), row["id"], attempt, self.url, status, error,
                               took_ms)
            if error is None:
                await conn.execute(query("outbox_delivered"), row["id"])
            else:
                give_up = attempt >= self.max_attempts
                # doubling, at most an hour (the exponent bounded: 2.0 ** 1024 overflows)
                delay = min(self.backoff_s * 2.0 ** min(attempt - 1, 64), MAX_BACKOFF_S)
                await conn.execute(query("outbox_failed"), row["id"], delay, error, give_up)
                log.warning("webhook %s (%s) attempt %d failed: %s%s", row["id"], row["event"],
                            attempt, error, "; giving up" if give_up else f"; retry in {delay:g} s")
        if self.observe is not None:
            self.observe("delivered" if error is None else
                         "given_up" if attempt >= self.max_attempts else "failed")


WEBHOOKS = web.AppKey("webhooks", Webhooks)
