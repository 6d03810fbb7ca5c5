"""The partner <-> EUO contracts, mirrored in memory (see notified.py).

While the mirror cannot be trusted, partners are refused (503 `contracts_unavailable`).
"""

from __future__ import annotations

from datetime import date

import asyncpg

from .clock import HOST_CLOCK, Clock, HostClock
from .db import query
from .listener import Listener
from .notified import STALENESS_S, NotifiedCache


class ContractCache(NotifiedCache):
    channel = "gateway_contracts"
    unavailable_code = "contracts_unavailable"
    what = "contracts table"

    def __init__(self, pool: asyncpg.Pool, listener: Listener, staleness_s: float = STALENESS_S,
                 clock: Clock | HostClock = HOST_CLOCK):
        super().__init__(pool, listener, staleness_s)
        self._by_euo: dict[str, tuple[str, date | None]] = {}
        self.clock = clock      # a contract ends by the database's date, not the host's

    def active_partner(self, euo: str) -> str | None:
        """The partner holding an active contract with this EUO, if any."""
        self.check_fresh()
        entry = self._by_euo.get(euo)
        if entry is None:
            return None
        partner, end = entry
        if end is not None and end <= self.clock.today():
            return None
        return partner

    def contract_end(self, euo: str) -> date | None:
        """The day this EUO's contract ends (or ended); None while open-ended or when the
        EUO has no contract. Raises 503 while the mirror cannot be trusted."""
        self.check_fresh()
        entry = self._by_euo.get(euo)
        return entry[1] if entry is not None else None

    def remember(self, euo: str, partner: str | None, end: date | None) -> None:
        """Record a change this process made itself (others hear of it by NOTIFY)."""
        self.wrote(euo)
        self._set(euo, partner, end)

    def _set(self, euo: str, partner: str | None, end: date | None) -> None:
        if partner is None:
            self._by_euo.pop(euo, None)
        else:
            self._by_euo[euo] = (partner, end)

    async def load_all(self, conn: asyncpg.Connection) -> int:
        rows = await conn.fetch(query("all_contracts"))
        self._by_euo = {r["euo_id"]: (r["partner_id"], r["contract_end"]) for r in rows}
        return len(rows)

    async def read(self, conn: asyncpg.Pool, euo: str):
        return await conn.fetchrow(query("one_contract"), euo)

    def apply(self, euo: str, row) -> None:
        self._set(euo, row["partner_id"] if row else None, row["contract_end"] if row else None)
