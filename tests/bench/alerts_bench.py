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
import shutil
import tempfile
from pathlib import Path

from tests.bench.proxy_bench import USER, cpu_seconds, wrk_result, wrk_start
from tests.bench.scale_bench import bench_stack, serving
from tests.conftest import POLICY_DIR, make_token


def _policies(rules: bool) -> Path:
    where = Path(tempfile.mkdtemp(prefix="gateway-alerts-bench-")) / "policies"
    shutil.copytree(POLICY_DIR, where)
    if not rules:
        (where / "alerts.yaml").write_text("rules: []   # the benchmark's baseline\n")
    return where


async def main_async(args) -> None:
    token = make_token(ttl=3600, role="provider_staff", sub="staff-bench")
    dirs = {"shipped rules": _policies(True), "rules: []": _policies(False)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in dirs}
    async with bench_stack() as (dsn, postmaster, tel, meet):
        for _ in range(args.rounds):
            for name, policy in dirs.items():
                async with serving(dsn, tel, meet, policy_dir=str(policy)) as (proc, base):
                    url = base + USER
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--settle", type=float, default=10.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
