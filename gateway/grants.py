"""Break-glass grants in force, mirrored in memory in every process (see notified.py): a
request costs one dictionary look-up. When the mirror is stale and the caller holds a grant
in it, the request is refused (503 `break_glass_unavailable`) rather than served under a
grant that may have been ended. Grants are opened and ended by break_glass.py."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from .clock import HOST_CLOCK, Clock, HostClock
from .db import query
from .listener import Listener
from .notified import STALENESS_S, NotifiedCache
from .principal import Principal


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    euo: str
    user: str | None
    ends_at: float            # epoch seconds


def _caller(role: str, sub: str, partner: str | None) -> tuple[str, str, str | None]:
    return role, sub, partner


class BreakGlassCache(NotifiedCache):
    channel = "gateway_break_glass"
    unavailable_code = "break_glass_unavailable"
    what = "break-glass grants"

    def __init__(self, pool: asyncpg.Pool, listener: Listener, staleness_s: float = STALENESS_S,
                 clock: Clock | HostClock = HOST_CLOCK):
        super().__init__(pool, listener, staleness_s)
        self.clock = clock        # a grant ends by the database's time, not the host's
        self._by_caller: dict[tuple[str, str, str | None], dict[str, Grant]] = {}
        # grants ended early, until their planned end: a record read before the end and
        # remembered after it (a notification's reload overtaken, an answer under way)
        # must not put one back in force; an end is final
        self._ended: dict[str, float] = {}

    def grant_for(self, principal: Principal, euo: str, user: str | None) -> Grant | None:
        """The grant in force that covers this caller's request to this EUO (and user)."""
        grants = self._by_caller.get(_caller(principal.role, principal.sub, principal.partner))
        if not grants:
            return None
        self.check_fresh()       # it may have been ended: do not serve under it blind
        now = self.clock.now()
        for grant in grants.values():
            if grant.euo == euo and grant.ends_at > now and (grant.user is None
                                                             or grant.user == user):
                return grant
        return None

    def remember(self, record: Any) -> None:
        """Record a grant (as read from the table) this process opened or ended itself;
        others hear of it by NOTIFY."""
        self.wrote(str(record["id"]))
        self._set(record)

    def _set(self, record: Any) -> None:
        key = _caller(record["actor_role"], record["actor_sub"], record["actor_partner"])
        gid = str(record["id"])
        now = self.clock.now()
        if record["ended_at"] is not None:
            self._ended = {g: t for g, t in self._ended.items() if t > now}
            self._ended[gid] = record["ends_at"].timestamp()
        in_force = (record["ended_at"] is None and record["ends_at"].timestamp() > now
                    and gid not in self._ended)
        grants = self._by_caller.get(key, {})
        if in_force:
            grants[gid] = Grant(gid, record["euo_id"], record["user_sub"],
                                record["ends_at"].timestamp())
            self._by_caller[key] = grants
        elif grants.pop(gid, None) is not None and not grants:
            del self._by_caller[key]

    def forget(self, gid: str) -> None:
        for key, grants in list(self._by_caller.items()):
            if grants.pop(gid, None) is not None and not grants:
                del self._by_caller[key]

    async def load_all(self, conn: asyncpg.Connection) -> int:
        rows = await conn.fetch(query("break_glass_in_force"))
        self._by_caller = {}
        for r in rows:
            self._set(r)
        return len(rows)

    async def read(self, conn: asyncpg.Pool, key: str):
        """One grant; `key` is the NOTIFY payload (its id)."""
        return await conn.fetchrow(query("break_glass_get"), uuid.UUID(key))

    def apply(self, key: str, record) -> None:
        if record is None:
            self.forget(key)
        else:
            self._set(record)
