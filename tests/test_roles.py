"""Two database roles: the owner migrates (`gateway migrate`, `gateway grant`, `gateway
audit maintain`); `gateway serve --no-migrate` runs as a role that may create nothing, and
every request, contract change and data-subject request still works and is audited."""

from __future__ import annotations

import asyncpg
import orjson

from .conftest import call, free_port, gateway_process, serve_env, wait_for
from .roles import (
    as_role,
    drop_last_migration,
    gateway_cli,
    gateway_run,
    migrated_with_grants,
    two_roles,
)
from .test_webhooks import receiving, secret_file

ALICE = "/telephony/euos/euo-acme/users/u-alice"


async def test_the_runtime_role_serves_audits_and_changes_contracts_and_requests(
        database_url, backends, http, token_for, tmp_path):
    async with two_roles(database_url) as roles, receiving() as (receiver, hook_url):
        await migrated_with_grants(roles, process=True)
        async with gateway_process(http, backends, roles.runtime_dsn, tmp_path,
                                   "--no-migrate", GATEWAY_WEBHOOK_URL=hook_url,
                                   GATEWAY_WEBHOOK_SECRET_FILE=str(secret_file(tmp_path))
                                   ) as (_, base):
            status, _, _ = await call(http, "PUT", base + "/v1/admin/euos/euo-acme",
                                      token_for("staff"), json={"partner_id": "p-northwind",
                                                                "contract_end": None})
            assert status == 200
            status, headers, _ = await call(http, "GET", base + ALICE, token_for("alice"))
            assert status == 200
            request_id = headers["X-Request-Id"]
            status, _, body = await call(http, "POST", base + "/v1/me/requests", token_for("alice"),
                                         json={"type": "rectification",
                                               "data_sets": ["user_address"],
                                               "detail": "new street"})
            assert status == 201
            filed = orjson.loads(body)["id"]
            # transitions, the outbox and the delivery log are the runtime role's to write
            status, _, _ = await call(http, "PATCH", f"{base}/v1/me/requests/{filed}",
                                      token_for("alice"), json={"status": "withdrawn"})
            assert status == 200

            async def told():
                return {e["event"] for e in receiver.about(filed)} == {"request.filed",
                                                                      "request.resolved"}
            assert await wait_for(told, timeout=10)
            logged = await asyncpg.connect(roles.owner_dsn)
            try:
                async def delivered():
                    return await logged.fetchval(
                        "select count(*) from webhook_outbox o join webhook_deliveries d on "
                        "d.outbox_id = o.id where o.delivered_at is not null") == 2
                assert await wait_for(delivered)
            finally:
                await logged.close()
            status, _, body = await call(http, "GET", base + "/v1/audit/verify", token_for("staff"))
            assert status == 200 and orjson.loads(body)["ok"] is True
            status, _, body = await call(http, "GET", base + "/readyz")
            assert status == 200 and "warnings" not in orjson.loads(body)

        owner = await asyncpg.connect(roles.owner_dsn)
        try:
            row = await owner.fetchrow("select decision, subject_users from audit_log "
                                       "where request_id = $1", request_id)
            history = await owner.fetchval("select count(*) from contract_history "
                                           "where euo_id = 'euo-acme'")
            requests = await owner.fetchval("select count(*) from dsr_requests")
            ddl_by_runtime = await owner.fetchval(
                "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                "where n.nspname = 'public' and pg_get_userbyid(c.relowner) = $1", roles.runtime)
        finally:
            await owner.close()
        assert (row["decision"], row["subject_users"]) == ("allow", ["u-alice"])
        assert history == 1 and requests == 1
        assert ddl_by_runtime == 0


async def test_serve_as_the_runtime_role_refuses_to_migrate_with_one_line(
        database_url, backends, tmp_path):
    """Without --no-migrate the runtime role would need DDL: serve says so and exits 2."""
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        env = serve_env(backends, roles.runtime_dsn, tmp_path, free_port())
        done = await gateway_cli("serve", env=env, timeout=60)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert f"role {roles.runtime} may not migrate" in line and "--no-migrate" in line
    assert "Traceback" not in done.stderr and roles.password not in done.stderr


async def test_serve_no_migrate_refuses_a_schema_that_is_not_current(database_url, backends,
                                                                      tmp_path):
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        last = await drop_last_migration(roles)
        env = serve_env(backends, roles.runtime_dsn, tmp_path, free_port())
        done = await gateway_cli("serve", "--no-migrate", env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"gateway: the database schema is not current ({last} not applied): run `gateway "
        "migrate` as the schema's owner")


async def test_without_this_months_partition_rows_land_in_the_default_one_and_verify(
        database_url, backends, http, token_for, tmp_path):
    """The request path never creates a partition: a missing month sends rows to
    audit_log_default, readiness and `gateway check` warn, the chains still verify, and
    `gateway audit maintain` says why it cannot create that month's partition."""
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        owner = await asyncpg.connect(roles.owner_dsn)
        try:
            month = await owner.fetchval("select to_char(now(), '\"audit_log_y\"YYYY\"m\"MM')")
            await owner.execute(f'drop table "{month}"')
            async with gateway_process(http, backends, roles.runtime_dsn, tmp_path,
                                       "--no-migrate") as (_, base):
                status, headers, _ = await call(http, "GET", base + ALICE, token_for("alice"))
                assert status == 200
                status, _, body = await call(http, "GET", base + "/readyz")
                assert status == 200
                assert orjson.loads(body)["warnings"] == [f"audit_partition_missing:{month}"]
            where = await owner.fetchval("select tableoid::regclass::text from audit_log "
                                         "where request_id = $1", headers["X-Request-Id"])
            assert where == "audit_log_default"

            check = await gateway_run("check", env=serve_env(backends, roles.runtime_dsn,
                                                             tmp_path, free_port()))
            assert check.returncode == 0, check.stdout
            assert f"warning: audit partitions missing: {month}" in check.stdout
            verify = await gateway_run("audit", "verify", env=as_role(roles.runtime_dsn))
            assert verify.returncode == 0 and orjson.loads(verify.stdout)["ok"] is True

            maintain = await gateway_run("audit", "maintain", env=as_role(roles.owner_dsn))
            assert maintain.returncode == 1
            assert f"could not create {month}: audit_log_default already holds rows" \
                in maintain.stdout
        finally:
            await owner.close()


async def test_maintain_creates_the_partitions_ahead_and_prunes_and_the_runtime_role_cannot(
        database_url):
    async with two_roles(database_url) as roles:
        await migrated_with_grants(roles)
        owner = await asyncpg.connect(roles.owner_dsn)
        try:
            await owner.execute("select audit_ensure_partition('2020-03-01')")
            last = await owner.fetchval(
                "select to_char(now() + interval '3 months', '\"audit_log_y\"YYYY\"m\"MM')")
            await owner.execute(f'drop table "{last}"')
        finally:
            await owner.close()
        refused = await gateway_run("audit", "maintain", env=as_role(roles.runtime_dsn))
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "run it as the schema's owner" in refused.stderr
        done = await gateway_run("audit", "maintain", env=as_role(roles.owner_dsn))
        assert done.returncode == 0, done.stderr
        assert "dropped audit_log_y2020m03" in done.stdout
        assert f"created {last}" in done.stdout and done.stdout.count("created") == 1
        again = await gateway_run("audit", "maintain", env=as_role(roles.owner_dsn))
        assert again.returncode == 0 and "created" not in again.stdout
