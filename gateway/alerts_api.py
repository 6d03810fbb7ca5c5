"""GET /v1/alerts and POST /v1/alerts/{id}/ack (docs/audit.md, Alerts): the alerts the
evaluator raised (alerts.py), scoped like /v1/audit, acknowledged with a note."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from .alerts import public
from .audit import AuditRow
from .db import POOL, query
from .endpoints import CALL, api, json_object, json_response, only, text
from .errors import Denied
from .principal import Principal, scope

MAX_LIMIT = 1000


def _shown(r: Any, viewer: Principal) -> dict[str, Any]:
    """An alert as this viewer may see it: another organisation's person by role only (as
    /v1/audit withholds them), and only the EUOs in the viewer's scope."""
    out = public(r)
    out["subject_euos"] = list(r["euos_in_scope"])
    claim = viewer.kind.tenant_claim
    if claim is not None:
        actor = out["actor"]
        ours = actor["role"] in viewer.kind.peers and actor[claim] == getattr(viewer, claim)
        if not ours:                 # another organisation's person: by role only
            out["actor"] = {"sub": None, "role": actor["role"], "partner": None, "euo": None}
            out["key"] = None
            out["audit"] = _without_actor(out["audit"])
    return out


def _without_actor(link: str) -> str:
    path, _, params = link.partition("?")
    return path + "?" + "&".join(p for p in params.split("&") if not p.startswith("actor="))


@api("/v1/alerts", "audit")
async def list_alerts(request: web.Request, principal: Principal, row: AuditRow):
    """The alerts in the caller's scope, newest first: `acked` (true/false), `rule`, `limit`."""
    only(request.query, ("acked", "rule", "limit"))
    acked = {"true": True, "false": False, None: None}.get(request.query.get("acked"), ...)
    if acked is ...:
        raise Denied("bad_filter", "acked must be true or false")
    rule = request.query.get("rule")
    if rule is not None and not (rule.isascii() and 0 < len(rule) <= 48):
        raise Denied("bad_filter", "rule must be a rule's name")
    limit = request.query.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
        raise Denied("bad_filter", f"limit must be from 1 to {MAX_LIMIT}")
    rows = await request.app[POOL].fetch(query("alert_list"), *scope(principal), acked, rule,
                                         int(limit), None)
    return json_response({"alerts": [_shown(r, principal) for r in rows]})


@api("/v1/alerts/{id}/ack", "audit")
async def ack_alert(request: web.Request, principal: Principal, row: AuditRow):
    """Acknowledge an alert in the caller's scope with a note: {note}. Audited with the
    change, in one transaction; a second acknowledgement changes nothing."""
    try:
        aid = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise Denied("no_such_alert", "no such alert") from None
    body = await json_object(request, ("note",), "invalid_ack")
    if not isinstance(body.get("note"), str):
        raise Denied("invalid_ack", "note is required (text, at most 1000 characters)")
    note = text(body["note"], "note", required=True).strip()
    if not note or len(note) > 1000:
        raise Denied("invalid_ack", "note is required (at most 1000 characters)")
    pool = request.app[POOL]
    found = await pool.fetchrow(query("alert_list"), *scope(principal), None, None, 1, aid)
    if found is None:
        raise Denied("no_such_alert", "no such alert in your scope")
    euos = list(found["euos_in_scope"])
    row.subject_euo = euos[0] if len(euos) == 1 else None
    by = f"{principal.role}:{principal.sub}"

    async def change(conn):
        acked = await conn.fetchrow(query("alert_ack"), aid, by, note)
        return await conn.fetchrow(query("alert_list"), *scope(principal), None, None, 1, aid) \
            if acked is not None else None
    record = await request[CALL].allow(200, 0, change=change) or found
    return json_response(_shown(record, principal))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/alerts", list_alerts)
    app.router.add_post("/v1/alerts/{id}/ack", ack_alert)
