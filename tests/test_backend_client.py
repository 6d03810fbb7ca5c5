"""The lean backend client against real sockets on loopback: bodies with a length,
chunked and up to the close; keep-alive reuse; a backend that closes mid-body, one that
drops an idle connection, one that answers too slowly or not in HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import aiohttp
import pytest

from gateway.backend_client import BackendClient
from gateway.backends import Backends
from gateway.errors import Denied


class RawBackend:
    """A TCP server answering each request with the next scripted reply; counts connections
    and requests, and lets a test close every connection it holds."""

    def __init__(self):
        self.replies: list = []          # bytes, or an async fn(writer)
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        for w in self.writers:
            w.close()
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies.pop(0)
                if callable(reply):
                    if await reply(writer) == "close":
                        writer.close()
                        return
                else:
                    writer.write(reply)
                    await writer.drain()


def json_reply(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body)) + body


@pytest.fixture
async def raw():
    async with RawBackend() as backend:
        yield backend


def client_for(backend: RawBackend, read_timeout_s: float = 5.0) -> BackendClient:
    return BackendClient({"svc": backend.url}, limit=10, connect_timeout_s=2,
                         read_timeout_s=read_timeout_s)


async def body_of(client: BackendClient, path: str = "/x") -> tuple[int, bytes]:
    answer = await client.request("svc", "GET", path, {"Accept": "application/json"})
    try:
        return answer.status, b"".join([c async for c in answer.content.iter_chunked(1 << 16)])
    finally:
        answer.release()


async def test_content_length_bodies_reuse_one_connection(raw):
    raw.replies = [json_reply(b'{"a":1}'), json_reply(b'{"b":2}')]
    client = client_for(raw)
    assert await body_of(client, "/first") == (200, b'{"a":1}')
    assert await body_of(client, "/second?q=1") == (200, b'{"b":2}')
    assert raw.connections == 1
    assert raw.requests[1].startswith(b"GET /second?q=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    await client.close()


async def test_a_write_sends_its_body_with_its_length(raw):
    raw.replies = [b"HTTP/1.1 204 No Content\r\n\r\n"]
    client = client_for(raw)
    answer = await client.request("svc", "PATCH", "/u", {"Content-Type": "application/json"},
                                  b'{"name":"x"}')
    assert answer.status == 204 and answer.content_length is None
    answer.release()
    assert raw.requests[0].endswith(b"Content-Length: 12\r\n\r\n{\"name\":\"x\"}")
    await client.close()


async def test_chunked_and_read_to_close_bodies_arrive_whole(raw):
    raw.replies = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
        json_reply(b"{}"),
    ]
    client = client_for(raw)
    answer = await client.request("svc", "GET", "/c", {})
    assert answer.content_type == "application/json" and answer.content_length is None
    assert b"".join([c async for c in answer.content.iter_chunked(2)]) == b'{"a":1}'
    answer.release()
    assert await body_of(client) == (200, b"{}")
    assert raw.connections == 1                       # a chunked answer keeps the connection

    async def until_close(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[1,2]")
        await writer.drain()
        return "close"
    raw.replies = [until_close, json_reply(b"[]")]
    assert await body_of(client) == (200, b"[1,2]")
    assert await body_of(client) == (200, b"[]")      # on a new connection
    assert raw.connections == 2
    await client.close()


async def test_a_backend_closing_mid_body_is_a_broken_answer(raw):
    async def half(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: 100\r\n\r\n"
                     + b"x" * 10)
        await writer.drain()
        return "close"
    raw.replies = [half, json_reply(b"{}")]
    client = client_for(raw)
    answer = await client.request("svc", "GET", "/f", {})
    assert answer.status == 200 and answer.content_length == 100
    with pytest.raises(aiohttp.ClientPayloadError):
        async for _ in answer.content.iter_chunked(4):
            pass
    answer.release()
    assert await body_of(client) == (200, b"{}")      # a fresh connection, not the broken one
    assert raw.connections == 2
    await client.close()


async def test_an_idle_connection_the_backend_dropped_is_replaced_for_a_read(raw):
    raw.replies = [json_reply(b"1"), json_reply(b"2")]
    client = client_for(raw)
    assert await body_of(client) == (200, b"1")
    for w in raw.writers:                               # the backend drops idle connections
        w.close()
    assert await body_of(client) == (200, b"2")
    assert raw.connections == 2
    await client.close()


async def test_slow_and_malformed_backends_map_to_504_and_502(raw):
    async def silent(writer):
        await asyncio.sleep(10)
    raw.replies = [silent]
    backends = Backends({"svc": raw.url}, client_for(raw), deadline_s=0.5, max_json_bytes=100)
    started = asyncio.get_running_loop().time()
    with pytest.raises(Denied) as refused:
        await backends.send("svc", "/x", "GET", {}, None, backends.deadline())
    assert refused.value.status == 504 and refused.value.code == "backend_timeout"
    assert asyncio.get_running_loop().time() - started < 1.5

    async def drip(writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n")
        for _ in range(20):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.1)
    raw.replies = [drip]
    deadline = backends.deadline()
    answer = await backends.send("svc", "/x", "GET", {}, None, deadline)
    with pytest.raises(Denied) as refused:
        await backends.read(answer, deadline)
    assert refused.value.code == "backend_timeout"

    raw.replies = [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                   b"NOT HTTP AT ALL\r\n\r\n"]
    for _ in range(2):
        with pytest.raises(Denied) as refused:
            await backends.send("svc", "/x", "GET", {}, None, backends.deadline())
        assert refused.value.code == "backend_unreachable"

    raw.replies = [json_reply(b"x" * 101)]
    deadline = backends.deadline()
    answer = await backends.send("svc", "/x", "GET", {}, None, deadline)
    with pytest.raises(Denied) as refused:
        await backends.read(answer, deadline)
    assert refused.value.code == "backend_answer_too_large"
    await backends.client.close()


async def test_a_header_value_with_a_line_break_is_never_sent(raw):
    client = client_for(raw)
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.request("svc", "GET", "/x", {"X-Evil": "a\r\nHost: elsewhere"})
    assert raw.requests == []
    await client.close()


async def test_connections_in_use_are_bounded(raw):
    release, arrived = asyncio.Event(), asyncio.Event()

    async def held(writer):
        if len(raw.requests) == 2:
            arrived.set()
        await release.wait()
        writer.write(json_reply(b"{}"))
        await writer.drain()
    raw.replies = [held, held, json_reply(b"{}")]
    client = BackendClient({"svc": raw.url}, limit=2, connect_timeout_s=2, read_timeout_s=5)
    first = [asyncio.create_task(body_of(client)) for _ in range(2)]
    third = asyncio.create_task(body_of(client))
    await asyncio.wait_for(arrived.wait(), 5)
    assert not third.done() and raw.connections == 2
    release.set()
    assert [await t for t in first] == [(200, b"{}")] * 2
    assert await third == (200, b"{}")
    assert raw.connections == 2
    await client.close()


async def test_a_body_larger_than_the_buffer_is_read_whole_or_refused_over_the_cap(raw):
    big = b"[" + b"1," * 400_000 + b"1]"              # ~800 KB: reading pauses and resumes
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 50_000]), big[i:i + 50_000])
                       for i in range(0, len(big), 50_000)) + b"0\r\n\r\n"
    raw.replies = [json_reply(big),
                   b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n" + chunked]
    backends = Backends({"svc": raw.url}, client_for(raw), deadline_s=5, max_json_bytes=1 << 20)
    deadline = backends.deadline()
    answer = await backends.send("svc", "/x", "GET", {}, None, deadline)
    assert await backends.read(answer, deadline) == big
    backends.max_json_bytes = 500_000                  # no length given: cut while reading
    answer = await backends.send("svc", "/x", "GET", {}, None, backends.deadline())
    with pytest.raises(Denied) as refused:
        await backends.read(answer, backends.deadline())
    assert refused.value.code == "backend_answer_too_large"
    await backends.client.close()


async def test_the_deadline_bounds_the_wait_for_a_free_connection_and_a_connect(raw):
    """Every connection busy: a call queued behind them still gets 504 at its deadline, not
    when one frees; a backend that never accepts fails the connect by the deadline too, or by
    the connect timeout when that comes first (504 either way)."""
    release, arrived = asyncio.Event(), asyncio.Event()

    async def held(writer):
        arrived.set()
        await release.wait()
        writer.write(json_reply(b"{}"))
        await writer.drain()
    raw.replies = [held]
    client = BackendClient({"svc": raw.url}, limit=1, connect_timeout_s=2, read_timeout_s=5)
    backends = Backends({"svc": raw.url}, client, deadline_s=0.3, max_json_bytes=100)
    busy = asyncio.create_task(body_of(client))
    await asyncio.wait_for(arrived.wait(), 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Denied) as refused:
        await backends.send("svc", "/x", "GET", {}, None, backends.deadline())
    assert refused.value.code == "backend_timeout" and loop.time() - started < 1.0
    release.set()
    assert await busy == (200, b"{}")
    await client.close()

    # a listening socket whose backlog is full never completes a connect
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        fillers = []
        url = f"http://127.0.0.1:{full.getsockname()[1]}"
        try:
            for _ in range(8):          # fill the backlog so a further connect hangs
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(full.getsockname())
                fillers.append(s)
            for deadline_s, connect_s in ((0.3, 5), (5, 0.3)):
                client = BackendClient({"svc": url}, limit=1, connect_timeout_s=connect_s,
                                       read_timeout_s=5)
                backends = Backends({"svc": url}, client, deadline_s=deadline_s,
                                    max_json_bytes=100)
                started = loop.time()
                with pytest.raises(Denied) as refused:
                    await backends.send("svc", "/x", "GET", {}, None, backends.deadline())
                assert refused.value.code == "backend_timeout"
                assert loop.time() - started < 2.0      # whichever bound comes first
                await client.close()
        finally:
            for s in fillers:
                s.close()
