"""PostgreSQL: the embedded server, the pool, forward-only migrations and named queries."""

from __future__ import annotations

import asyncio
import logging
import re
from functools import cache
from pathlib import Path

import asyncpg
from aiohttp import web

from .settings import SQL_DIR

log = logging.getLogger("gateway.db")

_MIGRATION = re.compile(r"^(\d{3})_[\w-]+\.sql$")
MIGRATION_LOCK = 0x6761_7465
POOL = web.AppKey("pool", asyncpg.Pool)  # an advisory lock id: one migrating process at a time


class DatabaseUnavailable(Exception):
    """The database could not be reached or started; the message is one line for an operator."""


class EmbeddedPostgres:
    """A PostgreSQL server under data_dir/pgdata, from the pgserver wheel."""

    def __init__(self, data_dir: Path):
        self.pgdata = Path(data_dir).resolve() / "pgdata"
        self._server = None

    def start(self) -> str:
        """Start (or reuse) the server and return its DSN."""
        import pgserver  # imported late: serving with GATEWAY_DATABASE_URL never needs it

        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        return self._server.get_uri()

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


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
            conn = await asyncpg.connect(dsn, timeout=min(max(remaining, 1.0), 10.0))
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


async def create_pool(dsn: str, min_size: int, max_size: int) -> asyncpg.Pool:
    """The process's one pool. Small on purpose: the audit writer batches, and requests
    touch the database only for contracts changes and admin calls."""
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size,
                                     command_timeout=10)


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
