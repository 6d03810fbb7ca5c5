"""Users whose processing is restricted, and of which data sets (an open or accepted
restriction or objection restricts exactly the data sets it names), mirrored in memory (see
notified.py). A user is (EUO, sub): the same sub in two EUOs is two people. While the mirror
cannot be trusted, the roles a restriction blocks are refused (503
`restrictions_unavailable`)."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg
import orjson

from .db import query
from .listener import Listener
from .notified import STALENESS_S, NotifiedCache

NONE: frozenset[str] = frozenset()


class RestrictionCache(NotifiedCache):
    channel = "gateway_restrictions"
    unavailable_code = "restrictions_unavailable"
    what = "processing restrictions"

    def __init__(self, pool: asyncpg.Pool, listener: Listener, staleness_s: float = STALENESS_S):
        super().__init__(pool, listener, staleness_s)
        self._users: dict[tuple[str, str], frozenset[str]] = {}

    def restricted(self, euo: str, user: str) -> frozenset[str]:
        """The data sets of this user that the blocked roles may not process (empty: none)."""
        self.check_fresh()
        return self._users.get((euo, user), NONE)

    def remember(self, euo: str, user: str, data_sets: Iterable[str]) -> None:
        """Record a change this process made itself (others hear of it by NOTIFY)."""
        self.wrote(orjson.dumps([euo, user]).decode())
        self._set(euo, user, data_sets)

    def _set(self, euo: str, user: str, data_sets: Iterable[str]) -> None:
        data_sets = frozenset(data_sets)
        if data_sets:
            self._users[(euo, user)] = data_sets
        else:
            self._users.pop((euo, user), None)

    async def load_all(self, conn: asyncpg.Connection) -> int:
        self._users = {(r["euo_id"], r["user_sub"]): frozenset(r["data_sets"])
                       for r in await conn.fetch(query("restricted_users"))}
        return len(self._users)

    def key(self, payload: str) -> tuple[str, str]:
        """The NOTIFY payload [euo, user]."""
        euo, user = orjson.loads(payload)
        return euo, user

    async def read(self, conn: asyncpg.Pool, key: str):
        return await conn.fetchval(query("restricted_data_sets"), *self.key(key))

    def apply(self, key: str, data_sets) -> None:
        self._set(*self.key(key), data_sets or ())
