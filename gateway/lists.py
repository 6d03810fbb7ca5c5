"""A large list answer (stream.py takes it apart), redacted element by element as it
arrives and sent on as it is redacted, in bounded memory, its intent row written ahead
and its outcome row (what was served, the bytes sent, `cut` when it broke off) at the end."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import orjson
from aiohttp import web

from .call import Call
from .context import Gateway
from .errors import Denied
from .forward import Target, not_encoded
from .grammar import audit_text
from .policy.catalog import Route
from .proxy import CHUNK, stamp
from .redact import Outcome, SubjectMismatch, Unmappable, receipt, redact
from .stream import Elements

log = logging.getLogger("gateway.pipeline")


def streamed(gw: Gateway, route: Route, upstream) -> bool:
    """Whether this answer is taken apart as it arrives instead of read whole: a route of
    one list (stream.list_field) whose answer is larger than GATEWAY_STREAM_JSON_ABOVE_BYTES
    or of unknown length."""
    length = upstream.content_length
    return (upstream.status == 200 and gw.list_field(route) is not None
            and (length is None or length > gw.stream_json_above_bytes))


async def stream_list(request: web.Request, gw: Gateway, target: Target, call: Call,
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
        not_encoded(upstream)
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
