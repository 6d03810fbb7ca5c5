"""What a chain's Merkle tree commits to, row by row (the leaf format, version 1).

Leaf i of a chain's tree is the chain's row with seq = i + 1 (the order the writer numbered
them; nothing else decides it). Its leaf data is 64 bytes:

    public_digest || row_hash

* row_hash is the row's hash in its chain (gateway/audit/chain.py), which covers every field;
* public_digest = sha256(canonical(the row with WITHHELD set to null)), the same canonical
  encoding as the chain.

A caller of another organisation never sees WITHHELD of a row (who exactly acted, from
where, under which request and trace id: the audit API shows such actors by role and
organisation only). The public digest lets that caller check every field it does see
against the signed root all the same; a caller who sees the whole row also checks its
row_hash from the fields and prev_hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from .chain import HASHED, canonical, canonical_pair, link
from .merkle import leaf_hash

WITHHELD = ("actor_sub", "client_addr", "client_request_id", "trace_id")
_WITHHELD_AT = tuple(HASHED.index(name) for name in WITHHELD)


def public_digest(values: Sequence[Any]) -> bytes:
    v = list(values)
    for i in _WITHHELD_AT:
        v[i] = None
    return hashlib.sha256(canonical(v)).digest()


def leaf(values: Sequence[Any], row_hash: bytes) -> bytes:
    """The leaf hash of a row (its values in HASHED order)."""
    return leaf_hash(public_digest(values) + bytes(row_hash))


def hash_and_leaf(values: Sequence[Any], prev_hash: bytes) -> tuple[bytes, bytes]:
    """A new row's hash in its chain (after `prev_hash`) and its leaf hash, the values
    encoded once for both (the writer's path)."""
    full, public = canonical_pair(values, _WITHHELD_AT)
    row_hash = link(prev_hash, full)
    return row_hash, leaf_hash(hashlib.sha256(public).digest() + row_hash)


def record_leaf(row: Mapping[str, Any]) -> bytes:
    return leaf([row[name] for name in HASHED], row["row_hash"])


def row_hash_matches(values: Sequence[Any], prev_hash: bytes, row_hash: bytes) -> bool:
    return link(bytes(prev_hash), canonical(values)) == bytes(row_hash)
