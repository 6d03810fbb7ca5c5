"""Masking old call records fails closed: an age it cannot read counts as old, a number
that is not text is masked as text, anything else is refused."""

from __future__ import annotations

import orjson
import pytest

from .conftest import call

OLD = "2020-01-01T00:00:00+00:00"
PATH = "/telephony/euos/euo-acme/cdrs"


def _cdr(**fields) -> dict:
    base = {"id": "c1", "user_id": "u-alice", "caller": "+3224567890", "callee": "+3225551234",
            "start": OLD, "duration_s": 5, "direction": "out"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


@pytest.mark.parametrize(("record", "caller", "callee"), [
    (_cdr(), "+3224567XXX", "+3225551XXX"),
    (_cdr(caller=3224567890, callee=3225551234.0), "3224567XXX", "3225551XXX"),
    (_cdr(start=None), "+3224567XXX", "+3225551XXX"),
    (_cdr(start=...), "+3224567XXX", "+3225551XXX"),
    (_cdr(start="yesterday-ish"), "+3224567XXX", "+3225551XXX"),
    (_cdr(start=True), "+3224567XXX", "+3225551XXX"),
    (_cdr(caller=None), None, "+3225551XXX"),
])
async def test_old_or_undated_records_are_masked_whatever_their_types(
        hostile_gateway, http, token_for, record, caller, callee):
    gw, backend = hostile_gateway
    backend.answer(lambda request: {"cdrs": [record]})
    status, _, body = await call(http, "GET", gw + PATH, token_for("staff"))
    assert status == 200
    (got,) = orjson.loads(body)["cdrs"]
    assert got.get("caller") == caller and got["callee"] == callee
    assert b"4567890" not in body and b"5551234" not in body


@pytest.mark.parametrize("bad", [["+3224567890"], {"n": "+3224567890"}, True])
async def test_a_number_the_mask_cannot_rewrite_is_refused(hostile_gateway, http, token_for, bad):
    gw, backend = hostile_gateway
    backend.answer(lambda request: {"cdrs": [_cdr(caller=bad)]})
    status, _, body = await call(http, "GET", gw + PATH, token_for("staff"))
    assert status == 502 and orjson.loads(body)["error"]["code"] == "backend_unmappable"
    assert b"4567890" not in body


async def test_recent_records_are_not_masked(hostile_gateway, http, token_for):
    gw, backend = hostile_gateway
    backend.answer(lambda request: {"cdrs": [_cdr(start="2099-01-01T00:00:00Z")]})
    status, _, body = await call(http, "GET", gw + PATH, token_for("staff"))
    assert status == 200 and orjson.loads(body)["cdrs"][0]["caller"] == "+3224567890"
