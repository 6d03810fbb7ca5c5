"""Hash chains over audit rows: the canonical encoding, and verification.

Each writer (one per process) numbers its rows 1, 2, 3, … in its own chain and stores
row_hash = sha256(prev_hash || canonical(row)), with prev_hash the previous row's hash
(32 zero bytes for the first). An altered row no longer matches its hash; a removed row
leaves a gap in the numbers; either is reported as the chain's first break.
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
          # added by 006_audit_row_v2.sql: hashed only when set, so older rows still verify
          "client_request_id", "requests")
_OPTIONAL = 2


_DURATION = HASHED.index("duration_ms")


def canonical(values: Sequence[Any]) -> bytes:
    """The bytes a row's hash covers: its fields in HASHED order, the time in UTC, the
    trailing optional fields left out while they are null.

    Works alike on what the writer holds and on an asyncpg record read back."""
    v = list(values)
    v[0] = v[0].astimezone(UTC)
    v[1] = str(v[1])          # asyncpg's UUID type and uuid.UUID print alike
    v[_DURATION] = float(v[_DURATION])
    for _ in range(_OPTIONAL):
        if v[-1] is not None:
            break
        v.pop()
    return orjson.dumps(v)


def record_values(record: asyncpg.Record) -> tuple:
    return tuple(record[name] for name in HASHED)


def link(prev_hash: bytes, encoded: bytes) -> bytes:
    return hashlib.sha256(prev_hash + encoded).digest()


@dataclass
class ChainReport:
    chains: int = 0
    rows: int = 0
    first_break: dict[str, Any] | None = None
    pruned_chains: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.first_break is None

    def public(self) -> dict[str, Any]:
        return {"ok": self.ok, "chains_checked": self.chains, "rows_checked": self.rows,
                "first_break": self.first_break,
                "chains_starting_after_pruned_rows": self.pruned_chains}


async def verify(conn: asyncpg.Connection) -> ChainReport:
    """Walk every chain in order and report what was checked and the first break."""
    report = ChainReport()
    for chain in await conn.fetch(query("audit_chains")):
        report.chains += 1
        chain_id = chain["chain_id"]
        expected_seq, prev = None, None
        async with conn.transaction():
            async for row in conn.cursor(query("audit_chain_rows"), chain_id, prefetch=2000):
                report.rows += 1
                seq = row["seq"]
                if expected_seq is None:
                    if seq != 1:                      # older rows went with a pruned partition
                        report.pruned_chains.append(str(chain_id))
                    prev = row["prev_hash"]
                elif seq != expected_seq:
                    return _broken(report, chain_id, expected_seq,
                                   f"rows {expected_seq}..{seq - 1} are missing")
                if row["prev_hash"] != prev:
                    return _broken(report, chain_id, seq, "prev_hash does not match the row before")
                if link(prev, canonical(record_values(row))) != row["row_hash"]:
                    return _broken(report, chain_id, seq, "the row was altered after it was written")
                prev, expected_seq = row["row_hash"], seq + 1
    return report


def _broken(report: ChainReport, chain_id, seq: int, problem: str) -> ChainReport:
    report.first_break = {"chain_id": str(chain_id), "seq": seq, "problem": problem}
    return report
