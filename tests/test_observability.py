"""Observability: the JSON access log on stdout, Prometheus metrics summed over `--workers`,
and the W3C trace carried to the backends and into the audit row."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from gateway.audit.chain import HASHED, canonical
from gateway.call import traceparent

from .conftest import audit_row, call, gateway_process, wait_for

TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE}-b7ad6b7169203331-01"
USER_RECORD = "/telephony/euos/euo-acme/users/u-alice"


@contextlib.asynccontextmanager
async def serving(http, backends, database_url: str, tmp_path: Path, *args: str,
                  **env: str) -> AsyncIterator[tuple[subprocess.Popen, str, Path]]:
    """`gateway serve` with its stdout kept in a file; yields it, its URL and that file."""
    out = tmp_path / "stdout"
    async with gateway_process(http, backends, database_url, tmp_path, *args, stdout=out,
                               **env) as (proc, base):
        yield proc, base, out


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, and the clean exit that flushes what was logged."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


async def both_workers_started(shared: Path) -> None:
    """Wait until both workers sample their gauges (their start-up is over)."""
    async def started():
        return len(list(shared.glob("gauge_livesum_*.db"))) == 2
    assert await wait_for(started, timeout=20)


async def test_each_request_leaves_one_access_log_line_naming_no_person(
        backends, database_url, http, token_for, tmp_path):
    async with serving(http, backends, database_url, tmp_path) as (proc, base, out):
        asked = {
            "allowed": await call(http, "GET", base + USER_RECORD, token_for("staff"),
                                  headers={"X-Request-Id": "client-1", "traceparent": TRACEPARENT}),
            "denied": await call(http, "GET", base + USER_RECORD + "/voicemails",
                                 token_for("staff")),
            "partner": await call(http, "GET", base + USER_RECORD, token_for("partner")),
            "anonymous": await call(http, "GET", base + USER_RECORD),
            "bad_path": await call(http, "GET", base + "/telephony/euos/euo-acme/users/%2e%2e",
                                   token_for("bob")),
        }
        stop(proc)
    lines = [orjson.loads(raw) for raw in out.read_bytes().splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    assert len(by_id) == len(lines) == len(asked)        # one line each, probes not logged
    got = {name: by_id[headers["X-Request-Id"]] for name, (_, headers, _) in asked.items()}
    assert got["allowed"] | {"at": None, "duration_ms": None} == {
        "at": None, "request_id": asked["allowed"][1]["X-Request-Id"],
        "client_request_id": "client-1", "trace_id": TRACE, "method": "GET",
        "route": "telephony:/euos/{euo}/users/{user}", "service": "telephony",
        "role": "provider_staff", "organisation": None, "decision": "allow", "reason": None,
        "status": 200, "bytes": len(asked["allowed"][2]), "duration_ms": None}
    assert got["allowed"]["duration_ms"] > 0
    assert (got["denied"]["decision"], got["denied"]["reason"], got["denied"]["status"]) == \
        ("deny", "dataset_not_permitted", 403)
    assert (got["partner"]["role"], got["partner"]["organisation"]) == ("partner", "p-northwind")
    assert (got["anonymous"]["role"], got["anonymous"]["reason"]) == (None, "missing_token")
    assert (got["bad_path"]["route"], got["bad_path"]["organisation"]) == (None, "euo-acme")
    text = out.read_text()
    for personal in ("u-alice", "u-bob", "staff-sam", "pat@northwind", "127.0.0.1", "Bearer",
                     "/euos/euo-acme"):
        assert personal not in text


async def test_the_access_log_can_be_switched_off(backends, database_url, http, token_for,
                                                  tmp_path):
    async with serving(http, backends, database_url, tmp_path,
                       GATEWAY_ACCESS_LOG="off") as (proc, base, out):
        assert (await call(http, "GET", base + USER_RECORD, token_for("staff")))[0] == 200
        stop(proc)
    assert out.read_bytes() == b""


def samples(text: str, name: str) -> dict[str, float]:
    """The samples of one metric in exposition text, by their label text."""
    pattern = re.compile(rf"^{name}(\{{.*\}})? (\S+)$", re.M)   # route labels hold braces
    return {labels or "": float(value) for labels, value in pattern.findall(text)}


def workers_of(pid: int) -> set[int]:
    """The pids of a process's forked children (same command line; Linux)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        command = f.read()
    found = set()
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if ppid == pid and f.read() == command:
                    found.add(int(entry))
    return found


@pytest.mark.slow
async def test_metrics_add_up_across_workers_whichever_answers(backends, database_url, http,
                                                               token_for, tmp_path):
    """N requests over two workers: every scrape counts N, even after a worker died."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    async with serving(http, backends, database_url, tmp_path, "--workers", "2",
                       TMPDIR=str(temp), GATEWAY_ACCESS_LOG="off") as (proc, base, _):
        requests = 40
        for i in range(requests):
            path = USER_RECORD if i % 4 else USER_RECORD + "/voicemails"   # a quarter refused
            await call(http, "GET", base + path, token_for("staff"),
                       headers={"Connection": "close"})     # spread over the workers

        async def scrape() -> str:
            return (await call(http, "GET", base + "/metrics",
                               headers={"Connection": "close"}))[2].decode()

        def counted(text: str) -> tuple[float, float, float]:
            total = sum(samples(text, "gateway_requests_total").values())
            refused = samples(text, "gateway_refusals_total").get(
                '{reason="dataset_not_permitted"}')
            backend = samples(text, "gateway_backend_duration_seconds_count").get(
                '{service="telephony"}')
            return total, refused, backend
        for _ in range(6):
            text = await scrape()
            assert counted(text) == (requests, requests / 4, requests * 3 / 4)
        assert sum(samples(text, "gateway_audit_batch_rows_count").values()) >= 1
        assert samples(text, "gateway_audit_commit_seconds_count")
        assert samples(text, "gateway_audit_queue_rows")[""] >= 0
        assert samples(text, "gateway_db_pool_connections_in_use")[""] >= 1   # a lane at least
        staleness = samples(text, "gateway_mirror_staleness_seconds")
        assert set(staleness) == {'{mirror="contracts"}', '{mirror="restrictions"}',
                                  '{mirror="break_glass"}'}
        assert all(0 <= s < 10 for s in staleness.values())

        [shared] = temp.glob("gateway-metrics-*")
        await both_workers_started(shared)
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        victim = min(workers)
        assert list(shared.glob(f"gauge_livesum_{victim}.db"))
        os.kill(victim, signal.SIGKILL)

        async def forgotten():
            return not list(shared.glob(f"gauge_livesum_{victim}.db"))
        assert await wait_for(forgotten, timeout=10)
        assert counted(await scrape()) == (requests, requests / 4, requests * 3 / 4)
        stop(proc)
        assert not shared.exists()        # the temporary directory goes with the gateway


@pytest.mark.slow
async def test_an_operators_metrics_directory_is_emptied_at_start(backends, database_url, http,
                                                                  tmp_path):
    shared = tmp_path / "prometheus"
    shared.mkdir()
    (shared / "counter_1.db").write_bytes(b"a previous run's values")
    async with serving(http, backends, database_url, tmp_path, "--workers", "2",
                       PROMETHEUS_MULTIPROC_DIR=str(shared)) as (proc, base, _):
        assert not (shared / "counter_1.db").exists()
        await both_workers_started(shared)
        status, _, body = await call(http, "GET", base + "/metrics")
        assert status == 200 and b"gateway_mirror_staleness_seconds" in body
        stop(proc)


async def test_a_callers_trace_reaches_the_backend_and_the_audit_row(gateway, http, token_for,
                                                                    backends, db):
    status, headers, _ = await call(http, "GET", gateway + USER_RECORD, token_for("staff"),
                                    headers={"traceparent": TRACEPARENT})
    assert status == 200
    assert backends["seen"].requests[-1][2]["traceparent"] == TRACEPARENT
    assert (await audit_row(db, headers["X-Request-Id"]))["trace_id"] == TRACE


async def test_without_a_trace_the_gateway_starts_one(gateway, http, token_for, backends, db):
    status, headers, _ = await call(http, "GET", gateway + USER_RECORD, token_for("staff"))
    assert status == 200
    sent = backends["seen"].requests[-1][2]["traceparent"]
    version, trace, parent, flags = sent.split("-")
    assert (version, flags) == ("00", "00")            # not sampled: the gateway records no spans
    assert re.fullmatch("[0-9a-f]{32}", trace) and trace != "0" * 32
    assert (await audit_row(db, headers["X-Request-Id"]))["trace_id"] == trace


def _child_trace(pipe) -> None:
    pipe.send(traceparent({}))


def test_forked_workers_start_traces_of_their_own():
    """Trace ids come from the process's PRNG (no system call): each `serve --workers`
    child, forked as the supervisor forks them, must not repeat its parent's sequence."""
    fork = multiprocessing.get_context("fork")
    mine, theirs = fork.Pipe()
    child = fork.Process(target=_child_trace, args=(theirs,))
    child.start()
    from_child = mine.recv()
    child.join()
    ours = traceparent({})
    assert from_child.split("-")[1] != ours.split("-")[1]
    assert from_child.split("-")[2] != ours.split("-")[2]


@pytest.mark.parametrize(("caller", "sees_trace"), [("staff", True), ("partner", False)])
async def test_audit_rows_show_the_trace_to_the_callers_organisation_only(
        gateway, http, token_for, caller, sees_trace):
    _, headers, _ = await call(http, "GET", gateway + USER_RECORD, token_for("staff"),
                               headers={"traceparent": TRACEPARENT})
    request_id = headers["X-Request-Id"]
    _, _, body = await call(http, "GET", gateway + "/v1/audit", token_for(caller),
                            params={"euo": "euo-acme", "limit": "1000"})
    [row] = [r for r in orjson.loads(body)["rows"] if r["request_id"] == request_id]
    assert row["trace_id"] == (TRACE if sees_trace else None)


async def test_the_chains_verify_with_and_without_trace_ids(gateway, http, token_for):
    await call(http, "GET", gateway + USER_RECORD, token_for("staff"),
               headers={"traceparent": TRACEPARENT})
    _, _, body = await call(http, "GET", gateway + "/v1/audit/verify", token_for("staff"))
    assert orjson.loads(body)["ok"] is True


def test_rows_written_before_the_trace_id_existed_hash_as_they_did():
    """A trailing field left null is not hashed: rows of older versions still verify."""
    from datetime import UTC, datetime
    before = [datetime(2024, 1, 1, tzinfo=UTC), "chain", 1] + [None] * (len(HASHED) - 3)
    before[HASHED.index("duration_ms")] = 1.0
    older = before[:HASHED.index("client_request_id")]
    assert canonical(before) == orjson.dumps(older)
