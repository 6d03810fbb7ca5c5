"""The retention report: which backends served data past its data set's retention (and
call records not yet anonymised), read from the receipts of the audit rows — evidence for
the Provider to fix its backends. `gateway retention report` and `GET /v1/admin/retention`
(provider staff) give the same lines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from . import clock
from .audit import AuditRow
from .db import query
from .endpoints import api, json_response, only
from .errors import Denied
from .principal import Principal
from .reads import READS
from .redact import MASKING, RETENTION

DEFAULT_DAYS = 30
REASONS = (RETENTION, MASKING)


def window(since: str | None, until: str | None, now: datetime | None = None
           ) -> tuple[datetime, datetime]:
    """[from, to) from ISO 8601 times with a zone; default the last 30 days. ValueError
    names what is wrong."""
    now = now or clock.now_utc()
    end = _time(until, "to") or now + timedelta(seconds=1)
    start = _time(since, "from") or end - timedelta(days=DEFAULT_DAYS)
    if start >= end:
        raise ValueError("from must be before to")
    return start, end


def _time(raw: str | None, name: str) -> datetime | None:
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time, e.g. 2026-11-01T00:00:00Z") from None
    if value.tzinfo is None:
        raise ValueError(f"{name} must carry a time zone (e.g. Z)")
    if not datetime(1970, 1, 1, tzinfo=UTC) <= value <= datetime(9999, 1, 1, tzinfo=UTC):
        raise ValueError(f"{name} is out of range")
    return value


async def report(conn: asyncpg.Connection | asyncpg.Pool, start: datetime, end: datetime
                 ) -> list[dict[str, Any]]:
    """One line per (service, route, reason, data set): `retention` lines are elements past
    retention that a backend still served, `masking` lines records it served un-anonymised
    past the anonymisation age (the gateway withheld or masked both)."""
    rows = await conn.fetch(query("retention_report"), start, end, list(REASONS))
    return [{"service": r["service"], "route": r["route"], "reason": r["reason"],
             "data_set": r["data_set"], "elements": r["elements"], "requests": r["requests"],
             "euos": r["euos"], "some_euos": [e for e in r["some_euos"] if e is not None],
             "first_seen": r["first_seen"].isoformat(), "last_seen": r["last_seen"].isoformat()}
            for r in rows]


@api("/v1/admin/retention", "retention")
async def retention_view(request: web.Request, principal: Principal, row: AuditRow) -> web.Response:
    """GET /v1/admin/retention[?from=&to=]: the retention report over a window."""
    only(request.query, ("from", "to"))
    try:
        start, end = window(request.query.get("from"), request.query.get("to"))
    except ValueError as e:
        raise Denied("bad_filter", str(e)) from None
    async with request.app[READS].acquire(request) as conn:
        lines = await report(conn, start, end)
    return json_response({"from": start.isoformat(), "to": end.isoformat(), "backends": lines})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/admin/retention", retention_view)


async def cli(dsn: str, since: str | None, until: str | None) -> int:
    """`gateway retention report`: the report as NDJSON on stdout, one line per backend
    route and data set; exit 0 (lines or not), 2 on a bad window."""
    import sys

    import orjson
    try:
        start, end = window(since, until)
    except ValueError as e:
        print(f"gateway retention report: {e}", file=sys.stderr)
        return 2
    conn = await asyncpg.connect(dsn)
    try:
        for line in await report(conn, start, end):
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
    finally:
        await conn.close()
    return 0
