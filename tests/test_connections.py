"""Client connections are bounded (gateway/connections.py): idle ones are closed after
GATEWAY_IDLE_TIMEOUT_S, a request head that trickles in is cut after GATEWAY_HEADER_TIMEOUT_S,
and however many sockets are held open, the descriptors the backends and the database need
stay free: normal requests are served."""

from __future__ import annotations

import asyncio
import contextlib
import time

from .conftest import call, gateway_process, gateway_settings, running_gateway

USER = "/telephony/euos/euo-acme/users/u-alice"


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> float | None:
    """Seconds until the server closed this connection, or None if it did not in time."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - started


async def test_idle_and_slowloris_sockets_past_the_descriptor_limit_leave_requests_served(
        http, backends, database_url, token_for, tmp_path):
    """250 idle sockets and 50 that send their headers a byte at a time, against a gateway
    allowed 256 descriptors (they took every one before, and every request failed): normal
    requests are still served, each new connection taking an idle one's place; every
    slowloris socket is cut within the header timeout, every idle one within the idle
    timeout."""
    idle_s, header_s = 4, 1
    async with gateway_process(http, backends, database_url, tmp_path, max_files=256,
                               GATEWAY_IDLE_TIMEOUT_S=str(idle_s),
                               GATEWAY_HEADER_TIMEOUT_S=str(header_s)) as (_, base):
        port = int(base.rsplit(":", 1)[1])
        idle, slow, trickling = [], [], []
        try:
            for i in range(300):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 6 == 0:
                    slow.append((reader, writer))
                    trickling.append(asyncio.create_task(trickle(writer)))
                else:
                    idle.append((reader, writer))
            opened = time.monotonic()
            for _ in range(10):
                async with asyncio.timeout(10):
                    status, _, _ = await call(http, "GET", base + USER, token_for("staff"))
                assert status == 200
            slow_waits = await asyncio.gather(*(closed_by_server(r, header_s + 4)
                                                for r, _ in slow))
            assert None not in slow_waits, f"{slow_waits.count(None)} slowloris sockets open"
            waits = await asyncio.gather(*(closed_by_server(r, idle_s + 10) for r, _ in idle))
            assert None not in waits, f"{waits.count(None)} idle sockets still open"
            assert time.monotonic() - opened < idle_s + 10
        finally:
            for task in trickling:
                task.cancel()
            for _, writer in idle + slow:
                writer.close()


async def trickle(writer: asyncio.StreamWriter) -> None:
    """Send a request's head a byte every 0.2 s, never finishing it (slowloris)."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
    with contextlib.suppress(ConnectionError):
        for _ in range(300):
            await asyncio.sleep(0.2)
            writer.write(b"X")
            await writer.drain()


async def test_a_request_head_that_trickles_in_is_cut(backends, database_url, http, token_for):
    """A slowloris client sends its headers a byte at a time, never finishing: it is cut
    after the header timeout, though it never fell idle; a normal request is served."""
    settings = gateway_settings(backends["urls"], header_timeout_s=1.0, idle_timeout_s=60.0)
    async with running_gateway(settings, database_url) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sending = asyncio.create_task(trickle(writer))
        try:
            took = await closed_by_server(reader, 10)
            assert took is not None and took < 3, took
            assert (await call(http, "GET", base + USER, token_for("staff")))[0] == 200
        finally:
            sending.cancel()
            writer.close()
