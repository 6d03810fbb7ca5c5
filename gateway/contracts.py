"""The partner <-> EUO contracts, cached in memory and kept fresh by LISTEN/NOTIFY.

Every process loads all contracts at start and reloads one EUO whenever PostgreSQL
notifies a change, so several processes agree within the notification's latency. While
the listening connection is down the cache cannot be trusted: partners are refused
(503 `contracts_unavailable`) until it is back and reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, date, datetime

import asyncpg

from .db import query
from .errors import Denied

log = logging.getLogger("gateway.contracts")
CHANNEL = "gateway_contracts"


class ContractCache:
    def __init__(self, pool: asyncpg.Pool, dsn: str):
        self.pool = pool
        self.dsn = dsn
        self._by_euo: dict[str, tuple[str, date | None]] = {}
        self._listener: asyncpg.Connection | None = None
        self._fresh = False
        self._task: asyncio.Task | None = None
        self._lost = asyncio.Event()

    def active_partner(self, euo: str) -> str | None:
        """The partner holding an active contract with this EUO, if any."""
        if not self._fresh:
            raise Denied(503, "contracts_unavailable",
                         "the contracts table cannot be read right now; try again shortly")
        entry = self._by_euo.get(euo)
        if entry is None:
            return None
        partner, end = entry
        if end is not None and end <= datetime.now(UTC).date():
            return None
        return partner

    def remember(self, euo: str, partner: str | None, end: date | None) -> None:
        """Record a change this process made itself (others hear of it by NOTIFY)."""
        if partner is None:
            self._by_euo.pop(euo, None)
        else:
            self._by_euo[euo] = (partner, end)

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
        await conn.add_listener(CHANNEL, self._on_notify)
        self._listener = conn
        rows = await conn.fetch(query("all_contracts"))
        self._by_euo = {r["euo_id"]: (r["partner_id"], r["contract_end"]) for r in rows}
        self._fresh = True
        log.info("loaded %d contracts", len(rows))

    def _on_terminated(self, _conn) -> None:
        self._on_lost()

    def _on_lost(self) -> None:
        self._fresh = False
        self._lost.set()

    async def _keep_listening(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("lost the contracts listener; partners are refused until it is back")
            while True:
                await asyncio.sleep(1.0)
                try:
                    await self._connect_and_load()
                    break
                except (TimeoutError, OSError, asyncpg.PostgresError) as e:
                    log.warning("contracts reconnect failed: %s", e)

    def _on_notify(self, _conn, _pid, _channel, euo: str) -> None:
        asyncio.get_running_loop().create_task(self._reload(euo))

    async def _reload(self, euo: str) -> None:
        try:
            row = await self.pool.fetchrow(query("one_contract"), euo)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            self._on_lost()   # a change we could not read: distrust the cache until reload
            return
        self.remember(euo, row["partner_id"] if row else None, row["contract_end"] if row else None)
