"""GET /v1/audit/slice and /v1/audit/consistency, and their offline checks.

A slice is a page of the caller's own rows of the access log (the scope of /v1/audit for a
partner or an EUO admin, of /v1/me/access-log for a user: the same named queries and scope
functions), each with an RFC 6962 inclusion proof against its chain's last signed tree
root. Other tenants' rows never appear; their leaves enter only as hashes inside proofs.
`gateway audit verify-slice FILE --public-key K` checks a slice without any database:
the checkpoints' signatures, every row's fields against its leaf, every proof against its
signed root; with --previous OLD, that every proved row of an earlier slice of the same
window is still there, unchanged (a row dropped since is found).

A row the caller may not see whole comes without its withheld fields, its salt and its
prev_hash: its row hash, a salted commitment to them (gateway/audit/leaves.py), confirms no
guess of who acted or from where.

What a slice says it is (format 2) is signed with the checkpoints' key: its caller, its
window (from, to, cursor, limit, filters: the request's own parameters, as parsed), the
next page's cursor, and which rows it holds (chain, seq and Merkle leaf of each, in order).
A slice that claims another window, or drops a row of its own, no longer verifies; fetched
by URL, its window must also be the URL's; --previous trusts nothing but the signed window,
and derives the page's edges from it (the cursor asked, and the last row of a full page).
Slices of format 1 (unsigned, their rows unsalted) still verify alone.

A consistency proof (RFC 6962 §2.1.2) between two signed roots of one chain shows the
later tree extends the earlier one: nothing sealed before was changed or taken out.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..context import GATEWAY
from ..db import query
from ..endpoints import api, json_response, only
from ..errors import Denied
from ..principal import Principal
from ..reads import READS
from .api import (
    FILTERS,
    PAGING,
    WINDOW,
    encode_cursor,
    parse_filters,
    public,
    scoped_args,
)
from .checkpoints import CHECKPOINTER, checkpoint_json, fetch_nodes, key_id
from .leaves import SALT, WITHHELD, record_leaf
from .merkle import (
    consistency_ranges,
    hashes_of,
    inclusion_ranges,
    nodes_for,
)
from .slice_check import signed_slice_bytes, window_of
from .writer import AuditRow

SLICE_FORMAT = "partner-gateway-slice/2"
CONSISTENCY_FORMAT = "partner-gateway-consistency/1"
LEAF_FORMAT = "partner-gateway-leaf/2"
# what verify-slice still reads: format 1 (before rows had salts and slices a signature)
FORMATS = {SLICE_FORMAT: LEAF_FORMAT, "partner-gateway-slice/1": "partner-gateway-leaf/1"}
QUERY = ("actor", "subject_user", "euo", "dataset", "decision")


def as_subject(principal: Principal) -> bool:
    """Whether the caller's slice is the data subject's (the access log's scope) rather
    than a tenant's audit scope; Denied(403) if it may have neither."""
    kind = principal.kind
    if kind.tenant_claim is not None and kind.may("audit"):
        return False
    if kind.data_subject:
        return True
    raise Denied("role_not_permitted", "only a role with a tenant's audit scope or a "
                 "data subject may ask for a slice (roles.yaml)")


def _caller(principal: Principal, subject: bool) -> dict[str, Any]:
    claim = principal.kind.tenant_claim
    out = {"role": principal.role, claim: getattr(principal, claim)}
    if subject:
        out["sub"] = principal.sub
    return out


async def build_slice(conn, principal: Principal, params, data_subject_roles: list[str],
                      key: Ed25519PrivateKey) -> dict[str, Any]:
    """One page (at most 1000 rows, newest first) of the caller's own rows with their
    proofs, what it is signed with `key` (signed_slice_bytes)."""
    subject = as_subject(principal)
    filters = parse_filters(params, download=False, takes=WINDOW if subject else FILTERS + PAGING)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute("set local plan_cache_mode = force_custom_plan")
        if subject:
            at, chain, seq = filters.cursor or (None, None, None)
            rows = await conn.fetch(query("access_log"), principal.sub, principal.euo,
                                    filters.since, filters.until, at, chain, seq, filters.limit,
                                    data_subject_roles)
        else:
            rows = await conn.fetch(query("audit_query"), *scoped_args(filters, principal))
        trees = {cp["chain_id"]: cp for cp in await conn.fetch(
            query("audit_latest_trees"), list({r["chain_id"] for r in rows}))}
        wanted = defaultdict(dict)          # chain -> row seq -> ranges of its proof
        for r in rows:
            cp = trees.get(r["chain_id"])
            if cp is not None and r["seq"] <= cp["tree_size"]:
                wanted[r["chain_id"]][r["seq"]] = inclusion_ranges(r["seq"] - 1, cp["tree_size"])
        proofs: dict[tuple[uuid.UUID, int], list[bytes]] = {}
        for chain_id, by_seq in wanted.items():
            nodes = await fetch_nodes(conn, chain_id,
                                      nodes_for(rg for rs in by_seq.values() for rg in rs))
            for s, ranges in by_seq.items():
                try:
                    proofs[(chain_id, s)] = hashes_of(ranges, nodes.__getitem__)
                except KeyError:
                    raise Denied("audit_tree_incomplete", "the audit log's Merkle "
                                 "tree lacks nodes a proof needs") from None
    entries, leaves = [], []
    for r in rows:
        item = public(r, principal)
        del item["outcome"]                 # derived from other rows: no hash covers it
        if subject:                         # a data subject sees others by role and organisation only
            for name in WITHHELD:
                item[name] = None
        disclosed = all(item[name] == r[name] for name in WITHHELD)
        # the salt of the row's hash opens it only to those who see the row whole
        item[SALT] = r[SALT] if disclosed else None
        proof = proofs.get((r["chain_id"], r["seq"]))
        entries.append({
            "row": item, "row_hash": bytes(r["row_hash"]).hex(), "disclosed": disclosed,
            "prev_hash": bytes(r["prev_hash"]).hex() if disclosed else None,
            "checkpoint": trees[r["chain_id"]]["id"] if proof is not None else None,
            "inclusion": [h.hex() for h in proof] if proof is not None else None})
        leaves.append(record_leaf(r))
    truncated = filters.limit is not None and len(rows) == filters.limit
    doc = {
        "format": SLICE_FORMAT, "leaf_format": LEAF_FORMAT, "caller": _caller(principal, subject),
        "window": window_of(filters, params),
        "checkpoints": [checkpoint_json(cp) for cp in trees.values()],
        "rows": entries,
        "not_yet_sealed": sum(1 for e in entries if e["inclusion"] is None),
        "next_cursor": encode_cursor(rows[-1]) if truncated else None}
    at = datetime.now(UTC).isoformat()
    doc["signed"] = {"at": at, "key_id": key_id(key.public_key()),
                     "signature": key.sign(signed_slice_bytes(doc, at, leaves)).hex()}
    return doc


@api("/v1/audit/slice")
async def audit_slice(request: web.Request, principal: Principal, row: AuditRow):
    """The caller's rows with inclusion proofs against signed roots (see build_slice): a
    tenant's audit scope (roles.yaml: a tenant claim and gateway_api `audit`), or the data
    subject's access log."""
    if as_subject(principal):
        row.subject_euo, row.subject_users = principal.euo, [principal.sub]
    async with request.app[READS].acquire(request) as conn:
        return json_response(await build_slice(conn, principal, request.query,
                                               request.app[GATEWAY].catalog.data_subject_roles,
                                               request.app[CHECKPOINTER].key))


@api("/v1/audit/consistency")
async def audit_consistency(request: web.Request, principal: Principal, row: AuditRow):
    """A consistency proof between two format 2 checkpoints (`first`, `second`: their ids)
    of one chain."""
    only(request.query, ("first", "second"))
    ids = []
    for name in ("first", "second"):
        raw = request.query.get(name, "")
        if not (raw.isdigit() and int(raw) < 2**63):
            raise Denied("bad_filter", "first and second must be checkpoint ids")
        ids.append(int(raw))
    async with request.app[READS].acquire(request) as conn:
        return json_response(await consistency_doc(conn, *ids))


async def consistency_doc(conn, first_id: int, second_id: int) -> dict[str, Any]:
    """Both checkpoints and the proof that the second's tree extends the first's."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        first, second = [await conn.fetchrow(query("audit_checkpoint"), i)
                         for i in (first_id, second_id)]
        if first is None or second is None:
            raise Denied("no_such_checkpoint", "no checkpoint has that id")
        if (first["chain_id"] != second["chain_id"] or first["version"] != 2
                or second["version"] != 2 or first["tree_size"] > second["tree_size"]):
            raise Denied("bad_filter", "first and second must be checkpoints with a "
                         "tree (format 2) of one chain, first the smaller")
        ranges = consistency_ranges(first["tree_size"], second["tree_size"])
        nodes = await fetch_nodes(conn, first["chain_id"], nodes_for(ranges))
    try:
        proof = hashes_of(ranges, nodes.__getitem__)
    except KeyError:
        raise Denied("audit_tree_incomplete", "the audit log's Merkle tree lacks "
                     "nodes a proof needs") from None
    return {"format": CONSISTENCY_FORMAT, "first": checkpoint_json(first),
            "second": checkpoint_json(second), "proof": [h.hex() for h in proof]}


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/audit/slice", audit_slice)
    app.router.add_get("/v1/audit/consistency", audit_consistency)
