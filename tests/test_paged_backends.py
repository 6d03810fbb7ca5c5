"""A backend that pages its lists by default (here: one element a page when no limit is
given) must not leave the export or the erasure with its first page alone: both follow
next_cursor, each page an audited call of its own, up to pipeline.MAX_PAGES."""

from __future__ import annotations

import copy

import orjson
import pytest_asyncio

from gateway import pipeline
from gateway.demo import data as demo_data
from gateway.demo.backends import meeting_app, telephony_app
from gateway.demo.run import start_site

from .conftest import Seen, call, gateway_settings, running_gateway

ALICE = {"role": "user", "sub": "u-alice", "euo": "euo-acme"}
DIRK = {"role": "user", "sub": "u-dirk", "euo": "euo-globex"}
ACME_ADMIN = {"role": "euo_admin", "sub": "admin@acme", "euo": "euo-acme"}
GLOBEX_ADMIN = {"role": "euo_admin", "sub": "admin@globex", "euo": "euo-globex"}


def _data() -> demo_data.DemoData:
    """The demo data, with more than one voicemail for alice and dirk."""
    d = demo_data.build()
    for uid in ("u-alice", "u-dirk"):
        first = d.voicemails[uid][0]
        for n in (2, 3):
            d.voicemails[uid].append(dict(first, id=f"vm-{uid}-{n}"))
            d.blobs[f"vm-{uid}-{n}"] = d.blobs[first["id"]]
    return d


@pytest_asyncio.fixture(scope="module")
async def gateways(database_url):
    """Two gateways over two copies of the same data: one whose backends page by default
    (a page of one), one whose backends answer whole lists. (paged URL, whole URL, the
    paged backends' data, what they received.)"""
    data = _data()
    seen = Seen()
    runners, urls = [], []
    for default_limit, backend_data, middlewares in ((1, data, [seen.middleware()]),
                                                     (None, copy.deepcopy(data), [])):
        found = {}
        for service, make in (("telephony", telephony_app), ("meeting", meeting_app)):
            runner, port = await start_site(make(backend_data, middlewares, default_limit),
                                            "127.0.0.1", 0)
            runners.append(runner)
            found[service] = f"http://127.0.0.1:{port}"
        urls.append(found)
    async with running_gateway(gateway_settings(urls[0]), database_url) as paged, \
            running_gateway(gateway_settings(urls[1]), database_url) as whole:
        yield paged, whole, data, seen
    for runner in runners:
        await runner.cleanup()


def _counts(export: dict) -> dict[tuple[str, str], int]:
    """How many elements of each data set the export holds (a record's lists counted by
    their elements: a paged list comes as one record a page)."""
    def size(data) -> int:
        lists = [v for v in data.values() if isinstance(v, list)] if isinstance(data, dict) \
            else [data] if isinstance(data, list) else []
        return sum(map(len, lists)) if lists else 1
    return {(service, ds): sum(size(r["data"]) for r in entry["records"])
            for service, by_ds in export["services"].items() for ds, entry in by_ds.items()}


async def test_an_export_holds_every_page_of_every_list(gateways, http, token_for):
    paged, whole, _, seen = gateways
    seen.requests.clear()
    got = {}
    for name, gw in (("paged", paged), ("whole", whole)):
        status, _, body = await call(http, "GET", gw + "/v1/me/export?format=json",
                                     token_for(**ALICE))
        assert status == 200, body
        got[name] = _counts(orjson.loads(body))
    assert got["paged"] == got["whole"]
    assert got["paged"][("telephony", "voicemails")] == 3
    cursors = [p for m, p, _ in seen.requests if m == "GET" and "cursor=" in p]
    assert any("/voicemails?cursor=" in p for p in cursors), cursors


async def test_an_erasure_deletes_what_every_page_lists(gateways, http, token_for):
    paged, _, data, seen = gateways
    seen.requests.clear()
    status, _, body = await call(http, "POST", paged + "/v1/me/requests", token_for(**DIRK),
                                 json={"type": "erasure", "data_sets": ["voicemails"]})
    assert status == 201, body
    request = orjson.loads(body)["id"]
    status, _, body = await call(http, "PATCH", f"{paged}/v1/requests/{request}",
                                 token_for(**GLOBEX_ADMIN), json={"status": "accepted"})
    assert status == 200, body
    assert orjson.loads(body)["status"] == "completed", body
    assert data.voicemails["u-dirk"] == []
    deletes = sorted(p for m, p, _ in seen.requests if m == "DELETE")
    assert deletes == [f"/euos/euo-globex/users/u-dirk/voicemails/vm-u-dirk-{n}"
                       for n in (1, 2, 3)]


async def test_a_list_past_the_page_bound_fails_the_export_and_the_erasure(
        gateways, http, token_for, monkeypatch, db):
    """A list that goes on past pipeline.MAX_PAGES (here 2 pages of one voicemail, of 3) is
    an explicit 502 backend_pages_exceeded for the export, and an erasure that deletes
    none of it, never a silently partial export or erasure."""
    paged, _, data, seen = gateways
    monkeypatch.setattr(pipeline, "MAX_PAGES", 2)
    status, headers, body = await call(http, "GET", paged + "/v1/me/export?format=json",
                                       token_for(**ALICE))
    assert status == 502, body
    assert orjson.loads(body)["error"]["code"] == "backend_pages_exceeded"
    rows = await db.fetch("select decision, status, reason from audit_log where request_id = $1",
                          headers["X-Request-Id"])
    assert ("error", 502, "backend_pages_exceeded") in [tuple(r) for r in rows], rows

    before = list(data.voicemails["u-alice"])
    assert len(before) == 3
    seen.requests.clear()
    status, _, body = await call(http, "POST", paged + "/v1/me/requests", token_for(**ALICE),
                                 json={"type": "erasure", "data_sets": ["voicemails"]})
    assert status == 201, body
    request = orjson.loads(body)["id"]
    status, _, body = await call(http, "PATCH", f"{paged}/v1/requests/{request}",
                                 token_for(**ACME_ADMIN), json={"status": "accepted"})
    assert status == 200, body
    answer = orjson.loads(body)
    assert answer["status"] != "completed", body
    assert "backend_pages_exceeded" in body.decode(), body
    assert data.voicemails["u-alice"] == before
    assert not [p for m, p, _ in seen.requests if m == "DELETE"]
