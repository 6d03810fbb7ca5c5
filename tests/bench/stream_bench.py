"""Streamed list benchmark: a partner reads one answer of N MB of CDRs through `gateway
serve`, which parses and redacts it element by element (gateway/stream.py).

    .venv/bin/python -m tests.bench.stream_bench [--mb 100 1000]

A backend process generates the CDR list as it sends it (it holds none of it), the client
reads the answer as it comes, and the gateway runs as its own process: the figures are the
throughput (MB/s of the backend's answer) and the gateway's peak RSS over its RSS before the
answer (VmHWM - VmRSS from /proc), which must not grow with the answer's size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from gateway.db import migrate
from gateway.demo import data as demo_data
from gateway.demo.run import seed_contracts
from gateway.embedded import EmbeddedPostgres
from tests.bench.proxy_bench import free_port, wait_up
from tests.conftest import AUDIENCE, ISSUER, SECRET, make_token

NOW = datetime.now(UTC).replace(microsecond=0).isoformat()


def serve_cdrs(port: int) -> None:
    """A telephony backend whose /euos/{euo}/cdrs answers BENCH_MB megabytes of CDRs."""
    wanted = int(float(os.environ["BENCH_MB"]) * (1 << 20))

    async def cdrs(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"cdrs":[')
        sent, i = 0, 0
        while sent < wanted:
            batch = b",".join(orjson.dumps(
                {"id": f"c-{n}", "user_id": ("u-alice", "u-bob", "u-carla")[n % 3],
                 "caller": f"+3210{n:07d}", "callee": "+3220000000", "start": NOW,
                 "duration_s": n % 600, "direction": "out"}) for n in range(i, i + 1000))
            await response.write((b"," if i else b"") + batch)
            sent += len(batch) + 1
            i += 1000
        await response.write(b"]}")
        await response.write_eof()
        return response
    app = web.Application()
    app.router.add_get("/euos/{euo}/cdrs", cdrs)
    app.router.add_get("/euos/{euo}", lambda r: web.json_response({"id": "euo-acme"}))
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def reset_peak(pid: int) -> None:
    """Let VmHWM start again from the current RSS (Linux: write 5 to clear_refs)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


async def one(mb: float) -> None:
    data_dir = tempfile.mkdtemp(prefix="gateway-stream-bench-")
    server = EmbeddedPostgres(data_dir)
    dsn = server.start()
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.close()
    await seed_contracts(dsn, demo_data.build())
    tel, meet, gw = free_port(), free_port(), free_port()
    me = [sys.executable, "-m", "tests.bench.stream_bench"]
    procs = [subprocess.Popen(me + ["--backend", str(tel)], env=dict(os.environ, BENCH_MB=str(mb))),
             subprocess.Popen(me + ["--backend", str(meet)], env=dict(os.environ, BENCH_MB="0"))]
    env = dict(os.environ, GATEWAY_DATABASE_URL=dsn, GATEWAY_LISTEN=f"127.0.0.1:{gw}",
               GATEWAY_UPSTREAM_TELEPHONY=f"http://127.0.0.1:{tel}",
               GATEWAY_UPSTREAM_MEETING=f"http://127.0.0.1:{meet}", GATEWAY_JWT_SECRET=SECRET,
               GATEWAY_JWT_ISSUER=ISSUER, GATEWAY_JWT_AUDIENCE=AUDIENCE)
    log = open(os.path.join(data_dir, "gateway.log"), "wb")     # noqa: SIM115 (closed below)
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=log)
    procs.append(gateway)
    try:
        await wait_up(f"http://127.0.0.1:{gw}/healthz")
        token = make_token("partner", "pat@northwind", partner="p-northwind", ttl=3600)
        url = f"http://127.0.0.1:{gw}/telephony/euos/euo-acme/cdrs"
        async with aiohttp.ClientSession() as http:
            async with http.get(url.replace("/cdrs", ""),
                                headers={"Authorization": f"Bearer {token}"}) as r:
                await r.read()                # warm: imports, pools, caches
            reset_peak(gateway.pid)
            before, _ = memory_kib(gateway.pid)
            started, size = time.perf_counter(), 0
            async with http.get(url, headers={"Authorization": f"Bearer {token}"},
                                timeout=aiohttp.ClientTimeout(total=None)) as r:
                assert r.status == 200, await r.read()
                async for chunk in r.content.iter_chunked(1 << 20):
                    size += len(chunk)
            took = time.perf_counter() - started
            _, peak = memory_kib(gateway.pid)
            if size < mb * 0.8e6:
                sys.exit(f"the answer was cut at {size:,} bytes; see {data_dir}/gateway.log")
        print(f"{mb:>7.0f} MB answer: {mb / took:6.1f} MB/s, {size / took / 1e6:6.1f} MB/s sent, "
              f"gateway RSS {before / 1024:.0f} MiB before, peak +{(peak - before) / 1024:.1f} MiB")
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        log.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, nargs="+", default=[100, 1000])
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        serve_cdrs(args.backend)
        return
    for mb in args.mb:
        asyncio.run(one(mb))


if __name__ == "__main__":
    main()
