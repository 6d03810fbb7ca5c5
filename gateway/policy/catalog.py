"""The data-set catalog and the route table, loaded from policies/ and checked."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..grammar import SAFE_WORD, Cursor, DateTime, Enum, Grammar, Integer, Pattern
from . import floors
from .retention import Rule, RuleError, parse_rule
from .roles import COLUMNS, Role, RoleError, load_break_glass, load_roles

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


def load_catalog(policy_dir: Path) -> Catalog:
    """Load roles.yaml, datasets.yaml and routes.yaml; raise PolicyError on anything
    malformed."""
    try:
        raw_roles = _yaml(policy_dir / "roles.yaml")
        roles = load_roles(raw_roles)
        break_glass_max = load_break_glass(raw_roles, roles)
    except RoleError as e:
        raise PolicyError(str(e)) from None
    raw_ds = _yaml(policy_dir / "datasets.yaml").get("datasets")
    if not isinstance(raw_ds, dict) or not raw_ds:
        raise PolicyError("datasets.yaml: no `datasets:` mapping")
    data_sets = {name: _data_set(name, spec) for name, spec in raw_ds.items()}
    lowered = _lowered_floors(policy_dir, data_sets)
    for name, ds in data_sets.items():
        mine = tuple(f for f in lowered if f.rsplit(".", 2)[0] == name)
        if mine:
            data_sets[name] = replace(ds, floors_lowered=mine)

    raw_routes = _yaml(policy_dir / "routes.yaml")
    shapes_raw = raw_routes.get("shapes") or {}
    subject_rels = frozenset(raw_routes.get("data_subject_relations") or ())
    if not subject_rels <= set(RELATIONS):
        raise PolicyError(f"routes.yaml: unknown data_subject_relations {sorted(subject_rels)}")
    blocks = frozenset(raw_routes.get("processing_restriction_blocks") or ())
    if not blocks <= set(COLUMNS):
        raise PolicyError("routes.yaml: processing_restriction_blocks names columns of the "
                          f"data-set table ({', '.join(COLUMNS)}), not {sorted(blocks - set(COLUMNS))}")
    grammars = _grammars(raw_routes.get("grammars"))
    if set(grammars) & set(data_sets):
        raise PolicyError("routes.yaml: a grammar and a data set share the name "
                          f"{sorted(set(grammars) & set(data_sets))[0]!r}")
    builder = _ShapeBuilder(shapes_raw, data_sets, grammars)
    routes = [_route(i, spec, builder, grammars) for i, spec in
              enumerate(raw_routes.get("routes") or [])]
    if not routes:
        raise PolicyError("routes.yaml: no routes")
    catalog = Catalog(data_sets, routes, subject_rels, blocks, grammars[IDENTIFIER].regex, roles,
                      break_glass_max, lowered)
    for route in routes:
        _insert(catalog._trie, route)
    for i, spec in enumerate(raw_routes.get("routes") or []):
        if "listed_in" in spec:
            _listed_in(catalog, routes[i], spec["listed_in"], f"routes[{i}]")
    return catalog


def _lowered_floors(policy_dir: Path, data_sets: dict[str, DataSet]) -> dict[str, str]:
    """The floors of the data-set table (floors.py) that datasets.yaml lowers, each declared
    with its reason in lowered_floors.yaml; PolicyError naming every undeclared one."""
    path = policy_dir / floors.LOWERED_FILE
    declared: dict[str, str] = {}
    if path.exists():
        try:
            declared = floors.parse_declared(_yaml(path))
        except ValueError as e:
            raise PolicyError(f"{floors.LOWERED_FILE}: {e}") from None
    problems = floors.check(data_sets, declared)
    if problems:
        raise PolicyError(f"{policy_dir / 'datasets.yaml'} lowers floors that no policy may "
                          "lower (docs/contract.md, Floors):\n  - " + "\n  - ".join(problems))
    return declared


def _listed_in(catalog: Catalog, route: Route, raw: Any, where: str) -> None:
    """`listed_in: {path, list}`: the file `{id}` is served only while the list route (same
    service, its parameters among this route's) serves the caller an element of `list`
    whose `id` is it; the file's data sets are then that element's."""
    if not isinstance(raw, dict) or set(raw) != {"path", "list"}:
        raise PolicyError(f"routes.yaml: {where}: listed_in is {{path, list}}")
    segments = [s for s in str(raw["path"]).split("/") if s]
    found = next((r for r in catalog.routes if r.service == route.service
                  and r.path == "/" + "/".join(segments) and "GET" in r.methods), None)
    if found is None or found.body is None:
        raise PolicyError(f"routes.yaml: {where}: listed_in names no JSON route {raw['path']!r}")
    if not set(found.param_names) <= set(route.param_names) or "id" not in route.param_names:
        raise PolicyError(f"routes.yaml: {where}: listed_in: the list's parameters must be "
                          "this route's, and this route must have an {id}")
    body = found.body
    lst = body.fields.get(raw["list"]) if isinstance(body, ObjectOf) else None
    if not (isinstance(lst, ListOf) and isinstance(lst.item, ObjectOf)
            and lst.item.fields.get("id") == Leaf(None)):
        raise PolicyError(f"routes.yaml: {where}: listed_in: {raw['list']!r} is not a list of "
                          "objects with an `id` identifier")
    object.__setattr__(route, "listed_in", (found, str(raw["list"])))


def _grammars(raw: Any) -> dict[str, Grammar]:
    """The named value grammars of routes.yaml (`identifier`, a pattern, is required)."""
    if not isinstance(raw, dict) or IDENTIFIER not in raw:
        raise PolicyError("routes.yaml: `grammars:` must define at least `identifier`")
    out = {}
    for name, spec in raw.items():
        out[name] = _grammar(name, spec)
        for probe in ("", "/", "#", "?", "%", "&", "=", ";", " ", "\x00"):
            if out[name].normal(probe) is not None:
                raise PolicyError(f"routes.yaml: grammars.{name} admits {probe!r}")
    if not isinstance(out[IDENTIFIER], Pattern):
        raise PolicyError("routes.yaml: grammars.identifier is a regular expression")
    return out


def _grammar(name: str, spec: Any) -> Grammar:
    """One grammar: a regular expression (text), or {type: datetime | integer (min, max) |
    enum (values) | cursor (max_length)}."""
    where = f"routes.yaml: grammars.{name}"
    if isinstance(spec, str):
        try:
            return Pattern(re.compile(spec))
        except re.error as e:
            raise PolicyError(f"{where}: {e}") from None
    kind = spec.get("type") if isinstance(spec, dict) else None
    keys = {"datetime": set(), "integer": {"min", "max"}, "enum": {"values"},
            "cursor": {"max_length"}}
    if kind not in keys or set(spec) - {"type"} != keys[kind]:
        raise PolicyError(f"{where}: a regular expression, or {{type: datetime}}, {{type: "
                          "integer, min, max}, {type: enum, values}, {type: cursor, max_length}")
    if kind == "datetime":
        return DateTime()
    if kind == "integer":
        low, high = spec["min"], spec["max"]
        if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high < 10**18):
            raise PolicyError(f"{where}: 0 <= min <= max < 10^18")
        return Integer(low, high)
    if kind == "enum":
        values = spec["values"]
        if not isinstance(values, list) or not values or not all(
                isinstance(v, str) and len(v) <= 128 and SAFE_WORD.fullmatch(v)
                and v not in (".", "..") for v in values):
            raise PolicyError(f"{where}: values are words of A-Z a-z 0-9 . _ ~ -")
        return Enum(frozenset(values))
    length = spec["max_length"]
    if not isinstance(length, int) or not 1 <= length <= 2048:
        raise PolicyError(f"{where}: max_length is 1 to 2048")
    return Cursor(length)


def _yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise PolicyError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PolicyError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise PolicyError(f"{path}: expected a mapping at top level")
    return doc


def _data_set(name: str, spec: Any) -> DataSet:
    if not isinstance(spec, dict):
        raise PolicyError(f"datasets.yaml: {name}: expected a mapping")
    try:
        hidden = frozenset(spec.get("hidden_from") or ())
        ds = DataSet(
            name=name, service=tuple(spec["service"]), seed=str(spec["seed"]),
            purpose=str(spec["purpose"]), retention=str(spec["retention"]),
            collected_by=str(spec["collected_by"]), mandatory=bool(spec["mandatory"]),
            hidden_from=hidden, subject=str(spec["subject"]),
            rule=parse_rule(spec["retention_rule"]),
        )
    except KeyError as e:
        raise PolicyError(f"datasets.yaml: {name}: missing {e.args[0]}") from None
    except RuleError as e:
        raise PolicyError(f"datasets.yaml: {name}: {e}") from None
    if not hidden <= set(COLUMNS):
        raise PolicyError(f"datasets.yaml: {name}: hidden_from names columns of the data-set "
                          f"table ({', '.join(COLUMNS)}), not {sorted(hidden - set(COLUMNS))}")
    if ds.subject not in SUBJECT_KINDS:
        raise PolicyError(f"datasets.yaml: {name}: subject must be one of {SUBJECT_KINDS}")
    return ds


class _ShapeBuilder:
    def __init__(self, shapes: dict, data_sets: dict[str, DataSet],
                 grammars: dict[str, Grammar] | None = None):
        self.raw = shapes
        self.data_sets = data_sets
        self.grammars = grammars or {}
        self.built: dict[str, Node] = {}

    def field(self, spec: Any, where: str) -> Node:
        """An object's field: a shape, or the name of a grammar (not personal data)."""
        if isinstance(spec, str) and spec != IDENTIFIER and spec in self.grammars:
            return Leaf(None, self.grammars[spec])
        return self.build(spec, where)

    def build(self, spec: Any, where: str) -> Node:
        if isinstance(spec, str):
            if spec == IDENTIFIER:
                return Leaf(None)
            if spec in self.grammars:
                raise PolicyError(f"routes.yaml: {where}: a value of grammar {spec!r} is a "
                                  "field of an object")
            self._known(spec, where)
            return Leaf(spec)
        if not isinstance(spec, dict):
            raise PolicyError(f"routes.yaml: {where}: a shape is a string or a mapping")
        if "shape" in spec:
            name = spec["shape"]
            if name not in self.built:
                if name not in self.raw:
                    raise PolicyError(f"routes.yaml: {where}: unknown shape {name!r}")
                self.built[name] = self.build(self.raw[name], f"shapes.{name}")
            return self.built[name]
        if "list" in spec:
            return ListOf(self.build(spec["list"], f"{where}[]"))
        if "object" in spec:
            fields = {k: self.field(v, f"{where}.{k}") for k, v in spec["object"].items()}
            subject = []
            for kind, fld in (spec.get("subject") or {}).items():
                if kind not in SUBJECT_RELATION:
                    raise PolicyError(f"routes.yaml: {where}: unknown subject kind {kind!r}")
                subject.append((SUBJECT_RELATION[kind], fld))
            dataset_by = None
            if "dataset_by" in spec:
                by = spec["dataset_by"]
                for ds in by["values"].values():
                    self._known(ds, where)
                dataset_by = (by["field"], dict(by["values"]))
            age = spec.get("age")
            if age is not None and age not in fields:
                raise PolicyError(f"routes.yaml: {where}: age names {age!r}, which is not a "
                                  "field of this object")
            mask = None
            if "mask" in spec:
                m = spec["mask"]
                self._known(m["data_set"], where)
                rule = self.data_sets[m["data_set"]].rule
                if rule is None or rule.anonymise_after is None:
                    raise PolicyError(f"routes.yaml: {where}: {m['data_set']} has no "
                                      "retention_rule.anonymise_after in datasets.yaml")
                if age is None:
                    raise PolicyError(f"routes.yaml: {where}: a mask needs the object's age field")
                mask = Mask(m["data_set"], tuple(m["fields"]))
            no_account = frozenset(spec.get("no_account") or ())
            if not no_account <= {fld for _, fld in subject}:
                raise PolicyError(f"routes.yaml: {where}: no_account names "
                                  f"{sorted(no_account - {fld for _, fld in subject})}, "
                                  "which are not subject fields of this object")
            binds = tuple((spec.get("binds") or {}).items())
            for fld, _param in binds:
                if fields.get(fld) != Leaf(None):
                    raise PolicyError(f"routes.yaml: {where}: binds {fld!r}, which is not "
                                      "an identifier field of this object")
            own = {c.data_set for c in fields.values() if isinstance(c, Leaf) and c.data_set}
            if dataset_by is not None:
                own.update(dataset_by[1].values())
            aged = tuple(sorted(ds for ds in own if self._aged(ds)))
            if aged and age is None:
                raise PolicyError(f"routes.yaml: {where}: the retention of {', '.join(aged)} "
                                  "counts from each element's time: name its field (age:)")
            for fld, child in fields.items():
                if isinstance(child, ListOf) and isinstance(child.item, Leaf) and \
                        child.item.data_set and self._aged(child.item.data_set):
                    raise PolicyError(f"routes.yaml: {where}.{fld}: the retention of "
                                      f"{child.item.data_set} counts from each element's time, "
                                      "which a list of plain values cannot give")
            checked = tuple((k, c.grammar) for k, c in fields.items()
                            if isinstance(c, Leaf) and c.grammar is not None)
            return ObjectOf(fields, tuple(subject), dataset_by, mask, binds, age, aged, no_account,
                            checked)
        raise PolicyError(f"routes.yaml: {where}: unknown shape {spec!r}")

    def _aged(self, ds: str) -> bool:
        rule = self.data_sets[ds].rule
        return rule is not None and rule.by_element

    def _known(self, ds: str, where: str) -> None:
        if ds not in self.data_sets:
            raise PolicyError(f"routes.yaml: {where}: unknown data set {ds!r}")


def _route(i: int, spec: dict, builder: _ShapeBuilder, grammars: dict[str, Grammar]) -> Route:
    where = f"routes[{i}]"
    try:
        service, path = spec["service"], spec["path"]
        methods = frozenset(m.upper() for m in spec["methods"])
    except (KeyError, TypeError) as e:
        raise PolicyError(f"routes.yaml: {where}: missing {e}") from None
    if not isinstance(service, str) or not SERVICE_NAME.fullmatch(service) or service in RESERVED:
        raise PolicyError(f"routes.yaml: {where}: service {service!r} must be a lower-case name "
                          f"(a-z, 0-9, -) other than {', '.join(sorted(RESERVED))}")
    if not methods <= set(ACTION_OF_METHOD):
        raise PolicyError(f"routes.yaml: {where}: unsupported method in {sorted(methods)}")
    segments = [s for s in path.split("/") if s]
    params = tuple(s[1:-1] for s in segments if s.startswith("{"))
    for s in segments:
        if not s.startswith("{") and grammars[IDENTIFIER].normal(s) is None:
            raise PolicyError(f"routes.yaml: {where}: segment {s!r} is not an identifier")

    def grammar(kind: Any, what: str) -> Grammar:
        if kind not in grammars:
            raise PolicyError(f"routes.yaml: {where}: {what}: unknown grammar {kind!r}")
        return grammars[kind]
    declared = spec.get("params") or {}
    for p in declared:
        if p not in params:
            raise PolicyError(f"routes.yaml: {where}: params names unknown parameter {p!r}")
    param_grammars = tuple(grammar(declared.get(p, IDENTIFIER), f"params.{p}") for p in params)
    query = {k: grammar(v, f"query.{k}") for k, v in (spec.get("query") or {}).items()}
    if set(query) & set(params):
        raise PolicyError(f"routes.yaml: {where}: a query parameter shadows a path parameter")
    page = _page(spec.get("page"), query, where)
    subject = spec.get("subject") or {}
    for p in subject.values():
        if p not in params:
            raise PolicyError(f"routes.yaml: {where}: subject names unknown parameter {p!r}")
    body = builder.build(spec["body"], f"{where}.body") if "body" in spec else None
    # `deletes:` a DELETE-only route (answered 204, no body): like a file, the caller needs
    # every data set it names
    deletes = "deletes" in spec
    if deletes and methods != {"DELETE"}:
        raise PolicyError(f"routes.yaml: {where}: a route with deletes: has methods [DELETE]")
    binary = tuple(spec.get("deletes" if deletes else "binary") or ())
    for ds in binary:
        builder._known(ds, where)
    if (body is None) == (not binary) or (deletes and "binary" in spec):
        raise PolicyError(f"routes.yaml: {where}: give exactly one of body, binary or deletes")
    media_types = tuple(str(t).lower() for t in spec.get("media_types") or ())
    if binary and not media_types and not deletes:
        raise PolicyError(f"routes.yaml: {where}: a binary route lists its media_types")
    if any("json" in t or t in ("*/*", "text/*", "text/html") for t in media_types):
        raise PolicyError(f"routes.yaml: {where}: media_types may not admit JSON or HTML")
    found: set[str] = set(binary)
    top: set[str] = set()
    nested: set[str] = set()
    if body is not None:
        if isinstance(body, ObjectOf):
            top.update(rel for rel, _ in body.subject)
            if "user" in subject:
                top.discard("self")          # the path already says whose record it is
        _walk(body, found, nested, top=True)
    if "euo" not in subject:
        raise PolicyError(f"routes.yaml: {where}: every route names its EUO parameter")
    rules = tuple((ds, builder.data_sets[ds].rule) for ds in sorted(found)
                  if builder.data_sets[ds].rule is not None
                  and (builder.data_sets[ds].rule.enforced
                       or builder.data_sets[ds].rule.anonymise_after is not None))
    aged = [ds for ds in binary if builder._aged(ds)]
    if aged and "listed_in" not in spec:
        raise PolicyError(f"routes.yaml: {where}: the retention of {', '.join(aged)} counts "
                          "from each element's time, which a file cannot give: name the list "
                          "that lists it (listed_in:)")
    return Route(service, "/" + "/".join(segments), methods, params, param_grammars, query,
                 subject.get("euo"), subject.get("user"), body, binary, frozenset(found),
                 frozenset(top | nested), bool(top), _binds(body), media_types, rules,
                 page=page)


def _page(raw: Any, query: dict[str, Grammar], where: str) -> Page | None:
    """`page: {max, default}`: the page size bounds of a route that takes `limit`."""
    limit = query.get("limit")
    if raw is None:
        if limit is not None:
            raise PolicyError(f"routes.yaml: {where}: a route taking `limit` declares its "
                              "page size bounds (page: {max, default})")
        return None
    if not isinstance(limit, Integer):
        raise PolicyError(f"routes.yaml: {where}: a route with page: takes `limit`, of an "
                          "integer grammar")
    if not isinstance(raw, dict) or not {"max"} <= set(raw) <= {"max", "default"}:
        raise PolicyError(f"routes.yaml: {where}: page is {{max, default}} (default optional)")
    top, default = raw["max"], raw.get("default")
    if not isinstance(top, int) or not limit.low <= top <= limit.high or (
            default is not None and (not isinstance(default, int)
                                     or not limit.low <= default <= top)):
        raise PolicyError(f"routes.yaml: {where}: page.max within the limit's grammar, "
                          "page.default within 1 and page.max")
    return Page(top, default)


def _binds(node: Node | None) -> bool:
    if isinstance(node, ListOf):
        return _binds(node.item)
    if isinstance(node, ObjectOf):
        return bool(node.binds) or any(_binds(c) for c in node.fields.values())
    return False


def _walk(node: Node, found: set[str], nested: set[str], top: bool = False) -> None:
    """Collect the data sets a shape mentions and the relations its inner objects decide."""
    if isinstance(node, Leaf):
        if node.data_set:
            found.add(node.data_set)
    elif isinstance(node, ListOf):
        _walk(node.item, found, nested)
    else:
        if not top:
            nested.update(rel for rel, _ in node.subject)
        if node.dataset_by:
            found.update(node.dataset_by[1].values())
        for child in node.fields.values():
            _walk(child, found, nested)


def _insert(trie: dict, route: Route) -> None:
    node = trie.setdefault(route.service, {})
    for seg in route.path.split("/")[1:]:
        node = node.setdefault(None if seg.startswith("{") else seg, {})
    if "" in node:
        raise PolicyError(f"routes.yaml: {route.path} is listed twice")
    node[""] = route
