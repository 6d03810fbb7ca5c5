"""What the web console stands on, without a browser: its files served with a strict policy,
and GET /v1/audit/per-day (the chart's counts) in each caller's scope."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from gateway.console import FILES

from .conftest import call

STATIC = Path(__file__).resolve().parent.parent / "gateway" / "console" / "static"


async def test_the_console_is_served_with_a_strict_policy(gateway, http):
    status, headers, page = await call(http, "GET", gateway + "/console/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'"
    assert csp["style-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["require-trusted-types-for"] == "'script'"
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "private, no-store"
    for name in FILES:
        status, headers, body = await call(http, "GET", f"{gateway}/console/{name}")
        assert status == 200 and body == (STATIC / name).read_bytes()
        assert headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    status, headers, _ = await call(http, "GET", gateway + "/console", allow_redirects=False)
    assert status == 308 and headers["Location"] == "/console/"
    for name in ("nope.js", "..%2Fapp.py", "%2e%2e", "static"):
        status, _, body = await call(http, "GET", f"{gateway}/console/{name}")
        assert status == 404 and orjson.loads(body)["error"]["code"] == "not_found"


def test_the_files_never_parse_text_as_html_nor_reach_another_origin():
    assert {p.name for p in STATIC.iterdir()} == set(FILES)
    page = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline script"
    assert not re.search(r"\sstyle=|<style", page), "inline style"
    assert not re.search(r"\son[a-z]+=", page), "inline event handler"
    script = (STATIC / "console.js").read_text()
    code = "\n".join(line.split("//")[0] for line in script.splitlines())
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "localStorage", "http://", "https://"):
        assert sink not in code, sink
    assert "http://www.w3.org/2000/svg" in script          # the one URL: a namespace name


def _when(offset_days: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(days=offset_days)).isoformat()


async def test_per_day_counts_each_role_over_the_rows_the_audit_lists(gateway, http, token_for):
    # callers of their own, so the counts are this test's only
    tag = uuid.uuid4().hex[:8]
    staff = token_for(role="provider_staff", sub=f"staff-{tag}")
    admin = token_for(role="euo_admin", sub=f"admin-{tag}", euo="euo-acme")
    for _ in range(3):
        assert (await call(http, "GET", gateway + "/telephony/euos/euo-acme", staff))[0] == 200
    assert (await call(http, "GET", gateway + "/telephony/euos/euo-acme/users/u-bob", admin))[0] == 200
    today = datetime.now(UTC).date().isoformat()

    status, _, body = await call(http, "GET", f"{gateway}/v1/audit/per-day?actor=staff-{tag}", staff)
    assert status == 200, body
    answer = orjson.loads(body)
    assert answer["days"] == [{"day": today, "role": "provider_staff", "accesses": 3}]
    assert datetime.fromisoformat(answer["to"]) - datetime.fromisoformat(answer["from"]) == timedelta(days=31)
    # the same rows GET /v1/audit lists
    status, _, body = await call(http, "GET", f"{gateway}/v1/audit?actor=staff-{tag}", staff)
    assert len([r for r in orjson.loads(body)["rows"] if r["route"] != "gateway:/v1/audit/per-day"]) == 3

    # the admin counts only its own organisation's actors by name, and only its EUO
    status, _, body = await call(http, "GET", f"{gateway}/v1/audit/per-day?actor=staff-{tag}", admin)
    assert status == 200 and orjson.loads(body)["days"] == []
    status, _, body = await call(http, "GET", f"{gateway}/v1/audit/per-day?actor=admin-{tag}", admin)
    assert orjson.loads(body)["days"] == [{"day": today, "role": "euo_admin", "accesses": 1}]
    status, _, body = await call(http, "GET", f"{gateway}/v1/audit/per-day",
                                 token_for(role="euo_admin", sub=f"other-{tag}", euo="euo-globex"),
                                 params={"from": _when(-1), "subject_user": "u-bob"})
    assert status == 200 and orjson.loads(body)["days"] == []
    # a time range that ends before today counts nothing of today
    status, _, body = await call(http, "GET", f"{gateway}/v1/audit/per-day", staff,
                                 params={"actor": f"staff-{tag}", "to": _when(-2)})
    assert status == 200 and orjson.loads(body)["days"] == []


async def test_per_day_refuses_what_it_cannot_answer(gateway, http, token_for):
    staff = token_for("staff")
    for params in ({"from": _when(-400)}, {"from": _when(0), "to": _when(-1)},
                   {"limit": "10"}, {"cursor": "x"}, {"decision": "maybe"}, {"from": "yesterday"},
                   # no 31 days before it for the default from: not an internal error
                   {"to": "0001-01-01T00:00:00Z"}, {"to": "0001-01-31T23:59:59Z"}):
        status, _, body = await call(http, "GET", gateway + "/v1/audit/per-day", staff, params=params)
        assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_filter", params
    status, _, body = await call(http, "GET", gateway + "/v1/audit/per-day", token_for("alice"))
    assert status == 403 and orjson.loads(body)["error"]["code"] == "role_not_permitted"
    status, _, _ = await call(http, "GET", gateway + "/v1/audit/per-day")
    assert status == 401
