"""Audit benchmarks: ingest rate of the writer, and "who accessed user X in the last
90 days" on a large audit log.

    .venv/bin/python -m tests.bench.audit_bench [--rows 10000000] [--ingest 200000]
    .venv/bin/python -m tests.bench.audit_bench --batches 1,12,32,100

`--batches` measures instead what PostgreSQL's CPU for a durable batch is made of: batches
of each size through the real writer, one at a time, and the CPU of the server with all
its processes (user and system) per batch and per row, so that the fixed cost of a commit
and the cost of a row can be read off, and the rows per commit a per-row target needs.

Runs against a fresh embedded PostgreSQL under a temporary directory (or
GATEWAY_BENCH_DATABASE_URL, which it fills with rows: use a scratch database).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from gateway.audit.writer import AuditRow, AuditWriter
from gateway.db import create_pool, migrate, query
from gateway.embedded import EmbeddedPostgres

USERS = 100_000
EUOS = 1_000


async def ingest(dsn: str, rows: int) -> float:
    """Rows per second through the real writer (chain hashing, group commit, COPY)."""
    pool = await create_pool(dsn, 2, 4)
    # throughput, not deadlines: a wave of 20,000 rows may take seconds on a loaded machine
    writer = AuditWriter(pool, queue_max=rows + 1, commit_timeout_s=60)
    writer.start()
    now = datetime.now(UTC)
    template = dict(method="GET", path="/telephony/euos/euo-1/users/u-1", service="telephony",
                    route="telephony:/euos/{euo}/users/{user}", actor_sub="bench",
                    actor_role="partner", actor_partner="p-1", subject_euo="euo-1",
                    data_sets=["user_name", "user_email"], fields_removed=["personal_directory"],
                    decision="allow", status=200, bytes=512, duration_ms=1.5,
                    client_addr="127.0.0.1")
    started = time.perf_counter()
    waiting = []
    for i in range(rows):
        waiting.append(writer.record(AuditRow(at=now, request_id=f"bench-{i}",
                                              subject_users=[f"u-{i % USERS}"], **template)))
        if len(waiting) >= 20_000:            # clients arrive in waves, as they would
            await asyncio.gather(*waiting)
            waiting = []
    await asyncio.gather(*waiting)
    elapsed = time.perf_counter() - started
    await writer.close()
    await pool.close()
    return rows / elapsed


LOAD = """
insert into audit_log
select now() - (g % 180) * interval '1 day' - (g % 86400) * interval '1 second',
       '00000000-0000-0000-0000-000000000001'::uuid, g, 'load-' || g,
       'actor-' || (g % 5000), (array['provider_staff','partner','euo_admin','user'])[1 + g % 4],
       'p-' || (g % 50), 'euo-' || (g % $2), 'GET', '/telephony/euos/x/users/y', 'telephony',
       'telephony:/euos/{euo}/users/{user}', array['user_name','user_email'], '{}',
       'euo-' || ((g * 7919) % $3 % $2), array['u-' || ((g * 7919) % $3)], 'allow', null, 200,
       400, 1.0,
       '127.0.0.1', '\\x00'::bytea, '\\x00'::bytea
  from generate_series($1::bigint, $4::bigint) as g
"""


async def query_latency(dsn: str, rows: int, samples: int) -> dict[str, float]:
    """Fill the log with `rows` rows over 180 days, then time the access-log query."""
    conn = await asyncpg.connect(dsn)
    try:
        have = await conn.fetchval("select count(*) from audit_log where request_id like 'load-%'")
        if have < rows:
            for m in range(-7, 1):
                await conn.execute(query("ensure_audit_partition"),
                                   (datetime.now(UTC) + timedelta(days=31 * m)).date())
            started = time.perf_counter()
            step = 1_000_000
            for lo in range(have + 1, rows + 1, step):
                await conn.execute(LOAD, lo, EUOS, USERS, min(lo + step - 1, rows))
                print(f"  loaded {min(lo + step - 1, rows):,} rows", flush=True)
            await conn.execute("analyze audit_log")
            print(f"  load took {time.perf_counter() - started:.0f} s")
        since = datetime.now(UTC) - timedelta(days=90)
        sql = query("access_log")
        times, counts = [], []
        for _ in range(samples):
            u = random.randrange(USERS)
            t = time.perf_counter()
            async with conn.transaction():
                await conn.execute("set local plan_cache_mode = force_custom_plan")
                found = await conn.fetch(sql, f"u-{u}", f"euo-{u % EUOS}", since, None, None,
                                         None, None, 1000)
            times.append((time.perf_counter() - t) * 1000)
            counts.append(len(found))
        times.sort()
        return {"p50_ms": statistics.median(times), "p95_ms": times[int(len(times) * 0.95) - 1],
                "max_ms": times[-1], "rows_per_answer": statistics.mean(counts)}
    finally:
        await conn.close()


async def batches(dsn: str, postmaster: int, sizes: list[int], rows: int = 24_000) -> None:
    """PostgreSQL's CPU (every process of the server) per batch and per row, by batch size."""
    from tests.bench.proxy_bench import cpu_split
    pool = await create_pool(dsn, 1, 2)
    writer = AuditWriter(pool, queue_max=max(sizes) + 1, commit_timeout_s=60)
    writer.start()
    now, n = datetime.now(UTC), 0
    template = dict(method="GET", path="/telephony/euos/euo-1/users/u-1", service="telephony",
                    route="telephony:/euos/{euo}/users/{user}", actor_sub="bench",
                    actor_role="partner", actor_partner="p-1", subject_euo="euo-1",
                    data_sets=["user_name", "user_email"], fields_removed=["personal_directory"],
                    decision="allow", status=200, bytes=512, duration_ms=1.5,
                    client_addr="127.0.0.1", trace_id="0af7651916cd43dd8448eb211c80319c",
                    policy_version="bench")

    async def wave(size: int) -> None:
        nonlocal n
        rows_ = []
        for _ in range(size):          # queued before the lane wakes: one batch
            n += 1
            rows_.append(writer.record(AuditRow(at=now, request_id=f"batch-{n}",
                                                subject_users=[f"u-{n % USERS}"], **template)))
        await asyncio.gather(*rows_)
    print("batch  PostgreSQL µs/batch (user + system)  µs/row  wall µs/batch")
    try:
        for size in sizes:
            waves = max(rows // size, 200)
            for _ in range(20):
                await wave(size)                                              # warm
            before, started = cpu_split(postmaster), time.perf_counter()
            for _ in range(waves):
                await wave(size)
            after, wall = cpu_split(postmaster), time.perf_counter() - started
            user, system = ((b - a) / waves * 1e6 for a, b in zip(before, after, strict=True))
            print(f"{size:5d}  {user + system:9.0f} ({user:5.0f} + {system:4.0f})"
                  f"{' ' * 14}{(user + system) / size:6.1f}  {wall / waves * 1e6:9.0f}")
    finally:
        await writer.close()
        await pool.close()


async def main_async(args) -> None:
    dsn = os.environ.get("GATEWAY_BENCH_DATABASE_URL")
    server = None
    if not dsn:
        server = EmbeddedPostgres(tempfile.mkdtemp(prefix="gateway-bench-"))
        dsn = server.start()
    try:
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.close()
        if args.batches:
            if server is None:
                raise SystemExit("--batches measures the embedded server's processes: "
                                 "unset GATEWAY_BENCH_DATABASE_URL")
            postmaster = int((server.pgdata / "postmaster.pid").read_text().split()[0])
            await batches(dsn, postmaster, [int(s) for s in args.batches.split(",")])
            return
        rate = await ingest(dsn, args.ingest)
        print(f"ingest: {rate:,.0f} audit rows/s ({args.ingest:,} rows through the writer)")
        if args.rows:
            lat = await query_latency(dsn, args.rows, args.samples)
            print(f"who accessed user X in the last 90 days, {args.rows:,} rows: "
                  f"p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms, max {lat['max_ms']:.1f} ms "
                  f"({lat['rows_per_answer']:.0f} rows per answer)")
    finally:
        if server:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--ingest", type=int, default=200_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batches", metavar="SIZES",
                        help="PostgreSQL CPU per durable batch of each size (say 1,12,32,100)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
