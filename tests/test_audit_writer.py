"""The audit writer's promise to a caller that stops waiting: a request cancelled while its
row waits for a commit (a shutdown cancels the handlers under way) still has its row, and
its state change, written; nobody is told it committed."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.audit import AuditRow, AuditWriter
from gateway.audit.chain import verify
from gateway.audit.writer import array_literal
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


# what a text[] element can hold: anything PostgreSQL's text can (no NUL) and orjson
# parses (no lone surrogates): a field name from a hostile backend's answer, say
ELEMENT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
AWKWARD = [[], [""], ["a,b", 'q"x', "b\\s", "{}", "{", "NULL", "null", " sp ", "\\", '"'],
           [None], ["x", None, "NULL"], ["é", "😀", "\t\n"]]


async def test_array_literals_read_back_as_the_arrays_they_were_built_from(db):
    """The writer sends text[] columns as literals (sql/026): whatever the elements hold,
    PostgreSQL reads each literal back as the very array it was built from."""
    cases = list(AWKWARD)

    @settings(max_examples=600, database=None, deadline=None)
    @given(st.lists(st.one_of(st.none(), ELEMENT), max_size=8))
    def collect(items):
        cases.append(items)
    collect()
    got = await db.fetch("select x::text[] as a from unnest($1::text[]) with ordinality"
                         " as t(x, n) order by n", [array_literal(c) for c in cases])
    assert [r["a"] for r in got] == cases
    assert array_literal(None) is None


async def test_rows_with_awkward_arrays_are_written_as_they_were_hashed(database_url, db):
    """Rows whose data sets, removed fields and subjects hold quotes, backslashes, commas,
    braces and the word NULL are stored as given and their chain verifies."""
    pool = await create_pool(database_url, 1, 2)
    writer = AuditWriter(pool, queue_max=100, lanes=1, commit_timeout_s=15)
    writer.start()
    ids = [f"awkward-{uuid.uuid4().hex}" for _ in AWKWARD]
    try:
        await asyncio.gather(*(writer.commit(AuditRow(
            at=now_utc(), request_id=rid, decision="allow", status=200, data_sets=items,
            fields_removed=list(reversed(items)), subject_users=items))
            for rid, items in zip(ids, AWKWARD, strict=True)))
    finally:
        await writer.close()
        await pool.close()
    for rid, items in zip(ids, AWKWARD, strict=True):
        row = await db.fetchrow("select data_sets, fields_removed, subject_users from audit_log"
                                " where request_id = $1", rid)
        assert tuple(row) == (items, list(reversed(items)), items)
    async with db.acquire() as conn:
        assert (await verify(conn)).ok


async def _stream_of_rows(database_url, linger_s: float, rows: int = 120,
                          spacing_s: float = 0.002) -> tuple[int, list[int]]:
    """Rows arriving one at a time, `spacing_s` apart (a steady load), each waited for by
    its own caller; (batches written, the rows of each lone commit made before the load)."""
    pool = await create_pool(database_url, 1, 2)
    writer = AuditWriter(pool, queue_max=1000, lanes=1, linger_s=linger_s)
    sizes: list[int] = []
    writer.on_batch = lambda n, _seconds: sizes.append(n)
    writer.start()
    try:
        for i in range(3):      # lone calls, a pause longer than the linger apart
            await writer.commit(AuditRow(at=now_utc(), request_id=f"lone-{i}", status=200))
            await asyncio.sleep(2 * linger_s)
        lone = list(sizes)
        waiting = []
        for _ in range(rows):
            waiting.append(asyncio.ensure_future(writer.commit(
                AuditRow(at=now_utc(), request_id=f"stream-{uuid.uuid4().hex}", status=200))))
            await asyncio.sleep(spacing_s)
        await asyncio.gather(*waiting)
    finally:
        await writer.close()
        await pool.close()
    return len(sizes) - len(lone), lone


async def test_under_a_steady_load_a_batch_lingers_for_more_rows_and_a_lone_row_never_waits(
        gateway, database_url):
    """GATEWAY_AUDIT_LINGER_MS: while rows keep coming faster than one a linger, a batch
    waits (at most the linger) for more, so a load is written in fewer, bigger commits;
    rows a pause apart are each written at once, alone."""
    plain, lone = await _stream_of_rows(database_url, linger_s=0.0)
    lingering, lone_lingering = await _stream_of_rows(database_url, linger_s=0.02)
    assert lone == lone_lingering == [1, 1, 1]
    assert lingering * 2 <= plain, (lingering, plain)
