"""The gateway's one clock: the database's time, carried between readings by the host's
monotonic clock.

What the gateway decides by the time of day — whether a contract has ended, whether a
token has expired or is not valid yet — must not move when the host's wall clock is
stepped (a bad NTP source, a VM restored from a snapshot, an operator's `date -s`): a
clock stepped back two days would serve a partner whose contract ended today, and accept
a token that expired an hour ago. So the gateway reads PostgreSQL's `clock_timestamp()`
every few seconds and keeps the offset between it and `time.monotonic()`, which no step
moves; `now()` is the monotonic clock plus that offset. The host's wall clock is compared
with it at every look (`skew()`): past GATEWAY_MAX_CLOCK_SKEW_S the process is not ready
(`/readyz` 503 `clock_skew`), as its logs, webhook timestamps and anything else written
by the host's clock are off, though its decisions are not.

A reading is the midpoint of the round trip; a reading whose round trip took longer than
MAX_ROUND_TRIP_S (a pool or a loop under load) is not used, so the offset is known to
within half of that. Until the first reading (at start, before the gateway listens) there
is no clock and `start` raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, date, datetime

import asyncpg

from .db import DATABASE_ERRORS, query

log = logging.getLogger("gateway.clock")

MAX_ROUND_TRIP_S = 0.5     # a reading less sure than ±0.25 s is not used
READ_EVERY_S = 2.0
READ_TIMEOUT_S = 5.0       # a frozen database or a half-open connection: try again later
MAX_SKEW_S = 5.0


async def read_database_clock(conn) -> tuple[float, float, float, float]:
    """One reading of the database's clock: its unix time, the host's monotonic and
    wall-clock times at the round trip's midpoint, and the round trip in seconds."""
    m0, w0 = time.monotonic(), time.time()
    db = await conn.fetchval(query("database_clock"))
    m1, w1 = time.monotonic(), time.time()
    return db, (m0 + m1) / 2, (w0 + w1) / 2, m1 - m0


async def measure_skew(conn, tries: int = 3) -> tuple[float, float]:
    """How far the host's wall clock is behind the database's (seconds; negative: ahead),
    and the reading's uncertainty: the best of `tries` round trips."""
    best = None
    for _ in range(tries):
        db, _mono, wall, rtt = await read_database_clock(conn)
        if best is None or rtt < best[1]:
            best = (db - wall, rtt)
    skew, rtt = best
    return skew, rtt / 2


class Clock:
    """The time the gateway decides with (module docstring)."""

    def __init__(self, pool: asyncpg.Pool | None, max_skew_s: float = MAX_SKEW_S,
                 read_every_s: float = READ_EVERY_S):
        self.pool = pool
        self.max_skew_s = max_skew_s
        self.read_every_s = read_every_s
        self._offset: float | None = None     # database unix time - time.monotonic()
        self._task: asyncio.Task | None = None

    def now(self) -> float:
        """The database's time now, as unix seconds."""
        return time.monotonic() + self._offset

    def today(self) -> date:
        """The database's date now, in UTC."""
        return datetime.fromtimestamp(self.now(), UTC).date()

    def skew(self) -> float:
        """How far the host's wall clock is behind the database's now (negative: ahead)."""
        return self.now() - time.time()

    def health(self) -> list[str]:
        """`clock_skew` while the host's wall clock is off by more than the bound."""
        return ["clock_skew"] if abs(self.skew()) > self.max_skew_s else []

    async def read(self) -> bool:
        """Take one reading; whether it was used (a slow round trip is not)."""
        async with asyncio.timeout(READ_TIMEOUT_S), self.pool.acquire() as conn:
            db, mono, _wall, rtt = await read_database_clock(conn)
        if rtt > MAX_ROUND_TRIP_S and self._offset is not None:
            return False
        self._offset = db - mono
        return True

    async def start(self) -> None:
        """The first reading (raises when the database cannot be read), then one every
        `read_every_s` in the background; from then on it is the process's clock
        (`now_utc`)."""
        global _process_clock
        await self.read()
        _process_clock = self
        skew = self.skew()
        if abs(skew) > self.max_skew_s:
            log.warning("the host's clock is %.1f s %s the database's: deciding by the "
                        "database's; not ready until they agree within %g s (GATEWAY_MAX_"
                        "CLOCK_SKEW_S)", abs(skew), "behind" if skew > 0 else "ahead of",
                        self.max_skew_s)
        self._task = asyncio.create_task(self._keep_reading())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _keep_reading(self) -> None:
        while True:
            await asyncio.sleep(self.read_every_s)
            try:
                await self.read()
            except DATABASE_ERRORS as e:
                # the last offset stays good: the monotonic clock carries it
                log.debug("database clock not read: %s", e)


class HostClock:
    """The host's wall clock, for what runs without a database (offline tools, a part
    built alone in a test); the serving gateway always wires a `Clock`."""

    def now(self) -> float:
        return time.time()

    def today(self) -> date:
        return datetime.now(UTC).date()


HOST_CLOCK = HostClock()


# The time of day of this process, for the code that reads it as a plain function (the
# retention cut-offs of each request, the audit row's time): the clock the serving gateway
# started, else the host's. Process-wide on purpose: there is one monotonic clock per
# process and one database clock per deployment, so two apps in one process (tests) share
# the same time whichever of them started last.
_process_clock: Clock | HostClock = HOST_CLOCK


def now_utc() -> datetime:
    """The time of day this process decides and records by (see `_process_clock`)."""
    return datetime.fromtimestamp(_process_clock.now(), UTC)
