"""Answers are bound to their subject: a backend answering about another EUO, user or
meeting is a 502 `backend_subject_mismatch`, audited, and nothing of it is passed on;
and whether the caller is the data subject is decided per object, at every depth."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from .conftest import audit_row, call

ALICE = {"id": "u-alice", "euo_id": "euo-acme", "first_name": "Alice", "last_name": "Martin",
         "email": "alice@acme.test", "language": "fr", "mobile": "+32470111201",
         "address": "Rue 1", "personal_directory": [{"name": "Mum", "number": "+3247000"}]}
BOB = dict(ALICE, id="u-bob", first_name="Bob", email="bob@acme.test")


def _cdr(user: str) -> dict:
    return {"id": f"c-{user}", "user_id": user, "caller": "+3224567890", "callee": "+3225551234",
            "start": "2099-01-01T00:00:00+00:00", "duration_s": 5, "direction": "out"}


@pytest.mark.parametrize(("caller", "path", "answer"), [
    # the caller reads their own record: the untouched-bytes path checks the subject too
    ("alice", "/telephony/euos/euo-acme/users/u-alice", BOB),
    ("alice", "/telephony/euos/euo-acme/users/u-alice", dict(ALICE, euo_id="euo-initech")),
    ("alice", "/telephony/euos/euo-acme/users/u-alice", {k: v for k, v in ALICE.items() if k != "id"}),
    ("staff", "/telephony/euos/euo-acme/users/u-alice", BOB),
    ("partner", "/telephony/euos/euo-acme/users", {"users": [ALICE, dict(BOB, euo_id="euo-initech")]}),
    ("staff", "/telephony/euos/euo-acme", {"id": "euo-initech", "name": "Initech",
                                           "postal_address": "x", "partner_id": "p-bluesky"}),
    ("staff", "/telephony/euos/euo-acme/cdrs?user=u-bob", {"cdrs": [_cdr("u-bob"), _cdr("u-alice")]}),
    ("alice", "/meeting/accounts/euo-acme/organizers/u-alice", {"id": "u-bob", "first_name": "B"}),
    ("alice", "/meeting/accounts/euo-acme/meetings/m-1", {"id": "m-2", "organizer_id": "u-alice",
                                                          "topic": "t"}),
    ("admin", "/meeting/accounts/euo-acme/connection-stats?user=u-bob",
     {"stats": [{"user_id": "u-alice", "at": "2099-01-01T00:00:00Z", "os": "x"}]}),
])
async def test_an_answer_about_someone_else_is_refused(hostile_gateway, http, token_for, db,
                                                       caller, path, answer):
    gw, backend = hostile_gateway
    backend.answer(lambda request: answer)
    status, headers, body = await call(http, "GET", gw + path, token_for(caller))
    assert status == 502 and orjson.loads(body)["error"]["code"] == "backend_subject_mismatch"
    assert b"Bob" not in body and b"Initech" not in body and b"Alice" not in body
    row = await audit_row(db, headers["X-Request-Id"])
    assert row["decision"] == "error" and row["reason"] == "backend_subject_mismatch"
    assert row["data_sets"] == []


async def test_a_numbered_subject_still_binds(hostile_gateway, http, token_for):
    """A backend may number its users: 42 in the answer is user 42 of the path."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: dict(ALICE, id=42))
    status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-acme/users/42",
                                 token_for(role="user", sub="42", euo="euo-acme"))
    assert status == 200 and orjson.loads(body)["id"] == 42


async def test_undeclared_fields_go_only_to_the_subject_of_their_own_object(
        hostile_gateway, http, token_for):
    """A `title` the backend added to another author's private note does not reach the
    organizer; the one in the organizer's own note does, and the meeting's own extra
    field reaches its organizer."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: {
        "id": "m-1", "organizer_id": "u-alice", "topic": "Budget", "room": "4.12",
        "private_notes": [{"author_id": "u-bob", "text": "bob's", "title": "BOB-SECRET"},
                          {"author_id": "u-alice", "text": "mine", "title": "own"}],
        "participants": [{"user_id": "u-bob", "name": "Bob", "email": "bob@acme.test"}]})
    status, _, body = await call(http, "GET", gw + "/meeting/accounts/euo-acme/meetings/m-1",
                                 token_for("alice"))
    assert status == 200
    meeting = orjson.loads(body)
    assert b"BOB-SECRET" not in body and b"bob's" not in body
    assert meeting["private_notes"] == [{"author_id": "u-alice", "text": "mine", "title": "own"}]
    assert meeting["room"] == "4.12"


async def test_an_undeclared_field_of_a_colleague_is_removed_in_lists(hostile_gateway, http,
                                                                      token_for):
    """In a CDR list read by an admin, a field nobody declared goes nowhere."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: {"cdrs": [dict(_cdr("u-bob"), recording_url="http://x/r")]})
    status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-acme/cdrs",
                                 token_for("admin"))
    assert status == 200 and b"recording_url" not in body


MEETING = {"id": "m-1", "organizer_id": "u-alice", "start": "2099-01-01T10:00:00Z",
           "end": "2099-01-01T11:00:00Z", "topic": "Budget",
           "private_notes": [{"author_id": "u-bob", "text": "bob's"}]}


@pytest.mark.parametrize(("caller", "path", "answer"), [
    # an identifier field is a scalar: a structure in it would reach anyone who sees the document
    ("bob", "/meeting/accounts/euo-acme/meetings/m-1",
     dict(MEETING, organizer_id={"id": "u-alice", "address_book": ["Mum +32470990000"]})),
    ("bob", "/meeting/accounts/euo-acme/meetings/m-1", dict(MEETING, start={"chat": ["x"]})),
    ("partner", "/telephony/euos/euo-acme", {"id": "euo-acme", "name": "Acme",
                                             "partner_id": {"mobile": "+32470111201"}}),
    ("admin", "/telephony/euos/euo-acme/cdrs", {"cdrs": [dict(_cdr("u-bob"), id=["+32470111201"])]}),
    # a subject field must name a subject: missing, a float, null or a structure is refused
    ("partner", "/telephony/euos/euo-acme/cdrs", {"cdrs": [dict(_cdr("u-bob"), user_id=42.0)]}),
    ("partner", "/telephony/euos/euo-acme/cdrs",
     {"cdrs": [{k: v for k, v in _cdr("u-bob").items() if k != "user_id"}]}),
    ("partner", "/telephony/euos/euo-acme/cdrs", {"cdrs": [dict(_cdr("u-bob"), user_id=None)]}),
    ("partner", "/telephony/euos/euo-acme/users", {"users": [dict(BOB, id=42.0)]}),
    ("alice", "/meeting/accounts/euo-acme/meetings/m-1",
     dict(MEETING, private_notes=[{"text": "whose?"}])),
    # a data set's value is flat: another person's object cannot hide inside it
    ("alice", "/meeting/accounts/euo-acme/organizers/u-alice",
     {"id": "u-alice", "meetings": [{"id": "m-1", "private_notes": [
         {"author_id": "u-bob", "text": "bob's private note about alice"}]}]}),
    ("bob", "/meeting/accounts/euo-acme/meetings/m-1",
     dict(MEETING, private_notes=[{"author_id": "u-bob", "text": "mine", "thread": [
         {"author_id": "u-alice", "text": "alice's"}]}])),
])
async def test_a_structure_where_the_route_table_has_none_is_refused(
        hostile_gateway, http, token_for, caller, path, answer):
    gw, backend = hostile_gateway
    backend.answer(lambda request: answer)
    status, _, body = await call(http, "GET", gw + path, token_for(caller))
    assert status == 502, body
    assert orjson.loads(body)["error"]["code"] in ("backend_unmappable", "backend_subject_mismatch")


async def test_duplicate_keys_cannot_show_the_client_another_subject(hostile_gateway, http,
                                                                     token_for):
    """The first `id` says u-bob, the last u-alice (what a parser keeps): the client receives
    what was checked, re-encoded, never the backend's bytes."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: web.Response(
        body=b'{"id": "u-bob", "euo_id": "euo-acme", "id": "u-alice", "first_name": "Bob"}',
        content_type="application/json"))
    status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice",
                                 token_for("alice"))
    assert status == 200 and b"u-bob" not in body and orjson.loads(body)["id"] == "u-alice"


async def test_a_row_names_only_the_people_whose_data_was_served(hostile_gateway, http,
                                                                 token_for, db):
    """Bob opens Alice's meeting and receives only his own note: the row names Bob, not
    Alice, so Alice's access log does not say a colleague read her notes."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: {
        "id": "m-1", "organizer_id": "u-alice", "topic": "Budget",
        "private_notes": [{"author_id": "u-bob", "text": "mine"},
                          {"author_id": "u-alice", "text": "alice's"}]})
    status, headers, body = await call(http, "GET", gw + "/meeting/accounts/euo-acme/meetings/m-1",
                                       token_for("bob"))
    assert status == 200 and b"alice's" not in body and b"Budget" not in body
    row = await db.fetchrow("select subject_users, data_sets from audit_log where request_id = $1",
                            headers["X-Request-Id"])
    assert row["subject_users"] == ["u-bob"] and row["data_sets"] == ["private_notes"]
    # the organizer reading it is about herself, and Bob, whose note she cannot see, is not named
    status, headers, _ = await call(http, "GET", gw + "/meeting/accounts/euo-acme/meetings/m-1",
                                    token_for("alice"))
    row = await db.fetchrow("select subject_users from audit_log where request_id = $1",
                            headers["X-Request-Id"])
    assert status == 200 and row["subject_users"] == ["u-alice"]
