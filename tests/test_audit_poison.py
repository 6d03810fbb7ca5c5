"""No request's data can sink another request's audit row: whatever text a backend puts in
a field name, or a client in a header, the rows of the requests batched with it commit, and
its own row holds the text escaped and bounded."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.grammar import MAX_NAME

from .conftest import audit_row, call

ALICE = "/telephony/euos/euo-acme/users/u-alice"
BOB = "/telephony/euos/euo-acme/users/u-bob"


def record(user: str, **extra) -> dict:
    return {"id": user, "euo_id": "euo-acme", "first_name": user, **extra}


async def _batched(hostile_gateway, http, token_for, name: str):
    """A partner asks for u-alice, whose answer carries a field called `name` (removed for
    a partner: undeclared); u-bob asks five times for his own record at the same time (so
    they share the audit writer's batches). The six answers, u-alice's first."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: record("u-alice", **{name: "x"}) if "u-alice" in request.path
                   else record("u-bob"))
    while True:
        # u-bob about himself: no mirror is asked (a loaded machine cannot make it stale)
        results = await asyncio.gather(call(http, "GET", gw + ALICE, token_for("partner")),
                                       *(call(http, "GET", gw + BOB, token_for("bob"))
                                         for _ in range(5)))
        if b"contracts_unavailable" not in results[0][2]:
            return results


async def test_a_field_name_the_database_cannot_hold_sinks_nothing(hostile_gateway, http,
                                                                   token_for, db):
    """A NUL in a field name (PostgreSQL's text cannot hold it) once failed the whole batch:
    every request batched with it got 503 and had no row. Now the name is removed from the
    answer as any undeclared field, and recorded escaped; a half-megabyte name is cut."""
    for name, stored in (("a\u0000b", "a\\u0000b"), ("n" * (512 << 10), "n" * (MAX_NAME - 1) + "…")):
        alice, *bobs = await _batched(hostile_gateway, http, token_for, name)
        assert [status for status, _, _ in bobs] == [200] * 5
        status, headers, body = alice
        assert status == 200, body
        assert name not in orjson.loads(body)
        row = await audit_row(db, headers["X-Request-Id"])
        assert stored in row["fields_removed"]


async def test_a_header_value_outside_ascii_is_dropped_not_a_502(hostile_gateway, http, token_for):
    """`User-Agent: €` once made the backend call fail with a traceback (502 internal_error):
    the value cannot be sent as an HTTP/1.1 header. A forwarded header whose value is not
    visible ASCII is left out; the request is served."""
    gw, backend = hostile_gateway
    backend.answer(lambda request: record("u-alice"))
    status, _, body = await call(http, "GET", gw + ALICE, token_for("alice"),
                                 headers={"User-Agent": "€uro", "Accept-Language": "fr\u00e9",
                                          "Accept": "application/json"})
    assert status == 200, body
    (_, _, seen), = backend.seen
    assert "User-Agent" not in seen and "Accept-Language" not in seen
    assert seen["Accept"] == "application/json"


PROPERTY = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.mark.slow
@PROPERTY
@given(name=st.text(min_size=1, max_size=400), agent=st.text(max_size=40))
async def test_no_field_name_or_header_fails_another_requests_row(hostile_gateway, http, token_for,
                                                                 db, name, agent):
    """Field names and header values from all of Unicode: the requests batched with them are
    always served and logged; the request itself is served (or 502 when its JSON cannot be
    read), never 503, and its row exists."""
    gw, backend = hostile_gateway
    if name in record("u-alice"):
        return
    try:
        agent.encode("latin-1")      # a client library sends only latin-1 header values
    except UnicodeEncodeError:
        agent = agent.encode("utf-8").decode("latin-1")
    # what a client library lets through (it refuses control characters itself)
    agent = "".join(c for c in agent if c >= " " and c != "\x7f")
    alice, *bobs = await _batched(hostile_gateway, http, token_for, name)
    assert [status for status, _, _ in bobs] == [200] * 5, (repr(name), bobs[0][2], alice[2])
    status, headers, _ = alice
    assert status in (200, 502)
    assert await audit_row(db, headers["X-Request-Id"]) is not None
    backend.answer(lambda request: record("u-alice"))
    status, headers, _ = await call(http, "GET", gw + ALICE, token_for("alice"),
                                    headers={"User-Agent": agent})
    assert status == 200
