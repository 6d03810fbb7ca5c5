"""The visibility matrix: every role against every backend route (docs/contract.md).

The expectations are written by hand from the floors (docs/contract.md) and the default
policy's stated choices, not derived from the policy files under test.
"""

from __future__ import annotations

import orjson
import pytest

from .conftest import CALLERS, call

T = "/telephony/euos/euo-acme"
M = "/meeting/accounts/euo-acme"
ALICE = f"{T}/users/u-alice"
ORGANIZER = f"{M}/organizers/u-alice"
MEETING = f"{M}/meetings/mtg-acme-1"           # organised by u-alice; u-bob is a participant

USER_ALL = {"id", "euo_id", "first_name", "last_name", "email", "language", "mobile",
            "address", "personal_directory"}
USER_NO_PERSONAL = USER_ALL - {"personal_directory"}
ORG_ALL = {"id", "first_name", "last_name", "email", "language", "address_book", "documents",
           "meetings"}
ORG_PROFILE = {"id", "first_name", "last_name", "email", "language"}
MEETING_ALL = {"id", "organizer_id", "start", "end", "topic", "agenda", "invited", "documents",
               "whiteboards", "chat", "minutes", "private_notes", "participants"}
MEETING_IDS = {"id", "organizer_id", "start", "end"}

DENY = 403


def keys(expected: set[str]):
    def check(doc, sub):
        assert set(doc) == expected
    check.__name__ = f"keys{sorted(expected)}"
    return check


def element_keys(field: str, expected: set[str], only_own: bool = False):
    def check(doc, sub):
        items = doc[field]
        assert items, f"{field} should not be empty"
        for item in items:
            assert set(item) == expected
        if only_own:
            assert {i["id"] for i in items} == {sub}
    return check


def owned_by(field: str, owner_field: str, everyone: bool):
    """Every element belongs to the caller, or (everyone) elements of several users remain."""
    def check(doc, sub):
        owners = {i[owner_field] for i in doc[field]}
        if everyone:
            assert len(owners) > 1
        else:
            assert owners == {sub}
    return check


def binary(kind: str):
    def check(body: bytes, sub):
        assert body.startswith(b"RIFF" if kind == "wav" else b"%PDF")
    return check


def meeting_view(organizer: bool):
    def check(doc, sub):
        assert set(doc) == (MEETING_ALL if organizer
                            else MEETING_IDS | {"private_notes", "chat", "participants"})
        assert {n["author_id"] for n in doc["private_notes"]} == {sub}
        authors = {c["author_id"] for c in doc["chat"]}
        assert authors > {sub} if organizer else authors == {sub}   # a participant: their own
        # the organizer also sees what guests without an account wrote and who dialled in
        assert (None in authors) == organizer
        people = [p["user_id"] for p in doc["participants"]]
        assert (people.count(None) == 2 and sub in people) if organizer else people == [sub]
    return check


def paged(field: str):
    """A paged list, whole: the list and a null next_cursor."""
    return keys({field, "next_cursor"})


EUO_FIELDS = keys({"id", "name", "postal_address", "partner_id", "trunks"})
ACCOUNT = keys({"id", "account_name", "company_name"})
ALL_CDRS = owned_by("cdrs", "user_id", everyone=True)
OWN_CDRS = owned_by("cdrs", "user_id", everyone=False)
ALL_STATS = owned_by("stats", "user_id", everyone=True)
OWN_STATS = owned_by("stats", "user_id", everyone=False)

#     path                                          staff      partner    admin      alice (self)  bob (colleague)
MATRIX = [
    (T,                                             EUO_FIELDS, EUO_FIELDS, EUO_FIELDS, EUO_FIELDS, EUO_FIELDS),
    (f"{T}/directory",                              *[keys({"entries"})] * 5),
    (f"{T}/users", element_keys("users", USER_NO_PERSONAL), element_keys("users", USER_NO_PERSONAL),
     element_keys("users", USER_NO_PERSONAL), element_keys("users", USER_ALL, only_own=True),
     element_keys("users", USER_ALL, only_own=True)),
    (ALICE,                                         keys(USER_NO_PERSONAL), keys(USER_NO_PERSONAL),
     keys(USER_NO_PERSONAL), keys(USER_ALL), DENY),
    (f"{ALICE}/personal-directory",                 DENY, DENY, DENY, keys({"entries"}), DENY),
    (f"{ALICE}/voicemails",                         DENY, DENY, DENY, paged("voicemails"), DENY),
    (f"{ALICE}/voicemails/vm-u-alice-1",            DENY, DENY, DENY, binary("wav"), DENY),
    (f"{ALICE}/faxes",                              DENY, DENY, DENY, paged("faxes"), DENY),
    (f"{ALICE}/faxes/fax-u-alice-in",               DENY, DENY, DENY, binary("pdf"), DENY),
    (f"{ALICE}/recordings",                         DENY, paged("recordings"), paged("recordings"),
     paged("recordings"), DENY),
    (f"{ALICE}/recordings/rec-u-alice-1",           DENY, binary("wav"), binary("wav"), binary("wav"), DENY),
    (f"{T}/cdrs",                                   ALL_CDRS, ALL_CDRS, ALL_CDRS, OWN_CDRS, OWN_CDRS),
    (f"{T}/trunks/trunk-1/cdrs",                    ALL_CDRS, ALL_CDRS, ALL_CDRS, OWN_CDRS, OWN_CDRS),
    (M,                                             ACCOUNT, ACCOUNT, ACCOUNT, ACCOUNT, ACCOUNT),
    (ORGANIZER,                                     keys(ORG_PROFILE), keys(ORG_PROFILE), keys(ORG_PROFILE),
     keys(ORG_ALL), DENY),
    (f"{ORGANIZER}/documents/doc-u-alice-1",        DENY, DENY, DENY, binary("pdf"), DENY),
    (MEETING,                                       DENY, DENY, DENY, meeting_view(True), meeting_view(False)),
    (f"{M}/participants/u-alice",                   DENY, DENY, DENY, keys({"id", "meetings"}), DENY),
    (f"{M}/connection-stats",                       ALL_STATS, ALL_STATS, ALL_STATS, OWN_STATS, OWN_STATS),
]
CALLER_ORDER = ("staff", "partner", "admin", "alice", "bob")
CASES = [
    pytest.param(path, caller, expected, id=f"{caller}:{path}")
    for path, *row in MATRIX
    for caller, expected in zip(CALLER_ORDER, row, strict=True)
]


def test_matrix_covers_every_get_route():
    """The matrix names a path for every GET route of the route table."""
    from gateway.policy.catalog_files import load_catalog
    from gateway.settings import DEFAULT_POLICY_DIR

    catalog = load_catalog(DEFAULT_POLICY_DIR)
    covered = set()
    for path, *_ in MATRIX:
        service, *segments = path.strip("/").split("/")
        covered.add(catalog.match(service, segments)[0].name)
    assert covered == {r.name for r in catalog.routes if "GET" in r.methods}


@pytest.mark.parametrize(("path", "caller", "expected"), CASES)
async def test_visibility(gateway, http, token_for, path, caller, expected):
    """Each caller sees exactly what the floors and the default policy allow."""
    status, headers, body = await call(http, "GET", gateway + path, token_for(caller))
    if expected == DENY:
        assert status == 403, body
        error = orjson.loads(body)["error"]
        assert error["code"] and error["request_id"] == headers["X-Request-Id"]
        return
    assert status == 200, body
    sub = CALLERS[caller]["sub"]
    if headers["Content-Type"].startswith("application/json"):
        expected(orjson.loads(body), sub)
    else:
        expected(body, sub)


STAFF_NEVER = {"personal_directory", "address_book", "documents", "meetings", "topic", "agenda",
               "invited", "whiteboards", "chat", "minutes", "private_notes", "participants",
               "voicemails", "faxes", "recordings"}


@pytest.mark.parametrize("path", [p for p, *_ in MATRIX])
async def test_provider_staff_never_receive_a_hidden_field(gateway, http, token_for, path):
    """Whatever the route, no (**) field reaches provider staff, at any depth."""
    status, _, body = await call(http, "GET", gateway + path, token_for("staff"))
    if status == 200 and body[:1] == b"{":
        def walk(value):
            if isinstance(value, dict):
                assert not STAFF_NEVER & set(value), value
                for v in value.values():
                    walk(v)
            elif isinstance(value, list):
                for v in value:
                    walk(v)
        walk(orjson.loads(body))
    else:
        assert status == 403


async def test_old_call_records_are_masked(gateway, http, token_for, demo):
    """CDRs older than the catalog's threshold have their last three digits replaced."""
    _, _, body = await call(http, "GET", f"{gateway}{T}/cdrs", token_for("admin"))
    cdrs = {c["id"]: c for c in orjson.loads(body)["cdrs"]}
    original = {c["id"]: c for c in demo.cdrs["euo-acme"]}
    old = [i for i in cdrs if i.endswith(("-2", "-3"))]          # 200 and 400 days old
    recent = [i for i in cdrs if i.endswith(("-0", "-1"))]
    assert old and recent
    for i in old:
        assert cdrs[i]["caller"] == original[i]["caller"][:-3] + "XXX"
        assert cdrs[i]["callee"].endswith("XXX")
    for i in recent:
        assert cdrs[i]["caller"] == original[i]["caller"]


async def test_faxes_are_filtered_by_direction_for_the_data_subject_only(gateway, http, token_for):
    """The user sees their incoming faxes; an outgoing one is past retention once sent
    (`faxes_outgoing`: deleted immediately after sending), for the data subject too."""
    _, _, body = await call(http, "GET", f"{gateway}{ALICE}/faxes", token_for("alice"))
    assert {f["direction"] for f in orjson.loads(body)["faxes"]} == {"in"}


async def test_own_record_is_passed_through_byte_for_byte(gateway, http, token_for, backends):
    """When nothing must be removed, the backend's bytes reach the caller untouched."""
    _, _, direct = await call(http, "GET", backends["urls"]["telephony"] + ALICE[len("/telephony"):])
    status, _, body = await call(http, "GET", gateway + ALICE, token_for("alice"))
    assert status == 200 and body == direct
