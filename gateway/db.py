"""PostgreSQL: connections and the pool, forward-only migrations, named queries and the
audit partitions (the embedded server for development: embedded.py)."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import asyncpg
from aiohttp import web

from .settings import SQL_DIR

log = logging.getLogger("gateway.db")

_MIGRATION = re.compile(r"^(\d{3})_[\w-]+\.sql$")
MIGRATION_LOCK = 0x6761_7465   # an advisory lock id: one migrating process at a time
POOL = web.AppKey("pool", asyncpg.Pool)
RUNTIME_GRANTS = "runtime_grants.sql"
# `gateway migrate` and `gateway audit maintain` create this month's audit partition and
# this many after it; readiness and `gateway check` warn once fewer than
# PARTITION_MONTHS_REQUIRED remain ahead (the rows would land in audit_log_default).
PARTITION_MONTHS_AHEAD = 3
PARTITION_MONTHS_REQUIRED = 1
_LOCK_TRIES = 10


class DatabaseUnavailable(Exception):
    """The database could not be reached or started; the message is one line for an operator."""


# What a statement raises when the database is out of reach, restarting, failing over or
# refusing it: the caller fails closed (503) or tries again later, never 500. asyncpg's
# InternalClientError is one: a connection the server has just closed (a switchover, a
# terminated backend) refuses the next statement with it ("cannot switch to state"), and
# "none of the hosts is read-write" (TargetServerAttributeNotMatched) is one too.
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                   asyncpg.InternalClientError)


class NoPrimary(ConnectionError):
    """No host of a multi-host DSN (`target_session_attrs=read-write`) is writable now: a
    failover under way. An OSError, so every path that waits out an unreachable database
    (503 database_unavailable, a mirror's or a lane's retry) waits this out too; asyncpg's
    own TargetServerAttributeNotMatched is none of the errors those paths expect."""


async def connect(dsn: str, **kwargs) -> asyncpg.Connection:
    """asyncpg.connect, with NoPrimary for "none of the hosts is read-write" (the pools'
    connection factory too)."""
    try:
        return await asyncpg.connect(dsn, **kwargs)
    except asyncpg.TargetServerAttributeNotMatched as e:
        raise NoPrimary(str(e)) from None


# Worth waiting for: nothing listens yet, the server is starting or full. Anything else
# (wrong password, no such database, a malformed DSN) is an operator's mistake: fail at once.
_TRANSIENT = (OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError)
_MISTAKES = (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError)


async def wait_for_database(dsn: str, timeout_s: float) -> None:
    """Return once PostgreSQL accepts a connection; retry with backoff, one log line per
    failure, for up to timeout_s, then raise DatabaseUnavailable."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.25
    while True:
        remaining = deadline - loop.time()
        try:
            conn = await connect(dsn, timeout=min(max(remaining, 1.0), 10.0))
        except _TRANSIENT as e:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DatabaseUnavailable(f"the database is not reachable after {timeout_s:g} s "
                                          f"(GATEWAY_DB_CONNECT_TIMEOUT_S): {_reason(e)}") from None
            log.warning("database not reachable (%s); retrying in %.2g s", _reason(e),
                        min(delay, remaining))
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)
        except _MISTAKES as e:
            raise DatabaseUnavailable(f"the database refused the gateway: {_reason(e)}") from None
        else:
            await conn.close()
            return


def _reason(error: BaseException) -> str:
    """One line naming what went wrong (asyncpg messages carry no password)."""
    text = " ".join(str(error).split()) or "no detail"
    return f"{type(error).__name__}: {text}"


class Pool(asyncpg.Pool):
    """asyncpg's pool, with a bound on the wait for a free connection: asyncpg waits for
    ever by default (`pool.fetch` and `pool.acquire()` alike), so a pool held by slow
    queries would keep every later caller waiting with it. Past `acquire_timeout_s` the
    wait raises TimeoutError, which the gateway's endpoints answer with 503
    database_unavailable."""

    __slots__ = ("_acquire_timeout_s",)

    def __init__(self, *args, acquire_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._acquire_timeout_s = acquire_timeout_s

    def acquire(self, *, timeout: float | None = None):
        return super().acquire(timeout=self._acquire_timeout_s if timeout is None else timeout)


async def create_pool(dsn: str, min_size: int, max_size: int,
                      acquire_timeout_s: float = 5.0, synchronous_commit: str = "on",
                      pooler: str = "none") -> Pool:
    """A pool of the process's (app.py makes two: the audit lanes' connections, set apart,
    and one for everything else). Small on purpose: the audit writer batches, and requests
    touch the database only for contracts changes and admin calls. asyncpg.create_pool
    takes no pool class, so its defaults are restated here. Every connection commits at
    `synchronous_commit` whatever the server's default (a server set to `off` would lose
    the rows of answered requests in a crash).

    Through a transaction-mode pooler (`pooler="transaction"`, PgBouncer), a connection is
    a different server session from one transaction to the next, so nothing may rest on the
    session: no setting is sent at connection start (PgBouncer refuses them; the server's or
    the role's own `synchronous_commit` is then what commits by, and the writer's
    durability check refuses readiness when it is weaker than `on`), and no prepared
    statement is kept (asyncpg's statement cache off: PgBouncer 1.18, Debian 12's, cannot
    route named prepared statements; asyncpg's unnamed ones are parsed and executed in one
    exchange, never split by a Sync the pooler could switch servers at)."""
    pooled = pooler == "transaction"
    return await Pool(dsn, min_size=min_size, max_size=max_size, max_queries=50_000,
                      max_inactive_connection_lifetime=300.0, loop=None, connect=connect,
                      connection_class=asyncpg.Connection, record_class=asyncpg.Record,
                      command_timeout=10, acquire_timeout_s=acquire_timeout_s,
                      statement_cache_size=0 if pooled else 100,
                      server_settings={} if pooled else {"synchronous_commit": synchronous_commit})


async def durability_problems(conn: asyncpg.Connection, session: bool = True) -> list[str]:
    """What makes the server's commits less than durable (fsync or full_page_writes off;
    with `session`, this connection's synchronous_commit below on, which the gateway's own
    connections never are); empty when nothing does."""
    found = await conn.fetchrow(query("database_durability"))
    problems = [f"{name}=off" for name in ("fsync", "full_page_writes") if found[name] == "off"]
    if session and found["synchronous_commit"] not in ("on", "remote_apply"):
        problems.append(f"synchronous_commit={found['synchronous_commit']}")
    return problems


def migrations(sql_dir: Path = SQL_DIR) -> list[tuple[int, str, str]]:
    """(version, name, sql) of every numbered migration file, in order."""
    found = []
    for path in sorted(sql_dir.iterdir()):
        m = _MIGRATION.match(path.name)
        if m:
            found.append((int(m.group(1)), path.name, path.read_text(encoding="utf-8")))
    return found


async def migrate(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction; return their names."""
    await conn.execute(
        "create table if not exists schema_migrations ("
        " version integer primary key, name text not null,"
        " applied_at timestamptz not null default now())"
    )
    applied = []
    for version, name, sql in migrations(sql_dir):
        async with conn.transaction():
            await conn.execute("select pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            done = await conn.fetchval(
                "select 1 from schema_migrations where version = $1", version)
            if done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "insert into schema_migrations (version, name) values ($1, $2)", version, name)
            applied.append(name)
            log.info("applied migration %s", name)
    return applied


@cache
def query(name: str) -> str:
    """A named query from sql/queries.sql."""
    text = (SQL_DIR / "queries.sql").read_text(encoding="utf-8")
    for block in re.split(r"^-- name: ", text, flags=re.M)[1:]:
        qname, _, body = block.partition("\n")
        if qname.strip() == name:
            return body.strip().rstrip(";")
    raise KeyError(f"no query named {name!r} in sql/queries.sql")


async def pending_migrations(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    """The migration files not recorded in schema_migrations (all of them on an empty database)."""
    try:
        recorded = {r["version"] for r in await conn.fetch(query("recorded_migrations"))}
    except asyncpg.UndefinedTableError:
        recorded = set()
    return [name for version, name, _ in migrations(sql_dir) if version not in recorded]


async def missing_partitions(conn: asyncpg.Connection,
                             months: int = PARTITION_MONTHS_REQUIRED) -> list[str]:
    """The audit partitions of this month and the `months` after it that do not exist."""
    return [r["partition"] for r in await conn.fetch(query("audit_partition_months"), months)
            if not r["present"]]


@dataclass
class PartitionReport:
    created: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    # months whose rows already sit in audit_log_default: PostgreSQL refuses a partition
    # that would take them, so they stay where they are (still chained, still verified)
    blocked: list[str] = field(default_factory=list)


async def ensure_partitions(conn: asyncpg.Connection,
                            months: int = PARTITION_MONTHS_AHEAD) -> PartitionReport:
    """Create the audit partitions of this month and the `months` after it (as the owner)."""
    report = PartitionReport()
    for r in await conn.fetch(query("audit_partition_months"), months):
        if r["present"]:
            report.present.append(r["partition"])
            continue
        try:
            await with_lock_retries(conn, lambda m=r["month"]: _create_partition(conn, m))
        except asyncpg.CheckViolationError:
            report.blocked.append(r["partition"])
        else:
            report.created.append(r["partition"])
            log.info("created audit partition %s", r["partition"])
    return report


async def _create_partition(conn: asyncpg.Connection, month) -> None:
    async with conn.transaction():
        await conn.execute(query("partition_lock_timeout"))
        await conn.execute("select pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(query("ensure_audit_partition"), month)


async def with_lock_retries(conn: asyncpg.Connection, job):
    """Run job() (a transaction that sets a short lock_timeout), again while a lock is busy."""
    for attempt in range(_LOCK_TRIES):
        try:
            return await job()
        except asyncpg.LockNotAvailableError:
            if attempt == _LOCK_TRIES - 1:
                raise
            log.warning("audit_log is busy; trying again")
            await asyncio.sleep(0.5 * (attempt + 1))


async def grant_runtime(conn: asyncpg.Connection, role: str, sql_dir: Path = SQL_DIR) -> None:
    """Give `role` what `gateway serve --no-migrate` needs (sql/runtime_grants.sql), as the owner."""
    sql = (sql_dir / RUNTIME_GRANTS).read_text(encoding="utf-8")
    async with conn.transaction():
        await conn.execute(query("set_runtime_role"), role)
        await conn.execute(sql)
