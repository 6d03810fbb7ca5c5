"""Hash chains over audit rows: the canonical encoding, and verification.

Each writer (one per process) numbers its rows 1, 2, 3, … in its own chain and stores
row_hash = sha256(prev_hash || canonical(row)), with prev_hash the previous row's hash
(32 zero bytes for the first). An altered row no longer matches its hash; a removed row
leaves a gap in the numbers; either is reported as the chain's first break.

Where each chain ends is kept apart, in `audit_chain_heads` (moved in the same transaction
as each batch), so rows missing at the end are seen too: a chain whose rows stop before its
head (tail cut off), a head with no rows at all (whole chain deleted, unless its rows went
with a pruned partition), and rows with no head (a chain nobody's writer opened). The heads
table refuses going backwards and deletes, but a superuser can still rewrite both tables
consistently; signed checkpoints kept outside the database would be needed to catch that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import asyncpg
import orjson

from ..db import query

GENESIS = bytes(32)

# the row's fields in the order they are hashed (and stored, after chain_id and seq)
HASHED = ("at", "chain_id", "seq", "request_id", "actor_sub", "actor_role", "actor_partner",
          "actor_euo", "method", "path", "service", "route", "data_sets", "fields_removed",
          "subject_euo", "subject_users", "decision", "reason", "status", "bytes", "duration_ms",
          "client_addr",
          # added later (006_audit_row_v2.sql, 011_audit_trace_id.sql,
          # 012_audit_policy_version.sql, 018_break_glass.sql, 014_audit_withheld.sql,
          # 027_audit_intent_outcome.sql, 028_audit_access.sql, 032_audit_salt.sql):
          # trailing fields are hashed only up to the last one set, so rows written before
          # a field existed (null in it) still verify; a new field is only ever appended here
          "client_request_id", "requests", "trace_id", "policy_version", "break_glass",
          "withheld", "phase", "access", "salt")
_OPTIONAL = 9


_DURATION = HASHED.index("duration_ms")
_BREAK_GLASS = HASHED.index("break_glass")


def canonical(values: Sequence[Any]) -> bytes:
    """The bytes a row's hash covers: its fields in HASHED order, the time in UTC, the
    trailing optional fields left out while they are null.

    Works alike on what the writer holds and on an asyncpg record read back."""
    v = list(values)
    v[0] = v[0].astimezone(UTC)
    v[1] = str(v[1])          # asyncpg's UUID type and uuid.UUID print alike
    v[_DURATION] = float(v[_DURATION])
    if v[_BREAK_GLASS] is not None:
        v[_BREAK_GLASS] = str(v[_BREAK_GLASS])     # a UUID read back, text when written
    for _ in range(_OPTIONAL):
        if v[-1] is not None:
            break
        v.pop()
    return orjson.dumps(v)


def canonical_pair(values: Sequence[Any], nulled: Sequence[int]) -> tuple[bytes, bytes]:
    """canonical(values), and canonical of the same values with the fields at `nulled` set
    to null, normalised once (the writer's row hash and Merkle leaf of each row)."""
    v = list(values)
    v[0] = v[0].astimezone(UTC)
    v[1] = str(v[1])
    v[_DURATION] = float(v[_DURATION])
    if v[_BREAK_GLASS] is not None:
        v[_BREAK_GLASS] = str(v[_BREAK_GLASS])
    full = orjson.dumps(v[:_trimmed(v)])
    for i in nulled:
        v[i] = None
    return full, orjson.dumps(v[:_trimmed(v)])


def _trimmed(v: list) -> int:
    """How many of the fields are hashed: the trailing optional ones left out while null."""
    n = len(v)
    for _ in range(_OPTIONAL):
        if v[n - 1] is not None:
            break
        n -= 1
    return n


def record_values(record: asyncpg.Record) -> tuple:
    return tuple(record[name] for name in HASHED)


def link(prev_hash: bytes, encoded: bytes) -> bytes:
    return hashlib.sha256(prev_hash + encoded).digest()


BREAKS_LISTED = 100    # a report names at most this many broken chains


@dataclass
class ChainReport:
    chains: int = 0
    rows: int = 0
    breaks: list[dict[str, Any]] = field(default_factory=list)
    pruned_chains: list[str] = field(default_factory=list)
    # intents with no outcome row (a change or a file whose end is not recorded): not a
    # break of the chain, but never reported as complete either
    outcome_unknown: list[dict[str, Any]] = field(default_factory=list)
    incremental: bool = False
    # chain -> (seq, row_hash) of its last row found whole (what verify may save)
    whole: dict[Any, tuple[int, bytes]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.breaks

    @property
    def first_break(self) -> dict[str, Any] | None:
        return self.breaks[0] if self.breaks else None

    def broken(self, chain_id, seq: int | None, problem: str) -> None:
        """Note one chain's (first) break."""
        if len(self.breaks) < BREAKS_LISTED:
            self.breaks.append({"chain_id": str(chain_id), "seq": seq, "problem": problem})

    def public(self) -> dict[str, Any]:
        return {"ok": self.ok, "incremental": self.incremental, "chains_checked": self.chains,
                "rows_checked": self.rows, "first_break": self.first_break, "breaks": self.breaks,
                "chains_starting_after_pruned_rows": self.pruned_chains,
                "outcome_unknown": self.outcome_unknown}


async def verify(conn: asyncpg.Connection, incremental: bool = False) -> ChainReport:
    """Walk every chain in order, compare its end with its head; report every broken chain.
    `incremental`: each chain only from where verify last found it whole (audit_verified,
    036): the rows after that row, linked from its hash, and that row itself unchanged if
    still there. What the last run walked is not read again: a full run (or the signed
    checkpoints) finds a change to it."""
    # one snapshot for heads and rows: a batch committed mid-walk must not look like a break
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if incremental:
            return await _verify_since(conn)
        return await _verify(conn)


async def save_watermarks(conn: asyncpg.Connection, report: ChainReport) -> None:
    """Record where each chain was found whole (a report without breaks only)."""
    if report.ok and report.whole:
        await conn.executemany(query("audit_verified_set"),
                               [(c, seq, h) for c, (seq, h) in report.whole.items()])


async def _verify_since(conn: asyncpg.Connection) -> ChainReport:
    report = ChainReport(incremental=True)
    marks = {r["chain_id"]: (r["seq"], bytes(r["row_hash"]))
             for r in await conn.fetch(query("audit_verified"))}
    for head in await conn.fetch(query("audit_chain_heads")):
        chain_id = head["chain_id"]
        if head["last_seq"] == 0:
            continue
        report.chains += 1
        seq, row_hash = marks.get(chain_id, (0, None))
        if seq:
            row = await conn.fetchrow(query("audit_row_at"), chain_id, seq)
            if row is not None and (bytes(row["row_hash"]) != row_hash or link(
                    row["prev_hash"], canonical(record_values(row))) != row["row_hash"]):
                report.broken(chain_id, seq, "the row verify last found whole was altered")
                continue
            if (seq, row_hash) == (head["last_seq"], bytes(head["last_hash"])):
                continue                          # nothing new since
        last = await _walk(conn, report, chain_id, after=(seq, row_hash) if seq else None)
        if last is not None:
            _compare_with_head(report, chain_id, last, head)
    return report


async def _verify(conn: asyncpg.Connection) -> ChainReport:
    report = ChainReport()
    heads = {h["chain_id"]: h for h in await conn.fetch(query("audit_chain_heads"))}
    for chain in await conn.fetch(query("audit_chains")):
        report.chains += 1
        chain_id = chain["chain_id"]
        last = await _walk(conn, report, chain_id)
        head = heads.pop(chain_id, None)
        if last is not None:                          # else broken inside: reported already
            _compare_with_head(report, chain_id, last, head)
    if heads:
        oldest_month = await conn.fetchval(query("audit_oldest_month"))
        for chain_id, head in heads.items():
            if head["last_seq"] == 0:
                continue
            if oldest_month is not None and head["updated_at"] < oldest_month:
                report.pruned_chains.append(str(chain_id))   # all its rows went with retention
                continue
            report.chains += 1
            report.broken(chain_id, 1, f"all {head['last_seq']} rows of the chain are missing")
    report.outcome_unknown = [
        {"request_id": r["request_id"], "at": r["at"].isoformat(), "chain_id": str(r["chain_id"]),
         "seq": r["seq"], "method": r["method"], "path": r["path"]}
        for r in await conn.fetch(query("audit_outcome_unknown"), BREAKS_LISTED)]
    return report


def _compare_with_head(report: ChainReport, chain_id, last: tuple[int, bytes], head) -> None:
    last_seq, last_hash = last
    if head is None:
        report.broken(chain_id, last_seq, "rows without a chain head")
    elif last_seq < head["last_seq"]:
        report.broken(chain_id, last_seq + 1,
                      f"rows {last_seq + 1}..{head['last_seq']} at the end of the chain "
                      "are missing")
    elif last_seq > head["last_seq"]:
        report.broken(chain_id, head["last_seq"] + 1, "rows after the chain's head")
    elif last_hash != head["last_hash"]:
        report.broken(chain_id, last_seq, "the last row does not match the chain's head")
    else:
        report.whole[chain_id] = (last_seq, bytes(last_hash))


async def _walk(conn: asyncpg.Connection, report: ChainReport, chain_id,
                after: tuple[int, bytes] | None = None) -> tuple[int, bytes] | None:
    """Check one chain's rows in order (with `after`, the rows past that (seq, row_hash),
    linked from it); its last (seq, row_hash), or None if it is broken."""
    expected_seq, prev = None, None
    rows = conn.cursor(query("audit_chain_rows"), chain_id, prefetch=2000)
    if after is not None:
        expected_seq, prev = after[0] + 1, after[1]
        rows = conn.cursor(query("audit_chain_rows_from"), chain_id, after[0], prefetch=2000)
    async for row in rows:
        report.rows += 1
        seq = row["seq"]
        if expected_seq is None:
            if seq != 1:                          # older rows went with a pruned partition
                report.pruned_chains.append(str(chain_id))
            prev = row["prev_hash"]
        elif seq != expected_seq:
            report.broken(chain_id, expected_seq, f"rows {expected_seq}..{seq - 1} are missing")
            return None
        if row["prev_hash"] != prev:
            report.broken(chain_id, seq, "prev_hash does not match the row before")
            return None
        if link(prev, canonical(record_values(row))) != row["row_hash"]:
            report.broken(chain_id, seq, "the row was altered after it was written")
            return None
        prev, expected_seq = row["row_hash"], seq + 1
    return (expected_seq - 1, prev) if expected_seq is not None else None
