"""`gateway audit verify --incremental` walks each chain only from where verify last found
it whole (audit_verified): a second run reads only the new rows, still finds a break among
them or a change to the row it stopped at, and a full run (the default) still finds a
change to what was verified before."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson

from gateway.audit import AuditRow, AuditWriter
from gateway.db import create_pool

from .conftest import connected, gateway_main, own_database


async def _write(pool, n: int, tag: str) -> None:
    writer = AuditWriter(pool, queue_max=100)
    writer.start()
    try:
        for i in range(n):
            await writer.commit(AuditRow(at=datetime.now(UTC), request_id=f"{tag}-{i}",
                                         method="GET", path="/x", decision="allow", status=200))
    finally:
        await writer.close()


async def _verify(dsn: str, *flags: str) -> tuple[int, dict]:
    done = await asyncio.to_thread(gateway_main, "audit", "verify", *flags,
                                   env={"GATEWAY_DATABASE_URL": dsn})
    return done.returncode, orjson.loads(done.stdout) if done.stdout.strip() else {}


async def _tamper(db, request_id: str) -> None:
    async with db.transaction():
        await db.execute("alter table audit_log disable trigger audit_log_append_only")
        await db.execute("update audit_log set path = '/changed' where request_id = $1",
                         request_id)
        await db.execute("alter table audit_log enable trigger audit_log_append_only")


async def test_a_second_verify_reads_only_the_new_rows_and_a_full_one_everything(
        database_url, template_database):
    async with own_database(database_url, template_database) as dsn, connected(dsn) as db:
        pool = await create_pool(dsn, 1, 2)
        try:
            await _write(pool, 20, "first")
            total = await db.fetchval("select count(*) from audit_log")
            status, full = await _verify(dsn)
            assert status == 0 and full["ok"] and full["rows_checked"] == total
            assert not full["incremental"]
            status, again = await _verify(dsn, "--incremental")
            assert status == 0 and again["ok"] and again["rows_checked"] == 0
            await _write(pool, 5, "second")        # a new chain of 5 rows
            status, since = await _verify(dsn, "--incremental")
            assert status == 0 and since["ok"] and since["rows_checked"] == 5
            # a change to a row verified before: the incremental run does not read it, a
            # full run finds it
            await _tamper(db, "first-3")
            status, since = await _verify(dsn, "--incremental")
            assert status == 0 and since["rows_checked"] == 0
            status, full = await _verify(dsn)
            assert status == 1 and full["first_break"]["problem"] == \
                "the row was altered after it was written"
        finally:
            await pool.close()


async def test_an_incremental_verify_finds_a_change_to_its_watermark_or_after_it(
        database_url, template_database):
    async with own_database(database_url, template_database) as dsn, connected(dsn) as db:
        pool = await create_pool(dsn, 1, 2)
        try:
            await _write(pool, 4, "a")
            assert (await _verify(dsn))[0] == 0
            await _tamper(db, "a-3")               # the last row verify found whole
            status, report = await _verify(dsn, "--incremental")
            assert status == 1
            assert report["first_break"]["problem"] == "the row verify last found whole was altered"
            await _write(pool, 3, "b")
            await _tamper(db, "b-1")               # a new row, after the watermark
            status, report = await _verify(dsn, "--incremental")
            assert status == 1, report
            problems = {b["problem"] for b in report["breaks"]}
            assert "the row was altered after it was written" in problems
        finally:
            await pool.close()
