"""One clock: the database's. A host clock set or stepped wrong (libfaketime in the gateway's
process alone, tests/clocks.py) changes no decision: retention is counted, partitions are
dropped, contracts end and tokens expire by the database's time; the gateway says its clock
is off (`/readyz` 503 `clock_skew`) and `gateway audit maintain` drops nothing."""

from __future__ import annotations

import asyncpg

from .clocks import faked_clock_env
from .roles import as_role, gateway_cli, migrated_with_grants, two_roles

MONTH = "to_char(now() - make_interval(months => $1), '\"audit_log_y\"YYYY\"m\"MM')"


async def partitions(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["relname"] for r in await conn.fetch(
            "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid "
            "where i.inhparent = 'audit_log'::regclass and c.relname <> 'audit_log_default'")}
    finally:
        await conn.close()


async def with_months_before(dsn: str, *months: int) -> list[str]:
    """The partitions of these months before this one, created; their names."""
    conn = await asyncpg.connect(dsn)
    try:
        names = []
        for m in months:
            await conn.execute("select audit_ensure_partition("
                               "(now() - make_interval(months => $1))::date)", m)
            names.append(await conn.fetchval(f"select {MONTH}", m))
        return names
    finally:
        await conn.close()


async def test_maintain_with_the_host_clock_800_days_ahead_drops_nothing_and_says_why(
        database_url, tmp_path):
    """With the host's clock 800 days ahead, a 400-day retention counted on it would drop
    every partition, this month's included. Counted by the database's clock it drops none of
    them, and with the clocks this far apart it refuses to drop anything, exit 2."""
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        await with_months_before(roles.owner_dsn, 1, 2)
        before = await partitions(roles.owner_dsn)
        done = await gateway_cli("audit", "maintain", env=as_role(
            roles.owner_dsn, **faked_clock_env(tmp_path / "clock", "+800d")))
        assert done.returncode == 2, done.stdout + done.stderr
        assert "refusing to drop any partition: this host's clock is" in done.stderr
        assert "ahead of the database's" in done.stderr
        assert "dropped" not in done.stdout
        assert await partitions(roles.owner_dsn) == before


async def test_maintain_never_drops_this_or_last_month(database_url):
    """Even a retention of one day keeps this month's and last month's partitions (by the
    database's clock); the month before them goes."""
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        last, before_last = await with_months_before(roles.owner_dsn, 1, 2)
        done = await gateway_cli("audit", "maintain", env=as_role(
            roles.owner_dsn, GATEWAY_AUDIT_RETENTION_DAYS="1"))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"dropped {before_last}" in done.stdout
        left = await partitions(roles.owner_dsn)
        assert last in left and before_last not in left
        conn = await asyncpg.connect(roles.owner_dsn)
        try:
            assert await conn.fetchval(f"select {MONTH}", 0) in left
        finally:
            await conn.close()
