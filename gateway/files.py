"""File answers (voicemails, faxes, recordings, documents): at most `max_streams` at once,
their data sets decided before the first byte (a fax's from its list entry, retention
included), the intent row committed, then the bytes copied through in chunks and the
outcome row saying how many left (reason `cut` when cut)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import aiohttp
import orjson
from aiohttp import web

from .call import Call
from .context import Gateway
from .errors import Denied
from .forward import Target, check_file, not_encoded, send
from .policy.catalog import Route
from .proxy import CHUNK, binary_headers, stamp
from .redact import RETENTION, Unmappable, now_utc, redact

log = logging.getLogger("gateway.pipeline")


async def stream_file(request: web.Request, gw: Gateway, target: Target, call: Call,
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
    not_encoded(upstream)
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
