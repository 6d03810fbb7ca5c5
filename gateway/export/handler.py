"""The export: gather (JSON, audited per call), then stream (export.json + attachments)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web
from multidict import CIMultiDict

from .. import pipeline
from ..audit import AuditRow
from ..call import Call
from ..catalog import Catalog, Leaf, ListOf, Node, PolicyError
from ..endpoints import CALL, IDENTIFIER, ME, api, identifier, json_response
from ..errors import Denied
from ..pipeline import GATEWAY, Gateway
from ..principal import Principal
from ..proxy import CHUNK
from ..redact import now_utc
from .zipstream import ZipStream

FORMAT = "partner-gateway-export/1"


@dataclass(frozen=True)
class Attachments:
    list_field: str
    get: str
    name: tuple[str, ...]
    ext: str | None


@dataclass(frozen=True)
class Source:
    get: str
    optional: bool = False
    attachments: Attachments | None = None
    follow: tuple[str, str] | None = None      # (list field, path with {id})


def load_sources(policy_dir: Path, catalog: Catalog) -> list[Source]:
    """export.yaml, each path checked against the route table."""
    try:
        doc = yaml.safe_load((policy_dir / "export.yaml").read_text(encoding="utf-8"))
        sources = []
        for spec in doc["sources"]:
            att = spec.get("attachments")
            follow = spec.get("follow")
            sources.append(Source(
                get=spec["get"], optional=bool(spec.get("optional")),
                attachments=Attachments(att["list"], att["get"], tuple(att["name"]), att.get("ext"))
                if att else None,
                follow=(follow["list"], follow["get"]) if follow else None))
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise PolicyError(f"export.yaml: {e}") from None
    for s in sources:
        for path in (s.get, s.attachments and s.attachments.get, s.follow and s.follow[1]):
            if path and _route_of(catalog, path) is None:
                raise PolicyError(f"export.yaml: {path} is not in the route table")
    return sources


def _route_of(catalog: Catalog, path: str):
    service, *segments = path.split("?")[0].strip("/").split("/")
    return catalog.match(service, segments)


@dataclass
class Gathered:
    services: dict[str, dict[str, list]] = field(default_factory=lambda: defaultdict(
        lambda: defaultdict(list)))
    attachments: list[dict[str, Any]] = field(default_factory=list)
    not_held: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


class Exporter:
    """One user's export: every backend call made as that user, each audited."""

    def __init__(self, request: web.Request, principal: Principal):
        self.gw: Gateway = request.app[GATEWAY]
        self.principal = principal
        self.request_id = request[pipeline.REQUEST_ID]
        self.client = request.remote
        self.fill = {"euo": identifier(principal.euo, "the token's euo claim"),
                     "user": identifier(principal.sub, "the token's sub claim")}

    def _call(self, path: str) -> Call:
        call = self.gw.new_call(self.request_id, "GET", path, self.client)
        call.identify(self.principal)
        return call

    async def _open(self, path: str, call: Call):
        matched = pipeline.match_route(self.gw, "GET", path, call)
        target = pipeline.authorize(self.gw, self.principal, "GET", matched)
        deadline = self.gw.backends.deadline()
        upstream = await pipeline.send(self.gw, target, "GET", CIMultiDict(), call, self.client,
                                       deadline)
        return target, upstream, deadline

    async def get_json(self, path: str) -> tuple[Any, Node]:
        """A redacted document, its row committed; Denied on any failure (audited)."""
        call = self._call(path)
        try:
            target, upstream, deadline = await self._open(path, call)
            answer = await pipeline.read_json(self.gw, target, upstream, call, deadline)
            document = answer.document
            await call.allow(answer.status, len(answer.body), answer.served, answer.removed)
        except Exception as e:
            denial = e if isinstance(e, Denied) else pipeline.internal(e, self.request_id)
            await call.record_refusal(denial)
            raise denial from None
        return document, target.route.body

    async def gather(self, sources: list[Source]) -> Gathered:
        out = Gathered()
        for source in sources:
            path = source.get.format(**self.fill)
            try:
                document, shape = await self.get_json(path)
            except Denied as d:
                if source.optional and d.code == "backend_not_found":
                    out.not_held.append(f"GET {path}")
                    continue
                raise
            self._file(out, path, document, shape)
            if source.follow and isinstance(document, dict):
                list_field, follow = source.follow
                for item in _items(document, list_field):
                    sub_path = follow.format(**self.fill, id=item["id"])
                    sub_doc, sub_shape = await self.get_json(sub_path)
                    self._file(out, sub_path, sub_doc, sub_shape)
            if source.attachments and isinstance(document, dict):
                self._list_attachments(out, source.attachments, document)
        return out

    def _file(self, out: Gathered, path: str, document: Any, shape: Node) -> None:
        service = path.strip("/").split("/")[0]
        for data_set, values in split_by_data_set(document, shape).items():
            for value in values:
                out.services[service][data_set].append({"source": f"GET {path}", "data": value})

    def _list_attachments(self, out: Gathered, spec: Attachments, document: dict) -> None:
        service = spec.get.strip("/").split("/")[0]
        route, _ = _route_of(self.gw.catalog, spec.get.format(**self.fill, id="x"))
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
        """Commit the call's row, then copy the backend's bytes into the archive."""
        call = self._call(path)
        try:
            target, upstream, _ = await self._open(path, call)
            try:
                pipeline.check_file(target.route, upstream)
                await call.allow(upstream.status, upstream.content_length or 0,
                                 sorted(target.route.binary))
            except Denied:
                upstream.release()
                raise
        except Denied as d:
            await call.record_refusal(d)
            raise
        try:
            with zipped.open(file, compress=False) as member:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    member.write(chunk)
                    await response.write(zipped.take())
        finally:
            upstream.release()


def _items(document: dict, list_field: str) -> list[dict]:
    """The elements of a listing, each with an identifier id; Denied(502) otherwise."""
    items = document.get(list_field) or []
    if not isinstance(items, list):
        raise Denied(502, "backend_unmappable", f"the backend's {list_field} is not a list")
    out = []
    for item in items:
        item_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)
        if not isinstance(item_id, str) or not IDENTIFIER.fullmatch(item_id) or item_id in (".", ".."):
            raise Denied(502, "backend_unmappable",
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


def export_document(gw: Gateway, principal: Principal, gathered: Gathered,
                    request: web.Request) -> dict[str, Any]:
    catalog = gw.catalog
    services = {}
    for service, data_sets in gathered.services.items():
        services[service] = {}
        for name, records in sorted(data_sets.items()):
            ds = catalog.data_sets.get(name)
            about = ({"seed": ds.seed, "purpose": ds.purpose, "retention": ds.retention,
                      "collected_by": ds.collected_by} if ds else
                     {"note": "fields the route table does not classify"})
            services[service][name] = {"about": about, "records": records}
    return {
        "export": {"format": FORMAT, "exported_at": now_utc().isoformat(),
                   "exported_from": {"gateway": request.host, "client_addr": request.remote},
                   "request_id": request[pipeline.REQUEST_ID]},
        "subject": {"user": principal.sub, "euo": principal.euo},
        "services": services,
        "attachments": gathered.attachments,
        "not_held": gathered.not_held,
    }


@api("/v1/me/export", ME)
async def export(request: web.Request, principal: Principal, row: AuditRow):
    """The caller's personal data from every backend: ZIP (default) or ?format=json."""
    fmt = request.query.get("format", "zip")
    if fmt not in ("zip", "json"):
        raise Denied(400, "bad_format", "format must be zip or json")
    exporter = Exporter(request, principal)
    gathered = await exporter.gather(request.app[GATEWAY].export_sources)
    document = export_document(exporter.gw, principal, gathered, request)
    row.subject_euo, row.subject_users = principal.euo, [principal.sub]
    row.data_sets = sorted({d for s in gathered.services.values() for d in s} |
                           {d for a in gathered.attachments for d in a["data_sets"]})
    if fmt == "json":
        return json_response(document)
    await request[CALL].allow(200, 0)
    response = web.StreamResponse(headers={
        "Content-Type": "application/zip",
        "Content-Disposition": f'attachment; filename="export-{_safe(principal.sub)}.zip"'})
    await response.prepare(request)
    zipped = ZipStream()
    try:
        with zipped.open("export.json", compress=True) as member:
            member.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))
        await response.write(zipped.take())
        for item in gathered.attachments:
            await exporter.stream_attachment(item["source"][4:], zipped, item["file"], response)
        await response.write(zipped.close())
    except (Denied, aiohttp.ClientError, TimeoutError) as e:
        # too late for an error status: cut the connection before the ZIP directory, so
        # the client sees a broken download rather than a quietly incomplete archive
        pipeline.log.error("export %s failed midway: %s", row.request_id, e)
        zipped.abandon()
        response.force_close()
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/me/export", export)
