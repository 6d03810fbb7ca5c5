"""What the alert evaluator costs beside the proxy.

    .venv/bin/python -m tests.bench.alerts_bench [--duration 6] [--rounds 3] [--connections 32]
                                                 [--actors 200]

The load: `--actors` accounts (provider staff, a partner's portal accounts, an EUO's
admins) each reading the records of users they may see, one random pair a request, through
one `gateway serve` process with the shipped alerts.yaml and with `rules: []` (the
evaluator then reads nothing: its watermark skips past every settled row), alternating.

Two figures:
- live, A/B: CPU per request of the gateway process (evaluator included) and PostgreSQL
  (the evaluator's queries included) with each setting, over a window whose rows the
  evaluator has read before the CPU is read, after a warm-up it has read too (its start,
  when it measures each rule and key once, is the "cold" figure below). On two shared
  cores the windows differ by ±10 % from one another, more than the cost sought: a sanity
  check, not the measure.
- the evaluator alone: after each `rules: []` window, the shipped rules' evaluator
  (alerts.py, the passes a gateway runs, BATCH_ROWS rows at a time as under this load) reads
  that window's audit rows in this process, on one connection: this process's CPU plus
  that connection's PostgreSQL backend's CPU, per request of the window, in % of the
  proxy's CPU per request (gateway + PostgreSQL) in the same window. The window is read in
  two halves: "cold", a new evaluator that measures each rule and key it meets once (what
  a gateway pays once after it starts), then "warm", the same evaluator going on (what a
  running gateway pays).

The evaluator raises what the rules say about this load: on a weekend or at night every
account passes the off-hours rule's limit, which is the costliest case (each pass then asks
about keys already alerted).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

import asyncpg

from gateway.alerts import AlertEvaluator
from gateway.policy.policyset import load_policy_set
from tests.bench.proxy_bench import bench_data, cpu_seconds, wrk_result, wrk_start
from tests.bench.scale_bench import bench_stack, serving
from tests.conftest import POLICY_DIR, make_token


def _policies(rules: bool) -> Path:
    where = Path(tempfile.mkdtemp(prefix="gateway-alerts-bench-")) / "policies"
    shutil.copytree(POLICY_DIR, where)
    if not rules:
        (where / "alerts.yaml").write_text("rules: []   # the benchmark's baseline\n")
    return where


def _load_script(actors: int) -> str:
    """A wrk script: each request one of `actors` accounts reading a user it may see."""
    users = bench_data().users
    northwind = [u for u, v in users.items() if v["euo_id"] in ("euo-acme", "euo-globex")]
    acme = [u for u, v in users.items() if v["euo_id"] == "euo-acme"]
    pairs = []
    for n in range(actors):
        kind = n % 4
        if kind < 2:
            token, mine = make_token("provider_staff", f"staff-{n}", ttl=3600), list(users)
        elif kind == 2:
            token = make_token("partner", f"portal-{n}@northwind", partner="p-northwind",
                               ttl=3600)
            mine = northwind
        else:
            token = make_token("euo_admin", f"admin-{n}@acme", euo="euo-acme", ttl=3600)
            mine = acme
        for user in random.Random(n).sample(mine, min(3, len(mine))):
            path = f"/telephony/euos/{users[user]['euo_id']}/users/{user}"
            pairs.append(f'{{"{path}", "{token}"}}')
    script = Path(tempfile.mkdtemp(prefix="gateway-alerts-bench-")) / "load.lua"
    script.write_text("local pairs = {\n  " + ",\n  ".join(pairs) + "\n}\n" + """
request = function()
  local p = pairs[math.random(#pairs)]
  return wrk.format("GET", p[1], {["Authorization"] = "Bearer " .. p[2]})
end
""")
    return str(script)


async def evaluator_alone(dsn: str, since: datetime, until: datetime,
                          policy: Path) -> dict[str, dict[str, float]]:
    """The shipped rules' evaluator over the audit rows in (since, until], in two halves:
    "cold" (the first half: it starts knowing nothing, so it measures each rule and key
    once) and "warm" (the second: what it does for a running gateway). Per half: rows read,
    this process's CPU seconds, its PostgreSQL backend's CPU seconds, alerts raised."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        backend = await pool.fetchval("select pg_backend_pid()")
        await pool.execute("update alert_watermark set at = $1, seq = -1, evaluator = null, "
                           "chain_id = '00000000-0000-0000-0000-000000000000'", since)
        evaluator = AlertEvaluator(pool, load_policy_set(policy).alert_rules, "bench")
        halves = {}
        for half, end in (("cold", since + (until - since) / 2), ("warm", until)):
            now = await pool.fetchval("select now()")
            evaluator.settle_s = (now - end).total_seconds()      # reads rows up to `end`
            alerts0 = await pool.fetchval("select count(*) from alerts")
            rows, py0, pg0 = 0, time.process_time(), cpu_seconds(backend)
            while n := await evaluator.evaluate():
                rows += n
            halves[half] = {"rows": rows, "py": time.process_time() - py0,
                            "pg": cpu_seconds(backend) - pg0,
                            "raised": await pool.fetchval("select count(*) from alerts")
                            - alerts0}
        return halves
    finally:
        await pool.close()


async def _evaluated(db: asyncpg.Connection, until: datetime) -> None:
    """Until the evaluator's watermark has passed the rows written by `until` (rows settle ~10 s after their
    request with the benchmark's 3 s backend deadline)."""
    deadline = time.monotonic() + 60
    last = await db.fetchval("select max(at) from audit_log where at <= $1", until)
    while not await db.fetchval("select at >= $1 from alert_watermark", last):
        if time.monotonic() > deadline:
            raise SystemExit("the evaluator did not read the window's rows within 60 s")
        await asyncio.sleep(0.2)


def _median(values):
    return sorted(values)[len(values) // 2]


async def main_async(args) -> None:
    script = _load_script(args.actors)
    dirs = {"shipped rules": _policies(True), "rules: []": _policies(False)}
    live: dict[str, list[dict[str, float]]] = {name: [] for name in dirs}
    alone: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    async with bench_stack() as (dsn, postmaster, tel, meet):
        db = await asyncpg.connect(dsn)
        for _ in range(args.rounds):
            for name, policy in dirs.items():
                # a short backend deadline: a row is evaluated once settled, ~10 s after
                async with serving(dsn, tel, meet, policy_dir=str(policy),
                                   backend_deadline_s="3") as (proc, base):
                    # a warm-up the evaluator reads first: its start (each rule and key
                    # measured once) is not in the window (the "cold" figure below is)
                    await db.execute("update alert_watermark set at = greatest(at, now())")
                    wrk_result(wrk_start(base, None, args.warm, args.connections, script))
                    await _evaluated(db, await db.fetchval("select now()"))
                    since = await db.fetchval("select now()")
                    gw0, pg0 = cpu_seconds(proc.pid), cpu_seconds(postmaster)
                    run = wrk_result(wrk_start(base, None, args.duration, args.connections,
                                               script))
                    until = await db.fetchval("select now()")
                    await _evaluated(db, until)     # this window's rows read
                    n = max(1, run["requests"])
                    live[name].append({"rps": run["rps"], "non2xx": run["non2xx"],
                                       "gw": (cpu_seconds(proc.pid) - gw0) / n * 1e6,
                                       "pg": (cpu_seconds(postmaster) - pg0) / n * 1e6})
                if name == "rules: []":
                    proxy = live[name][-1]["gw"] + live[name][-1]["pg"]
                    halves = await evaluator_alone(dsn, since, until, dirs["shipped rules"])
                    for half, e in halves.items():
                        per = max(1, e["rows"])     # a request writes one row here
                        alone[half].append({
                            "rows": e["rows"], "raised": e["raised"],
                            "py": e["py"] / per * 1e6, "pg": e["pg"] / per * 1e6,
                            "proxy": proxy, "cost": 100 * (e["py"] + e["pg"]) / per * 1e6 / proxy})
        await db.close()
    print(f"one gateway process, {args.connections} connections, {args.actors} accounts, "
          f"{args.rounds} windows of {args.duration} s each after {args.warm} s of warm-up "
          f"the evaluator has read; medians")
    print("live, A/B: CPU per request, the window's rows evaluated (the windows' own spread "
          "is ±10 %)")
    print(f"{'alerts.yaml':<14} {'req/s':>7} {'non-2xx':>7} {'gateway µs':>10} {'PG µs':>6} "
          f"{'sum':>5}")
    med = {}
    for name, runs in live.items():
        m = {k: _median([r[k] for r in runs]) for k in ("rps", "non2xx", "gw", "pg")}
        med[name] = m
        print(f"{name:<14} {m['rps']:>7.0f} {m['non2xx']:>7.0f} {m['gw']:>10.0f} "
              f"{m['pg']:>6.0f} {m['gw'] + m['pg']:>5.0f}")
    base = med["rules: []"]["gw"] + med["rules: []"]["pg"]
    diff = med["shipped rules"]["gw"] + med["shipped rules"]["pg"] - base
    print(f"difference: {diff:+.1f} µs a request, {100 * diff / base:+.1f} %")
    print("the evaluator alone, over each `rules: []` window's rows, per row (a request)")
    print(f"{'half':<5} {'rows':>7} {'alerts':>6} {'Python µs':>9} {'PG µs':>6} "
          f"{'proxy µs':>8} {'cost':>6}")
    for half, runs in alone.items():
        for e in runs:
            print(f"{half:<5} {e['rows']:>7.0f} {e['raised']:>6.0f} {e['py']:>9.2f} "
                  f"{e['pg']:>6.2f} {e['proxy']:>8.0f} {e['cost']:>5.2f}%")
    for half, runs in alone.items():
        print(f"{half}: the shipped rules' evaluator costs "
              f"{_median([e['cost'] for e in runs]):.2f} % of the proxy's CPU "
              f"(median of {len(runs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--actors", type=int, default=200)
    parser.add_argument("--warm", type=int, default=4)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
