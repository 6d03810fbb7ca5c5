"""Audit, first version: one row per request, allowed or denied, committed before any
personal data leaves; a database outage means 503 and no data, then recovery."""

from __future__ import annotations

import asyncio

import orjson

from gateway.db import EmbeddedPostgres
from gateway.demo.run import seed_contracts

from .conftest import call, gateway_settings, running_gateway, wait_for


async def test_an_allowed_read_is_committed_with_what_it_served_and_removed(gateway, http, db,
                                                                           token_for):
    status, headers, _ = await call(http, "GET", gateway + "/telephony/euos/euo-acme/users/u-alice",
                                    token_for("partner"))
    assert status == 200
    # the response was sent after its row was committed: no waiting needed
    row = await db.fetchrow("select * from audit_log where request_id = $1", headers["X-Request-Id"])
    assert row["decision"] == "allow" and row["status"] == 200 and row["reason"] is None
    assert (row["actor_sub"], row["actor_role"], row["actor_partner"]) == (
        "pat@northwind", "partner", "p-northwind")
    assert row["route"] == "telephony:/euos/{euo}/users/{user}"
    assert row["subject_euo"] == "euo-acme" and row["subject_users"] == ["u-alice"]
    assert "user_mobile" in row["data_sets"] and "personal_directory" not in row["data_sets"]
    assert row["fields_removed"] == ["personal_directory"]
    assert row["bytes"] > 0 and row["client_addr"] == "127.0.0.1"


async def test_a_denial_is_recorded_with_its_reason(gateway, http, db, token_for):
    status, headers, _ = await call(http, "GET",
                                    gateway + "/telephony/euos/euo-acme/users/u-alice/voicemails",
                                    token_for("staff"))
    assert status == 403

    async def row():
        return await db.fetchrow("select * from audit_log where request_id = $1",
                                 headers["X-Request-Id"])
    found = await wait_for(row)
    assert found["decision"] == "deny" and found["reason"] == "dataset_not_permitted"
    assert found["status"] == 403 and found["data_sets"] == []


async def test_list_answers_record_every_data_subject(gateway, http, db, token_for):
    _, headers, _ = await call(http, "GET", gateway + "/telephony/euos/euo-acme/cdrs",
                               token_for("admin"))
    row = await db.fetchrow("select subject_users from audit_log where request_id = $1",
                            headers["X-Request-Id"])
    assert set(row["subject_users"]) == {"u-alice", "u-bob", "u-carla"}


async def test_audit_rows_cannot_be_changed(db):
    import asyncpg
    import pytest
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("update audit_log set status = 200 where id = (select min(id) from audit_log)")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("delete from audit_log")


async def test_database_outage_fails_closed_and_recovers(backends, http, token_for, demo,
                                                         tmp_path):
    """With the database down no personal data is served (503 audit_unavailable); when it
    returns the gateway serves again by itself."""
    server = EmbeddedPostgres(tmp_path)
    dsn = server.start()
    try:
        await seed_contracts(dsn, demo)
        async with running_gateway(gateway_settings(backends["urls"]), dsn) as gw:
            url = gw + "/telephony/euos/euo-acme/users/u-alice"
            assert (await call(http, "GET", url, token_for("alice")))[0] == 200
            await asyncio.to_thread(server.stop)
            status, _, body = await call(http, "GET", url, token_for("alice"))
            assert status == 503
            assert orjson.loads(body)["error"]["code"] == "audit_unavailable"
            assert b"Alice" not in body
            status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-acme",
                                         token_for("partner"))
            assert status == 503 and b"Acme" not in body
            await asyncio.to_thread(server.start)

            async def served():
                return (await call(http, "GET", url, token_for("alice")))[0] == 200
            assert await wait_for(served, timeout=10)
    finally:
        await asyncio.to_thread(server.stop)
