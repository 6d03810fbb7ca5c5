"""The data-set catalog and the route table: what the policy is made of (read from
policies/ and checked by catalog_files.py; routes built by shapes.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..grammar import Grammar
from .retention import Rule
from .roles import Role

RELATIONS = ("any", "contracted_partner", "same_euo", "self", "organizer", "author",
             "break_glass")
ACTIONS = ("read", "write", "delete")
SUBJECT_KINDS = ("euo", "user", "meeting", "author")
IDENTIFIER = "identifier"
# a service is the first path segment (/telephony/...): lower-case, and none of the
# gateway's own top-level paths
SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
RESERVED = frozenset({"v1", "healthz", "readyz", "metrics", "console"})
ACTION_OF_METHOD = {"GET": "read", "HEAD": "read", "PATCH": "write", "PUT": "write",
                    "POST": "write", "DELETE": "delete"}


class PolicyError(Exception):
    """The policy files are missing, malformed, or break a floor (docs/contract.md, Floors)."""


@dataclass(frozen=True)
class DataSet:
    name: str
    service: tuple[str, ...]
    seed: str
    purpose: str
    retention: str
    collected_by: str
    mandatory: bool
    hidden_from: frozenset[str]
    subject: str
    rule: Rule | None = None           # the retention as data (retention.py)
    # floors of the data-set table this policy lowers (floors.py, lowered_floors.yaml)
    floors_lowered: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name, "service": list(self.service), "seed": self.seed,
            "purpose": self.purpose, "retention": self.retention,
            "retention_rule": self.rule.public() if self.rule else None,
            "collected_by": self.collected_by, "mandatory": self.mandatory,
            "hidden_from": sorted(self.hidden_from), "subject": self.subject,
            "floors_lowered": list(self.floors_lowered),
        }


# --- body shapes -------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """A value that belongs wholly to one data set (None: an identifier, or with a grammar a
    value of that grammar or null: a page's next cursor, no one's personal data)."""
    data_set: str | None
    grammar: Grammar | None = None


@dataclass(frozen=True)
class ListOf:
    item: Node


@dataclass(frozen=True)
class Mask:
    data_set: str
    fields: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class ObjectOf:
    fields: dict[str, Node]
    subject: tuple[tuple[str, str], ...] = ()          # (relation, field)
    dataset_by: tuple[str, dict[str, str]] | None = None
    mask: Mask | None = None
    # (field, parameter): the field must equal the request's parameter when it has one
    binds: tuple[tuple[str, str], ...] = ()
    age: str | None = None             # the field holding the element's own time
    # the data sets of this object's own fields whose retention counts from that time
    aged: tuple[str, ...] = ()
    # subject fields whose null declares "no account here" (a guest, a dial-in caller):
    # the element is then the enclosing object's subject's data
    no_account: frozenset[str] = frozenset()
    # (field, grammar) of the fields declared as a grammar's value (`next_cursor: cursor`)
    checked: tuple[tuple[str, Grammar], ...] = ()


Node = Leaf | ListOf | ObjectOf

# which relation a `subject:` key of the route table grants when it names the caller
SUBJECT_RELATION = {"user": "self", "organizer": "organizer", "author": "author"}


@dataclass(frozen=True)
class Page:
    """A route that pages: `limit` above `max` is forwarded as `max`; without one, `default`
    (when declared) is forwarded."""
    max: int
    default: int | None = None


@dataclass(frozen=True, eq=False)
class Route:
    service: str
    path: str
    methods: frozenset[str]
    param_names: tuple[str, ...]
    param_grammars: tuple[Grammar, ...]         # one per path parameter
    query: dict[str, Grammar]                   # the query parameters it forwards, in order
    subject_euo: str | None
    subject_user: str | None
    body: Node | None
    binary: tuple[str, ...]
    data_sets: frozenset[str]
    # relations only the backend's answer can decide (meeting organizer, CDR owner, ...):
    # before forwarding they count as possible, after it the body decides
    body_relations: frozenset[str]
    # true when the answer's top object decides a relation (the meeting's organizer):
    # a caller who then sees nothing of it gets 403 rather than an empty shell
    top_decided: bool
    binds: bool = False                         # some object of the answer is bound to a parameter
    media_types: tuple[str, ...] = ()           # what a binary answer may be ("type/*" allowed)
    # (data set, rule) of the route's data sets with a retention the gateway applies
    rules: tuple[tuple[str, Rule], ...] = ()
    # a file served only while its list's element is served to the caller: (route, list field)
    listed_in: tuple[Route, str] | None = None
    page: Page | None = None                    # its page size bounds (`limit`)

    def allows_media_type(self, media_type: str) -> bool:
        """Whether a binary answer of this (lower-case) type may pass."""
        return any(media_type == t or (t.endswith("/*") and media_type.startswith(t[:-1]))
                   for t in self.media_types)

    @property
    def name(self) -> str:
        return f"{self.service}:{self.path}"


@dataclass
class Catalog:
    data_sets: dict[str, DataSet]
    routes: list[Route]
    data_subject_relations: frozenset[str]
    restriction_blocks: frozenset[str] = frozenset()    # columns of the data-set table
    identifier: re.Pattern = re.compile(r"[A-Za-z0-9._~@:-]{1,128}")   # grammars.identifier
    roles: dict[str, Role] = field(default_factory=dict)
    break_glass_max_minutes: int = 0
    lowered_floors: dict[str, str] = field(default_factory=dict)   # floor id -> reason
    _trie: dict[str, dict] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # the roles a processing restriction blocks, by the column each is held to
        self.restricted_roles = frozenset(
            name for name, role in self.roles.items() if role.column in self.restriction_blocks)
        self.data_subject_roles = sorted(n for n, role in self.roles.items() if role.data_subject)

    @property
    def services(self) -> frozenset[str]:
        return frozenset(self._trie)

    def match(self, service: str, segments: list[str]) -> tuple[Route, dict[str, str]] | None:
        """Find the route for a normalised path; the cost depends on its length only."""
        node = self._trie.get(service)
        values = []
        for seg in segments:
            if node is None:
                return None
            nxt = node.get(seg)
            if nxt is None:
                nxt = node.get(None)
                values.append(seg)
            node = nxt
        if node is None or "" not in node:
            return None
        route = node[""]
        return route, dict(zip(route.param_names, values, strict=True))


def route_fields(route: Route) -> dict[str, str]:
    """What a route shows to whom, flat, for floors.routes_lowered: each declared field of its
    answer by where it is (`.voicemails[].caller`) with its data set (or `identifier`), and
    with an `@` what decides whose data it is (`[]@self`: the element's subject field,
    `@path.user`: the path parameter naming the user, `@binds.F`, `@no_account`) or what a
    file or a delete needs (`@needs.D`)."""
    out = {f"@path.{kind}": str(route.param_names.index(param))
           for kind, param in (("euo", route.subject_euo), ("user", route.subject_user)) if param}
    out.update({f"@needs.{ds}": ds for ds in route.binary})
    if route.body is not None:
        _fields(route.body, "", out)
    return out


def _fields(node: Node, at: str, out: dict[str, str]) -> None:
    if isinstance(node, Leaf):
        out[at or "."] = node.data_set or IDENTIFIER
    elif isinstance(node, ListOf):
        _fields(node.item, at + "[]", out)
    else:
        out.update({f"{at}@{rel}": fld for rel, fld in node.subject})
        out.update({f"{at}@binds.{fld}": param for fld, param in node.binds})
        if node.no_account:
            out[f"{at}@no_account"] = ",".join(sorted(node.no_account))
        if node.dataset_by:
            by, values = node.dataset_by
            out.update({f"{at}.{by}={value}": ds for value, ds in values.items()})
        for name, child in node.fields.items():
            _fields(child, f"{at}.{name}", out)


def route_key(route: Route) -> str:
    """`service:/path/{}/...`: a route whatever its parameters are called."""
    return route.service + ":" + re.sub(r"\{[^}]*\}", "{}", route.path)
