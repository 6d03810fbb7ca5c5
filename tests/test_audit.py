"""The access audit: committed before any personal data leaves, append-only, chained,
answerable within each caller's scope, and survives a crash of the gateway."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import orjson
import pytest

from gateway.audit.chain import GENESIS, HASHED, canonical, link
from gateway.audit.writer import COLUMNS
from gateway.demo.run import seed_contracts
from gateway.embedded import EmbeddedPostgres

from .conftest import (
    call,
    connected,
    gateway_main,
    gateway_process,
    gateway_settings,
    own_database,
    running_gateway,
    wait_for,
)

ALICE = "/telephony/euos/euo-acme/users/u-alice"


async def row_of(db, request_id):
    async def fetch():
        return await db.fetchrow("select * from audit_log where request_id = $1", request_id)
    return await wait_for(fetch)


async def test_an_allowed_read_is_committed_with_what_it_served_and_removed(gateway, http, db,
                                                                           token_for):
    status, headers, _ = await call(http, "GET", gateway + ALICE, token_for("partner"))
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
    status, headers, _ = await call(http, "GET", gateway + ALICE + "/voicemails", token_for("staff"))
    assert status == 403
    found = await row_of(db, headers["X-Request-Id"])
    assert found["decision"] == "deny" and found["reason"] == "dataset_not_permitted"
    assert found["status"] == 403 and found["data_sets"] == []


async def test_list_answers_record_the_data_subjects_served(gateway, http, db, token_for):
    _, headers, _ = await call(http, "GET", gateway + "/telephony/euos/euo-acme/cdrs",
                               token_for("admin"))
    row = await row_of(db, headers["X-Request-Id"])
    assert set(row["subject_users"]) == {"u-alice", "u-bob", "u-carla"}
    _, headers, _ = await call(http, "GET", gateway + "/telephony/euos/euo-acme/cdrs",
                               token_for("bob"))
    row = await row_of(db, headers["X-Request-Id"])
    assert row["subject_users"] == ["u-bob"]


async def test_audit_rows_cannot_be_changed_or_removed(db):
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("update audit_log set status = 200 where seq = 1")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await db.execute("delete from audit_log where seq = 1")


async def verify(http, gateway, token_for):
    status, _, body = await call(http, "GET", gateway + "/v1/audit/verify", token_for("staff"))
    assert status == 200
    return orjson.loads(body)


async def set_actor_role(db, row, role: str) -> None:
    """Change a row as a superuser can: with triggers switched off for the session."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("set local session_replication_role = replica")
        await conn.execute("update audit_log set actor_role = $3 where chain_id = $1 and seq = $2",
                           row["chain_id"], row["seq"], role)


async def test_verify_finds_a_row_altered_with_superuser_rights(gateway, http, db, token_for):
    """Verification reports the altered row as the first break, and is clean once undone."""
    _, headers, _ = await call(http, "GET", gateway + ALICE, token_for("admin"))
    report = await verify(http, gateway, token_for)
    assert report["ok"] and report["rows_checked"] > 0 and report["chains_checked"] >= 1
    row = await row_of(db, headers["X-Request-Id"])
    await set_actor_role(db, row, "provider_staff")
    try:
        report = await verify(http, gateway, token_for)
        assert not report["ok"]
        assert report["first_break"] == {"chain_id": str(row["chain_id"]), "seq": row["seq"],
                                         "problem": "the row was altered after it was written"}
    finally:
        await set_actor_role(db, row, row["actor_role"])
    assert (await verify(http, gateway, token_for))["ok"]


async def test_verify_is_for_provider_staff_only(gateway, http, token_for):
    for who in ("partner", "admin", "alice"):
        assert (await call(http, "GET", gateway + "/v1/audit/verify", token_for(who)))[0] == 403


async def query(http, gateway, token, **params):
    status, _, body = await call(http, "GET", gateway + "/v1/audit", token, params=params)
    assert status == 200, body
    return orjson.loads(body)


async def test_each_caller_reads_only_their_scope(gateway, http, token_for, db):
    """A partner never sees rows of another partner's EUOs (other than while it held them);
    an EUO admin never another EUO's; users are refused."""
    for path, who in (("/telephony/euos/euo-initech", "staff"),
                      ("/telephony/euos/euo-globex/users", "staff"),
                      ("/telephony/euos/euo-acme", "staff")):
        await call(http, "GET", gateway + path, token_for(who))
    partner = await query(http, gateway, token_for("partner"), limit=1000)
    assert partner["rows"]
    held = {r["euo_id"] for r in await db.fetch(
        "select euo_id from contract_history where partner_id = 'p-northwind'")}
    assert {"euo-acme", "euo-globex"} <= held
    for r in partner["rows"]:
        assert r["actor_partner"] == "p-northwind" or r["subject_euo"] in held
    admin = await query(http, gateway, token_for("admin"), limit=1000)
    assert admin["rows"] and {r["subject_euo"] for r in admin["rows"]} == {"euo-acme"}
    staff = await query(http, gateway, token_for("staff"), euo="euo-initech")
    assert staff["rows"]
    status, _, body = await call(http, "GET", gateway + "/v1/audit", token_for("alice"))
    assert status == 403 and orjson.loads(body)["error"]["code"] == "role_not_permitted"


async def test_a_partner_sees_an_euo_only_for_the_time_it_held_the_contract(gateway, http,
                                                                           token_for):
    staff, bluesky = token_for("staff"), token_for(role="partner", sub="bea", partner="p-bluesky")
    # rows are timed by the database's clock as the gateway measures it (gateway/clock.py):
    # a few milliseconds either side of the host's
    since = (datetime.now(UTC) - timedelta(seconds=0.2)).isoformat()
    probe = token_for(role="provider_staff", sub=f"probe-{uuid.uuid4().hex[:8]}")
    await call(http, "GET", gateway + "/telephony/euos/euo-globex", probe)       # before
    await call(http, "PUT", gateway + "/v1/admin/euos/euo-globex", staff,
               json={"partner_id": "p-bluesky", "contract_end": None})
    await call(http, "GET", gateway + "/telephony/euos/euo-globex/directory", probe)  # during
    await call(http, "PUT", gateway + "/v1/admin/euos/euo-globex", staff,
               json={"partner_id": "p-northwind", "contract_end": None})
    await call(http, "GET", gateway + "/telephony/euos/euo-globex/users", probe)  # after
    seen = await query(http, gateway, bluesky, euo="euo-globex", **{"from": since})
    assert [r["route"] for r in seen["rows"] if r["route"].startswith("telephony:")] == [
        "telephony:/euos/{euo}/directory"]


async def test_cursor_paging_returns_every_row_once(gateway, http, token_for):
    actor = f"pager-{uuid.uuid4().hex[:8]}"
    token = token_for(role="provider_staff", sub=actor)
    for _ in range(23):
        await call(http, "GET", gateway + "/telephony/euos/euo-acme", token)
    seen, cursor = [], None
    while True:
        params = {"actor": actor, "limit": 5} | ({"cursor": cursor} if cursor else {})
        page = await query(http, gateway, token_for("staff"), **params)
        seen += [(r["chain_id"], r["seq"]) for r in page["rows"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 23 and len(set(seen)) == 23


@pytest.mark.parametrize(("params", "code"), [
    ({"limit": "lots"}, "bad_filter"), ({"limit": "0"}, "bad_filter"),
    ({"from": "yesterday"}, "bad_filter"), ({"from": "2026-01-01T00:00:00"}, "bad_filter"),
    ({"decision": "maybe"}, "bad_filter"), ({"cursor": "garbage!"}, "bad_cursor"),
])
async def test_bad_filters_are_400(gateway, http, token_for, params, code):
    status, _, body = await call(http, "GET", gateway + "/v1/audit", token_for("staff"),
                                 params=params)
    assert status == 400 and orjson.loads(body)["error"]["code"] == code


async def test_csv_and_ndjson_downloads_parse_back_to_the_same_rows(gateway, http, token_for):
    actor = f"dl-{uuid.uuid4().hex[:8]}"
    token = token_for(role="provider_staff", sub=actor)
    for path in ("/telephony/euos/euo-acme", ALICE, ALICE + "/voicemails"):
        await call(http, "GET", gateway + path, token)

    async def all_three():   # the denial's row is written without the client waiting
        rows = (await query(http, gateway, token_for("staff"), actor=actor))["rows"]
        return rows if len(rows) == 3 else None
    rows = await wait_for(all_three)
    assert rows
    _, headers, body = await call(http, "GET", gateway + "/v1/audit", token_for("staff"),
                                  params={"actor": actor}, headers={"Accept": "application/x-ndjson"})
    assert headers["Content-Type"].startswith("application/x-ndjson")
    assert [orjson.loads(line) for line in body.splitlines()] == rows
    _, headers, body = await call(http, "GET", gateway + "/v1/audit", token_for("staff"),
                                  params={"actor": actor}, headers={"Accept": "text/csv"})
    parsed = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(parsed) == 3
    for got, want in zip(parsed, rows, strict=True):
        for key, value in want.items():
            if isinstance(value, (list, dict)):
                assert orjson.loads(got[key]) == value
            elif value is None:
                assert got[key] == ""
            else:
                assert got[key] == str(value)


async def test_a_user_sees_who_accessed_their_data_by_organisation(gateway, http, token_for):
    """Accesses by staff, partner and admin appear with role and organisation; never a
    person's identity, never the user's own requests. (u-carla: no other test has a
    colleague reach for her data, so any user entry here would be her own.)"""
    carla_record = "/telephony/euos/euo-acme/users/u-carla"
    carla = token_for(role="user", sub="u-carla", euo="euo-acme")
    # only this test's window: in others a colleague may rightly reach her data (her chat
    # in a meeting Alice organised reaches Alice, and Carla's log says so)
    since = {"from": (datetime.now(UTC) - timedelta(seconds=0.2)).isoformat()}  # (clock.py)
    for who in ("staff", "partner", "admin"):
        await call(http, "GET", gateway + carla_record, token_for(who))
    await call(http, "GET", gateway + carla_record, carla)
    await call(http, "GET", gateway + carla_record + "/voicemails", token_for("staff"))   # denied

    async def entries():
        status, _, body = await call(http, "GET", gateway + "/v1/me/access-log", carla,
                                     params=since)
        assert status == 200
        found = orjson.loads(body)["accesses"]
        return (found, body) if any(e["decision"] == "deny" for e in found) else None
    entries, body = await wait_for(entries)
    accessors = {(e["accessor"]["role"], e["accessor"]["organisation"]) for e in entries}
    assert {("provider_staff", "Provider"), ("partner", "p-northwind"),
            ("euo_admin", "euo-acme")} <= accessors
    assert ("user", "euo-acme") not in accessors
    assert any(e["decision"] == "deny" and "voicemails" in e["route"] for e in entries)
    for name in (b"staff-sam", b"pat@northwind", b"admin@acme"):
        assert name not in body
    assert (await call(http, "GET", gateway + "/v1/me/access-log", token_for("admin")))[0] == 403


async def test_a_colleagues_refused_attempt_shows_in_the_access_log(gateway, http, token_for):
    """Denied attempts count too: bob reaching for alice's voicemails is in her log."""
    await call(http, "GET", gateway + ALICE + "/voicemails", token_for("bob"))

    async def seen():
        _, _, body = await call(http, "GET", gateway + "/v1/me/access-log", token_for("alice"))
        return [e for e in orjson.loads(body)["accesses"]
                if e["accessor"] == {"role": "user", "organisation": "euo-acme"}
                and e["decision"] == "deny"]
    assert await wait_for(seen)


def cli(database_url, *args, check=True):
    env = dict(os.environ, GATEWAY_DATABASE_URL=database_url)
    done = subprocess.run([sys.executable, "-m", "gateway", "audit", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


async def audit_cli(database_url, *args):
    """`gateway audit ARGS` in this process (in a thread: it runs an event loop of its own);
    `cli` runs it as a process."""
    done = await asyncio.to_thread(gateway_main, "audit", *args,
                                   env={"GATEWAY_DATABASE_URL": database_url})
    assert done.returncode == 0, done.stderr
    return done


async def test_prune_drops_whole_old_partitions_with_a_dry_run_first(database_url,
                                                                     template_database):
    """In a database of its own: dropping a partition waits for every transaction that reads
    audit_log, and the shared one serves other tests' gateways (a long export held it 20 s)."""
    async with own_database(database_url, template_database) as dsn, connected(dsn) as conn:
        await _prune_old_partition(dsn, conn)


async def _prune_old_partition(database_url, db):
    values = {name: None for name in HASHED} | {
        "at": datetime(2020, 3, 5, tzinfo=UTC), "chain_id": uuid.uuid4(), "seq": 1,
        "request_id": "old-1", "method": "GET", "path": "/old", "data_sets": [],
        "fields_removed": [], "subject_users": [], "decision": "deny", "status": 404,
        "bytes": 0, "duration_ms": 1.0}
    ordered = tuple(values[c] for c in HASHED)
    record = (*ordered, GENESIS, link(GENESIS, canonical(ordered)))
    await db.execute("select audit_ensure_partition('2020-03-01')")
    await db.copy_records_to_table("audit_log", records=[record], columns=COLUMNS)
    dry = await audit_cli(database_url, "prune", "--older-than", "400d", "--dry-run")
    assert "would drop audit_log_y2020m03" in dry.stdout
    assert await db.fetchval("select count(*) from audit_log where request_id = 'old-1'") == 1
    done = await audit_cli(database_url, "prune", "--older-than", "400d")
    assert "dropped audit_log_y2020m03" in done.stdout
    assert await db.fetchval("select count(*) from audit_log where request_id = 'old-1'") == 0
    assert (await audit_cli(database_url, "verify")).returncode == 0


async def test_cli_query_prints_ndjson(gateway, http, token_for, database_url):
    actor = f"cli-{uuid.uuid4().hex[:8]}"
    await call(http, "GET", gateway + "/telephony/euos/euo-acme",
               token_for(role="provider_staff", sub=actor))
    done = cli(database_url, "query", "--actor", actor)
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["actor_sub"] == actor


async def test_database_outage_fails_closed_and_recovers(backends, http, token_for, demo,
                                                         tmp_path):
    """With the database down no personal data is served (503); when it returns the
    gateway serves again by itself."""
    server = EmbeddedPostgres(tmp_path)
    dsn = server.start()
    try:
        await seed_contracts(dsn, demo)
        async with running_gateway(gateway_settings(backends["urls"]), dsn) as gw:
            url = gw + ALICE
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

            async def partner_served():   # the contracts listener reconnects and reloads
                return (await call(http, "GET", gw + "/telephony/euos/euo-acme",
                                   token_for("partner")))[0] == 200
            assert await wait_for(partner_served, timeout=10)
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.slow
async def test_kill_9_loses_no_row_of_an_answered_request(backends, database_url, http,
                                                          token_for, db, tmp_path):
    """Every 2xx a client received before the gateway was killed has its committed row."""
    answered: list[str] = []
    async with gateway_process(http, backends, database_url, tmp_path) as (proc, base):
        token = token_for("alice")

        async def client(n: int):
            for _ in range(10_000):
                try:
                    status, headers, _ = await call(http, "GET", base + ALICE, token)
                except (TimeoutError, aiohttp.ClientError):
                    return
                if status == 200:
                    answered.append(headers["X-Request-Id"])
        clients = [asyncio.create_task(client(n)) for n in range(8)]
        await asyncio.sleep(1.5)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*clients)
    assert len(answered) > 20
    stored = await db.fetch("select request_id from audit_log where request_id = any($1::text[])",
                            answered)
    assert {r["request_id"] for r in stored} == set(answered)


@pytest.mark.slow
async def test_kill_9_leaves_no_change_without_its_row_and_no_answered_refusal_unlogged(
        backends, database_url, http, token_for, db, tmp_path):
    """Under kill -9 with contract changes and refusals in flight: every contract that
    exists has its audit row, and every refusal a client received was logged first."""
    tag = uuid.uuid4().hex[:6]
    refused: list[str] = []
    async with gateway_process(http, backends, database_url, tmp_path) as (proc, base):
        staff = token_for("staff")

        async def writer(n: int):
            for i in range(10_000):
                try:
                    await call(http, "PUT", base + f"/v1/admin/euos/euo-k9-{tag}-{n}-{i}", staff,
                               json={"partner_id": "p-northwind"})
                except (TimeoutError, aiohttp.ClientError):
                    return

        async def denied():
            for _ in range(10_000):
                try:
                    status, headers, _ = await call(
                        http, "GET", base + "/telephony/euos/euo-acme/users/u-alice/voicemails",
                        staff)
                except (TimeoutError, aiohttp.ClientError):
                    return
                if status == 403:
                    refused.append(headers["X-Request-Id"])
        clients = [asyncio.create_task(writer(n)) for n in range(6)]
        clients += [asyncio.create_task(denied()) for _ in range(2)]
        await asyncio.sleep(1.5)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*clients)
    changed = await db.fetch("select euo_id from contracts where euo_id like $1", f"euo-k9-{tag}-%")
    assert len(changed) > 10
    logged = await db.fetch("select subject_euo from audit_log where route = $1 and decision = 'allow'"
                            " and subject_euo like $2", "gateway:/v1/admin/euos/{euo}",
                            f"euo-k9-{tag}-%")
    assert {r["euo_id"] for r in changed} <= {r["subject_euo"] for r in logged}
    assert len(refused) > 5
    stored = await db.fetch("select request_id from audit_log where request_id = any($1::text[])",
                            refused)
    assert {r["request_id"] for r in stored} == set(refused)


async def test_every_row_names_the_policy_that_decided_it(gateway, http, token_for, db):
    """The row's policy_version is the version /v1/catalog names, allowed or refused."""
    _, _, body = await call(http, "GET", gateway + "/v1/catalog", token_for("staff"))
    version = orjson.loads(body)["policy_version"]
    assert len(version) == 16
    for path, who in (("/telephony/euos/euo-acme", "staff"),
                      ("/telephony/euos/euo-acme/users/u-alice/voicemails", "staff")):
        _, headers, _ = await call(http, "GET", gateway + path, token_for(who))
        row = await db.fetchrow("select policy_version from audit_log where request_id = $1",
                                headers["X-Request-Id"])
        assert row["policy_version"] == version
    _, _, body = await call(http, "GET", gateway + "/v1/audit", token_for("staff"),
                            params={"limit": "1"})
    assert orjson.loads(body)["rows"][0]["policy_version"] == version
