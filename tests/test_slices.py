"""Per-tenant verifiable slices: each caller gets only its own rows, each with an RFC 6962
inclusion proof against a signed root, checkable offline with the public key alone; a
flipped bit, a dropped or reordered row, a forged key or a swapped root is found; a
consistency proof shows a signed tree only grew, and fails once a past row is rewritten."""

from __future__ import annotations

import asyncio
import base64
import copy
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from gateway.audit.chain import GENESIS, HASHED, canonical, link
from gateway.audit.checkpoints import Runs, key_id, load_public_keys, load_signing_key, signed_bytes
from gateway.audit.leaves import WITHHELD, record_leaf
from gateway.audit.merkle import Frontier
from gateway.audit.slice_check import verify_consistency_doc, verify_slice
from gateway.audit.slices import build_slice, consistency_doc
from gateway.db import query
from gateway.policy.catalog_files import load_catalog
from gateway.principal import Principal

from .conftest import (
    CALLERS,
    POLICY_DIR,
    call,
    gateway_main,
    gateway_settings,
    own_database,
    running_gateway,
    wait_for,
)

pytestmark = pytest.mark.slow

REQUESTS = [  # (caller, path): rows about several tenants, by several roles
    # one row per backend call, all by the admin about Alice, none with a trace or request id
    ("admin", "/v1/euos/euo-acme/users/u-alice/export?purpose=user_cannot_sign_in&format=json"),
    ("staff", "/telephony/euos/euo-acme/users/u-alice"),
    ("staff", "/telephony/euos/euo-initech/users/u-farid"),
    ("partner", "/telephony/euos/euo-globex/users/u-dirk"),
    ("partner", "/telephony/euos/euo-acme/users/u-bob"),
    ("admin", "/telephony/euos/euo-acme/users/u-alice"),
    ("admin", "/telephony/euos/euo-acme"),
    ("bluesky", "/telephony/euos/euo-initech/users/u-greet"),
    ("staff", "/telephony/euos/euo-acme/users/u-alice/voicemails"),
    ("partner", "/telephony/euos/euo-acme/users/u-alice"),
    ("partner", "/meeting/accounts/euo-acme/connection-stats"),   # a receipt: past retention
]
# the demo's contracts in force (Umbrella's ended)
CONTRACTED = {"p-northwind": {"euo-acme", "euo-globex"}, "p-bluesky": {"euo-initech"}}
CALLERS_HERE = {**CALLERS, "bluesky": dict(role="partner", sub="ops@bluesky", partner="p-bluesky")}


CATALOG = load_catalog(POLICY_DIR)


def _principal(name: str = None, **spec) -> Principal:
    spec = spec or CALLERS_HERE[name]
    return Principal(**spec, kind=CATALOG.roles[spec["role"]])


async def _slice(conn, principal, key, params=()):
    return await build_slice(conn, principal, MultiDict(params), CATALOG.data_subject_roles, key)


@pytest_asyncio.fixture(scope="module")
async def sliced(tmp_path_factory, database_url, template_database, backends, http,
                 token_for):
    """A database of its own whose log holds REQUESTS, sealed with trees; the slices and keys."""
    where = tmp_path_factory.mktemp("sliced")
    async with own_database(database_url, template_database) as dsn:
        settings = gateway_settings(backends["urls"], audit_checkpoint_s=0.2, data_dir=where)
        async with running_gateway(settings, dsn) as gw:
            for name, path in REQUESTS:
                status = (await call(http, "GET", gw + path, token_for(**CALLERS_HERE[name])))[0]
                assert status in (200, 403), (name, path)   # a refusal is a row too
            conn = await asyncpg.connect(dsn)
            try:
                async def sealed():       # every chain's rows so far under a signed tree
                    return await conn.fetchval(
                        "select bool_and(coalesce((select max(tree_size) from audit_checkpoints c"
                        " where c.chain_id = h.chain_id and version = 2), 0) >= h.last_seq)"
                        " from audit_chain_heads h")
                assert await wait_for(sealed, timeout=10)
            finally:
                await conn.close()
            slices = {}
            for name in ("admin", "partner", "alice", "bluesky"):
                status, _, body = await call(http, "GET", gw + "/v1/audit/slice",
                                             token_for(**CALLERS_HERE[name]))
                assert status == 200, body
                slices[name] = orjson.loads(body)
            status, _, body = await call(http, "GET", gw + "/v1/audit/keys")
            keys = orjson.loads(body)["keys"]
            status, _, body = await call(http, "GET", gw + "/v1/audit/slice", token_for("staff"))
            assert status == 403 and orjson.loads(body)["error"]["code"] == "role_not_permitted"
            # every role may ask for a consistency proof (it names no tenant)
            status, _, body = await call(http, "GET", gw + "/v1/audit/consistency?first=1&second=1",
                                         token_for("alice"))
            assert status in (200, 400), body
            status, _, body = await call(http, "GET", gw + "/v1/audit/consistency?first=x&second=1",
                                         token_for("alice"))
            assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_filter"
            status, _, body = await call(
                http, "GET", gw + "/v1/audit/consistency?first=1&second=999999", token_for("admin"))
            assert status == 404 and orjson.loads(body)["error"]["code"] == "no_such_checkpoint"
        pems = []
        for key in keys:
            path = where / f"{key['key_id']}.pub.pem"
            path.write_text(key["public_key_pem"])
            pems.append(path)
        yield {"dsn": dsn, "slices": slices, "pems": pems, "where": where,
               "private_key": where / "audit-signing-key.pem",
               "key": load_signing_key(where / "audit-signing-key.pem")}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`gateway audit ARGS` with no database, in this process (test_slice_download runs the
    command as a process of its own)."""
    return gateway_main("audit", *args,
                        env={"GATEWAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})


def _keyargs(pems) -> list[str]:
    return [a for p in pems for a in ("--public-key", str(p))]


def _in_scope(name: str, row: dict) -> bool:
    """Independently of the gateway's SQL: whether `row` is about (or by) the caller."""
    c = CALLERS_HERE[name]
    if c["role"] == "euo_admin":
        return row["subject_euo"] == c["euo"]
    if c["role"] == "user":
        return (row["subject_euo"] == c["euo"] and c["sub"] in row["subject_users"]
                and not (row["actor_role"] == "user" and row["actor_sub"] == c["sub"]))
    return row["actor_partner"] == c["partner"] or row["subject_euo"] in CONTRACTED[c["partner"]]


async def test_each_callers_slice_verifies_offline_and_holds_only_its_rows(sliced):
    for name, doc in sliced["slices"].items():
        rows = [e["row"] for e in doc["rows"]]
        assert rows and all(_in_scope(name, r) for r in rows), name
        assert doc["rows"][0]["inclusion"] is not None
        report = verify_slice(doc, load_public_keys(sliced["pems"]))
        assert report["ok"], (name, report)
        assert report["rows_proved"] == len(rows) - report["rows_not_yet_sealed"] > 0
    # a row with a redaction receipt (stored as JSON text, served as an object) verifies too
    assert any(e["row"]["withheld"] and e["inclusion"] for e in sliced["slices"]["partner"]["rows"])
    # the EUO admin sees the staff's and the partner's requests about Acme, the actor withheld
    admin = sliced["slices"]["admin"]
    staff_rows = [e for e in admin["rows"] if e["row"]["actor_role"] == "provider_staff"]
    assert staff_rows and all(e["row"]["actor_sub"] is None and not e["disclosed"]
                              for e in staff_rows)
    own = [e for e in admin["rows"] if e["row"]["actor_role"] == "euo_admin"]
    assert own and all(e["disclosed"] and e["prev_hash"] for e in own)
    # a user sees nobody by name, not even their own EUO's admin
    assert all(e["row"][f] is None for e in sliced["slices"]["alice"]["rows"] for f in WITHHELD)
    # the one command an EUO admin runs, with no database
    path = sliced["where"] / "admin-slice.json"
    path.write_bytes(orjson.dumps(admin))
    done = _cli("verify-slice", str(path), *_keyargs(sliced["pems"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert orjson.loads(done.stdout)["ok"] is True


# --- nothing a caller may not see can be guessed from a slice --------------------------------

def _as_hashed(item: dict) -> list:
    """A served row's fields as its row hash covers them (independently of the gateway's
    verifier): HASHED order, the time as a datetime, the receipt as canonical JSON text;
    a field the slice does not show (a salt it keeps back) as null."""
    values = [item.get(name) for name in HASHED]
    values[0] = datetime.fromisoformat(values[0])
    if item.get("withheld") is not None:
        values[HASHED.index("withheld")] = orjson.dumps(item["withheld"],
                                                        option=orjson.OPT_SORT_KEYS).decode()
    return values


async def test_a_withheld_actor_cannot_be_guessed_from_a_slice(sliced):
    """Finding 4. A row the caller sees without its actor (another organisation's) whose
    chain predecessor is in the same slice: that predecessor's row_hash is the row's
    prev_hash, so with a handful of likely actors and addresses the row hash once confirmed
    the right guess where nothing else was hidden (an export's backend calls: no trace or
    request id). The row's hash now covers a random salt the caller never sees."""
    subs = [None, *{c["sub"] for c in CALLERS_HERE.values()}]
    addresses = [None, "127.0.0.1", "::1"]
    tried = recovered = 0
    for name, doc in sliced["slices"].items():
        by_place = {(e["row"]["chain_id"], e["row"]["seq"]): e for e in doc["rows"]}
        for e in doc["rows"]:
            before = by_place.get((e["row"]["chain_id"], e["row"]["seq"] - 1))
            if e["disclosed"] or before is None:
                continue
            tried += 1
            assert e["row"].get("salt") is None, name      # never shown to this caller
            prev = bytes.fromhex(before["row_hash"])
            for sub in subs:
                for address in addresses:
                    guess = _as_hashed({**e["row"], "actor_sub": sub, "client_addr": address})
                    if link(prev, canonical(guess)).hex() == e["row_hash"]:
                        recovered += 1
                        print(f"{name} recovered {sub} from {address} on seq {e['row']['seq']}")
    assert tried >= 8          # the export's rows, to the user and to the partner
    assert recovered == 0


async def test_a_row_seen_whole_shows_its_salt_and_verifies(sliced):
    """The caller who sees a row whole gets its salt, and recomputes its row hash."""
    own = [e for e in sliced["slices"]["admin"]["rows"] if e["disclosed"]]
    assert own and all(len(bytes.fromhex(e["row"]["salt"])) == 16 for e in own)
    for e in own:
        assert link(bytes.fromhex(e["prev_hash"]),
                    canonical(_as_hashed(e["row"]))).hex() == e["row_hash"]


def _first_sealed(doc) -> int:
    return next(i for i, e in enumerate(doc["rows"]) if e["inclusion"] is not None)


def _flip_field(doc):
    i = _first_sealed(doc)
    doc["rows"][i]["row"]["status"] += 1


def _flip_hash_bit(doc):
    i = _first_sealed(doc)
    h = bytearray.fromhex(doc["rows"][i]["row_hash"])
    h[3] ^= 0x10
    doc["rows"][i]["row_hash"] = h.hex()


def _reorder(doc):
    doc["rows"][0], doc["rows"][1] = doc["rows"][1], doc["rows"][0]


def _swap_proofs(doc):      # each row keeps its place, but claims the other's leaf position
    a, b = [i for i, e in enumerate(doc["rows"]) if e["inclusion"] is not None][:2]
    ra, rb = doc["rows"][a]["row"], doc["rows"][b]["row"]
    ra["seq"], rb["seq"] = rb["seq"], ra["seq"]


def _swap_root(doc):
    cp = doc["checkpoints"][0]
    cp["root"] = bytes(32).hex()


def _hide_a_proof(doc):
    doc["rows"][_first_sealed(doc)]["inclusion"] = None


def _name_filled_in(doc):   # who acted, on a row whose actor the caller may not see
    i = next(i for i, e in enumerate(doc["rows"]) if not e["disclosed"])
    doc["rows"][i]["row"]["actor_sub"] = "someone@else"


def _field_added(doc):
    doc["rows"][_first_sealed(doc)]["row"]["approved_by"] = "the DPO"


def _forged_signature(doc):
    sig = bytearray.fromhex(doc["checkpoints"][0]["signature"])
    sig[7] ^= 1
    doc["checkpoints"][0]["signature"] = sig.hex()


TAMPERING = {
    "a flipped field": (_flip_field, "is not in the tree"),
    "a flipped bit in a row hash": (_flip_hash_bit, "is not in the tree"),
    "reordered rows": (_reorder, "out of order"),
    "rows moved to each other's place": (_swap_proofs, None),
    "a swapped root": (_swap_root, "does not verify"),
    "a forged signature": (_forged_signature, "does not verify"),
    "a sealed row passed off as unsealed": (_hide_a_proof, "without its proof"),
    "a withheld name filled in": (_name_filled_in, "not disclosed but shows actor_sub"),
    "a field no hash covers": (_field_added, "approved_by, which nothing in the slice proves"),
}


def _undisclosed(doc) -> dict:
    return next(e for e in doc["rows"] if not e["disclosed"])


def _address_on_an_undisclosed_row(doc):
    _undisclosed(doc)["row"]["client_addr"] = "203.0.113.9"


def _disclosed_row_altered_and_undisclosed(doc):
    entry = next(e for e in doc["rows"] if e["disclosed"])
    entry["row"]["client_addr"] = "203.0.113.9"
    entry["disclosed"] = False


def _disclosed_as_text(doc):
    next(e for e in doc["rows"] if e["disclosed"])["disclosed"] = "yes"


TAMPERING.update({
    "an address shown on an undisclosed row": (_address_on_an_undisclosed_row,
                                               "not disclosed but shows client_addr"),
    "a disclosed row altered and said undisclosed": (_disclosed_row_altered_and_undisclosed,
                                                     "not disclosed but shows"),
    "disclosed as text": (_disclosed_as_text, "disclosed is true or false"),
    "a sequence number as a float": (lambda doc: doc["rows"][0]["row"].update(
        seq=float(doc["rows"][0]["row"]["seq"])), "is malformed"),
})


@pytest.mark.parametrize("tampering", TAMPERING)
async def test_a_tampered_slice_fails(sliced, tampering):
    change, problem = TAMPERING[tampering]
    doc = copy.deepcopy(sliced["slices"]["admin"])
    change(doc)
    report = verify_slice(doc, load_public_keys(sliced["pems"]))
    assert not report["ok"]
    assert problem is None or problem in report["problem"], report
    path = sliced["where"] / f"tampered-{uuid.uuid4().hex}.json"
    path.write_bytes(orjson.dumps(doc))
    done = _cli("verify-slice", str(path), *_keyargs(sliced["pems"]))
    assert done.returncode == 1 and orjson.loads(done.stdout)["ok"] is False


def _seq_as_text(doc):
    doc["rows"][0]["row"]["seq"] = str(doc["rows"][0]["row"]["seq"])


def _checkpoint_id_a_list(doc):
    doc["checkpoints"][0]["id"] = [doc["checkpoints"][0]["id"]]


def _rows_a_mapping(doc):
    doc["rows"] = {"0": doc["rows"][0]}


@pytest.mark.parametrize("change", [_seq_as_text, _checkpoint_id_a_list, _rows_a_mapping],
                         ids=lambda c: c.__name__)
async def test_a_slice_of_the_wrong_types_is_never_verified_and_never_a_traceback(
        sliced, change):
    """A value of another type than the format's (a sequence number as text): once a
    TypeError traceback; now exit 2 with a message, and never ok."""
    doc = copy.deepcopy(sliced["slices"]["admin"])
    change(doc)
    path = sliced["where"] / f"odd-{uuid.uuid4().hex}.json"
    path.write_bytes(orjson.dumps(doc))
    done = _cli("verify-slice", str(path), *_keyargs(sliced["pems"]))
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2 or orjson.loads(done.stdout)["ok"] is False


async def test_a_forged_key_fails(sliced, tmp_path):
    other = tmp_path / "other.pub.pem"
    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    report = verify_slice(sliced["slices"]["partner"], load_public_keys([other]))
    assert not report["ok"] and "not among the public keys" in report["problem"]


async def _tampered(dsn, statement: str, *args):
    """A connection in a transaction (rolled back by the caller) in which `statement` ran
    as a superuser with the append-only triggers off."""
    conn = await asyncpg.connect(dsn)
    tx = conn.transaction(isolation="repeatable_read")
    await tx.start()
    await conn.execute("alter table audit_log disable trigger audit_log_append_only")
    await conn.execute("alter table audit_merkle_runs disable trigger "
                       "audit_merkle_runs_append_only")
    await conn.execute(statement, *args)
    return conn, tx


async def test_a_row_altered_in_the_database_fails_and_a_dropped_one_is_missed(sliced):
    keys = load_public_keys(sliced["pems"])
    before = sliced["slices"]["admin"]
    target = before["rows"][_first_sealed(before)]["row"]
    principal = _principal("admin")
    for statement, problem in (
            ("update audit_log set data_sets = array['directory'] where chain_id = $1 and seq = $2",
             "is not in the tree"),
            ("delete from audit_log where chain_id = $1 and seq = $2", "is gone")):
        conn, tx = await _tampered(sliced["dsn"], statement, uuid.UUID(target["chain_id"]),
                                   target["seq"])
        try:
            after = await _slice(conn, principal, sliced["key"])
        finally:
            await tx.rollback()
            await conn.close()
        report = verify_slice(after, keys, previous=before)
        assert not report["ok"] and problem in report["problem"], report
    # untouched, the later slice agrees with the earlier one
    conn = await asyncpg.connect(sliced["dsn"])
    try:
        again = await _slice(conn, principal, sliced["key"])
    finally:
        await conn.close()
    assert verify_slice(again, keys, previous=before)["ok"]


# --- what a slice says it is cannot be forged ------------------------------------------------

def _cursor_of(item: dict) -> str:
    """The cursor naming a row, as the API encodes one."""
    raw = orjson.dumps([item["at"], item["chain_id"], item["seq"]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def _dropped(sliced, target: dict, params=()) -> dict:
    """The admin's slice as the gateway would answer it with `target` deleted from the
    database (by a superuser, rolled back afterwards)."""
    conn, tx = await _tampered(sliced["dsn"], "delete from audit_log where chain_id = $1 and "
                               "seq = $2", uuid.UUID(target["chain_id"]), target["seq"])
    try:
        return await _slice(conn, _principal("admin"), sliced["key"], params)
    finally:
        await tx.rollback()
        await conn.close()


FORGED = {  # (the slice with a row dropped, the row): the slice claims a window without it
    "a later start": lambda doc, row: doc["window"].update(
        {"from": (datetime.fromisoformat(row["at"]) + timedelta(microseconds=1)).isoformat()}),
    "an earlier end": lambda doc, row: doc["window"].update({"to": row["at"]}),
    "a later page": lambda doc, row: doc["window"].update({"cursor": _cursor_of(row)}),
    "another caller": lambda doc, row: doc["caller"].update({"euo": "euo-globex"}),
    "a full page": lambda doc, row: doc.update(next_cursor=_cursor_of(doc["rows"][-1]["row"])),
    "a row of its own left out": lambda doc, row: doc["rows"].pop(),
}


@pytest.mark.parametrize("forgery", FORGED)
async def test_a_slice_claiming_another_window_fails(sliced, forgery):
    """Finding 5. --previous compared only the rows inside the new slice's window, and took
    the window (from, cursor, next_cursor) from the slice unsigned: a slice with a row
    dropped, rewritten to claim a window without that row, passed. The window, caller,
    next cursor and rows are now signed with the checkpoints' key."""
    keys = load_public_keys(sliced["pems"])
    before = sliced["slices"]["admin"]
    target = before["rows"][_first_sealed(before)]["row"]
    after = await _dropped(sliced, target)
    assert verify_slice(after, keys)["ok"]           # alone, a slice cannot know what is missing
    assert "is gone" in verify_slice(after, keys, previous=before)["problem"]
    forged = copy.deepcopy(after)
    FORGED[forgery](forged, target)
    for previous in (before, None):
        report = verify_slice(forged, keys, previous=previous)
        assert not report["ok"] and "signature does not verify" in report["problem"], report


async def test_a_row_dropped_just_below_the_cursor_is_found(sliced):
    """A later page's upper edge is the cursor it was asked with, not its first row: a row
    dropped right below the cursor was once taken for one of the page before."""
    keys = load_public_keys(sliced["pems"])
    conn = await asyncpg.connect(sliced["dsn"])
    try:
        first = await _slice(conn, _principal("admin"), sliced["key"], {"limit": "2"})
        page = {"limit": "2", "cursor": first["next_cursor"]}
        before = await _slice(conn, _principal("admin"), sliced["key"], page)
    finally:
        await conn.close()
    assert before["rows"][0]["inclusion"] is not None and before["next_cursor"]
    after = await _dropped(sliced, before["rows"][0]["row"], page)
    assert verify_slice(after, keys)["ok"]
    report = verify_slice(after, keys, previous=before)
    assert not report["ok"] and "is gone" in report["problem"], report


async def _serving(body: bytes):
    """A loopback server answering `body` to any GET /v1/audit/slice (a replay)."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")
    app = web.Application()
    app.router.add_get("/v1/audit/slice", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1/audit/slice"


async def test_a_downloaded_slice_must_be_of_the_window_its_url_asked_for(sliced):
    """verify-slice URL: a genuine, signed slice answered for another URL than its own
    (a replayed page, an older window) fails; the slice of the URL asked passes."""
    doc = sliced["slices"]["admin"]                  # asked with no parameters: 100 rows
    runner, url = await _serving(orjson.dumps(doc))
    try:
        for asked, code in (("", 0), ("?limit=100", 0), ("?limit=1000", 1),
                            ("?from=2020-01-01T00:00:00Z", 1), ("?euo=euo-acme", 1),
                            (f"?cursor={_cursor_of(doc['rows'][0]['row'])}", 1)):
            done = await asyncio.to_thread(_cli, "verify-slice", url + asked,
                                           *_keyargs(sliced["pems"]))
            assert done.returncode == code, (asked, done.stdout + done.stderr)
            if code:
                assert "is not the one asked for" in orjson.loads(done.stdout)["problem"]
        # the previous slice too, when downloaded
        saved = sliced["where"] / "asked.json"
        saved.write_bytes(orjson.dumps(doc))
        done = await asyncio.to_thread(_cli, "verify-slice", str(saved), "--previous",
                                       url + "?limit=7", *_keyargs(sliced["pems"]))
        assert done.returncode == 1 and "not the one asked for" in done.stdout, done.stdout
    finally:
        await runner.cleanup()


FORMAT_1 = Path(__file__).parent / "data" / "slice-format-1.json"   # saved from that version


def test_a_slice_of_format_1_still_verifies():
    """A slice answered before rows had salts and slices a signature verifies as it did,
    and fails as it did when tampered with; it cannot be the newer side of --previous (its
    window is not signed, so a row missing from it could be one outside it)."""
    keys = load_public_keys([FORMAT_1.with_suffix(".pub.pem")])
    doc = orjson.loads(FORMAT_1.read_bytes())
    assert doc["format"] == "partner-gateway-slice/1"
    report = verify_slice(doc, keys)
    assert report["ok"] and report["rows_proved"] == 2 and report["rows_fully_disclosed"] == 1
    bad = copy.deepcopy(doc)
    bad["rows"][0]["row"]["status"] += 1
    assert not verify_slice(bad, keys)["ok"]
    report = verify_slice(doc, keys, previous=doc)
    assert not report["ok"] and "needs a slice of format" in report["problem"]


async def test_consistency_proofs_show_the_log_only_grew(sliced):
    keys = load_public_keys(sliced["pems"])
    conn = await asyncpg.connect(sliced["dsn"])
    try:
        cps = await conn.fetch("select id, chain_id, tree_size from audit_checkpoints where version"
                               " = 2 order by chain_id, tree_size")
        chain = max({c["chain_id"] for c in cps}, key=lambda ch: sum(c["chain_id"] == ch for c in cps))
        mine = [c for c in cps if c["chain_id"] == chain]
        assert len(mine) >= 2
        for a, b in zip(mine, mine[1:], strict=False):
            doc = await consistency_doc(conn, a["id"], b["id"])
            assert verify_consistency_doc(doc, keys)["ok"]
        first, last = mine[0], mine[-1]
        doc = await consistency_doc(conn, first["id"], last["id"])
    finally:
        await conn.close()
    path = sliced["where"] / "consistency.json"
    path.write_bytes(orjson.dumps(doc))
    done = _cli("verify-consistency", str(path), *_keyargs(sliced["pems"]))
    assert done.returncode == 0, done.stdout + done.stderr
    bad = copy.deepcopy(doc)
    bad["first"], bad["second"] = doc["second"], doc["first"]
    assert not verify_consistency_doc(bad, keys)["ok"]
    if doc["proof"]:
        bad = copy.deepcopy(doc)
        bad["proof"][0] = bytes(32).hex()
        assert not verify_consistency_doc(bad, keys)["ok"]
    # `closed` is signed as a boolean: another value the signature happens to cover
    # (null, {}, "" are all false) is not shown as verified
    for odd in (None, {}, ""):
        bad = copy.deepcopy(doc)
        bad["first"]["closed"] = odd
        assert not verify_consistency_doc(bad, keys)["ok"], odd


async def test_history_rewritten_and_resigned_with_the_key_is_inconsistent(sliced):
    """Even whoever holds the signing key cannot rewrite a sealed row: a new tree over the
    altered rows, signed and stored, is not consistent with a root an auditor kept."""
    keys = load_public_keys(sliced["pems"])
    key = serialization.load_pem_private_key(sliced["private_key"].read_bytes(), None)
    conn = await asyncpg.connect(sliced["dsn"])
    tx = conn.transaction(isolation="repeatable_read")
    await tx.start()
    try:
        old = await conn.fetchrow("select * from audit_checkpoints where version = 2 and"
                                  " tree_size >= 2 order by id limit 1")
        chain = old["chain_id"]
        await conn.execute("alter table audit_log disable trigger audit_log_append_only")
        await conn.execute("alter table audit_merkle_runs disable trigger "
                           "audit_merkle_runs_append_only")
        rows = [dict(r) for r in await conn.fetch(
            "select * from audit_log where chain_id = $1 order by seq", chain)]
        rows[0]["status"] = 404                               # the past, rewritten
        prev, tree, runs = GENESIS, Frontier(), Runs()
        for r in rows:                                        # chain and tree recomputed
            r["prev_hash"], r["row_hash"] = prev, link(prev, canonical([r[f] for f in HASHED]))
            prev = r["row_hash"]
            runs.add(tree.append(record_leaf(r)))
        await conn.execute("delete from audit_merkle_runs where chain_id = $1", chain)
        await conn.execute(query("audit_merkle_runs_add"), chain, *runs.columns())
        at = datetime.now(UTC)
        sig = key.sign(signed_bytes(chain, tree.size, prev, at, True, tree.root()))
        new_id = await conn.fetchval(
            "insert into audit_checkpoints (chain_id, seq, row_hash, at, closed, key_id,"
            " signature, version, tree_size, root) values ($1, $2, $3, $4, true, $5, $6, 2, $2, $7)"
            " returning id", chain, tree.size, prev, at, old["key_id"], sig, tree.root())
        doc = await consistency_doc(conn, old["id"], new_id)
    finally:
        await tx.rollback()
        await conn.close()
    assert verify_consistency_doc(doc, keys)["problem"].endswith("sealed rows were changed or "
                                                                 "removed")


# --- a slice never holds another tenant's row ------------------------------------------------
EUOS = ("euo-acme", "euo-globex", "euo-initech", "euo-umbrella")
USERS = ("u-alice", "u-bob", "u-dirk", "u-farid", "u-hugo")
ACTORS = st.sampled_from([("provider_staff", "staff-sam", None, None),
                          ("partner", "pat@northwind", "p-northwind", None),
                          ("partner", "ops@bluesky", "p-bluesky", None),
                          ("euo_admin", "admin@acme", None, "euo-acme"),
                          ("euo_admin", "admin@globex", None, "euo-globex"),
                          ("user", "u-alice", None, "euo-acme"),
                          ("user", "u-farid", None, "euo-initech")])
ROWS = st.lists(st.tuples(ACTORS, st.sampled_from(EUOS),
                          st.lists(st.sampled_from(USERS), max_size=3, unique=True)),
                min_size=1, max_size=25)
VIEWERS = st.sampled_from([("partner", "p-northwind", None, "x@northwind"),
                           ("partner", "p-bluesky", None, "x@bluesky"),
                           *[("euo_admin", None, e, f"admin@{e}") for e in EUOS],
                           *[("user", None, "euo-acme", u) for u in ("u-alice", "u-bob")],
                           ("user", None, "euo-initech", "u-farid")])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=ROWS, viewer=VIEWERS)
def test_a_slice_never_holds_another_tenants_row(sliced, rows, viewer):
    asyncio.run(_scoped(sliced["dsn"], rows, viewer))


async def _scoped(dsn, rows, viewer):
    role, partner, euo, sub = viewer
    principal = _principal(sub=sub, role=role, partner=partner, euo=euo)
    chain = uuid.uuid4()
    conn = await asyncpg.connect(dsn)
    tx = conn.transaction(isolation="repeatable_read")
    await tx.start()
    try:
        start = datetime.now(UTC) + timedelta(days=1)   # after everything else: the first page
        records, prev = [], GENESIS
        for i, ((a_role, a_sub, a_partner, a_euo), s_euo, s_users) in enumerate(rows):
            v = {f: None for f in HASHED}
            v.update(at=start + timedelta(seconds=i), chain_id=chain, seq=i + 1,
                     request_id=f"r{i}", actor_sub=a_sub, actor_role=a_role,
                     actor_partner=a_partner, actor_euo=a_euo, method="GET", path="/x",
                     data_sets=[], fields_removed=[], subject_euo=s_euo, subject_users=s_users,
                     decision="allow", status=200, bytes=0, duration_ms=1.0)
            h = link(prev, canonical([v[f] for f in HASHED]))
            records.append((*[v[f] for f in HASHED], prev, h))
            prev = h
        await conn.copy_records_to_table("audit_log", records=records,
                                         columns=(*HASHED, "prev_hash", "row_hash"))
        key = Ed25519PrivateKey.generate()
        doc = await build_slice(conn, principal, MultiDict({"from": start.isoformat(),
                                                            "limit": "1000"}),
                                CATALOG.data_subject_roles, key)
    finally:
        await tx.rollback()
        await conn.close()
    # rows written without a salt (as before 032) verify in a slice of format 2
    assert verify_slice(doc, {key_id(key.public_key()): key.public_key()})["ok"]
    expected = 0
    for (a_role, a_sub, a_partner, a_euo), s_euo, s_users in rows:
        if role == "partner":
            mine = a_partner == partner or s_euo in CONTRACTED[partner]
        elif role == "euo_admin":
            mine = s_euo == euo
        else:
            mine = (s_euo == euo and sub in s_users
                    and not (a_role == "user" and a_sub == sub and a_euo == euo))
        expected += mine
    got = doc["rows"]
    assert len(got) == expected
    for e in got:
        r = e["row"]
        assert r["chain_id"] == str(chain)
        if role == "euo_admin":
            assert r["subject_euo"] == euo
        elif role == "user":
            assert r["subject_euo"] == euo and sub in r["subject_users"]
            assert all(r[f] is None for f in WITHHELD)
        else:
            assert r["actor_partner"] == partner or r["subject_euo"] in CONTRACTED[partner]
        if r["actor_sub"] is not None:      # named only when of the caller's own organisation
            assert (r["actor_partner"] == partner if role == "partner"
                    else r["actor_euo"] == euo and role != "user")
