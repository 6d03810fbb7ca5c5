"""Signed checkpoints: proof of the audit chains that does not depend on this database.

At a fixed interval and at a clean shutdown, each writer's chain head (chain id, last seq,
last row hash, time, closed or not) is signed with an Ed25519 key and stored. The public
keys are served at /v1/audit/keys. Whoever holds a public key can then check, offline if
they like, that every sealed row is still there and unchanged: rewriting rows means
recomputing the hash chain, which changes the sealed head's hash, which the signature
no longer covers. Rows after a chain's last checkpoint are reported as "not yet sealed".

Key rotation: every public key ever used is kept (audit_signing_keys), so old
checkpoints stay verifiable; a checkpoint names its key by id.

Format 2 also signs the chain's RFC 6962 Merkle tree (gateway/audit/merkle.py; its leaves
are the chain's rows in seq order, gateway/audit/leaves.py): its size (the seq) and root.
At each checkpoint the tree is extended by the rows written since the last one, and the
perfect subtrees they complete are stored with the checkpoint, a run of consecutive nodes
of one level a row (audit_merkle_runs; audit_merkle_nodes holds those stored one a row
before), so no request ever builds a tree. Format 1 checkpoints, written
before, verify as they always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .. import clock
from ..db import DATABASE_ERRORS, query
from ..settings import ConfigError
from .chain import HASHED, canonical, link
from .leaves import record_leaf
from .merkle import Frontier

log = logging.getLogger("gateway.audit.checkpoints")
FORMAT = b"partner-gateway-checkpoint/1\n"
FORMAT_2 = b"partner-gateway-checkpoint/2\n"


def signed_bytes(chain_id: Any, seq: int, row_hash: bytes, at: datetime, closed: bool,
                 root: bytes | None = None) -> bytes:
    """What a checkpoint's signature covers (the same bytes when written and when checked):
    format 1 without a tree root, format 2 with the tree's size and root."""
    head = [str(chain_id), int(seq), bytes(row_hash).hex(), at.astimezone(UTC).isoformat(),
            bool(closed)]
    if root is None:
        return FORMAT + orjson.dumps(head)
    return FORMAT_2 + orjson.dumps([*head, int(seq), bytes(root).hex()])


def checkpoint_json(r) -> dict[str, Any]:
    """A stored checkpoint as the API serves it (and verify-slice reads it)."""
    out = {"id": r["id"], "version": r["version"], "chain_id": str(r["chain_id"]),
           "seq": r["seq"], "row_hash": bytes(r["row_hash"]).hex(), "at": r["at"].isoformat(),
           "closed": r["closed"], "key_id": r["key_id"],
           "signature": bytes(r["signature"]).hex()}
    if r["version"] == 2:
        out["tree_size"], out["root"] = r["tree_size"], bytes(r["root"]).hex()
    return out


def checkpoint_signed_bytes(cp: dict[str, Any]) -> bytes:
    """signed_bytes of a checkpoint as checkpoint_json gave it (ValueError if malformed)."""
    version = cp["version"]
    if version not in (1, 2) or (version == 2 and cp["tree_size"] != cp["seq"]):
        raise ValueError("not a checkpoint of format 1 or 2")
    if not isinstance(cp["closed"], bool):   # signed as a boolean: shown as one
        raise ValueError("closed is true or false")
    return signed_bytes(cp["chain_id"], cp["seq"], bytes.fromhex(cp["row_hash"]),
                        datetime.fromisoformat(cp["at"]), cp["closed"],
                        bytes.fromhex(cp["root"]) if version == 2 else None)


class TreeError(Exception):
    """The rows a checkpoint would seal cannot be read back as written."""


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A key's id: the first 16 hex digits of sha256 of its raw public bytes."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; ConfigError naming the file otherwise."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"GATEWAY_AUDIT_SIGNING_KEY_FILE {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"GATEWAY_AUDIT_SIGNING_KEY_FILE {path} is not an Ed25519 key")
    return key


def signing_key_path(configured: Path | None, data_dir: Path) -> Path:
    """Where the deployment's signing key is: GATEWAY_AUDIT_SIGNING_KEY_FILE, or the one
    generated under GATEWAY_DATA_DIR."""
    return Path(configured) if configured is not None else Path(data_dir) / "audit-signing-key.pem"


def signing_key(configured: Path | None, data_dir: Path) -> Ed25519PrivateKey:
    """The configured key, or one generated once under the data dir (logged: production
    should provision its own and keep its public half where auditors can find it)."""
    if configured is not None:
        return load_signing_key(configured)
    path = signing_key_path(None, data_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        # written whole under a name of our own, then linked into place: workers starting
        # together race, one key wins, and nobody reads a half-written file
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        try:
            os.link(tmp, path)
            log.warning("generated an audit signing key at %s (set "
                        "GATEWAY_AUDIT_SIGNING_KEY_FILE to provision your own)", path)
        except FileExistsError:
            pass                          # another process won the race: use its key
        finally:
            tmp.unlink()
    return load_signing_key(path)


def load_public_keys(sources: list) -> dict[str, Ed25519PublicKey]:
    """Public keys by id, for verification, from files or http(s) URLs; each holds one or
    more PEM public keys, or is a document as GET /v1/audit/keys answers (every key ever
    used, so a rotation needs nothing more). ConfigError naming a bad source."""
    from .remote import read
    keys = {}
    for source in sources:
        name = f"--public-key {source}"
        data = read(source, what=name)
        try:
            pems = _pems(data)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{name}: {e}") from None
        if not pems:
            raise ConfigError(f"{name}: holds no PEM public key")
        for claimed, pem in pems:
            try:
                key = serialization.load_pem_public_key(pem)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{name}: {e}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"{name} is not an Ed25519 public key")
            if claimed is not None and claimed != key_id(key):
                raise ConfigError(f"{name}: key {claimed} is not the key its PEM holds")
            keys[key_id(key)] = key
    return keys


_PEM_END = b"-----END PUBLIC KEY-----"


def _pems(data: bytes) -> list[tuple[str | None, bytes]]:
    """(claimed key id or None, PEM) of each key in a keys document or a PEM file."""
    if data.lstrip().startswith(b"{"):
        doc = orjson.loads(data)
        return [(k["key_id"], k["public_key_pem"].encode()) for k in doc["keys"]]
    blocks = []
    for part in data.split(_PEM_END)[:-1]:
        start = part.find(b"-----BEGIN")
        if start < 0:
            raise ValueError("not a PEM file")
        blocks.append((None, part[start:] + _PEM_END + b"\n"))
    return blocks


class Checkpointer:
    """Signs this process's chain heads every `interval_s` and once more when it stops."""

    def __init__(self, pool: asyncpg.Pool, heads, key: Ed25519PrivateKey, interval_s: float,
                 leaves=None, sealed=None):
        self.pool = pool
        self.heads = heads                  # () -> [(chain_id, seq, last_hash)]
        # (chain_id, after, upto) -> the writer's leaves of those rows, or None (then the
        # rows are read back); and (chain_id, upto): the tree holds them, let them go
        self.leaves = leaves
        self.sealed = sealed
        self.key = key
        self.key_id = key_id(key.public_key())
        self.interval_s = interval_s
        self._sealed: dict[Any, int] = {}
        self._trees: dict[Any, Frontier] = {}     # chain -> its tree as last signed
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Publish the public key, then seal on the interval."""
        await self.pool.execute(query("audit_key_add"), self.key_id,
                                raw_public(self.key.public_key()))
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.seal()
            except DATABASE_ERRORS as e:
                log.warning("could not store audit checkpoints: %s", e)

    async def seal(self, closed: bool = False) -> int:
        """Sign and store the head of every chain that grew since its last checkpoint (all
        of them, marked closed, at shutdown); return how many were stored."""
        stored = 0
        for chain_id, seq, last_hash in self.heads():
            if seq == 0 or (self._sealed.get(chain_id) == seq and not closed):
                continue
            async with self.pool.acquire() as conn, conn.transaction():
                try:
                    tree = await self._grow(conn, chain_id, seq, last_hash)
                except TreeError as e:
                    # the head is still sealed (format 1); the tree tries again next time
                    log.warning("audit chain %s: no Merkle tree at seq %s: %s", chain_id, seq, e)
                    tree = None
                at = clock.now_utc()            # the database's time (clock.py)
                root = tree.root() if tree else None
                signature = self.key.sign(signed_bytes(chain_id, seq, last_hash, at, closed,
                                                       root))
                await conn.execute(query("audit_checkpoint_add"), chain_id, seq, last_hash, at,
                                   closed, self.key_id, signature, 2 if tree else 1,
                                   seq if tree else None, root)
            if tree:
                self._trees[chain_id] = tree
                if self.sealed is not None:
                    self.sealed(chain_id, tree.size)
            self._sealed[chain_id] = seq
            stored += 1
        return stored

    async def _grow(self, conn: asyncpg.Connection, chain_id, seq: int,
                    last_hash: bytes) -> Frontier:
        """The chain's tree extended to `seq` leaves, its new perfect nodes stored (in the
        checkpoint's transaction). The leaves come from this process's writer when it holds
        them (no row is read back: what is signed is what was written, so a row altered
        since fails against it); otherwise from the rows read back (_read_back)."""
        old = self._trees.get(chain_id) or await load_frontier(conn, chain_id)
        tree = Frontier(old.size, old.edge)
        written = self.leaves(chain_id, tree.size, seq) if self.leaves is not None else None
        leaves = _each(written) if written is not None else _read_back(
            conn, chain_id, tree.size, seq, last_hash)
        runs = Runs()
        async for one in leaves:
            runs.add(tree.append(one))
        if tree.size != seq:
            raise TreeError(f"rows up to {seq} are not all readable")
        if runs:
            await conn.execute(query("audit_merkle_runs_add"), chain_id, *runs.columns())
        return tree

    async def close(self) -> None:
        """Stop the interval and seal the final heads as closed (after the writer closed)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.seal(closed=True)
        except DATABASE_ERRORS as e:
            log.warning("could not seal the audit chains at shutdown: %s", e)


async def seal_abandoned(pool: asyncpg.Pool, key: Ed25519PrivateKey, idle_s: float) -> list[str]:
    """Sign, as closed, the head of every chain whose writer is gone: rows past its last
    checkpoint and no write for `idle_s` (a live writer signs its own heads every
    GATEWAY_AUDIT_CHECKPOINT_S). A process killed between two checkpoints left such rows
    unsealed for ever. The rows are read back (and checked against their hashes) to grow
    the chain's tree; the chain's ids, sealed."""
    heads = [(h["chain_id"], h["last_seq"], bytes(h["last_hash"]))
             for h in await pool.fetch(query("audit_abandoned_heads"), idle_s)]
    if not heads:
        return []
    sealer = Checkpointer(pool, lambda: heads, key, interval_s=0)
    await pool.execute(query("audit_key_add"), sealer.key_id, raw_public(key.public_key()))
    await sealer.seal(closed=True)           # nothing more will follow: its writer is gone
    await pool.execute(query("audit_chains_close"), [chain for chain, _, _ in heads])
    return [str(chain) for chain, _, _ in heads]


# the process's checkpointer; its key also signs what a slice says it is (slices.py)
CHECKPOINTER = web.AppKey("checkpointer", Checkpointer)


class Runs:
    """New perfect nodes gathered by level, as they are stored: one run of consecutive
    nodes of a level a row (a growing tree completes each level's nodes in order)."""

    def __init__(self):
        self._levels: dict[int, tuple[int, list[bytes]]] = {}     # level -> (first idx, hashes)

    def add(self, nodes: list[tuple[int, int, bytes]]) -> None:
        levels = self._levels
        for level, idx, h in nodes:
            run = levels.get(level)
            if run is None:
                levels[level] = (idx, [h])
            elif idx == run[0] + len(run[1]):
                run[1].append(h)
            else:       # stored out of order, it would be found at the wrong index
                raise TreeError(f"node ({level}, {idx}) does not follow its level's run")

    def __bool__(self) -> bool:
        return bool(self._levels)

    def columns(self) -> tuple[list[int], list[int], list[bytes]]:
        """(levels, first indexes, concatenated hashes), as audit_merkle_runs_add takes them."""
        levels = sorted(self._levels)
        return (levels, [self._levels[lv][0] for lv in levels],
                [b"".join(self._levels[lv][1]) for lv in levels])


async def _each(leaves: list[bytes]) -> AsyncIterator[bytes]:
    for one in leaves:
        yield one


async def _read_back(conn: asyncpg.Connection, chain_id, after: int, upto: int,
                     last_hash: bytes) -> AsyncIterator[bytes]:
    """The leaves of a chain's rows after+1 .. upto read back from the database; TreeError
    if they do not chain up to the head the writer holds."""
    expected, prev = after + 1, None
    async for row in conn.cursor(query("audit_chain_rows_after"), chain_id, after, upto,
                                 prefetch=500):     # short turns of the event loop
        if row["seq"] != expected:
            raise TreeError(f"row {expected} is missing")
        if (prev is not None and row["prev_hash"] != prev) or link(
                row["prev_hash"], canonical([row[f] for f in HASHED])) != row["row_hash"]:
            raise TreeError(f"row {row['seq']} does not match its hash")
        prev, expected = row["row_hash"], expected + 1
        yield record_leaf(row)
    if prev is not None and bytes(prev) != bytes(last_hash):
        raise TreeError(f"rows up to {upto} are not all readable")


async def load_frontier(conn: asyncpg.Connection, chain_id) -> Frontier:
    """A chain's tree as its last format 2 checkpoint signed it (empty if none)."""
    size = await conn.fetchval(query("audit_tree_size"), chain_id) or 0
    wanted = Frontier.edge_nodes(size)
    found = await fetch_nodes(conn, chain_id, wanted)
    if len(found) != len(wanted):
        raise TreeError(f"the stored tree of {size} leaves lacks nodes")
    return Frontier(size, {level: found[(level, idx)] for level, idx in wanted})


async def fetch_nodes(conn: asyncpg.Connection, chain_id, wanted) -> dict[tuple[int, int], bytes]:
    """Stored perfect nodes of a chain's tree, by (level, idx)."""
    wanted = list(wanted)
    rows = await conn.fetch(query("audit_merkle_nodes"), chain_id,
                            [lv for lv, _ in wanted], [ix for _, ix in wanted])
    return {(r["level"], r["idx"]): bytes(r["hash"]) for r in rows if r["hash"] is not None}


@dataclass
class SealReport:
    checkpoints: int = 0
    sealed: dict[str, int] = field(default_factory=dict)        # chain -> last sealed seq
    not_yet_sealed: dict[str, int] = field(default_factory=dict)  # chain -> rows after it
    first_break: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.first_break is None

    def public(self) -> dict[str, Any]:
        return {"ok": self.ok, "checkpoints_checked": self.checkpoints,
                "chains_sealed": len(self.sealed), "first_break": self.first_break,
                "not_yet_sealed": [{"chain_id": c, "rows": n}
                                   for c, n in sorted(self.not_yet_sealed.items())]}


async def verify_checkpoints(conn: asyncpg.Connection,
                             keys: dict[str, Ed25519PublicKey]) -> SealReport:
    """Check every checkpoint's signature against `keys` and the sealed row it names."""
    report = SealReport()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # streamed: memory bounded whatever the number of checkpoints
        async for cp in conn.cursor(query("audit_all_checkpoints"), prefetch=1000):
            report.checkpoints += 1
            chain = str(cp["chain_id"])
            where = {"chain_id": chain, "seq": cp["seq"], "checkpoint": cp["id"]}
            key = keys.get(cp["key_id"])
            if key is None:
                report.first_break = {**where, "problem": f"signed with key {cp['key_id']}, "
                                      "which is not among the public keys given"}
                return report
            try:
                key.verify(bytes(cp["signature"]), signed_bytes(
                    cp["chain_id"], cp["seq"], cp["row_hash"], cp["at"], cp["closed"],
                    cp["root"] if cp["version"] == 2 else None))
            except InvalidSignature:
                report.first_break = {**where, "problem": "the checkpoint's signature does not verify"}
                return report
            row_hash = await conn.fetchval(query("audit_row_hash_at"), cp["chain_id"], cp["seq"])
            if row_hash is None:
                report.first_break = {**where, "problem": "the sealed row is missing"}
                return report
            if bytes(row_hash) != bytes(cp["row_hash"]):
                report.first_break = {**where, "problem": "the sealed row was altered"}
                return report
            report.sealed[chain] = max(report.sealed.get(chain, 0), cp["seq"])
        for chain in await conn.fetch(query("audit_chains")):
            chain_id = str(chain["chain_id"])
            after = chain["last_seq"] - report.sealed.get(chain_id, 0)
            if after > 0:
                report.not_yet_sealed[chain_id] = after
    return report
