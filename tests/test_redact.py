"""Redaction as a pure function: no server, just a plan and a document."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from gateway.policy.authz import load_policy
from gateway.policy.catalog_files import load_catalog
from gateway.redact import make_plan, mask_number, redact

from .conftest import POLICY_DIR

NOW = datetime(2026, 11, 22, tzinfo=UTC)


@pytest.fixture(scope="module")
def policy():
    return load_policy(POLICY_DIR, load_catalog(POLICY_DIR))


def run(policy, service, path, role, relations, doc, sub="someone"):
    route, _ = policy.catalog.match(service, path.strip("/").split("/"))
    plan = make_plan(route, role, frozenset(relations), policy.catalog, policy.granted)
    return plan, *redact(doc, plan, sub, policy.catalog, policy.granted, NOW)


@pytest.mark.parametrize(("number", "masked"), [
    ("+32470111201", "+32470111XXX"), ("+32 2 555 01 23", "+32 2 555 0X XX"), ("12", "XX"),
])
def test_mask_number_replaces_the_last_three_digits(number, masked):
    assert mask_number(number) == masked


def test_undeclared_fields_reach_only_the_data_subject(policy):
    doc = {"id": "u1", "euo_id": "e", "first_name": "A", "shoe_size": 44}
    _, out, outcome = run(policy, "telephony", "euos/e/users/u1", "euo_admin", {"same_euo"}, doc)
    assert out == {"id": "u1", "euo_id": "e", "first_name": "A"}
    assert outcome.removed == {"shoe_size"}
    plan, out, _ = run(policy, "telephony", "euos/e/users/u1", "user", {"same_euo", "self"}, doc,
                       sub="u1")
    assert out == doc and plan.passthrough


def test_unmapped_answer_shapes_are_errors(policy):
    from gateway.redact import Unmappable
    with pytest.raises(Unmappable):
        run(policy, "telephony", "euos/e/users", "provider_staff", {"any"}, {"users": "nope"})


def test_faxes_of_an_unknown_direction_are_dropped_for_non_subjects(policy):
    doc = {"faxes": [{"id": "f1", "direction": "sideways"}, {"id": "f2", "direction": "in"}]}
    _, out, _ = run(policy, "telephony", "euos/e/users/u1/faxes", "euo_admin", {"same_euo"}, doc)
    assert out == {}   # nothing of the list may be seen: the field goes


def test_a_non_organizer_sees_only_their_own_note(policy):
    doc = {"id": "m", "organizer_id": "u1", "topic": "T", "participants": [{"user_id": "u3", "name": "X"}],
           "private_notes": [{"author_id": "u1", "text": "a"}, {"author_id": "u2", "text": "b"}]}
    _, out, outcome = run(policy, "meeting", "accounts/e/meetings/m", "user", {"same_euo"}, doc,
                          sub="u2")
    assert out == {"id": "m", "organizer_id": "u1", "participants": [],
                   "private_notes": [{"author_id": "u2", "text": "b"}]}
    assert outcome.served == {"private_notes"}


def test_old_cdrs_are_masked_for_everyone_recent_ones_are_not(policy):
    doc = {"cdrs": [
        {"id": "1", "user_id": "u1", "caller": "+3222222222", "callee": "+3233333333",
         "start": "2026-01-01T00:00:00+00:00"},
        {"id": "2", "user_id": "u1", "caller": "+3222222222", "callee": "+3233333333",
         "start": "2026-11-20T00:00:00Z"},
    ]}
    _, out, _ = run(policy, "telephony", "euos/e/cdrs", "user", {"same_euo"}, doc, sub="u1")
    assert [c["caller"] for c in out["cdrs"]] == ["+3222222XXX", "+3222222222"]


def test_a_cdr_whose_age_cannot_be_read_is_masked(policy):
    """Fail closed: no date, no proof the record is recent."""
    doc = {"cdrs": [{"id": "1", "user_id": "u1", "caller": "+3222222222", "start": "last tuesday"},
                    {"id": "2", "user_id": "u1", "caller": "+3222222222", "start": 1795300000}]}
    _, out, _ = run(policy, "telephony", "euos/e/cdrs", "provider_staff", {"any"}, doc)
    assert [c["caller"] for c in out["cdrs"]] == ["+3222222XXX", "+3222222222"]


def test_numeric_user_ids_still_name_the_caller(policy):
    doc = {"cdrs": [{"id": 1, "user_id": 7, "caller": "+32", "start": "2026-11-21T00:00:00Z"},
                    {"id": 2, "user_id": 8, "caller": "+32", "start": "2026-11-21T00:00:00Z"}]}
    _, out, _ = run(policy, "telephony", "euos/e/cdrs", "user", {"same_euo"}, doc, sub="7")
    assert [c["id"] for c in out["cdrs"]] == [1]


# --- the shape check's nesting bound, against its definition ----------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gateway.policy.catalog import Leaf, ObjectOf  # noqa: E402
from gateway.redact import Unmappable, check_shape  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=3),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=2), inner, max_size=3),
                    max_leaves=12)


def nesting(value) -> int:
    """Levels of lists and objects: 0 for a scalar, 1 for [1, 2], 2 for [{"a": 1}]."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


def refused(document, node) -> bool:
    try:
        check_shape(document, node, {}, re.compile(".+"))
    except Unmappable:
        return True
    return False


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_a_data_sets_value_nests_at_most_two_levels_and_an_undeclared_field_one(value):
    """A declared field's value may nest two levels of lists/objects, an undeclared one's
    one; nothing deeper passes (so no object with a subject of its own hides inside)."""
    assert refused({"entries": value}, ObjectOf({"entries": Leaf("personal_directory")})) == (
        nesting(value) > 2)
    assert refused({"other": value}, ObjectOf({})) == (nesting(value) > 1)


@settings(max_examples=300, deadline=None)
@given(JSON, JSON)
def test_the_walk_checks_what_it_serves_and_serves_nothing_it_withholds(policy, directory, other):
    """A user's own record: their personal directory and an undeclared field are served,
    so an answer nesting them deeper than allowed is refused. Provider staff get neither:
    whatever those values hold, the walk answers without them (and without refusing)."""
    doc = {"id": "u1", "euo_id": "e", "first_name": "A", "personal_directory": directory,
           "shoe_size": other}
    plan = make_plan(policy.catalog.match("telephony", ["euos", "e", "users", "u1"])[0], "user",
                     frozenset({"same_euo", "self"}), policy.catalog, policy.granted)
    # the walk itself (a plan that may remove nothing skips it in the proxy, whose
    # check_shape the test above covers)
    try:
        out, _ = redact(doc, plan, "u1", policy.catalog, policy.granted, NOW)
    except Unmappable:
        assert nesting(directory) > 2 or nesting(other) > 1
    else:
        assert nesting(directory) <= 2 and nesting(other) <= 1 and out == doc
    _, out, outcome = run(policy, "telephony", "euos/e/users/u1", "provider_staff", {"any"}, doc)
    assert "personal_directory" not in out and "shoe_size" not in out
    assert {"personal_directory", "shoe_size"} <= outcome.removed


def test_a_guests_message_is_held_to_the_meetings_restrictions(policy):
    """A guest's element is the organizer's meeting data: what the organizer restricted is
    withheld from it, while a colleague's own message is decided by that colleague's."""
    route, _ = policy.catalog.match("meeting", ["accounts", "e", "meetings", "m"])
    plan = make_plan(route, "user", frozenset({"same_euo"}), policy.catalog, policy.granted)
    doc = {"id": "m", "organizer_id": "u1", "chat": [
        {"author_id": None, "author": "Guest 1", "text": "guest"},
        {"author_id": "u2", "author": "Bob", "text": "bob"}]}
    restricted = {"u1": frozenset({"chat_messages"})}
    out, outcome = redact(doc, plan, "u1", policy.catalog, policy.granted, NOW,
                          blocked=lambda user: restricted.get(user, frozenset()))
    assert out["chat"] == [{"author_id": "u2", "author": "Bob", "text": "bob"}]
    assert outcome.withheld["restriction"] == {"chat_messages": 3}
    assert outcome.subjects == {"u2"}


@pytest.mark.parametrize(("next_cursor", "fits"), [
    (None, True), ("eyJrIjoxfQ", True), (12, True), ("a/b", False), ({"k": 1}, False),
    (False, False), ("", False)])
def test_the_shape_check_holds_a_next_cursor_to_its_grammar(policy, next_cursor, fits):
    """Also when nothing is removed: the cursor is checked, not merely passed."""
    from gateway.redact import Unmappable, check_shape
    route, _ = policy.catalog.match("telephony", ["euos", "e", "cdrs"])
    doc = {"cdrs": [], "next_cursor": next_cursor}
    if fits:
        check_shape(doc, route.body, {}, policy.catalog.identifier)
        assert doc["next_cursor"] == (None if next_cursor is None else str(next_cursor))
    else:
        with pytest.raises(Unmappable):
            check_shape(doc, route.body, {}, policy.catalog.identifier)
