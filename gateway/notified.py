"""A table mirrored in memory and kept fresh by PostgreSQL LISTEN/NOTIFY.

Every process loads the whole table at start and reloads one key whenever a trigger
notifies a change, so several processes agree within the notification's latency. The
mirror is trusted only while its listener is proven alive: a few times per staleness
bound the listener notifies itself on a channel of its own, and since PostgreSQL delivers
notifications in commit order, hearing that heartbeat back proves every change committed
before it was sent has been heard too. A closed connection, or no heartbeat heard within
`staleness_s` (a half-open connection, a frozen backend, a failover), and `check_fresh`
refuses (503) until the listener is re-opened and the mirror reloaded.

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
import contextlib
import logging
import math
import secrets
import time
from typing import Any

import asyncpg

from .db import DATABASE_ERRORS, query
from .errors import Denied

log = logging.getLogger("gateway.notified")

STALENESS_S = 2.0
RETRY_S = 1.0            # between attempts to re-open a lost listener


class NotifiedCache:
    channel: str = ""
    unavailable_code: str = ""
    what: str = ""

    def __init__(self, pool: asyncpg.Pool, dsn: str, staleness_s: float = STALENESS_S):
        self.pool = pool
        self.dsn = dsn
        self.staleness_s = staleness_s
        self._listener: asyncpg.Connection | None = None
        self._heartbeat_channel = ""
        self._proven_at = -math.inf     # time.monotonic() up to which the mirror is known fresh
        self._heard_at = -math.inf      # when the latest heartbeat heard back was sent
        self._last_beat = -math.inf     # when the latest heartbeat was sent
        # keys being re-read: the freshness mark when their change was heard, their task
        self._reloading: dict[str, tuple[float, asyncio.Task]] = {}
        self._again: set[str] = set()   # keys changed again while being re-read
        # how many changes this process made to each key (by `key()`): a read begun before
        # one may have seen the row before it, and is not applied
        self._written: dict[Any, int] = {}
        # while the whole table loads on a new listener: the keys it hears changed (read
        # again once the load has landed, which may not have seen them)
        self._loading: tuple[asyncpg.Connection, set[str]] | None = None
        self._task: asyncio.Task | None = None
        self._beat: asyncio.Task | None = None
        self._lost = asyncio.Event()

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
        if time.monotonic() - self._proven_at > self.staleness_s:
            raise Denied(self.unavailable_code,
                         f"the {self.what} cannot be read right now; try again shortly")

    def stale_reason(self) -> str | None:
        """The reason id `check_fresh` would refuse with right now, or None."""
        return self.unavailable_code if time.monotonic() - self._proven_at > self.staleness_s else None

    def staleness(self) -> float:
        """Seconds since the mirror was last proven fresh (inf before the first proof)."""
        return time.monotonic() - self._proven_at

    async def start(self) -> None:
        """Load the mirror and keep it proven fresh (raises if the first load fails)."""
        await self._connect_and_load()
        self._task = asyncio.create_task(self._keep_listening())

    async def close(self) -> None:
        """Stop listening."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._forget_reloads()
        if self._listener is not None and not self._listener.is_closed():
            self._listener.terminate()

    async def _connect_and_load(self) -> None:
        old, self._listener = self._listener, None
        if old is not None and not old.is_closed():
            old.remove_termination_listener(self._on_terminated)
            old.terminate()   # no goodbye: its backend may not answer
        self._lost.clear()
        self._forget_reloads()   # the full load below reads every key afresh
        # bounded: a frozen server accepts the TCP connection and then never answers
        async with asyncio.timeout(max(5.0, 2 * self.staleness_s)):
            conn = await asyncpg.connect(
                self.dsn, server_settings={"application_name": f"gateway listener {self.channel}"})
            changed: set[str] = set()
            self._loading = (conn, changed)
            try:
                conn.add_termination_listener(self._on_terminated)
                await conn.add_listener(self.channel, self._on_notify)
                heartbeat_channel = f"gateway_heartbeat_{secrets.token_hex(8)}"
                await conn.add_listener(heartbeat_channel, self._on_heartbeat)
                listening_since = time.monotonic()
                count = await self.load_all(conn)
            except BaseException:
                conn.terminate()
                raise
            finally:
                self._loading = None
        self._listener, self._heartbeat_channel = conn, heartbeat_channel
        self._proven_at = self._heard_at = listening_since   # changes after LISTEN are heard;
        # the load saw the rest, except perhaps what changed while it ran: read that again
        self._last_beat = listening_since
        for key in changed:
            self._reread(key)
        log.info("loaded %d rows of the %s", count, self.what)

    def _on_terminated(self, _conn: Any) -> None:
        self._on_lost()

    def _on_lost(self) -> None:
        self._proven_at = self._heard_at = -math.inf
        self._lost.set()

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

    async def _keep_listening(self) -> None:
        """Send heartbeats; when one is not heard back in time, re-open and reload."""
        beat_every = self.staleness_s / 4
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(beat_every):
                    await self._lost.wait()
            # stale with every heartbeat answered means this process did not run for a
            # while (a stalled event loop), not that the listener is silent: beat again
            if not self._lost.is_set() and (self.stale_reason() is None
                                            or self._proven_at >= self._last_beat):
                self._send_heartbeat(beat_every)
                continue
            log.warning("lost the %s listener; refusing what depends on it until it is back",
                        self.what)
            self._on_lost()
            while True:
                await asyncio.sleep(RETRY_S)
                try:
                    await self._connect_and_load()
                    break
                except Exception as e:  # keep trying whatever the failure
                    log.warning("%s reconnect failed: %s", self.what, str(e) or type(e).__name__)

    def _send_heartbeat(self, timeout: float) -> None:
        """Notify ourselves; `_on_heartbeat` moves the freshness mark when it comes back."""
        conn = self._listener
        if conn is None or conn.is_closed() or (self._beat is not None and not self._beat.done()):
            return   # a beat still unanswered: the connection is busy with it

        sent = self._last_beat = time.monotonic()

        async def beat() -> None:
            # not awaited by the loop above: a backend that stopped answering must not
            # stop the staleness check; what is not heard back in time is simply stale
            with contextlib.suppress(Exception):
                async with asyncio.timeout(timeout):
                    await conn.execute(query("mirror_heartbeat"), self._heartbeat_channel,
                                       repr(sent))
        self._beat = asyncio.get_running_loop().create_task(beat())

    def _on_heartbeat(self, conn: Any, _pid: int, _channel: str, sent_at: str) -> None:
        if conn is self._listener:
            self._heard_at = max(self._heard_at, float(sent_at))
            self._prove()

    def _on_notify(self, conn: Any, _pid: int, _channel: str, key: str) -> None:
        if self._loading is not None and conn is self._loading[0]:
            self._loading[1].add(key)   # the load under way may have read it before it changed
            return
        if conn is not self._listener:
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
            self._on_lost()   # a change we could not read: distrust the mirror until reload
        finally:
            entry = self._reloading.get(key)
            if entry is not None and entry[1] is asyncio.current_task():
                del self._reloading[key]
                self._again.discard(key)
                self._prove()
