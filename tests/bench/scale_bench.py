"""Several gateway processes on one PostgreSQL at rising load: what one commit carries.

    .venv/bin/python -m tests.bench.scale_bench [--workers 4] [--duration 8]
                                                [--connections 8,32,128] [--rounds 2]
                                                [--linger-ms 0,1]

`gateway serve --workers N` (N processes on one socket, each with its own audit chain)
against the demo backends and an embedded PostgreSQL, loaded by wrk (Debian package
`wrk`) with a user reading her own record, at each connection count. For each setting of
GATEWAY_AUDIT_LINGER_MS (the gateway restarted between them; rounds alternate them so the
machine's drift hits both alike) it prints, per window:

    req/s, p50, p99     as wrk measured them
    rows/commit         audit rows committed / transaction ids assigned (each batch is one
                        writing transaction; a few mirror heartbeats count as commits too)
    xids/req            transaction ids assigned per request (anti-wraparound vacuum work)
    PG µs/row           PostgreSQL's CPU (the postmaster and all its backends) per audit row
    connections         client connections PostgreSQL holds for the gateway
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile

import asyncpg

from gateway.db import migrate
from gateway.demo.run import seed_contracts
from gateway.embedded import EmbeddedPostgres
from tests.bench.proxy_bench import (
    USER,
    audit_counters,
    bench_data,
    cpu_seconds,
    free_port,
    wait_up,
    wrk_result,
    wrk_start,
)
from tests.conftest import AUDIENCE, ISSUER, SECRET, make_token


async def _connections(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "select count(*) from pg_stat_activity where backend_type = 'client backend' "
        "and pid <> pg_backend_pid()"))


async def _window(conn, postmaster: int, url: str, token: str, duration: int,
                  connections: int) -> dict[str, float]:
    wrk_result(wrk_start(url, token, 1, connections))          # warm
    rows0, xids0 = await audit_counters(conn)
    cpu0 = cpu_seconds(postmaster)
    run = wrk_result(wrk_start(url, token, duration, connections))
    rows1, xids1 = await audit_counters(conn)
    cpu1 = cpu_seconds(postmaster)
    rows, xids = rows1 - rows0, max(1, xids1 - xids0)
    return {**run, "rows_per_commit": rows / xids, "xids_per_req": xids / max(1, run["requests"]),
            "pg_us_per_row": (cpu1 - cpu0) / max(1, rows) * 1e6,
            "connections": await _connections(conn)}


@contextlib.asynccontextmanager
async def bench_stack():
    """An embedded PostgreSQL, migrated and seeded, and the demo backends as processes:
    (DSN, the postmaster's pid, the telephony and the meeting backend's ports)."""
    server = EmbeddedPostgres(tempfile.mkdtemp(prefix="gateway-bench-db-"))
    dsn = server.start()
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.close()
    await seed_contracts(dsn, bench_data())
    postmaster = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    me = [sys.executable, "-m", "tests.bench.proxy_bench"]
    tel, meet = free_port(), free_port()
    backends = [subprocess.Popen(me + ["--backend", str(tel)]),
                subprocess.Popen(me + ["--backend", str(meet)],
                                 env=dict(os.environ, BENCH_SERVICE="meeting"))]
    try:
        await wait_up(f"http://127.0.0.1:{tel}/euos/euo-acme")
        yield dsn, postmaster, tel, meet
    finally:
        for p in backends:
            p.terminate()
            p.wait()
        server.stop()


@contextlib.asynccontextmanager
async def serving(dsn: str, tel: int, meet: int, workers: int = 1, **settings: str):
    """`gateway serve` (with `settings` as GATEWAY_* variables) until the block ends: its
    process and its base URL."""
    gw = free_port()
    env = dict(os.environ, GATEWAY_DATABASE_URL=dsn, GATEWAY_LISTEN=f"127.0.0.1:{gw}",
               GATEWAY_UPSTREAM_TELEPHONY=f"http://127.0.0.1:{tel}",
               GATEWAY_UPSTREAM_MEETING=f"http://127.0.0.1:{meet}",
               GATEWAY_JWT_SECRET=SECRET, GATEWAY_JWT_ISSUER=ISSUER, GATEWAY_JWT_AUDIENCE=AUDIENCE,
               GATEWAY_DATA_DIR=tempfile.mkdtemp(prefix="gateway-bench-gw-"),
               **{f"GATEWAY_{k.upper()}": v for k, v in settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--workers", str(workers)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_up(f"http://127.0.0.1:{gw}/healthz")
        yield proc, f"http://127.0.0.1:{gw}"
    finally:
        proc.terminate()
        proc.wait()


async def main_async(args) -> None:
    token = make_token(ttl=3600, role="user", sub="u-alice", euo="euo-acme")
    results: dict[tuple[str, int], list[dict]] = {}
    async with bench_stack() as (dsn, postmaster, tel, meet):
        conn = await asyncpg.connect(dsn)
        try:
            for _ in range(args.rounds):
                for linger in args.linger_ms:
                    async with serving(dsn, tel, meet, args.workers,
                                       audit_linger_ms=linger) as (_, base):
                        for c in args.connections:
                            results.setdefault((linger, c), []).append(await _window(
                                conn, postmaster, base + USER, token, args.duration, c))
        finally:
            await conn.close()
    print(f"{args.workers} gateway processes, one PostgreSQL; median of {args.rounds} "
          f"windows of {args.duration} s")
    print(f"{'linger ms':>9} {'conns':>5} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'rows/commit':>11} {'xids/req':>8} {'PG µs/row':>9} {'PG conns':>8}")
    for (linger, c), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        def med(key, runs=runs):
            values = sorted(r[key] for r in runs)
            return values[len(values) // 2]
        print(f"{linger:>9} {c:>5} {med('rps'):>7.0f} {med('p50'):>7.2f} {med('p99'):>7.2f} "
              f"{med('rows_per_commit'):>11.1f} {med('xids_per_req'):>8.2f} "
              f"{med('pg_us_per_row'):>9.0f} {med('connections'):>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=lambda v: [int(x) for x in v.split(",")],
                        default=[8, 32, 128])
    parser.add_argument("--linger-ms", type=lambda v: v.split(","), default=["0", "1"])
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
