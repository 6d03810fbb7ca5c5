"""One clock: the database's. A host clock set or stepped wrong (libfaketime in the gateway's
process alone, tests/clocks.py) changes no decision: retention is counted, partitions are
dropped, contracts end and tokens expire by the database's time; the gateway says its clock
is off (`/readyz` 503 `clock_skew`) and `gateway audit maintain` drops nothing."""

from __future__ import annotations

import asyncpg
import orjson

from gateway.demo.run import seed_contracts

from .clocks import faked_clock_env, step
from .conftest import call, gateway_process, wait_for
from .roles import as_role, gateway_cli, gateway_run, migrated_with_grants, two_roles

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
        done = await gateway_run("audit", "maintain", env=as_role(
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


async def test_a_host_clock_stepped_back_two_days_changes_no_decision(
        database_url, demo, backends, http, token_for, tmp_path):
    """With the host's clock stepped back two days under a running gateway, a contract that
    ended today (by the database's date) still refuses its partner (403) and withholds what
    is kept only until the contract's end, and a token that expired an hour ago is still
    refused (401 token_expired): all are decided by the database's clock. The gateway says
    its clock is off: `/readyz` 503 `clock_skew`, and ready again once it is set right."""
    clock = tmp_path / "clock"
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        await seed_contracts(roles.owner_dsn, demo)
        async with gateway_process(http, backends, roles.owner_dsn, tmp_path,
                                   **faked_clock_env(clock, "+0")) as (_, base):
            today = await database_date(roles.owner_dsn)
            status, _, _ = await call(http, "PUT", base + "/v1/admin/euos/euo-globex",
                                      token_for("staff"), json={
                                          "partner_id": "p-northwind",
                                          "contract_end": today.isoformat()})
            assert status == 200
            partner = token_for("partner", iat=None)
            expired = token_for("staff", ttl=-3600, iat=None)
            step(clock, "-2d")

            async def skewed():
                status, _, body = await call(http, "GET", base + "/readyz")
                return status == 503 and "clock_skew" in orjson.loads(body)["reasons"]
            assert await wait_for(skewed, timeout=10)

            status, _, body = await call(http, "GET", base + "/telephony/euos/euo-globex",
                                         partner)
            assert (status, orjson.loads(body)["error"]["code"]) == (403, "no_active_contract")
            status, _, body = await call(http, "GET", base + "/telephony/euos/euo-globex",
                                         expired)
            assert (status, orjson.loads(body)["error"]["code"]) == (401, "token_expired")
            status, _, _ = await call(http, "GET", base + "/telephony/euos/euo-acme", partner)
            assert status == 200                  # a contract still running still serves
            # the company directory is kept until the contract's end (retention): gone today
            admin = token_for(role="euo_admin", sub="admin@globex", euo="euo-globex", iat=None)
            status, _, body = await call(http, "GET", base + "/telephony/euos/euo-globex/directory",
                                         admin)
            assert status == 200 and not orjson.loads(body).get("entries"), body

            step(clock, "+0")

            async def ready():
                return (await call(http, "GET", base + "/readyz"))[0] == 200
            assert await wait_for(ready, timeout=10)


async def database_date(dsn: str):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("select (now() at time zone 'utc')::date")
    finally:
        await conn.close()
