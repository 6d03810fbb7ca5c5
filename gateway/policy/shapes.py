"""routes.yaml's entries built into Routes: the answer shapes (which data set each field
is, who the subject is, masks, bindings, ages), the path and query grammars, paging, and
the route trie the catalog matches paths with."""

from __future__ import annotations

from typing import Any

from ..grammar import Grammar, Integer
from .catalog import (
    ACTION_OF_METHOD,
    IDENTIFIER,
    RESERVED,
    SERVICE_NAME,
    SUBJECT_RELATION,
    DataSet,
    Leaf,
    ListOf,
    Mask,
    Node,
    ObjectOf,
    Page,
    PolicyError,
    Route,
)


class ShapeBuilder:
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


def route(i: int, spec: dict, builder: ShapeBuilder, grammars: dict[str, Grammar]) -> Route:
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


def insert(trie: dict, route: Route) -> None:
    node = trie.setdefault(route.service, {})
    for seg in route.path.split("/")[1:]:
        node = node.setdefault(None if seg.startswith("{") else seg, {})
    if "" in node:
        raise PolicyError(f"routes.yaml: {route.path} is listed twice")
    node[""] = route
