"""The data-subject requests ledger: a user files rectification, erasure, restriction or
objection requests; the admins whose scope covers that user answer them within 30 days.

A request moves through explicit states (TRANSITIONS); each transition commits together with
its audit row, its `dsr_transitions` row and the webhook it causes. An accepted erasure
calls the backend delete routes of the route table (erasure.py) and ends `completed` or
`failed`. A restriction or objection that is open or accepted restricts the data sets it
names, enforced in the request path at once (see restrictions.py).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from aiohttp import web

from .audit import AuditRow
from .audit.writer import Change
from .call import Call
from .context import GATEWAY, REQUEST_ID, Gateway
from .db import POOL, query
from .endpoints import CALL, ME, api, json_object, json_response, only, text
from .erasure import Erasure, Ledger
from .errors import Denied
from .policy.catalog import ObjectOf
from .principal import Principal, scope
from .webhooks import WEBHOOKS, Webhooks

log = logging.getLogger("gateway.subject_requests")

TYPES = ("rectification", "erasure", "restriction", "objection")
STATUSES = ("open", "accepted", "rejected", "completed", "withdrawn", "failed")
RESTRICTING = ("open", "accepted")
RESTRICTING_TYPES = ("restriction", "objection")
FINAL = ("completed", "rejected", "withdrawn")
ADMIN, SUBJECT, GATEWAY_ITSELF = "admin", "subject", "gateway"
# (from, to) -> who may make the move: an admin whose scope covers the user, the data
# subject, or the gateway itself (an erasure's outcome)
TRANSITIONS: dict[tuple[str, str], str] = {
    ("open", "accepted"): ADMIN, ("open", "rejected"): ADMIN, ("open", "withdrawn"): SUBJECT,
    ("accepted", "completed"): ADMIN, ("accepted", "rejected"): ADMIN,
    ("accepted", "withdrawn"): SUBJECT, ("accepted", "failed"): GATEWAY_ITSELF,
    ("failed", "accepted"): ADMIN, ("failed", "rejected"): ADMIN, ("failed", "withdrawn"): SUBJECT,
}


def public(row) -> dict[str, Any]:
    out = dict(row)
    out["id"] = str(out["id"])
    for key in ("created_at", "due_at", "updated_at"):
        out[key] = out[key].isoformat()
    for key in ("due_soon_notified_at", "overdue_notified_at"):
        out.pop(key, None)
    return out


def _request_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        raise Denied(404, "no_such_request", "no such request") from None


def _actor(principal: Principal | None) -> str:
    """How a transition names who made it: role and organisation (the user: themself; the
    gateway: None)."""
    if principal is None:
        return "gateway"
    if principal.kind.data_subject:
        return f"user:{principal.euo}:{principal.sub}"
    return f"{principal.role}:{principal.partner or principal.euo or 'provider'}"


def may_act(gw: Gateway, principal: Principal, req, to: str) -> None:
    """Who may move a request to `to` (the one place that decides it); Denied otherwise:
    404 when the request is not in the caller's scope, 403/409 when it is but the move is
    not theirs or not allowed from its state."""
    mover = TRANSITIONS.get((req["status"], to))
    if principal.kind.data_subject:
        if req["euo_id"] != principal.euo or req["user_sub"] != principal.sub:
            raise Denied(404, "no_such_request", "no such request of yours")
        if mover != SUBJECT:
            raise _no_transition(req, to, "you may withdraw your own request, nothing else")
        return
    if not _covers(gw, principal, req):
        raise Denied(404, "no_such_request", "no such request in your scope")
    if req["type"] in RESTRICTING_TYPES and principal.role in gw.catalog.restricted_roles:
        # the party a restriction blocks may not lift it: the EUO's admin or staff decide
        raise Denied(403, "role_not_permitted",
                     "a restriction that blocks your role is answered by the EUO's admin")
    if mover != ADMIN:       # accepted → accepted too: an erasure under way is not run twice
        raise _no_transition(req, to, "")
    if req["type"] == "erasure" and to == "completed":
        raise _no_transition(req, to, "an erasure is completed by the gateway once every "
                             "backend call succeeded: accept it")


def _no_transition(req, to: str, why: str) -> Denied:
    allowed = sorted(t for (f, t), who in TRANSITIONS.items()
                     if f == req["status"] and who != GATEWAY_ITSELF)
    return Denied(409, "invalid_transition",
                  f"a {req['status']} request cannot become {to} "
                  f"(from {req['status']}: {', '.join(allowed) or 'none, it is final'})"
                  + (f"; {why}" if why else ""))


def _covers(gw, principal: Principal, req) -> bool:
    """Whether the request is about a user in the caller's scope (a partner's: an EUO it
    holds an active contract with today)."""
    claim = principal.kind.tenant_claim
    if claim is None:
        return True
    if claim == "euo":
        return req["euo_id"] == principal.euo
    return gw.contracts.active_partner(req["euo_id"]) == principal.partner

# a request's rows name its subject and data sets; they serve none. A listing leaves one
# row per user, so that no user's access log (or slice) tells her who else filed one
NAMED = "named"


@api("/v1/me/requests", ME)
async def create_request(request: web.Request, principal: Principal, row: AuditRow):
    """File a request about the caller's own data; it is due 30 days from now."""
    body = await json_object(request, ("type", "data_sets", "detail"), "invalid_request")
    kind = body.get("type")
    if kind not in TYPES:
        raise Denied(400, "invalid_request", f"type must be one of {', '.join(TYPES)}")
    data_sets = body.get("data_sets")
    gw = request.app[GATEWAY]
    catalog = gw.catalog
    if (not isinstance(data_sets, list) or not data_sets
            or not all(isinstance(d, str) and d in catalog.data_sets for d in data_sets)):
        raise Denied(400, "invalid_request", "data_sets must list data sets of GET /v1/catalog")
    detail = text(body.get("detail", ""), "detail", required=True)
    if len(set(data_sets)) != len(data_sets):
        raise Denied(400, "invalid_request", "data_sets lists a data set twice")
    row.subject_euo, row.subject_users, row.data_sets = principal.euo, [principal.sub], data_sets
    row.access = NAMED

    async def change(conn):
        created = await conn.fetchrow(query("create_request"), principal.sub, principal.euo,
                                      kind, data_sets, detail)
        await conn.execute(query("add_transition"), created["id"], None, "open",
                           _actor(principal), None)
        await request.app[WEBHOOKS].queue(conn, "request.filed", created["id"])
        restricted = await conn.fetchval(query("restricted_data_sets"), principal.euo,
                                         principal.sub)
        return created, restricted
    created, restricted = await request[CALL].allow(201, 0, change=change)
    request.app[WEBHOOKS].wake()
    if kind in RESTRICTING_TYPES:
        gw.restrictions.remember(principal.euo, principal.sub, restricted)
    out = public(created)
    if kind == "rectification":
        out["self_service"] = self_service(gw, principal, data_sets)
    return json_response(out, status=201)


def self_service(gw: Gateway, principal: Principal, data_sets: list[str]) -> list[dict]:
    """Where the user corrects these data sets themself: each PATCH route of the route table
    whose fields of a data set the policy lets them write. The others wait for an admin."""
    writable = gw.policy.granted(principal.role, frozenset({"self"}), "write")
    out = []
    for route in gw.catalog.routes:
        if "PATCH" not in route.methods or route.subject_user is None \
                or not isinstance(route.body, ObjectOf):
            continue
        fields: dict[str, list[str]] = {}
        for name, spec in route.body.fields.items():
            ds = getattr(spec, "data_set", None)
            if ds in data_sets and ds in writable:
                fields.setdefault(ds, []).append(name)
        path = "/" + route.service + route.path.format_map(
            {route.subject_euo: principal.euo, route.subject_user: principal.sub})
        out += [{"data_set": ds, "method": "PATCH", "path": path, "fields": names}
                for ds, names in sorted(fields.items())]
    return out


@api("/v1/me/requests", ME)
async def my_requests(request: web.Request, principal: Principal, row: AuditRow):
    row.subject_euo, row.subject_users = principal.euo, [principal.sub]
    row.access = NAMED
    rows = await request.app[POOL].fetch(query("my_requests"), principal.euo, principal.sub)
    return json_response({"requests": [public(r) for r in rows]})


async def request_details(pool, req) -> dict[str, Any]:
    out = public(req)
    out["transitions"] = [
        {"from": t["from_status"], "to": t["to_status"], "at": t["at"].isoformat(),
         "by": t["actor"]} for t in await pool.fetch(query("request_transitions"), req["id"])]
    out["erasure_calls"] = [
        {"at": c["at"].isoformat(), "data_sets": c["data_sets"], "method": c["method"],
         "path": c["path"], "status": c["status"], "outcome": c["outcome"], "reason": c["reason"]}
        for c in await pool.fetch(query("request_erasure_calls"), req["id"])]
    return out


@api("/v1/me/requests/{id}", ME)
async def my_request(request: web.Request, principal: Principal, row: AuditRow):
    """One of the caller's requests with its transitions and erasure calls."""
    request_id = _request_id(request)
    row.subject_euo, row.subject_users = principal.euo, [principal.sub]
    row.access = NAMED
    pool = request.app[POOL]
    req = await pool.fetchrow(query("get_request"), request_id)
    if req is None or req["euo_id"] != principal.euo or req["user_sub"] != principal.sub:
        raise Denied(404, "no_such_request", "no such request of yours")
    return json_response(await request_details(pool, req))


@api("/v1/requests/{id}", "requests")
async def get_request(request: web.Request, principal: Principal, row: AuditRow):
    """A request in the caller's scope with its transitions and erasure calls."""
    request_id = _request_id(request)
    pool = request.app[POOL]
    req = await pool.fetchrow(query("get_request"), request_id)
    if req is None or not _covers(request.app[GATEWAY], principal, req):
        raise Denied(404, "no_such_request", "no such request in your scope")
    row.subject_euo, row.subject_users = req["euo_id"], [req["user_sub"]]
    row.access = NAMED
    return json_response(await request_details(pool, req))


@api("/v1/requests", "requests")
async def list_requests(request: web.Request, principal: Principal, row: AuditRow):
    """The requests of users in the caller's scope, overdue ones first."""
    only(request.query, ("status",))
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise Denied(400, "bad_filter", f"status must be one of {', '.join(STATUSES)}")
    rows = await request.app[POOL].fetch(query("requests_in_scope"), *scope(principal), status)
    users_by_euo: dict[str | None, set[str]] = {}
    for r in rows:
        users_by_euo.setdefault(r["euo_id"], set()).add(r["user_sub"])
    request[CALL].about_each(users_by_euo, apart=True)
    request[CALL].row.access = NAMED
    return json_response({"requests": [public(r) for r in rows]})


@api("/v1/requests/{id}", "requests")
async def update_request(request: web.Request, principal: Principal, row: AuditRow):
    """Accept, reject or complete a request in the caller's scope; accepting an erasure
    runs its backend calls."""
    return await _transition(request, principal, row, ("accepted", "rejected", "completed"),
                             ("status", "resolution"))


@api("/v1/me/requests/{id}", ME)
async def withdraw_request(request: web.Request, principal: Principal, row: AuditRow):
    """The user withdraws their own request (a restriction or objection stops at once)."""
    return await _transition(request, principal, row, ("withdrawn",), ("status",))


async def _transition(request: web.Request, principal: Principal, row: AuditRow,
                      offered: tuple[str, ...], fields: tuple[str, ...]) -> web.Response:
    request_id = _request_id(request)
    body = await json_object(request, fields, "invalid_request")
    status = body.get("status")
    if status not in offered:
        raise Denied(400, "invalid_request", f"status must be one of {', '.join(offered)}")
    resolution = text(body.get("resolution"), "resolution")
    pool = request.app[POOL]
    gw = request.app[GATEWAY]
    current = await pool.fetchrow(query("get_request"), request_id)
    if current is None:
        raise Denied(404, "no_such_request", "no such request")
    may_act(gw, principal, current, status)
    row.subject_euo, row.subject_users = current["euo_id"], [current["user_sub"]]
    row.access = NAMED
    updated = await _move(request[CALL], gw, request.app[WEBHOOKS], principal, current, status,
                          resolution)
    request.app[WEBHOOKS].wake()
    if updated["type"] == "erasure" and status == "accepted":
        updated = await _erase(request, gw, principal, updated)
        if isinstance(updated, web.Response):
            return updated
    return json_response(await request_details(pool, updated))


async def _move(call: Call, gw: Gateway, webhooks: Webhooks, principal: Principal | None, current,
                to: str, resolution: str | None, before: Change | None = None):
    """Commit one transition with the call's audit row, its transitions row and the
    webhooks it causes (and `before`, when given); 409 when the request moved meanwhile."""
    euo, user = current["euo_id"], current["user_sub"]
    lifts = (current["type"] in RESTRICTING_TYPES and current["status"] in RESTRICTING
             and to not in RESTRICTING)

    async def change(conn):
        if before is not None:
            await before(conn)
        updated = await conn.fetchrow(query("update_request"), current["id"], to, resolution,
                                      _actor(principal), current["status"])
        if updated is None:
            raise Denied(409, "invalid_transition",
                         "the request changed meanwhile; read it again")
        await conn.execute(query("add_transition"), current["id"], current["status"], to,
                           _actor(principal), resolution)
        if to in FINAL:
            await webhooks.queue(conn, "request.resolved", current["id"])
        elif to == "failed":
            await webhooks.queue(conn, "request.erasure_failed", current["id"])
        if lifts:
            await webhooks.queue(conn, "restriction.lifted", current["id"])
        return updated, await conn.fetchval(query("restricted_data_sets"), euo, user)
    updated, restricted = await call.allow(200, 0, change=change)
    if updated["type"] in RESTRICTING_TYPES:
        gw.restrictions.remember(euo, user, restricted)
    return updated


async def _erase(request: web.Request, gw: Gateway, principal: Principal, req):
    """Run an accepted erasure's backend calls (each audited, each DELETE written ahead),
    count what remains, then commit its outcome: `completed` when every call succeeded and
    nothing asked remains, else `failed` (nothing claimed erased that was not); the
    resolution says what was erased, whose other data went with it, what failed, what needs
    a wider erasure, what remains and what no backend can erase.
    Returns the request as updated, or the error answer when the outcome was refused."""
    request_id = request[REQUEST_ID]
    erasure = Erasure(gw, list(gw.erasers), principal, req["euo_id"], req["user_sub"],
                      request_id, request.remote, Ledger(request.app[POOL], req["id"]),
                      gw.erasure_deadline_s)
    result = await erasure.run(list(req["data_sets"]))
    call = gw.new_call(request_id, "PATCH", request.raw_path, request.remote)
    call.identify(principal)
    call.row.service, call.row.route = "gateway", "gateway:/v1/requests/{id}"
    call.about(req["euo_id"], [req["user_sub"]])
    call.row.access = NAMED
    final = "completed" if result.ok else "failed"
    try:
        updated = await _move(call, gw, request.app[WEBHOOKS], principal, req, final,
                              result.resolution())
    except Denied as e:
        # the request left `accepted` meanwhile (withdrawn, rejected: 409), or the outcome's
        # row cannot be committed (503; the scan fails it later): the accept was committed
        # already, so this is the answer, audited as the outcome's own refusal
        return await call.refuse(e)
    request.app[WEBHOOKS].wake()
    return updated


INTERRUPTED = ("interrupted: the gateway stopped before this erasure's backend calls were "
               "done (its erasure calls say how far it got); accept again to go on")


async def fail_interrupted_erasures(gw: Gateway, webhooks: Webhooks, pool,
                                    older_than_s: float) -> int:
    """An erasure still `accepted` long after it was accepted ran in a gateway that stopped
    midway (a crash, a kill): move it to `failed`, audited as the gateway's own act, so that
    nothing claims it done and an admin can accept it again. Returns how many."""
    moved = 0
    for req in await pool.fetch(query("interrupted_erasures"), older_than_s):
        unknown = await pool.fetch(query("unknown_erasure_calls"), req["id"])
        resolution = INTERRUPTED + (
            f"; {len(unknown)} DELETE{'s' if len(unknown) != 1 else ''} sent with no recorded "
            f"outcome (outcome unknown): {', '.join(r['path'] for r in unknown)}"
            if unknown else "")
        call = gw.new_call(str(uuid.uuid4()), "PATCH", f"/v1/requests/{req['id']}", None)
        call.row.service, call.row.route = "gateway", "gateway:/v1/requests/{id}"
        call.row.reason = "erasure_interrupted"
        call.about(req["euo_id"], [req["user_sub"]])
        call.row.access = NAMED
        try:
            await _move(call, gw, webhooks, None, req, "failed", resolution)
            moved += 1
        except Denied as e:     # moved meanwhile (409), or the audit log is unavailable
            log.warning("interrupted erasure %s not failed: %s", req["id"], e.code)
    if moved:
        webhooks.wake()
    return moved


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/me/requests", create_request)
    app.router.add_get("/v1/me/requests", my_requests)
    app.router.add_get("/v1/me/requests/{id}", my_request)
    app.router.add_patch("/v1/me/requests/{id}", withdraw_request)
    app.router.add_get("/v1/requests", list_requests)
    app.router.add_get("/v1/requests/{id}", get_request)
    app.router.add_patch("/v1/requests/{id}", update_request)
