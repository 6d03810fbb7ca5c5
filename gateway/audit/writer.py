"""The audit writer: one per process, group commit, hash chains, fail closed.

Requests hand their row to `record()`; a lane takes every row queued while its previous
batch was being written, links them into its chain, writes them with one COPY, and only
then resolves every waiting future. A few lanes run at once, each with its own chain, so
one batch's commit latency overlaps the next. A response that carries personal data
awaits its future before it is sent, so it leaves the gateway only once its row is
committed. When the queue is full or the write fails, the waiting requests get 503
`audit_unavailable` and no data; the lane starts a new chain (an unanswered COMMIT may or
may not have landed, and a new chain keeps that doubt from looking like tampering) and
serves again once the database answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime

import asyncpg

from ..db import query
from ..errors import Denied
from .chain import GENESIS, HASHED, canonical, link

log = logging.getLogger("gateway.audit")

BATCH_MAX = 5000
LANES = 1          # batches in flight at once (each lane its own chain)
COLUMNS = HASHED + ("prev_hash", "row_hash")


@dataclass(slots=True)
class AuditRow:
    at: datetime
    request_id: str
    actor_sub: str | None = None
    actor_role: str | None = None
    actor_partner: str | None = None
    actor_euo: str | None = None
    method: str = ""
    path: str = ""
    service: str | None = None
    route: str | None = None
    data_sets: list[str] = field(default_factory=list)
    fields_removed: list[str] = field(default_factory=list)
    subject_euo: str | None = None
    subject_users: list[str] = field(default_factory=list)
    decision: str = "deny"
    reason: str | None = None
    status: int = 0
    bytes: int = 0
    duration_ms: float = 0.0
    client_addr: str | None = None
    client_request_id: str | None = None    # the client's own X-Request-Id, if it sent one
    requests: int | None = None             # refusals counted into this one row (None: one)


_REST_OF_ROW = operator.attrgetter(*HASHED[3:])   # the row's fields after at, chain_id, seq
assert HASHED[:3] == ("at", "chain_id", "seq")


def unavailable() -> Denied:
    return Denied(503, "audit_unavailable",
                  "the access log cannot be written right now; no data is served until it can")


class AuditWriter:
    """Queues rows and commits them through a few lanes, each a chain of its own."""

    def __init__(self, pool: asyncpg.Pool, queue_max: int,
                 observe: Callable[[AuditRow], None] | None = None, lanes: int = LANES):
        self.pool = pool
        self.observe = observe
        self.queue: asyncio.Queue[tuple[AuditRow, asyncio.Future]] = asyncio.Queue(queue_max)
        self.lanes = [_Lane(self) for _ in range(lanes)]
        self._tasks: list[asyncio.Task] = []
        self._partition_month: date | None = None
        self._partition_lock = asyncio.Lock()

    def record(self, row: AuditRow) -> asyncio.Future:
        """Queue a row; the future resolves once it is committed (raises Denied if it cannot)."""
        fut = asyncio.get_running_loop().create_future()
        if self.observe is not None:
            self.observe(row)
        try:
            self.queue.put_nowait((row, fut))
        except asyncio.QueueFull:
            fut.set_exception(unavailable())
        return fut

    def record_nowait(self, row: AuditRow) -> None:
        """Queue a row nobody waits for (denials carry no personal data)."""
        self.record(row).add_done_callback(_retrieve)

    async def commit(self, row: AuditRow) -> None:
        """Queue a row and wait until it is durable."""
        await self.record(row)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(lane.run()) for lane in self.lanes]

    async def close(self) -> None:
        """Write what is queued, then stop."""
        if not self._tasks:
            return
        await self.queue.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for lane in self.lanes:
            await lane.drop_connection()

    async def ensure_partition(self, conn: asyncpg.Connection, day: date) -> None:
        """Create this month's and next month's partitions once a month per process."""
        month = day.replace(day=1)
        if self._partition_month == month:
            return
        async with self._partition_lock:
            if self._partition_month == month:
                return
            await conn.execute(query("ensure_audit_partition"), month)
            next_month = date(month.year + month.month // 12, month.month % 12 + 1, 1)
            await conn.execute(query("ensure_audit_partition"), next_month)
            self._partition_month = month


class _Lane:
    """Group commit on one connection at a time: whatever queued while the previous batch
    was being written goes in the next, linked into this lane's chain."""

    def __init__(self, writer: AuditWriter):
        self.writer = writer
        self.conn: asyncpg.pool.PoolConnectionProxy | None = None
        self._new_chain()

    def _new_chain(self) -> None:
        self.chain_id = uuid.uuid4()
        self.seq = 0
        self.prev_hash = GENESIS

    async def run(self) -> None:
        queue = self.writer.queue
        while True:
            batch = [await queue.get()]
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            await self._write(batch)
            for _ in batch:
                queue.task_done()

    async def drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self.writer.pool.release(conn, timeout=1)

    def _link(self, batch: list[tuple[AuditRow, asyncio.Future]]) -> tuple[list[tuple], bytes]:
        records, prev, seq = [], self.prev_hash, self.seq
        chain_id = self.chain_id
        for row, _ in batch:
            seq += 1
            values = (row.at, chain_id, seq, *_REST_OF_ROW(row))
            row_hash = link(prev, canonical(values))
            records.append((*values, prev, row_hash))
            prev = row_hash
        return records, prev

    async def _write(self, batch: list[tuple[AuditRow, asyncio.Future]]) -> None:
        records, last_hash = self._link(batch)
        try:
            # the lane keeps its connection: no pool round trip (and reset) per batch
            if self.conn is None:
                self.conn = await self.writer.pool.acquire(timeout=2)
            await self.writer.ensure_partition(self.conn, batch[0][0].at.date())
            await self.conn.copy_records_to_table("audit_log", records=records, columns=COLUMNS)
        except Exception as e:  # any failure means the rows are not durable: fail closed
            log.error("audit write of %d rows failed: %s", len(batch), e)
            await self.drop_connection()
            self._new_chain()
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(unavailable())
            return
        self.seq += len(records)
        self.prev_hash = last_hash
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # logged by the writer already; retrieved so asyncio stays quiet
