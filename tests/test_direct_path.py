"""The proxy's paths go from the server straight to the pipeline (GatewayRunner), skipping
the app's route resolution, middleware and prepare signal. The same app under a plain
AppRunner takes them through its route and middleware: both must answer alike, headers,
error bodies, audit rows and all, and a request expecting `100 Continue` gets it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from gateway.app import create_app

from .conftest import audit_row, gateway_settings

USER = "/telephony/euos/euo-acme/users/u-alice"
CASES = [   # (caller, method, path, body)
    ("staff", "GET", USER, None),                                   # fields removed
    ("alice", "GET", USER, None),                                   # nothing removed
    ("staff", "GET", USER + "/voicemails", None),                   # 403
    ("alice", "GET", USER + "/voicemails/vm-u-alice-1", None),      # a file, streamed
    ("alice", "GET", "/telephony/euos/euo-acme/users/u-alice%2F..", None),   # 400 bad_path
    (None, "GET", USER, None),                                      # 401, counted only
    ("alice", "PATCH", USER, {"language": "nl"}),                   # a write
    ("alice", "GET", "/telephony/no/such/route", None),             # 404 unknown_route
]
# what differs by nature from one answer to the next
VARYING = {"date", "x-request-id", "content-length", "server"}


@contextlib.asynccontextmanager
async def plain_runner(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def through_the_app(backends, database_url) -> AsyncIterator[str]:
    async with plain_runner(create_app(gateway_settings(backends["urls"]), database_url)) as url:
        yield url


async def answer(http, base: str, token_for, caller, method: str, path: str, body) -> tuple:
    headers = {"Authorization": f"Bearer {token_for(caller)}"} if caller else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    async with http.request(method, base + path, headers=headers,
                            data=orjson.dumps(body) if body is not None else None) as r:
        content = await r.read()
        return r.status, r.headers.copy(), content


@pytest.mark.parametrize(("caller", "method", "path", "body"), CASES)
async def test_the_direct_path_answers_as_the_app_does(gateway, through_the_app, http, token_for,
                                                       db, caller, method, path, body):
    direct = await answer(http, gateway, token_for, caller, method, path, body)
    routed = await answer(http, through_the_app, token_for, caller, method, path, body)
    assert direct[0] == routed[0]
    assert {k.lower(): v for k, v in direct[1].items() if k.lower() not in VARYING} == \
        {k.lower(): v for k, v in routed[1].items() if k.lower() not in VARYING}
    for status, headers, content in (direct, routed):
        assert headers["X-Request-Id"]
        assert headers["Cache-Control"] == "private, no-store"
        assert headers["Vary"] == "Authorization"
        assert headers["X-Content-Type-Options"] == "nosniff"
        if status >= 400:
            assert orjson.loads(content)["error"]["request_id"] == headers["X-Request-Id"]
    if direct[1].get("Content-Type") == "application/json" and direct[0] < 400:
        assert orjson.loads(direct[2]) == orjson.loads(routed[2])
    else:
        assert len(direct[2]) == len(routed[2]) or direct[0] >= 400
    if caller is not None and not path.endswith("%2F.."):
        rows = [await audit_row(db, h["X-Request-Id"]) for _, h, _ in (direct, routed)]
        keep = ("decision", "status", "route", "reason", "data_sets", "fields_removed",
                "subject_euo", "subject_users", "actor_sub")
        assert [{k: r[k] for k in keep} for r in rows][0] == [{k: r[k] for k in keep}
                                                               for r in rows][1]


async def test_a_write_expecting_100_continue_is_answered(gateway, token_for):
    """curl sends `Expect: 100-continue` before a body over 1 KB and waits for the 100."""
    host, port = gateway.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = orjson.dumps({"language": "nl"})
    writer.write((f"PATCH {USER} HTTP/1.1\r\nHost: {host}\r\n"
                  f"Authorization: Bearer {token_for('alice')}\r\n"
                  "Content-Type: application/json\r\nExpect: 100-continue\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode())
    await writer.drain()
    first = await asyncio.wait_for(reader.readline(), timeout=10)
    assert first.startswith(b"HTTP/1.1 100")
    await reader.readline()                      # the blank line after the 100
    writer.write(body)
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    assert status.startswith(b"HTTP/1.1 200")
