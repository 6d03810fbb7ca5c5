"""The catalog read from roles.yaml, datasets.yaml and routes.yaml, and checked: the data
sets (against the floors, floors.py), the grammars, the routes (shapes.py), `listed_in`."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..grammar import SAFE_WORD, Cursor, DateTime, Enum, Grammar, Integer, Pattern
from . import floors, shapes
from .catalog import (
    IDENTIFIER,
    RELATIONS,
    SUBJECT_KINDS,
    Catalog,
    DataSet,
    Leaf,
    ListOf,
    ObjectOf,
    PolicyError,
    Route,
    route_fields,
    route_key,
)
from .retention import RuleError, parse_rule
from .roles import COLUMNS, RoleError, load_break_glass, load_roles


def load_catalog(policy_dir: Path, pinned: bool = True) -> Catalog:
    """Load roles.yaml, datasets.yaml and routes.yaml; raise PolicyError on anything
    malformed or lowering a floor. `pinned=False` leaves out the floors of the shipped route
    table: only to write them anew (floors_routes.py)."""
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
    declared = _declared_lowerings(policy_dir)
    _refuse_lowered(policy_dir, floors.check(data_sets, declared))
    for name, ds in data_sets.items():
        mine = tuple(f for f in declared if f.rsplit(".", 2)[0] == name)
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
    builder = shapes.ShapeBuilder(shapes_raw, data_sets, grammars)
    routes = [shapes.route(i, spec, builder, grammars) for i, spec in
              enumerate(raw_routes.get("routes") or [])]
    if not routes:
        raise PolicyError("routes.yaml: no routes")
    _refuse_lowered(policy_dir, floors.check(data_sets, declared, floors.routes_lowered(
        {route_key(r): route_fields(r) for r in routes}, subject_rels, data_sets)
        if pinned else {}))
    catalog = Catalog(data_sets, routes, subject_rels, blocks, grammars[IDENTIFIER].regex, roles,
                      break_glass_max, declared)
    for route in routes:
        shapes.insert(catalog._trie, route)
    for i, spec in enumerate(raw_routes.get("routes") or []):
        if "listed_in" in spec:
            _listed_in(catalog, routes[i], spec["listed_in"], f"routes[{i}]")
    return catalog


def _refuse_lowered(policy_dir: Path, problems: list[str]) -> None:
    if problems:
        raise PolicyError(f"{policy_dir}: the policy lowers floors that no policy may lower "
                          "(docs/contract.md, Floors):\n  - " + "\n  - ".join(problems))


def _declared_lowerings(policy_dir: Path) -> dict[str, str]:
    """lowered_floors.yaml: each floor the policy lowers anyway, with its reason."""
    path = policy_dir / floors.LOWERED_FILE
    if not path.exists():
        return {}
    try:
        return floors.parse_declared(_yaml(path))
    except ValueError as e:
        raise PolicyError(f"{floors.LOWERED_FILE}: {e}") from None


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
