"""GET /v1/audit/per-day: how many accesses each role made per day (UTC), within the caller's
scope and the same filters as GET /v1/audit. The counts are taken over exactly the rows
GET /v1/audit would list (the same named query, wrapped), so the scope is defined once.
A row of callers without a valid token counts as many as it stands for (`requests`); a call
written as two rows (an intent and its outcome) counts once."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from aiohttp import web

from .. import clock
from ..db import query
from ..endpoints import api, json_response
from ..errors import Denied
from ..principal import Principal
from ..reads import READS
from .api import FILTERS, parse_filters, scoped_args
from .writer import AuditRow

DEFAULT_SPAN = timedelta(days=31)
MAX_SPAN = timedelta(days=366)

PER_DAY = """select (a.at at time zone 'UTC')::date as day, a.actor_role as role,
       sum(case when a.phase = 'outcome' then 0 else coalesce(a.requests, 1) end)::bigint
           as accesses
  from ({rows}) a
 group by 1, 2
 order by 1, 2"""


@api("/v1/audit/per-day", "audit")
async def audit_per_day(request: web.Request, principal: Principal, row: AuditRow):
    """Accesses per day and role: `from` defaults to 31 days before `to` (default now); at
    most 366 days."""
    if "cursor" in request.query or "limit" in request.query:
        raise Denied("bad_filter", "per-day counts take no cursor or limit")
    filters = parse_filters(request.query, download=True, takes=FILTERS)
    until = filters.until or clock.now_utc()
    try:
        since = filters.since or until - DEFAULT_SPAN
    except OverflowError:        # `to` in the calendar's first month: no 31 days before it
        raise Denied("bad_filter", "to leaves no 31 days before it for from; "
                     "give from") from None
    if not timedelta(0) < until - since <= MAX_SPAN:
        raise Denied("bad_filter", "from must be before to, at most 366 days apart")
    filters = dataclasses.replace(filters, since=since, until=until, cursor=None, limit=None)
    async with request.app[READS].acquire(request) as conn, conn.transaction():
        await conn.execute("set local plan_cache_mode = force_custom_plan")
        rows = await conn.fetch(PER_DAY.format(rows=query("audit_query")),
                                *scoped_args(filters, principal))
    return json_response({
        "from": since.isoformat(), "to": until.isoformat(),
        "days": [{"day": r["day"].isoformat(), "role": r["role"], "accesses": r["accesses"]}
                 for r in rows]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/audit/per-day", audit_per_day)
