"""RFC 6962 trees: the reference vectors, and proofs against a literal transcription of the
RFC's recursive definitions (MTH, PATH, PROOF) for every size up to 40."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.audit.merkle import (
    Frontier,
    consistency_ranges,
    hashes_of,
    inclusion_ranges,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)

# The RFC 6962 reference implementation's test data (certificate-transparency, and Trillian's
# copy): leaf inputs, and the root of the tree of the first i+1 of them.
INPUTS = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657",
          "606162636465666768696a6b6c6d6e6f"]
ROOTS = ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
         "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
         "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
         "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
         "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
         "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
         "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
         "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]


# --- RFC 6962 §2.1, as written --------------------------------------------------------------
def _k(n):
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d):
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return leaf_hash(d[0])
    k = _k(len(d))
    return node_hash(mth(d[:k]), mth(d[k:]))


def path(m, d):
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return path(m, d[:k]) + [mth(d[k:])]
    return path(m - k, d[k:]) + [mth(d[:k])]


def proof(m, d):
    def sub(m, d, b):
        n = len(d)
        if m == n:
            return [] if b else [mth(d)]
        k = _k(n)
        if m <= k:
            return sub(m, d[:k], b) + [mth(d[k:])]
        return sub(m - k, d[k:], False) + [mth(d[:k])]
    return sub(m, d, True)
# ---------------------------------------------------------------------------------------------


def _tree(n):
    """Leaves, and the stored perfect nodes of the tree built by Frontier."""
    data = [i.to_bytes(4, "big") for i in range(n)]
    frontier, nodes = Frontier(), {}
    for d in data:
        for level, idx, h in frontier.append(leaf_hash(d)):
            nodes[(level, idx)] = h
    return data, frontier, nodes


def test_reference_vectors():
    leaves = [bytes.fromhex(x) for x in INPUTS]
    frontier = Frontier()
    for i, leaf in enumerate(leaves):
        frontier.append(leaf_hash(leaf))
        assert frontier.root().hex() == ROOTS[i] == mth(leaves[:i + 1]).hex()
    assert Frontier().root() == hashlib.sha256(b"").digest()


@pytest.mark.parametrize("n", range(1, 41))
def test_proofs_match_the_rfc_definitions_and_verify(n):
    data, frontier, nodes = _tree(n)
    root = frontier.root()
    assert root == mth(data)
    for m in range(n):
        got = hashes_of(inclusion_ranges(m, n), nodes.__getitem__)
        assert got == path(m, data)
        assert verify_inclusion(leaf_hash(data[m]), m, n, got, root)
        assert not verify_inclusion(leaf_hash(data[m]), (m + 1) % n, n, got, root) or n == 1
    for m in range(1, n + 1):
        got = hashes_of(consistency_ranges(m, n), nodes.__getitem__)
        assert got == proof(m, data)
        assert verify_consistency(m, n, mth(data[:m]), root, got)


@given(st.integers(1, 300), st.data())
def test_any_change_to_a_proof_fails(n, data):
    leaves, frontier, nodes = _tree(n)
    root = frontier.root()
    m = data.draw(st.integers(0, n - 1))
    p = hashes_of(inclusion_ranges(m, n), nodes.__getitem__)
    leaf = leaf_hash(leaves[m])
    flipped = bytearray(leaf)
    flipped[data.draw(st.integers(0, 31))] ^= 1 << data.draw(st.integers(0, 7))
    assert not verify_inclusion(bytes(flipped), m, n, p, root)
    if p:
        i = data.draw(st.integers(0, len(p) - 1))
        bad = [*p]
        bad[i] = bytes(32)
        assert not verify_inclusion(leaf, m, n, bad, root)
        assert not verify_inclusion(leaf, m, n, p[:-1], root)
        assert not verify_inclusion(leaf, m, n, p[::-1], root) or p == p[::-1]
    first = data.draw(st.integers(1, n))
    c = hashes_of(consistency_ranges(first, n), nodes.__getitem__)
    old = mth(leaves[:first])
    assert verify_consistency(first, n, old, root, c)
    # a past leaf altered: the old root is no longer consistent with the new tree
    altered = [*leaves]
    altered[data.draw(st.integers(0, first - 1))] += b"!"
    assert not verify_consistency(first, n, old, mth(altered), c)
    assert not verify_consistency(first, n, mth(altered[:first]), root, c)
    if c:
        assert not verify_consistency(first, n, old, root, c[:-1])


# --- the writer's one-pass encoding against the definitions ------------------------------

from datetime import UTC, timedelta, timezone  # noqa: E402

from gateway.audit import leaves as row_leaves  # noqa: E402
from gateway.audit.chain import HASHED, canonical, link  # noqa: E402

_TEXT = st.none() | st.text(max_size=4)
_FIELD = {"data_sets": st.lists(st.text(max_size=3), max_size=2),
          "fields_removed": st.lists(st.text(max_size=3), max_size=2),
          "subject_users": st.lists(st.text(max_size=3), max_size=2),
          "status": st.integers(0, 599), "bytes": st.integers(0, 2**40),
          "duration_ms": st.floats(0, 1e6) | st.integers(0, 10**6),
          "requests": st.none() | st.integers(1, 10**6),
          "break_glass": st.none() | st.uuids()}


@given(st.datetimes(timezones=st.just(UTC)) | st.datetimes(
           timezones=st.just(timezone(timedelta(hours=2)))),
       st.uuids(), st.integers(1, 10**9),
       st.fixed_dictionaries({name: _FIELD.get(name, _TEXT) for name in row_leaves.WRITTEN[3:]}),
       st.binary(min_size=32, max_size=32))
def test_the_writers_row_hash_and_leaf_are_those_of_the_definitions(at, chain, seq, rest, prev):
    """hash_and_leaf salts a row and encodes it once for its chain hash and its Merkle leaf;
    both must be exactly what chain.canonical and leaves.leaf define (which verifiers
    recompute), the salt fresh for each row and in the row's hash, never in its leaf's
    public digest."""
    written = (at, chain, seq, *(rest[name] for name in row_leaves.WRITTEN[3:]))
    values, row_hash, one = row_leaves.hash_and_leaf(written, prev)
    salt = values[HASHED.index("salt")]
    assert [v for name, v in zip(HASHED, values, strict=True) if name != "salt"] == list(written)
    assert len(bytes.fromhex(salt)) == 16
    assert row_hash == link(prev, canonical(values))
    assert one == row_leaves.leaf(values, row_hash)
    unsalted = [None if name == "salt" else v for name, v in zip(HASHED, values, strict=True)]
    assert row_leaves.public_digest(values) == row_leaves.public_digest(unsalted)
    again, other_hash, _ = row_leaves.hash_and_leaf(written, prev)
    assert again[HASHED.index("salt")] != salt and other_hash != row_hash
