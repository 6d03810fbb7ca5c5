"""Break-glass: emergency access for provider staff (and partners, if the policy allows),
time-boxed, with a purpose and a ticket, and visible to the people it touches.

A role that roles.yaml marks `break_glass: true` may open a grant over one EUO (or one
user of it) for at most the policy's `break_glass.max_minutes`. While it is in force, the
grantee also holds the relation `break_glass` to that EUO or user, which unlocks only what
policy.csv grants to that relation — never a `(**)` data set, which the floors check
proves at load. Every request served under a grant names it in its audit row; the EUO's
admins list grants in `GET /v1/break-glass`, and each user touched sees purpose and ticket
in `GET /v1/me/access-log`. `DELETE /v1/break-glass/{id}` ends it early (the grantee, or
anyone whose audit scope covers the EUO).

Grants are mirrored in memory in every process (see notified.py): a request costs one
dictionary look-up. When the mirror is stale and the caller holds a grant in it, the
request is refused (503 `break_glass_unavailable`) rather than served under a grant that
may have been ended.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from .audit import AuditRow
from .clock import HOST_CLOCK, Clock, HostClock
from .db import POOL, query
from .endpoints import CALL, api, identifier, json_object, json_response, only, text
from .errors import Denied
from .listener import Listener
from .notified import STALENESS_S, NotifiedCache
from .pipeline import GATEWAY
from .principal import Principal, scope
from .webhooks import WEBHOOKS

RELATION = "break_glass"


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
            self.remember(r)
        return len(rows)

    async def reload(self, conn: asyncpg.Pool, key: str) -> None:
        """Re-read one grant; `key` is the NOTIFY payload (its id)."""
        record = await conn.fetchrow(query("break_glass_get"), uuid.UUID(key))
        if record is None:
            self.forget(key)
        else:
            self.remember(record)


def public(r: Any, viewer: Principal, now: float) -> dict[str, Any]:
    """A grant as this viewer may see it: as in the audit log, the people of another
    organisation (provider staff above all) by role only, never by name."""
    return {"id": str(r["id"]), "role": r["actor_role"],
            "sub": r["actor_sub"] if _colleague(viewer, r["actor_role"], r["actor_partner"])
            else None,
            "partner": r["actor_partner"], "euo": r["euo_id"], "user": r["user_sub"],
            "purpose": r["purpose"], "ticket": r["ticket"],
            "created_at": r["created_at"].isoformat(), "ends_at": r["ends_at"].isoformat(),
            "ended_at": r["ended_at"].isoformat() if r["ended_at"] else None,
            "ended_by": _ended_by(viewer, r),
            "in_force": r["ended_at"] is None and r["ends_at"].timestamp() > now}


def event_payload(r: Any) -> dict[str, Any]:
    """What a break-glass webhook says: the grant, its holder and who ended it by role and
    organisation only (as the EUO's admins see other organisations' people)."""
    return {"id": str(r["id"]), "euo": r["euo_id"], "user": r["user_sub"],
            "role": r["actor_role"], "partner": r["actor_partner"],
            "purpose": r["purpose"], "ticket": r["ticket"],
            "created_at": r["created_at"].isoformat(), "ends_at": r["ends_at"].isoformat(),
            "ended_at": r["ended_at"].isoformat() if r["ended_at"] else None,
            "ended_by": r["ended_by"].partition(":")[0] if r["ended_by"] else None}


def _colleague(viewer: Principal, role: str, partner: str | None, euo: str | None = None) -> bool:
    """Whether someone of this role (and partner, or EUO) is of the viewer's organisation;
    the Provider's roles see everyone (gateway/audit/api.py, same rule)."""
    claim = viewer.kind.tenant_claim
    if claim is None:
        return True
    theirs = {"partner": partner, "euo": euo}[claim]
    return role in viewer.kind.peers and theirs is not None and theirs == getattr(viewer, claim)


def _ended_by(viewer: Principal, r: Any) -> str | None:
    """`role:sub` of who ended the grant, or only the role when they are of another
    organisation. An EUO's people end only grants over their own EUO; a partner's person is
    known by organisation only when it is the grantee."""
    by = r["ended_by"]
    if by is None:
        return None
    role, _, sub = by.partition(":")
    grantee = (role, sub) == (r["actor_role"], r["actor_sub"])
    if _colleague(viewer, role, r["actor_partner"] if grantee else None, r["euo_id"]):
        return by
    return role


@api("/v1/break-glass")
async def open_grant(request: web.Request, principal: Principal, row: AuditRow):
    """Open a grant: {euo, user?, purpose, ticket, minutes}."""
    gw = request.app[GATEWAY]
    if not principal.kind.break_glass:
        raise Denied(403, "role_not_permitted", "your role may not use break-glass (roles.yaml)")
    body = await json_object(request, ("euo", "user", "purpose", "ticket", "minutes"),
                             "invalid_break_glass")
    euo = identifier(body.get("euo"), "euo")
    user = identifier(body["user"], "user") if body.get("user") is not None else None
    purpose = text(body.get("purpose"), "purpose", required=True).strip()
    ticket = text(body.get("ticket"), "ticket", required=True).strip()
    if not purpose or not ticket or len(ticket) > 128:
        raise Denied(400, "invalid_break_glass",
                     "purpose and ticket are required (a ticket of at most 128 characters)")
    minutes, most = body.get("minutes"), gw.catalog.break_glass_max_minutes
    if type(minutes) is not int or not 1 <= minutes <= most:
        raise Denied(400, "invalid_break_glass", f"minutes must be an integer from 1 to {most}")
    row.subject_euo, row.subject_users = euo, [user] if user else []
    if principal.kind.tenant_claim == "partner" and \
            gw.contracts.active_partner(euo) != principal.partner:
        raise Denied(403, "no_active_contract",
                     "your partner holds no active contract with this EUO")
    ends_at = datetime.fromtimestamp(gw.break_glass.clock.now(), UTC) + timedelta(minutes=minutes)
    gid = uuid.uuid4()
    row.break_glass = str(gid)            # the row that opens it names it

    webhooks = request.app[WEBHOOKS]

    async def change(conn):
        opened = await conn.fetchrow(query("break_glass_open"), gid, principal.role,
                                     principal.sub, principal.partner, euo, user, purpose,
                                     ticket, ends_at)
        await webhooks.queue_payload(conn, "break_glass.opened", event_payload(opened))
        return opened
    record = await request[CALL].allow(201, 0, change=change)
    gw.break_glass.remember(record)
    webhooks.wake()
    return json_response(public(record, principal, gw.break_glass.clock.now()), status=201)


@api("/v1/break-glass/{id}")
async def end_grant(request: web.Request, principal: Principal, row: AuditRow):
    """End a grant early: its grantee, or anyone whose audit scope covers its EUO."""
    gw = request.app[GATEWAY]
    try:
        gid = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise Denied(404, "no_such_grant", "no such break-glass grant") from None
    pool = request.app[POOL]
    current = await pool.fetchrow(query("break_glass_get"), gid)
    if current is None or not _may_end(gw, principal, current):
        raise Denied(404, "no_such_grant", "no such break-glass grant in your scope")
    row.subject_euo = current["euo_id"]
    row.subject_users = [current["user_sub"]] if current["user_sub"] else []
    row.break_glass = str(gid)
    by = f"{principal.role}:{principal.sub}"
    webhooks = request.app[WEBHOOKS]

    async def change(conn):
        # ended already (by someone else a moment ago, or on time): answer it as it is now,
        # never as it was read before the end (it would go back in force in the mirror)
        ended = await conn.fetchrow(query("break_glass_end"), gid, by)
        if ended is None:
            return await conn.fetchrow(query("break_glass_get"), gid)
        await webhooks.queue_payload(conn, "break_glass.ended", event_payload(ended))
        return ended
    record = await request[CALL].allow(200, 0, change=change)
    gw.break_glass.remember(record)
    webhooks.wake()
    return json_response(public(record, principal, gw.break_glass.clock.now()))


def _may_end(gw, principal: Principal, grant: Any) -> bool:
    if (principal.role, principal.sub, principal.partner) == (
            grant["actor_role"], grant["actor_sub"], grant["actor_partner"]):
        return True
    return principal.kind.may("audit") and _covers(gw, principal, grant["euo_id"])


def _covers(gw, principal: Principal, euo: str) -> bool:
    scope_euo, scope_partner = scope(principal)
    if scope_partner is not None:
        return gw.contracts.active_partner(euo) == scope_partner
    return scope_euo is None or scope_euo == euo


@api("/v1/break-glass", "audit")
async def list_grants(request: web.Request, principal: Principal, row: AuditRow):
    """The grants over EUOs in the caller's audit scope, newest first (a partner: its own,
    and those in force over an EUO while it held it; an EUO admin: its EUO)."""
    only(request.query, ("euo",))
    euo = request.query.get("euo")
    if euo is not None:
        identifier(euo, "euo")
    scope_euo, scope_partner = scope(principal)
    if scope_euo is not None and euo not in (None, scope_euo):
        rows = []                          # another EUO's: nothing in the caller's scope
    else:
        rows = await request.app[POOL].fetch(query("break_glass_list"), scope_euo or euo,
                                             scope_partner)
    users_by_euo: dict[str | None, set[str]] = {}
    for r in rows:
        users_by_euo.setdefault(r["euo_id"], set()).update([r["user_sub"]] if r["user_sub"] else [])
    request[CALL].about_each(users_by_euo)
    now = request.app[GATEWAY].break_glass.clock.now()
    return json_response({"grants": [public(r, principal, now) for r in rows]})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/break-glass", open_grant)
    app.router.add_get("/v1/break-glass", list_grants)
    app.router.add_delete("/v1/break-glass/{id}", end_grant)
