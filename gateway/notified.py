"""A table mirrored in memory and kept fresh by PostgreSQL LISTEN/NOTIFY.

Every process loads the whole table at start and reloads one key whenever a trigger
notifies a change, so several processes agree within the notification's latency. While
the listening connection is down the mirror cannot be trusted: `check_fresh` refuses
(503) until it is back and reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from .errors import Denied

log = logging.getLogger("gateway.notified")


class NotifiedCache:
    channel: str = ""
    unavailable_code: str = ""
    what: str = ""

    def __init__(self, pool: asyncpg.Pool, dsn: str):
        self.pool = pool
        self.dsn = dsn
        self._listener: asyncpg.Connection | None = None
        self._fresh = False
        self._task: asyncio.Task | None = None
        self._lost = asyncio.Event()

    # --- what a subclass says ---
    async def load_all(self, conn: asyncpg.Connection) -> int:
        """Replace the mirror with the table's rows; return how many."""
        raise NotImplementedError

    async def reload(self, conn: asyncpg.Pool, key: str) -> None:
        """Re-read the rows of one key."""
        raise NotImplementedError

    # --- the machinery ---
    def check_fresh(self) -> None:
        if not self._fresh:
            raise Denied(503, self.unavailable_code,
                         f"the {self.what} cannot be read right now; try again shortly")

    async def start(self) -> None:
        await self._connect_and_load()
        self._task = asyncio.create_task(self._keep_listening())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close()

    async def _connect_and_load(self) -> None:
        old, self._listener = self._listener, None
        if old is not None and not old.is_closed():
            old.remove_termination_listener(self._on_terminated)
            old.terminate()
        self._lost.clear()
        conn = await asyncpg.connect(self.dsn)
        conn.add_termination_listener(self._on_terminated)
        await conn.add_listener(self.channel, self._on_notify)
        self._listener = conn
        count = await self.load_all(conn)
        self._fresh = True
        log.info("loaded %d rows of the %s", count, self.what)

    def _on_terminated(self, _conn: Any) -> None:
        self._on_lost()

    def _on_lost(self) -> None:
        self._fresh = False
        self._lost.set()

    async def _keep_listening(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("lost the %s listener; refusing what depends on it until it is back",
                        self.what)
            while True:
                await asyncio.sleep(1.0)
                try:
                    await self._connect_and_load()
                    break
                except Exception as e:  # keep trying whatever the failure
                    log.warning("%s reconnect failed: %s", self.what, e)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, key: str) -> None:
        asyncio.get_running_loop().create_task(self._reload_or_distrust(key))

    async def _reload_or_distrust(self, key: str) -> None:
        try:
            await self.reload(self.pool, key)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._on_lost()   # a change we could not read: distrust the mirror until reload
