"""Headers are allow-lists both ways: what a backend may receive from a client, what a
client may receive from a backend; every answer is private to its caller."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web

from .conftest import call

SNEAKY = {"X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE",
          "X-Method-Override": "DELETE", "X-Rewrite-URL": "/euos/euo-initech",
          "X-Original-URL": "/euos/euo-initech", "X-Tenant-Id": "euo-initech",
          "X-Impersonate": "u-bob", "Remote-User": "admin", "Range": "bytes=0-10",
          "If-None-Match": '"v1"', "If-Modified-Since": "Wed, 21 Oct 2015 07:28:00 GMT",
          "Cookie": "s=1", "X-Forwarded-Host": "evil", "Forwarded": "for=1.2.3.4",
          "X-Real-IP": "1.2.3.4", "Prefer": "return=representation", "Origin": "http://evil"}


async def test_client_headers_outside_the_allow_list_never_reach_the_backend(
        gateway, http, token_for, backends):
    status, headers, _ = await call(http, "GET", gateway + "/telephony/euos/euo-acme",
                                    token_for("staff"), headers=SNEAKY)
    assert status == 200
    _, _, seen = backends["seen"].requests[-1]
    assert seen["X-Request-Id"] == headers["X-Request-Id"]
    assert not {name.lower() for name in SNEAKY} & {name.lower() for name in seen}
    assert seen["X-Forwarded-For"] == "127.0.0.1"


@pytest.mark.parametrize(("value", "forwarded"), [
    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
    ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\x7f", False),
    ("not a trace", False),
    ("00-00000000000000000000000000000000-b7ad6b7169203331-01", False),   # all-zero trace id
    ("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", False),   # version ff
])
async def test_a_well_formed_traceparent_is_propagated(gateway, http, token_for, backends,
                                                       value, forwarded):
    """Otherwise the backend gets a trace the gateway started (tests/test_observability.py)."""
    try:
        await call(http, "GET", gateway + "/telephony/euos/euo-acme", token_for("staff"),
                   headers={"traceparent": value})
    except ValueError:          # the client library refuses to send it at all
        return
    _, _, seen = backends["seen"].requests[-1]
    assert (seen["traceparent"] == value) == forwarded


@pytest.mark.parametrize("path", ["/telephony/euos/euo-acme/users/u-alice",     # redacted
                                  "/telephony/euos/euo-acme"])                   # untouched
async def test_backend_caching_headers_never_reach_the_client(hostile_gateway, http, token_for,
                                                              path):
    gw, backend = hostile_gateway
    backend.answer(lambda request: {"id": request.path.split("/")[-1], "euo_id": "euo-acme",
                                    "name": "Acme", "first_name": "A"})
    status, headers, _ = await call(http, "GET", gw + path, token_for("staff"))
    assert status == 200
    assert headers["Cache-Control"] == "private, no-store"
    assert headers["Vary"] == "Authorization"
    for name in ("ETag", "Last-Modified", "Set-Cookie", "X-Backend-Secret"):
        assert name not in headers


async def test_binary_answers_are_private_attachments(hostile_gateway, http, token_for):
    gw, backend = hostile_gateway
    backend.answer(lambda request: web.Response(
        body=b"RIFF....WAVE", content_type="audio/wav",
        headers={"Cache-Control": "public, max-age=600", "ETag": '"w"',
                 "Content-Disposition": 'inline; filename="x.html"'}))
    status, headers, body = await call(
        http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice/voicemails/vm-1",
        token_for("alice"))
    assert status == 200 and body == b"RIFF....WAVE"
    assert headers["Content-Type"] == "audio/wav"
    assert headers["Content-Disposition"] == "attachment"
    assert headers["Cache-Control"] == "private, no-store" and "ETag" not in headers


async def test_a_document_where_a_file_was_due_is_refused(hostile_gateway, http, token_for):
    """A binary route answered with JSON (e.g. a user record) cannot be redacted: 502."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: {"id": "u-alice", "personal_directory": ["secret"]})
    status, _, body = await call(
        http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice/recordings/rec-1",
        token_for("partner"))
    assert status == 502 and b"secret" not in body


@pytest.mark.parametrize(("content_type", "extra"), [
    ("Application/JSON", {}), ("application/problem+json", {}), ("text/html", {}),
    ("audio/wav", {"Content-Encoding": "gzip"}),
])
async def test_a_file_of_another_kind_is_refused(hostile_gateway, http, token_for, content_type,
                                                extra):
    gw, backend = hostile_gateway
    backend.answer(lambda request: web.Response(
        body=b'{"first_name": "Bob", "mobile": "+32470111202"}',
        headers={"Content-Type": content_type, **extra}))
    for path in ("/telephony/euos/euo-acme/users/u-alice/voicemails/vm-1",):
        status, _, body = await call(http, "GET", gw + path, token_for("alice"))
        assert status == 502 and b"+32470111202" not in body


async def test_the_export_refuses_a_document_where_a_file_was_due(hostile_gateway, http,
                                                                  token_for):
    gw, backend = hostile_gateway

    def script(request):
        if request.path.endswith("/voicemails"):
            return {"voicemails": [{"id": "vm-1", "caller": "+32", "received_at": "2026-01-01"}]}
        if "/voicemails/" in request.path:
            return {"first_name": "Bob", "mobile": "+32470111202"}
        if request.path.endswith("/personal-directory"):
            return {"entries": []}
        if request.path.endswith(("/faxes", "/recordings")):
            return {request.path.rsplit("/", 1)[1]: []}
        if "/cdrs" in request.path:
            return {"cdrs": []}
        if "/connection-stats" in request.path:
            return {"stats": []}
        if "/organizers/" in request.path:
            return web.json_response({"error": "not found"}, status=404)
        return {"id": "u-alice", "euo_id": "euo-acme", "first_name": "Alice"}
    backend.answer(script)
    url = gw + "/v1/me/export"
    headers = {"Authorization": f"Bearer {token_for('alice')}"}
    try:
        async with http.get(url, headers=headers) as r:
            body = await r.read()
        assert r.status != 200 or b"+32470111202" not in body
    except aiohttp.ClientPayloadError:
        pass                      # cut off before the archive could carry the document


@pytest.mark.parametrize("status", [203, 205, 206, 207, 226])
async def test_a_backend_status_the_gateway_did_not_ask_for_is_not_passed_on(
        hostile_gateway, http, token_for, status):
    """Only 200, 201, 202 and 204 pass as such: a 206 to a Range never forwarded, a 205 or
    a 207 is an answer the gateway cannot vouch for (502, the body dropped)."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: web.Response(
        status=status, content_type="application/json",
        body=orjson.dumps({"id": "u-alice", "euo_id": "euo-acme", "first_name": "Alice"})))
    got, _, body = await call(http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice",
                              token_for("alice"))
    assert (got, orjson.loads(body)["error"]["code"]) == (502, "backend_unmappable")
    backend.answer(lambda request: {"id": "u-alice", "euo_id": "euo-acme", "first_name": "Alice"})
    assert (await call(http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice",
                       token_for("alice")))[0] == 200
