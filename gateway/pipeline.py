"""The request path for /telephony/… and /meeting/…, as one short list of stages:

    authenticate -> match route -> authorize -> forward -> redact -> audit

Every stage either passes the request on or raises Denied with a stable reason id. One
`Call` keeps the request's audit row: refusals are audited too (before they are
answered, once the caller is known), and a response carrying personal data is sent only
after its row is committed. Authentication comes first so that a refusal can name who
was refused; a caller without a valid token is only counted (see call.py).

Forwarding and reading the answer are forward.py's; a file answer is files.py's, a big
list answer lists.py's. The features that read or delete on someone's behalf (the export,
the erasure) go through the same stages: authorized, open_get and fetch_json below.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from .call import Call
from .context import GATEWAY, REQUEST_ID, Gateway
from .errors import Denied
from .files import stream_file
from .forward import JsonAnswer, Target, read_json, send
from .grammar import CONTROL, MAX_TEXT
from .lists import stream_list, streamed
from .policy.authz import BREAK_GLASS, path_relations
from .policy.catalog import ACTION_OF_METHOD, ObjectOf, Route
from .principal import Principal
from .proxy import CHUNK, stamp
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


MAX_PAGES = 1000      # the pages of one list a feature follows (each an audited call)


def next_page(path: str, document: Any) -> str | None:
    """The path of the page after `document`, a page of the list at `path` (its
    `next_cursor`), or None on the last one. The features read every page of a list the
    backend pages (by default or by a declared default size): an export or an erasure of
    the first page alone would be incomplete without a word."""
    cursor = document.get("next_cursor") if isinstance(document, dict) else None
    if not isinstance(cursor, str) or not cursor:
        return None
    return f"{path}{'&' if '?' in path else '?'}cursor={quote(cursor, safe='')}"


async def pages(first: str, read: Callable[[str], Awaitable[Any]],
                document_of: Callable[[Any], Any] = lambda page: page
                ) -> AsyncIterator[tuple[str, Any]]:
    """(path, what `read` gave for it) for every page of the list at `first`, following
    its `next_cursor` (`document_of` a page: its document; a page that is None or no dict
    has no next), at most MAX_PAGES: past them Denied backend_pages_exceeded. The one
    walk of a paged list the features (export, erasure) read through."""
    path: str | None = first
    for _ in range(MAX_PAGES):
        page = await read(path)
        yield path, page
        path = None if page is None else next_page(first, document_of(page))
        if path is None:
            return
    raise too_many_pages(first)


def too_many_pages(path: str) -> Denied:
    return Denied("backend_pages_exceeded",
                  f"the backend's list at {path[:200]} went on past {MAX_PAGES} pages")


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
        return await stream_file(request, gw, target, call, deadline)
    if target.action != "read":      # written ahead: no intent row, nothing sent
        await call.intend(changed)
    upstream = await send(gw, target, request.method, request.headers, call, request.remote,
                          deadline, body)
    if target.action == "read" and streamed(gw, target.route, upstream):
        return await stream_list(request, gw, target, call, upstream)
    answer = await read_json(gw, target, upstream, call, deadline)
    response = web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    await call.allow(answer.status, len(answer.body), answer.served, answer.removed)
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


