"""Typed query parameters and paging: a billing portal pages through a month of CDRs with
from, to, limit and cursor, each parsed into its grammar and rebuilt before it is forwarded;
a bad value is 400 bad_query and no backend is called; the backend's next_cursor passes
back only when it is a cursor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import pytest_asyncio

from gateway.demo import data as demo_data
from gateway.demo.backends import telephony_app
from gateway.demo.run import seed_contracts, start_site
from gateway.grammar import Cursor, DateTime, Enum, Integer
from gateway.policy.catalog import PolicyError
from gateway.policy.catalog_files import load_catalog

from .conftest import POLICY_DIR, Seen, audit_row, call, gateway_settings, running_gateway

MONTH_START = datetime(2026, 11, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 12, 1, tzinfo=UTC)
CDRS = 5000
CDR_PATH = "/telephony/euos/euo-acme/cdrs"


def _month_of_cdrs() -> demo_data.DemoData:
    """The demo data with 5,000 CDRs of euo-acme spread over November 2026 (several at the
    same second, so the cursor must order by more than time), and a few outside it."""
    d = demo_data.build()
    users = ["u-alice", "u-bob", "u-carla"]
    span = (MONTH_END - MONTH_START).total_seconds()
    rows = []
    for n in range(CDRS):
        at = MONTH_START + timedelta(seconds=int(span * n / CDRS) // 2 * 2)
        rows.append({"id": f"cdr-{n:05d}", "user_id": users[n % 3], "caller": "+3226400000",
                     "callee": f"+32264{n:05d}", "start": at.isoformat(), "duration_s": n % 600,
                     "direction": "out"})
    for n, at in enumerate((MONTH_START - timedelta(seconds=1), MONTH_END)):
        rows.append({"id": f"outside-{n}", "user_id": "u-alice", "caller": "+3226400000",
                     "callee": "+3226411111", "start": at.isoformat(), "duration_s": 1,
                     "direction": "in"})
    d.cdrs["euo-acme"] = rows[::-1]            # the backend orders them itself
    return d


@pytest_asyncio.fixture(scope="module")
async def billing(database_url, demo) -> AsyncIterator[tuple[str, Seen, str]]:
    """A gateway in front of a telephony backend holding a month of 5,000 CDRs; (its URL,
    what the backend received, the backend's URL)."""
    seen = Seen()
    runner, port = await start_site(telephony_app(_month_of_cdrs(), [seen.middleware()]),
                                    "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    await seed_contracts(database_url, demo)
    async with running_gateway(gateway_settings({"telephony": url, "meeting": url}),
                               database_url) as gw:
        yield gw, seen, url
    await runner.cleanup()


async def test_a_partner_pages_through_a_month_of_cdrs_each_once(billing, http, token_for):
    """Page size 1000 over 5,000 CDRs of November, the time given with an offset: every CDR
    of the month arrives exactly once, none outside it; the backend received the times in
    UTC and the cursors as the gateway passed them back."""
    gw, seen, _ = billing
    seen.requests.clear()
    ids, pages, cursor = [], 0, None
    while True:
        query = "from=2026-11-01T01:00:00%2B01:00&to=2026-12-01T00:00:00Z&limit=1000"
        if cursor:
            query += f"&cursor={cursor}"
        status, _, body = await call(http, "GET", f"{gw}{CDR_PATH}?{query}", token_for("partner"))
        assert status == 200, body
        page = orjson.loads(body)
        pages += 1
        assert len(page["cdrs"]) <= 1000
        ids += [c["id"] for c in page["cdrs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert len(ids) == CDRS and set(ids) == {f"cdr-{n:05d}" for n in range(CDRS)}
    assert pages in (5, 6)
    first = parse_qs(urlsplit(seen.paths()[0]).query)
    assert first == {"from": ["2026-11-01T00:00:00Z"], "to": ["2026-12-01T00:00:00Z"],
                     "limit": ["1000"]}


async def test_a_limit_above_the_routes_page_size_is_capped(billing, http, token_for):
    gw, seen, _ = billing
    seen.requests.clear()
    status, _, body = await call(http, "GET", f"{gw}{CDR_PATH}?limit=5000", token_for("partner"))
    assert status == 200 and len(orjson.loads(body)["cdrs"]) == 1000
    assert seen.paths() == [f"{CDR_PATH.removeprefix('/telephony')}?limit=1000"]


@pytest.mark.parametrize("query", [
    "from=2026-11-01", "from=2026-11-01T00:00:00", "from=2026-02-30T00:00:00Z",
    "from=2026-11-01T25:00:00Z", "from=2026-11-01T00:00:00%2B24:00", "from=yesterday",
    "from=2026-11-01T00:00:00Z&from=2026-11-02T00:00:00Z", "to=",
    "limit=0", "limit=-1", "limit=1e3", "limit=010", "limit=99999999999999999999", "limit=",
    "cursor=", "cursor=a%2Fb", "cursor=a/b", "cursor=" + "a" * 513, "cursor=..", "cursor=a+b",
    # a window that ends before it starts (in another offset, and a fraction of a second)
    "from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z",
    "from=2026-11-01T01:00:00.5%2B01:00&to=2026-11-01T00:00:00Z",
])
async def test_bad_values_are_400_and_reach_no_backend(billing, http, token_for, db, query):
    gw, seen, _ = billing
    seen.requests.clear()
    status, headers, body = await call(http, "GET", f"{gw}{CDR_PATH}?{query}",
                                       token_for("partner"))
    assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_query", body
    assert seen.requests == []
    assert (await audit_row(db, headers["X-Request-Id"]))["reason"] == "bad_query"


@pytest.mark.parametrize(("why", "next_cursor"), [
    ("a slash", "a/b"), ("too long", "x" * 513), ("a structure", {"after": "cdr-1"}),
    ("a list", ["x"]), ("a boolean", True), ("empty", ""),
])
async def test_a_next_cursor_outside_the_grammar_is_502(hostile_gateway, http, token_for,
                                                        why, next_cursor):
    gw, backend = hostile_gateway
    backend.answer(lambda request: {"cdrs": [], "next_cursor": next_cursor})
    status, _, body = await call(http, "GET", gw + CDR_PATH, token_for("partner"))
    assert status == 502 and orjson.loads(body)["error"]["code"] == "backend_unmappable", why


async def test_a_next_cursor_passes_to_whoever_sees_the_list(hostile_gateway, http, token_for):
    """next_cursor is no one's personal data: a user whose colleagues' CDRs are all removed
    still gets it, so that they can page on."""
    gw, backend = hostile_gateway
    cdr = {"id": "c1", "user_id": "u-bob", "caller": "+3222222222", "callee": "+3233333333",
           "start": datetime.now(UTC).isoformat(), "duration_s": 1, "direction": "in"}
    backend.answer(lambda request: {"cdrs": [cdr], "next_cursor": "eyJrIjoxfQ"})
    status, _, body = await call(http, "GET", gw + CDR_PATH + "?limit=1", token_for("alice"))
    assert status == 200 and orjson.loads(body) == {"cdrs": [], "next_cursor": "eyJrIjoxfQ"}


def test_grammars_parse_and_normalise():
    t = DateTime()
    assert t.normal("2026-11-01T00:00:00+01:00") == "2026-10-31T23:00:00Z"
    assert t.normal("2026-11-01t00:00:00.25z") == "2026-11-01T00:00:00.250000Z"
    assert t.normal("2026-11-01T00:00:00%2b01%3a00") == "2026-10-31T23:00:00Z"
    assert t.normal("2026-11-01T00:00:00%2F01:00") is None
    assert Integer(1, 10).normal("10") == "10" and Integer(1, 10).normal("11") is None
    assert Cursor(4).normal("ab-_") == "ab-_" and Cursor(4).normal("abcde") is None
    assert Enum(frozenset({"in", "out"})).normal("in") == "in"
    assert Enum(frozenset({"in", "out"})).normal("IN") is None


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.replace("    page: {max: 1000}\n", "", 1), "declares its page size bounds"),
    (lambda s: s.replace("page: {max: 1000}", "page: {max: 1000, default: 2000}", 1),
     "page.default"),
    (lambda s: s.replace("limit: {type: integer, min: 1, max: 1000000}",
                         "limit: {type: integer, min: 1}"), "grammars.limit"),
    (lambda s: s.replace("cursor: {type: cursor, max_length: 512}",
                         "cursor: '[^&]*'"), "admits"),
    (lambda s: s.replace("      next_cursor: cursor ", "      next_cursor: {list: cursor} ", 1),
     "field of an object"),
])
def test_the_route_table_refuses_paging_it_cannot_honour(policy_dir, change, message):
    path = policy_dir / "routes.yaml"
    path.write_text(change(path.read_text()))
    with pytest.raises(PolicyError, match=message):
        load_catalog(policy_dir)


async def test_a_default_page_size_is_forwarded_when_the_route_declares_one(
        policy_dir, billing, database_url, http, token_for):
    """None is declared today (the export reads whole lists); a route may declare one."""
    path = policy_dir / "routes.yaml"
    cdrs = "limit: limit, cursor: cursor}\n    page: {max: 1000}\n    body: {shape: cdrs}"
    path.write_text(path.read_text().replace(cdrs, cdrs.replace("1000}", "1000, default: 250}"),
                                             1))
    _, seen, backend = billing
    settings = gateway_settings({"telephony": backend, "meeting": backend}, policy_dir=policy_dir)
    async with running_gateway(settings, database_url) as gw:
        seen.requests.clear()
        status, _, body = await call(http, "GET", gw + CDR_PATH, token_for("partner"))
    assert status == 200 and len(orjson.loads(body)["cdrs"]) == 250
    assert seen.paths() == [f"{CDR_PATH.removeprefix('/telephony')}?limit=250"]


async def test_every_paged_list_of_the_demo_pages_as_it_lists(gateway, http, token_for):
    """Each route declaring `page:` (the demo backends implement them all), read one element
    a page by a caller who may read it, gives what the whole list gives, in its order."""
    caller_for = {"telephony:/euos/{euo}/cdrs": "partner",
                  "telephony:/euos/{euo}/trunks/{trunk}/cdrs": "partner",
                  "meeting:/accounts/{euo}/connection-stats": "partner"}
    catalog = load_catalog(POLICY_DIR)
    paged = [r for r in catalog.routes if r.page is not None]
    assert len(paged) == 6
    for route in paged:
        path = f"{gateway}/{route.service}" + route.path.format(
            euo="euo-acme", user="u-alice", trunk="trunk-1")
        token = token_for(caller_for.get(route.name, "alice"))
        status, _, body = await call(http, "GET", path, token)
        assert status == 200, (route.name, body)
        whole = orjson.loads(body)
        (field,) = set(whole) - {"next_cursor"}
        assert whole[field] and whole.get("next_cursor") is None, route.name
        items, cursor = [], None
        for _ in range(50):
            status, _, body = await call(http, "GET", path + "?limit=1" + (
                f"&cursor={cursor}" if cursor else ""), token)
            assert status == 200, (route.name, body)
            page = orjson.loads(body)
            items += page.get(field, [])
            cursor = page.get("next_cursor")
            if cursor is None:
                break
        assert items == whole[field], route.name
