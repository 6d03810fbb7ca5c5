"""Stages 4 and 5 of the request path (pipeline.py): forward exactly what was authorized
(`Target`, rebuilt from the route table) and read the backend's JSON answer, checked against
the route's shape, bound to the subject and redacted for the caller. A file answer is
checked here too (check_file), and copied by files.py."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .backend_client import Answer
from .call import Call
from .context import Gateway
from .errors import Denied
from .policy.catalog import Route
from .principal import Principal
from .proxy import forward_headers, stamp
from .redact import SubjectMismatch, Unmappable, check_shape, receipt, redact

log = logging.getLogger("gateway.pipeline")


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
    not_encoded(upstream)
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


def _upstream_error(status: int) -> Denied:
    if status == 404:
        return Denied("backend_not_found", "the backend has no such resource")
    if status in (400, 409, 422):
        return Denied("backend_rejected", "the backend refused the request")
    return Denied("backend_error", f"the backend answered {status}")


def check_file(route: Route, upstream) -> None:
    """A file answer must be of a media type the route declares and not re-encoded: a
    document (JSON above all) where a file was due cannot be redacted, so it cannot pass."""
    not_encoded(upstream)
    if upstream.status == 204:
        return
    if not route.allows_media_type(upstream.content_type.lower()):
        raise Denied("backend_unmappable",
                     f"the backend answered {upstream.content_type[:64]} where a file was due")


def not_encoded(upstream) -> None:
    """The gateway asks for identity: an answer encoded anyway cannot be checked, so 502."""
    if upstream.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        raise Denied("backend_unmappable", "the backend encoded an answer it was asked for as is")
