"""What the alert evaluator costs beside the proxy: the same load through one gateway with
the shipped alerts.yaml and with `rules: []`, alternating.

    .venv/bin/python -m tests.bench.alerts_bench [--duration 6] [--rounds 3] [--connections 32]

The evaluator runs in the elected process, off the request path, reading the new audit
rows every second and measuring the rules they touch. Per request, for each setting: the
gateway process's CPU (evaluator included), PostgreSQL's CPU (the evaluator's queries
included) and their sum; the last line is the shipped rules' cost in % of the sum without
rules. With `rules: []` the evaluator still reads each new row once (its watermark moves):
that part is in both settings, and measured apart by alerts.py's ~37 µs a row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncpg

from gateway.db import migrate
from gateway.demo.run import seed_contracts
from gateway.embedded import EmbeddedPostgres
from tests.bench.proxy_bench import (
    USER,
    bench_data,
    cpu_seconds,
    free_port,
    wait_up,
    wrk_result,
    wrk_start,
)
from tests.conftest import AUDIENCE, ISSUER, POLICY_DIR, SECRET, make_token


def _policies(rules: bool) -> Path:
    where = Path(tempfile.mkdtemp(prefix="gateway-alerts-bench-")) / "policies"
    shutil.copytree(POLICY_DIR, where)
    if not rules:
        (where / "alerts.yaml").write_text("rules: []   # the benchmark's baseline\n")
    return where


async def main_async(args) -> None:
    server = EmbeddedPostgres(tempfile.mkdtemp(prefix="gateway-alerts-bench-db-"))
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
    token = make_token(ttl=3600, role="provider_staff", sub="staff-bench")
    dirs = {"shipped rules": _policies(True), "rules: []": _policies(False)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in dirs}
    try:
        await wait_up(f"http://127.0.0.1:{tel}/euos/euo-acme")
        for _ in range(args.rounds):
            for name, policy in dirs.items():
                gw = free_port()
                env = dict(os.environ, GATEWAY_DATABASE_URL=dsn, GATEWAY_LISTEN=f"127.0.0.1:{gw}",
                           GATEWAY_UPSTREAM_TELEPHONY=f"http://127.0.0.1:{tel}",
                           GATEWAY_UPSTREAM_MEETING=f"http://127.0.0.1:{meet}",
                           GATEWAY_JWT_SECRET=SECRET, GATEWAY_JWT_ISSUER=ISSUER,
                           GATEWAY_JWT_AUDIENCE=AUDIENCE, GATEWAY_POLICY_DIR=str(policy),
                           GATEWAY_DATA_DIR=tempfile.mkdtemp(prefix="gateway-alerts-gw-"))
                proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    await wait_up(f"http://127.0.0.1:{gw}/healthz")
                    url = f"http://127.0.0.1:{gw}{USER}"
                    wrk_result(wrk_start(url, token, 1, args.connections))      # warm
                    gw0, pg0 = cpu_seconds(proc.pid), cpu_seconds(postmaster)
                    run = wrk_result(wrk_start(url, token, args.duration, args.connections))
                    # the evaluator reads rows settled ~8 s after their request: let it
                    # catch up with this window before the CPU is read
                    await asyncio.sleep(args.settle)
                    n = max(1, run["requests"])
                    results[name].append({"rps": run["rps"],
                                          "gw": (cpu_seconds(proc.pid) - gw0) / n * 1e6,
                                          "pg": (cpu_seconds(postmaster) - pg0) / n * 1e6})
                finally:
                    proc.terminate()
                    proc.wait()
        print(f"one gateway process, {args.connections} connections, {args.rounds} windows of "
              f"{args.duration} s each (+{args.settle:g} s for the evaluator to catch up); median")
        print(f"{'alerts.yaml':<14} {'req/s':>7} {'gateway µs/req':>14} {'PG µs/req':>9} {'sum':>6}")
        med = {}
        for name, runs in results.items():
            m = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in ("rps", "gw", "pg")}
            med[name] = m
            print(f"{name:<14} {m['rps']:>7.0f} {m['gw']:>14.0f} {m['pg']:>9.0f} "
                  f"{m['gw'] + m['pg']:>6.0f}")
        base = med["rules: []"]["gw"] + med["rules: []"]["pg"]
        cost = med["shipped rules"]["gw"] + med["shipped rules"]["pg"] - base
        print(f"the shipped rules cost {cost:.1f} µs a request: {100 * cost / base:+.1f} %")
    finally:
        for p in backends:
            p.terminate()
            p.wait()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--settle", type=float, default=10.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
