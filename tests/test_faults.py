"""Nothing lost, nothing stale: the gateway under a stalled, frozen or tampered database.

These tests lock tables and freeze PostgreSQL processes, so they use a PostgreSQL of their
own (embedded, started once for the module) and a gateway of their own per test; whatever
they freeze or lock is released in a `finally`, and each test passes alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

import asyncpg
import orjson
import pytest
import pytest_asyncio

from gateway.audit.chain import verify
from gateway.demo.run import seed_contracts
from gateway.embedded import EmbeddedPostgres

from .conftest import call, connected, gateway_settings, private_database, running_gateway, wait_for

pytestmark = pytest.mark.slow

COMMIT_TIMEOUT_S = 1.0
STALENESS_S = 1.0
ALICE = "/telephony/euos/euo-acme/users/u-alice"
ACME = "/telephony/euos/euo-acme"


@pytest_asyncio.fixture(scope="module")
async def private_db(tmp_path_factory, demo):
    """A PostgreSQL for this module alone (it gets frozen), with the demo contracts."""
    async with private_database(tmp_path_factory.mktemp("faults-db"), demo) as server:
        yield server, server.dsn


@contextlib.asynccontextmanager
async def faulty_gateway(backends, private_db):
    """A gateway on the private database with short deadlines; yields its base URL."""
    settings = gateway_settings(backends["urls"], audit_commit_timeout_s=COMMIT_TIMEOUT_S,
                                mirror_staleness_s=STALENESS_S)
    async with running_gateway(settings, private_db[1]) as url:
        yield url


def postgres_processes(server: EmbeddedPostgres) -> set[int]:
    """The postmaster and every process it started."""
    postmaster = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    pids = {postmaster}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.add(int(stat.parent.name))
    return pids


def signal_all(pids, sig) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def listener_pids(dsn: str) -> set[int]:
    """The backends of every gateway listener (application_name says so): one per process,
    for every mirror."""
    async with connected(dsn) as conn:
        rows = await conn.fetch("select pid from pg_stat_activity where application_name = $1",
                                "gateway listener")
    return {r["pid"] for r in rows}


async def timed(coro):
    started = time.monotonic()
    result = await coro
    return result, time.monotonic() - started


async def readyz(http, gw):
    status, _, body = await call(http, "GET", gw + "/readyz")
    return status, orjson.loads(body)


async def test_a_locked_audit_table_is_a_503_within_the_commit_deadline(backends, private_db, http,
                                                                       token_for):
    """The caller waits no longer than the deadline, gets no data, and its row is never
    committed; readyz says why at once; the abandoned chain's head stays at what committed."""
    dsn = private_db[1]
    async with faulty_gateway(backends, private_db) as gw:
        status, headers, _ = await call(http, "GET", gw + ALICE, token_for("alice"))
        assert status == 200
        async with connected(dsn) as conn:
            before = await conn.fetchrow("select chain_id, seq from audit_log where request_id = $1",
                                         headers["X-Request-Id"])
        async with connected(dsn) as locker:
            lock = locker.transaction()
            await lock.start()
            try:
                await locker.execute("lock table audit_log in access exclusive mode")
                (status, headers, body), took = await timed(call(
                    http, "GET", gw + ALICE, token_for("alice")))
                refused = headers["X-Request-Id"]
                assert status == 503 and orjson.loads(body)["error"]["code"] == "audit_unavailable"
                assert b"Alice" not in body
                assert COMMIT_TIMEOUT_S <= took < COMMIT_TIMEOUT_S + 0.75
                (status, ready), took = await timed(readyz(http, gw))
                assert took < 1.0
                assert status == 503 and "audit_write_failed" in ready["reasons"]
            finally:
                await lock.rollback()

        async def served():
            return (await call(http, "GET", gw + ALICE, token_for("alice")))[0] == 200
        assert await wait_for(served, timeout=5)
        assert await wait_for(lambda: _ready(http, gw), timeout=5)
    async with connected(dsn) as conn:
        # the refusal itself is logged (a 503 denial); the row that would have let data out is not
        rows = await conn.fetch("select decision, status from audit_log where request_id = $1",
                                refused)
        assert [tuple(r) for r in rows] in ([], [("deny", 503)])
        head = await conn.fetchrow("select * from audit_chain_heads where chain_id = $1",
                                   before["chain_id"])
        assert head["last_seq"] == await conn.fetchval(
            "select max(seq) from audit_log where chain_id = $1", before["chain_id"])
        assert not head["closed"]     # abandoned, not shut down: its writer cannot vouch for more
        assert (await verify(conn)).ok


async def _ready(http, gw) -> bool:
    return (await readyz(http, gw))[0] == 200


async def test_readyz_answers_at_once_while_the_database_is_frozen(backends, private_db, http,
                                                                   token_for):
    """With every PostgreSQL process stopped, requests get 503 by the deadline, readyz
    answers within a second and turns not-ready within the staleness bound, and both come
    back by themselves."""
    server, _ = private_db
    async with faulty_gateway(backends, private_db) as gw:
        assert (await call(http, "GET", gw + ALICE, token_for("alice")))[0] == 200
        assert await _ready(http, gw)
        frozen = postgres_processes(server)
        signal_all(frozen, signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            (status, _, body), took = await timed(call(http, "GET", gw + ALICE, token_for("alice")))
            assert status == 503 and orjson.loads(body)["error"]["code"] == "audit_unavailable"
            assert took < COMMIT_TIMEOUT_S + 0.75
            while True:
                (status, ready), took = await timed(readyz(http, gw))
                assert took < 1.0
                if "contracts_unavailable" in ready.get("reasons", ()):
                    break
                assert time.monotonic() - frozen_at < STALENESS_S + 1.0, ready
                await asyncio.sleep(0.05)
            assert status == 503 and ready["database"] is False
            assert "restrictions_unavailable" in ready["reasons"]
            status, _, body = await call(http, "GET", gw + ACME, token_for("partner"))
            assert status == 503 and b"Acme" not in body
        finally:
            signal_all(frozen | postgres_processes(server), signal.SIGCONT)

        async def served():
            return (await call(http, "GET", gw + ACME, token_for("partner")))[0] == 200
        assert await wait_for(served, timeout=15)
        assert await wait_for(lambda: _ready(http, gw), timeout=10)


async def partner_statuses(http, gw, token, until):
    """(seconds since start, status, error code) of partner reads, until `until` holds."""
    seen, started = [], time.monotonic()
    while True:
        status, _, body = await call(http, "GET", gw + ACME, token)
        code = orjson.loads(body)["error"]["code"] if status != 200 else None
        seen.append((time.monotonic() - started, status, code))
        if until(seen) or time.monotonic() - started > 10:
            return seen
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("fault", ["freeze", "terminate"])
async def test_a_silent_or_lost_listener_never_serves_a_deleted_contract_for_long(
        backends, private_db, http, token_for, demo, fault):
    """The contracts listener's backend is frozen (SIGSTOP) or killed
    (pg_terminate_backend) and the contract deleted meanwhile: within the staleness bound
    partners get 503 `contracts_unavailable`, then the reloaded mirror refuses the ex-partner."""
    server, dsn = private_db
    partner = token_for("partner")
    frozen = None
    try:
        async with faulty_gateway(backends, private_db) as gw:
            assert (await call(http, "GET", gw + ACME, partner))[0] == 200
            pids = await listener_pids(dsn)
            assert len(pids) == 1
            pid = pids.pop()
            async with connected(dsn) as conn:
                if fault == "freeze":
                    frozen = {pid}
                    signal_all(frozen, signal.SIGSTOP)
                else:
                    assert await conn.fetchval("select pg_terminate_backend($1)", pid)
                await conn.execute("delete from contracts where euo_id = 'euo-acme'")
            seen = await partner_statuses(
                http, gw, partner, until=lambda s: s[-1][1] == 403 and len(s) > 1)
            first_refusal = next(i for i, s in enumerate(seen) if s[1] != 200)
            at, status, code = seen[first_refusal]
            assert (status, code) == (503, "contracts_unavailable"), seen
            assert at < STALENESS_S + 0.5, seen
            assert all(s[1] != 200 for s in seen[first_refusal:]), seen
            assert seen[-1][2] == "no_active_contract", seen
            if fault == "freeze":
                assert await listener_pids(dsn) - {pid}   # a new listener
    finally:
        if frozen:
            signal_all(frozen, signal.SIGCONT)
        await seed_contracts(dsn, demo)


async def test_heads_never_go_back_and_are_closed_on_a_clean_shutdown(backends, private_db, http,
                                                                      token_for):
    dsn = private_db[1]
    async with faulty_gateway(backends, private_db) as gw:
        _, headers, _ = await call(http, "GET", gw + ALICE, token_for("alice"))
        async with connected(dsn) as conn:
            chain = await conn.fetchval("select chain_id from audit_log where request_id = $1",
                                        headers["X-Request-Id"])
            open_head = await conn.fetchrow("select * from audit_chain_heads where chain_id = $1",
                                            chain)
            assert not open_head["closed"] and open_head["last_seq"] >= 1
    async with connected(dsn) as conn:
        head = await conn.fetchrow("select * from audit_chain_heads where chain_id = $1", chain)
        assert head["closed"] and head["closed_at"] is not None
        assert (head["last_seq"], head["last_hash"]) == tuple(await conn.fetchrow(
            "select seq, row_hash from audit_log where chain_id = $1 order by seq desc limit 1",
            chain))
        for statement in (
                "update audit_chain_heads set last_seq = last_seq - 1 where chain_id = $1",
                "update audit_chain_heads set last_hash = '\\x00' where chain_id = $1",
                "update audit_chain_heads set closed = false where chain_id = $1",
                "update audit_chain_heads set last_seq = last_seq + 1 where chain_id = $1",
                "delete from audit_chain_heads where chain_id = $1"):
            with pytest.raises(asyncpg.RaiseError, match="audit_chain_heads"):
                await conn.execute(statement, chain)
        with pytest.raises(asyncpg.RaiseError, match="audit_chain_heads"):
            await conn.execute("truncate audit_chain_heads")


# what a superuser can do, each with the triggers that refuse it switched off
TAMPERING = {
    "tail cut off": (
        "delete from audit_log where chain_id = $1 and seq > 1",
        "rows 2..3 at the end of the chain are missing", 2),
    "whole chain deleted": (
        "delete from audit_log where chain_id = $1",
        "all 3 rows of the chain are missing", 1),
    "head deleted": (
        "delete from audit_chain_heads where chain_id = $1",
        "rows without a chain head", 3),
}


@pytest.mark.parametrize("tampering", TAMPERING)
async def test_verify_sees_rows_missing_at_the_end_of_a_chain(backends, private_db, http,
                                                              token_for, tampering):
    """Deleting a chain's last rows, a whole chain, or its head is reported by verify
    (done in a transaction that is rolled back, so the database is left as it was)."""
    dsn = private_db[1]
    actor = f"tail-{uuid.uuid4().hex[:8]}"
    async with faulty_gateway(backends, private_db) as gw:
        for _ in range(3):
            assert (await call(http, "GET", gw + ACME,
                               token_for(role="provider_staff", sub=actor)))[0] == 200
    statement, problem, seq = TAMPERING[tampering]
    async with connected(dsn) as conn:
        chain = await conn.fetchval(
            "select distinct chain_id from audit_log where actor_sub = $1", actor)
        assert await conn.fetchval("select count(*) from audit_log where chain_id = $1", chain) == 3
        assert (await verify(conn)).ok
        tampered = conn.transaction(isolation="repeatable_read")
        await tampered.start()
        try:
            await conn.execute("alter table audit_log disable trigger audit_log_append_only")
            await conn.execute(
                "alter table audit_chain_heads disable trigger audit_chain_heads_forward_only")
            await conn.execute(statement, chain)
            report = await verify(conn)
        finally:
            await tampered.rollback()
        assert not report.ok
        assert {"chain_id": str(chain), "seq": seq, "problem": problem} in report.breaks
        assert (await verify(conn)).ok


async def test_a_state_change_and_its_row_commit_together_or_not_at_all(backends, private_db, http,
                                                                       token_for):
    """With the audit table locked, a contract change, a contract deletion and a
    restriction are answered 503 — and none of them took effect."""
    dsn = private_db[1]
    euo = f"euo-atomic-{uuid.uuid4().hex[:6]}"
    staff = token_for("staff")
    async with faulty_gateway(backends, private_db) as gw:
        async with connected(dsn) as locker:
            lock = locker.transaction()
            await lock.start()
            try:
                await locker.execute("lock table audit_log in access exclusive mode")
                status, _, _ = await call(http, "PUT", gw + f"/v1/admin/euos/{euo}", staff,
                                          json={"partner_id": "p-northwind"})
                assert status == 503
                status, _, _ = await call(http, "DELETE", gw + "/v1/admin/euos/euo-acme", staff)
                assert status == 503
                status, _, _ = await call(http, "POST", gw + "/v1/me/requests",
                                          token_for("bob"),
                                          json={"type": "restriction", "data_sets": ["user_mobile"]})
                assert status == 503
            finally:
                await lock.rollback()
        async with connected(dsn) as conn:
            assert await conn.fetchval("select count(*) from contracts where euo_id = $1", euo) == 0
            assert await conn.fetchval(
                "select count(*) from contracts where euo_id = 'euo-acme'") == 1
            assert await conn.fetchval(
                "select count(*) from dsr_requests where user_sub = 'u-bob' and type = 'restriction'"
                " and status in ('open', 'accepted')") == 0

        async def served():   # and nothing of it reached the mirrors either
            got = await call(http, "GET", gw + "/telephony/euos/euo-acme/users/u-bob",
                             token_for("partner"))
            return got[0] == 200
        assert await wait_for(served, timeout=5)
        # once the log is writable, a change and its row land together
        status, headers, _ = await call(http, "PUT", gw + f"/v1/admin/euos/{euo}", staff,
                                        json={"partner_id": "p-northwind"})
        assert status == 200
    async with connected(dsn) as conn:
        row = await conn.fetchrow("select decision, subject_euo from audit_log where request_id = $1",
                                  headers["X-Request-Id"])
        assert tuple(row) == ("allow", euo)
        assert await conn.fetchval("select count(*) from contracts where euo_id = $1", euo) == 1


async def test_a_refused_change_leaves_its_refusal_and_nothing_else(backends, private_db, http,
                                                                    token_for):
    """Deleting a contract that does not exist is a 404 audited as a refusal; the batch it
    shared with other rows is unharmed."""
    async with faulty_gateway(backends, private_db) as gw:
        results = await asyncio.gather(
            call(http, "DELETE", gw + "/v1/admin/euos/euo-never-was", token_for("staff")),
            *(call(http, "GET", gw + ALICE, token_for("alice")) for _ in range(5)))
    assert results[0][0] == 404
    assert all(r[0] == 200 for r in results[1:])
    async with connected(private_db[1]) as conn:
        rows = await conn.fetch("select decision, reason from audit_log where request_id = $1",
                                results[0][1]["X-Request-Id"])
        assert [tuple(r) for r in rows] == [("deny", "no_contract")]
        for _, headers, _ in results[1:]:
            assert await conn.fetchval("select count(*) from audit_log where request_id = $1",
                                       headers["X-Request-Id"]) == 1
        assert (await verify(conn)).ok


async def test_retention_counted_from_a_contract_end_fails_closed_on_a_stale_mirror(
        backends, private_db, http, token_for):
    """While the contracts mirror is stale past the staleness bound (a change it cannot
    re-read: the table locked), a route whose retention counts from the contract end (an
    EUO's identity) is refused with 503 for provider staff too; one whose retention needs no
    contract (a user record) is served."""
    _, dsn = private_db
    staff = token_for("staff")
    async with faulty_gateway(backends, private_db) as gw, connected(dsn) as locker:
        assert (await call(http, "GET", gw + ACME, staff))[0] == 200
        lock = locker.transaction()
        await lock.start()
        try:
            await locker.execute("lock table contracts in access exclusive mode")
            async with connected(dsn) as notifier:
                await notifier.execute("select pg_notify('gateway_contracts', 'euo-acme')")

            async def refused():
                status, _, body = await call(http, "GET", gw + ACME, staff)
                return status == 503 and orjson.loads(body)["error"]["code"] == \
                    "contracts_unavailable" and b"Acme" not in body
            assert await wait_for(refused, timeout=STALENESS_S + 3)
            status, _, body = await call(http, "GET", gw + ALICE, staff)
            assert status == 200 and b"Alice" in body
        finally:
            await lock.rollback()

        async def served():
            return (await call(http, "GET", gw + ACME, staff))[0] == 200
        assert await wait_for(served, timeout=15)


async def test_a_call_waits_for_a_pooled_connection_no_longer_than_its_bound(backends, private_db,
                                                                            http, token_for):
    """With every pooled connection held by calls stuck on a lock, one more call gets 503
    database_unavailable within GATEWAY_DB_ACQUIRE_TIMEOUT_S, audited, instead of
    waiting with them; once the lock goes, the stuck calls are answered."""
    settings = gateway_settings(backends["urls"], db_pool_min=2, db_pool_max=4,
                                db_acquire_timeout_s=0.5, audit_commit_timeout_s=5.0)
    staff = token_for("staff")
    async with running_gateway(settings, private_db[1]) as gw, \
            connected(private_db[1]) as locker:
        lock = locker.transaction()
        await lock.start()
        try:
            await locker.execute("lock table contracts in access exclusive mode")
            calls = [asyncio.create_task(call(http, "GET", gw + "/v1/admin/euos", staff))
                     for _ in range(5)]
            done, _ = await asyncio.wait(calls, timeout=3, return_when=asyncio.FIRST_COMPLETED)
            assert done, "every call still waiting after 3 s"
            refused = [t.result() for t in done]
            assert all(r[0] == 503 for r in refused)
            assert {orjson.loads(r[2])["error"]["code"] for r in refused} == {
                "database_unavailable"}
        finally:
            await lock.rollback()
        answered = await asyncio.gather(*calls)
    statuses = sorted(r[0] for r in answered)
    assert statuses[0] == 200 and statuses[-1] == 503      # some waited the lock out, some not
    async with connected(private_db[1]) as conn:
        for status, headers, _ in answered:
            row = await conn.fetchrow("select decision, status, reason from audit_log"
                                      " where request_id = $1", headers["X-Request-Id"])
            assert tuple(row) == (("allow", 200, None) if status == 200
                                  else ("error", 503, "database_unavailable"))
