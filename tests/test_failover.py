"""Failover: the gateway behind a multi-host DSN (`target_session_attrs=read-write`) fails
closed while no host is writable and serves again on its own once one is."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from .conftest import call, gateway_settings, own_database, running_gateway, wait_for


async def test_while_no_host_is_writable_the_api_fails_closed_and_serves_again(
        backends, database_url, template_database, http, token_for):
    """The database turns read-only for new sessions (as a demoted primary is) and the
    gateway's connections end: each audit query is 503 database_unavailable, never 502
    internal_error (asyncpg's "none of the hosts match" is a database out of reach, not a
    bug); once the database is writable again the same gateway answers 200."""
    async with own_database(database_url, template_database) as dsn:
        parts = urlsplit(dsn)
        name = parts.path.lstrip("/")
        multi_host = urlunsplit(parts._replace(query="&".join(
            q for q in (parts.query, "target_session_attrs=read-write") if q)))
        # one lane: the row of each refused call still commits on the lane's connection
        settings = gateway_settings(backends["urls"], audit_lanes=1)
        async with running_gateway(settings, multi_host) as gw:
            async def audit_query():
                return await call(http, "GET", gw + "/v1/audit", token_for("staff"),
                                  params={"limit": "1"})
            assert (await audit_query())[0] == 200
            admin = await asyncpg.connect(database_url)
            try:
                await admin.execute(f'alter database "{name}" set default_transaction_read_only = on')
                # every connection of the gateway's pool ends (a switchover closes them all);
                # the lane's and the listeners' stay, so the refusals are audited and served
                await admin.execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity where datname = $1 "
                    "and query not like '%audit_append%' "
                    "and application_name not like 'gateway listener%'", name)
                answers = [await audit_query() for _ in range(4)]
                codes = [(status, orjson.loads(body)["error"]["code"])
                         for status, _, body in answers]
                assert set(codes) == {(503, "database_unavailable")}, codes
            finally:
                await admin.execute(f'alter database "{name}" reset default_transaction_read_only')
                await admin.close()

            async def served():
                return (await audit_query())[0] == 200
            assert await wait_for(served, timeout=10)
