"""`gateway check`: the effective configuration without secrets, then one line per finding;
exit 0 when nothing stops `serve`, 2 otherwise."""

from __future__ import annotations

import asyncio
import re
import shutil

import asyncpg

from gateway.check import runtime_privileges
from gateway.db import SQL_DIR

from .conftest import POLICY_DIR, SECRET, connected, free_port, gateway_main, own_database, serve_env
from .roles import drop_last_migration, gateway_cli, migrated_with_grants, two_roles


async def check(env: dict[str, str]):
    """`gateway check` in this process (in a thread: the backends it asks answer on this
    loop), with env's GATEWAY_* variables; the first test runs it as a process of its own."""
    return await asyncio.to_thread(gateway_main, "check", env={
        k: v for k, v in env.items() if k.startswith("GATEWAY_")})


async def test_a_good_setup_passes_and_prints_no_secret(database_url, backends, tmp_path):
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        done = await gateway_cli("check", env=serve_env(backends, roles.runtime_dsn, tmp_path,
                                                        free_port()))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert SECRET not in out and roles.password not in out
    assert "jwt_secret = (set, hidden)" in out and f"{roles.runtime}:***@" in out
    for line in ("ok: settings", f"role {roles.runtime} holds the runtime grants",
                 "ok: backend telephony answers", "ok: backend meeting answers",
                 "database commits are durable", "0 problems, 0 warnings"):
        assert line in out
    assert re.search(r"ok: database connections: 13 = 13 a process \(GATEWAY_DB_POOL_MAX 12 "
                     r"\+ 1 listener\) × 1 workers \(--workers\) × 1 pods \(--pods\); "
                     r"max_connections \d+, \d+ reserved for superusers: \d+ for the gateway",
                     out), out


async def test_a_deployment_with_more_connections_than_the_server_allows_is_a_problem(
        database_url, template_database, backends, tmp_path):
    """`check --workers W --pods P` sizes the deployment's connections: W × P processes of
    GATEWAY_DB_POOL_MAX + 1 (its listener) each, against max_connections less the slots
    reserved for superusers: the most processes that fit pass, a process or two more is a
    problem; behind a transaction pooler only the listeners count."""
    async with own_database(database_url, template_database) as dsn, connected(dsn) as conn:
        limits = await conn.fetchrow("select current_setting('max_connections')::int as m, "
                                     "current_setting('superuser_reserved_connections')::int "
                                     "+ coalesce(current_setting('reserved_connections', true)"
                                     "::int, 0) as r")
        available = limits["m"] - limits["r"]
        env = {k: v for k, v in serve_env(backends, dsn, tmp_path, free_port(),
                                          GATEWAY_DB_POOL_MAX="4").items()
               if k.startswith("GATEWAY_")}
        pods = available // 5                              # 5 connections a process
        fits = await asyncio.to_thread(gateway_main, "check", "--pods", str(pods), env=env)
        assert fits.returncode == 0, fits.stdout
        assert (f"ok: database connections: {pods * 5} = 5 a process (GATEWAY_DB_POOL_MAX 4 + 1 "
                f"listener) × 1 workers (--workers) × {pods} pods (--pods); max_connections "
                f"{limits['m']}, {limits['r']} reserved for superusers: {available} for the "
                "gateway") in fits.stdout.splitlines(), fits.stdout
        over = await asyncio.to_thread(gateway_main, "check", "--workers", "2", "--pods",
                                       str(pods // 2 + 1), env=env)
        assert over.returncode == 2
        assert any(line.startswith(f"problem: database connections: {(pods // 2 + 1) * 10} = ")
                   and line.endswith("too few; raise max_connections, lower GATEWAY_DB_POOL_MAX "
                                     "or put a transaction pooler in front (docs/scale.md)")
                   for line in over.stdout.splitlines()), over.stdout
        pooled = await asyncio.to_thread(gateway_main, "check", "--pods", str(available), env={
            **env, "GATEWAY_DATABASE_POOLER": "transaction", "GATEWAY_DATABASE_LISTEN_URL":
            dsn})
        assert f"ok: database connections: {available} listeners (1 workers (--workers) × " \
            f"{available} pods (--pods)) straight to PostgreSQL" in pooled.stdout, pooled.stdout
        bad = await asyncio.to_thread(gateway_main, "check", "--workers", "0", env=env)
        assert bad.returncode == 2 and "--workers: must be a whole number of at least 1" \
            in bad.stderr, bad.stderr


async def test_a_policy_that_breaks_a_floor_is_a_problem(database_url, backends, tmp_path):
    policy = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, policy)
    with open(policy / "policy.csv", "a") as f:
        f.write("p, provider_staff, any, voicemails, read\n")
    done = await check(serve_env(backends, database_url, tmp_path, free_port(),
                                 GATEWAY_POLICY_DIR=str(policy)))
    assert done.returncode == 2
    assert any(line.startswith(f"problem: policy {policy}") and "provider_staff" in line
               for line in done.stdout.splitlines()), done.stdout


async def test_an_unreadable_policy_dir_is_a_problem(database_url, backends, tmp_path):
    done = await check(serve_env(backends, database_url, tmp_path, free_port(),
                                 GATEWAY_POLICY_DIR=str(tmp_path / "none")))
    assert done.returncode == 2
    assert f"problem: policy file {tmp_path / 'none' / 'routes.yaml'} is not readable" \
        in done.stdout.splitlines()


async def test_an_unreachable_database_is_a_problem_and_its_password_stays_hidden(
        backends, tmp_path):
    dsn = f"postgresql://gw:hunter2-password@127.0.0.1:{free_port()}/gateway"
    done = await check(serve_env(backends, dsn, tmp_path, free_port(),
                                 GATEWAY_DB_CONNECT_TIMEOUT_S="0.1"))
    assert done.returncode == 2
    assert any(line.startswith("problem: the database is not reachable after 0.1 s")
               for line in done.stdout.splitlines()), done.stdout
    assert "hunter2" not in done.stdout + done.stderr
    assert "database_url = postgresql://gw:***@127.0.0.1" in done.stdout


async def test_a_missing_migration_is_a_problem(database_url, backends, tmp_path):
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        last = await drop_last_migration(roles)
        done = await check(serve_env(backends, roles.owner_dsn, tmp_path,
                                     free_port()))
    assert done.returncode == 2
    assert (f"problem: the database schema is not current ({last} not applied): run `gateway "
            "migrate` as the schema's owner") in done.stdout.splitlines()


async def test_a_runtime_role_without_its_grants_is_a_problem(database_url, backends, tmp_path):
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        owner = await asyncpg.connect(roles.owner_dsn)
        try:
            await owner.execute(f'revoke delete on contracts from "{roles.runtime}"')
        finally:
            await owner.close()
        done = await check(serve_env(backends, roles.runtime_dsn, tmp_path,
                                     free_port()))
    assert done.returncode == 2
    assert (f"problem: role {roles.runtime} lacks DELETE on contracts: run `gateway grant "
            f"--role {roles.runtime}` as the schema's owner") in done.stdout.splitlines()


def test_every_table_the_migrations_create_is_granted_to_the_runtime_role_and_checked():
    """`gateway check` reads its list from runtime_grants.sql: a table a migration adds and
    the grants forget is caught here, before a runtime role fails on it in production."""
    created = set()
    for migration in sorted(SQL_DIR.glob("[0-9][0-9][0-9]_*.sql")):
        # a partition is read and written through its parent's grants
        created |= set(re.findall(r"^create table (\w+)(?! partition of)\b", migration.read_text(),
                                  re.M))
    checked = {table for table, privileges in runtime_privileges() if "SELECT" in privileges}
    assert created and created <= checked, sorted(created - checked)
