"""The process's one LISTEN connection, shared by every mirror, and the deployment's one
heartbeat.

A process opens a single connection to PostgreSQL for notifications (to
GATEWAY_DATABASE_LISTEN_URL: LISTEN needs a session of its own, which a transaction pooler
does not give). It LISTENs on each mirror's channel and hands each notification to the
mirror of that channel, and on `gateway_heartbeat`. Lost (closed, or silent past the
staleness bound), it is re-opened, every channel LISTENed again and every mirror reloaded
on it; until then every mirror refuses (see notified.py).

The heartbeat proves a listener alive: PostgreSQL delivers notifications in commit order,
so hearing a heartbeat sent at the database's time T proves every change committed before T
has been heard. One process in the whole deployment sends it: the one whose listener holds
the advisory lock HEARTBEAT_LOCK (a session lock on its listener connection, released by
PostgreSQL when that connection ends). Every `staleness_s / 4` it notifies its sequence
number and the database's `clock_timestamp()`. Each listener trusts its mirrors up to that
time less SKEW_S (how far this process's reading of the database's clock may be off,
gateway/clock.py). A listener that has heard no heartbeat for TAKEOVER beats tries the
lock; the first to get it sends from then on. When the lock is held by a sender that does
not beat (its backend frozen), a listener that has heard nothing for RESCUE beats sends
one heartbeat of its own: everyone hears it, so the deployment stays proven with about one
heartbeat per interval, from whoever noticed first. A listener whose own heartbeat does not
come back within the staleness bound takes its connection for lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from typing import Any

import asyncpg

from .clock import HOST_CLOCK, MAX_ROUND_TRIP_S, Clock, HostClock
from .db import query

# a notified.NotifiedCache; named loosely, as notified.py imports this module (no circle)
NotifiedCache = Any

log = logging.getLogger("gateway.listener")

STALENESS_S = 2.0
RETRY_S = 1.0            # between attempts to re-open a lost listener
HEARTBEAT_CHANNEL = "gateway_heartbeat"
HEARTBEAT_LOCK = 0x6761_7468   # an advisory lock id: the deployment's heartbeat sender
SKEW_S = MAX_ROUND_TRIP_S / 2  # how far a process's reading of the database's clock may be off
TAKEOVER = 1.5                 # beats without a heartbeat heard before trying the lock
RESCUE = 2.0                   # ... before sending one while another holds the lock
APPLICATION_NAME = "gateway listener"


class Listener:
    """One LISTEN connection for the process's mirrors (module docstring)."""

    def __init__(self, dsn: str, clock: Clock | HostClock = HOST_CLOCK,
                 staleness_s: float = STALENESS_S):
        self.dsn = dsn
        self.clock = clock
        self.staleness_s = staleness_s
        self.beat_every = staleness_s / 4
        self.conn: asyncpg.Connection | None = None
        self.sender = False           # this connection holds HEARTBEAT_LOCK
        self.seq = 0                  # of the heartbeats this process sent
        self.beats_sent = 0
        self.heard_at = -math.inf     # the database's time of the latest heartbeat heard
        self._token = f"{os.getpid()}-{secrets.token_hex(4)}"   # tells our heartbeats apart
        self._unanswered_since: float | None = None   # monotonic: our oldest unheard beat
        self._beat_unheard = False     # a heartbeat of ours not heard back yet
        self._quiet_since = -math.inf  # the database's time since which no heartbeat was heard
        self._mirrors: dict[str, NotifiedCache] = {}
        self._lost = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._beat: asyncio.Task | None = None
        self._reloads: dict[str, asyncio.Task] = {}   # a stale mirror's reload, by channel

    # --- the mirrors' side ---
    async def attach(self, mirror: NotifiedCache) -> None:
        """LISTEN on the mirror's channel and load it (raises if that fails); opens the
        connection first if it is not open."""
        self._mirrors[mirror.channel] = mirror
        if self.conn is None:
            await self._connect()
            self._task = asyncio.create_task(self._keep_listening())
            return
        try:
            async with asyncio.timeout(self._connect_timeout()):
                await self._listen_and_load(self.conn, mirror)
        except BaseException:
            del self._mirrors[mirror.channel]
            raise

    def detach(self, mirror: NotifiedCache) -> None:
        """Stop handing notifications to this mirror."""
        if self._mirrors.get(mirror.channel) is mirror:
            del self._mirrors[mirror.channel]   # its channel's notifications go unheard

    async def close(self) -> None:
        """Stop listening (and beating)."""
        for task in (self._task, self._beat, *self._reloads.values()):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    # --- the connection ---
    def _connect_timeout(self) -> float:
        # bounded: a frozen server accepts the TCP connection and then never answers
        return max(5.0, 2 * self.staleness_s)

    async def _connect(self) -> None:
        old, self.conn = self.conn, None
        if old is not None and not old.is_closed():
            old.remove_termination_listener(self._on_terminated)
            old.terminate()   # no goodbye: its backend may not answer
        for task in self._reloads.values():
            task.cancel()      # the new connection loads every mirror
        self._reloads.clear()
        self.sender = False
        self._unanswered_since, self._beat_unheard = None, False
        self.heard_at = -math.inf
        self._quiet_since = self.clock.now()
        self._lost.clear()
        async with asyncio.timeout(self._connect_timeout()):
            conn = await asyncpg.connect(self.dsn,
                                         server_settings={"application_name": APPLICATION_NAME})
            try:
                conn.add_termination_listener(self._on_terminated)
                await conn.add_listener(HEARTBEAT_CHANNEL, self._on_heartbeat)
                await self._take_lock(conn)
                self.conn = conn
                for mirror in list(self._mirrors.values()):
                    await self._listen_and_load(conn, mirror)
            except BaseException:
                self.conn = None
                conn.terminate()
                raise

    async def _listen_and_load(self, conn: asyncpg.Connection, mirror: NotifiedCache) -> None:
        # changes committed once LISTEN has run are heard; the time is read before it
        listening_since = self.clock.now() - SKEW_S
        await conn.add_listener(mirror.channel, self._on_notify)
        await mirror._load(conn, listening_since)

    def _on_terminated(self, conn: Any) -> None:
        if conn is self.conn:
            self._on_lost()

    def _on_lost(self) -> None:
        self.heard_at = -math.inf
        for mirror in self._mirrors.values():
            mirror._on_lost()
        self._lost.set()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        mirror = self._mirrors.get(channel)
        if mirror is not None:
            mirror._on_notify(conn, pid, channel, payload)

    def _on_heartbeat(self, conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if conn is not self.conn:
            return
        try:
            _seq, sender, sent_at = payload.split(" ")
            proven = float(sent_at) - SKEW_S
        except ValueError:
            return      # not a heartbeat of ours: proves nothing
        if sender == self._token:
            self._unanswered_since, self._beat_unheard = None, False
        self._quiet_since = max(self._quiet_since, proven + SKEW_S)
        if proven > self.heard_at:
            self.heard_at = proven
            for mirror in self._mirrors.values():
                mirror._on_heartbeat(conn, proven)

    def silence(self) -> float:
        """Seconds since the latest heartbeat heard was sent (by the database's clock, less
        SKEW_S; inf before the first)."""
        return self.clock.now() - self.heard_at - SKEW_S

    # --- the loop ---
    async def _keep_listening(self) -> None:
        """Beat when it is this process's turn; re-open and reload when the connection is
        lost or its heartbeats are not heard back in time."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.beat_every):
                    await self._lost.wait()
            unheard = self._unanswered_since
            if not self._lost.is_set() and (
                    unheard is None or time.monotonic() - unheard <= self.staleness_s):
                self._maybe_beat()
                self._reload_stuck()
                continue
            log.warning("lost the database listener; refusing what depends on the mirrors "
                        "until it is back")
            self._on_lost()
            while True:
                await asyncio.sleep(RETRY_S)
                try:
                    await self._connect()
                    break
                except Exception as e:  # keep trying whatever the failure
                    log.warning("listener reconnect failed: %s", str(e) or type(e).__name__)

    def _reload_stuck(self) -> None:
        """Reload, in the background on a pooled connection, each mirror stale while
        heartbeats are heard: a change it could not read, or a re-read that hangs, holds it
        back. One that fails stays stale and is tried again at the next beat."""
        conn = self.conn
        if conn is None or self.silence() > self.staleness_s:
            return
        for mirror in list(self._mirrors.values()):
            task = self._reloads.get(mirror.channel)
            if mirror.stale_reason() is None or (task is not None and not task.done()):
                continue
            if mirror._conn is not conn and task is None:
                continue   # being loaded by the connection's opening
            log.warning("the %s is stale with heartbeats heard; reloading it", mirror.what)
            self._reloads[mirror.channel] = asyncio.get_running_loop().create_task(
                self._reload(conn, mirror))

    async def _reload(self, conn: asyncpg.Connection, mirror: NotifiedCache) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout()), mirror.pool.acquire() as read_on:
                await mirror._load(conn, self.clock.now() - SKEW_S, read_on)
        except Exception as e:  # stays stale; tried again at the next beat
            log.warning("%s reload failed: %s", mirror.what, str(e) or type(e).__name__)

    async def _take_lock(self, conn: asyncpg.Connection) -> bool:
        """Try to become the deployment's heartbeat sender."""
        got = await conn.fetchval(query("heartbeat_lock"), HEARTBEAT_LOCK)
        if conn is not self.conn and self.conn is not None:
            return False    # a connection already replaced: its lock goes with it
        self.sender = got
        if got:
            log.info("this process sends the deployment's heartbeat now")
        return got

    def _maybe_beat(self) -> None:
        """Send a heartbeat if this process is the sender (or becomes it, or must rescue)."""
        conn = self.conn
        if conn is None or conn.is_closed() or (self._beat is not None and not self._beat.done()):
            return   # a beat still under way: the connection is busy with it
        # counted from the connection's opening at the earliest: a process that just
        # started waits to hear the sender before trying to be one
        silence = self.clock.now() - self._quiet_since
        if not self.sender and silence <= TAKEOVER * self.beat_every:
            return
        timeout = self.beat_every

        async def beat() -> None:
            # not awaited by the loop: a backend that stopped answering must not stop the
            # staleness check; what is not heard back in time is simply stale
            try:
                async with asyncio.timeout(timeout):
                    if self._unanswered_since is None:
                        self._unanswered_since = time.monotonic()
                    if (not self.sender and not await self._take_lock(conn)
                            and silence <= RESCUE * self.beat_every):
                        if not self._beat_unheard:
                            self._unanswered_since = None   # the lock's answer came back
                        return
                    self.seq += 1
                    self.beats_sent += 1
                    self._beat_unheard = True
                    await conn.execute(query("deployment_heartbeat"), HEARTBEAT_CHANNEL,
                                       f"{self.seq} {self._token}")
            except Exception as e:
                log.debug("heartbeat not sent: %s", str(e) or type(e).__name__)
        self._beat = asyncio.get_running_loop().create_task(beat())
