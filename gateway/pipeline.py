"""The request path for /telephony/… and /meeting/…, as one short list of stages:

    match route -> authenticate -> authorize -> forward -> redact -> audit

Every stage either passes the request on or raises Denied with a stable reason id; the
audit row is written for denials too. A response carrying personal data is sent only
after its audit row is committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

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
from .restrictions import RestrictionCache

log = logging.getLogger("gateway.pipeline")
JSON_ANSWER_LIMIT = 64 << 20


@dataclass
class Gateway:
    """Everything the request path needs, built once by create_app."""
    catalog: Catalog
    policy: Policy
    authn: Authenticator
    contracts: ContractCache
    restrictions: RestrictionCache
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


def record_denial(gw: Gateway, row: AuditRow, denial: Denied, started: float) -> None:
    """Audit a refused request; nobody waits, since a refusal carries no personal data."""
    row.decision, row.reason, row.status = "deny", denial.code, denial.status
    row.duration_ms = (time.perf_counter() - started) * 1000
    gw.audit.record_nowait(row)


async def handle(request: web.Request) -> web.StreamResponse:
    gw: Gateway = request.app[GATEWAY]
    started = time.perf_counter()
    row = new_row(request)
    try:
        return await _serve(request, gw, row, started)
    except Exception as e:
        denial = e if isinstance(e, Denied) else _internal(e, row.request_id)
        record_denial(gw, row, denial, started)
        return error_response(denial.status, denial.code, denial.message, row.request_id)


@dataclass(frozen=True, slots=True)
class Target:
    """A backend call the caller may make: the route, and who they are to its resource."""
    route: Route
    service: str
    path_qs: str
    action: str
    principal: Principal
    relations: frozenset[str]
    blocked: Callable[[str], bool] | None     # restricted users, for roles a restriction blocks


def match_route(gw: Gateway, method: str, raw_path: str, row: AuditRow,
                normalised: tuple[str, list[str]] | None = None) -> tuple[Route, dict[str, str], str]:
    """Stage 1: the route table entry for this path, or 404 (never forwarded)."""
    service, segments = normalised or normalise_path(raw_path)
    row.service = service
    matched = gw.catalog.match(service, segments)
    if matched is None or method not in matched[0].methods:
        raise Denied(404, "unknown_route", "no such route in the gateway's route table")
    route, params = matched
    row.route = route.name
    row.subject_euo = params[route.subject_euo]
    if route.subject_user:
        row.subject_users = [params[route.subject_user]]
    return route, params, service


def authorize(gw: Gateway, principal: Principal, method: str, raw_path: str, route: Route,
              params: dict[str, str], service: str) -> Target:
    """Stage 3: what the path alone decides (tenancy, restriction, any visible data set)."""
    euo = params[route.subject_euo]
    user = params.get(route.subject_user) if route.subject_user else None
    relations = path_relations(principal, euo, user, gw.contracts.active_partner)
    blocked = None
    if principal.role in gw.catalog.restriction_blocks:
        blocked = gw.restrictions.is_restricted
        if user is not None and blocked(user):
            raise Denied(403, "processing_restricted",
                         "this user has restricted the processing of their data")
    action = ACTION_OF_METHOD[method]
    _check_route(gw, route, principal, relations, action)
    return Target(route, service, raw_path[len(service) + 1:], action, principal, relations,
                  blocked)


async def _serve(request: web.Request, gw: Gateway, row: AuditRow,
                 started: float) -> web.StreamResponse:
    route, params, service = match_route(gw, request.method, request.raw_path, row,
                                         request.get(NORMALISED))
    principal = await gw.authn.authenticate(request.headers.get("Authorization"))
    row.actor_sub, row.actor_role, row.actor_partner, row.actor_euo = principal.audit_fields()
    target = authorize(gw, principal, request.method, request.raw_path, route, params, service)
    body = await _request_body(request, gw, target)
    upstream = await send(gw, target, request.method, request.headers, row, request.remote, body)
    if route.binary:
        return await _stream(request, gw, route, upstream, row, started)
    answer = await read_json(gw, target, upstream, row)
    if answer.body is None:
        answer = answer.encoded()
    response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    await commit(gw, row, started, answer.status, len(answer.body or b""), answer.served,
                 answer.removed)
    return response


async def send(gw: Gateway, target: Target, method: str, headers, row: AuditRow,
               client: str | None, body: bytes | None = None) -> aiohttp.ClientResponse:
    """Stage 4: forward; a backend error status becomes our own error, its body dropped."""
    upstream = await gw.backends.send(target.service, target.path_qs, method,
                                      forward_headers(headers, row.request_id, client), body)
    if upstream.status >= 300:
        upstream.release()
        raise _upstream_error(upstream.status)
    return upstream


@dataclass(slots=True)
class JsonAnswer:
    status: int
    headers: dict[str, str]
    body: bytes | None                 # the bytes to send (None: encode `document`)
    document: Any = None               # the redacted document, when it was parsed
    served: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def encoded(self) -> JsonAnswer:
        self.body = orjson.dumps(self.document)
        self.headers["Content-Type"] = "application/json"
        return self

    def parsed(self) -> Any:
        if self.document is None and self.body:
            self.document = orjson.loads(self.body)
        return self.document


async def read_json(gw: Gateway, target: Target, upstream, row: AuditRow) -> JsonAnswer:
    """Stage 5: the backend's JSON, redacted for the caller (bytes untouched if nothing must go)."""
    status = upstream.status
    headers = response_headers(upstream.headers)
    content_type = upstream.headers.get("Content-Type", "")
    raw = await gw.backends.read(upstream, JSON_ANSWER_LIMIT)
    if status == 204 or not raw:
        return JsonAnswer(status, headers, b"")
    if "json" not in content_type:
        raise Denied(502, "backend_unmappable", "the backend's answer is not JSON")
    route, principal = target.route, target.principal
    plan = gw.plan(route, principal.role, target.relations)
    if plan.passthrough and target.blocked is None:
        return JsonAnswer(status, headers, raw, served=list(plan.visible))
    try:
        document = orjson.loads(raw)
        redacted, outcome = redact(document, plan, principal.sub, gw.catalog, gw.policy.granted,
                                   now_utc(), target.blocked)
    except (orjson.JSONDecodeError, Unmappable):
        raise Denied(502, "backend_unmappable",
                     "the backend's answer does not match the route table") from None
    if route.top_decided and not outcome.served:
        raise Denied(403, "dataset_not_permitted", "you may not see any data of this resource")
    if outcome.subjects:
        row.subject_users = sorted(outcome.subjects | set(row.subject_users))
    return JsonAnswer(status, headers, None, redacted, sorted(outcome.served),
                      sorted(outcome.removed))


async def _request_body(request: web.Request, gw: Gateway, target: Target) -> bytes | None:
    """Read a write's JSON body (bounded) and check every field it sets may be written."""
    if target.action != "write":
        return None
    route, principal, relations = target.route, target.principal, target.relations
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
        if not route.data_sets & gw.policy.granted(principal.role, relations, "write"):
            raise Denied(403, "write_not_permitted", "you may not change any data of this resource")
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


def finish(row: AuditRow, status: int, size: int, started: float) -> None:
    """Fill in an allowed request's outcome."""
    row.decision, row.status, row.bytes = "allow", status, size
    row.duration_ms = (time.perf_counter() - started) * 1000


async def commit(gw: Gateway, row: AuditRow, started: float, status: int, size: int,
                 served: list[str], removed: list[str]) -> None:
    """Stage 6: the allowed request's row, committed before its answer may leave."""
    finish(row, status, size, started)
    row.data_sets, row.fields_removed = served, removed
    await gw.audit.commit(row)


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
NORMALISED = web.RequestKey("normalised_path", tuple)
