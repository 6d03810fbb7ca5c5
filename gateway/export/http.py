"""The export's endpoints: GET /v1/me/export and the assisted export, JSON or a ZIP
streamed (attachments, the access log, export.json last) within an export slot."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import orjson
from aiohttp import web

from ..audit import AuditRow
from ..audit.api import access_log_pages
from ..context import GATEWAY, Gateway
from ..db import DATABASE_ERRORS
from ..endpoints import CALL, ME, api, identifier, json_response, only
from ..errors import Denied
from ..principal import Principal
from .document import Gathered, export_document, safe_name
from .gather import NOT_HELD, Exporter
from .zipstream import ZipStream

log = logging.getLogger("gateway.pipeline")


ASSISTED_EXPORT = "assisted_export"      # the API group of roles.yaml that may make one


ACCESS_LOG_FILE = "access-log.ndjson"


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
            "Content-Disposition": f'attachment; filename="export-{safe_name(subject.sub)}.zip"'})
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
