"""Verifiable slices: what sealing a checkpoint's Merkle tree costs per row, what the tree
stores, and how long a slice takes to build (the database) and to verify (offline).

    .venv/bin/python -m tests.bench.slice_bench [--rows 200000]

One chain of --rows synthetic rows about 50 EUOs, written with COPY into an embedded
PostgreSQL of its own; then one checkpoint seals them all (the worst case: a whole
backlog at once), and an EUO admin's slice of 100 and of 1000 rows is built and verified.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from multidict import MultiDict

from gateway.audit.chain import GENESIS, HASHED, canonical, link
from gateway.audit.checkpoints import Checkpointer, key_id
from gateway.audit.slice_check import verify_slice
from gateway.audit.slices import build_slice
from gateway.db import ensure_partitions, migrate
from gateway.embedded import EmbeddedPostgres
from gateway.policy.catalog_files import load_catalog
from gateway.principal import Principal
from gateway.settings import DEFAULT_POLICY_DIR


async def run(dsn: str, n: int) -> None:
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await ensure_partitions(conn)
    chain, prev, records = uuid.uuid4(), GENESIS, []
    start = datetime.now(UTC) - timedelta(hours=1)
    for i in range(n):
        v = dict.fromkeys(HASHED)
        v.update(at=start + timedelta(milliseconds=10 * i), chain_id=chain, seq=i + 1,
                 request_id=f"r{i}", actor_sub="staff", actor_role="provider_staff",
                 method="GET", path="/x", data_sets=["user_name"], fields_removed=[],
                 subject_euo=f"euo-{i % 50}", subject_users=[f"u{i % 7}"], decision="allow",
                 status=200, bytes=0, duration_ms=1.0, trace_id=uuid.uuid4().hex)
        h = link(prev, canonical([v[f] for f in HASHED]))
        records.append((*[v[f] for f in HASHED], prev, h))
        prev = h
    await conn.copy_records_to_table("audit_log", records=records,
                                     columns=(*HASHED, "prev_hash", "row_hash"))
    await conn.execute("analyze audit_log")
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    key = Ed25519PrivateKey.generate()
    checkpointer = Checkpointer(pool, lambda: [(chain, n, prev)], key, 3600)
    await checkpointer.start()
    t = time.perf_counter()
    await checkpointer.seal()
    sealed = time.perf_counter() - t
    size = await conn.fetchval("select pg_total_relation_size('audit_merkle_runs')")
    print(f"sealing {n} rows with their tree: {sealed:.2f} s ({sealed / n * 1e6:.0f} µs/row); "
          f"tree storage {size / n:.0f} bytes/row (nodes and index)")
    catalog = load_catalog(DEFAULT_POLICY_DIR)
    admin = Principal(sub="admin", role="euo_admin", euo="euo-7", kind=catalog.roles["euo_admin"])
    keys = {key_id(key.public_key()): key.public_key()}
    for limit in ("100", "1000"):
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            doc = await build_slice(conn, admin, MultiDict({"limit": limit}),
                                    catalog.data_subject_roles, key)
            best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        report = verify_slice(doc, keys)
        checked = time.perf_counter() - t
        print(f"slice of {limit} rows: built in {best * 1000:.0f} ms, verified offline in "
              f"{checked * 1000:.0f} ms (ok: {report['ok']}, "
              f"{len(doc['rows'][0]['inclusion'])} hashes per proof)")
    await checkpointer.close()
    await pool.close()
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slice-bench-") as where:
        server = EmbeddedPostgres(Path(where))
        dsn = server.start()
        try:
            asyncio.run(run(dsn, args.rows))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
