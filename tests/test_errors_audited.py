"""Bad input is the caller's 4xx with a stable reason id, never a 5xx nor a database
error, and every such refusal is audited; CSV downloads cannot carry formulas."""

from __future__ import annotations

import base64
import csv
import io

import orjson
import pytest

from .conftest import audit_row, call


def _cursor(value) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    _cursor(["2026-01-01T00:00:00+00:00", 1, 1]),
    _cursor(["2026-01-01T00:00:00+00:00", "5b0c1d9e-7d1b-4f7e-9d50-6a0c1fb1c0aa", "1"]),
    _cursor(["2026-01-01T00:00:00", "5b0c1d9e-7d1b-4f7e-9d50-6a0c1fb1c0aa", 1]),
    _cursor(["2026-01-01T00:00:00+00:00", "5b0c1d9e-7d1b-4f7e-9d50-6a0c1fb1c0aa", -1]),
    base64.urlsafe_b64encode(b'["2026-01-01T00:00:00+00:00", "5b0c1d9e-7d1b-4f7e-9d50-6a0c1fb1c0aa",'
                             b" 99999999999999999999999]").decode(),
    _cursor({"a": 1}), "!!!", _cursor([None, None, None]),
])
async def test_a_forged_cursor_is_a_400_and_audited(gateway, http, token_for, db, cursor):
    status, headers, body = await call(http, "GET", gateway + "/v1/audit", token_for("staff"),
                                       params={"cursor": cursor})
    assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_cursor"
    row = await audit_row(db, headers["X-Request-Id"])
    assert row["decision"] == "deny" and row["reason"] == "bad_cursor"


@pytest.mark.parametrize(("euo", "body", "code"), [
    ("euo-x1", {"partner_id": "p\x00nul"}, "invalid_contract"),
    ("euo-x1", {"partner_id": "p" * 500_000}, "invalid_contract"),
    ("euo-x1", {"partner_id": ["p-northwind"]}, "invalid_contract"),
    ("euo-x1", {"partner_id": "p-northwind", "contract_end": "2026-13-40"}, "invalid_contract"),
    ("euo%00x", {"partner_id": "p-northwind"}, "bad_identifier"),
    ("e" * 200, {"partner_id": "p-northwind"}, "bad_identifier"),
])
async def test_bad_admin_input_is_the_callers_mistake(gateway, http, token_for, db, euo, body, code):
    status, headers, answer = await call(http, "PUT", gateway + f"/v1/admin/euos/{euo}",
                                         token_for("staff"), json=body)
    assert status in (400, 413), answer
    if status == 400:
        assert orjson.loads(answer)["error"]["code"] == code
    row = await audit_row(db, headers["X-Request-Id"])
    assert row["decision"] == "deny" and row["status"] == status


async def test_a_request_body_over_the_limit_is_413(gateway, http, token_for):
    status, _, answer = await call(http, "POST", gateway + "/v1/me/requests", token_for("alice"),
                                   data=b'{"detail": "' + b"x" * (2 << 20) + b'"}',
                                   headers={"Content-Type": "application/json"})
    assert status == 413 and orjson.loads(answer)["error"]["code"] == "body_too_large"


async def test_an_export_failing_on_a_backend_item_is_audited_as_an_error(
        hostile_gateway, http, token_for, db):
    """A backend listing whose item lacks an id fails the export with 502, and the export
    itself has its row (decision error), not only its backend calls."""
    gw, backend = hostile_gateway

    def script(request):
        if request.path.endswith("/voicemails"):
            return {"voicemails": [{"caller": "+32", "received_at": "2026-01-01T00:00:00Z"}]}
        if request.path.endswith(("/personal-directory", "/directory")):
            return {"entries": []}
        if request.path == "/euos/euo-acme":
            return {"id": "euo-acme", "name": "Acme"}
        return {"id": "u-alice", "euo_id": "euo-acme", "first_name": "Alice"}
    backend.answer(script)
    status, headers, body = await call(http, "GET", gw + "/v1/me/export?format=json",
                                       token_for("alice"))
    assert status == 502 and orjson.loads(body)["error"]["code"] == "backend_unmappable"
    rows = await db.fetch("select route, decision, reason from audit_log where request_id = $1",
                          headers["X-Request-Id"])
    assert ("gateway:/v1/me/export", "error", "backend_unmappable") in {tuple(r) for r in rows}


async def test_csv_downloads_neutralise_formulas(gateway, http, token_for):
    """A path a client chose, starting with '=', reaches the staff CSV as text, not as a
    formula (OWASP's CSV-injection rule); NDJSON stays raw."""
    evil = "/v1/=HYPERLINK(1)"
    status, _, _ = await call(http, "GET", gateway + evil, token_for(role="provider_staff",
                                                                     sub="=cmd|calc"))
    assert status == 404
    headers = {"Accept": "text/csv"}
    status, _, body = await call(http, "GET", gateway + "/v1/audit", token_for("staff"),
                                 params={"actor": "=cmd|calc"}, headers=headers)
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert rows and all(r["actor_sub"] == "'=cmd|calc" for r in rows)
    status, _, body = await call(http, "GET", gateway + "/v1/audit", token_for("staff"),
                                 params={"actor": "=cmd|calc"},
                                 headers={"Accept": "application/x-ndjson"})
    assert orjson.loads(body.splitlines()[0])["actor_sub"] == "=cmd|calc"


@pytest.mark.parametrize(("path", "params", "code"), [
    ("/v1/audit", {"actor": "a\x00b"}, "bad_filter"),
    ("/v1/audit", {"dataset": "\x00"}, "bad_filter"),
    ("/v1/audit", {"from": "0001-01-01T00:00:00+01:00"}, "bad_filter"),
    ("/v1/audit", {"to": "9999-12-31T23:59:59-01:00"}, "bad_filter"),
    ("/v1/audit", {"cursor": _cursor(["0001-01-01T00:00:00+05:00",
                                      "5b0c1d9e-7d1b-4f7e-9d50-6a0c1fb1c0aa", 1])}, "bad_cursor"),
])
async def test_filters_the_database_cannot_take_are_the_callers_mistake(
        gateway, http, token_for, path, params, code):
    for accept in ("application/json", "text/csv", "application/x-ndjson"):
        status, _, body = await call(http, "GET", gateway + path, token_for("staff"),
                                     params=params, headers={"Accept": accept})
        assert status == 400 and orjson.loads(body)["error"]["code"] == code


async def test_the_access_log_refuses_a_time_outside_the_calendar(gateway, http, token_for):
    status, _, body = await call(http, "GET", gateway + "/v1/me/access-log", token_for("alice"),
                                 params={"from": "0001-01-01T00:00:00+01:00"})
    assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_filter"


async def test_an_empty_csv_download_still_has_its_header(gateway, http, token_for):
    status, _, body = await call(http, "GET", gateway + "/v1/audit", token_for("staff"),
                                 params={"actor": "nobody-at-all"}, headers={"Accept": "text/csv"})
    assert status == 200 and body.decode().splitlines() == [",".join(
        next(csv.reader([body.decode().splitlines()[0]])))]
    assert body.startswith(b"at,chain_id,seq,request_id")


@pytest.mark.parametrize("detail", ["abc\u202edcba", "c1\x85control"])
async def test_text_that_displays_other_than_it_reads_is_refused(gateway, http, token_for, detail):
    status, _, body = await call(http, "POST", gateway + "/v1/me/requests", token_for("alice"),
                                 json={"type": "erasure", "data_sets": ["user_address"],
                                       "detail": detail})
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_text"


@pytest.mark.parametrize("body", [
    {"first_name": {"$set": {"personal_directory": []}}},
    {"address": {"id": "u-alice", "euo_id": "euo-initech"}},
    {"first_name": "a\x00b"},
    {"first_name": [[["deep"]]]},
])
async def test_written_values_must_be_plain(gateway, http, token_for, backends, body):
    """A write sets text, numbers or flat lists: no operators or merges reach a backend."""
    before = len(backends["seen"].requests)
    status, _, answer = await call(http, "PATCH", gateway + "/telephony/euos/euo-acme/users/u-bob",
                                   token_for("partner"), json=body)
    assert status == 400 and orjson.loads(answer)["error"]["code"] == "bad_value"
    assert len(backends["seen"].requests) == before


@pytest.mark.parametrize(("caller", "method", "path", "body", "code"), [
    # a misspelt `user` would open a grant over the whole EUO instead of one user
    ("staff", "POST", "/v1/break-glass", {"euo": "euo-acme", "usr": "u-alice", "purpose": "p",
                                          "ticket": "INC-1", "minutes": 5}, "invalid_break_glass"),
    # a misspelt `contract_end` would make the contract open-ended: the partner keeps access
    ("staff", "PUT", "/v1/admin/euos/euo-typo", {"partner_id": "p-northwind",
                                                 "contract_ends": "2020-01-01"}, "invalid_contract"),
    ("alice", "POST", "/v1/me/requests", {"type": "erasure", "data_sets": ["voicemails"],
                                          "details": "x"}, "invalid_request"),
    ("admin", "PATCH", "/v1/requests/{id}", {"status": "rejected", "note": "x"}, "invalid_request"),
    # the resolution is the admins' (or the gateway's: what an erasure did not erase), never
    # the user's to rewrite as they withdraw
    ("alice", "PATCH", "/v1/me/requests/{id}", {"status": "withdrawn", "resolution": "all erased"},
     "invalid_request"),
])
async def test_a_body_field_an_endpoint_does_not_take_is_refused(gateway, http, token_for, db,
                                                                 caller, method, path, body, code):
    """A gateway API body holds only the fields its endpoint documents: one it does not take
    (a misspelling above all) is the caller's 400, never silently dropped, and nothing changes."""
    _, _, filed = await call(http, "POST", gateway + "/v1/me/requests", token_for("alice"),
                             json={"type": "rectification", "data_sets": ["user_mobile"]})
    request_id = orjson.loads(filed)["id"]
    grants = await db.fetchval("select count(*) from break_glass")
    status, headers, answer = await call(http, method, gateway + path.format(id=request_id),
                                         token_for(caller), json=body)
    assert status == 400 and orjson.loads(answer)["error"]["code"] == code, answer
    row = await audit_row(db, headers["X-Request-Id"])
    assert row["decision"] == "deny" and row["reason"] == code
    assert await db.fetchval("select count(*) from break_glass") == grants
    assert await db.fetchval("select count(*) from contracts where euo_id = 'euo-typo'") == 0
    _, _, now = await call(http, "GET", gateway + f"/v1/me/requests/{request_id}",
                           token_for("alice"))
    assert orjson.loads(now)["status"] == "open" and orjson.loads(now)["resolution"] is None
    await call(http, "PATCH", gateway + f"/v1/me/requests/{request_id}", token_for("alice"),
               json={"status": "withdrawn"})


@pytest.mark.parametrize(("caller", "method", "path", "body"), [
    # which `user` was meant? Read as the last, a grant over another user than one checked
    ("staff", "POST", "/v1/break-glass", b'{"euo": "euo-acme", "user": "u-alice", "purpose": "p",'
     b' "ticket": "INC-1", "minutes": 5, "user": "u-bob"}'),
    ("alice", "POST", "/v1/me/requests", b'{"type": "rectification", "type": "restriction",'
     b' "data_sets": ["user_mobile"]}'),
    ("staff", "PUT", "/v1/admin/euos/euo-typo", b'{"partner_id": "p-northwind",'
     b' "contract_end": "2020-01-01", "contract_end": null}'),
])
async def test_a_body_field_given_twice_is_refused(gateway, http, token_for, db, caller, method,
                                                   path, body):
    """A gateway API body gives each field once: a repeated one is the caller's 400 bad_json,
    audited, and nothing changes (it was read as its last, silently)."""
    grants = await db.fetchval("select count(*) from break_glass")
    requests = await db.fetchval("select count(*) from dsr_requests")
    status, headers, answer = await call(http, method, gateway + path, token_for(caller),
                                         data=body, headers={"Content-Type": "application/json"})
    assert status == 400 and orjson.loads(answer)["error"]["code"] == "bad_json", answer
    assert (await audit_row(db, headers["X-Request-Id"]))["reason"] == "bad_json"
    assert await db.fetchval("select count(*) from break_glass") == grants
    assert await db.fetchval("select count(*) from dsr_requests") == requests
    assert await db.fetchval("select count(*) from contracts where euo_id = 'euo-typo'") == 0


async def test_a_body_nested_as_deep_as_json_parsers_allow_is_a_400(gateway, http, token_for,
                                                                   db):
    """The check for repeated fields walks the body again, recursively: a body nested a
    thousand levels deep (which orjson still takes) is the caller's 400, not a 502."""
    body = b'{"type": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    status, headers, answer = await call(http, "POST", gateway + "/v1/me/requests",
                                         token_for("alice"), data=body,
                                         headers={"Content-Type": "application/json"})
    assert status == 400 and orjson.loads(answer)["error"]["code"] == "bad_json", answer
    assert (await audit_row(db, headers["X-Request-Id"]))["reason"] == "bad_json"


@pytest.mark.parametrize(("caller", "path"), [
    # an auditor's typo (`user` for `subject_user`) would list every row as if filtered
    ("staff", "/v1/audit?user=u-alice"),
    ("staff", "/v1/audit?subject_user=u-alice&subject_user=u-bob"),
    ("staff", "/v1/audit?decision=deny&decision=allow"),
    ("staff", "/v1/audit/per-day?dataset=voicemails&dataset=faxes_incoming"),
    ("staff", "/v1/audit/per-day?datasets=voicemails"),
    ("admin", "/v1/audit/slice?actor=a&actor=b"),
    # a user's access log and slice take a window only: another filter would be ignored
    ("alice", "/v1/me/access-log?dataset=voicemails"),
    ("alice", "/v1/audit/slice?dataset=voicemails"),
    ("alice", "/v1/me/access-log?limit=5&limit=500"),
    ("staff", "/v1/audit/checkpoints?limit=1&limit=1000"),
    ("staff", "/v1/audit/checkpoints?before=5"),
    ("staff", "/v1/audit/consistency?first=1&second=2&second=3"),
    ("staff", "/v1/requests?status=open&status=failed"),
    ("staff", "/v1/requests?state=open"),
    ("staff", "/v1/break-glass?euo=euo-acme&euo=euo-globex"),
    ("staff", "/v1/break-glass?user=u-alice"),
    ("staff", "/v1/admin/retention?from=2026-01-01T00:00Z&from=2025-01-01T00:00Z"),
])
async def test_a_repeated_or_unknown_filter_is_refused(gateway, http, token_for, db, caller, path):
    """A listing answers only the question its URL asks: a filter given twice (which one is
    meant cannot be known) or one the endpoint does not take (a misspelling) is 400
    bad_filter, audited, never silently answered for another filter or none."""
    status, headers, body = await call(http, "GET", gateway + path, token_for(caller))
    assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_filter", body
    row = await audit_row(db, headers["X-Request-Id"])
    assert row["decision"] == "deny" and row["reason"] == "bad_filter"
