"""Self-service export: all of a user's data, nothing of anyone else's, audited, and a
failed backend call fails the export."""

from __future__ import annotations

import io
import zipfile

import aiohttp
import orjson
from aiohttp import web

from gateway.demo.run import start_site

from .conftest import call, gateway_settings, running_gateway

SESSION = web.AppKey("session", aiohttp.ClientSession)

# every data set (README.md, Contract) that concerns u-alice (she organises mtg-acme-1 and
# wrote a note) and is within its retention: her outgoing fax was sent, so it is past
# (README.md, Retention: the data subject's export is not exempt)
ALICE_DATA_SETS = {
    "telephony": {"user_name", "user_email", "user_language", "user_mobile", "user_address",
                  "personal_directory", "voicemails", "faxes_incoming",
                  "call_recordings", "call_history"},
    "meeting": {"organizer_name", "organizer_email", "organizer_language", "address_book",
                "organizer_documents", "meeting_list", "meeting_topic", "meeting_agenda",
                "meeting_invitees", "meeting_documents", "whiteboard_drawings", "chat_messages",
                "meeting_minutes", "private_notes", "participant_name", "participant_email",
                "connection_statistics"},
}


async def export_json(http, gateway, token):
    status, _, body = await call(http, "GET", gateway + "/v1/me/export?format=json", token)
    assert status == 200, body
    return orjson.loads(body), body


async def test_export_holds_every_data_set_about_the_user(gateway, http, token_for):
    doc, _ = await export_json(http, gateway, token_for("alice"))
    assert doc["subject"] == {"user": "u-alice", "euo": "euo-acme"}
    for service, expected in ALICE_DATA_SETS.items():
        assert set(doc["services"][service]) == expected
    about = doc["services"]["telephony"]["voicemails"]["about"]
    assert about["purpose"] == "Voice messaging" and about["retention"] and about["collected_by"]
    assert doc["export"]["exported_at"] and doc["export"]["exported_from"]["client_addr"]


async def test_export_holds_nothing_about_anyone_else(gateway, http, token_for):
    doc, body = await export_json(http, gateway, token_for("alice"))
    notes = doc["services"]["meeting"]["private_notes"]["records"]
    assert {r["data"]["author_id"] for r in notes} == {"u-alice"}
    cdrs = doc["services"]["telephony"]["call_history"]["records"]
    assert cdrs and {r["data"]["user_id"] for r in cdrs} == {"u-alice"}
    stats = doc["services"]["meeting"]["connection_statistics"]["records"]
    assert {r["data"]["user_id"] for r in stats} == {"u-alice"}
    for other in (b"Private thought of u-bob", b"Peeters'", b"+32470111202", b"u-dirk"):
        assert other not in body


async def test_a_user_without_meetings_has_no_meeting_content(gateway, http, token_for):
    doc, body = await export_json(http, gateway, token_for("bob"))
    assert "meeting_topic" not in doc["services"]["meeting"]
    notes = doc["services"]["meeting"]["private_notes"]["records"] if (
        "private_notes" in doc["services"]["meeting"]) else []
    assert all(r["data"]["author_id"] == "u-bob" for r in notes)


async def test_zip_attachments_are_byte_identical_to_the_backend(gateway, http, token_for,
                                                                 backends, demo):
    status, headers, body = await call(http, "GET", gateway + "/v1/me/export", token_for("alice"))
    assert status == 200 and headers["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    doc = orjson.loads(archive.read("export.json"))
    files = {a["file"]: a for a in doc["attachments"]}
    assert set(archive.namelist()) == {"export.json", *files}
    kinds = {f.split("/")[1] for f in files}
    assert kinds == {"voicemails", "faxes", "recordings", "documents"}
    for name, item in files.items():
        assert archive.read(name) == demo.blobs[item["id"]][1]


async def test_the_export_and_its_backend_calls_are_audited(gateway, http, token_for, db):
    _, headers, _ = await call(http, "GET", gateway + "/v1/me/export?format=json",
                               token_for("alice"))
    rows = await db.fetch("select route, decision from audit_log where request_id = $1",
                          headers["X-Request-Id"])
    routes = [r["route"] for r in rows]
    assert "gateway:/v1/me/export" in routes
    assert "telephony:/euos/{euo}/users/{user}/voicemails" in routes
    assert "meeting:/accounts/{euo}/meetings/{meeting}" in routes
    assert {r["decision"] for r in rows} == {"allow"}


async def test_only_users_may_export(gateway, http, token_for):
    for who in ("staff", "partner", "admin"):
        assert (await call(http, "GET", gateway + "/v1/me/export", token_for(who)))[0] == 403


async def test_a_failing_backend_fails_the_export(backends, database_url, http, token_for):
    """A backend error answers an error status, not a partial archive."""
    async def broken(request):
        return web.Response(status=500, text="boom")
    app = web.Application()
    app.router.add_get("/{tail:.*}", broken)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        urls = dict(backends["urls"], meeting=f"http://127.0.0.1:{port}")
        async with running_gateway(gateway_settings(urls), database_url) as gw:
            for path in ("/v1/me/export", "/v1/me/export?format=json"):
                status, headers, body = await call(http, "GET", gw + path, token_for("alice"))
                assert status == 502
                assert orjson.loads(body)["error"]["code"] == "backend_error"
                assert not body.startswith(b"PK")
    finally:
        await runner.cleanup()


async def test_an_attachment_breaking_off_midway_breaks_the_download(backends, database_url,
                                                                     http, token_for, demo):
    """The JSON parts succeed, a voicemail breaks off: the client cannot get a valid ZIP."""
    async def flaky(request):
        if request.path.endswith("/voicemails/vm-u-alice-1"):
            response = web.StreamResponse(headers={"Content-Type": "audio/wav",
                                                   "Content-Length": "1000000"})
            await response.prepare(request)
            await response.write(b"RIFF" + b"\0" * 1000)
            request.transport.close()
            return response
        async with request.app[SESSION].get(backends["urls"]["telephony"] + request.path_qs) as r:
            return web.Response(body=await r.read(), status=r.status,
                                content_type=r.content_type)
    app = web.Application()
    app.router.add_get("/{tail:.*}", flaky)
    async with aiohttp.ClientSession() as session:
        app[SESSION] = session
        runner, port = await start_site(app, "127.0.0.1", 0)
        try:
            urls = dict(backends["urls"], telephony=f"http://127.0.0.1:{port}")
            async with running_gateway(gateway_settings(urls), database_url) as gw:
                try:
                    status, _, body = await call(http, "GET", gw + "/v1/me/export",
                                                 token_for("alice"))
                except aiohttp.ClientError:
                    return    # the connection was cut: the download failed visibly
                assert status == 200
                try:
                    zipfile.ZipFile(io.BytesIO(body)).testzip()
                except zipfile.BadZipFile:
                    return
                raise AssertionError("a broken export produced a valid archive")
        finally:
            await runner.cleanup()
