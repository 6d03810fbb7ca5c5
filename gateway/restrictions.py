"""Users whose processing is restricted (an open or accepted restriction request),
mirrored in memory (see notified.py). A user is (EUO, sub): the same sub in two EUOs is two
people. While the mirror cannot be trusted, the roles a restriction blocks are refused
(503 `restrictions_unavailable`)."""

from __future__ import annotations

import asyncpg
import orjson

from .db import query
from .notified import STALENESS_S, NotifiedCache


class RestrictionCache(NotifiedCache):
    channel = "gateway_restrictions"
    unavailable_code = "restrictions_unavailable"
    what = "processing restrictions"

    def __init__(self, pool: asyncpg.Pool, dsn: str, staleness_s: float = STALENESS_S):
        super().__init__(pool, dsn, staleness_s)
        self._users: set[tuple[str, str]] = set()

    def is_restricted(self, euo: str, user: str) -> bool:
        self.check_fresh()
        return (euo, user) in self._users

    def remember(self, euo: str, user: str, restricted: bool) -> None:
        """Record a change this process made itself (others hear of it by NOTIFY)."""
        if restricted:
            self._users.add((euo, user))
        else:
            self._users.discard((euo, user))

    async def load_all(self, conn: asyncpg.Connection) -> int:
        self._users = {(r["euo_id"], r["user_sub"])
                       for r in await conn.fetch(query("restricted_users"))}
        return len(self._users)

    async def reload(self, conn: asyncpg.Pool, key: str) -> None:
        """Re-read one user's restriction; `key` is the NOTIFY payload [euo, user]."""
        euo, user = orjson.loads(key)
        self.remember(euo, user, await conn.fetchval(query("is_restricted"), euo, user))
