"""Property: whatever shape a hostile backend gives its answer, what the data-set table
forbids never reaches the caller — the gateway answers 502, or an answer without it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import call

SECRET = "S3CRET-do-not-serve"

# values a backend might put anywhere: scalars, the secret, and structures holding it
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from(
    ["u-alice", "u-bob", "euo-acme", "euo-initech", "", "x"]))
HOSTILE = st.recursive(
    st.one_of(SCALARS, st.just(SECRET)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(
                                ["id", "user_id", "author_id", "euo_id", "text", "title", "name",
                                 "number", "private_notes", "personal_directory", "x"]),
                                inner, max_size=3)),
    max_leaves=6)
# the same, but never the secret bare: a field the caller may see can carry any scalar (a
# backend can always put text where text is due); a structure where a scalar is due cannot
STRUCTURES = st.one_of(st.lists(HOSTILE, min_size=1, max_size=3),
                       st.dictionaries(st.sampled_from(["id", "text", "x"]), HOSTILE, min_size=1,
                                       max_size=3))


@st.composite
def user_records(draw) -> dict:
    """Alice's record as a sloppy backend might send it, the secret hidden somewhere a
    partner may not look: her personal directory, undeclared fields, identifier fields."""
    record = {"id": draw(st.sampled_from(["u-alice", "u-alice", 42, None, {"id": SECRET}])),
              "euo_id": draw(st.sampled_from(["euo-acme", "euo-acme", ["euo-acme"], SECRET])),
              "first_name": "Alice", "email": "alice@acme.test",
              "personal_directory": draw(HOSTILE)}
    for _ in range(draw(st.integers(0, 2))):
        record[draw(st.sampled_from(["nickname", "extra", "private_notes", "thread"]))] = draw(HOSTILE)
    if draw(st.booleans()):
        record["personal_directory"] = [{"name": "Mum", "number": SECRET}]
    return record


@st.composite
def meetings(draw) -> dict:
    """A meeting organized by Alice, with Bob's private note carrying the secret (also in
    its undeclared fields, at any depth), and structures in the identifier fields."""
    bob_note = {"author_id": draw(st.sampled_from(["u-bob", "u-bob", 7, None])), "text": SECRET}
    for _ in range(draw(st.integers(0, 2))):
        bob_note[draw(st.sampled_from(["title", "thread", "x"]))] = draw(HOSTILE)
    meeting = {"id": "m-1", "organizer_id": draw(st.sampled_from(["u-alice", "u-alice", {"x": SECRET}])),
               "topic": "Budget", "private_notes": [bob_note],
               "participants": draw(st.lists(st.fixed_dictionaries(
                   {"user_id": st.sampled_from(["u-bob", None]), "name": st.just("Bob"),
                    "email": st.just("bob@acme.test")},
                   optional={"notes": HOSTILE}), max_size=2))}
    for _ in range(draw(st.integers(0, 2))):
        meeting[draw(st.sampled_from(["start", "end"]))] = draw(STRUCTURES)
    return meeting


PROPERTY = settings(max_examples=250, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.mark.slow
@PROPERTY
@given(record=user_records())
async def test_a_partner_never_receives_a_users_personal_directory(hostile_gateway, http,
                                                                    token_for, record):
    gw, backend = hostile_gateway
    backend.answer(lambda request: record)
    status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice",
                                 token_for("partner"))
    assert status in (200, 502), body
    assert SECRET.encode() not in body, (record, body)


@pytest.mark.slow
@PROPERTY
@given(meeting=meetings())
async def test_the_organizer_never_receives_another_authors_note(hostile_gateway, http,
                                                                 token_for, meeting):
    gw, backend = hostile_gateway
    backend.answer(lambda request: meeting)
    status, _, body = await call(http, "GET", gw + "/meeting/accounts/euo-acme/meetings/m-1",
                                 token_for("alice"))
    assert status in (200, 403, 502), body
    assert SECRET.encode() not in body, (meeting, body)
