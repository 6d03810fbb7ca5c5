"""The request target, parsed once at the edge into a declared shape.

A client's path and query are hostile: the only thing the gateway forwards is what this
module rebuilds from the matched route — its static segments, and parameter values that
fully match the grammar the route table declares for them (identifiers by default). So
there is nothing to decode and nothing to normalise: a `%`, `#`, `;`, `\\`, an empty,
`.` or `..` segment, a value too long or an undeclared, repeated or malformed query
parameter is refused with 400 before any route is chosen or any backend is called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType

from .catalog import Catalog, Route
from .errors import Denied

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
        if not grammar.fullmatch(params[name]):
            raise bad_path(f"the {name} in the path is not a valid identifier")
    query = _query(route, raw_query) if has_query else {}
    upstream = route.path.format_map(params)
    if query:
        upstream += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return Matched(route, MappingProxyType({**params, **query}), upstream)


def _query(route: Route, raw_query: str) -> dict[str, str]:
    """The declared query parameters, each once and matching its grammar; Denied otherwise."""
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
        if not eq or key in out or not grammar.fullmatch(value) or value in (".", ".."):
            raise Denied(400, "bad_query",
                         f"the query parameter {key!r} must be given once, as a valid identifier")
        out[key] = value
    return out
