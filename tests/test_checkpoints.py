"""Signed checkpoints: whoever holds the public key can check the audit log without
trusting the database — a flipped bit, a dropped row, a forged key or a forged signature
is found; rows after the last checkpoint are reported as not yet sealed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.checkpoints import load_public_keys, verify_checkpoints

from .conftest import (
    call,
    connected,
    gateway_main,
    gateway_settings,
    own_database,
    running_gateway,
    wait_for,
)

pytestmark = pytest.mark.slow
ACME = "/telephony/euos/euo-acme"


@pytest_asyncio.fixture(scope="module")
async def sealed_db(database_url, template_database):
    """A database of this module's own (its rows get tampered with), with contracts."""
    async with own_database(database_url, template_database) as dsn:
        yield dsn


async def _sealed_chain(backends, dsn, http, token_for, tmp_path) -> tuple[uuid.UUID, list[str]]:
    """Serve a few requests through a gateway that seals every 0.2 s, then stop it (which
    seals the closed chain); return the chain and the public key files from /v1/audit/keys
    (every key ever used: each test's gateway generated its own)."""
    actor = f"sealed-{uuid.uuid4().hex[:8]}"
    settings = gateway_settings(backends["urls"], audit_checkpoint_s=0.2, data_dir=tmp_path)
    async with running_gateway(settings, dsn) as gw:
        for _ in range(3):
            assert (await call(http, "GET", gw + ACME,
                               token_for(role="provider_staff", sub=actor)))[0] == 200
        conn = await asyncpg.connect(dsn)
        try:
            chain = await conn.fetchval("select distinct chain_id from audit_log where actor_sub = $1",
                                        actor)

            async def sealed():
                return await conn.fetchval("select max(seq) from audit_checkpoints where chain_id = $1",
                                           chain)
            assert await wait_for(sealed, timeout=5)
        finally:
            await conn.close()
        status, _, body = await call(http, "GET", gw + "/v1/audit/keys")
        assert status == 200
    return chain, _key_files(orjson.loads(body)["keys"], tmp_path)


def _key_files(keys: list[dict], where) -> list[str]:
    files = []
    for key in keys:
        path = where / f"{key['key_id']}.pub.pem"
        path.write_text(key["public_key_pem"])
        files.append(str(path))
    return files


async def test_a_sealed_log_verifies_and_the_cli_says_so(backends, sealed_db, http, token_for,
                                                        tmp_path):
    chain, pems = await _sealed_chain(backends, sealed_db, http, token_for, tmp_path)
    conn = await asyncpg.connect(sealed_db)
    try:
        report = await verify_checkpoints(conn, load_public_keys(pems))
        assert report.ok and report.sealed[str(chain)] >= 3
        closed = await conn.fetchval("select bool_or(closed) from audit_checkpoints where chain_id = $1",
                                     chain)
        assert closed                         # a clean shutdown sealed the chain as closed
    finally:
        await conn.close()
    keys = [arg for pem in pems for arg in ("--public-key", pem)]
    done = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", *keys],
                          env={**os.environ, "GATEWAY_DATABASE_URL": sealed_db},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert orjson.loads(done.stdout)["checkpoints"]["ok"] is True


TAMPERING = {
    "flipped bit in a sealed row": (
        "update audit_log set row_hash = set_byte(row_hash, 0, get_byte(row_hash, 0) # 1)"
        " where chain_id = $1 and seq = (select max(seq) from audit_log where chain_id = $1)",
        "the sealed row was altered"),
    "sealed row dropped": (
        "delete from audit_log where chain_id = $1 and seq = (select max(seq) from audit_log"
        " where chain_id = $1)", "the sealed row is missing"),
    "forged signature": (
        "update audit_checkpoints set signature = set_byte(signature, 5, get_byte(signature, 5) # 1)"
        " where chain_id = $1", "the checkpoint's signature does not verify"),
    "re-signed with another key": (None, "which is not among the public keys given"),
}


@pytest.mark.parametrize("tampering", TAMPERING)
async def test_tampering_after_sealing_is_found(backends, sealed_db, http, token_for, tmp_path,
                                                tampering):
    """Each done as a superuser with the append-only triggers off, in a transaction that
    is rolled back."""
    chain, pems = await _sealed_chain(backends, sealed_db, http, token_for, tmp_path)
    statement, problem = TAMPERING[tampering]
    keys = load_public_keys(pems)
    if statement is None:                  # the verifier holds a key the log was not signed with
        other = tmp_path / "other.pub.pem"
        other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        keys = load_public_keys([other])
    conn = await asyncpg.connect(sealed_db)
    try:
        tampered = conn.transaction(isolation="repeatable_read")
        await tampered.start()
        try:
            await conn.execute("alter table audit_log disable trigger audit_log_append_only")
            await conn.execute("alter table audit_checkpoints disable trigger "
                               "audit_checkpoints_append_only")
            if statement:
                await conn.execute(statement, chain)
            report = await verify_checkpoints(conn, keys)
        finally:
            await tampered.rollback()
        assert not report.ok and problem in report.first_break["problem"]
        assert (await verify_checkpoints(conn, load_public_keys(pems))).ok
    finally:
        await conn.close()


async def test_rows_after_the_last_checkpoint_are_not_yet_sealed(backends, sealed_db, http,
                                                                token_for, tmp_path):
    settings = gateway_settings(backends["urls"], audit_checkpoint_s=3600, data_dir=tmp_path)
    async with running_gateway(settings, sealed_db) as gw:
        assert (await call(http, "GET", gw + ACME, token_for("staff")))[0] == 200
        status, _, body = await call(http, "GET", gw + "/v1/audit/keys")
        pems = _key_files(orjson.loads(body)["keys"], tmp_path)
        conn = await asyncpg.connect(sealed_db)
        try:
            report = await verify_checkpoints(conn, load_public_keys(pems))
        finally:
            await conn.close()
    assert report.ok and report.not_yet_sealed   # this gateway's chain: not sealed until it stops


async def test_checkpoints_are_listed_for_auditors(backends, sealed_db, http, token_for, tmp_path):
    chain, _ = await _sealed_chain(backends, sealed_db, http, token_for, tmp_path)
    async with running_gateway(gateway_settings(backends["urls"], data_dir=tmp_path), sealed_db) as gw:
        status, _, body = await call(http, "GET", gw + "/v1/audit/checkpoints?limit=1000",
                                     token_for("admin"))
        assert status == 200
        listed = orjson.loads(body)["checkpoints"]
        assert any(c["chain_id"] == str(chain) for c in listed)
        assert (await call(http, "GET", gw + "/v1/audit/checkpoints", token_for("alice")))[0] == 403


async def _three_rows(http, gw: str, token_for, db) -> uuid.UUID:
    """Three audited reads by an actor of its own; the chain their rows are in."""
    actor = f"three-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        assert (await call(http, "GET", gw + ACME,
                           token_for(role="provider_staff", sub=actor)))[0] == 200
    return await db.fetchval("select distinct chain_id from audit_log where actor_sub = $1",
                             actor)


async def test_a_row_altered_before_its_seal_is_found_against_what_was_written(
        backends, http, token_for, tmp_path, database_url, template_database):
    """The checkpoint builds its tree from the leaves the writer committed, not from the
    rows read back: a row altered between its commit and the seal does not get itself
    signed. The signed root is that of the rows as written, which the altered rows no
    longer give (and the chain walk names the row)."""
    from gateway.audit.chain import verify
    from gateway.audit.leaves import record_leaf
    from gateway.audit.merkle import Frontier

    async def root_of_rows(conn, chain) -> bytes:
        tree = Frontier()
        for row in await conn.fetch("select * from audit_log where chain_id = $1 order by seq",
                                    chain):
            tree.append(record_leaf(row))
        return tree.root()

    async with own_database(database_url, template_database) as dsn:
        settings = gateway_settings(backends["urls"], audit_checkpoint_s=3600, data_dir=tmp_path)
        conn = await asyncpg.connect(dsn)
        try:
            async with running_gateway(settings, dsn) as gw:
                chain = await _three_rows(http, gw, token_for, conn)
                written = await conn.fetchval(
                    "select data_sets from audit_log where chain_id = $1 and seq = 2", chain)
                await conn.execute("alter table audit_log disable trigger audit_log_append_only")
                await conn.execute("update audit_log set data_sets = array['nothing'] "
                                   "where chain_id = $1 and seq = 2", chain)
            # stopped: the closed chain was sealed, with a tree of its three rows
            version, size, root = await conn.fetchrow(
                "select version, tree_size, root from audit_checkpoints where chain_id = $1 "
                "order by id desc limit 1", chain)
            assert (version, size) == (2, 3)
            assert bytes(root) != await root_of_rows(conn, chain)
            report = await verify(conn)
            assert [b["seq"] for b in report.breaks if b["chain_id"] == str(chain)] == [2]
            await conn.execute("update audit_log set data_sets = $2 "
                               "where chain_id = $1 and seq = 2", chain, written)
            assert bytes(root) == await root_of_rows(conn, chain)     # as written: signed
        finally:
            await conn.close()


async def _seal_elsewhere(pool: asyncpg.Pool, chain: uuid.UUID) -> asyncpg.Record:
    """Seal a chain's head as another process would (a checkpointer holding none of its
    leaves: it reads the rows back); (version, tree_size, root) of the checkpoint written."""
    from gateway.audit.checkpoints import Checkpointer

    head = await pool.fetchrow("select last_seq, last_hash from audit_chain_heads "
                               "where chain_id = $1", chain)
    other = Checkpointer(pool, lambda: [(chain, head["last_seq"], head["last_hash"])],
                         Ed25519PrivateKey.generate(), 3600)
    await other.start()
    assert await other.seal() == 1
    await other.close()
    return await pool.fetchrow("select version, tree_size, root from audit_checkpoints "
                               "where chain_id = $1 order by id desc limit 1", chain)


async def test_a_chain_the_writer_does_not_hold_is_sealed_from_its_rows_read_back(
        backends, http, token_for, tmp_path, database_url, template_database):
    """Another process's chain (or one past the writer's bound of unsealed leaves): the
    checkpoint reads its rows back, checks them against their chain and builds the same
    tree the rows give."""
    from gateway.audit.leaves import record_leaf
    from gateway.audit.merkle import Frontier

    async with own_database(database_url, template_database) as dsn:
        settings = gateway_settings(backends["urls"], audit_checkpoint_s=3600, data_dir=tmp_path)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            async with running_gateway(settings, dsn) as gw:
                chain = await _three_rows(http, gw, token_for, pool)
                head = await pool.fetchrow("select last_seq from audit_chain_heads "
                                           "where chain_id = $1", chain)
                version, size, root = await _seal_elsewhere(pool, chain)
                tree = Frontier()
                for row in await pool.fetch("select * from audit_log where chain_id = $1 "
                                            "order by seq", chain):
                    tree.append(record_leaf(row))
        finally:
            await pool.close()
    assert (version, size) == (2, head["last_seq"]) and bytes(root) == tree.root()


async def test_a_tree_stored_a_node_a_row_before_goes_on_growing_and_proving(
        backends, http, token_for, tmp_path, database_url, template_database):
    """A chain sealed before 024 has its nodes one a row (audit_merkle_nodes); sealed again
    after it, its tree grows from them, its new nodes are stored a run of a level a row
    (one row per level), and every row's inclusion proof and the consistency proof between
    the two checkpoints are read from both tables and verify against the signed roots."""
    from gateway.audit.checkpoints import fetch_nodes
    from gateway.audit.leaves import record_leaf
    from gateway.audit.merkle import (
        consistency_ranges,
        hashes_of,
        inclusion_ranges,
        nodes_for,
        verify_consistency,
        verify_inclusion,
    )

    async def seal(pool, chain) -> tuple[int, bytes]:
        _, size, root = await _seal_elsewhere(pool, chain)
        return size, bytes(root)

    async with own_database(database_url, template_database) as dsn:
        settings = gateway_settings(backends["urls"], audit_checkpoint_s=3600, data_dir=tmp_path)
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            async with running_gateway(settings, dsn) as gw:
                chain = await _three_rows(http, gw, token_for, pool)
                first = await seal(pool, chain)
                async with pool.acquire() as conn, conn.transaction():   # as 017 stored them
                    await conn.execute("alter table audit_merkle_runs disable trigger "
                                       "audit_merkle_runs_append_only")
                    for run in await conn.fetch("delete from audit_merkle_runs where "
                                                "chain_id = $1 returning *", chain):
                        hashes = bytes(run["hashes"])
                        await conn.executemany(
                            "insert into audit_merkle_nodes values ($1, $2, $3, $4)",
                            [(chain, run["level"], run["first_idx"] + i // 32, hashes[i:i + 32])
                             for i in range(0, len(hashes), 32)])
                    await conn.execute("alter table audit_merkle_runs enable trigger "
                                       "audit_merkle_runs_append_only")
                actor = f"more-{uuid.uuid4().hex[:8]}"
                for _ in range(2):
                    assert (await call(http, "GET", gw + ACME,
                                       token_for(role="provider_staff", sub=actor)))[0] == 200
                assert await pool.fetchval("select count(distinct chain_id) from audit_log "
                                           "where actor_sub = $1 and chain_id = $2",
                                           actor, chain) == 1
                second = await seal(pool, chain)
                # leaves 4 and 5 complete nodes at levels 0, 1 and 2: three rows
                assert await pool.fetchval("select count(*) from audit_merkle_runs "
                                           "where chain_id = $1", chain) == 3
                rows = await pool.fetch("select * from audit_log where chain_id = $1 "
                                        "order by seq", chain)
                async with pool.acquire() as conn:
                    proofs = []
                    for row in rows:
                        ranges = inclusion_ranges(row["seq"] - 1, second[0])
                        nodes = await fetch_nodes(conn, chain, nodes_for(ranges))
                        proofs.append(hashes_of(ranges, nodes.__getitem__))
                    ranges = consistency_ranges(first[0], second[0])
                    nodes = await fetch_nodes(conn, chain, nodes_for(ranges))
                    consistency = hashes_of(ranges, nodes.__getitem__)
        finally:
            await pool.close()
    assert (first[0], second[0]) == (3, 5)
    assert all(verify_inclusion(record_leaf(row), row["seq"] - 1, second[0], proof, second[1])
               for row, proof in zip(rows, proofs, strict=True))
    assert verify_consistency(first[0], second[0], first[1], second[1], consistency)


async def test_maintain_seals_the_chain_of_a_writer_that_is_gone(database_url, template_database,
                                                                 tmp_path):
    """A process killed between two checkpoints left rows no checkpoint signs, for ever:
    `gateway audit maintain` signs (as closed) the head of a chain with rows past its last
    checkpoint and no write for three checkpoint intervals, with the deployment's key, and
    the signed tree holds every row; a live chain is left alone."""
    from gateway.audit import AuditRow, AuditWriter
    from gateway.db import create_pool

    key = tmp_path / "audit-signing-key.pem"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    async with own_database(database_url, template_database) as dsn:
        pool = await create_pool(dsn, 1, 2)
        try:
            writer = AuditWriter(pool, queue_max=100)
            writer.start()
            for i in range(5):       # then the process "dies": nothing closed, nothing sealed
                await writer.commit(AuditRow(at=datetime.now(UTC), request_id=f"gone-{i}",
                                             method="GET", path="/x", decision="allow", status=200))
            (chain, seq, _), = writer.heads()
            for task in writer._tasks:
                task.cancel()
            env = {"GATEWAY_DATABASE_URL": dsn, "GATEWAY_AUDIT_CHECKPOINT_S": "0.1",
                   "GATEWAY_AUDIT_SIGNING_KEY_FILE": str(key), "GATEWAY_DATA_DIR": str(tmp_path)}

            async def sealed():
                done = await asyncio.to_thread(gateway_main, "audit", "maintain", env=env)
                return f"sealed chain {chain}" in done.stdout and done
            done = await wait_for(sealed, timeout=10)
            assert done and done.returncode == 0, done
            checkpoint = await pool.fetchrow(
                "select closed, seq, tree_size, version from audit_checkpoints where chain_id = $1",
                chain)
            assert tuple(checkpoint) == (True, seq, seq, 2)
            assert await pool.fetchval("select closed from audit_chain_heads where chain_id = $1",
                                       chain)
            again = await asyncio.to_thread(gateway_main, "audit", "maintain", env=env)
            assert "sealed chain" not in again.stdout          # once
            public = tmp_path / "audit-signing-key.pub.pem"
            public.write_bytes(_public_pem(key))
            async with pool.acquire() as conn:
                checked = await verify_checkpoints(conn, load_public_keys([public]))
            assert checked.ok, checked.public()
        finally:
            pool.terminate()          # the dead writer's lane still holds its connection


def _public_pem(private_key_file) -> bytes:
    key = serialization.load_pem_private_key(private_key_file.read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


async def test_the_published_public_key_comes_from_the_key_file_and_pins_the_checkpoints(
        backends, database_url, template_database, http, token_for, tmp_path):
    """`gateway audit public-key` prints the public half of the deployment's key file (not
    what the database says the keys are): verified against it, the checkpoints of a gateway
    using that key pass, and those of a gateway that signed with another key do not. With
    no key it says so (exit 2) and makes none."""
    key = tmp_path / "deployment-key.pem"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    done = await asyncio.to_thread(gateway_main, "audit", "public-key", env={
        "GATEWAY_AUDIT_SIGNING_KEY_FILE": str(key), "GATEWAY_DATA_DIR": str(tmp_path)})
    assert done.returncode == 0 and done.stdout.encode() == _public_pem(key), done
    pinned = tmp_path / "pinned.pub.pem"
    pinned.write_text(done.stdout)
    async with own_database(database_url, template_database) as dsn:
        settings = gateway_settings(backends["urls"], audit_checkpoint_s=0.2, data_dir=tmp_path,
                                    audit_signing_key_file=key)
        async with running_gateway(settings, dsn) as gw:
            assert (await call(http, "GET", gw + ACME, token_for("staff")))[0] == 200
        async with connected(dsn) as conn:
            checked = await verify_checkpoints(conn, load_public_keys([str(pinned)]))
            assert checked.ok and checked.checkpoints > 0, checked.public()
            other = tmp_path / "elsewhere"          # a gateway with a key of its own
            async with running_gateway(gateway_settings(
                    backends["urls"], audit_checkpoint_s=0.2, data_dir=other), dsn) as gw:
                assert (await call(http, "GET", gw + ACME, token_for("staff")))[0] == 200
            checked = await verify_checkpoints(conn, load_public_keys([str(pinned)]))
            assert not checked.ok
            assert "not among the public keys given" in checked.first_break["problem"]
    empty = tmp_path / "no-key"
    done = await asyncio.to_thread(gateway_main, "audit", "public-key",
                                   env={"GATEWAY_DATA_DIR": str(empty)})
    assert done.returncode == 2 and "no audit signing key" in done.stderr
    assert not (empty / "audit-signing-key.pem").exists()
