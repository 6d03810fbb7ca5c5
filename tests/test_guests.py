"""Guests and dial-in callers: a subject field the route table declares `no_account:` may be
null, and the element is then the enclosing meeting's data; any other missing, null or
malformed subject is still a 502."""

from __future__ import annotations

import orjson
import pytest

from .conftest import audit_row, call

MEETING_PATH = "/meeting/accounts/euo-acme/meetings/m-1"
GUEST_CHAT = {"author_id": None, "author": "Guest 1", "text": "GUEST-SAYS-HI", "at": "2026-01-01"}
DIAL_IN = {"user_id": None, "name": "+32 2 555 01 99", "email": None}


def meeting(chat=(), participants=(), notes=()) -> dict:
    return {"id": "m-1", "organizer_id": "u-alice", "topic": "Budget",
            "chat": [{"author_id": "u-bob", "author": "Bob", "text": "bob here", "at": "x"},
                     *chat],
            "participants": [{"user_id": "u-bob", "name": "Bob", "email": "bob@acme.test"},
                             *participants],
            "private_notes": [{"author_id": "u-alice", "text": "mine"}, *notes]}


async def test_the_organizer_reads_a_meeting_a_guest_wrote_in(hostile_gateway, http, token_for):
    """`author_id: null` made the whole meeting 502 for its own organizer; it is the
    meeting's data now, and a dial-in participant is listed like any other."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: meeting([GUEST_CHAT], [DIAL_IN]))
    status, _, body = await call(http, "GET", gw + MEETING_PATH, token_for("alice"))
    assert status == 200, body
    doc = orjson.loads(body)
    assert GUEST_CHAT in doc["chat"] and DIAL_IN in doc["participants"]


async def test_a_participant_sees_neither_guests_nor_others(hostile_gateway, http, token_for):
    """Bob (not the organizer) sees his own message and participation, not the guest's."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: meeting([GUEST_CHAT], [DIAL_IN]))
    status, _, body = await call(http, "GET", gw + MEETING_PATH, token_for("bob"))
    assert status == 200, body
    doc = orjson.loads(body)
    assert b"GUEST-SAYS-HI" not in body and b"555 01 99" not in body
    assert [c["author_id"] for c in doc["chat"]] == ["u-bob"]
    assert [p["user_id"] for p in doc["participants"]] == ["u-bob"]


@pytest.mark.parametrize(("why", "answer"), [
    ("a chat message without author_id",
     meeting([{"author": "Guest 1", "text": "x", "at": "y"}])),
    ("a malformed author_id", meeting([dict(GUEST_CHAT, author_id="")])),
    ("an author_id that is a structure", meeting([dict(GUEST_CHAT, author_id={"id": None})])),
    ("an author_id false", meeting([dict(GUEST_CHAT, author_id=False)])),
    ("a participant without user_id", meeting(participants=[{"name": "X", "email": None}])),
    # private notes declare no guests: a note is always someone's
    ("a private note of nobody", meeting(notes=[{"author_id": None, "text": "whose?"}])),
    ("an organizer of nobody", dict(meeting(), organizer_id=None)),
])
async def test_subjects_missing_malformed_or_null_undeclared_are_502(hostile_gateway, http,
                                                                      token_for, why, answer):
    gw, backend = hostile_gateway
    backend.answer(lambda request: answer)
    status, _, body = await call(http, "GET", gw + MEETING_PATH, token_for("alice"))
    assert status == 502 and orjson.loads(body)["error"]["code"] == "backend_unmappable", why


async def test_a_guest_adds_and_removes_no_one_from_the_access_log(hostile_gateway, http,
                                                                   token_for, db):
    """The audit row (what the access logs read) names the same users with and without a
    guest's message and a dial-in participant: the organizer and Bob, never a null."""
    gw, backend = hostile_gateway
    subjects = []
    for answer in (meeting(), meeting([GUEST_CHAT], [DIAL_IN])):
        backend.answer(lambda request, answer=answer: answer)
        status, headers, body = await call(http, "GET", gw + MEETING_PATH, token_for("alice"))
        assert status == 200, body
        subjects.append((await audit_row(db, headers["X-Request-Id"]))["subject_users"])
    assert subjects[0] == subjects[1] == ["u-alice", "u-bob"]


async def test_only_guests_served_still_name_the_organizer(hostile_gateway, http, token_for, db):
    """A meeting of which the organizer is served only a guest's message (and identifiers)
    is still the organizer's data in their access log."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: {"id": "m-1", "organizer_id": "u-alice",
                                    "chat": [GUEST_CHAT]})
    status, headers, body = await call(http, "GET", gw + MEETING_PATH, token_for("alice"))
    assert status == 200 and orjson.loads(body)["chat"] == [GUEST_CHAT]
    row = await audit_row(db, headers["X-Request-Id"])
    assert row["subject_users"] == ["u-alice"] and row["data_sets"] == ["chat_messages"]


async def test_the_demo_meeting_has_guests_its_organizer_reads(gateway, http, token_for):
    status, _, body = await call(http, "GET",
                                 gateway + "/meeting/accounts/euo-acme/meetings/mtg-acme-1",
                                 token_for("alice"))
    assert status == 200, body
    doc = orjson.loads(body)
    assert any(c["author_id"] is None for c in doc["chat"])
    assert sum(p["user_id"] is None for p in doc["participants"]) == 2


async def test_an_undeclared_field_of_a_guests_element_reaches_no_one(hostile_gateway, http,
                                                                      token_for):
    """A guest is no data subject of ours: what the route table does not declare in their
    element (a colleague's secret, say, that a backend put there) is removed, for the
    organizer too; the message itself still reaches the organizer."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: meeting(
        [dict(GUEST_CHAT, thread="GUEST-EXTRA")],
        [dict(DIAL_IN, notes="DIAL-IN-EXTRA")]))
    status, _, body = await call(http, "GET", gw + MEETING_PATH, token_for("alice"))
    assert status == 200, body
    assert b"GUEST-EXTRA" not in body and b"DIAL-IN-EXTRA" not in body
    assert GUEST_CHAT in orjson.loads(body)["chat"]
