"""Gathering an export: every source of export.yaml read for the user through the one
fetch path (pipeline.fetch_json, open_get), audited call by call, an attachment streamed
into the archive with the same stages."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from .. import pipeline
from ..audit.api import newest_accesses
from ..call import Call
from ..context import GATEWAY, REQUEST_ID, Gateway
from ..db import POOL, query
from ..endpoints import identifier
from ..errors import Denied
from ..forward import check_file
from ..policy.catalog import Node
from ..policy.export_spec import Attachments, Source
from ..policy.export_spec import route_of as _route_of
from ..policy.roles import REACH
from ..principal import Principal
from ..proxy import CHUNK
from ..subject_requests import request_details
from .document import (
    Gathered,
    foreign,
    items_of,
    safe_name,
    served_in,
    split_by_data_set,
    strip,
)
from .zipstream import ZipStream

log = logging.getLogger("gateway.pipeline")
EXPORT_ACCESSES = 10_000       # access-log entries in export.json (memory); the ZIP has all


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
            first = source.get.format(**self.fill)
            att = source.attachments
            covers = self._data_sets(source.get, att and att.get,
                                     source.follow and source.follow[1])
            async for path, (document, shape, full) in self._pages(out, first, source.optional,
                                                                  covers):
                await self._take(out, source, path, document, shape, full)
        out.held_by_gateway = await held_by_gateway(self.gw, self.pool, self.viewer)
        return out

    async def _pages(self, out: Gathered, first: str, optional: bool, covers: list[str]):
        """(path, fetched) of every page of the document at `first` (one, unless the
        backend pages it); a 404 of an optional first page yields nothing."""
        async def read(path: str):
            return await self._fetch(out, path, optional and path == first, covers)
        async for path, fetched in pipeline.pages(first, read, lambda f: f[2]):
            if fetched is not None:
                yield path, fetched

    async def _take(self, out: Gathered, source: Source, path: str, document: Any,
                    shape: Node, full: Any) -> None:
        """File one page of a source, with what it leads to: the documents its items name
        (follow) and its attachments."""
        self._file(out, path, document, shape)
        att = source.attachments
        if source.follow and isinstance(full, dict):
            list_field, follow = source.follow
            for item in items_of(full, list_field):
                sub_path = follow.format(**self.fill, id=item["id"])
                if sub_path in out.fetched:       # a meeting organised and attended
                    continue
                # listed a moment ago, gone now (deleted meanwhile): not held, said so
                async for page, sub in self._pages(out, sub_path, True, self._data_sets(follow)):
                    self._file(out, page, *sub[:2])
        if att and isinstance(full, dict):
            self._list_attachments(out, att, full)

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
        for item in items_of(document, spec.list_field):
            item_id = item["id"]
            stem = "_".join(str(item.get(f, "")) for f in spec.name) or item_id
            if spec.ext:   # the type is known: date and peer first, the id for uniqueness
                name = safe_name(f"{stem}_{item_id}") + "." + spec.ext
            else:          # the item names its own file (a document): keep its extension
                name = safe_name(f"{item_id}_{stem}")
            file = f"{service}/{spec.list_field}/{name}"
            while file in out.names:
                file = file.replace(".", "_1.", 1) if "." in file else file + "_1"
            out.names.add(file)
            out.attachments.append({
                "file": file, "id": item_id, "data_sets": sorted(route.binary),
                "source": "GET " + spec.get.format(**self.fill, id=item_id)})

    async def stream_attachment(self, path: str, zipped: ZipStream, file: str,
                                response: web.StreamResponse) -> None:
        """Written ahead like any file the gateway serves: the intent row before the
        member's first byte, the outcome row (the bytes that went into the archive, reason
        `cut` when it broke off) after its last. Denied before the first byte (the member is
        not begun)."""
        call = self._call(path)
        try:
            target, upstream, _ = await pipeline.open_get(self.gw, self.viewer, path, call,
                                                          self.client, about=self.viewer.sub)
            try:
                check_file(target.route, upstream)
                await call.intend(sorted(target.route.binary), upstream.status,
                                  upstream.content_length or 0, "served")
            except Denied:
                upstream.release()
                raise
        except Exception as e:
            raise await call.fail(e) from None
        delivered, cut = 0, True
        try:
            with zipped.open(file, compress=False) as member:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    member.write(chunk)
                    delivered += len(chunk)
                    await response.write(zipped.take())
            cut = False
        finally:
            upstream.release()
            call.ended(upstream.status, delivered, cut)


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
