"""The audit writer's promise to a caller that stops waiting: a request cancelled while its
row waits for a commit (a shutdown cancels the handlers under way) still has its row, and
its state change, written; nobody is told it committed."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.audit import AuditRow, AuditWriter
from gateway.db import create_pool
from gateway.errors import Denied
from gateway.redact import now_utc


async def test_a_cancelled_caller_still_has_its_row_and_change_written(gateway, database_url, db):
    pool = await create_pool(database_url, 1, 2)
    writer = AuditWriter(pool, queue_max=100, lanes=1, commit_timeout_s=15)
    writer.start()
    try:
        request_id = f"cancelled-{uuid.uuid4().hex}"
        changed = asyncio.Event()

        async def change(conn):
            await conn.fetchval("select 1")
            changed.set()
        task = asyncio.create_task(writer.commit(
            AuditRow(at=now_utc(), request_id=request_id, decision="allow", status=200),
            change=change))
        while not writer.queue_depth() and not task.done():
            await asyncio.sleep(0)        # until the row is queued and its caller waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await writer.close()              # writes what is queued
        await pool.close()
    assert changed.is_set()
    assert await db.fetchval("select count(*) from audit_log where request_id = $1",
                             request_id) == 1


async def test_every_waited_row_is_refused_at_its_own_deadline_whatever_the_lanes_do(
        database_url):
    """One timer watches every waiting row's deadline (not a timer per row): with no lane
    running at all, two rows queued a moment apart are each refused with 503 — never
    before their own deadline, and not left waiting after it — and the writer says it is
    failing, so the next caller is refused at once."""
    pool = await create_pool(database_url, 1, 2)
    writer = AuditWriter(pool, queue_max=100, lanes=1, commit_timeout_s=0.3)   # not started
    loop = asyncio.get_running_loop()

    async def refused_after() -> float:
        queued = loop.time()
        with pytest.raises(Denied) as refusal:
            await writer.commit(AuditRow(at=now_utc(), request_id=uuid.uuid4().hex))
        assert refusal.value.code == "audit_unavailable"
        return loop.time() - queued
    try:
        first = asyncio.create_task(refused_after())
        await asyncio.sleep(0.1)          # the second row's deadline comes 0.1 s later
        second = asyncio.create_task(refused_after())
        waited = await asyncio.wait_for(asyncio.gather(first, second), timeout=5)
        assert all(0.3 <= w < 2.0 for w in waited)
        assert "audit_write_failed" in writer.health()
        started = loop.time()
        with pytest.raises(Denied):
            await writer.commit(AuditRow(at=now_utc(), request_id=uuid.uuid4().hex))
        assert loop.time() - started < 0.1
    finally:
        await pool.close()
