"""The request path for /telephony/… and /meeting/…, as one short list of stages:

    authenticate -> match route -> authorize -> forward -> redact -> audit

Every stage either passes the request on or raises Denied with a stable reason id. One
`Call` keeps the request's audit row: refusals are audited too (before they are
answered, once the caller is known), and a response carrying personal data is sent only
after its row is committed. Authentication comes first so that a refusal can name who
was refused; a caller without a valid token is only counted (see call.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from .backend_client import Answer
from .call import Call
from .context import GATEWAY, REQUEST_ID, Gateway
from .errors import Denied
from .grammar import CONTROL, MAX_TEXT, audit_text
from .policy.authz import BREAK_GLASS, path_relations
from .policy.catalog import ACTION_OF_METHOD, ObjectOf, Route
from .principal import Principal
from .proxy import CHUNK, binary_headers, forward_headers, stamp
from .redact import (
    RETENTION,
    Outcome,
    SubjectMismatch,
    Unmappable,
    check_shape,
    now_utc,
    receipt,
    redact,
)
from .stream import Elements
from .target import Matched

log = logging.getLogger("gateway.pipeline")


async def handle(request: web.Request) -> web.StreamResponse:
    """The proxy's paths as a route of the app (behind its middleware), when the server is
    not a GatewayRunner's (see `direct`)."""
    return await serve(request.app[GATEWAY], request, request[REQUEST_ID])


async def serve(gw: Gateway, request: web.BaseRequest, request_id: str) -> web.StreamResponse:
    """One proxied request, answered with the headers every answer carries (the request id,
    no shared caching) whether or not the app's middleware and prepare hook ran."""
    call = gw.call(request, request_id)
    try:
        return await _serve(request, gw, call)    # its answers carry them from the start
    except Exception as e:
        if call.committed:         # a file under way ended (and was recorded) already
            raise
        response = await call.refuse(e)
    stamp(response.headers, request_id)
    return response


def direct(app: web.Application, app_handler: Callable) -> Callable:
    """A server's request handler that hands the proxy's paths straight to `serve`, and
    everything else to the app (`app_handler`, the app's own `_handle`). The proxy's path
    then pays no route resolution, middleware or prepare signal: it sets what they would
    itself. A request expecting `100 Continue` goes through the app, which answers that."""
    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        gw = app.get(GATEWAY)
        if gw is not None and request.raw_path.startswith(gw.prefixes) \
                and "Expect" not in request.headers:
            return await serve(gw, request, gw.new_request_id())
        return await app_handler(request)
    return dispatch


@dataclass(slots=True)
class Target:
    """A backend call the caller may make: the route, and who they are to its resource.
    Built once per request and never changed (not frozen only because a frozen
    dataclass's __init__ pays an object.__setattr__ call per field)."""
    route: Route
    upstream: str                           # path and query, rebuilt from the route
    params: Mapping[str, str]               # what the answer is bound to
    action: str
    principal: Principal
    relations: frozenset[str]
    blocked: Callable[[str], frozenset[str]] | None   # a user's restricted data sets, for
    #                                                    the roles a restriction blocks
    withheld: frozenset[str] = frozenset()   # those of the user the path names


def match_route(gw: Gateway, method: str, raw_target: str, call: Call) -> Matched:
    """Stage 2: the route table entry for this target, or 400/404 (never forwarded)."""
    matched = gw.targets.parse(raw_target)
    route = matched.route
    call.row.service = route.service
    if method not in route.methods:
        raise Denied("unknown_route", "no such route in the gateway's route table")
    call.row.route = route.name
    user = matched.params.get(route.subject_user) if route.subject_user else None
    call.about(matched.params[route.subject_euo], [user] if user else ())
    return matched


def authorize(gw: Gateway, principal: Principal, method: str, matched: Matched,
              call: Call | None = None) -> Target:
    """Stage 3: what the path alone decides (tenancy, restriction, any visible data set)."""
    route, params = matched.route, matched.params
    euo = params[route.subject_euo]
    user = params.get(route.subject_user) if route.subject_user else None
    relations = path_relations(principal, euo, user, gw.contracts.active_partner)
    if principal.kind.break_glass:
        grant = gw.break_glass.grant_for(principal, euo, user)
        if grant is not None:          # the request is served (or refused) under it
            relations |= BREAK_GLASS
            if call is not None:
                call.row.break_glass = grant.id
    blocked = None
    withheld: frozenset[str] = frozenset()
    action = ACTION_OF_METHOD[method]
    if principal.role in gw.catalog.restricted_roles:
        restrictions = gw.restrictions

        def blocked(subject: str) -> frozenset[str]:
            return restrictions.restricted(euo, subject)
        if user is not None:
            withheld = blocked(user)
            if withheld and _all_restricted(gw, route, principal, relations, action, withheld):
                raise Denied("processing_restricted",
                             "this user has restricted the processing of this data: "
                             + ", ".join(sorted(withheld)))
    _check_route(gw, route, principal, relations, action)
    return Target(route, matched.upstream, params, action, principal, relations, blocked,
                  withheld)


def authorized(gw: Gateway, principal: Principal, method: str, path: str, call: Call,
               about: str | None = None) -> Target:
    """Stages 2 and 3 for a call a feature makes on someone's behalf (an export, an
    erasure): the same match and decision as a proxied request. `about`: the user the call
    is for whatever the route names (an export's subject), named in its row."""
    matched = match_route(gw, method, path, call)
    if about is not None and about not in call.row.subject_users:
        call.row.subject_users = sorted({*call.row.subject_users, about})
    return authorize(gw, principal, method, matched, call)


async def open_get(gw: Gateway, principal: Principal, path: str, call: Call,
                   client: str | None, about: str | None = None):
    """A GET of `path` for `principal` through the proxy's stages, sent: its target, the
    backend's answer (to read or stream; released by the caller) and the deadline."""
    target = authorized(gw, principal, "GET", path, call, about)
    deadline = gw.backends.deadline()
    upstream = await send(gw, target, "GET", CIMultiDict(), call, client, deadline)
    return target, upstream, deadline


async def fetch_json(gw: Gateway, principal: Principal, path: str, call: Call,
                     client: str | None, about: str | None = None) -> tuple[Target, JsonAnswer]:
    """A GET of `path` as `principal` may see it: matched, authorized, sent, read, redacted
    and bound to its subject exactly as the proxy would answer it (the one path the
    features read through: a check added to the stages holds for them too)."""
    target, upstream, deadline = await open_get(gw, principal, path, call, client, about)
    return target, await read_json(gw, target, upstream, call, deadline)


def _all_restricted(gw: Gateway, route: Route, principal: Principal, relations: frozenset[str],
                    action: str, withheld: frozenset[str]) -> bool:
    """Whether a restriction leaves nothing of this resource to the caller: a file of a
    restricted data set, or a document whose every data set the caller may see is restricted
    (a write is checked field by field)."""
    if route.binary:
        return bool(set(route.binary) & withheld)
    if action == "write":
        return False
    visible = route.data_sets & gw.policy.granted(principal.role, relations, "read")
    return bool(visible) and visible <= withheld


async def _serve(request: web.Request, gw: Gateway, call: Call) -> web.StreamResponse:
    authn = gw.authn
    token = authn.token_of(request.headers)
    principal = authn.known(token) or await authn.verified(token)
    call.identify(principal)
    matched = match_route(gw, request.method, request.raw_path, call)
    target = authorize(gw, principal, request.method, matched, call)
    body, changed = (await _request_body(request, gw, target) if target.action == "write"
                     else (None, sorted(target.route.data_sets)))
    deadline = gw.backends.deadline()
    if target.route.binary:
        return await _stream(request, gw, target, call, deadline)
    if target.action != "read":      # written ahead: no intent row, nothing sent
        await call.intend(changed)
    upstream = await send(gw, target, request.method, request.headers, call, request.remote,
                          deadline, body)
    if target.action == "read" and _streamed(gw, target.route, upstream):
        return await _stream_list(request, gw, target, call, upstream)
    answer = await read_json(gw, target, upstream, call, deadline)
    response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    await call.allow(answer.status, len(answer.body), answer.served, answer.removed)
    return response


async def send(gw: Gateway, target: Target, method: str, headers: Mapping[str, str], call: Call,
               client: str | None, deadline: float, body: bytes | None = None
               ) -> Answer:
    """Stage 4: forward exactly what was authorized; a backend error status becomes our own
    error, its body dropped."""
    upstream = await gw.backends.send(
        target.route.service, target.upstream, method,
        forward_headers(headers, call.row.request_id, client, json_body=body is not None,
                        trace=call.traceparent),
        body, deadline)
    if upstream.status >= 300:
        upstream.release()
        raise _upstream_error(upstream.status)
    if upstream.status not in PASSED_STATUSES:
        # an allow-list: 206 to a Range never sent, 205, 207 and the like mean something the
        # gateway did not ask for and cannot check
        upstream.release()
        raise Denied("backend_unmappable",
                     f"the backend answered {upstream.status}, which the gateway does not pass on")
    return upstream


PASSED_STATUSES = frozenset((200, 201, 202, 204))   # the backend statuses passed on as such


@dataclass(slots=True)
class JsonAnswer:
    status: int
    headers: dict[str, str]
    document: Any                      # the redacted document (None: an empty answer)
    served: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    body: bytes = field(init=False)    # what is sent: the checked document, re-encoded

    def __post_init__(self):
        self.body = b"" if self.document is None else orjson.dumps(self.document)


async def read_json(gw: Gateway, target: Target, upstream, call: Call,
                    deadline: float) -> JsonAnswer:
    """Stage 5: the backend's JSON, shape-checked, bound to the request's subject and
    redacted for the caller; always re-encoded from what was checked."""
    status = upstream.status
    content_type = upstream.content_type.lower()
    raw = await gw.backends.read(upstream, deadline)
    headers = stamp({}, call.row.request_id)
    if status == 204 or not raw:
        return JsonAnswer(status, headers, None)
    if not (content_type == "application/json" or content_type.endswith("+json")):
        raise Denied("backend_unmappable", "the backend's answer is not JSON")
    _not_encoded(upstream)
    headers["Content-Type"] = "application/json"
    route, principal = target.route, target.principal
    plan = gw.plan(route, principal.role, target.relations)
    now = call.row.at                  # decided as of the request's arrival
    cut = gw.cutoffs(route, target.params, now)
    try:
        document = orjson.loads(raw)
        if plan.passthrough and target.blocked is None and not cut.expired & route.data_sets:
            # nothing to remove, but the shape and subject are checked all the same, and
            # what was checked is what is sent: re-encoded, so no parser differential
            # (a duplicate key, say) can show the client something else
            check_shape(document, route.body, target.params, gw.catalog.identifier)
            return JsonAnswer(status, headers, document, served=list(plan.visible))
        redacted, outcome = redact(document, plan, principal.sub, gw.catalog, gw.policy.granted,
                                   now, target.blocked, target.params, cut, target.withheld)
    except SubjectMismatch as e:
        log.warning("request %s: the backend answered about someone else (%s)",
                    call.row.request_id, e)
        raise Denied("backend_subject_mismatch",
                     "the backend answered about another subject than the one asked for") from None
    except (orjson.JSONDecodeError, Unmappable):
        raise Denied("backend_unmappable",
                     "the backend's answer does not match the route table") from None
    if route.top_decided and not outcome.served:
        raise Denied("dataset_not_permitted", "you may not see any data of this resource")
    if outcome.subjects:
        call.row.subject_users = sorted(outcome.subjects | set(call.row.subject_users))
    call.row.withheld = receipt(outcome.withheld)
    return JsonAnswer(status, headers, redacted, sorted(outcome.served), sorted(outcome.removed))


def _streamed(gw: Gateway, route: Route, upstream) -> bool:
    """Whether this answer is taken apart as it arrives instead of read whole: a route of
    one list (stream.list_field) whose answer is larger than GATEWAY_STREAM_JSON_ABOVE_BYTES
    or of unknown length."""
    length = upstream.content_length
    return (upstream.status == 200 and gw.list_field(route) is not None
            and (length is None or length > gw.stream_json_above_bytes))


async def _stream_list(request: web.Request, gw: Gateway, target: Target, call: Call,
                       upstream) -> web.StreamResponse:
    """A large list answer, redacted element by element as it arrives and sent on as it is
    redacted, in bounded memory. Written ahead: the intent row (the data sets the plan
    allows) commits before the first byte; the outcome row (the data sets, fields and
    subjects actually served, the bytes sent, reason `cut` when it broke off) at the end.
    Anything wrong past the first byte — a bad element, an element about someone else, a
    stall — cuts the answer short, so the client can never take it for a whole one."""
    route, principal = target.route, target.principal
    field_name = gw.list_field(route)
    try:
        if not upstream.content_type.lower().endswith("json"):
            raise Denied("backend_unmappable", "the backend's answer is not JSON")
        _not_encoded(upstream)
        plan = gw.plan(route, principal.role, target.relations)
        now = call.row.at
        cut = gw.cutoffs(route, target.params, now)
        await call.intend(sorted(route.data_sets.intersection(plan.visible)), 200, 0, "served")
    except Denied:
        upstream.release()
        raise
    response = web.StreamResponse(status=200, headers=stamp(
        {"Content-Type": "application/json"}, call.row.request_id))
    total = Outcome()                  # what every element's redaction served and removed
    sent, first, failure = 0, True, None
    elements = Elements(field_name)
    catalog, granted = gw.catalog, gw.policy.granted

    def redacted(items) -> bytes:
        nonlocal first
        out = []
        for element in items:
            doc, outcome = redact({field_name: [element]}, plan, principal.sub, catalog, granted,
                                  now, target.blocked, target.params, cut, target.withheld)
            total.served |= outcome.served
            total.removed |= outcome.removed
            total.subjects |= outcome.subjects
            for reason, counts in outcome.withheld.items():
                for ds, n in counts.items():
                    total.count(reason, ds, n)
            for kept in doc.get(field_name) or ():
                out.append(orjson.dumps(kept) if first else b"," + orjson.dumps(kept))
                first = False
        return b"".join(out)

    try:
        async with asyncio.timeout(gw.stream_deadline_s):
            await response.prepare(request)
            head = orjson.dumps(field_name)
            await response.write(b"{" + head + b":[")
            sent += len(head) + 3
            async for chunk in upstream.content.iter_chunked(CHUNK):
                out = redacted(elements.feed(chunk))
                if out:
                    async with asyncio.timeout(gw.stream_write_timeout_s):
                        await response.write(out)
                    sent += len(out)
            out = redacted(elements.close())
            tail, _ = redact({**elements.scalars, field_name: []}, plan, principal.sub, catalog,
                             granted, now, target.blocked, target.params, cut, target.withheld)
            tail.pop(field_name, None)
            out += b"]" + (b"," + orjson.dumps(tail)[1:] if tail else b"}")
            await response.write(out)
            await response.write_eof()
            sent += len(out)
    except SubjectMismatch:
        failure = "backend_subject_mismatch"
    except Unmappable:
        failure = "backend_unmappable"
    except (TimeoutError, aiohttp.ClientError, ConnectionError, OSError) as e:
        failure = "cut"
        log.warning("request %s: a streamed list broke off: %s", call.row.request_id,
                    str(e) or type(e).__name__)
    finally:
        upstream.release()
        row = call.row
        row.data_sets = sorted(total.served)
        row.fields_removed = [audit_text(n) for n in sorted(total.removed)]
        if total.subjects:
            row.subject_users = sorted(total.subjects | set(row.subject_users))
        row.withheld = receipt(total.withheld)
        if failure is not None:
            log.warning("request %s: a streamed list was cut (%s)", row.request_id, failure)
            response.force_close()
            if request.transport is not None:
                request.transport.abort()
        call.ended(200, sent, failure is not None, failure)
    return response


async def _request_body(request: web.Request, gw: Gateway,
                        target: Target) -> tuple[bytes, list[str]]:
    """A write's JSON body (bounded), each field it sets checked as writable, re-encoded:
    the backend receives what was checked, not the client's bytes; and the data sets it
    changes (its intent row's)."""
    route, principal, relations = target.route, target.principal, target.relations
    limit = gw.max_body_bytes
    if request.content_length and request.content_length > limit:
        raise Denied("body_too_large", f"request bodies are limited to {limit} bytes")
    chunks, size = [], 0
    try:
        while chunk := await request.content.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise Denied("body_too_large", f"request bodies are limited to {limit} bytes")
            chunks.append(chunk)
    except (aiohttp.ClientError, OSError, ValueError):
        raise Denied("bad_body", "the request body could not be read") from None
    try:
        doc = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise Denied("bad_json", "the request body is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(route.body, ObjectOf):
        raise Denied("bad_json", "the request body must be a JSON object")
    writable = gw.policy.granted(principal.role, relations, "write")
    changed: set[str] = set()
    for key in doc:
        spec = route.body.fields.get(key)
        data_set = getattr(spec, "data_set", None)
        if data_set is None:
            raise Denied("field_not_writable", f"{key[:64]!r} cannot be changed through the gateway")
        if data_set not in writable:
            raise Denied("write_not_permitted", f"you may not change {data_set}")
        changed.add(data_set)
        if data_set in target.withheld:
            raise Denied("processing_restricted",
                         f"this user has restricted the processing of {data_set}")
        if not _plain(doc[key], top=True):
            raise Denied("bad_value",
                         f"{key!r} must be text, a number, true/false, null, or a list of "
                         "those or of flat objects (no control characters)")
    return orjson.dumps(doc), sorted(changed)


def _plain(value: Any, top: bool = False, depth: int = 2) -> bool:
    """A value a write may set: a scalar (text without control characters), or a list of
    scalars or flat objects — never an object at the top (no operators, no merges)."""
    if isinstance(value, str):
        return len(value) <= MAX_TEXT and not CONTROL.search(value)
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if depth == 0 or (top and isinstance(value, dict)):
        return False
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v, depth=depth - 1) for k, v in value.items())
    return isinstance(value, list) and all(_plain(v, depth=depth - 1) for v in value)


def _check_route(gw: Gateway, route: Route, principal: Principal,
                 relations: frozenset[str], action: str) -> None:
    """Refuse before forwarding when the caller can see nothing of this resource."""
    if route.binary:
        allowed = gw.policy.granted(principal.role, relations, action)
        if not set(route.binary) <= allowed:
            raise Denied("dataset_not_permitted",
                         f"you may not {action} {' / '.join(route.binary)} here")
        return
    if action == "write":
        if not route.data_sets & gw.policy.granted(principal.role, relations, "write"):
            raise Denied("write_not_permitted", "you may not change any data of this resource")
        return
    possible = relations | route.body_relations if principal.kind.data_subject else relations
    if not route.data_sets & gw.policy.granted(principal.role, possible, "read"):
        raise Denied("dataset_not_permitted", "you may not see any data of this resource")


def _upstream_error(status: int) -> Denied:
    if status == 404:
        return Denied("backend_not_found", "the backend has no such resource")
    if status in (400, 409, 422):
        return Denied("backend_rejected", "the backend refused the request")
    return Denied("backend_error", f"the backend answered {status}")


async def _stream(request: web.Request, gw: Gateway, target: Target, call: Call,
                  deadline: float) -> web.StreamResponse:
    """Forward, commit the audit row, then copy the binary body through in chunks. At most
    `max_streams` at once: each stalled reader holds buffers, so memory stays bounded."""
    if gw.streams >= gw.max_streams:
        raise Denied("streams_busy", "too many files are being downloaded; try again shortly")
    gw.streams += 1
    try:
        served = sorted(target.route.binary)
        if target.action == "read":
            served = await _file_data_sets(gw, target, request, call, deadline)
        else:                        # a delete: written ahead, like any change
            await call.intend(served)
        upstream = await send(gw, target, request.method, request.headers, call, request.remote,
                              deadline)
        return await _copy(request, target.route, upstream, call, served,
                           gw.stream_write_timeout_s, gw.stream_deadline_s)
    finally:
        gw.streams -= 1


async def _file_data_sets(gw: Gateway, target: Target, request: web.Request, call: Call,
                          deadline: float) -> list[str]:
    """The data sets a file would serve, or a refusal: 410 `retention_expired` when its data
    set is past retention for this EUO; for a file whose data set (and time) only its list
    entry tells (`listed_in`, a fax), that entry is fetched and redacted for the caller
    first, and the file is served only if the entry would be."""
    route = target.route
    cut = gw.cutoffs(route, target.params, now_utc())
    if cut.expired & set(route.binary):
        raise Denied("retention_expired", "this file is past its data set's retention period")
    if route.listed_in is None:
        return sorted(route.binary)
    list_route, fld = route.listed_in
    params = {p: target.params[p] for p in list_route.param_names}
    listing = dataclasses.replace(target, route=list_route, upstream=list_route.path.format_map(params),
                                  params=params, action="read")
    upstream = await send(gw, listing, "GET", request.headers, call, request.remote, deadline)
    content_type = upstream.content_type.lower()
    raw = await gw.backends.read(upstream, deadline)
    _not_encoded(upstream)
    try:
        if not (content_type == "application/json" or content_type.endswith("+json")):
            raise Unmappable("not JSON")
        document = orjson.loads(raw)
        items = document.get(fld) if isinstance(document, dict) else None
        if not isinstance(items, list):
            raise Unmappable(f"{fld} is not a list")
        wanted = target.params["id"]
        entry = next((i for i in items if isinstance(i, dict) and _listed_id(i) == wanted), None)
        if entry is None:
            raise Denied("backend_not_found", "the backend does not list this file")
        principal = target.principal
        plan = gw.plan(list_route, principal.role, target.relations)
        _, outcome = redact({fld: [entry]}, plan, principal.sub, gw.catalog, gw.policy.granted,
                            now_utc(), target.blocked, params,
                            gw.cutoffs(list_route, params, now_utc()))
    except (orjson.JSONDecodeError, Unmappable):
        raise Denied("backend_unmappable",
                     "the backend's list of this file does not match the route table") from None
    if outcome.withheld.get(RETENTION):
        raise Denied("retention_expired", "this file is past its data set's retention period")
    if not outcome.served:
        raise Denied("dataset_not_permitted", "you may not see this file")
    return sorted(outcome.served)


def _listed_id(entry: dict) -> str | None:
    """A list entry's `id` as text (a backend may number them)."""
    value = entry.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def check_file(route: Route, upstream) -> None:
    """A file answer must be of a media type the route declares and not re-encoded: a
    document (JSON above all) where a file was due cannot be redacted, so it cannot pass."""
    _not_encoded(upstream)
    if upstream.status == 204:
        return
    if not route.allows_media_type(upstream.content_type.lower()):
        raise Denied("backend_unmappable",
                     f"the backend answered {upstream.content_type[:64]} where a file was due")


def _not_encoded(upstream) -> None:
    """The gateway asks for identity: an answer encoded anyway cannot be checked, so 502."""
    if upstream.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        raise Denied("backend_unmappable", "the backend encoded an answer it was asked for as is")


async def _copy(request: web.Request, route: Route, upstream, call: Call,
                served: list[str] | None, write_timeout_s: float,
                deadline_s: float) -> web.StreamResponse:
    """Commit the intent row (the answer of a delete: its outcome), then copy the binary
    body through in chunks, then queue the outcome row with the bytes delivered (reason
    `cut` when cut). A client that takes no chunk within `write_timeout_s` is cut off: it
    would hold a stream slot (and a backend connection) for as long as it kept its socket
    open; so is a whole copy (a backend trickling a file) past `deadline_s`."""
    served = served if served is not None else sorted(route.binary)
    try:
        check_file(route, upstream)
        if call.intended:            # a delete's outcome: the caller waits for it
            await call.allow(upstream.status, upstream.content_length or 0, served)
        else:
            await call.intend(served, upstream.status, upstream.content_length or 0, "served")
    except Denied:
        upstream.release()
        raise
    response = web.StreamResponse(status=upstream.status, headers=binary_headers(upstream.headers))
    stamp(response.headers, call.row.request_id)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    delivered, cut = 0, True
    writing: asyncio.Timeout | None = None
    try:
        async with asyncio.timeout(deadline_s) as whole:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                async with asyncio.timeout(write_timeout_s) as writing:
                    await response.write(chunk)
                delivered += len(chunk)
            async with asyncio.timeout(write_timeout_s) as writing:
                await response.write_eof()
        cut = False
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
        # too late for an error body: cut the connection so the client sees a short read
        # (aborted, not closed: a close would wait for a client that reads nothing)
        if writing is not None and writing.expired():
            log.warning("request %s: the client took no part of a file within %g s: cut off",
                        call.row.request_id, write_timeout_s)
        elif whole.expired():
            log.warning("request %s: the file was not through within %g s: cut off",
                        call.row.request_id, deadline_s)
        else:
            log.warning("request %s: a binary answer broke off: %s", call.row.request_id,
                        str(e) or type(e).__name__)
        response.force_close()
        if request.transport is not None:
            request.transport.abort()
    finally:
        upstream.release()
        if not call.committed:       # a read's outcome: how much of it left
            call.ended(upstream.status, delivered, cut)
    return response


