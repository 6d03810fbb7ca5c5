"""The data-subject requests ledger: a user files rectification, erasure, restriction or
objection requests; the admins whose scope covers that user answer them within 30 days.

A restriction that is open or accepted is enforced in the request path at once (see
restrictions.py); every change here is audited like any access.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from .audit import AuditRow
from .db import POOL, query
from .endpoints import CALL, ME, api, json_object, json_response, text
from .errors import Denied
from .pipeline import GATEWAY
from .principal import Principal, scope

TYPES = ("rectification", "erasure", "restriction", "objection")
STATUSES = ("open", "accepted", "rejected", "completed")
RESTRICTING = ("open", "accepted")


def public(row) -> dict[str, Any]:
    out = dict(row)
    out["id"] = str(out["id"])
    for key in ("created_at", "due_at", "updated_at"):
        out[key] = out[key].isoformat()
    return out


@api("/v1/me/requests", ME)
async def create_request(request: web.Request, principal: Principal, row: AuditRow):
    """File a request about the caller's own data; it is due 30 days from now."""
    body = await json_object(request)
    kind = body.get("type")
    if kind not in TYPES:
        raise Denied(400, "invalid_request", f"type must be one of {', '.join(TYPES)}")
    data_sets = body.get("data_sets")
    catalog = request.app[GATEWAY].catalog
    if (not isinstance(data_sets, list) or not data_sets
            or not all(isinstance(d, str) and d in catalog.data_sets for d in data_sets)):
        raise Denied(400, "invalid_request", "data_sets must list data sets of GET /v1/catalog")
    detail = text(body.get("detail", ""), "detail", required=True)
    if len(set(data_sets)) != len(data_sets):
        raise Denied(400, "invalid_request", "data_sets lists a data set twice")
    row.subject_euo, row.subject_users, row.data_sets = principal.euo, [principal.sub], data_sets
    async def change(conn):
        return await conn.fetchrow(query("create_request"), principal.sub, principal.euo, kind,
                                   data_sets, detail)
    created = await request[CALL].allow(201, 0, change=change)
    if kind == "restriction":
        request.app[GATEWAY].restrictions.remember(principal.euo, principal.sub, True)
    return json_response(public(created), status=201)


@api("/v1/me/requests", ME)
async def my_requests(request: web.Request, principal: Principal, row: AuditRow):
    row.subject_euo, row.subject_users = principal.euo, [principal.sub]
    rows = await request.app[POOL].fetch(query("my_requests"), principal.euo, principal.sub)
    return json_response({"requests": [public(r) for r in rows]})




@api("/v1/requests", "requests")
async def list_requests(request: web.Request, principal: Principal, row: AuditRow):
    """The requests of users in the caller's scope, overdue ones first."""
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise Denied(400, "bad_filter", f"status must be one of {', '.join(STATUSES)}")
    rows = await request.app[POOL].fetch(query("requests_in_scope"), *scope(principal), status)
    users_by_euo: dict[str | None, set[str]] = {}
    for r in rows:
        users_by_euo.setdefault(r["euo_id"], set()).add(r["user_sub"])
    request[CALL].about_each(users_by_euo)
    return json_response({"requests": [public(r) for r in rows]})


@api("/v1/requests/{id}", "requests")
async def update_request(request: web.Request, principal: Principal, row: AuditRow):
    """Accept, reject or complete a request in the caller's scope."""
    try:
        request_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise Denied(404, "no_such_request", "no such request") from None
    body = await json_object(request)
    status = body.get("status")
    if status not in STATUSES:
        raise Denied(400, "invalid_request", f"status must be one of {', '.join(STATUSES)}")
    resolution = text(body.get("resolution"), "resolution")
    pool = request.app[POOL]
    gw = request.app[GATEWAY]
    current = await pool.fetchrow(query("get_request"), request_id)
    if current is None or not _covers(gw, principal, current):
        raise Denied(404, "no_such_request", "no such request in your scope")
    if current["type"] == "restriction" and principal.role in gw.catalog.restricted_roles:
        # the party a restriction blocks may not lift it: the EUO's admin or staff decide
        raise Denied(403, "role_not_permitted",
                     "a restriction that blocks your role is answered by the EUO's admin")
    row.subject_euo, row.subject_users = current["euo_id"], [current["user_sub"]]
    resolver = f"{principal.role}:{principal.partner or principal.euo or 'provider'}"
    euo, user = current["euo_id"], current["user_sub"]

    async def change(conn):
        updated = await conn.fetchrow(query("update_request"), request_id, status, resolution,
                                      resolver)
        return updated, await conn.fetchval(query("is_restricted"), euo, user)
    updated, restricted = await request[CALL].allow(200, 0, change=change)
    if updated["type"] == "restriction":
        gw.restrictions.remember(euo, user, restricted)
    return json_response(public(updated))


def _covers(gw, principal: Principal, req) -> bool:
    """Whether the request is about a user in the caller's scope (a partner's: an EUO it
    holds an active contract with today)."""
    claim = principal.kind.tenant_claim
    if claim is None:
        return True
    if claim == "euo":
        return req["euo_id"] == principal.euo
    return gw.contracts.active_partner(req["euo_id"]) == principal.partner


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/me/requests", create_request)
    app.router.add_get("/v1/me/requests", my_requests)
    app.router.add_get("/v1/requests", list_requests)
    app.router.add_patch("/v1/requests/{id}", update_request)
