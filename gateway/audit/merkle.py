"""RFC 6962 Merkle trees (SHA-256, leaf prefix 0x00, node prefix 0x01): hashes, inclusion
and consistency proofs, and their verification (RFC 9162 §2.1.3.2 and §2.1.4.2).

No well-kept Python library implements RFC 6962 proofs, so this is the small part of the
RFC the audit log needs, tested against the RFC's reference vectors and against a literal
transcription of its recursive definitions (tests/test_merkle.py).

A tree of n leaves is stored as its *perfect* subtrees: node (level, idx) is the hash of
leaves [idx * 2**level, (idx + 1) * 2**level). They never change once complete, so a
growing log only ever adds nodes; every hash a proof needs is one of them or a fold of a
few of them (the right edge of a tree whose size is not a power of two).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

Range = tuple[int, int]            # leaves [a, b)
Node = tuple[int, int]             # (level, idx): a perfect subtree


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def perfect_nodes(a: int, b: int) -> list[Node]:
    """The perfect subtrees, left to right, whose fold is MTH of leaves [a, b), for a range
    that is a subtree of some RFC 6962 tree (a aligned to a power of two >= b - a)."""
    out = []
    while a < b:
        level = (b - a).bit_length() - 1
        out.append((level, a >> level))
        a += 1 << level
    return out


def fold(hashes: list[bytes]) -> bytes:
    """MTH from its perfect subtrees (largest first): they join from the right."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """The ranges whose hashes form PATH(index, D[0:size]) (RFC 6962 §2.1.1), leaf first."""
    if not 0 <= index < size:
        raise ValueError("index outside the tree")
    out: list[Range] = []
    a, b = 0, size
    while b - a > 1:
        k = _split(b - a)
        if index < a + k:
            out.append((a + k, b))
            b = a + k
        else:
            out.append((a, a + k))
            a = a + k
    return out[::-1]


def consistency_ranges(first: int, second: int) -> list[Range]:
    """The ranges whose hashes form PROOF(first, D[0:second]) (RFC 6962 §2.1.2)."""
    if not 0 < first <= second:
        raise ValueError("sizes out of order")
    out: list[Range] = []
    m, a, b, whole = first, 0, second, True
    while m != b - a:
        k = _split(b - a)
        if m <= k:
            out.append((a + k, b))
            b = a + k
        else:
            out.append((a, a + k))
            m, a, whole = m - k, a + k, False
    if not whole:
        out.append((a, b))
    return out[::-1]


def nodes_for(ranges: Iterable[Range]) -> set[Node]:
    return {n for a, b in ranges for n in perfect_nodes(a, b)}


def verify_inclusion(leaf: bytes, index: int, size: int, path: list[bytes], root: bytes) -> bool:
    """Whether `path` proves leaf hash `leaf` at `index` of the tree of `size` with `root`."""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: list[bytes]) -> bool:
    """Whether `proof` shows the tree of `second` leaves extends the one of `first`."""
    if not 0 < first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first & (first - 1) == 0:                   # a power of two: its root starts the proof
        proof = [first_root, *proof]
    if not proof:
        return False
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == first_root and sr == second_root and sn == 0


class Frontier:
    """The right edge of a growing tree: for each set bit of its size, the perfect subtree
    of that level. Appending leaves yields the perfect nodes they complete."""

    def __init__(self, size: int = 0, edge: dict[int, bytes] | None = None):
        self.size = size
        self.edge = dict(edge or {})          # level -> hash

    @staticmethod
    def edge_nodes(size: int) -> list[Node]:
        """The perfect nodes a frontier of `size` leaves holds (to load it from storage)."""
        return perfect_nodes(0, size)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; the (level, idx, hash) of every node it completes."""
        idx, level, h = self.size, 0, leaf
        done = [(0, idx, h)]
        while idx & 1:
            h = node_hash(self.edge.pop(level), h)
            level, idx = level + 1, idx >> 1
            done.append((level, idx, h))
        self.edge[level] = h
        self.size += 1
        return done

    def root(self) -> bytes:
        if not self.size:
            return hashlib.sha256(b"").digest()
        return fold([self.edge[level] for level in sorted(self.edge, reverse=True)])


def hashes_of(ranges: list[Range], lookup: Callable[[Node], bytes]) -> list[bytes]:
    """The hashes of `ranges` from a lookup of stored perfect nodes."""
    return [fold([lookup(n) for n in perfect_nodes(a, b)]) for a, b in ranges]
