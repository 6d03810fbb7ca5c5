"""The export: gather (JSON, audited per call), then stream (export.json + attachments)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .. import pipeline
from ..audit import AuditRow
from ..audit.api import access_log_pages, newest_accesses
from ..call import Call
from ..context import GATEWAY, REQUEST_ID, Gateway
from ..db import DATABASE_ERRORS, POOL, query
from ..endpoints import CALL, IDENTIFIER, ME, api, identifier, json_response, only
from ..errors import Denied
from ..forward import check_file
from ..policy.catalog import Catalog, Leaf, ListOf, Node, ObjectOf
from ..policy.export_spec import Attachments, Source
from ..policy.export_spec import route_of as _route_of
from ..policy.roles import REACH
from ..principal import Principal
from ..proxy import CHUNK
from ..redact import MASKING, RESTRICTION, RETENTION, SCOPE, join_path, now_utc
from ..subject_requests import request_details
from .zipstream import ZipStream

log = logging.getLogger("gateway.pipeline")

FORMAT = "partner-gateway-export/1"
ASSISTED_EXPORT = "assisted_export"      # the API group of roles.yaml that may make one


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


NOT_HELD = "the backend holds no such data for this user (it answered 404)"


class Exporter:
    """One user's export: every backend call made with that user as viewer, each audited.

    `actor` receives the archive and is the actor of every row: the user themself, or the
    EUO admin of an assisted export, whose rows also carry `reason` (the purpose). In an
    assisted export the data sets the admin may not read of this user through the API
    (personal communications, private notes: their own policy lines decide) are taken out
    before the row is committed, so the rows say what the admin got."""

    def __init__(self, request: web.Request, actor: Principal, subject: Principal,
                 reason: str | None = None, assisted: bool = False):
        self.gw: Gateway = request.app[GATEWAY]
        self.pool = request.app[POOL]
        self.actor, self.viewer, self.reason, self.assisted = actor, subject, reason, assisted
        self.request_id = request[REQUEST_ID]
        self.client = request.remote
        self.fill = {"euo": identifier(subject.euo, "the user's EUO"),
                     "user": identifier(subject.sub, "the user")}
        catalog = self.gw.catalog
        # an assisted export gives the admin no more than their own policy lines give them
        # over this user's data through the API (never private notes: a floor); the rest is
        # listed as withheld, for the user to export themself
        reach = frozenset({REACH[actor.kind.tenant_claim]})
        self.withhold = frozenset(catalog.data_sets) - self.gw.policy.granted(
            actor.role, reach, "read") if assisted else frozenset()
        self.readable = self.gw.policy.granted(subject.role, subject.kind.relations, "read")

    def _call(self, path: str) -> Call:
        call = self.gw.new_call(self.request_id, "GET", path, self.client)
        call.identify(self.actor)
        call.row.reason = self.reason
        return call

    async def get_json(self, path: str, out: Gathered | None = None) -> tuple[Any, Node, Any]:
        """A redacted document bound to the user, its row committed; Denied on any
        failure (audited). Also the document as the user would see it (an assisted export
        follows its identifiers: the meetings and files the user's own listing names)."""
        call = self._call(path)
        try:
            # an EUO-wide source (the company directory, say) read for this user's export:
            # the row names whose export it is, so it shows in that user's access log
            target, answer = await pipeline.fetch_json(self.gw, self.viewer, path, call,
                                                       self.client, about=self.viewer.sub)
            document, served, removed = answer.document, answer.served, answer.removed
            full = document
            size = len(answer.body)
            shape = target.route.body
            if self.assisted:
                stripped: set[str] = set()
                document = strip(document, shape, self.withhold, stripped)
                if stripped:
                    served = [d for d in served if d not in self.withhold]
                    removed = sorted(set(removed) | stripped)
                    size = len(orjson.dumps(document))
                    if out is not None:
                        for ds in self.withhold & served_in(stripped, shape):
                            out.withheld[ds].add(f"GET {path}")
            if (where := foreign(document, shape, self.viewer.sub, self.gw.catalog)) is not None:
                log.warning("export %s: %s names another person at %s",
                                     self.request_id, path, where)
                raise Denied("backend_subject_mismatch",
                             "the backend answered with another person's data")
            await call.allow(answer.status, size, served, removed)
            if out is not None:
                out.add_receipt(call.row.withheld)
        except Exception as e:
            raise await call.fail(e) from None
        return document, shape, full

    def _data_sets(self, *paths: str | None) -> list[str]:
        """The data sets the user may read that these (template) paths would have served."""
        found: set[str] = set()
        for path in paths:
            if path:
                route, _ = _route_of(self.gw.catalog, path.format(**self.fill, id="x"))
                found |= route.data_sets | set(route.binary)
        return sorted((found & self.readable) - self.withhold)

    async def _fetch(self, out: Gathered, path: str, optional: bool,
                     covers: list[str]) -> tuple[Any, Node, Any] | None:
        """get_json, once per path; a 404 of an optional source is recorded as not held."""
        out.fetched.add(path)
        try:
            return await self.get_json(path, out)
        except Denied as d:
            if optional and d.code == "backend_not_found":
                out.not_held.append({"source": f"GET {path}", "data_sets": covers,
                                     "reason": d.code, "meaning": NOT_HELD})
                return None
            raise

    async def gather(self, sources: list[Source]) -> Gathered:
        out = Gathered()
        for source in sources:
            path = source.get.format(**self.fill)
            att = source.attachments
            fetched = await self._fetch(out, path, source.optional, self._data_sets(
                source.get, att and att.get, source.follow and source.follow[1]))
            if fetched is None:
                continue
            document, shape, full = fetched
            self._file(out, path, document, shape)
            if source.follow and isinstance(full, dict):
                list_field, follow = source.follow
                for item in _items(full, list_field):
                    sub_path = follow.format(**self.fill, id=item["id"])
                    if sub_path in out.fetched:       # a meeting organised and attended
                        continue
                    # listed a moment ago, gone now (deleted meanwhile): not held, said so
                    sub = await self._fetch(out, sub_path, True, self._data_sets(follow))
                    if sub is not None:
                        self._file(out, sub_path, *sub[:2])
            if att and isinstance(full, dict):
                self._list_attachments(out, att, full)
        out.held_by_gateway = await held_by_gateway(self.gw, self.pool, self.viewer)
        return out

    def _file(self, out: Gathered, path: str, document: Any, shape: Node) -> None:
        service = path.strip("/").split("/")[0]
        for data_set, values in split_by_data_set(document, shape).items():
            for value in values:
                if value == {}:         # nothing left of it (an assisted export's strip)
                    continue
                out.services[service][data_set].append({"source": f"GET {path}", "data": value})

    def _list_attachments(self, out: Gathered, spec: Attachments, document: dict) -> None:
        service = spec.get.strip("/").split("/")[0]
        route, _ = _route_of(self.gw.catalog, spec.get.format(**self.fill, id="x"))
        if set(route.binary) & self.withhold:      # not the assisting admin's to receive
            for ds in set(route.binary) & self.withhold:
                out.withheld[ds].add("GET " + spec.get.format(**self.fill, id="{id}"))
            return
        for item in _items(document, spec.list_field):
            item_id = item["id"]
            stem = "_".join(str(item.get(f, "")) for f in spec.name) or item_id
            if spec.ext:   # the type is known: date and peer first, the id for uniqueness
                name = _safe(f"{stem}_{item_id}") + "." + spec.ext
            else:          # the item names its own file (a document): keep its extension
                name = _safe(f"{item_id}_{stem}")
            file = f"{service}/{spec.list_field}/{name}"
            while file in out.names:
                file = file.replace(".", "_1.", 1) if "." in file else file + "_1"
            out.names.add(file)
            out.attachments.append({
                "file": file, "id": item_id, "data_sets": sorted(route.binary),
                "source": "GET " + spec.get.format(**self.fill, id=item_id)})

    async def stream_attachment(self, path: str, zipped: ZipStream, file: str,
                                response: web.StreamResponse) -> None:
        """Commit the call's row, then copy the backend's bytes into the archive. Denied
        before the first byte (the member is not begun)."""
        call = self._call(path)
        try:
            target, upstream, _ = await pipeline.open_get(self.gw, self.viewer, path, call,
                                                          self.client, about=self.viewer.sub)
            try:
                check_file(target.route, upstream)
                await call.allow(upstream.status, upstream.content_length or 0,
                                 sorted(target.route.binary))
            except Denied:
                upstream.release()
                raise
        except Exception as e:
            raise await call.fail(e) from None
        try:
            with zipped.open(file, compress=False) as member:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    member.write(chunk)
                    await response.write(zipped.take())
        finally:
            upstream.release()


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


def _items(document: dict, list_field: str) -> list[dict]:
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


def _safe(name: str) -> str:
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


EXPORT_ACCESSES = 10_000       # access-log entries in export.json (memory); the ZIP has all
ACCESS_LOG_FILE = "access-log.ndjson"


async def held_by_gateway(gw: Gateway, pool, subject: Principal) -> dict[str, Any]:
    """What the gateway itself holds about the user, beside what the backends hold: who
    accessed their data (their access log: the recipients) and their requests."""
    requests = await pool.fetch(query("my_requests"), subject.euo, subject.sub)
    accesses, complete = await newest_accesses(pool, gw.catalog, subject.sub, subject.euo,
                                               EXPORT_ACCESSES)
    return {
        "about": "kept by the gateway itself: every access by others to your data (by role "
                 "and organisation, as GET /v1/me/access-log shows it) and your data-subject "
                 "requests with their history",
        "access_log": accesses,
        "access_log_complete": complete,
        "requests": [await request_details(pool, r) for r in requests],
    }


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


@api("/v1/me/export", ME)
async def export(request: web.Request, principal: Principal, row: AuditRow):
    """The caller's personal data from every backend: ZIP (default) or ?format=json."""
    return await _export(request, principal, principal, row)


@api("/v1/euos/{euo}/users/{user}/export", ASSISTED_EXPORT)
async def assisted_export(request: web.Request, principal: Principal, row: AuditRow):
    """An EUO admin exports for a user of their own EUO who cannot serve themself; every
    row names the admin as actor, the user as subject and the purpose as reason."""
    euo = identifier(request.match_info["euo"], "the EUO")
    user = identifier(request.match_info["user"], "the user")
    if euo != principal.euo:
        raise Denied("other_euo", "this user belongs to another EUO")
    gw = request.app[GATEWAY]
    purposes = gw.export_sources.purposes
    purpose = request.query.get("purpose")
    if purpose not in purposes or len(request.query.getall("purpose")) != 1:
        raise Denied("bad_purpose",
                     f"purpose must be one of {', '.join(sorted(purposes))}")
    # the user as viewer: the data-subject role of roles.yaml (the first, if several)
    role = gw.catalog.data_subject_roles[0]
    subject = Principal(sub=user, role=role, euo=euo, kind=gw.catalog.roles[role])
    row.reason = f"assisted_export:{purpose}"
    return await _export(request, principal, subject, row, {
        "by": {"role": principal.role, "sub": principal.sub, "euo": principal.euo},
        "purpose": purpose, "purpose_meaning": purposes[purpose]})


async def _export(request: web.Request, actor: Principal, subject: Principal, row: AuditRow,
                  assisted: dict | None = None) -> web.StreamResponse:
    # the parameters it takes, each once: a repeated format is not read as its first
    only(request.query, ("format", "purpose") if assisted is not None else ("format",),
         code="bad_format")
    fmt = request.query.get("format", "zip")
    if fmt not in ("zip", "json"):
        raise Denied("bad_format", "format must be zip or json")
    row.subject_euo, row.subject_users = subject.euo, [subject.sub]
    exporter = Exporter(request, actor, subject, row.reason, assisted=assisted is not None)
    gw = exporter.gw
    if fmt == "json":
        gathered = await exporter.gather(gw.export_sources.sources)
        row.data_sets = _served(gathered)
        return json_response(export_document(gw, subject, gathered, request, assisted,
                                                      exporter.withhold))
    if gw.streams >= gw.max_streams:        # the ZIP copies files: it takes a stream slot
        raise Denied("streams_busy", "too many files are being downloaded; try again shortly")
    gw.streams += 1
    try:
        return await _zip(request, exporter, subject, row, assisted)
    finally:
        gw.streams -= 1


def _served(gathered: Gathered) -> list[str]:
    return sorted({d for s in gathered.services.values() for d in s} |
                  {d for a in gathered.attachments for d in a["data_sets"]})


EXPORT_SLOT_WAIT_S = 1.0     # how long a ZIP export waits for an export slot, then 503
MIDWAY = (Denied, aiohttp.ClientError, *DATABASE_ERRORS)


async def _zip(request: web.Request, exporter: Exporter, subject: Principal, row: AuditRow,
               assisted: dict | None) -> web.StreamResponse:
    """One ZIP export of a data subject's at a time (429 export_under_way for another
    while it runs, whoever asks): else one user asking again and again, or stalling each
    download, could hold every export slot and stream."""
    under_way, key = exporter.gw.exporting, (subject.euo, subject.sub)
    if key in under_way:
        raise Denied("export_under_way",
                     "an export of this user's data is under way; ask again once it is done")
    under_way.add(key)
    try:
        return await _zip_once(request, exporter, subject, row, assisted)
    finally:
        under_way.discard(key)


async def _zip_once(request: web.Request, exporter: Exporter, subject: Principal,
                    row: AuditRow, assisted: dict | None) -> web.StreamResponse:
    """The access log streams first, on a pooled connection: its export slot is taken
    before any backend is called (none free is still an error status) and given back once
    the log is sent, never held while files stream. Then the attachments, in constant
    memory, and export.json (which says what was not held, a file deleted meanwhile
    included) last; the JSON parts were gathered before anything was sent, so a failing
    backend there is an error status."""
    async with _export_slot(exporter.gw):
        gathered = await exporter.gather(exporter.gw.export_sources.sources)
        row.data_sets = _served(gathered)
        await request[CALL].allow(200, 0)
        response = web.StreamResponse(headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="export-{_safe(subject.sub)}.zip"'})
        await response.prepare(request)
        zipped = ZipStream()
        try:
            await _stream_access_log(exporter, subject, zipped, response)
        except MIDWAY as e:
            return _cut(request, response, zipped, row, e)
    gathered.held_by_gateway["access_log_file"] = ACCESS_LOG_FILE
    try:
        for item in list(gathered.attachments):
            try:
                await exporter.stream_attachment(item["source"][4:], zipped, item["file"],
                                                 response)
            except Denied as d:
                if d.code != "backend_not_found":
                    raise
                gathered.attachments.remove(item)     # listed, then deleted before we got it
                gathered.not_held.append({"source": item["source"], "data_sets": item["data_sets"],
                                          "reason": d.code, "meaning": NOT_HELD})
        document = export_document(exporter.gw, subject, gathered, request, assisted,
                                   exporter.withhold)
        with zipped.open("export.json", compress=True) as member:
            member.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))
        await response.write(zipped.take())
        await response.write(zipped.close())
    except MIDWAY as e:
        return _cut(request, response, zipped, row, e)
    await response.write_eof()
    return response


@contextlib.asynccontextmanager
async def _export_slot(gw: Gateway):
    """One of the export slots (settings.export_db_slots), waited for a moment: the pool
    keeps connections for everything else however many exports are asked for."""
    try:
        async with asyncio.timeout(EXPORT_SLOT_WAIT_S):
            await gw.export_slots.acquire()
    except TimeoutError:
        raise Denied("exports_busy", "too many exports are under way; try again shortly") \
            from None
    try:
        yield
    finally:
        gw.export_slots.release()


async def _stream_access_log(exporter: Exporter, subject: Principal, zipped: ZipStream,
                             response: web.StreamResponse) -> None:
    """The whole access log as one member, a page at a time from one snapshot. That holds a
    pooled connection throughout, so a client that stops reading or trickles must not keep
    it: each write has export_write_timeout_s, the whole log export_log_deadline_s."""
    gw = exporter.gw
    whole = asyncio.timeout(gw.export_log_deadline_s)
    try:
        async with whole:
            with zipped.open(ACCESS_LOG_FILE, compress=True) as member:
                async with contextlib.aclosing(access_log_pages(
                        exporter.pool, gw.catalog, subject.sub, subject.euo)) as pages:
                    async for page in pages:
                        member.write(b"".join(orjson.dumps(entry) + b"\n" for entry in page))
                        async with asyncio.timeout(gw.export_write_timeout_s):
                            await response.write(zipped.take())
    except TimeoutError:
        raise TimeoutError(
            f"the access log was not taken within {gw.export_log_deadline_s:g} s"
            if whole.expired() else
            f"the client took no page of it within {gw.export_write_timeout_s:g} s") from None


def _cut(request: web.Request, response: web.StreamResponse, zipped: ZipStream,
         row: AuditRow, e: Exception) -> web.StreamResponse:
    """Too late for an error status: the connection is cut before the ZIP directory, so
    the client sees a broken download rather than a quietly incomplete archive. Aborted,
    not closed: a close would wait for a client that reads nothing to take what is buffered."""
    log.error("export %s failed midway: %s", row.request_id, e)
    zipped.abandon()
    response.force_close()
    if request.transport is not None:
        request.transport.abort()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/me/export", export)
    app.router.add_get("/v1/euos/{euo}/users/{user}/export", assisted_export)
