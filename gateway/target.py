"""The request target, parsed once at the edge into a declared shape.

A client's path and query are hostile: the only thing the gateway forwards is what this
module rebuilds from the matched route — its static segments, and parameter values as
the grammar the route table declares for them parses them (identifiers by default,
forwarded as they are; an RFC 3339 time forwarded in UTC; a page size capped at the
route's maximum). Nothing else is decoded: a `%`, `#`, `;`, `\\`, an empty, `.` or `..`
segment, a value too long or an undeclared, repeated or malformed query parameter is
refused with 400 before any route is chosen or any backend is called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from types import MappingProxyType

from .errors import Denied
from .grammar import Cursor, DateTime, Enum, Grammar, Integer
from .policy.catalog import Catalog, Route

# the characters any static segment or identifier is made of (routes.yaml's grammars are
# checked to admit no other kind of separator)
_SEGMENT = re.compile(r"[A-Za-z0-9._~@:-]+")
MAX_TARGET = 4096


@dataclass(frozen=True, slots=True)
class Matched:
    """A request target the route table knows: what to forward, and its parameters."""
    route: Route
    params: MappingProxyType          # path parameters and the declared query parameters given
    upstream: str                     # path and query to send to the service's backend

    @property
    def service(self) -> str:
        return self.route.service


def bad_path(message: str) -> Denied:
    return Denied(400, "bad_path", message)


class Targets:
    """Parses request targets against one route table; memoised on the raw target (bounded),
    so a repeated target costs one dictionary look-up."""

    def __init__(self, catalog: Catalog, cache_size: int = 8192):
        self.catalog = catalog
        self.parse = lru_cache(maxsize=cache_size)(self._parse)

    def _parse(self, raw_target: str) -> Matched:
        """The route and parameters of `/<service>/<path>[?query]`, or Denied (400 or 404)."""
        return parse(self.catalog, raw_target)


def parse(catalog: Catalog, raw_target: str) -> Matched:
    """The route and parameters of `/<service>/<path>[?query]`, or Denied (400 or 404)."""
    if len(raw_target) > MAX_TARGET:
        raise bad_path(f"the request target is longer than {MAX_TARGET} characters")
    path, has_query, raw_query = raw_target.partition("?")
    if not path.startswith("/"):
        raise bad_path("the path must start with /")
    segments = path[1:].split("/")
    for seg in segments:
        if not _SEGMENT.fullmatch(seg):
            raise bad_path("a path segment is empty or holds a character outside "
                           "A-Z a-z 0-9 . _ ~ @ : - (nothing is decoded)")
        if seg in (".", ".."):
            raise bad_path("the path has '.' or '..' segments")
    matched = catalog.match(segments[0], segments[1:])
    if matched is None:
        raise Denied(404, "unknown_route", "no such route in the gateway's route table")
    route, params = matched
    for name, grammar in zip(route.param_names, route.param_grammars, strict=True):
        value = grammar.normal(params[name])
        if value is None:
            raise bad_path(f"the {name} in the path is not a valid {_kind(grammar)}")
        params[name] = value
    query = _query(route, raw_query) if has_query else {}
    if route.page is not None:
        query = _paged(route, query)
    upstream = route.path.format_map(params)
    if query:
        # rebuilt in the route's declared order from the values as parsed
        upstream += "?" + "&".join(f"{k}={query[k]}" for k in route.query if k in query)
    return Matched(route, MappingProxyType({**params, **query}), upstream)


def _query(route: Route, raw_query: str) -> dict[str, str]:
    """The declared query parameters, each once and valid in its grammar, in their forwarded
    (normal) form; Denied otherwise."""
    out: dict[str, str] = {}
    if not raw_query:
        return out
    for part in raw_query.split("&"):
        key, eq, value = part.partition("=")
        grammar = route.query.get(key)
        if grammar is None:
            raise Denied(400, "query_not_allowed",
                         f"this route takes no query parameter {key[:64]!r}"
                         + (f" (allowed: {', '.join(route.query)})" if route.query else ""))
        normal = grammar.normal(value) if eq and key not in out else None
        if normal is None:
            raise Denied(400, "bad_query",
                         f"the query parameter {key!r} must be given once, as a valid "
                         f"{_kind(grammar)}")
        out[key] = normal
    since, until = out.get("from"), out.get("to")
    if since is not None and until is not None and isinstance(route.query["from"], DateTime) \
            and isinstance(route.query["to"], DateTime) \
            and datetime.fromisoformat(since) > datetime.fromisoformat(until):
        raise Denied(400, "bad_query", "from is later than to: the window holds nothing")
    return out


def _paged(route: Route, query: dict[str, str]) -> dict[str, str]:
    """The page size forwarded: the caller's `limit` capped at the route's maximum, or the
    route's default page size when it declares one."""
    page = route.page
    limit = query.get("limit")
    if limit is not None and int(limit) > page.max:
        return {**query, "limit": str(page.max)}
    if limit is None and page.default is not None:
        return {**query, "limit": str(page.default)}
    return query


def _kind(grammar: Grammar) -> str:
    """How a refusal names what was expected."""
    if isinstance(grammar, Integer):
        return f"integer from {grammar.low} to {grammar.high}"
    if isinstance(grammar, Enum):
        return "one of " + ", ".join(sorted(grammar.values))
    if isinstance(grammar, Cursor):
        return f"cursor (1-{grammar.max_length} of A-Z a-z 0-9 - _ . ~)"
    if isinstance(grammar, DateTime):
        return "RFC 3339 time with an offset (2026-11-01T00:00:00Z)"
    return "identifier"
