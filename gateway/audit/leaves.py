"""What a chain's Merkle tree commits to, row by row (the leaf format, version 2).

Leaf i of a chain's tree is the chain's row with seq = i + 1 (the order the writer numbered
them; nothing else decides it). Its leaf data is 64 bytes:

    public_digest || row_hash

* row_hash is the row's hash in its chain (gateway/audit/chain.py), which covers every field,
  the row's SALT included: 128 random bits the writer draws for each row (hash_and_leaf);
* public_digest = sha256(canonical(the row with WITHHELD and SALT set to null)), the same
  canonical encoding as the chain.

A caller of another organisation never sees WITHHELD of a row (who exactly acted, from
where, under which request and trace id: the audit API shows such actors by role and
organisation only), nor its salt. The public digest lets that caller check every field it
does see against the signed root all the same; a caller who sees the whole row (salt
included) also checks its row_hash from the fields and prev_hash. The salt makes row_hash a
salted commitment to the withheld fields, as a selective-disclosure format's per-claim salt
does: without it, a caller holding a row's hash and its prev_hash (the row before it, in
the same slice) could try a few likely actors and addresses against the hash and confirm
the one that matches.

Version 1 (rows written before 032_audit_salt.sql) is the same without a salt: such a row's
salt is null, left out of its encoding like any trailing null field, so it verifies as
before (and its withheld fields stay as guessable as they always were).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .chain import HASHED, canonical, canonical_pair, link
from .merkle import leaf_hash

WITHHELD = ("actor_sub", "client_addr", "client_request_id", "trace_id")
SALT = "salt"
HIDDEN = (*WITHHELD, SALT)          # what the public digest covers as null
_HIDDEN_AT = tuple(HASHED.index(name) for name in HIDDEN)
_SALT_AT = HASHED.index(SALT)
# the fields a row is written with, in HASHED order: all but the salt, which
# hash_and_leaf draws
WRITTEN = tuple(name for name in HASHED if name != SALT)
SALT_BYTES = 16


def public_digest(values: Sequence[Any]) -> bytes:
    v = list(values)
    for i in _HIDDEN_AT:
        v[i] = None
    return hashlib.sha256(canonical(v)).digest()


def leaf(values: Sequence[Any], row_hash: bytes) -> bytes:
    """The leaf hash of a row (its values in HASHED order)."""
    return leaf_hash(public_digest(values) + bytes(row_hash))


def hash_and_leaf(written: Sequence[Any], prev_hash: bytes) -> tuple[tuple, bytes, bytes]:
    """A new row salted, its hash in its chain (after `prev_hash`) and its leaf hash, the
    values encoded once for both (the writer's path): `written` holds the row's fields in
    WRITTEN order; what comes back, in HASHED order, with a fresh random salt."""
    i = _SALT_AT
    values = (*written[:i], os.urandom(SALT_BYTES).hex(), *written[i:])
    full, public = canonical_pair(values, _HIDDEN_AT)
    row_hash = link(prev_hash, full)
    return values, row_hash, leaf_hash(hashlib.sha256(public).digest() + row_hash)


def record_leaf(row: Mapping[str, Any]) -> bytes:
    return leaf([row[name] for name in HASHED], row["row_hash"])


def row_hash_matches(values: Sequence[Any], prev_hash: bytes, row_hash: bytes) -> bool:
    return link(bytes(prev_hash), canonical(values)) == bytes(row_hash)
