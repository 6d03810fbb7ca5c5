"""The request path for /telephony/… and /meeting/…, as one short list of stages:

    match route -> authenticate -> authorize -> forward -> redact -> audit

Every stage either passes the request on or raises Denied with a stable reason id; the
audit row is written for denials too. A response carrying personal data is sent only
after its audit row is committed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import aiohttp
import orjson
from aiohttp import web

from .audit import AuditRow, AuditWriter
from .authn import Authenticator
from .authz import Policy, path_relations
from .catalog import ACTION_OF_METHOD, Catalog, ObjectOf, Route
from .contracts import ContractCache
from .errors import Denied, error_response
from .principal import Principal
from .proxy import CHUNK, Backends, forward_headers, normalise_path, response_headers
from .redact import RedactionPlan, Unmappable, make_plan, now_utc, redact

log = logging.getLogger("gateway.pipeline")
JSON_ANSWER_LIMIT = 64 << 20


@dataclass
class Gateway:
    """Everything the request path needs, built once by create_app."""
    catalog: Catalog
    policy: Policy
    authn: Authenticator
    contracts: ContractCache
    backends: Backends
    audit: AuditWriter
    max_body_bytes: int

    def __post_init__(self):
        self.plan = lru_cache(maxsize=4096)(self._plan)

    def _plan(self, route: Route, role: str, relations: frozenset[str]) -> RedactionPlan:
        return make_plan(route, role, relations, self.catalog, self.policy.granted)


def new_row(request: web.Request) -> AuditRow:
    return AuditRow(at=now_utc(), request_id=request[REQUEST_ID], method=request.method,
                    path=request.raw_path[:2048], client_addr=request.remote)


def record_denial(request: web.Request, row: AuditRow, denial: Denied, started: float) -> None:
    """Audit a refused request; nobody waits, since a refusal carries no personal data."""
    row.decision, row.reason, row.status = "deny", denial.code, denial.status
    row.duration_ms = (time.perf_counter() - started) * 1000
    request.app[GATEWAY].audit.record_nowait(row)


async def handle(request: web.Request) -> web.StreamResponse:
    gw: Gateway = request.app[GATEWAY]
    started = time.perf_counter()
    row = new_row(request)
    try:
        return await _serve(request, gw, row, started)
    except Exception as e:
        denial = e if isinstance(e, Denied) else _internal(e, row.request_id)
        record_denial(request, row, denial, started)
        return error_response(denial.status, denial.code, denial.message, row.request_id)


async def _serve(request: web.Request, gw: Gateway, row: AuditRow,
                 started: float) -> web.StreamResponse:
    # 1. match route
    service, segments = normalise_path(request.raw_path)
    row.service = service
    matched = gw.catalog.match(service, segments)
    if matched is None or request.method not in matched[0].methods:
        raise Denied(404, "unknown_route", "no such route in the gateway's route table")
    route, params = matched
    row.route = route.name
    euo = params[route.subject_euo]
    user = params.get(route.subject_user) if route.subject_user else None
    row.subject_euo = euo
    if user:
        row.subject_users = [user]

    # 2. authenticate
    principal = await gw.authn.authenticate(request.headers.get("Authorization"))
    row.actor_sub, row.actor_role, row.actor_partner, row.actor_euo = principal.audit_fields()

    # 3. authorize what the path alone can decide
    relations = path_relations(principal, euo, user, gw.contracts.active_partner)
    action = ACTION_OF_METHOD[request.method]
    body = await _request_body(request, gw, route, principal, relations, action)
    _check_route(gw, route, principal, relations, action)

    # 4. forward
    prefix_len = len(service) + 1
    upstream = await gw.backends.send(
        service, request.raw_path[prefix_len:], request.method,
        forward_headers(request.headers, row.request_id, request.remote), body)
    if upstream.status >= 300:
        upstream.release()
        raise _upstream_error(upstream.status)

    # 5. redact, 6. audit, then answer
    if route.binary:
        return await _stream(request, gw, route, upstream, row, started)
    return await _json(gw, route, principal, relations, upstream, row, started)


async def _request_body(request: web.Request, gw: Gateway, route: Route,
                        principal: Principal, relations: frozenset[str],
                        action: str) -> bytes | None:
    """Read a write's JSON body (bounded) and check every field it sets may be written."""
    if action != "write":
        return None
    if request.content_length and request.content_length > gw.max_body_bytes:
        raise Denied(413, "body_too_large", f"request bodies are limited to {gw.max_body_bytes} bytes")
    try:
        raw = await request.content.read(gw.max_body_bytes + 1)
    except Exception:
        raise Denied(400, "bad_body", "the request body could not be read") from None
    if len(raw) > gw.max_body_bytes:
        raise Denied(413, "body_too_large", f"request bodies are limited to {gw.max_body_bytes} bytes")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Denied(400, "bad_json", "the request body is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(route.body, ObjectOf):
        raise Denied(400, "bad_json", "the request body must be a JSON object")
    writable = gw.policy.granted(principal.role, relations, "write")
    for key in doc:
        spec = route.body.fields.get(key)
        data_set = getattr(spec, "data_set", None)
        if data_set is None:
            raise Denied(400, "field_not_writable", f"{key!r} cannot be changed through the gateway")
        if data_set not in writable:
            raise Denied(403, "write_not_permitted", f"you may not change {data_set}")
    return raw


def _check_route(gw: Gateway, route: Route, principal: Principal,
                 relations: frozenset[str], action: str) -> None:
    """Refuse before forwarding when the caller can see nothing of this resource."""
    if route.binary:
        allowed = gw.policy.granted(principal.role, relations, action)
        if not set(route.binary) <= allowed:
            raise Denied(403, "dataset_not_permitted",
                         f"you may not {action} {' / '.join(route.binary)} here")
        return
    if action == "write":
        return
    possible = relations | route.body_relations if principal.role == "user" else relations
    if not route.data_sets & gw.policy.granted(principal.role, possible, "read"):
        raise Denied(403, "dataset_not_permitted", "you may not see any data of this resource")


def _internal(error: Exception, request_id: str) -> Denied:
    log.error("request %s failed", request_id, exc_info=error)
    return Denied(502, "internal_error", "the gateway could not complete the request")


def _upstream_error(status: int) -> Denied:
    if status == 404:
        return Denied(404, "backend_not_found", "the backend has no such resource")
    if status in (400, 409, 422):
        return Denied(400, "backend_rejected", "the backend refused the request")
    return Denied(502, "backend_error", f"the backend answered {status}")


async def _json(gw: Gateway, route: Route, principal: Principal, relations: frozenset[str],
                upstream, row: AuditRow, started: float) -> web.StreamResponse:
    status = upstream.status
    headers = response_headers(upstream.headers)
    content_type = upstream.headers.get("Content-Type", "")
    raw = await gw.backends.read(upstream, JSON_ANSWER_LIMIT)
    if status == 204 or not raw:
        return await _answer(gw, row, started, web.Response(status=status, headers=headers),
                             0, [], [])
    if "json" not in content_type:
        raise Denied(502, "backend_unmappable", "the backend's answer is not JSON")
    plan = gw.plan(route, principal.role, relations)
    if plan.passthrough:
        return await _answer(gw, row, started, web.Response(status=status, body=raw,
                             headers=headers), len(raw), sorted(plan.visible), [])
    try:
        document = orjson.loads(raw)
        redacted, outcome = redact(document, plan, principal.sub, gw.catalog,
                                   gw.policy.granted, now_utc())
    except (orjson.JSONDecodeError, Unmappable):
        raise Denied(502, "backend_unmappable",
                     "the backend's answer does not match the route table") from None
    if route.top_decided and not outcome.served:
        raise Denied(403, "dataset_not_permitted", "you may not see any data of this resource")
    if outcome.subjects:
        row.subject_users = sorted(outcome.subjects | set(row.subject_users))
    body = orjson.dumps(redacted)
    headers["Content-Type"] = "application/json"
    return await _answer(gw, row, started, web.Response(status=status, body=body, headers=headers),
                         len(body), sorted(outcome.served), sorted(outcome.removed))


def finish(row: AuditRow, status: int, size: int, started: float) -> None:
    """Fill in an allowed request's outcome."""
    row.decision, row.status, row.bytes = "allow", status, size
    row.duration_ms = (time.perf_counter() - started) * 1000


async def _answer(gw: Gateway, row: AuditRow, started: float, response: web.Response,
                  size: int, served: list[str], removed: list[str]) -> web.Response:
    finish(row, response.status, size, started)
    row.data_sets, row.fields_removed = served, removed
    await gw.audit.commit(row)
    return response


async def _stream(request: web.Request, gw: Gateway, route: Route, upstream, row: AuditRow,
                  started: float) -> web.StreamResponse:
    """Commit the audit row, then copy the binary body through in chunks."""
    finish(row, upstream.status, upstream.content_length or 0, started)
    row.data_sets = sorted(route.binary)
    try:
        await gw.audit.commit(row)
    except Denied:
        upstream.release()
        raise
    response = web.StreamResponse(status=upstream.status, headers=response_headers(upstream.headers))
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await response.write(chunk)
    except (TimeoutError, aiohttp.ClientError) as e:
        # too late for an error body: cut the connection so the client sees a short read
        log.warning("request %s: backend broke off a binary answer: %s", row.request_id, e)
        response.force_close()
        return response
    finally:
        upstream.release()
    await response.write_eof()
    return response


GATEWAY = web.AppKey("gateway", Gateway)
REQUEST_ID = web.RequestKey("request_id", str)
