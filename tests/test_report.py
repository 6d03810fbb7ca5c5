"""The monthly report (GET /v1/reports/monthly, `gateway report`): a month of known traffic
about one EUO gives exact counts; it is scoped like /v1/audit (an EUO admin: its EUO; a
partner: the EUOs it held); a malformed month is 400 bad_report; the HTML page renders in
headless Chromium with its SVG charts."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest
import pytest_asyncio

from . import test_console
from .conftest import (
    call,
    gateway_main,
    gateway_settings,
    make_token,
    own_database,
    running_gateway,
)
from .test_console import By

# the console tests' headless Chromium (skipped, saying why, where it is not installed)
chromium = test_console.chromium
browser = test_console.browser

ALICE = "/telephony/euos/euo-acme/users/u-alice"
BEA = dict(role="partner", sub="bea@bluesky", partner="p-bluesky")
GLOBEX_ADMIN = dict(role="euo_admin", sub="admin@globex", euo="euo-globex")


@pytest_asyncio.fixture(scope="module")
async def month_of_traffic(backends, database_url, template_database, tmp_path_factory):
    """A database of its own with a known month about euo-acme: (gateway URL, DSN, month)."""
    async with own_database(database_url, template_database) as dsn, \
            running_gateway(gateway_settings(backends["urls"]), dsn) as gw:
        async with aiohttp.ClientSession() as http:
            staff = make_token("provider_staff", "staff-sam")
            for _ in range(2):
                assert (await call(http, "GET", gw + ALICE, staff))[0] == 200
            assert (await call(http, "GET", gw + ALICE + "/voicemails", staff))[0] == 403
            partner = make_token("partner", "pat@northwind", partner="p-northwind")
            assert (await call(http, "GET", gw + "/telephony/euos/euo-acme/cdrs",
                               partner))[0] == 200
            status, _, body = await call(
                http, "POST", gw + "/v1/me/requests", make_token("user", "u-alice", euo="euo-acme"),
                json={"type": "restriction", "data_sets": ["user_mobile"]})
            assert status == 201, body
            status, _, body = await call(http, "POST", gw + "/v1/break-glass", staff, json={
                "euo": "euo-acme", "user": "u-alice", "purpose": "organizer locked out",
                "ticket": "INC-7", "minutes": 5})
            assert status == 201, body
        month = datetime.now(UTC).strftime("%Y-%m")
        yield gw, dsn, month


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _count(rows, section: str, role: str, item: str) -> int:
    return sum(int(r["count"]) for r in rows
               if (r["section"], r["role"], r["item"]) == (section, role, item))


def _check_counts(rows) -> None:
    assert _count(rows, "accesses", "provider_staff", "user_name") == 2
    assert _count(rows, "accesses", "partner", "call_history") == 1
    assert _count(rows, "refusals", "provider_staff", "dataset_not_permitted") == 1
    assert [r["item"] for r in rows if r["section"] == "requests"] == ["restriction"]
    assert [r["detail"] for r in rows if r["section"] == "break_glass"] == [
        "organizer locked out (ticket INC-7)"]


async def test_a_month_of_known_traffic_gives_exact_counts(month_of_traffic, http, token_for):
    gw, _, month = month_of_traffic
    status, headers, body = await call(
        http, "GET", f"{gw}/v1/reports/monthly?month={month}&euo=euo-acme&format=csv",
        token_for("staff"))
    assert status == 200 and headers["Content-Type"].startswith("text/csv"), body
    _check_counts(_rows(body.decode()))
    # the EUO admin's own report says the same; the JSON carries the same rows
    status, _, body = await call(http, "GET", f"{gw}/v1/reports/monthly?month={month}",
                                 token_for("admin"))
    report = orjson.loads(body)
    assert status == 200 and report["euo"] == "euo-acme"
    assert {"role": "provider_staff", "item": "user_name", "count": 2} in report["accesses"]
    # a month without traffic is empty, not an error
    status, _, body = await call(http, "GET", f"{gw}/v1/reports/monthly?month=2001-01&euo=euo-acme",
                                 token_for("staff"))
    assert status == 200 and orjson.loads(body)["accesses"] == []


async def test_the_command_line_report_says_the_same(month_of_traffic):
    _, dsn, month = month_of_traffic
    done = await asyncio.to_thread(gateway_main, "report", "--month", month, "--euo", "euo-acme",
                                   "--format", "csv", env={"GATEWAY_DATABASE_URL": dsn})
    assert done.returncode == 0, done.stderr
    _check_counts(_rows(done.stdout))


@pytest.mark.parametrize(("who", "query"), [
    (BEA, "euo=euo-acme"),                      # a partner asking about another's customer
    (BEA, "partner=p-northwind"),               # or about another partner
    (GLOBEX_ADMIN, "euo=euo-acme"),             # an EUO admin about another EUO
])
async def test_a_report_outside_the_callers_scope_is_refused(month_of_traffic, http, token_for,
                                                            who, query):
    gw, _, month = month_of_traffic
    status, _, body = await call(http, "GET", f"{gw}/v1/reports/monthly?month={month}&{query}",
                                 token_for(**who))
    assert status == 403 and orjson.loads(body)["error"]["code"] == "report_out_of_scope"


@pytest.mark.parametrize("query", ["month=2026-13&euo=euo-acme", "month=26-01&euo=euo-acme",
                                   "euo=euo-acme", "month=2026-01&euo=euo-acme&format=pdf",
                                   "month=2026-01"])
async def test_a_malformed_report_request_is_400(month_of_traffic, http, token_for, query):
    gw, _, _ = month_of_traffic
    status, _, body = await call(http, "GET", f"{gw}/v1/reports/monthly?{query}",
                                 token_for("staff"))
    assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_report", body


async def test_the_html_report_renders_in_a_browser_with_its_charts(
        month_of_traffic, http, token_for, browser, tmp_path):  # noqa: F811 (the fixture)
    gw, _, month = month_of_traffic
    status, headers, body = await call(
        http, "GET", f"{gw}/v1/reports/monthly?month={month}&euo=euo-acme&format=html",
        token_for("staff"))
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = tmp_path / "report.html"
    page.write_bytes(body)
    browser.get(page.as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Access report, {month}"
    charts = browser.find_elements(By.CSS_SELECTOR, "figure svg")
    assert len(charts) == 2
    bars = charts[0].find_elements(By.TAG_NAME, "rect")
    assert bars and all(int(b.get_attribute("width")) > 0 for b in bars)
    assert "organizer locked out" in browser.find_element(By.TAG_NAME, "body").text
    assert not browser.find_elements(By.TAG_NAME, "script")
