"""Signed checkpoints: proof of the audit chains that does not depend on this database.

At a fixed interval and at a clean shutdown, each writer's chain head (chain id, last seq,
last row hash, time, closed or not) is signed with an Ed25519 key and stored. The public
keys are served at /v1/audit/keys. Whoever holds a public key can then check, offline if
they like, that every sealed row is still there and unchanged: rewriting rows means
recomputing the hash chain, which changes the sealed head's hash, which the signature
no longer covers. Rows after a chain's last checkpoint are reported as "not yet sealed".

Key rotation: every public key ever used is kept (audit_signing_keys), so old
checkpoints stay verifiable; a checkpoint names its key by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..db import query
from ..settings import ConfigError

log = logging.getLogger("gateway.audit.checkpoints")
FORMAT = b"partner-gateway-checkpoint/1\n"


def signed_bytes(chain_id: Any, seq: int, row_hash: bytes, at: datetime, closed: bool) -> bytes:
    """What a checkpoint's signature covers (the same bytes when written and when checked)."""
    return FORMAT + orjson.dumps([str(chain_id), int(seq), bytes(row_hash).hex(),
                                  at.astimezone(UTC).isoformat(), bool(closed)])


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


def signing_key(configured: Path | None, data_dir: Path) -> Ed25519PrivateKey:
    """The configured key, or one generated once under the data dir (logged: production
    should provision its own and keep its public half where auditors can find it)."""
    if configured is not None:
        return load_signing_key(configured)
    path = Path(data_dir) / "audit-signing-key.pem"
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


def load_public_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """Public keys (PEM) by id, for verification; ConfigError naming a bad file."""
    keys = {}
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--public-key {path}: {e}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"--public-key {path} is not an Ed25519 public key")
        keys[key_id(key)] = key
    return keys


class Checkpointer:
    """Signs this process's chain heads every `interval_s` and once more when it stops."""

    def __init__(self, pool: asyncpg.Pool, heads, key: Ed25519PrivateKey, interval_s: float):
        self.pool = pool
        self.heads = heads                  # () -> [(chain_id, seq, last_hash)]
        self.key = key
        self.key_id = key_id(key.public_key())
        self.interval_s = interval_s
        self._sealed: dict[Any, int] = {}
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
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
                log.warning("could not store audit checkpoints: %s", e)

    async def seal(self, closed: bool = False) -> int:
        """Sign and store the head of every chain that grew since its last checkpoint (all
        of them, marked closed, at shutdown); return how many were stored."""
        stored = 0
        for chain_id, seq, last_hash in self.heads():
            if seq == 0 or (self._sealed.get(chain_id) == seq and not closed):
                continue
            at = datetime.now(UTC)
            signature = self.key.sign(signed_bytes(chain_id, seq, last_hash, at, closed))
            await self.pool.execute(query("audit_checkpoint_add"), chain_id, seq, last_hash, at,
                                    closed, self.key_id, signature)
            self._sealed[chain_id] = seq
            stored += 1
        return stored

    async def close(self) -> None:
        """Stop the interval and seal the final heads as closed (after the writer closed)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.seal(closed=True)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            log.warning("could not seal the audit chains at shutdown: %s", e)


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
        for cp in await conn.fetch(query("audit_all_checkpoints")):
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
                    cp["chain_id"], cp["seq"], cp["row_hash"], cp["at"], cp["closed"]))
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
