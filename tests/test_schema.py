"""sql/schema.sql is the schema the migrations make (procrastinate's pattern): one file to
read the whole database from, kept equal to sql/0NN_*.sql by this test.

After adding a migration, write it again:

    .venv/bin/python -m tests.test_schema
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pgserver

from gateway.db import migrate
from gateway.embedded import EmbeddedPostgres
from gateway.settings import SQL_DIR

from .conftest import _on_database

SNAPSHOT = Path(__file__).parent.parent / "sql" / "schema.sql"
PG_DUMP = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
HEADER = ("-- The schema sql/0NN_*.sql make, in order (tests/test_schema.py keeps this equal to them;\n"
          "-- `python -m tests.test_schema` writes it again). Read it; never run it: the migrations\n"
          "-- are what `gateway migrate` applies. The month partitions of audit_log\n"
          "-- (audit_log_yYYYYmMM, made for the months ahead by `gateway migrate` and\n"
          "-- `gateway audit maintain`) are left out: which ones exist depends on the day.\n")


def dump(dsn: str) -> str:
    """The schema of the database at `dsn`, as pg_dump prints it, without its noise."""
    parts = urlsplit(dsn)
    host = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("host", "")
    done = subprocess.run(
        [str(PG_DUMP), "--schema-only", "--no-owner", "--no-privileges", "--no-comments",
         "-h", host or parts.hostname or "", "-p", str(parts.port or 5432),
         "-U", parts.username or "postgres", parts.path.lstrip("/")],
        capture_output=True, text=True, check=True)
    lines = [line for line in done.stdout.splitlines()
             if not line.startswith(("--", "SET ", "SELECT pg_catalog.set_config"))
             and not re.match(r"\\(un)?restrict ", line)]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"
    return HEADER + "\n" + text


async def migrated_dump(database_url: str) -> str:
    name = f"schema_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'create database "{name}"')
        try:
            dsn = _on_database(database_url, name)
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn, SQL_DIR)
                # the months ahead: which ones depends on the day it runs, not on the schema
                for (month,) in await conn.fetch(
                        "select relname from pg_class where relkind = 'r' "
                        "and relname ~ '^audit_log_y[0-9]{4}m[0-9]{2}$'"):
                    await conn.execute(f'drop table "{month}"')
            finally:
                await conn.close()
            return await asyncio.to_thread(dump, dsn)
        finally:
            await admin.execute(f'drop database "{name}" with (force)')
    finally:
        await admin.close()


async def test_the_migrations_make_the_schema_snapshot(database_url):
    """sql/schema.sql is what the migrations make (write it again: python -m tests.test_schema)."""
    made = await migrated_dump(database_url)
    assert made == SNAPSHOT.read_text(encoding="utf-8"), (
        "sql/schema.sql differs from what the migrations make: "
        "run `.venv/bin/python -m tests.test_schema` and read the diff")


def main() -> None:
    with tempfile.TemporaryDirectory() as where:
        server = EmbeddedPostgres(Path(where))
        try:
            SNAPSHOT.write_text(asyncio.run(migrated_dump(server.start())), encoding="utf-8")
        finally:
            server.stop()
    print(f"wrote {SNAPSHOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
