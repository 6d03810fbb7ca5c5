"""Proxy benchmark: the gateway against a bare aiohttp + uvloop pass-through proxy, in one
run, alternating, with wrk (Debian package `wrk`).

    .venv/bin/python -m tests.bench.proxy_bench [--duration 10] [--connections 32]
                                                [--euos 100000] [--workers 1]

It starts the demo telephony backend, a bare proxy and `gateway serve` (full enforcement,
durable audit) as separate processes, then measures four scenarios and prints req/s,
p50, p99, the ratios to the bare proxy, and the proxy process's CPU time per request
(steadier than req/s on a small machine where wrk, the backend and PostgreSQL share the
cores; PostgreSQL's own CPU for the audit rows is not in the gateway's figure):

    fields removed   provider staff reading a user record (personal directory removed)
    nothing removed  a user reading their own record (bytes passed through)
    binary           a user downloading their voicemail (WAV streamed)
    denied           provider staff asking for a user's voicemails (403)

`--euos N` first fills the contracts table with N extra EUOs, to show per-request cost
does not grow with tenants.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import asyncpg
from aiohttp import web

from gateway.db import migrate
from gateway.demo import data as demo_data
from gateway.demo.backends import meeting_app, telephony_app
from gateway.demo.run import seed_contracts
from gateway.embedded import EmbeddedPostgres
from tests.conftest import AUDIENCE, ISSUER, SECRET, make_token

USER = "/telephony/euos/euo-acme/users/u-alice"
# the gateways seal their chains this often (the default is 60 s): each measured window then
# holds a share of the sealing (Merkle tree, nodes stored) in proportion to its rows, as a
# long run does, instead of none in most windows and a minute's worth in one
SEAL_EVERY_S = "2"
SCENARIOS = [
    ("fields removed", dict(role="provider_staff", sub="staff-bench"), USER),
    ("nothing removed", dict(role="user", sub="u-alice", euo="euo-acme"), USER),
    ("binary", dict(role="user", sub="u-alice", euo="euo-acme"), USER + "/voicemails/vm-u-alice-1"),
    ("denied", dict(role="provider_staff", sub="staff-bench"), USER + "/voicemails"),
]


def bench_data() -> demo_data.DemoData:
    """The demo data, with u-alice's record grown to about 2 KB as in the issue."""
    data = demo_data.build()
    data.users["u-alice"]["personal_directory"] = [
        {"name": f"Contact number {i}", "number": f"+32470{i:06d}"} for i in range(40)]
    return data


# --- the processes ---------------------------------------------------------------------

def serve_backend(port: int) -> None:
    import uvloop
    data = bench_data()
    app = telephony_app(data) if os.environ.get("BENCH_SERVICE") != "meeting" else meeting_app(data)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


def serve_bare_proxy(port: int, upstream: str) -> None:
    """What a minimal aiohttp + uvloop pass-through proxy costs: the baseline."""
    import uvloop
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def forward(request: web.Request) -> web.StreamResponse:
        path = request.raw_path[len("/telephony"):]
        async with request.app[session_key].get(upstream + path) as r:
            response = web.StreamResponse(status=r.status, headers={
                "Content-Type": r.headers.get("Content-Type", "application/octet-stream")})
            if r.content_length is not None:
                response.content_length = r.content_length
            try:
                await response.prepare(request)
                async for chunk in r.content.iter_chunked(64 * 1024):
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:      # wrk hangs up at the end of a run
                pass
            return response

    async def session_ctx(app):
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200))
        yield
        await app[session_key].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/telephony/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


_PORTS: list[int] = []      # --ports FIRST: take ports from there (a shared machine)


def free_port() -> int:
    if _PORTS:
        _PORTS[0] += 1
        return _PORTS[0] - 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url) as r:
                    await r.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never came up")


# --- measuring -------------------------------------------------------------------------

def wrk(url: str, token: str, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
         "-H", f"Authorization: Bearer {token}", url],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {p: _ms(re.search(rf"\s{p}%\s+([\d.]+\w+)", out).group(1)) for p in ("50", "99")}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"],
            "non2xx": int(errors.group(1)) if errors else 0}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its live children (workers) have used so far."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process tree so far: each live process's own time,
    plus what its children that have exited and been reaped used (cutime, cstime), so a
    short-lived child (PostgreSQL's autovacuum workers) is counted too."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    user = (int(fields[11]) + int(fields[13])) / tick
    system = (int(fields[12]) + int(fields[14])) / tick
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except FileNotFoundError:
        children = []
    for child in children:
        try:
            u, s = cpu_split(child)
        except (FileNotFoundError, ProcessLookupError):     # ended meanwhile
            continue
        user, system = user + u, system + s
    return user, system


def _ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


async def add_contracts(dsn: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "insert into contracts (euo_id, partner_id) "
            "select 'bench-euo-' || g, 'bench-partner-' || (g % 5000) "
            "from generate_series(1, $1) g on conflict do nothing", count)
    finally:
        await conn.close()


async def main_async(args) -> None:
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    data_dir = tempfile.mkdtemp(prefix="gateway-proxy-bench-")
    server = EmbeddedPostgres(data_dir)
    dsn = server.start()
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.close()
    await seed_contracts(dsn, bench_data())
    if args.euos:
        started = time.perf_counter()
        await add_contracts(dsn, args.euos)
        print(f"added {args.euos:,} contracts in {time.perf_counter() - started:.1f} s")
    procs = []
    me = [sys.executable, "-m", "tests.bench.proxy_bench"]
    try:
        tel, meet, bare, gw = free_port(), free_port(), free_port(), free_port()
        # paired: each proxy has a backend of its own, so each backend's CPU is attributed
        tel_bare = free_port() if args.paired else tel
        procs.append(subprocess.Popen(me + ["--backend", str(tel)]))
        procs.append(subprocess.Popen(me + ["--backend", str(meet)],
                                      env=dict(os.environ, BENCH_SERVICE="meeting")))
        if args.against:
            # the "bare" slot runs another checkout's gateway: a change against its parent,
            # loaded at the same moment, so the machine's other load hits both alike
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"], cwd=args.against,
                env=dict(os.environ, GATEWAY_DATABASE_URL=dsn, PYTHONPATH=args.against,
                         GATEWAY_LISTEN=f"127.0.0.1:{bare}",
                         GATEWAY_DATA_DIR=tempfile.mkdtemp(prefix="gateway-bench-against-"),
                         GATEWAY_UPSTREAM_TELEPHONY=f"http://127.0.0.1:{tel_bare}",
                         GATEWAY_UPSTREAM_MEETING=f"http://127.0.0.1:{meet}",
                         GATEWAY_JWT_SECRET=SECRET, GATEWAY_JWT_ISSUER=ISSUER,
                         GATEWAY_JWT_AUDIENCE=AUDIENCE, GATEWAY_AUDIT_CHECKPOINT_S=SEAL_EVERY_S),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        else:
            procs.append(subprocess.Popen(me + ["--bare", str(bare), f"http://127.0.0.1:{tel_bare}"]))
        env = dict(os.environ, GATEWAY_DATABASE_URL=dsn, GATEWAY_LISTEN=f"127.0.0.1:{gw}",
                   GATEWAY_UPSTREAM_TELEPHONY=f"http://127.0.0.1:{tel}",
                   GATEWAY_UPSTREAM_MEETING=f"http://127.0.0.1:{meet}",
                   GATEWAY_JWT_SECRET=SECRET, GATEWAY_JWT_ISSUER=ISSUER,
                   GATEWAY_JWT_AUDIENCE=AUDIENCE, GATEWAY_AUDIT_CHECKPOINT_S=SEAL_EVERY_S)
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "serve"]
                                      + (["--workers", str(args.workers)] if args.workers > 1 else []),
                                      # the access log is written (to /dev/null), not shown
                                      env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        if args.paired:
            procs.append(subprocess.Popen(me + ["--backend", str(tel_bare)]))
        for port in (tel, tel_bare, bare, gw):
            await wait_up(f"http://127.0.0.1:{port}/telephony/euos/euo-acme"
                          if port not in (gw, bare) or (port == bare and not args.against)
                          else f"http://127.0.0.1:{port}/healthz")
        postmaster = int((server.pgdata / "postmaster.pid").read_text().split()[0])
        if args.paired:
            pids = {"gateway": procs[3].pid, "bare": procs[2].pid, "postgres": postmaster,
                    "backend gw": procs[0].pid, "backend bare": procs[4].pid}
            await paired(args, dsn, pids, bare, gw)
            return
        print(f"{'scenario':<16} {'bare req/s':>10} {'gw req/s':>9} {'ratio':>6} "
              f"{'bare p50':>9} {'gw p50':>7} {'bare p99':>9} {'gw p99':>7} {'p99 ratio':>9} "
              f"{'CPU µs/req bare/gw':>19} {'+PostgreSQL':>11}")
        for name, claims, path in SCENARIOS:
            if args.only and name not in args.only:
                continue
            token = make_token(ttl=3600, **claims)
            results = {"bare": [], "gw": []}
            for _ in range(args.rounds):            # alternate, so drift hits both alike
                for kind, port, pid in (("bare", bare, procs[2].pid), ("gw", gw, procs[3].pid)):
                    wrk(f"http://127.0.0.1:{port}{path}", token, 1, args.connections)   # warm
                    before, pg_before = cpu_seconds(pid), cpu_seconds(postmaster)
                    run = wrk(f"http://127.0.0.1:{port}{path}", token, args.duration,
                              args.connections)
                    requests = run["rps"] * args.duration
                    run["cpu_us"] = (cpu_seconds(pid) - before) / requests * 1e6
                    run["pg_us"] = (cpu_seconds(postmaster) - pg_before) / requests * 1e6
                    results[kind].append(run)
            b = _best(results["bare"])
            g = _best(results["gw"])
            print(f"{name:<16} {b['rps']:>10,.0f} {g['rps']:>9,.0f} {g['rps'] / b['rps']:>6.2f} "
                  f"{b['p50']:>8.2f}ms {g['p50']:>5.2f}ms {b['p99']:>8.2f}ms {g['p99']:>5.2f}ms "
                  f"{g['p99'] / b['p99']:>9.2f} {b['cpu_us']:>10.0f} /{g['cpu_us']:>5.0f}"
                  f" {g['pg_us']:>11.0f}"
                  + (f"  ({g['non2xx']} non-2xx)" if name != "denied" and g["non2xx"] else ""))
        if args.soak:
            soak(gw, procs[3].pid, args.soak, args.connections, args.users, args.tokens)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        server.stop()


# --- paired: both proxies under load at the same moment --------------------------------

PAIRED_DEFAULT = ("fields removed", "nothing removed")


async def audit_counters(conn: asyncpg.Connection) -> tuple[int, int]:
    """(audit rows committed, transaction ids assigned) so far, read transactionally (the
    statistics views lag by up to 10 s). Every batch is one writing transaction, so the
    ids assigned over a window count the group commits (plus the odd mirror heartbeat,
    a few per window: they make rows per commit look slightly smaller, never larger)."""
    return (int(await conn.fetchval("select coalesce(sum(last_seq), 0) from audit_chain_heads")),
            int(await conn.fetchval("select pg_snapshot_xmax(pg_current_snapshot())::text")))


def wrk_start(url: str, token: str | None, duration: int, connections: int,
              script: str | None = None) -> subprocess.Popen:
    """wrk on `url` with one bearer token, or with a Lua `script` that makes each request."""
    how = ["-s", script] if script else ["-H", f"Authorization: Bearer {token}"]
    return subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", *how, url],
        stdout=subprocess.PIPE, text=True)


def wrk_result(proc: subprocess.Popen) -> dict[str, float]:
    out = proc.communicate()[0]
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    lat = {p: _ms(re.search(rf"\s{p}%\s+([\d.]+\w+)", out).group(1)) for p in ("50", "99")}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": requests, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": lat["50"], "p99": lat["99"], "non2xx": int(errors.group(1)) if errors else 0}


async def paired_round(args, conn: asyncpg.Connection, pids: dict[str, int], bare: int, gw: int,
                       path: str, token: str, bare_connections: int | None = None) -> dict:
    """One window: wrk on the bare proxy and wrk on the gateway at the same moment, each
    process's CPU from /proc over that same window (the bare proxy with
    `bare_connections` connections when given, else as many as the gateway)."""
    urls = (f"http://127.0.0.1:{bare}{path}", f"http://127.0.0.1:{gw}{path}")
    connections = (bare_connections or args.connections, args.connections)
    for p in [wrk_start(u, token, 1, c) for u, c in zip(urls, connections, strict=True)]:
        p.communicate()                                                      # warm both
    load = os.getloadavg()[0]
    counters = await audit_counters(conn)
    before = {name: cpu_split(pid) for name, pid in pids.items()}
    runs = [wrk_start(u, token, args.duration, c) for u, c in zip(urls, connections, strict=True)]
    results = [wrk_result(p) for p in runs]
    after = {name: cpu_split(pid) for name, pid in pids.items()}
    rows, batches = (b - a for a, b in zip(counters, await audit_counters(conn), strict=True))
    out = {"bare": results[0], "gateway": results[1], "rows": rows, "batches": batches,
           "load_before": load, "cpu": {}, "bare_connections": connections[0]}
    served = {"gateway": results[1]["requests"], "bare": results[0]["requests"],
              "backend gw": results[1]["requests"], "backend bare": results[0]["requests"],
              "postgres": results[1]["requests"]}
    for name in pids:
        user = after[name][0] - before[name][0]
        system = after[name][1] - before[name][1]
        n = max(served[name], 1)
        out["cpu"][name] = {"user": user / n * 1e6, "system": system / n * 1e6,
                            "total": (user + system) / n * 1e6}
    pg = after["postgres"][0] + after["postgres"][1] - sum(before["postgres"])
    out["pg_us_per_row"] = pg / rows * 1e6 if rows else float("nan")
    return out


async def paired(args, dsn: str, pids: dict[str, int], bare: int, gw: int) -> None:
    """Report CPU µs per request of every process, for the bare proxy and the gateway loaded
    together, round by round, and the ranges over the rounds."""
    import json
    names = args.only or PAIRED_DEFAULT
    report = {}
    # one connection for the counters: a new one per read would add a backend's start and
    # exit to PostgreSQL's CPU inside the window
    conn = await asyncpg.connect(dsn)
    print(f"paired, wrk -c{args.connections} on each proxy at once, {args.duration} s windows; "
          "CPU µs per request (user+system)")
    for name, claims, path in SCENARIOS:
        if name not in names:
            continue
        token = make_token(ttl=3600, **claims)
        rounds = []
        bare_connections = None
        for i in range(args.rounds):
            r = await paired_round(args, conn, pids, bare, gw, path, token, bare_connections)
            if args.match_rate:
                # CPU per request falls as the rate rises (more events per turn of each
                # loop): the bare proxy gets fewer connections until both serve about the
                # same rate in the same window, and only such windows are kept
                for _ in range(4):
                    ratio = r["gateway"]["rps"] / r["bare"]["rps"]
                    if abs(ratio - 1) <= 0.1:
                        break
                    bare_connections = max(1, min(args.connections, round(
                        r["bare_connections"] * ratio)))
                    r = await paired_round(args, conn, pids, bare, gw, path, token,
                                           bare_connections)
                if abs(r["gateway"]["rps"] / r["bare"]["rps"] - 1) > 0.1:
                    print(f"{name:<16} round {i + 1}: rates not matched (bare "
                          f"{r['bare']['rps']:,.0f} at -c{r['bare_connections']}, gateway "
                          f"{r['gateway']['rps']:,.0f} req/s): left out")
                    continue
            rounds.append(r)
            c = r["cpu"]
            print(f"{name:<16} round {i + 1} (load {r['load_before']:.1f}): "
                  f"gateway {c['gateway']['total']:5.0f} "
                  f"({c['gateway']['user']:.0f} usr + {c['gateway']['system']:.0f} sys)  "
                  f"bare {c['bare']['total']:5.0f} ({c['bare']['user']:.0f} + "
                  f"{c['bare']['system']:.0f})  ratio {c['gateway']['total'] / c['bare']['total']:.2f}  "
                  f"postgres {c['postgres']['total']:4.0f}/req {r['pg_us_per_row']:4.1f}/row  "
                  f"backend gw/bare {c['backend gw']['total']:.0f}/{c['backend bare']['total']:.0f}  "
                  f"rows/commit {r['rows'] / max(r['batches'], 1):.1f}  "
                  f"req/s bare {r['bare']['rps']:,.0f} gw {r['gateway']['rps']:,.0f}  "
                  + (f"(bare -c{r['bare_connections']})  " if args.match_rate else "") +
                  f"p50 {r['bare']['p50']:.1f}/{r['gateway']['p50']:.1f} ms  "
                  f"p99 {r['bare']['p99']:.1f}/{r['gateway']['p99']:.1f} ms"
                  + (f"  NON-2XX {r['gateway']['non2xx']}/{r['bare']['non2xx']}"
                     if r["gateway"]["non2xx"] or r["bare"]["non2xx"] else ""))
        report[name] = rounds
        if not rounds:
            continue
        if args.profile:
            await profile_round(args, conn, pids, bare, gw, name, path, token)

        def span(values, fmt="{:.0f}"):
            lo, hi = min(values), max(values)
            return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else \
                f"{fmt.format(lo)}–{fmt.format(hi)}"
        ratio = [r["cpu"]["gateway"]["total"] / r["cpu"]["bare"]["total"] for r in rounds]
        print(f"{name:<16} over {len(rounds)} rounds: ratio {span(ratio, '{:.2f}')}; gateway "
              f"{span([r['cpu']['gateway']['total'] for r in rounds])} µs, bare "
              f"{span([r['cpu']['bare']['total'] for r in rounds])} µs, PostgreSQL "
              f"{span([r['cpu']['postgres']['total'] for r in rounds])} µs/request = "
              f"{span([r['pg_us_per_row'] for r in rounds], '{:.1f}')} µs/row at "
              f"{span([r['rows'] / max(r['batches'], 1) for r in rounds], '{:.1f}')} rows/commit; "
              f"p99 ratio {span([r['gateway']['p99'] / r['bare']['p99'] for r in rounds], '{:.2f}')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": os.getloadavg(), "connections": args.connections,
                       "duration": args.duration, "scenarios": report}, f, indent=1)


# --- profile: where the gateway's CPU goes, slice by slice --------------------------------

# (slice, test on one frame "function (file:line)"); a sample goes to the slice of its
# leaf-most frame that any test claims (garbage collection anywhere in the stack first)
SLICES = [
    ("Prometheus", ("prometheus_client/", "gateway/metrics.py")),
    ("audit hashing + canonical encoding", ("gateway/audit/chain.py", "_hashlib", "sha256")),
    ("audit writer (queue, COPY, asyncpg client side)", ("gateway/audit/writer.py", "asyncpg/")),
    ("redaction walk + shape check", ("gateway/redact.py",)),
    ("JSON parse + encode (orjson)", ("orjson",)),
    ("route match (target.py)", ("gateway/target.py",)),
    ("authz (path relations, policy)", ("gateway/policy/authz.py", "casbin/", "gateway/contracts.py",
                                        "gateway/restrictions.py")),
    ("JWT (cache hit)", ("gateway/authn.py", "jwt/")),
    ("backend client (backend call)", ("gateway/backend_client.py", "httptools",
                                       "aiohttp/client", "aiohttp/connector.py",
                                       "Backends.send (gateway/backends.py",
                                       "Backends.read (gateway/backends.py")),
    ("headers (forward, answer)", ("gateway/proxy.py", "multidict")),
    ("Call / audit row building", ("gateway/call.py", "gateway/audit/__init__")),
    ("middleware + prepare hook", ("gateway/app.py",)),
    ("pipeline glue", ("gateway/pipeline.py",)),
    ("aiohttp server", ("aiohttp/web_", "aiohttp/http_", "aiohttp/_http", "aiohttp/base_protocol",
                        "aiohttp/streams", "aiohttp/helpers", "yarl/")),
]
GC = ("gc_collect", "collect_generations", "gcmodule", "gc_collect_main", "deduce_unreachable",
      "move_unreachable", "subtract_refs", "update_refs", "visit_decref", "visit_reachable")


def slice_of(stack: list[str]) -> str:
    """The slice a sample (frames root first) belongs to."""
    if any(g in frame for frame in stack for g in GC):
        return "garbage collection"
    for frame in reversed(stack):
        for name, tests in SLICES:
            if any(t in frame for t in tests):
                return name
    return "event loop, syscalls, other"


SYSCALLS = {"write", "writev", "read", "readv", "recv", "recvfrom", "send", "sendto", "sendmsg",
            "epoll_wait", "epoll_pwait", "getpid", "clock_gettime", "__libc_write", "__libc_read"}


def breakdown(raw_file: str, user_us: float, system_us: float) -> list[tuple[str, float, float]]:
    """[(slice, share of user-space samples, µs per request)] from py-spy's raw output.

    py-spy samples a thread whenever it is not idle, preempted included: on a loaded
    2-core machine a write() that wakes the reader is often where the writer loses its
    core, so samples in system calls measure waiting more than CPU. They are set aside;
    the other samples share the user CPU time measured from /proc, and the kernel's part
    is the system CPU time from /proc, as one slice."""
    counts: dict[str, int] = {}
    with open(raw_file) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            if not stack or frames[-1].split(" (")[0] in SYSCALLS:
                continue
            name = slice_of(frames)
            counts[name] = counts.get(name, 0) + int(n)
    total = sum(counts.values()) or 1
    out = [(name, n / total, user_us * n / total)
           for name, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return out + [("kernel (system CPU from /proc: socket I/O, epoll)", float("nan"), system_us)]


async def profile_round(args, conn, pids, bare, gw, name, path, token) -> None:
    """An extra paired round with py-spy sampling the gateway (its pauses disturb timing, so
    this round is not one of the measured ones); writes FILE-<scenario>.txt (collapsed
    stacks, for flamegraph.pl or speedscope) and prints the per-slice breakdown."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        sys.exit("py-spy is not installed (.venv/bin/pip install py-spy)")
    out = f"{args.profile}-{name.replace(' ', '-')}.txt"
    spy_proc = subprocess.Popen(
        [spy, "record", "--native", "--rate", str(args.profile_rate), "--format", "raw", "-o", out,
         "--duration", str(args.duration + 1), "--pid", str(pids["gateway"])]
        + (["--subprocesses"] if args.workers > 1 else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(0.5)
    r = await paired_round(args, conn, pids, bare, gw, path, token)
    spy_proc.wait()
    cpu = r["cpu"]["gateway"]
    print(f"profile of the gateway, {name} ({cpu['total']:.0f} µs/request in the profiled "
          f"round, {cpu['user']:.0f} user; {out}):")
    for slice_name, share, per in breakdown(out, cpu["user"], cpu["system"]):
        print(f"    {slice_name:<52} {share:6.1%} {per:6.0f} µs")


def soak(port: int, pid: int, seconds: int, connections: int, users: int = 0,
         tokens: int = 0) -> None:
    """RSS of the gateway before and after a long run of mixed reads (no growth wanted).
    With `users`, each request names another user (u-0 … u-{users-1}, over and over; the
    backend knows few of them, so most are audited 404s), and with `tokens` it carries one
    of that many distinct provider-staff tokens: the route memo, plan cache and token cache
    must stay bounded however many callers and subjects the traffic holds."""
    from tests.bench.export_bench import rss_mb
    token = make_token(ttl=seconds + 600, **SCENARIOS[0][1])
    script = None
    if users or tokens:
        pool = [make_token(ttl=seconds + 600, role="provider_staff", sub=f"staff-{k}")
                for k in range(max(tokens, 1))]
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write("local tokens = {" + ",".join(f'"{t}"' for t in pool) + "}\n"
                         f"local users = {max(users, 1)}\nlocal i = 0\n"
                         "request = function()\n  i = i + 1\n"
                         "  return wrk.format('GET', '/telephony/euos/euo-acme/users/u-' .. "
                         "(i % users), {['Authorization'] = 'Bearer ' .. "
                         "tokens[(i % #tokens) + 1]})\nend\n")
    before = rss_mb(pid)
    rss = []
    per = max(1, seconds // 10)
    total = 0
    for _ in range(max(1, seconds // per)):
        if script is None:
            run = wrk(f"http://127.0.0.1:{port}{USER}", token, per, connections)
        else:
            out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{per}s", "-s", script.name,
                                  f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                                 check=True).stdout
            run = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
        total += int(run["rps"] * per)
        rss.append(rss_mb(pid))
    if script is not None:
        os.unlink(script.name)
    print(f"soak: ~{total:,} requests in {seconds} s"
          + (f" naming {users:,} users with {max(tokens, 1):,} tokens" if script else "")
          + f"; gateway RSS {before:.0f} MiB before, then {', '.join(f'{r:.0f}' for r in rss)} MiB")


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The median run by req/s (robust against one disturbed run)."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    return ordered[len(ordered) // 2]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--backend":
        return serve_backend(int(sys.argv[2]))
    if len(sys.argv) > 3 and sys.argv[1] == "--bare":
        return serve_bare_proxy(int(sys.argv[2]), sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--euos", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--users", type=int, default=0, metavar="N",
                        help="with --soak: each request names another of N users")
    parser.add_argument("--tokens", type=int, default=0, metavar="N",
                        help="with --soak: requests carry N distinct tokens in turn")
    parser.add_argument("--soak", type=int, default=0, metavar="SECONDS",
                        help="afterwards, load the gateway this long and report its RSS")
    parser.add_argument("--paired", action="store_true",
                        help="load the bare proxy and the gateway at the same moment and report "
                             "CPU µs per request of every process (default scenarios: fields "
                             "removed, nothing removed)")
    parser.add_argument("--profile", metavar="PREFIX",
                        help="with --paired: one more round per scenario under py-spy, its "
                             "collapsed stacks written to PREFIX-<scenario>.txt and broken down "
                             "by slice (pip install py-spy)")
    parser.add_argument("--profile-rate", type=int, default=250, metavar="HZ",
                        help="with --profile: py-spy samples per second")
    parser.add_argument("--against", metavar="CHECKOUT",
                        help="with --paired: in the bare proxy's place, run the gateway of "
                             "another checkout (say a git worktree of the parent commit), to "
                             "measure a change paired; 'bare' in the output is then that gateway")
    parser.add_argument("--match-rate", action="store_true",
                        help="with --paired: fewer connections on the bare proxy until both "
                             "serve the same request rate (within 10%%) in the same window")
    parser.add_argument("--json", metavar="FILE", help="with --paired: write every round here")
    parser.add_argument("--only", action="append", choices=[s[0] for s in SCENARIOS],
                        help="run only this scenario (repeatable)")
    parser.add_argument("--ports", type=int, metavar="FIRST",
                        help="listen on FIRST, FIRST+1, … instead of any free port")
    args = parser.parse_args()
    if args.ports:
        _PORTS.append(args.ports)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

