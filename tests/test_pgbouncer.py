"""The gateway behind a real PgBouncer in transaction mode (Debian's `pgbouncer`): its
pooled connections keep no session state, so a server connection may serve any of them
from one transaction to the next. Reads, writes, audit batches and a mirror's re-reads go
through PgBouncer (`GATEWAY_DATABASE_POOLER=transaction`); the mirrors' LISTEN connection,
which a transaction pooler cannot carry, goes straight to PostgreSQL
(`GATEWAY_DATABASE_LISTEN_URL`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
import pytest_asyncio

from .conftest import call, connected, free_port, gateway_settings, own_database, running_gateway, wait_for

POOL_SIZE = 3        # PgBouncer's server connections per database and user

ACME = "/telephony/euos/euo-acme"
ALICE = "/telephony/euos/euo-acme/users/u-alice"


def _pgbouncer() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)
    if found is None:
        if os.environ.get("GATEWAY_TEST_REQUIRE_PGBOUNCER"):
            pytest.fail("pgbouncer is not installed (apt-get install pgbouncer)")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    return found


@contextlib.asynccontextmanager
async def pgbouncer(dsn: str, where: Path):
    """PgBouncer on a loopback port in front of `dsn`'s server, pool_mode=transaction;
    yields the DSN of `dsn`'s database through it."""
    binary = _pgbouncer()
    parts = urlsplit(dsn)
    host = parse_qs(parts.query).get("host", [parts.hostname or "127.0.0.1"])[0]
    user = parts.username or "postgres"
    port, listen = parts.port or 5432, free_port()
    where.mkdir(parents=True, exist_ok=True)
    where.chmod(0o755)      # read by the user it runs as (as root: the database's own)
    (where / "users.txt").write_text(f'"{user}" "{parts.password or ""}"\n')
    password = f" password={parts.password}" if parts.password else ""
    (where / "pgbouncer.ini").write_text(f"""
[databases]
* = host={host} port={port} user={user}{password}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
unix_socket_dir =
auth_type = trust
auth_file = {where / "users.txt"}
pool_mode = transaction
default_pool_size = {POOL_SIZE}
max_client_conn = 200
server_reset_query =
ignore_startup_parameters = extra_float_digits
""")
    for name in ("users.txt", "pgbouncer.ini"):
        (where / name).chmod(0o644)
    argv = [binary]
    if os.geteuid() == 0:       # it refuses to run as root; the embedded server's user
        argv += ["-u", _owner_of(host)]
    log = open(where / "pgbouncer.log", "wb")   # noqa: SIM115 (open while it runs)
    proc = subprocess.Popen([*argv, str(where / "pgbouncer.ini")],
                            stdout=log, stderr=subprocess.STDOUT)
    through = urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{listen}", query=""))
    try:
        async def up():
            if proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {(where / 'pgbouncer.log').read_text()}")
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                conn = await asyncpg.connect(through, statement_cache_size=0)
                await conn.close()
                return True
            return False
        assert await wait_for(up, timeout=10), "pgbouncer did not start"
        yield through
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _owner_of(host: str) -> str:
    path = Path(host)
    return pwd.getpwuid(path.stat().st_uid).pw_name if path.is_dir() else "nobody"


@pytest_asyncio.fixture
async def behind_pgbouncer(database_url, template_database, tmp_path):
    """(the DSN through PgBouncer, the direct DSN) of a database of this test's own."""
    async with own_database(database_url, template_database) as direct, \
            pgbouncer(direct, tmp_path / "pgbouncer") as through:
        yield through, direct


async def test_the_gateway_serves_writes_and_audits_through_pgbouncer_in_transaction_mode(
        backends, behind_pgbouncer, http, token_for):
    through, direct = behind_pgbouncer
    settings = gateway_settings(backends["urls"], database_pooler="transaction",
                                database_listen_url=direct, db_pool_max=12, audit_lanes=2)
    staff, partner = token_for("staff"), token_for("partner")
    async with running_gateway(settings, through) as gw, connected(direct) as admin:
        # reads and their audit rows, many at once: more transactions than PgBouncer has
        # server connections, so each lane's batches land on whichever is free
        results = await asyncio.gather(*(call(http, "GET", gw + path, token)
                                         for _ in range(20)
                                         for path, token in ((ACME, partner), (ALICE, staff))))
        assert {r[0] for r in results} == {200}
        ids = [r[1]["X-Request-Id"] for r in results]
        assert await admin.fetchval("select count(*) from audit_log where request_id = any($1)",
                                    ids) == len(ids)
        # a write through the gateway's own API, and the audit log read back through it
        status, _, body = await call(http, "PUT", gw + "/v1/admin/euos/euo-globex", staff,
                                     json={"partner_id": "p-bluesky", "contract_end": None})
        assert status == 200, body
        status, _, body = await call(http, "GET", gw + "/v1/audit", staff,
                                     params={"euo": "euo-acme"})
        assert status == 200 and orjson.loads(body)["rows"], body
        # a change made elsewhere: heard on the direct listener, re-read through PgBouncer
        await admin.execute("delete from contracts where euo_id = 'euo-acme'")

        async def refused():
            status, _, body = await call(http, "GET", gw + ACME, partner)
            return status == 403 and orjson.loads(body)["error"]["code"] == "no_active_contract"
        assert await wait_for(refused, timeout=5)

        # what PostgreSQL sees of this process: PgBouncer's few server connections and
        # the one listener, whatever GATEWAY_DB_POOL_MAX says
        database = urlsplit(direct).path.lstrip("/")
        held = await admin.fetch(
            "select application_name from pg_stat_activity where datname = $1 and pid <> "
            "pg_backend_pid()", database)
        assert [r[0] for r in held].count("gateway listener") == 1
        assert len(held) <= POOL_SIZE + 1, held

    # no server connection kept a setting of the gateway's: what any client gets next is
    # each server connection as PostgreSQL made it
    clients = [await asyncpg.connect(through, statement_cache_size=0) for _ in range(POOL_SIZE)]
    try:
        transactions = [c.transaction() for c in clients]
        for t in transactions:
            await t.start()          # each holds a server connection of its own
        for c in clients:
            settings_seen = await c.fetchrow(
                "select current_setting('statement_timeout') as statement_timeout, "
                "current_setting('lock_timeout') as lock_timeout")
            assert dict(settings_seen) == {"statement_timeout": "0", "lock_timeout": "0"}
        for t in transactions:
            await t.rollback()
    finally:
        for c in clients:
            await c.close()
