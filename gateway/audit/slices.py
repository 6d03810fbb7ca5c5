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

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

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
    Filters,
    decode_cursor,
    encode_cursor,
    parse_filters,
    public,
    scoped_args,
)
from .chain import HASHED
from .checkpoints import CHECKPOINTER, checkpoint_json, checkpoint_signed_bytes, fetch_nodes, key_id
from .leaves import SALT, WITHHELD, leaf, record_leaf, row_hash_matches
from .merkle import (
    consistency_ranges,
    hashes_of,
    inclusion_ranges,
    nodes_for,
    verify_consistency,
    verify_inclusion,
)
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


def window_of(filters: Filters, params) -> dict[str, Any]:
    """A slice's window, from its request's parameters as parsed: what the gateway signs,
    and what verify-slice compares with the URL it fetched."""
    return {"from": filters.since.isoformat() if filters.since else None,
            "to": filters.until.isoformat() if filters.until else None,
            "cursor": params.get("cursor"), "limit": filters.limit,
            "query": {k: params.get(k) for k in QUERY if params.get(k) is not None}}


SIGNED = b"partner-gateway-slice/2\n"


def signed_slice_bytes(doc: dict[str, Any], at: str, leaves: list[bytes]) -> bytes:
    """What a slice's signature covers (the same bytes when signed and when checked): its
    format, caller, window, next cursor, the time it was signed, and its rows by chain, seq
    and Merkle leaf (every field it shows, and its row hash: a row not yet sealed too), in
    order (ValueError/KeyError/TypeError if malformed)."""
    rows = hashlib.sha256(orjson.dumps(
        [[e["row"]["chain_id"], e["row"]["seq"], one.hex()]
         for e, one in zip(doc["rows"], leaves, strict=True)])).hexdigest()
    return SIGNED + orjson.dumps(
        {"format": doc["format"], "leaf_format": doc["leaf_format"], "caller": doc["caller"],
         "window": doc["window"], "next_cursor": doc["next_cursor"], "at": at, "rows": rows},
        option=orjson.OPT_SORT_KEYS)


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


# --- offline checks ----------------------------------------------------------------------

class Broken(Exception):
    """What is wrong with a slice or a proof (the first thing found)."""


def _check_checkpoint(cp: Any, keys: dict[str, Ed25519PublicKey]) -> None:
    if not isinstance(cp, dict) or cp.get("version") != 2:
        raise Broken("a checkpoint is not one of format 2 (with a tree)")
    key = keys.get(cp.get("key_id"))
    if key is None:
        raise Broken(f"checkpoint {cp.get('id')} is signed with key {cp.get('key_id')}, which "
                     "is not among the public keys given")
    try:
        key.verify(bytes.fromhex(cp["signature"]), checkpoint_signed_bytes(cp))
    except (InvalidSignature, KeyError, ValueError, TypeError, AttributeError):
        raise Broken(f"the signature of checkpoint {cp.get('id')} does not verify") from None


def _values(item: dict[str, Any], salted: bool) -> list[Any]:
    """A row as served, back in the form its hash covers (HASHED order; the time as a
    datetime; the redaction receipt as the canonical JSON text it is stored as). A row of
    format 1 has no salt (it was written without one), nor the fields added beside it
    (phase, access: null for every row it could hold)."""
    values = [item[name] if salted or name not in _SINCE_FORMAT_2 else item.get(name)
              for name in HASHED]
    values[0] = datetime.fromisoformat(values[0])
    if item.get("withheld") is not None:
        values[_WITHHELD_RECEIPT] = orjson.dumps(item["withheld"],
                                                 option=orjson.OPT_SORT_KEYS).decode()
    return values


_WITHHELD_RECEIPT = HASHED.index("withheld")
_SINCE_FORMAT_2 = frozenset(("phase", "access", SALT))


def _hex_list(value: Any) -> list[bytes]:
    if not isinstance(value, list):
        raise ValueError("not a list")
    return [bytes.fromhex(h) for h in value]


def _order_key(item: dict[str, Any]) -> tuple:
    return datetime.fromisoformat(item["at"]), uuid.UUID(item["chain_id"]), item["seq"]


def verify_slice(doc: Any, keys: dict[str, Ed25519PublicKey], previous: Any = None,
                 asked: Mapping[str, str] | None = None,
                 previous_asked: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Check a slice offline; a report whose `ok` says whether everything held. `asked`:
    the query parameters of the URL the slice was fetched from (None: a saved file), which
    its signed window must be; `previous_asked` the same for `previous`."""
    report: dict[str, Any] = {"ok": False, "rows_checked": 0, "rows_proved": 0,
                              "rows_not_yet_sealed": 0, "rows_fully_disclosed": 0,
                              "checkpoints_checked": 0, "problem": None}
    try:
        proved = _verify(doc, keys, report, asked)
        if previous is not None:
            old = _verify(previous, keys, {**report}, previous_asked)
            _still_there(doc, previous, proved, old)
            report["previous_rows_found"] = len(old)
        report["ok"] = True
    except Broken as e:
        report["problem"] = str(e)
    return report


def _verify(doc: Any, keys, report: dict[str, Any],
            asked: Mapping[str, str] | None) -> dict[tuple[str, int], str]:
    """Check one slice; the proved rows (chain, seq) -> row hash."""
    if not isinstance(doc, dict) or FORMATS.get(doc.get("format")) != doc.get("leaf_format") \
            or doc.get("leaf_format") is None:
        raise Broken(f"not a slice of format {SLICE_FORMAT} (or 1)")
    salted = doc["format"] == SLICE_FORMAT
    checkpoints = {}
    for cp in doc.get("checkpoints") or []:
        _check_checkpoint(cp, keys)
        if cp["chain_id"] in {c["chain_id"] for c in checkpoints.values()}:
            raise Broken(f"two checkpoints for chain {cp['chain_id']}")
        checkpoints[cp["id"]] = cp
        report["checkpoints_checked"] += 1
    latest = {cp["chain_id"]: cp for cp in checkpoints.values()}
    proved: dict[tuple[str, int], str] = {}
    leaves: list[bytes] = []
    last_key = None
    for n, entry in enumerate(doc.get("rows") or []):
        try:
            item = entry["row"]
            where = f"row {n} (chain {item['chain_id']}, seq {item['seq']})"
            values = _values(item, salted)
            row_hash = bytes.fromhex(entry["row_hash"])
            key = _order_key(item)
            inclusion = entry["inclusion"]
            if type(item["seq"]) is not int:
                raise TypeError("seq is an integer")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise Broken(f"row {n} is malformed") from None
        report["rows_checked"] += 1
        disclosed = entry.get("disclosed")
        if not isinstance(disclosed, bool):
            raise Broken(f"{where}: disclosed is true or false")
        # what no hash covers must not be there: a field beyond the hashed ones, or (below)
        # a withheld field filled in on a row whose row_hash the caller cannot recompute
        extra = sorted(set(item) - set(HASHED))
        if extra:
            raise Broken(f"{where} holds {', '.join(extra)}, which nothing in the slice proves")
        if last_key is not None and not key < last_key:
            raise Broken(f"{where} is out of order (rows come newest first, each once)")
        last_key = key
        if not disclosed:
            # an undisclosed row's proof covers these fields as null only: a value shown
            # there would pass unverified (a tamperer's client address, say)
            shown = [name for name in (*WITHHELD, SALT, "prev_hash")
                     if (entry if name == "prev_hash" else item).get(name) is not None]
            if shown:
                raise Broken(f"{where} is not disclosed but shows {', '.join(shown)}, which "
                             "its proof does not cover")
        if disclosed:
            try:
                ok = row_hash_matches(values, bytes.fromhex(entry["prev_hash"]), row_hash)
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise Broken(f"{where}: its fields do not match its row hash")
            report["rows_fully_disclosed"] += 1
        try:
            leaf_hash = leaf(values, row_hash)
        except (ValueError, TypeError, IndexError, AttributeError):
            raise Broken(f"{where} is malformed") from None
        leaves.append(leaf_hash)
        cp = latest.get(item["chain_id"])
        if inclusion is None:
            if cp is not None and item["seq"] <= cp["tree_size"]:
                raise Broken(f"{where} is sealed by checkpoint {cp['id']} but comes without "
                             "its proof")
            report["rows_not_yet_sealed"] += 1
            continue
        if cp is None or entry.get("checkpoint") != cp["id"]:
            raise Broken(f"{where}: its checkpoint is not in the slice or is not its chain's")
        try:
            path = _hex_list(inclusion)
        except (ValueError, TypeError, IndexError, AttributeError):
            raise Broken(f"{where} is malformed") from None
        if not verify_inclusion(leaf_hash, item["seq"] - 1, cp["tree_size"], path,
                                bytes.fromhex(cp["root"])):
            raise Broken(f"{where} is not in the tree its checkpoint signed (altered, moved, "
                         "or its proof is wrong)")
        proved[(item["chain_id"], item["seq"])] = entry["row_hash"]
        report["rows_proved"] += 1
    if salted:      # what the slice says it is (checked last: a row's own fault is named first)
        _check_signed(doc, keys, leaves)
        _check_next_cursor(doc)
        report["window"] = doc["window"]
    if asked is not None:
        _check_asked(doc, asked)
    return proved


def _check_signed(doc: dict[str, Any], keys: dict[str, Ed25519PublicKey],
                  leaves: list[bytes]) -> None:
    """The slice's own signature (format 2): its caller, window, next cursor and rows (their
    leaves) are what the gateway answered."""
    signed = doc.get("signed")
    if not isinstance(signed, dict):
        raise Broken("the slice is not signed")
    key = keys.get(signed.get("key_id"))
    if key is None:
        raise Broken(f"the slice is signed with key {signed.get('key_id')}, which is not among "
                     "the public keys given")
    try:
        key.verify(bytes.fromhex(signed["signature"]),
                   signed_slice_bytes(doc, signed["at"], leaves))
    except (InvalidSignature, KeyError, ValueError, TypeError, AttributeError):
        raise Broken("the slice's signature does not verify (its caller, window, next "
                     "cursor or rows are not what the gateway answered)") from None


def _check_asked(doc: dict[str, Any], asked: Mapping[str, str]) -> None:
    """The slice's window is the one the URL it came from asked for."""
    try:
        expected = window_of(parse_filters(asked, download=False), asked)
    except Denied as e:
        raise Broken(f"the URL asked for no slice the gateway answers ({e.message})") from None
    if doc.get("format") != SLICE_FORMAT:
        expected = {k: v for k, v in expected.items() if k != "limit"}     # format 1 had none
    if doc.get("window") != expected:
        raise Broken(f"the slice's window {orjson.dumps(doc.get('window')).decode()} is not the "
                     f"one asked for, {orjson.dumps(expected).decode()}")


def _check_next_cursor(doc: dict[str, Any]) -> None:
    """A full page names its last row as the next page's cursor; any other none."""
    rows, limit = doc["rows"], doc["window"]["limit"]
    expected = None
    if rows and limit is not None and len(rows) == limit:
        last = rows[-1]["row"]
        expected = encode_cursor({**last, "at": datetime.fromisoformat(last["at"])})
    if doc.get("next_cursor") != expected:
        raise Broken("the slice's next_cursor is not that of its last row on a full page "
                     "(nor none on a page that is not full)")


def _still_there(doc, previous, proved, old) -> None:
    """Every proved row of `previous` inside `doc`'s window is in `doc`, unchanged. The
    window is `doc`'s signed one (format 2 only): its edges are the times and the cursor
    asked for, and the last row of a full page."""
    if doc.get("format") != SLICE_FORMAT:
        raise Broken(f"--previous needs a slice of format {SLICE_FORMAT}: the window of an "
                     "older one is not signed, so rows missing from it cannot be told apart "
                     "from rows outside it")
    if previous.get("caller") != doc.get("caller") or \
            (previous.get("window") or {}).get("query") != doc["window"].get("query"):
        raise Broken("the previous slice is of another caller or query")
    window = doc["window"]
    try:
        low = datetime.fromisoformat(window["from"]) if window.get("from") else None
        high = datetime.fromisoformat(window["to"]) if window.get("to") else None
        top = decode_cursor(window["cursor"]) if window.get("cursor") else None
    except (Denied, ValueError, TypeError):
        raise Broken("the slice's window is malformed") from None
    rows = doc["rows"]
    limit = window.get("limit")
    full = bool(rows) and limit is not None and len(rows) == limit
    floor = _order_key(rows[-1]["row"]) if full else None
    for entry in previous.get("rows") or []:
        item = entry["row"]
        key = (item["chain_id"], item["seq"])
        if key not in old:
            continue
        at = datetime.fromisoformat(item["at"])
        if (low and at < low) or (high and at >= high):
            continue
        order = _order_key(item)
        if (floor and order < floor) or (top and order >= top):
            continue                       # on another page of this window
        if key not in proved:
            raise Broken(f"chain {key[0]} seq {key[1]}, proved in the previous slice, is gone")
        if proved[key] != old[key]:
            raise Broken(f"chain {key[0]} seq {key[1]} changed since the previous slice")


def verify_consistency_doc(doc: Any, keys: dict[str, Ed25519PublicKey]) -> dict[str, Any]:
    """Check a consistency proof offline (both checkpoints signed, the proof holding)."""
    report: dict[str, Any] = {"ok": False, "problem": None}
    try:
        if not isinstance(doc, dict) or doc.get("format") != CONSISTENCY_FORMAT:
            raise Broken(f"not a consistency proof of format {CONSISTENCY_FORMAT}")
        first, second = doc.get("first"), doc.get("second")
        _check_checkpoint(first, keys)
        _check_checkpoint(second, keys)
        if first["chain_id"] != second["chain_id"]:
            raise Broken("the two checkpoints are of different chains")
        try:
            proof = _hex_list(doc.get("proof"))
        except (ValueError, TypeError):
            raise Broken("the proof is malformed") from None
        if not verify_consistency(first["tree_size"], second["tree_size"],
                                  bytes.fromhex(first["root"]), bytes.fromhex(second["root"]),
                                  proof):
            raise Broken(f"the tree of checkpoint {second['id']} does not extend the tree of "
                         f"checkpoint {first['id']}: sealed rows were changed or removed")
        report.update(ok=True, chain_id=first["chain_id"], first_size=first["tree_size"],
                      second_size=second["tree_size"])
    except Broken as e:
        report["problem"] = str(e)
    return report

