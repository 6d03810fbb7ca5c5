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


async def test_idle_sockets_past_the_descriptor_limit_leave_requests_served_and_are_closed(
        http, backends, database_url, token_for, tmp_path):
    """300 idle sockets against a gateway allowed 256 descriptors (it took every one before,
    and every request failed): normal requests are still served, each new connection taking
    an idle one's place, and every idle socket is closed within the idle timeout."""
    idle_s = 3
    async with gateway_process(http, backends, database_url, tmp_path, max_files=256,
                               GATEWAY_IDLE_TIMEOUT_S=str(idle_s)) as (_, base):
        port = int(base.rsplit(":", 1)[1])
        held = []
        try:
            for _ in range(300):
                held.append(await asyncio.open_connection("127.0.0.1", port))
            opened = time.monotonic()
            for _ in range(10):
                async with asyncio.timeout(10):
                    status, _, _ = await call(http, "GET", base + USER, token_for("staff"))
                assert status == 200
            waits = await asyncio.gather(*(closed_by_server(r, idle_s + 10) for r, _ in held))
            assert None not in waits, f"{waits.count(None)} idle sockets still open"
            assert time.monotonic() - opened < idle_s + 10
        finally:
            for _, writer in held:
                writer.close()


async def test_a_request_head_that_trickles_in_is_cut(backends, database_url, http, token_for):
    """A slowloris client sends its headers a byte at a time, never finishing: it is cut
    after the header timeout, though it never fell idle; a normal request is served."""
    settings = gateway_settings(backends["urls"], header_timeout_s=1.0, idle_timeout_s=60.0)
    async with running_gateway(settings, database_url) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def trickle():
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
            for _ in range(100):
                await asyncio.sleep(0.2)
                writer.write(b"X")
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
        sending = asyncio.create_task(trickle())
        try:
            took = await closed_by_server(reader, 10)
            assert took is not None and took < 3, took
            assert (await call(http, "GET", base + USER, token_for("staff")))[0] == 200
        finally:
            sending.cancel()
            writer.close()
