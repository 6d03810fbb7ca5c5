"""`gateway serve --workers N`: several processes share one port, each with its own chains
(one per audit lane; with one lane, one chain per worker)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from .conftest import call, gateway_process, wait_for
from .roles import two_roles


async def test_workers_share_the_port_and_keep_separate_chains(backends, database_url, http,
                                                               token_for, db, tmp_path):
    async with gateway_process(http, backends, database_url, tmp_path, "--workers", "2",
                               GATEWAY_AUDIT_LANES="1") as (proc, base):
        ids = []

        async def both_workers_answered():
            # a new connection each time, so the kernel spreads them over the workers
            # (the second worker may still be starting when the first answers /healthz)
            for _ in range(20):
                status, headers, _ = await call(http, "GET", base + "/telephony/euos/euo-acme",
                                                token_for("staff"), headers={"Connection": "close"})
                assert status == 200
                ids.append(headers["X-Request-Id"])
            return await db.fetchval("select count(distinct chain_id) from audit_log "
                                     "where request_id = any($1::text[])", ids) >= 2
        assert await wait_for(both_workers_answered, timeout=20)
        chains = await db.fetchval(
            "select count(distinct chain_id) from audit_log where request_id = any($1::text[])", ids)
        assert chains == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


async def test_each_worker_holds_its_pool_max_and_one_listener(backends, database_url, http,
                                                               tmp_path):
    """What to size PostgreSQL's max_connections by (docs/configuration.md): each worker
    holds GATEWAY_DB_POOL_MAX (its audit lanes' and its pool's) plus one LISTEN connection
    for every mirror (contracts, restrictions, break-glass grants). A database of its own,
    so that nothing else is counted; GATEWAY_DB_POOL_MAX=6 leaves the pool 5, all opened at
    start."""
    async with two_roles(database_url) as roles, gateway_process(
            http, backends, roles.owner_dsn, tmp_path, "--workers", "2", GATEWAY_DB_POOL_MAX="6",
            GATEWAY_AUDIT_LANES="1", GATEWAY_EXPORT_DB_SLOTS="1",
            GATEWAY_MIRROR_STALENESS_S=str(STALENESS_S)) as (proc, _):
        admin = await asyncpg.connect(database_url)
        try:
            database = urlsplit(roles.owner_dsn).path.lstrip("/")

            async def held():
                return await admin.fetchval(
                    "select count(*) from pg_stat_activity where datname = $1", database)
            expected = 2 * (6 + LISTENERS)
            assert await wait_for(lambda: _equals(held, expected), timeout=20), await held()
            listeners = await admin.fetchval(
                "select count(*) from pg_stat_activity where datname = $1 "
                "and application_name = 'gateway listener'", database)
            assert listeners == 2 * LISTENERS
            readme = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
            assert f"holds up to `GATEWAY_DB_POOL_MAX` + {LISTENERS} connections" in readme
            # and of the two, one beats the deployment's heartbeat, one every staleness / 4
            beats: list[str] = []
            watcher = await asyncpg.connect(roles.owner_dsn)     # NOTIFY is per database
            await watcher.add_listener("gateway_heartbeat", lambda *a: beats.append(a[3]))
            started = time.monotonic()
            await wait_for(lambda: _after(len(beats) >= 5), timeout=10)
            took = time.monotonic() - started
            watcher.terminate()
            assert took > 4 * BEAT_EVERY_S * 0.8, beats     # no more than one a beat
            assert len({beat.split()[1] for beat in beats}) == 1, beats
            assert [int(beat.split()[0]) for beat in beats] == sorted(
                int(beat.split()[0]) for beat in beats)
        finally:
            await admin.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


LISTENERS = 1    # contracts, restrictions, break-glass grants: one connection LISTENs for all
# the deployment's heartbeat at GATEWAY_MIRROR_STALENESS_S=1 (half the default): a beat
# every 0.25 s, so that five of them are heard within a second and a half
STALENESS_S = 1.0
BEAT_EVERY_S = STALENESS_S / 4


async def _after(value):
    return value


async def _equals(read, expected) -> bool:
    return await read() == expected
