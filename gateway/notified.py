"""A table mirrored in memory and kept fresh by PostgreSQL LISTEN/NOTIFY.

Every process loads the whole table at start and reloads one key whenever a trigger
notifies a change, so several processes agree within the notification's latency. The
notifications come through the process's one listener (gateway/listener.py), which also
hears the deployment's heartbeat: since PostgreSQL delivers notifications in commit order,
hearing a heartbeat sent at the database's time T proves every change committed before T
has been heard. The mirror is trusted only while that proof is recent: a closed
connection, or no heartbeat heard for `staleness_s` (a half-open connection, a frozen
backend, a failover, a sender that died and was not yet replaced), and `check_fresh`
refuses (503) until the listener is re-opened and the mirror reloaded. Times here are the
database's (the listener's clock), as the heartbeat carries them.

A key's reloads run one at a time: a change heard while its key is being re-read is read
again when that read ends, so an older read can never land after a newer one. A heard
heartbeat proves the mirror fresh only up to the oldest change still being re-read (the
freshness mark it had when that change was heard), so a re-read that hangs turns the
mirror stale within the bound instead of leaving the old value trusted. A change heard while
the whole table is being loaded (the listener is up first) is read again once the load has
landed, which may have read the key before it changed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import asyncpg

from .db import DATABASE_ERRORS
from .errors import Denied
from .listener import STALENESS_S, Listener

log = logging.getLogger("gateway.notified")

__all__ = ["STALENESS_S", "NotifiedCache"]


class NotifiedCache:
    channel: str = ""
    unavailable_code: str = ""
    what: str = ""

    def __init__(self, pool: asyncpg.Pool, listener: Listener, staleness_s: float = STALENESS_S):
        self.pool = pool
        self.listener = listener
        self.staleness_s = staleness_s
        self._conn: asyncpg.Connection | None = None   # the listener it was loaded on
        self._proven_at = -math.inf     # the database's time up to which the mirror is fresh
        self._heard_at = -math.inf      # what the latest heartbeat heard proves
        # keys being re-read: the freshness mark when their change was heard, their task
        self._reloading: dict[str, tuple[float, asyncio.Task]] = {}
        self._again: set[str] = set()   # keys changed again while being re-read
        # how many changes this process made to each key (by `key()`): a read begun before
        # one may have seen the row before it, and is not applied
        self._written: dict[Any, int] = {}
        # while the whole table loads on a new listener: the keys it hears changed (read
        # again once the load has landed, which may not have seen them)
        self._loading: tuple[asyncpg.Connection, set[str]] | None = None

    # --- what a subclass says ---
    async def load_all(self, conn: asyncpg.Connection) -> int:
        """Replace the mirror with the table's rows; return how many."""
        raise NotImplementedError

    async def read(self, conn: asyncpg.Pool, key: str) -> Any:
        """The rows of one key (a NOTIFY payload), as `apply` takes them."""
        raise NotImplementedError

    def apply(self, key: str, value: Any) -> None:
        """Put what `read` gave for this key into the mirror."""
        raise NotImplementedError

    def key(self, payload: str) -> Any:
        """What a NOTIFY payload names (the same key however it is spelt)."""
        return payload

    def wrote(self, payload: str) -> None:
        """This process committed a change to the rows of `payload` (and put it in the
        mirror itself): a read of them begun before is read again rather than applied, so
        the mirror never goes back to what was there before the change."""
        key = self.key(payload)
        self._written[key] = self._written.get(key, 0) + 1
        if self._loading is not None:
            self._loading[1].add(payload)     # the load under way may have read it before

    # --- the machinery ---
    def check_fresh(self) -> None:
        """Refuse (503) unless the mirror was proven fresh within the staleness bound."""
        if self.staleness() > self.staleness_s:
            raise Denied(self.unavailable_code,
                         f"the {self.what} cannot be read right now; try again shortly")

    def stale_reason(self) -> str | None:
        """The reason id `check_fresh` would refuse with right now, or None."""
        return self.unavailable_code if self.staleness() > self.staleness_s else None

    def staleness(self) -> float:
        """Seconds since the mirror was last proven fresh (inf before the first proof)."""
        return self.listener.clock.now() - self._proven_at

    async def start(self) -> None:
        """Load the mirror and keep it proven fresh (raises if the first load fails)."""
        await self.listener.attach(self)

    async def close(self) -> None:
        """Stop listening."""
        self.listener.detach(self)
        self._forget_reloads()
        self._conn = None

    async def _load(self, conn: asyncpg.Connection, listening_since: float,
                    read_on: asyncpg.Connection | None = None) -> None:
        """Load the whole table (on `read_on`, else `conn`) for a listener `conn` that
        LISTENs on the channel since `listening_since` (the listener calls this at each
        (re)connection, and when the mirror is stale while heartbeats are heard)."""
        self._conn = None
        self._proven_at = self._heard_at = -math.inf
        self._forget_reloads()   # the full load below reads every key afresh
        changed: set[str] = set()
        self._loading = (conn, changed)
        try:
            count = await self.load_all(read_on or conn)
        finally:
            self._loading = None
        self._conn = conn
        # changes after LISTEN are heard; the load saw the rest, except perhaps what
        # changed while it ran: read that again
        self._proven_at = self._heard_at = max(listening_since, self.listener.heard_at)
        for key in changed:
            self._reread(key)
        log.info("loaded %d rows of the %s", count, self.what)

    def _on_lost(self) -> None:
        self._proven_at = self._heard_at = -math.inf

    def _on_heartbeat(self, conn: Any, proven: float) -> None:
        if conn is self._conn:
            self._heard_at = max(self._heard_at, proven)
            self._prove()

    def _prove(self) -> None:
        """Move the freshness mark to the latest heartbeat heard, held back by the oldest
        change still being re-read."""
        mark = self._heard_at
        for heard_when, _task in self._reloading.values():
            mark = min(mark, heard_when)
        self._proven_at = mark

    def _forget_reloads(self) -> None:
        for _mark, task in self._reloading.values():
            task.cancel()
        self._reloading.clear()
        self._again.clear()

    def _on_notify(self, conn: Any, _pid: int, _channel: str, key: str) -> None:
        if self._loading is not None and conn is self._loading[0]:
            self._loading[1].add(key)   # the load under way may have read it before it changed
            return
        if conn is not self._conn:
            return   # a listener already replaced: the full load read this change
        self._reread(key)

    def _reread(self, key: str) -> None:
        if key in self._reloading:
            self._again.add(key)   # read again once the read under way ends
            return
        task = asyncio.get_running_loop().create_task(self._reload_or_distrust(key))
        self._reloading[key] = (self._proven_at, task)
        self._prove()

    async def _reload_or_distrust(self, key: str) -> None:
        try:
            while True:
                self._again.discard(key)
                mark = self._written.get(self.key(key), 0)
                value = await self.read(self.pool, key)
                if self._written.get(self.key(key), 0) != mark:
                    continue      # changed here meanwhile: what was read may be older
                self.apply(key, value)
                if key not in self._again:
                    break
        except DATABASE_ERRORS:
            self._on_lost()   # a change we could not read: distrust the mirror until reloaded
        finally:
            entry = self._reloading.get(key)
            if entry is not None and entry[1] is asyncio.current_task():
                del self._reloading[key]
                self._again.discard(key)
                self._prove()
