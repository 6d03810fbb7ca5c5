"""One audited call: who asked, about whom, what was decided, and its one audit row.

The proxy, the gateway's own API, the export (one call per backend request it makes) and
the downloads all keep their books here. A call ends exactly once, in one of three ways:

- `allow(...)`: the row is committed before the answer may leave (commit-then-send, or
  commit-then-stream for downloads);
- `refuse(denial)`: a refusal (decision `deny`, 4xx) or a failure (decision `error`, 5xx).
  An authenticated caller's refusal is committed before it is answered too, so a crash
  cannot lose it; if it cannot be committed the caller gets 503 `audit_unavailable`.
  A caller with no valid token is not written row by row: such refusals are counted per
  source address and minute (`AnonymousRefusals`), so a flood cannot fill the log, and
  they name no data subject, so they never appear in anyone's access log.

A call that can change data (a proxied write) or streams a file is written ahead: `intend()`
commits an *intent* row (phase `intent`) before a single byte goes to the backend or the
client, and the call's row becomes its *outcome* (phase `outcome`, same request id). When
the intent cannot be committed the caller gets 503 `audit_unavailable` and nothing is
sent; when the outcome of a write cannot be, 503 `outcome_unknown` (the backend may have
applied it: the intent stays, marked "outcome unknown" wherever rows are read).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from aiohttp import web

from .audit import AuditRow, AuditWriter
from .audit.writer import Change, outcome_unknown
from .errors import Denied, error_response, refusal
from .grammar import audit_text
from .idempotency import Idempotent
from .principal import Principal
from .redact import now_utc

log = logging.getLogger("gateway.call")
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# W3C Trace Context: version 00's shape (a later version may only add fields after these);
# version ff and all-zero ids are invalid
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
ANONYMOUS_ROUTE = "gateway:unauthenticated"
# told the row of every finished call, once, with the outcome its caller got (the metrics
# and the access log, wired in app.py)
Observer = Callable[[AuditRow], None]


class Call:
    """The audit life of one request (or of one backend call of an export)."""

    __slots__ = ("audit", "anonymous", "row", "started", "principal", "committed", "siblings",
                 "traceparent", "observe", "intended", "idempotent")

    def __init__(self, audit: AuditWriter, anonymous: AnonymousRefusals, request_id: str,
                 method: str, path: str, client: str | None,
                 client_request_id: str | None = None, traceparent: str | None = None,
                 observe: Observer | None = None):
        self.audit = audit
        self.anonymous = anonymous
        self.started = time.perf_counter()
        self.principal: Principal | None = None
        self.committed = False            # an allowed row is durable: the answer may go
        self.siblings: list[tuple[str | None, list[str]]] = []   # more EUOs in one answer
        self.traceparent = traceparent    # forwarded to the backends
        self.observe = observe            # told each finished call's row, once
        self.intended = False             # its intent row is committed: its row is the outcome
        self.idempotent: Idempotent | None = None   # a gateway API write's Idempotency-Key
        self.row = AuditRow(at=now_utc(), request_id=request_id, method=method,
                            path=audit_text(path, 2048), client_addr=client,
                            client_request_id=client_request_id,
                            trace_id=trace_id(traceparent) if traceparent else None)

    def identify(self, principal: Principal) -> None:
        """The caller is known: their claims go into the row."""
        self.principal = principal
        row = self.row
        row.actor_sub, row.actor_role, row.actor_partner, row.actor_euo = principal.audit_fields()

    def about(self, euo: str | None, users: Iterable[str] = ()) -> None:
        """Whose data this call checks or serves."""
        self.row.subject_euo = euo
        self.row.subject_users = sorted(set(users))

    def about_each(self, users_by_euo: dict[str | None, set[str]], apart: bool = False) -> None:
        """An answer about users of several EUOs: one row per EUO (the same request id), so
        each EUO's audit and each user's access log shows it. `apart`: one row per user
        (a row a user can see whole must not tell her who else it names)."""
        groups = sorted(users_by_euo.items(), key=lambda g: g[0] or "")
        if apart:
            groups = [(euo, {user}) for euo, users in groups for user in sorted(users)] or groups
        if groups:
            self.about(*groups[0])
            self.siblings = [(euo, sorted(users)) for euo, users in groups[1:]]

    def _rows(self, row: AuditRow) -> list[AuditRow]:
        """`row`, and a copy of it for each further EUO the answer was about (siblings)."""
        return [row, *(dataclasses.replace(row, subject_euo=euo, subject_users=users)
                       for euo, users in self.siblings)]

    def _finish(self, decision: str, status: int, size: int) -> None:
        row = self.row
        row.decision, row.status, row.bytes = decision, status, size
        row.duration_ms = (time.perf_counter() - self.started) * 1000
        if self.intended:
            row.at = now_utc()             # when it ended (the intent holds the arrival)

    async def intend(self, data_sets: Iterable[str], status: int = 0, size: int = 0,
                     access: str = "acted_upon") -> None:
        """Commit the intent row of a call about to change data (`acted_upon`) or stream a
        file (`served`), before any byte goes out: who, what, about whom, which data sets.
        Raises Denied(503, audit_unavailable) if it cannot be committed; nothing may be
        sent then."""
        row = self.row
        row.access = access
        intent = dataclasses.replace(
            row, decision="allow", status=status, bytes=size, data_sets=list(data_sets),
            phase="intent", duration_ms=(time.perf_counter() - self.started) * 1000)
        await asyncio.gather(*map(self.audit.commit, self._rows(intent)))
        row.data_sets, row.phase = intent.data_sets, "outcome"
        self.intended = True

    def ended(self, status: int, size: int, cut: bool, why: str | None = None) -> None:
        """A streamed answer is over: queue its outcome row (the bytes delivered, reason
        `cut` — or why, `why` — when the stream broke off). Nobody waits for it: the answer
        has gone."""
        if cut:
            self.row.reason = why or "cut"
        self._finish("allow", status, size)
        self.committed = True
        for row in self._rows(self.row):
            self.audit.record_nowait(row)
        if self.observe is not None:
            self.observe(self.row)

    async def allow(self, status: int, size: int, served: Iterable[str] = (),
                    removed: Iterable[str] = (), change: Change | None = None) -> Any:
        """Commit the allowed call's row; raise Denied(503) if it cannot be made durable.

        A state change (`change(conn)`) commits in the same transaction as the row or not at
        all: a caller told "failed" has changed nothing, and every change has its row.
        Returns what the change returned; what it raised (a refusal) is raised here."""
        self._finish("allow", status, size)
        if change is not None and self.idempotent is not None:
            change = self.idempotent.keyed(change, status)
        if served:
            self.row.data_sets = list(served)
            if self.row.access is None:
                self.row.access = "served"
        if removed:        # names a backend chose: any text, any length
            self.row.fields_removed = [audit_text(name) for name in removed]
        if self.siblings:
            first, *siblings = self._rows(self.row)
            result, *_ = await asyncio.gather(self._commit(first, change),
                                              *map(self._commit, siblings))
        else:                   # the common case: one row, no task for it
            result = await self._commit(self.row, change)
        self.committed = True
        if self.observe is not None:
            self.observe(self.row)
        return result

    async def record_refusal(self, denial: Denied) -> None:
        """Audit a refusal or failure (durably for a known caller); raise Denied(503) if
        the row cannot be committed."""
        row = self.row
        self._finish("deny" if denial.status < 500 else "error", denial.status, 0)
        row.reason = denial.code
        if not self.intended:       # nothing was touched (after an intent: it was tried)
            row.access = None
        if self.principal is None:
            self.anonymous.count(row, denial.code)
        else:
            try:
                await self._commit(row)
            except Denied as unavailable:
                if self.observe is not None:
                    # what the caller gets instead; a copy, as the writer may still hold the row
                    self.observe(dataclasses.replace(row, decision="error", reason=unavailable.code,
                                                     status=unavailable.status))
                raise
        if self.observe is not None:
            self.observe(row)

    async def _commit(self, row: AuditRow, change: Change | None = None) -> Any:
        """Commit a row of this call; once its intent is committed, a row that cannot be
        leaves the outcome unknown (503 outcome_unknown, not "failed")."""
        if not self.intended:
            return await self.audit.commit(row, change)
        try:
            return await self.audit.commit(row, change)
        except Denied as e:
            if e.code != "audit_unavailable":
                raise
            raise outcome_unknown(self.row.request_id) from None

    async def fail(self, error: Exception) -> Denied:
        """Audit whatever stopped the call as its refusal (Denied as it is, anything else
        internal_error, logged) and return it to raise; Denied(503) when the row cannot be
        committed."""
        denial = refusal(error, self.row.request_id)
        await self.record_refusal(denial)
        return denial

    async def refuse(self, error: Exception) -> web.Response:
        """Audit the refusal (any failure: as `fail` tells it), then the error answer
        (docs/gateway-api.md, Errors)."""
        denial = refusal(error, self.row.request_id)
        try:
            await self.record_refusal(denial)
        except Denied as unavailable:
            if denial.code != "outcome_unknown":    # that says more than "not logged"
                denial = unavailable
        return error_response(denial.status, denial.code, denial.message, self.row.request_id)


def client_request_id(request: web.Request) -> str | None:
    """The client's own X-Request-Id, kept beside ours when it is a sane token."""
    given = request.headers.get("X-Request-Id")
    return given if given and CLIENT_REQUEST_ID.fullmatch(given) else None


def traceparent(incoming: Mapping[str, str]) -> str:
    """The caller's W3C traceparent when well-formed; otherwise a new trace the gateway
    starts (not sampled: the gateway records no spans, it only lets the trace be followed)."""
    given = incoming.get("traceparent")
    if given is not None and _TRACEPARENT.fullmatch(given):
        return given
    # ids for following a trace, not secrets: the process's PRNG (reseeded in each forked
    # worker by the random module itself) instead of a getrandom() system call per request;
    # never all zeros, which the format reserves as invalid
    return f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-00"


def trace_id(traceparent: str) -> str:
    """The trace-id field of a well-formed traceparent."""
    return traceparent[3:35]


class AnonymousRefusals:
    """Refusals of callers with no valid token, counted per (minute, source, reason) and
    written as one row each when the minute is over (and at shutdown)."""

    def __init__(self, audit: AuditWriter, max_keys: int = 10_000):
        self.audit = audit
        self.max_keys = max_keys
        self._counts: dict[tuple[datetime, str | None, str, int, str | None], int] = {}
        self._task: asyncio.Task | None = None

    def count(self, row: AuditRow, reason: str) -> None:
        """Count one refusal; the bucket is the row's minute, source address and reason."""
        minute = row.at.replace(second=0, microsecond=0)
        client = row.client_addr
        if (minute, client, reason, row.status, row.policy_version) not in self._counts and \
                len(self._counts) >= self.max_keys:
            client = "other"           # bounded memory whatever the number of sources
        # the policy in force is part of the bucket: a reload within the minute splits it
        key = (minute, client, reason, row.status, row.policy_version)
        self._counts[key] = self._counts.get(key, 0) + 1

    def flush(self, everything: bool = False) -> int:
        """Queue a row per finished minute (every minute when `everything`); return how many."""
        current = now_utc().replace(second=0, microsecond=0)
        done = [k for k in self._counts if everything or k[0] < current]
        for key in done:
            minute, client, reason, status, version = key
            row = AuditRow(at=minute, request_id=f"unauthenticated:{minute.isoformat()}",
                           method="*", path="*", route=ANONYMOUS_ROUTE,
                           decision="deny" if status < 500 else "error",   # as record_refusal
                           reason=reason, status=status, client_addr=client,
                           requests=self._counts.pop(key), policy_version=version)
            self.audit.record_nowait(row)
        return len(done)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(60 - now_utc().second + 0.1)
            self.flush()

    async def close(self) -> None:
        """Stop the minute timer and queue what was counted so far."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush(everything=True)
