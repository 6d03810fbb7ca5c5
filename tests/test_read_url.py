"""GATEWAY_DATABASE_READ_URL: the audit queries read from a streaming standby once it has
replayed what the primary had committed, else from the primary; nothing else goes there."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
import pytest_asyncio

from gateway.reads import READ_POOL_MAX
from gateway.settings import Settings

from .conftest import call, gateway_settings, own_database, running_gateway, wait_for


def _pg_bin() -> Path:
    """The embedded server's own binaries: the standby must be of its version."""
    from pgserver._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses root: pgserver runs it as its own user then, and so does this."""
    return ["runuser", "-u", "pgserver", "--"] + command if os.geteuid() == 0 else command


def _socket_dir(dsn: str) -> str:
    return parse_qs(urlsplit(dsn).query)["host"][0]


@contextlib.contextmanager
def streaming_standby(primary_dsn: str) -> Iterator[str]:
    """A hot standby of the test server (pg_basebackup over its socket, streaming
    asynchronously), on a socket directory of its own; yields that directory."""
    where = Path(tempfile.mkdtemp(prefix="gateway-standby-"))
    where.chmod(0o755)
    data = where / "data"
    if os.geteuid() == 0:
        user = pwd.getpwnam("pgserver")
        os.chown(where, user.pw_uid, user.pw_gid)
    bin_dir = _pg_bin()
    subprocess.run(_as_server_user([
        str(bin_dir / "pg_basebackup"), "-h", _socket_dir(primary_dsn), "-U", "postgres",
        "-D", str(data), "-R", "-X", "stream", "-c", "fast"]), check=True, capture_output=True)
    options = f"-c listen_addresses='' -c unix_socket_directories={where} -c hot_standby=on"
    subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-w",
                                    "-l", str(where / "log"), "-o", options, "start"]),
                   check=True, capture_output=True)
    try:
        yield str(where)
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                                        "immediate", "stop"]), capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def standby(database_url) -> Iterator[str]:
    if not urlsplit(database_url).query.startswith("host="):
        pytest.skip("needs the embedded test server (GATEWAY_TEST_DATABASE_URL is set)")
    with streaming_standby(database_url) as socket_dir:
        yield socket_dir


def on_standby(dsn: str, socket_dir: str) -> str:
    """The same database's DSN on the standby."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(query=f"host={socket_dir}"))


@pytest_asyncio.fixture
async def database(database_url, template_database, standby) -> AsyncIterator[tuple[str, str]]:
    """A database of the test server and its replica on the standby: (primary, standby)."""
    async with own_database(database_url, template_database) as dsn:
        replica = on_standby(dsn, standby)

        async def replicated():
            with contextlib.suppress(asyncpg.InvalidCatalogNameError, OSError):
                conn = await asyncpg.connect(replica)
                await conn.close()
                return True
            return False
        assert await wait_for(replicated, timeout=10)
        yield dsn, replica


async def _audit_of(http, gw, token_for, actor: str):
    return await call(http, "GET", gw + "/v1/audit", token_for("staff"),
                      params={"actor": actor, "limit": "10"})


async def _read_as(http, gw, token_for, actor: str) -> str:
    """A proxied read by a staff member of its own name; its request id."""
    status, headers, _ = await call(http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice",
                                    token_for(role="provider_staff", sub=actor))
    assert status == 200
    return headers["X-Request-Id"]


async def test_the_audit_log_is_read_from_the_standby_with_every_row_committed_before(
        backends, database, http, token_for):
    """With the standby streaming, /v1/audit reads there (X-Gateway-Read-From: standby) and
    already holds the row of the request answered just before (it waited for the replay:
    X-Gateway-Replay-Wait-Ms); the proxied reads and writes, whose rows only the primary
    can take, are served as ever, and the gateway holds no more standby connections than
    the read pool's (no audit lane, no listener there)."""
    primary, replica = database
    settings = gateway_settings(backends["urls"], database_read_url=replica)
    async with running_gateway(settings, primary) as gw:
        for _ in range(3):
            actor = f"staff-{uuid.uuid4().hex[:8]}"
            request_id = await _read_as(http, gw, token_for, actor)
            status, headers, body = await _audit_of(http, gw, token_for, actor)
            assert status == 200
            assert headers["X-Gateway-Read-From"] == "standby"
            assert int(headers["X-Gateway-Replay-Wait-Ms"]) >= 0
            assert request_id in {r["request_id"] for r in orjson.loads(body)["rows"]}
        status, _, _ = await call(http, "PATCH", gw + "/telephony/euos/euo-acme/users/u-alice",
                                  token_for("alice"), json={"language": "fr"})
        assert status == 200
        conn = await asyncpg.connect(replica)
        try:
            assert await conn.fetchval("select pg_is_in_recovery()")
            held = await conn.fetchval(
                "select count(*) from pg_stat_activity where datname = current_database() "
                "and backend_type = 'client backend' and pid <> pg_backend_pid()")
        finally:
            await conn.close()
        assert 1 <= held <= READ_POOL_MAX


async def test_a_standby_behind_by_more_than_the_wait_is_not_read(
        backends, database, database_url, standby, http, token_for):
    """The standby's replay paused: the audit query waits GATEWAY_DATABASE_READ_MAX_WAIT_S
    for it, then reads from the primary (X-Gateway-Read-From: primary), so the answer still
    holds the row just committed; replay resumed, it reads from the standby again."""
    primary, replica = database
    settings = gateway_settings(backends["urls"], database_read_url=replica,
                                database_read_max_wait_s=0.3)
    server = await asyncpg.connect(on_standby(database_url, standby))
    try:
        async with running_gateway(settings, primary) as gw:
            await server.execute("select pg_wal_replay_pause()")
            try:
                actor = f"staff-{uuid.uuid4().hex[:8]}"
                request_id = await _read_as(http, gw, token_for, actor)
                status, headers, body = await _audit_of(http, gw, token_for, actor)
                assert status == 200 and headers["X-Gateway-Read-From"] == "primary"
                assert request_id in {r["request_id"] for r in orjson.loads(body)["rows"]}
            finally:
                await server.execute("select pg_wal_replay_resume()")

            async def from_standby():
                _, headers, _ = await _audit_of(http, gw, token_for, actor)
                return headers["X-Gateway-Read-From"] == "standby"
            assert await wait_for(from_standby, timeout=5)
    finally:
        await server.close()


@pytest.mark.parametrize("read_url", ["primary", "nothing listens"])
async def test_a_read_url_that_names_no_standby_is_not_read(backends, database_url,
                                                            template_database, http, token_for,
                                                            read_url):
    """GATEWAY_DATABASE_READ_URL naming a server not in recovery (a promoted standby, cut off
    from the cluster perhaps) or one that is down: the gateway starts all the same and the
    audit queries read from the primary. A connection of the read pool that reached a
    primary is let go (a multi-host URL finds the standby again once it is back)."""
    async with own_database(database_url, template_database) as dsn:
        reads = dsn + "&application_name=gateway-reads"
        settings = gateway_settings(
            backends["urls"], database_read_max_wait_s=0.5,
            database_read_url=reads if read_url == "primary" else "postgresql://x@127.0.0.1:1/x")
        async with running_gateway(settings, dsn) as gw:
            for _ in range(2):
                status, headers, _ = await _audit_of(http, gw, token_for, "nobody")
                assert status == 200 and headers["X-Gateway-Read-From"] == "primary"
            conn = await asyncpg.connect(dsn)
            try:
                async def let_go():
                    return not await conn.fetchval(
                        "select count(*) from pg_stat_activity "
                        "where application_name = 'gateway-reads'")
                assert await wait_for(let_go, timeout=3)
            finally:
                await conn.close()


def test_the_read_settings_are_read_and_documented():
    """GATEWAY_DATABASE_READ_URL (unset: the main DSN, no header) and its wait bound are
    read from the environment and listed in docs/configuration.md."""
    settings = Settings.from_env({"GATEWAY_DATABASE_READ_URL": "postgresql://standby/db",
                                  "GATEWAY_DATABASE_READ_MAX_WAIT_S": "0.5"})
    assert (settings.database_read_url, settings.database_read_max_wait_s) == (
        "postgresql://standby/db", 0.5)
    assert Settings.from_env({}).database_read_url is None
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for name in ("GATEWAY_DATABASE_READ_URL", "GATEWAY_DATABASE_READ_MAX_WAIT_S"):
        assert f"| `{name}` |" in docs

