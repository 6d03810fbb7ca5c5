"""Failover on a real HA stack: does every answered request keep its audit row, and how
long does the gateway fail closed?

    .venv/bin/python -m tests.bench.failover [--members 2] [--events switchover,kill]
                                             [--base-port 23100] [--clients 8]

Debian's packages (`apt-get install patroni etcd-server etcd-client postgresql-15`):
three etcd members and Patroni members (PostgreSQL 15, `synchronous_mode: true`) on
loopback (tests/bench/ha_stack.py). The gateway's schema is migrated through the
multi-host DSN (`postgresql://…@h1:p1,h2:p2/gateway?target_session_attrs=read-write`),
the demo backends start in this process, `gateway serve` in its own, and clients drive
reads, writes and audit queries, each answer's X-Request-Id recorded. Then, one after
the other, the events:

    switchover   `patronictl switchover` to the synchronous standby
    kill         kill -9 of the primary's postmaster (Patroni restarts it, or fails over)
    failover     kill -9 of the primary's Patroni and postmaster (the standby takes over
                 once the leader key lapses: ttl 10 s)

and it reports, per event: the answers by status and reason, the fail-closed window (from
the first non-2xx answer to the last), the new primary; at the end: every 2xx answer's
audit rows looked up on the primary (a read's or an audit query's row; a write's intent
and outcome: zero unaudited 2xx is the pass), every 503 outcome_unknown's intent row, the
chains verified, a checkpoint signed after the events, and the gateway's pid unchanged
and ready (it reconnected on its own). It exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from gateway.audit.chain import verify
from gateway.demo import data as demo_data
from gateway.demo.backends import meeting_app, telephony_app
from gateway.demo.run import seed_contracts, start_site
from tests.bench.ha_stack import HaStack, missing
from tests.conftest import AUDIENCE, CALLERS, ISSUER, SECRET, make_token

USERS = [("euo-acme", "u-alice"), ("euo-acme", "u-bob"), ("euo-acme", "u-carla"),
         ("euo-globex", "u-eva")]
EVENTS = ("switchover", "kill", "failover")


@dataclass
class Answer:
    kind: str           # read, write, audit
    started: float      # time.monotonic()
    ended: float
    status: int         # 0: no answer (the connection failed)
    code: str
    request_id: str
    read_from: str = ""     # an audit query's X-Gateway-Read-From


class Load:
    """Clients that read, write and query the audit log in a loop, every answer recorded."""

    def __init__(self, base: str, clients: int):
        self.base = base
        self.clients = clients
        self.answers: list[Answer] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await asyncio.gather(*(self._client(http, n) for n in range(self.clients)))

    def stop(self) -> None:
        self._stop.set()

    async def _client(self, http: aiohttp.ClientSession, n: int) -> None:
        euo, sub = USERS[n % len(USERS)]
        user = make_token("user", sub, euo=euo, ttl=3600)
        staff = make_token(**CALLERS["staff"], ttl=3600)
        url = f"{self.base}/telephony/euos/{euo}/users/{sub}"
        i = 0
        while not self._stop.is_set():
            i += 1
            kind = ("read", "write", "read", "audit")[(i + n) % 4]
            if kind == "read":
                request = http.get(url, headers={"Authorization": f"Bearer {user}"})
            elif kind == "write":
                request = http.patch(url, headers={"Authorization": f"Bearer {user}"},
                                     json={"language": ("en", "fr", "de")[i % 3]})
            else:
                request = http.get(f"{self.base}/v1/audit", params={"limit": "5"},
                                   headers={"Authorization": f"Bearer {staff}"})
            started = time.monotonic()
            try:
                async with request as r:
                    body = await r.read()
                    status, rid = r.status, r.headers.get("X-Request-Id", "")
                    read_from = r.headers.get("X-Gateway-Read-From", "")
            except (aiohttp.ClientError, TimeoutError) as e:
                self.answers.append(Answer(kind, started, time.monotonic(), 0,
                                           type(e).__name__, ""))
                await asyncio.sleep(0.05)
                continue
            code = ""
            if status >= 300:
                try:
                    code = orjson.loads(body)["error"]["code"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    code = body[:60].decode(errors="replace")
            self.answers.append(Answer(kind, started, time.monotonic(), status, code, rid,
                                       read_from))
            if status >= 300:
                await asyncio.sleep(0.02)      # refusals come at once: no busy loop

    def since(self, t: float) -> list[Answer]:
        return [a for a in self.answers if a.started >= t]

    async def settled(self, after: float, timeout_s: float, run: int = 40) -> bool:
        """Whether the last `run` answers, all started after `after`, are 2xx."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            recent = self.since(after)[-run:]
            if len(recent) == run and all(200 <= a.status < 300 for a in recent):
                return True
            await asyncio.sleep(0.2)
        return False


def window(answers: list[Answer]) -> dict:
    """What the callers saw during one event."""
    refused = [a for a in answers if not 200 <= a.status < 300]
    by = collections.Counter(f"{a.status} {a.code}".strip() for a in answers)
    ok = [a for a in answers if 200 <= a.status < 300]
    return {
        "answers": len(answers),
        "by_status": dict(sorted(by.items())),
        "fail_closed_s": round(max(a.ended for a in refused) - min(a.started for a in refused), 2)
        if refused else 0.0,
        "slowest_2xx_s": round(max((a.ended - a.started for a in ok), default=0.0), 2),
        "server_errors": sum(1 for a in answers if a.status >= 500 and a.status != 503),
        "audit_queries_read_from": dict(collections.Counter(
            a.read_from or "?" for a in ok if a.kind == "audit")),
    }


async def unaudited(dsn: str, answers: list[Answer],
                    unknown: list[str] | None = None) -> tuple[list[str], object]:
    """The request ids of 2xx answers without their rows on the primary (a read's or an
    audit query's row, a write's intent and outcome); the chain report. With `unknown`,
    it is filled with the 503 outcome_unknown answers whose intent row is missing."""
    ok = [a for a in answers if 200 <= a.status < 300]
    in_doubt = [a for a in answers if a.code == "outcome_unknown"]
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "select request_id, phase from audit_log where request_id = any($1)",
            [a.request_id for a in ok + in_doubt])
        report = await verify(conn)
    finally:
        await conn.close()
    have: dict[str, set] = collections.defaultdict(set)
    for r in rows:
        have[r["request_id"]].add(r["phase"])
    missing_rows = []
    for a in ok:
        needed = {"intent", "outcome"} if a.kind == "write" else {None}
        if not needed <= have[a.request_id]:
            missing_rows.append(a.request_id)
    if unknown is not None:
        unknown.extend(a.request_id for a in in_doubt if "intent" not in have[a.request_id])
    return missing_rows, report


async def still_sealing(dsn: str, timeout_s: float = 15.0) -> bool:
    """Whether the gateway's checkpointer signs a checkpoint after the events (its loop
    outlived them)."""
    conn = await asyncpg.connect(dsn)
    try:
        since = await conn.fetchval("select now()")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await conn.fetchval("select max(at) from audit_checkpoints") > since:
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await conn.close()


async def serve_backends(demo) -> tuple[list, dict[str, str]]:
    runners, urls = [], {}
    for service, make in (("telephony", telephony_app), ("meeting", meeting_app)):
        runner, port = await start_site(make(demo), "127.0.0.1", 0)
        runners.append(runner)
        urls[service] = f"http://127.0.0.1:{port}"
    return runners, urls


async def wait_ready(base: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(base + "/readyz") as r:
                    if r.status == 200:
                        return True
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    return False


async def create_database(stack: HaStack) -> str:
    conn = await asyncpg.connect(stack.dsn())
    try:
        await conn.execute("create database gateway")
    finally:
        await conn.close()
    return stack.dsn("gateway")


def start_gateway(dsn: str, port: int, upstreams: dict[str, str], data_dir: str,
                  log_path: Path, **env) -> subprocess.Popen:
    environment = dict(os.environ, GATEWAY_DATABASE_URL=dsn, GATEWAY_LISTEN=f"127.0.0.1:{port}",
                       GATEWAY_UPSTREAM_TELEPHONY=upstreams["telephony"],
                       GATEWAY_UPSTREAM_MEETING=upstreams["meeting"], GATEWAY_DATA_DIR=data_dir,
                       GATEWAY_JWT_SECRET=SECRET, GATEWAY_JWT_ISSUER=ISSUER,
                       GATEWAY_JWT_AUDIENCE=AUDIENCE, **env)
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=environment,
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"),
                            start_new_session=True)


async def run(args) -> dict:
    """The whole exercise; the report as a dict (report["ok"] says whether it passed)."""
    root = Path(args.dir or tempfile.mkdtemp(prefix="gateway-failover-"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)        # PostgreSQL runs as another user when this runs as root
    stack = HaStack(root / "ha", base=args.base_port, members=args.members)
    if taken := stack.ports_taken():
        sys.exit(f"loopback ports {taken} are in use: pick another --base-port")
    report: dict = {"members": args.members, "events": {}}
    started = time.monotonic()
    await asyncio.to_thread(stack.start)
    report["stack_up_s"] = round(time.monotonic() - started, 1)
    runners, gateway = [], None
    try:
        dsn = await create_database(stack)
        demo = demo_data.build()
        await seed_contracts(dsn, demo)          # migrates, through the multi-host DSN
        runners, upstreams = await serve_backends(demo)
        port = args.base_port + 40
        base = f"http://127.0.0.1:{port}"
        # the audit queries on a standby when there is one (gateway/reads.py)
        read_url = {"GATEWAY_DATABASE_READ_URL": stack.dsn("gateway", attrs="prefer-standby")
                    } if args.read_standby else {}
        gateway = start_gateway(dsn, port, upstreams, str(root / "gateway"),
                                root / "gateway.log", GATEWAY_AUDIT_CHECKPOINT_S="2", **read_url)
        if not await wait_ready(base, 60):
            raise RuntimeError(f"the gateway never became ready (see {root / 'gateway.log'})")
        load = Load(base, args.clients)
        driving = asyncio.create_task(load.run())
        try:
            if not await load.settled(time.monotonic(), 30):
                raise RuntimeError("the load never ran clean before the first event")
            for event in args.events:
                report["events"][event] = await one_event(stack, load, event, args.settle_s)
                if not report["events"][event]["recovered"]:
                    break       # the checks below say what was lost; the logs say why
        finally:
            load.stop()
            await driving
        if stack.leader() is None:
            report.update(ok=False, error=f"no primary after the events (logs under {root})")
            return report
        sealing = await still_sealing(dsn)
        no_intent: list[str] = []
        missing_rows, chains = await unaudited(dsn, load.answers, no_intent)
        ok_answers = sum(1 for a in load.answers if 200 <= a.status < 300)
        report.update({
            "answers": len(load.answers), "answers_2xx": ok_answers,
            "unaudited_2xx": len(missing_rows), "unaudited_examples": missing_rows[:5],
            "outcome_unknown": sum(1 for a in load.answers if a.code == "outcome_unknown"),
            "outcome_unknown_without_intent": len(no_intent),
            "chains_ok": chains.ok, "checkpoints_after_events": sealing,
            "gateway_restarted": gateway.poll() is not None,
            "gateway_ready_after": await wait_ready(base, 10),
            "server_errors": sum(e["server_errors"] for e in report["events"].values()),
        })
        report["ok"] = (not missing_rows and not no_intent and chains.ok and sealing
                        and not report["gateway_restarted"]
                        and report["gateway_ready_after"] and not report["server_errors"]
                        and all(e["recovered"] for e in report["events"].values()))
        report["gateway_log"] = str(root / "gateway.log")
        return report
    finally:
        if gateway is not None and gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGTERM)
            await asyncio.to_thread(gateway.wait)
        for r in runners:
            await r.cleanup()
        await asyncio.to_thread(stack.stop)


async def one_event(stack: HaStack, load: Load, event: str, settle_s: float) -> dict:
    """Cause one event under the load; what the callers saw until it ran clean again."""
    old = stack.leader()
    t0 = time.monotonic()
    if event == "switchover":
        await asyncio.to_thread(stack.switchover)
    elif event == "kill":
        stack.kill_primary()
    else:
        stack.kill_primary(patroni_too=True)
    # the cluster whole again (a leader and a synchronous standby), then the load clean
    healthy = await asyncio.to_thread(
        _healthy_within, stack, old if event == "failover" else None, 90)
    recovered = healthy and await load.settled(t0, 60)
    answers = load.since(t0 - 1.0)      # requests under way as the event began count too
    result = window(answers)
    result.update({"old_primary": old, "new_primary": stack.leader(), "recovered": recovered,
                   "cluster_whole_s": round(time.monotonic() - t0, 1)})
    await asyncio.sleep(settle_s)        # some clean load between events
    return result


def _healthy_within(stack: HaStack, gone: str | None, timeout_s: float) -> bool:
    """A leader and a synchronous standby (or just a new leader when `gone` stays down)."""
    def whole() -> bool:
        leader = stack.leader()
        if gone is not None:
            return leader is not None and leader != gone
        return leader is not None and stack.sync_standby() is not None
    try:
        # held for a few of Patroni's loops: after a restart the replication can show the
        # standby as sync (the old synchronous_standby_names) before Patroni's /sync key
        # names it again, and a failover in that gap is refused
        stack.wait(whole, timeout_s, "healthy cluster", stable_s=3.0)
    except TimeoutError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--events", default="switchover,kill",
                        help=f"comma-separated, in order, from {', '.join(EVENTS)}")
    parser.add_argument("--base-port", type=int, default=23100)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--dir", help="where the stack lives (a new temporary directory)")
    parser.add_argument("--no-read-standby", dest="read_standby", action="store_false",
                        help="no GATEWAY_DATABASE_READ_URL (by default the audit queries "
                             "read from a standby)")
    args = parser.parse_args()
    args.events = [e for e in args.events.split(",") if e]
    if unknown := set(args.events) - set(EVENTS):
        sys.exit(f"unknown events: {', '.join(sorted(unknown))}")
    if why := missing():
        sys.exit(why)
    report = asyncio.run(run(args))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
