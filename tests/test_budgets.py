"""Budgets: a total deadline per backend call, a size cap on JSON answers, and a file
whose backend breaks off reaches the client as broken, never as complete."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import orjson
from aiohttp import web

from gateway.demo.run import start_site

from .conftest import audit_row, call, gateway_settings, running_gateway, unread_get, wait_for

PATH = "/telephony/euos/euo-acme"


async def test_a_dripping_backend_is_cut_at_the_deadline(hostile_gateway, http, token_for, db):
    """A byte every 0.3 s keeps the read timeout (1 s) happy; the deadline (1.5 s) is not."""
    gw, backend = hostile_gateway

    async def drip(request):
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(40):
            await response.write(b" ")
            await asyncio.sleep(0.3)
        return response
    backend.answer(drip)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, headers, body = await call(http, "GET", gw + PATH, token_for("staff"))
    assert status == 504 and orjson.loads(body)["error"]["code"] == "backend_timeout"
    assert loop.time() - started < 5
    row = await audit_row(db, headers["X-Request-Id"])
    assert row["decision"] == "error" and row["status"] == 504


async def test_a_json_answer_over_the_cap_is_refused(hostile_gateway, http, token_for):
    gw, backend = hostile_gateway
    big = {"id": "euo-acme", "name": "x" * (2 << 20)}
    backend.answer(lambda request: big)
    status, _, body = await call(http, "GET", gw + PATH, token_for("staff"))
    assert status == 502 and orjson.loads(body)["error"]["code"] == "backend_answer_too_large"


async def test_a_chunked_file_that_breaks_off_stays_broken(hostile_gateway, http, token_for):
    """The backend sends part of a chunked WAV and dies: the client must see an incomplete
    body (a payload error), not a complete 200."""
    gw, backend = hostile_gateway

    async def broken(request):
        response = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"RIFF" + b"\0" * 70_000)
        request.transport.abort()
        return response
    backend.answer(broken)
    url = gw + "/telephony/euos/euo-acme/users/u-alice/voicemails/vm-1"
    headers = {"Authorization": f"Bearer {token_for('alice')}"}
    try:
        async with http.get(url, headers=headers) as r:
            assert r.status == 200
            await r.read()
        broke = False
    except aiohttp.ClientPayloadError:
        broke = True
    assert broke, "a truncated file reached the client as complete"


async def test_files_copied_at_once_are_capped(backends, database_url, http, token_for):
    """With GATEWAY_MAX_STREAMS=1, a second download while one is held is 503 streams_busy,
    and once the first is done the next one is served."""
    release = asyncio.Event()

    async def held(request):
        response = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        await response.prepare(request)
        await response.write(b"RIFF")
        await release.wait()
        await response.write(b"WAVE")
        return response
    app = web.Application()
    app.router.add_get("/{tail:.*}", held)
    runner, port = await start_site(app, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    settings = gateway_settings(dict(backends["urls"], telephony=url), max_streams=1)
    path = "/telephony/euos/euo-acme/users/u-alice/voicemails/vm-1"
    headers = {"Authorization": f"Bearer {token_for('alice')}"}
    try:
        async with running_gateway(settings, database_url) as gw:
            async with http.get(gw + path, headers=headers) as first:
                assert first.status == 200
                status, _, body = await call(http, "GET", gw + path, token_for("alice"))
                assert status == 503 and orjson.loads(body)["error"]["code"] == "streams_busy"
                release.set()
                assert await first.read() == b"RIFFWAVE"

            async def served():         # the first handler gives its slot back as it returns
                status, _, body = await call(http, "GET", gw + path, token_for("alice"))
                return status == 200 and body == b"RIFFWAVE"
            assert await wait_for(served)
    finally:
        await runner.cleanup()


async def test_a_backends_headers_are_capped(hostile_gateway, http, token_for, db):
    """The headers of an answer are held in memory until they end: past 64 KiB (a backend
    could stream header lines until the deadline, gigabytes of them) the answer is not
    well-formed HTTP to the gateway, 502 backend_unreachable, audited; an answer with
    headers of an ordinary size still passes."""
    gw, backend = hostile_gateway
    euo = {"id": "euo-acme", "name": "Acme", "postal_address": "x", "partner_id": "p-northwind",
           "trunks": []}
    for pad in ({f"X-Pad-{i}": "a" * 1000 for i in range(4000)},     # many lines
                {"X-Pad": "a" * 4_000_000}):                          # or one
        backend.answer(lambda request, pad=pad: web.Response(
            body=orjson.dumps(euo), content_type="application/json", headers=pad))
        status, headers, body = await call(http, "GET", gw + PATH, token_for("staff"))
        assert status == 502 and orjson.loads(body)["error"]["code"] == "backend_unreachable"
        row = await audit_row(db, headers["X-Request-Id"])
        assert row["decision"] == "error" and row["status"] == 502
    backend.answer(lambda request: web.Response(
        body=orjson.dumps(euo), content_type="application/json",
        headers={f"X-Pad-{i}": "a" * 1000 for i in range(40)}))
    status, _, body = await call(http, "GET", gw + PATH, token_for("staff"))
    assert status == 200 and orjson.loads(body)["name"] == "Acme", body


async def test_a_download_its_client_stops_reading_is_cut_and_its_slot_freed(database_url, http,
                                                                             token_for, backends):
    """A client that asks for a large file and then reads nothing would hold its stream
    slot for as long as its socket stays open: with GATEWAY_MAX_STREAMS=1 that is every
    download. Past GATEWAY_STREAM_WRITE_TIMEOUT_S with no chunk taken it is cut off, and
    the next download is served."""
    wav = b"RIFF" + b"\0" * (32 << 20)          # more than any socket buffers hold

    async def big(request):
        return web.Response(body=wav, content_type="audio/wav")
    app = web.Application()
    app.router.add_get("/{tail:.*}", big)
    runner, port = await start_site(app, "127.0.0.1", 0)
    settings = gateway_settings(dict(backends["urls"], telephony=f"http://127.0.0.1:{port}"),
                                max_streams=1, stream_write_timeout_s=0.5)
    path = "/telephony/euos/euo-acme/users/u-alice/voicemails/vm-1"
    alice = token_for("alice")
    loop = asyncio.get_running_loop()
    try:
        async with running_gateway(settings, database_url) as gw:
            sock, head = await unread_get(gw, path, alice)
            try:
                assert head.startswith(b"HTTP/1.1 200 ")     # and then nothing is read

                async def served():
                    status, _, body = await call(http, "GET", gw + path, alice)
                    return status == 200 and body == wav
                assert await wait_for(served, timeout=10)
                got = len(head)
                with contextlib.suppress(ConnectionResetError):
                    while chunk := await loop.sock_recv(sock, 1 << 16):
                        got += len(chunk)
                assert got < len(wav)                        # cut, not finished
            finally:
                sock.close()
    finally:
        await runner.cleanup()
