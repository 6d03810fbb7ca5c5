"""Who sees what in the audit log: refusals without a token are counted, not written one
row each; other organisations' actors are shown by role and organisation only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import orjson

from .conftest import call, gateway_settings, running_gateway

PATH = "/telephony/euos/euo-acme/users/u-alice"


async def test_a_flood_without_tokens_becomes_one_counted_row(backends, database_url, http, db,
                                                              token_for):
    async with running_gateway(gateway_settings(backends["urls"]), database_url) as gw:
        _, _, body = await call(http, "GET", gw + "/v1/catalog", token_for("staff"))
        version = orjson.loads(body)["policy_version"]
        ids = []
        for _ in range(300):
            status, headers, _ = await call(http, "GET", gw + PATH)
            assert status == 401
            ids.append(headers["X-Request-Id"])
        status, headers, _ = await call(http, "GET", gw + PATH, "forged.token.here")
        assert status == 401
        ids.append(headers["X-Request-Id"])
    # no row per request ...
    assert await db.fetchval("select count(*) from audit_log where request_id = any($1::text[])",
                             ids) == 0
    # ... one row per source, minute and reason, with the count, flushed at shutdown
    rows = await db.fetch("select reason, requests, subject_users, status, policy_version"
                          " from audit_log"
                          " where route = 'gateway:unauthenticated' and at > now() - interval '3 minutes'"
                          " and reason in ('missing_token', 'malformed_token')")
    counts = {}
    for r in rows:
        counts[r["reason"]] = counts.get(r["reason"], 0) + r["requests"]
        assert r["subject_users"] == [] and r["status"] == 401
        assert r["policy_version"] == version      # a counted row names the policy too
    assert counts["missing_token"] >= 300 and counts["malformed_token"] >= 1


async def test_the_users_access_log_shows_no_unauthenticated_noise(gateway, http, token_for):
    for _ in range(20):
        await call(http, "GET", gateway + PATH)
    _, _, body = await call(http, "GET", gateway + "/v1/me/access-log", token_for("alice"))
    assert all(a["accessor"]["role"] is not None for a in orjson.loads(body)["accesses"])


async def test_partners_see_staff_by_role_only(gateway, http, token_for):
    """A partner reading the audit of its EUO sees that provider staff accessed it, not who."""
    status, _, _ = await call(http, "GET", gateway + PATH, token_for("staff"))
    assert status == 200
    for caller in ("partner", "admin"):
        _, _, body = await call(http, "GET", gateway + "/v1/audit", token_for(caller),
                                params={"euo": "euo-acme", "limit": "1000"})
        rows = orjson.loads(body)["rows"]
        staff_rows = [r for r in rows if r["actor_role"] == "provider_staff"]
        assert staff_rows, caller
        assert all(r["actor_sub"] is None and r["client_addr"] is None for r in staff_rows)
    _, _, body = await call(http, "GET", gateway + "/v1/audit", token_for("staff"),
                            params={"euo": "euo-acme", "actor": "staff-sam"})
    assert orjson.loads(body)["rows"][0]["actor_sub"] == "staff-sam"


async def test_a_client_request_id_cannot_collide_with_another_request(gateway, http, token_for, db):
    ids = set()
    for _ in range(3):
        _, headers, _ = await call(http, "GET", gateway + PATH, token_for("staff"),
                                   headers={"X-Request-Id": "same-id"})
        ids.add(headers["X-Request-Id"])
    assert len(ids) == 3 and "same-id" not in ids
    rows = await db.fetch("select client_request_id from audit_log where request_id = any($1::text[])",
                          list(ids))
    assert [r["client_request_id"] for r in rows] == ["same-id"] * 3


async def test_an_actor_with_the_users_sub_in_another_role_is_in_their_access_log(
        gateway, http, token_for):
    """A user is (EUO, sub): staff, a partner or an admin whose sub happens to be `u-bob`
    reading Bob's record are others, and Bob's access log shows them."""
    # rows are timed by the database's clock (gateway/clock.py): a little before the host's
    # `now` is still this test's window
    since = quote((datetime.now(UTC) - timedelta(seconds=2)).isoformat())
    for spec in (dict(role="provider_staff", sub="u-bob"),
                 dict(role="partner", sub="u-bob", partner="p-northwind"),
                 dict(role="euo_admin", sub="u-bob", euo="euo-acme")):
        status, _, _ = await call(http, "GET", gateway + "/telephony/euos/euo-acme/users/u-bob",
                                  token_for(**spec))
        assert status == 200
    # this test's own window (a count of entries before and after is wrong once other
    # tests have filled Bob's log past a page)
    _, _, body = await call(http, "GET", f"{gateway}/v1/me/access-log?from={since}&limit=1000",
                            token_for("bob"))
    roles = {a["accessor"]["role"] for a in orjson.loads(body)["accesses"]}
    assert {"provider_staff", "partner", "euo_admin"} <= roles


async def test_the_actor_filter_cannot_confirm_who_else_acted(gateway, http, token_for):
    """A partner asking for rows of actor `staff-sam` gets none, even where staff-sam read
    its EUO's data; its own actors it can find."""
    await call(http, "GET", gateway + PATH, token_for("staff"))
    _, _, body = await call(http, "GET", gateway + "/v1/audit", token_for("partner"),
                            params={"actor": "staff-sam"})
    assert orjson.loads(body)["rows"] == []
    await call(http, "GET", gateway + PATH, token_for("partner"))
    _, _, body = await call(http, "GET", gateway + "/v1/audit", token_for("partner"),
                            params={"actor": "pat@northwind"})
    assert orjson.loads(body)["rows"]


async def test_a_listing_of_requests_is_audited_per_euo(gateway, http, token_for, db):
    """Staff listing requests of several EUOs leaves a row per EUO, so each EUO's audit and
    each user's access log shows it."""
    for caller in ("bob", "alice"):
        await call(http, "POST", gateway + "/v1/me/requests", token_for(caller),
                   json={"type": "rectification", "data_sets": ["connection_statistics"]})
    await call(http, "POST", gateway + "/v1/me/requests",
               token_for(role="user", sub="u-dirk", euo="euo-globex"),
               json={"type": "rectification", "data_sets": ["connection_statistics"]})
    status, headers, _ = await call(http, "GET", gateway + "/v1/requests", token_for("staff"))
    assert status == 200
    rows = await db.fetch("select subject_euo, subject_users from audit_log where request_id = $1",
                          headers["X-Request-Id"])
    # a row per user: a row u-dirk can see whole (his slice) names no one else
    assert all(len(r["subject_users"]) == 1 for r in rows)
    named = {(r["subject_euo"], r["subject_users"][0]) for r in rows}
    assert {("euo-acme", "u-bob"), ("euo-acme", "u-alice"), ("euo-globex", "u-dirk")} <= named
    _, _, body = await call(http, "GET", gateway + "/v1/me/access-log",
                            token_for(role="user", sub="u-dirk", euo="euo-globex"))
    assert any(a["route"] == "gateway:/v1/requests" for a in orjson.loads(body)["accesses"])
