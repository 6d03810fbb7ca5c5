"""What an export holds: the gathered documents split by data set, stripped for an
assisted export, checked for anyone else's data, and export.json made from them."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ..context import REQUEST_ID, Gateway
from ..endpoints import IDENTIFIER
from ..errors import Denied
from ..policy.catalog import Catalog, Leaf, ListOf, Node, ObjectOf
from ..principal import Principal
from ..redact import MASKING, RESTRICTION, RETENTION, SCOPE, join_path, now_utc

log = logging.getLogger("gateway.pipeline")


FORMAT = "partner-gateway-export/1"


@dataclass
class Gathered:
    services: dict[str, dict[str, list]] = field(default_factory=lambda: defaultdict(
        lambda: defaultdict(list)))
    attachments: list[dict[str, Any]] = field(default_factory=list)
    not_held: list[dict[str, Any]] = field(default_factory=list)
    withheld: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    held_by_gateway: dict[str, Any] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    fetched: set[str] = field(default_factory=set)
    # elements the redaction left out or masked, from each call's receipt: reason -> data set
    # -> count (past retention, under a restriction, masked, outside the viewer's scope)
    elements: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(
        lambda: defaultdict(int)))

    def add_receipt(self, receipt: str | None) -> None:
        for reason, by_data_set in (orjson.loads(receipt) if receipt else {}).items():
            for data_set, count in by_data_set.items():
                self.elements[reason][data_set] += count


ELEMENT_MEANING = {
    RETENTION: "past its retention period (the catalog entry's retention says how long): "
               "no longer given to anyone, you included",
    RESTRICTION: "under a processing restriction or objection of yours: withheld until it is "
                 "lifted",
    MASKING: "given masked (old records anonymised; the catalog entry says when)",
    SCOPE: "outside what the viewer of this export may be given",
}


_GONE = object()


def strip(document: Any, node: Node | None, data_sets: frozenset[str], removed: set[str],
          path: str = "") -> Any:
    """The document without the values of `data_sets` and without any field the route
    table does not declare (their paths added to `removed`): what an export made for
    someone other than the data subject may hold. An object or list element left with no
    data of its own goes too."""
    out = _strip(document, node, data_sets, removed, path) if node is not None else document
    return {} if out is _GONE else out


def _strip(value: Any, node: Node, data_sets: frozenset[str], removed: set[str],
           path: str) -> Any:
    if isinstance(node, Leaf):
        if node.data_set in data_sets:
            removed.add(path)
            return _GONE
        return value
    if value is None:
        return None
    if isinstance(node, ListOf):
        kept = [r for r in (_strip(i, node.item, data_sets, removed, path + "[]") for i in value)
                if r is not _GONE]
        return _GONE if value and not kept else kept
    if node.dataset_by is not None:
        fld, values = node.dataset_by
        if values.get(value.get(fld)) in data_sets:
            removed.add(path or "body")
            return _GONE
        for key in value.keys() - node.fields.keys():
            removed.add(join_path(path, key))
        return {k: v for k, v in value.items() if k in node.fields}
    result, has_data, removed_any = {}, False, False
    for key, child in value.items():
        spec = node.fields.get(key)
        if spec is None:
            # undeclared: the redaction let it through to the data subject only; whoever
            # else receives the export (the assisting admin) is not them
            removed.add(join_path(path, key))
            removed_any = True
            continue
        r = _strip(child, spec, data_sets, removed, join_path(path, key))
        if r is _GONE:
            removed_any = True
            continue
        result[key] = r
        has_data = has_data or not (isinstance(spec, Leaf) and spec.data_set is None)
    return _GONE if removed_any and not has_data else result


def served_in(paths: set[str], node: Node | None) -> set[str]:
    """The data sets of a shape whose values sit at these paths (what strip took out)."""
    found: set[str] = set()
    for path in paths:
        at = node
        for part in path.split("."):
            part = part.removesuffix("[]")
            while isinstance(at, ListOf):
                at = at.item
            if isinstance(at, ObjectOf) and part in at.fields:
                at = at.fields[part]
        while isinstance(at, ListOf):
            at = at.item
        if isinstance(at, Leaf) and at.data_set:
            found.add(at.data_set)
        elif isinstance(at, ObjectOf) and at.dataset_by:
            found |= set(at.dataset_by[1].values())
    return found


OWN_KINDS = ("user", "author")      # data sets that are one person's own (datasets.yaml)


def foreign(value: Any, node: Node | None, sub: str, catalog: Catalog, path: str = "") -> str | None:
    """Where the export's document holds data of another person: an object naming someone
    else as its user or author (a CDR, a note, a user record) that still carries data of
    a data set that is that person's own. None when every element is about `sub` or is data
    the user may read (meeting content of a meeting they organised, EUO data). A second
    line behind the redaction, which already drops such objects."""
    if node is None or value is None or isinstance(node, Leaf):
        return None
    if isinstance(node, ListOf):
        for item in value if isinstance(value, list) else ():
            if (where := foreign(item, node.item, sub, catalog, path + "[]")) is not None:
                return where
        return None
    if not isinstance(value, dict):
        return None
    for rel, fld in node.subject:
        named = value.get(fld)
        named = str(named) if isinstance(named, int) and not isinstance(named, bool) else named
        if rel in ("self", "author") and named != sub:
            own = {spec.data_set for key, spec in node.fields.items()
                   if key in value and isinstance(spec, Leaf) and spec.data_set}
            if node.dataset_by is not None:
                own.add(node.dataset_by[1].get(value.get(node.dataset_by[0])))
            if any(d in catalog.data_sets and catalog.data_sets[d].subject in OWN_KINDS
                   for d in own):
                return path or "body"
    for key, spec in node.fields.items():
        if not isinstance(spec, Leaf) and key in value:
            where = foreign(value[key], spec, sub, catalog, join_path(path, key))
            if where is not None:
                return where
    return None


def items_of(document: dict, list_field: str) -> list[dict]:
    """The elements of a listing, each with an identifier id; Denied(502) otherwise."""
    items = document.get(list_field) or []
    if not isinstance(items, list):
        raise Denied("backend_unmappable", f"the backend's {list_field} is not a list")
    out = []
    for item in items:
        item_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)
        if not isinstance(item_id, str) or not IDENTIFIER.fullmatch(item_id) or item_id in (".", ".."):
            raise Denied("backend_unmappable",
                         f"an item of the backend's {list_field} has no valid id")
        out.append({**item, "id": item_id})
    return out


def split_by_data_set(value: Any, node: Node | None) -> dict[str, list[Any]]:
    """The parts of a document that belong to each data set, identifiers kept alongside."""
    out: dict[str, list[Any]] = defaultdict(list)
    if node is not None:
        _split(value, node, out)
    return out


def _split(value: Any, node: Node, out: dict[str, list[Any]]) -> None:
    if value is None:
        return
    if isinstance(node, Leaf):
        if node.data_set:
            out[node.data_set].append(value)
        return
    if isinstance(node, ListOf):
        for item in value:
            _split(item, node.item, out)
        return
    if node.dataset_by is not None:
        fld, values = node.dataset_by
        out[values.get(value.get(fld), "unclassified")].append(value)
        return
    own = {spec.data_set for spec in node.fields.values()
           if isinstance(spec, Leaf) and spec.data_set}
    nested = [k for k, spec in node.fields.items() if not isinstance(spec, Leaf)]
    if len(own) == 1 and not nested:
        out[own.pop()].append(value)          # a record of one data set: keep it whole
        return
    ids = {k: v for k, v in value.items()
           if isinstance(node.fields.get(k), Leaf) and node.fields[k].data_set is None}
    parts: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, child in value.items():
        spec = node.fields.get(key)
        if spec is None:
            parts["unclassified"][key] = child
        elif isinstance(spec, Leaf):
            if spec.data_set:
                parts[spec.data_set][key] = child
        else:
            _split(child, spec, out)
    for data_set, part in parts.items():
        out[data_set].append({**ids, **part})


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_")[:120] or "file"


def export_document(gw: Gateway, subject: Principal, gathered: Gathered,
                    request: web.Request, assisted: dict[str, str] | None = None,
                    exporter_withhold: frozenset[str] = frozenset()) -> dict[str, Any]:
    """export.json: the records by service and data set, each data set with what the
    catalog says of it and who may see it under the policy in force."""
    catalog = gw.catalog
    services = {}
    for service, data_sets in gathered.services.items():
        services[service] = {}
        for name, records in sorted(data_sets.items()):
            services[service][name] = {"about": about(gw, name), "records": records}
    export = {"format": FORMAT, "exported_at": now_utc().isoformat(),
              "exported_from": {"gateway": request.host, "client_addr": request.remote},
              "request_id": request[REQUEST_ID], "policy_version": gw.policy_version}
    if assisted:
        export["assisted"] = assisted
    document = {
        "export": export,
        "subject": {"user": subject.sub, "euo": subject.euo},
        "services": services,
        "attachments": gathered.attachments,
        "not_held": gathered.not_held,
        "withheld_elements": [
            {"reason": reason, "data_set": None if data_set == "null" else data_set,
             "elements": count, "meaning": ELEMENT_MEANING.get(reason, reason)}
            for reason, by_data_set in sorted(gathered.elements.items())
            for data_set, count in sorted(by_data_set.items())],
        "held_by_gateway": gathered.held_by_gateway,
    }
    if assisted:
        readable = gw.policy.granted(subject.role, subject.kind.relations, "read")
        document["withheld"] = [{
            "data_sets": [name], "sources": sorted(gathered.withheld.get(name, ())),
            "reason": "author_only" if catalog.data_sets[name].subject == "author"
            else "not_the_administrators",
            "meaning": f"only its author may ever receive {name} (a floor)"
            if catalog.data_sets[name].subject == "author" else
            f"the administrator's own policy lines do not give them {name} of this user: "
            "not given to the administrator who made this export; the user exports it themself"}
            for name in sorted(readable & exporter_withhold)]
    return document




def about(gw: Gateway, name: str) -> dict[str, Any]:
    """What the catalog says of a data set (purpose, retention, ...) and its recipients:
    every (role, relation) the policy in force lets read it."""
    ds = gw.catalog.data_sets.get(name)
    if ds is None:
        return {"note": "fields the route table does not classify"}
    out = {k: v for k, v in ds.public().items() if k not in ("name",)}
    out["recipients"] = [{"role": w["role"], "relation": w["relation"]}
                         for w in gw.policy.who_may(name) if "read" in w["actions"]]
    return out
