"""The audit writer: one per process, group commit, hash chains, fail closed.

Requests hand their row to `record()`; a lane takes every row queued while its previous
batch was being written (so batches grow with the load, and a row arriving at an idle
lane is written at once), links them into its chain, writes them and moves the chain's
head (`audit_chain_heads`) in one statement — one round trip, one transaction — and only
then resolves every waiting future. A few lanes run at once, each with its own chain, so one batch's
commit latency overlaps the next. A response that carries personal data awaits its future
before it is sent, so it leaves the gateway only once its row is committed.

Every waited row has a deadline (`commit_timeout_s` after it was queued). Past it the
caller gets 503 `audit_unavailable` and no data, the row is never reported committed, and
a batch still being written for it is abandoned: the lane drops its connection, and the
statement itself writes nothing once it runs past the batch's deadline (checked in the
database after any lock wait), and the lane starts a new chain, as it does on any
failure (an unanswered COMMIT may or may not have landed, and a new chain keeps that doubt
from looking like tampering). When the queue is full the caller gets the 503 at once.
`health()` says, without touching the database, whether the writer keeps its deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import operator
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from ..db import durability_problems, query
from ..errors import Denied
from .chain import GENESIS, HASHED
from .leaves import WRITTEN, hash_and_leaf

log = logging.getLogger("gateway.audit")

BATCH_MAX = 5000
LANES = 1          # batches in flight at once (each lane its own chain)
LINGER_ROWS = 64   # a lingering batch stops waiting once it holds this many rows
COMMIT_TIMEOUT_S = 2.0
DEADLINE_MARGIN_S = 0.005   # the database's deadline for a batch: this much before ours
PROBE_EVERY_S = 0.5   # while failing and idle, how often a lane checks the database is back
COLUMNS = HASHED + ("prev_hash", "row_hash")
LEAVES_MAX = 1_000_000    # unsealed Merkle leaves a lane keeps (~70 MB) for its checkpoint


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
    trace_id: str | None = None             # the W3C trace the request belongs to
    policy_version: str | None = None       # the policy in force when it was decided
    break_glass: str | None = None          # the break-glass grant it was served under
    # what redaction withheld and why: canonical JSON {reason: {data set: count}}
    withheld: str | None = None
    # a two-row call's row: 'intent' (committed before the backend call or the first byte)
    # or 'outcome' (how it ended); None: a call of one row
    phase: str | None = None
    # how the data sets were touched: served, acted_upon, named, explained (None: refused)
    access: str | None = None


_REST_OF_ROW = operator.attrgetter(*WRITTEN[3:])  # the row's fields after at, chain_id, seq
assert HASHED[:3] == ("at", "chain_id", "seq")


@dataclass(slots=True)
class _Pending:
    row: AuditRow
    fut: asyncio.Future
    queued_at: float          # loop time
    deadline: float | None    # loop time; None: nobody waits (the row still gets written)
    # a state change that commits with this row or not at all (run in the batch's
    # transaction, in a savepoint: if it raises, it and its row are left out)
    change: Change | None = None


Change = Callable[[asyncpg.Connection], Awaitable[Any]]


# what the database (or the encoding of a value for it) refuses in one row: not a failure
# of the log, which other rows' callers should pay for
POISON = (asyncpg.DataError, UnicodeError)


def unavailable() -> Denied:
    """The refusal of a request whose audit row cannot be committed in time."""
    return Denied("audit_unavailable",
                  "the access log cannot be written right now; no data is served until it can")


def outcome_unknown(request_id: str) -> Denied:
    """The answer to a change that may have been made but whose outcome is not recorded:
    its COMMIT went unanswered, or (a written-ahead call) its outcome row could not be
    written after the backend was called."""
    return Denied("outcome_unknown",
                  f"the change may or may not have been made (request id {request_id}): send "
                  f"the same request with the same Idempotency-Key to learn what happened, or "
                  f"read the resource back before trying again")


class AuditWriter:
    """Queues rows and commits them through a few lanes, each a chain of its own."""

    def __init__(self, pool: asyncpg.Pool, queue_max: int, lanes: int = LANES,
                 commit_timeout_s: float = COMMIT_TIMEOUT_S, linger_s: float = 0.0):
        self.pool = pool
        # while rows keep coming faster than one a linger, a batch waits up to this long
        # for more before it is written: fewer, bigger commits (one transaction id, one
        # fsync each) under load; a row after a pause longer than the linger is written at
        # once. The arrival gap: the last one, and a moving average of them.
        self.linger_s = linger_s
        self._last_arrival = -math.inf
        self._gap = self._avg_gap = math.inf
        self._loop = asyncio.get_running_loop()    # once: each lookup is a getpid() on 3.11
        # (rows, seconds from taking the batch to its COMMIT) of every committed batch
        self.on_batch: Callable[[int, float], None] | None = None
        self.queue_max = queue_max
        self.commit_timeout_s = commit_timeout_s
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._unfinished = 0            # queued or being written
        self._drained = asyncio.Event()
        self._drained.set()
        self._failing = False           # the last batch (or probe) failed
        self.not_durable: list[str] = []    # what makes the server's commits less than durable
        # one timer for every waited row's deadline (not one per row): armed for the
        # nearest, it refuses the rows due and re-arms for the next
        self._watch: asyncio.TimerHandle | None = None
        self.lanes = [_Lane(self) for _ in range(lanes)]
        self._tasks: list[asyncio.Task] = []

    def record(self, row: AuditRow, wait: bool = True, change: Change | None = None
               ) -> asyncio.Future:
        """Queue a row; the future resolves once it is committed (raises Denied if it cannot),
        to what `change` returned when the row carries a state change."""
        loop = self._loop
        fut = loop.create_future()
        if len(self._queue) >= self.queue_max:
            fut.set_exception(unavailable())
            return fut
        now = loop.time()
        self._gap = now - self._last_arrival
        self._avg_gap = self._gap if self._avg_gap == math.inf else \
            0.8 * self._avg_gap + 0.2 * min(self._gap, 1.0)
        self._last_arrival = now
        deadline = now + self.commit_timeout_s if wait else None
        self._queue.append(_Pending(row, fut, now, deadline, change))
        if deadline is not None and self._watch is None:
            self._watch = loop.call_at(deadline, self._watchdog)
        self._unfinished += 1
        self._drained.clear()
        self._arrived.set()
        return fut

    def _steady(self) -> bool:
        """Rows come faster than one a linger (the last one too): more will come soon."""
        return self._gap < self.linger_s and self._avg_gap < self.linger_s

    def record_nowait(self, row: AuditRow) -> None:
        """Queue a row nobody waits for (denials carry no personal data)."""
        self.record(row, wait=False).add_done_callback(_retrieve)

    async def commit(self, row: AuditRow, change: Change | None = None) -> Any:
        """Queue a row and wait until it is durable, at most the commit timeout (then 503).
        With `change`, the state change and the row commit in one transaction or neither
        does; returns what the change returned, or raises what it raised (nothing changed).

        While the last batch failed it answers 503 at once: a request that already waited
        out one deadline (and now records its refusal) must not wait out a second."""
        if self._failing:
            raise unavailable()
        # no timer of its own (the watchdog's refuses it at its deadline) and no shield (an
        # extra future and two callbacks per row): a caller cancelled while waiting cancels
        # `fut`, and a lane writes a row whose future was cancelled all the same
        return await self.record(row, change=change)

    def _watchdog(self) -> None:
        """Refuse every waited row whose deadline passed, in a batch being written or in the
        queue (its caller gets 503, and from now on nobody may take the row as committed:
        its batch misses the deadline too and is abandoned); re-arm for the next deadline."""
        self._watch = None
        now, nearest = self._loop.time(), None
        for lane in self.lanes:
            for item in lane.batch:
                nearest = self._expire(item, now, nearest)
        for item in self._queue:             # queued in deadline order: the first one not due
            if item.deadline is not None and item.deadline > now and not item.fut.done():
                nearest = item.deadline if nearest is None else min(nearest, item.deadline)
                break
            nearest = self._expire(item, now, nearest)
        if nearest is not None:
            self._watch = self._loop.call_at(nearest, self._watchdog)

    def _expire(self, item: _Pending, now: float, nearest: float | None) -> float | None:
        """Refuse `item` if it is waited for and due; the nearest deadline still to come."""
        if item.deadline is None or item.fut.done():
            return nearest
        if item.deadline <= now:
            self._failing = True
            committing = item.change is not None and any(
                lane.committing and any(x is item for x in lane.batch) for lane in self.lanes)
            item.fut.set_exception(outcome_unknown(item.row.request_id) if committing
                                   else unavailable())
            item.fut.add_done_callback(_retrieve)
            return nearest
        return item.deadline if nearest is None else min(nearest, item.deadline)

    def heads(self) -> list[tuple[uuid.UUID, int, bytes]]:
        """(chain id, last committed seq, its row hash) of each lane: what a checkpoint signs."""
        return [(lane.chain_id, lane.seq, lane.prev_hash) for lane in self.lanes]

    def leaves(self, chain_id: uuid.UUID, after: int, upto: int) -> list[bytes] | None:
        """The Merkle leaves (leaves.py) of a chain's committed rows after+1 .. upto, as the
        writer wrote them; None when it does not hold them all (another process's chain, one
        it gave up, or leaves already sealed). The checkpoint builds its tree from these
        instead of reading every row back."""
        for lane in self.lanes:
            if lane.chain_id == chain_id:
                lo, hi = after - lane.leaves_from, upto - lane.leaves_from
                if 0 <= lo <= hi <= len(lane.leaves):
                    return lane.leaves[lo:hi]
        return None

    def sealed(self, chain_id: uuid.UUID, upto: int) -> None:
        """A checkpoint holds the chain's tree up to `upto` leaves: their leaves may go."""
        for lane in self.lanes:
            if lane.chain_id == chain_id and upto > lane.leaves_from:
                del lane.leaves[:upto - lane.leaves_from]
                lane.leaves_from = upto

    def queue_depth(self) -> int:
        """Rows waiting for a lane (not those being written)."""
        return len(self._queue)

    def health(self) -> list[str]:
        """Why the writer is not keeping its commit deadline right now (empty: it is)."""
        reasons = []
        oldest = min((lane.writing_since for lane in self.lanes if lane.writing_since is not None),
                     default=None)
        if self._queue:
            first = self._queue[0].queued_at
            oldest = first if oldest is None else min(oldest, first)
        if oldest is not None and self._loop.time() - oldest > self.commit_timeout_s:
            reasons.append("audit_queue_stalled")
        if self._failing:
            reasons.append("audit_write_failed")
        if self.not_durable:
            reasons.append("database_not_durable")
        return reasons

    def start(self) -> None:
        """Start the lanes."""
        self._tasks = [asyncio.create_task(lane.run()) for lane in self.lanes]

    async def close(self) -> None:
        """Write what is queued (each batch bounded by its deadline), close the chains, stop."""
        if not self._tasks:
            return
        try:
            async with asyncio.timeout(2 * self.commit_timeout_s + 1):
                await self._drained.wait()
        except TimeoutError:
            log.error("audit writer closed with %d rows not written", self._unfinished)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for lane in self.lanes:
            await lane.close_chain()
            await lane.drop_connection()

    def _take(self) -> list[_Pending]:
        """Everything queued (up to BATCH_MAX) whose caller has not given up yet."""
        batch, expired = [], 0
        queue, now = self._queue, self._loop.time()
        while queue and len(batch) < BATCH_MAX:
            item = queue.popleft()
            if item.fut.cancelled() and (item.deadline is None or item.deadline > now):
                batch.append(item)       # its caller was cancelled: written, nobody waits
            elif item.fut.done() or (item.deadline is not None and item.deadline <= now):
                self._expire(item, now, None)    # refused, if the watchdog has not yet
                expired += 1
            else:
                batch.append(item)
        if not queue:
            self._arrived.clear()
        if expired:
            log.error("%d audit rows expired in the queue (their callers got 503)", expired)
            self._finished(expired)
        return batch

    def _finished(self, count: int) -> None:
        self._unfinished -= count
        if self._unfinished == 0:
            self._drained.set()


class _Lane:

    """Group commit on one connection at a time: whatever queued while the previous batch
    was being written goes in the next, linked into this lane's chain."""

    def __init__(self, writer: AuditWriter):
        self.writer = writer
        self.conn: asyncpg.pool.PoolConnectionProxy | None = None
        self.writing_since: float | None = None     # queue time of the oldest row in flight
        self.batch: list[_Pending] = []             # the rows in flight
        self.committing = False     # its COMMIT is sent: a failure now leaves it in doubt
        self._new_chain()

    def _new_chain(self) -> None:
        self.chain_id = uuid.uuid4()
        self._chain_text = str(self.chain_id)    # as rows carry it (hashed as text; asyncpg
        self.seq = 0                             # encodes text for a uuid column)
        self.prev_hash = GENESIS
        # the committed rows' Merkle leaves not yet sealed: those of seq leaves_from+1 ..
        # (bounded by what one checkpoint interval commits)
        self.leaves: list[bytes] = []
        self.leaves_from = 0

    async def run(self) -> None:
        """Write batches as rows arrive; while failing and idle, probe until the database is back."""
        writer = self.writer
        while True:
            batch = writer._take()
            if batch and len(batch) < LINGER_ROWS and writer._steady():
                batch += await self._linger(len(batch))
            if batch:
                self.writing_since = batch[0].queued_at
                self.batch = batch
                try:
                    await self._write(batch)
                finally:
                    self.writing_since = None
                    self.batch = []
                    writer._finished(len(batch))
                continue
            if not writer._failing:
                await writer._arrived.wait()
                continue
            await self._probe()
            if writer._failing:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PROBE_EVERY_S):
                        await writer._arrived.wait()

    async def _linger(self, have: int) -> list[_Pending]:
        """Wait up to the writer's linger for more rows (until LINGER_ROWS are there);
        what came meanwhile."""
        writer = self.writer
        loop = writer._loop
        until = loop.time() + writer.linger_s
        while have + len(writer._queue) < LINGER_ROWS and (left := until - loop.time()) > 0:
            writer._arrived.clear()          # wake on the next arrival (this lane takes all)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await writer._arrived.wait()
        return writer._take()

    async def _connect(self) -> None:
        if self.conn is not None and _closed(self.conn):
            # the server closed it (a restart, a crash, a terminated backend): a batch on it
            # would fail, and its callers get 503, for nothing
            await self.drop_connection()
        if self.conn is None:
            # the lane keeps its connection: no pool round trip (and reset) per batch
            conn = await self.writer.pool.acquire()
            self.conn = conn
            fields = [r[0] for r in await conn.fetch(query("audit_row_in_fields"))]
            if fields != list(COLUMNS):
                raise RuntimeError("the database's audit_row_in does not have the writer's "
                                   "columns (migrations not applied?)")
            not_durable = await durability_problems(conn)
            if not_durable != self.writer.not_durable:
                if not_durable:
                    log.error("the database's commits are not durable (%s): not ready",
                              ", ".join(not_durable))
                self.writer.not_durable = not_durable

    async def _probe(self) -> None:
        """Whether a COPY into audit_log could start now; clears the failing state if so."""
        try:
            async with asyncio.timeout(self.writer.commit_timeout_s):
                await self._connect()
                probe = self.conn.transaction()
                await probe.start()
                await self.conn.execute(query("audit_write_probe"))
                await probe.rollback()
        except Exception as e:  # still failing: keep probing
            log.warning("audit log still not writable: %s", str(e) or type(e).__name__)
            await self.drop_connection()
            return
        self.writer._failing = False
        log.info("the audit log can be written again")

    async def drop_connection(self) -> None:
        """Let go of the connection without waiting on a database that may not answer."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        # closing the socket first: PostgreSQL rolls back an open batch, and nothing waits
        # on a backend that may not answer (raises if the pool already took it back)
        with contextlib.suppress(Exception):
            conn.terminate()
        with contextlib.suppress(Exception):
            await self.writer.pool.release(conn, timeout=1)

    async def close_chain(self) -> None:
        """Mark this lane's chain closed on a clean shutdown (nothing more will follow)."""
        if self.conn is None or self.seq == 0 or self.writer._failing:
            return
        try:
            async with asyncio.timeout(self.writer.commit_timeout_s):
                await self.conn.execute(query("audit_chain_close"), self.chain_id)
        except Exception as e:  # the head stays open at what was committed
            log.warning("could not close audit chain %s: %s", self.chain_id, e)

    def _link(self, batch: list[_Pending]) -> tuple[list[tuple], bytes, list[bytes]]:
        """The batch's rows as audit_log's row type, chained; the last row's hash; and the
        rows' Merkle leaves."""
        records, leaves, prev, seq = [], [], self.prev_hash, self.seq
        chain_id = self._chain_text
        for item in batch:
            seq += 1
            values = (item.row.at, chain_id, seq, *_REST_OF_ROW(item.row))
            values, row_hash, one = hash_and_leaf(values, prev)
            records.append(_as_input(values, prev, row_hash))
            leaves.append(one)
            prev = row_hash
        return records, prev, leaves

    async def _write(self, batch: list[_Pending], retry: bool = True) -> None:
        writer = self.writer
        # the batch must commit before its earliest waiting caller gives up
        deadline = min((i.deadline for i in batch if i.deadline is not None),
                       default=writer._loop.time() + writer.commit_timeout_s)
        changed: dict[int, Any] = {}          # index in batch -> what its change returned
        refused: dict[int, BaseException] = {}
        last_seq, last_hash = self.seq, self.prev_hash
        started = writer._loop.time()
        batch_tx = None
        try:
            async with asyncio.timeout_at(deadline):
                await self._connect()
                # never DDL here: the runtime role may not create partitions, and a month
                # without one (see `gateway audit maintain`) goes to audit_log_default
                # no `async with`: on failure its ROLLBACK would wait on a stuck backend;
                # dropping the connection rolls the batch back without waiting
                if any(item.change is not None for item in batch):
                    # state changes: a transaction around them and the rows
                    batch_tx = self.conn.transaction()
                    await batch_tx.start()
                    for i, item in enumerate(batch):
                        if item.change is not None:
                            await self._change(i, item, changed, refused)
                written = [item for i, item in enumerate(batch) if i not in refused]
                records, last_hash, leaves = self._link(written)
                last_seq = self.seq + len(records)
                if records:
                    left = deadline - writer._loop.time() - DEADLINE_MARGIN_S
                    head = await self.conn.fetchval(query("audit_write_batch"), records,
                                                    self.chain_id, last_seq, last_hash, left)
                    if head != last_seq:
                        raise TimeoutError("the batch reached the database past its deadline")
                if batch_tx is not None:
                    self.committing = True
                    await batch_tx.commit()
        except POISON as e:
            # a value the database (or its encoding) refuses: one row's, not the batch's.
            # Nothing of the batch committed and the connection is sound: write each row
            # alone, so only the row that holds it fails (its caller gets 502)
            await self._refused(batch, batch_tx, e)
            return
        except Exception as e:  # any failure means the rows are not durable: fail closed
            if retry and _unsent(e):
                # the server had closed the connection before this batch could be sent (the
                # client library refused to send it): nothing of it reached the database,
                # so it goes again, once, on a new connection
                await self.drop_connection()
                self._new_chain()
                await self._write(batch, retry=False)
                return
            log.error("audit write of %d rows failed: %s", len(batch), str(e) or type(e).__name__)
            writer._failing = True
            await self.drop_connection()
            self._new_chain()
            for item in batch:
                if not item.fut.done():
                    # a change whose COMMIT went unanswered may have landed: say so, never
                    # "failed" (the caller can retry with its Idempotency-Key)
                    item.fut.set_exception(
                        outcome_unknown(item.row.request_id)
                        if self.committing and item.change is not None else unavailable())
            return
        finally:
            self.committing = False
        writer._failing = False
        self.seq, self.prev_hash = last_seq, last_hash
        if records:
            self.leaves.extend(leaves)
            if len(self.leaves) > LEAVES_MAX:       # checkpoints failing for long: let go
                self.leaves_from += len(self.leaves)    # (the next one reads the rows back)
                self.leaves = []
        if writer.on_batch is not None:
            writer.on_batch(len(batch) - len(refused), writer._loop.time() - started)
        late = 0
        for i, item in enumerate(batch):
            if item.fut.cancelled():
                continue                 # its caller was cancelled; the row was written
            if item.fut.done():
                late += i not in refused
            elif i in refused:
                item.fut.set_exception(refused[i])
            else:
                item.fut.set_result(changed.get(i))
        if late:
            # the COMMIT was answered at the very deadline: these callers already got 503,
            # so the log holds rows for requests that served nothing (it over-reports)
            log.warning("%d audit rows committed just after their callers were refused", late)


    async def _refused(self, batch: list[_Pending], batch_tx, error: BaseException) -> None:
        """The database refused a value of the batch: write its rows one by one."""
        try:
            if batch_tx is not None:
                await batch_tx.rollback()
        except Exception:          # the connection is not sound after all: a fresh one
            await self.drop_connection()
        if len(batch) > 1:
            log.warning("the database refused a value in a batch of %d rows (%s): writing "
                        "them one by one", len(batch), type(error).__name__)
            for item in batch:
                if not item.fut.done() or item.fut.cancelled():
                    await self._write([item])
            return
        item = batch[0]
        log.error("the database refused audit row %s: %s", item.row.request_id,
                  str(error) or type(error).__name__)
        if not item.fut.done():
            item.fut.set_exception(Denied("audit_row_refused",
                                          "the database refused this request's audit row"))

    async def _change(self, i: int, item: _Pending, changed: dict, refused: dict) -> None:
        """Run one row's state change in a savepoint of the batch: if it raises (a refusal
        such as 404, or a constraint), it is rolled back and its row left out of the batch."""
        savepoint = self.conn.transaction()
        await savepoint.start()
        try:
            changed[i] = await item.change(self.conn)
        except (Denied, asyncpg.PostgresError) as e:
            await savepoint.rollback()
            refused[i] = e
            return
        await savepoint.commit()


_ARRAYS = tuple(COLUMNS.index(name) for name in ("data_sets", "fields_removed", "subject_users"))


def _as_input(values: tuple, prev: bytes, row_hash: bytes) -> tuple:
    """A chained row as audit_row_in (sql/026): COLUMNS' order, text[] as literals."""
    record = [*values, prev, row_hash]
    for i in _ARRAYS:
        record[i] = array_literal(record[i])
    return tuple(record)


def array_literal(items: Sequence[str | None] | None) -> str | None:
    """PostgreSQL's text form of a one-dimensional text[] ('{"a","b"}'; null: None).
    Every element is quoted, so commas, braces, spaces and the word NULL are plain text;
    a double quote or backslash in one is escaped."""
    if items is None:
        return None
    if not items:
        return "{}"
    if None in items:
        return "{" + ",".join("NULL" if e is None else _quoted(e) for e in items) + "}"
    body = '","'.join(items)
    if '"' in body or "\\" in body:
        return "{" + ",".join(map(_quoted, items)) + "}"
    return '{"' + body + '"}'


def _quoted(element: str) -> str:
    return '"' + element.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unsent(error: BaseException) -> bool:
    """Whether asyncpg refused to send a statement on a connection it already knew to be
    broken (closed, or left mid-protocol by the server's goodbye): nothing was sent. A
    connection lost while a statement was under way (ConnectionDoesNotExistError) is not
    that: the statement may have run."""
    if isinstance(error, asyncpg.InternalClientError):    # raised as the state is set,
        return "cannot switch to state" in str(error)       # before anything is written
    return (isinstance(error, asyncpg.InterfaceError)
            and not isinstance(error, asyncpg.ConnectionDoesNotExistError)
            and "connection is closed" in str(error))


def _closed(conn: asyncpg.pool.PoolConnectionProxy) -> bool:
    """Whether the server closed the connection (the pool may have taken it back already)."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # logged by the writer already; retrieved so asyncio stays quiet
