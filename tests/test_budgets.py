"""Budgets: a total deadline per backend call, a size cap on JSON answers, and a file
whose backend breaks off reaches the client as broken, never as complete."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web

from .conftest import audit_row, call

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
