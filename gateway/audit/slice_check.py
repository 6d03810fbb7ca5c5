"""Checking a slice or a consistency proof with no database, as an auditor or tenant does
(`gateway audit verify-slice`, `verify-consistency`): the signatures, every row against
its signed root, and a later slice against an earlier one."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import Denied
from .api import (
    Filters,
    decode_cursor,
    encode_cursor,
    parse_filters,
)
from .chain import HASHED
from .checkpoints import checkpoint_signed_bytes
from .leaves import SALT, WITHHELD, leaf, row_hash_matches
from .merkle import (
    verify_consistency,
    verify_inclusion,
)

SLICE_FORMAT = "partner-gateway-slice/2"
CONSISTENCY_FORMAT = "partner-gateway-consistency/1"
LEAF_FORMAT = "partner-gateway-leaf/2"
# what verify-slice still reads: format 1 (before rows had salts and slices a signature)
FORMATS = {SLICE_FORMAT: LEAF_FORMAT, "partner-gateway-slice/1": "partner-gateway-leaf/1"}
QUERY = ("actor", "subject_user", "euo", "dataset", "decision")

SIGNED = b"partner-gateway-slice/2\n"



def window_of(filters: Filters, params) -> dict[str, Any]:
    """A slice's window, from its request's parameters as parsed: what the gateway signs,
    and what verify-slice compares with the URL it fetched."""
    return {"from": filters.since.isoformat() if filters.since else None,
            "to": filters.until.isoformat() if filters.until else None,
            "cursor": params.get("cursor"), "limit": filters.limit,
            "query": {k: params.get(k) for k in QUERY if params.get(k) is not None}}


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


_WITHHELD_RECEIPT = HASHED.index("withheld")


_SINCE_FORMAT_2 = frozenset(("phase", "access", SALT))


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
