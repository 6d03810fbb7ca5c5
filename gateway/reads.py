"""Where the audit queries read: a streaming standby (GATEWAY_DATABASE_READ_URL), or the
primary.

Only the read-only queries of the audit log run here: /v1/audit (pages and downloads),
/v1/audit/per-day, /v1/audit/verify, /v1/audit/checkpoints, /v1/audit/keys, /v1/audit/slice,
/v1/audit/consistency, /v1/me/access-log and /v1/admin/retention. Nothing that writes or
decides ever does: audit rows and intents (the audit lanes), the mirrors, the checks, the
idempotency keys, the exports all use the primary.

A standby's answer is never older than its request. Before the query the primary's WAL
flush position is read (one round trip on the main pool, no table touched): every commit
acknowledged before the request lies at or before it. The query then waits until the
standby has replayed past that position, for up to GATEWAY_DATABASE_READ_MAX_WAIT_S; a
standby further behind, unreachable, or no longer in recovery (promoted: it may be a primary
cut off from the cluster) and the query runs on the primary instead. When the primary
cannot be reached, the query is refused (503 database_unavailable) as before: a standby's
answer whose freshness cannot be proven is not given. Each answer says where it was read
(`X-Gateway-Read-From: standby` or `primary`) and, from a standby, how long the replay was
waited for (`X-Gateway-Replay-Wait-Ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web

from .db import DATABASE_ERRORS, query

log = logging.getLogger("gateway.reads")

READ_FROM = web.RequestKey("read_from", tuple)      # ("standby", waited ms) or ("primary",)
POLL_S = 0.005          # between looks at the standby's replay position while waiting
READ_POOL_MAX = 4       # the standby pool: the audit queries only


class Reads:
    """The audit queries' connections: from `standby` while it has caught up, else `primary`."""

    def __init__(self, primary: asyncpg.Pool, standby: asyncpg.Pool | None = None,
                 max_wait_s: float = 1.0):
        self.primary = primary
        self.standby = standby
        self.max_wait_s = max_wait_s

    async def close(self) -> None:
        if self.standby is not None:
            await self.standby.close()

    @contextlib.asynccontextmanager
    async def acquire(self, request: web.Request) -> AsyncIterator[asyncpg.Connection]:
        """A connection for one audit query; `request[READ_FROM]` says where it reads."""
        if self.standby is None:
            async with self.primary.acquire() as conn:
                yield conn
            return
        position = await self.primary.fetchval(query("primary_wal_position"))
        caught_up = await self._caught_up(position)
        if caught_up is None:
            request[READ_FROM] = ("primary",)
            async with self.primary.acquire() as conn:
                yield conn
            return
        conn, waited_ms = caught_up
        request[READ_FROM] = ("standby", waited_ms)
        try:
            yield conn
        finally:
            await self.standby.release(conn)

    async def _caught_up(self, position: str) -> tuple[asyncpg.Connection, int] | None:
        """A standby connection that has replayed past `position`, and the milliseconds that
        took; None when the standby is further behind, unreachable, or not a standby."""
        started = time.monotonic()
        conn = None
        try:
            async with asyncio.timeout(self.max_wait_s):
                conn = await self.standby.acquire()
                while True:
                    replayed = await conn.fetchval(query("standby_replayed"), position)
                    if replayed is None:       # not in recovery: no standby of this cluster
                        # let it go: a multi-host URL finds a standby again next time
                        # (`prefer-standby` takes a primary while no standby is up)
                        log.info("GATEWAY_DATABASE_READ_URL reached a server that is not a "
                                 "standby; reading from the primary")
                        conn.terminate()
                        break
                    if replayed:
                        return conn, round((time.monotonic() - started) * 1000)
                    await asyncio.sleep(POLL_S)
        except DATABASE_ERRORS as e:
            log.info("the standby has not replayed what the primary committed within %g s, "
                     "or cannot be reached (%s); reading from the primary", self.max_wait_s,
                     str(e) or type(e).__name__)
        if conn is not None:
            with contextlib.suppress(*DATABASE_ERRORS):
                await self.standby.release(conn, timeout=1)
        return None


async def stamp(request: web.Request, response: web.StreamResponse) -> None:
    """Say where an audit query's answer was read (on_response_prepare)."""
    read = request.get(READ_FROM)
    if read is None:
        return
    response.headers["X-Gateway-Read-From"] = read[0]
    if read[0] == "standby":
        response.headers["X-Gateway-Replay-Wait-Ms"] = str(read[1])


READS = web.AppKey("reads", Reads)
