"""Fault tolerance of `gateway serve`: dead workers are replaced, the port is not shared with a
stranger, an absent database is a one-line error, and the embedded database neither blocks a
restart nor outlives a killed gateway."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from gateway.db_watchdog import is_postmaster, postmaster_pid
from gateway.embedded import EmbeddedPostgres
from gateway.supervisor import RestartBudget

from .conftest import SERVE, call, free_port, gateway_process, serve_env, wait_for

pytestmark = pytest.mark.slow


def test_restart_budget_backs_off_then_gives_up():
    """Replacements wait longer each time; a sixth death within a minute means giving up,
    and deaths older than the window are forgotten."""
    budget = RestartBudget(limit=5, window_s=60)
    assert [budget.on_death(t) for t in (0, 1, 2, 3, 4)] == [0.5, 1, 2, 4, 8]
    assert budget.on_death(5) is None
    later = RestartBudget(limit=5, window_s=60)
    assert [later.on_death(t) for t in (0, 100, 200)] == [0.5, 0.5, 0.5]


def _logged(path: Path, text: str):
    async def check():
        return text in path.read_text(errors="replace")
    return check


def _workers(proc: subprocess.Popen) -> set[int]:
    return {p.pid for p in psutil.Process(proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE}


async def test_a_killed_worker_is_replaced_and_logged(backends, database_url, http, tmp_path):
    """kill -9 of both workers: the supervisor logs each death and replacements serve again."""
    log = tmp_path / "serve.log"
    async with gateway_process(http, backends, database_url, tmp_path, "--workers", "2",
                               log=log) as (proc, base):
        async def two_workers():
            return len(_workers(proc)) == 2
        assert await wait_for(two_workers, timeout=10)
        first = _workers(proc)
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        for pid in first:
            assert await wait_for(_logged(log, f"worker pid {pid} died (killed by SIGKILL)"),
                                  timeout=10)

        async def replaced_and_serving():
            workers = _workers(proc)
            if len(workers) != 2 or workers & first:
                return False
            try:
                return (await call(http, "GET", base + "/healthz",
                                   headers={"Connection": "close"}))[0] == 200
            except OSError:
                return False
        assert await wait_for(replaced_and_serving, timeout=30)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0


async def test_a_second_gateway_on_the_same_port_exits_2(backends, database_url, http, token_for,
                                                         tmp_path):
    """A second `serve` with another key cannot take part of the port: it exits 2 with one
    line, and the first keeps answering every connection."""
    async with gateway_process(http, backends, database_url, tmp_path) as (_, base):
        port = int(base.rsplit(":", 1)[1])
        env = serve_env(backends, database_url, tmp_path / "second", port,
                        GATEWAY_JWT_SECRET="another-gateway-" + "y" * 32)
        done = await asyncio.to_thread(subprocess.run, [*SERVE, "--workers", "2"], env=env,
                                       capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines()[-1] == (
            f"gateway: cannot listen on 127.0.0.1:{port} (GATEWAY_LISTEN): Address already in use "
            "(is another gateway serving it?)")
        assert "Traceback" not in done.stderr
        for _ in range(10):     # new connections: none may reach a process with another key
            status, _, _ = await call(http, "GET", base + "/v1/catalog", token_for("staff"),
                                      headers={"Connection": "close"})
            assert status == 200


async def test_an_unreachable_database_is_one_line_and_exit_2(backends, tmp_path):
    """Nothing listens at GATEWAY_DATABASE_URL: retries are logged, then one line and exit 2."""
    dsn = f"postgresql://gateway@127.0.0.1:{free_port()}/gateway"
    env = serve_env(backends, dsn, tmp_path, free_port(), GATEWAY_DB_CONNECT_TIMEOUT_S="1.5")
    started = time.monotonic()
    done = await asyncio.to_thread(subprocess.run, SERVE, env=env, capture_output=True, text=True,
                                   timeout=60)
    assert done.returncode == 2
    assert time.monotonic() - started < 15
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("gateway: the database is not reachable after 1.5 s "
                                "(GATEWAY_DB_CONNECT_TIMEOUT_S): ")
    assert any("database not reachable" in line and "retrying in" in line for line in lines[:-1])
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def initialized_data_dir(tmp_path_factory) -> Path:
    """A data dir whose embedded database was created once and stopped (initdb is slow)."""
    data_dir = tmp_path_factory.mktemp("initialized")
    server = EmbeddedPostgres(data_dir)
    server.start()
    server.stop()
    return data_dir


@pytest.fixture
def data_dir(initialized_data_dir, tmp_path) -> Path:
    """A private copy of the initialized data dir (cp -a keeps the owner PostgreSQL wants)."""
    subprocess.run(["cp", "-a", f"{initialized_data_dir}/.", str(tmp_path)], check=True)
    return tmp_path


def _left_running(pgdata: Path) -> list[str]:
    """Processes still naming pgdata (the postmaster, the watchdog)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and str(pgdata) in (p.info["cmdline"] or []):
            found.append(" ".join(p.info["cmdline"]))
    return found


async def _serve_and_stop(http, backends, tmp_path) -> None:
    """`serve` on the embedded database under tmp_path comes up, then stops cleanly with it."""
    # an embedded database recovering from a crash on a loaded machine can take a while
    async with gateway_process(http, backends, "", tmp_path, up_within_s=120) as (proc, _):
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0

    async def nothing_left():            # the watchdog leaves as soon as it sees the stop
        return _left_running(tmp_path / "pgdata") == []
    assert await wait_for(nothing_left, timeout=15), _left_running(tmp_path / "pgdata")


async def test_the_embedded_database_stops_with_a_killed_gateway(backends, http, data_dir):
    """kill -9 of the gateway stops its embedded PostgreSQL, and the next start works."""
    pgdata = data_dir / "pgdata"
    async with gateway_process(http, backends, "", data_dir) as (proc, _):
        pid = postmaster_pid(pgdata)
        assert pid is not None and is_postmaster(pid, pgdata)
        proc.kill()

    async def postmaster_gone():
        return not is_postmaster(pid, pgdata)
    assert await wait_for(postmaster_gone, timeout=30)
    await _serve_and_stop(http, backends, data_dir)


@pytest.mark.parametrize("owner", ["dead", "another program"])
async def test_a_stale_postmaster_pid_does_not_block_a_restart(backends, http, data_dir, owner):
    """After a crash of the database itself its postmaster.pid names a dead pid, or one the
    system has since given to another program; the gateway removes it and starts."""
    pgdata = data_dir / "pgdata"
    server = EmbeddedPostgres(data_dir)
    await asyncio.to_thread(server.start)
    postmaster = psutil.Process(postmaster_pid(pgdata))
    crashed = [postmaster, *postmaster.children()]
    postmaster.kill()

    async def all_gone():    # its children leave once they notice (they hold shared memory)
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in crashed)
    assert await wait_for(all_gone, timeout=30)
    await asyncio.to_thread(server.stop)
    assert (pgdata / "postmaster.pid").exists()
    # a live process of PostgreSQL's own user (PostgreSQL takes a pid it may not signal for a
    # stale one): as a killed server's unreaped zombie is
    pg_user = pgdata.stat().st_uid
    other = subprocess.Popen(["sleep", "300"], user=pg_user if os.getuid() == 0 else None)
    try:
        if owner == "another program":
            # the pid file and the socket's lock file name a live pid that is not PostgreSQL
            # (an unreaped zombie's pid is alive too, which PostgreSQL cannot tell apart)
            for name in ("postmaster.pid", *(p.name for p in pgdata.glob(".s.PGSQL.*.lock"))):
                lines = (pgdata / name).read_text().split("\n")
                (pgdata / name).write_text("\n".join([str(other.pid), *lines[1:]]))
        await _serve_and_stop(http, backends, data_dir)
    finally:
        other.kill()
        other.wait()
