"""Failover: the gateway behind a multi-host DSN (`target_session_attrs=read-write`) fails
closed while no host is writable and serves again on its own once one is."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from gateway.demo.run import seed_contracts

from .bench import failover, ha_stack
from .conftest import call, gateway_settings, own_database, running_gateway, wait_for

HA_PORTS = 23150           # 23150-23191: etcd, Patroni's API, PostgreSQL (ha_stack.py)
# what a caller may get while the primary changes: fail closed, retry later
REFUSALS = {"503 audit_unavailable", "503 database_unavailable", "503 outcome_unknown",
            "503 contracts_unavailable", "503 restrictions_unavailable",
            "503 break_glass_unavailable"}


async def test_while_no_host_is_writable_the_api_fails_closed_and_serves_again(
        backends, database_url, template_database, http, token_for):
    """The database turns read-only for new sessions (as a demoted primary is) and the
    gateway's connections end: each audit query is 503 database_unavailable, never 502
    internal_error (asyncpg's "none of the hosts match" is a database out of reach, not a
    bug); once the database is writable again the same gateway answers 200."""
    async with own_database(database_url, template_database) as dsn:
        parts = urlsplit(dsn)
        name = parts.path.lstrip("/")
        multi_host = urlunsplit(parts._replace(query="&".join(
            q for q in (parts.query, "target_session_attrs=read-write") if q)))
        # one lane: the row of each refused call still commits on the lane's connection
        settings = gateway_settings(backends["urls"], audit_lanes=1)
        async with running_gateway(settings, multi_host) as gw:
            async def audit_query():
                return await call(http, "GET", gw + "/v1/audit", token_for("staff"),
                                  params={"limit": "1"})
            assert (await audit_query())[0] == 200
            admin = await asyncpg.connect(database_url)
            try:
                await admin.execute(f'alter database "{name}" set default_transaction_read_only = on')
                # every connection of the gateway's pool ends (a switchover closes them all);
                # the lane's and the listeners' stay, so the refusals are audited and served
                await admin.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity where datname = $1 "
                    "and query not like '%audit_append%' "
                    "and application_name not like 'gateway listener%'", name)
                answers = [await audit_query() for _ in range(4)]
                codes = [(status, orjson.loads(body)["error"]["code"])
                         for status, _, body in answers]
                assert set(codes) == {(503, "database_unavailable")}, codes
            finally:
                await admin.execute(f'alter database "{name}" reset default_transaction_read_only')
                await admin.close()

            async def served():
                return (await audit_query())[0] == 200
            assert await wait_for(served, timeout=10)


@pytest.mark.slow
async def test_a_patroni_switchover_leaves_no_answer_unaudited_and_needs_no_restart(
        backends, demo):
    """A real HA stack (etcd x3, Patroni x2, synchronous_mode; tests/bench/ha_stack.py) and
    the gateway behind its multi-host DSN under reads, writes and audit queries: through a
    `patronictl switchover` the callers get 2xx or 503 (never 500 nor 502), the gateway
    serves again on its own within seconds, and every 2xx has its audit rows on the new
    primary (a read's row, a write's intent and outcome), the chains intact. The full run,
    with kill -9, is `python -m tests.bench.failover` (docs/scale.md)."""
    if why := ha_stack.missing():
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="gateway-ha-test-"))
    root.chmod(0o755)          # PostgreSQL runs as the postgres user when tests run as root
    stack = ha_stack.HaStack(root / "ha", base=HA_PORTS)
    if taken := stack.ports_taken():
        shutil.rmtree(root)
        pytest.skip(f"loopback ports {taken} are in use (another run of this test?)")
    try:
        await asyncio.to_thread(stack.start)
        dsn = await failover.create_database(stack)
        await seed_contracts(dsn, demo)
        async with running_gateway(gateway_settings(backends["urls"]), dsn) as gw:
            load = failover.Load(gw, clients=4)
            driving = asyncio.create_task(load.run())
            try:
                assert await load.settled(time.monotonic(), 20, run=20)
                started = time.monotonic()
                old, new = await asyncio.to_thread(stack.switchover)
                assert await load.settled(started, 30, run=20)
            finally:
                load.stop()
                await driving
        seen = failover.window(load.since(started - 1.0))
        assert seen["server_errors"] == 0, seen
        assert {s for s in seen["by_status"] if not s.startswith("2")} <= REFUSALS, seen
        assert stack.leader() == new != old
        unaudited, chains = await failover.unaudited(dsn, load.answers)
        assert not unaudited and chains.ok
    finally:
        await asyncio.to_thread(stack.stop)
        shutil.rmtree(root, ignore_errors=True)
