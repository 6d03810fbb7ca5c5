"""Big list answers pass in bounded memory: a list route's answer larger than
GATEWAY_STREAM_JSON_ABOVE_BYTES is parsed as it arrives and redacted element by element,
with the same result as the whole answer redacted at once; written ahead (intent before the
first byte, outcome with what was served at the end) and cut, never completed, when an
element is wrong."""

from __future__ import annotations

import resource
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.demo.run import seed_contracts

from .conftest import call, gateway_settings, running_gateway, start_site, wait_for

NOW = datetime.now(UTC).replace(microsecond=0).isoformat()


def cdr(i: int, user: str | None = None) -> dict:
    return {"id": f"c-{i}", "user_id": user or ("u-alice", "u-bob", "u-carla")[i % 3],
            "caller": f"+3210{i:07d}", "callee": "+3220000000", "start": NOW,
            "duration_s": i % 600, "direction": "out"}


class Calls:
    """A telephony backend answering /euos/euo-acme/cdrs with `count` CDRs, generated as
    they are sent (it never holds the answer either); `odd` puts one wrong element in."""

    def __init__(self):
        self.count, self.odd, self.length = 0, None, True

    async def handle(self, request: web.Request) -> web.StreamResponse:
        count, odd = self.count, self.odd

        def pieces():
            yield b'{"cdrs":['
            for i in range(count):
                one = odd[1] if odd and i == odd[0] else cdr(i)
                yield (b"," if i else b"") + orjson.dumps(one)
            yield b"]}"
        if self.length:            # small enough to know its length: as most backends do
            return web.Response(body=b"".join(pieces()), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        batch = []
        for piece in pieces():
            batch.append(piece)
            if len(batch) == 500:
                await response.write(b"".join(batch))
                batch = []
        await response.write(b"".join(batch))
        await response.write_eof()
        return response


@pytest.fixture
async def calls(backends, database_url, demo):
    await seed_contracts(database_url, demo)
    backend = Calls()
    app = web.Application()
    app.router.add_get("/{tail:.*}", backend.handle)
    runner, port = await start_site(app, "127.0.0.1", 0)
    backend.urls = dict(backends["urls"], telephony=f"http://127.0.0.1:{port}")
    yield backend
    await runner.cleanup()


URL = "/telephony/euos/euo-acme/cdrs"


async def test_a_streamed_list_is_what_the_whole_answer_would_be(calls, database_url, http,
                                                                 token_for, db):
    """The same 3,000 CDRs read whole and streamed give the partner the same JSON (caller
    and callee masked, as for a partner); the streamed one is two rows: the intent (the data
    sets the plan allows) and the outcome (what was served, to whom, the bytes sent)."""
    calls.count = 3000
    partner = token_for("partner")
    whole_settings = gateway_settings(calls.urls)
    async with running_gateway(whole_settings, database_url) as gw:
        status, _, whole = await call(http, "GET", gw + URL, partner)
    assert status == 200, whole
    streamed_settings = gateway_settings(calls.urls, stream_json_above_bytes=1000)
    async with running_gateway(streamed_settings, database_url) as gw:
        status, headers, streamed = await call(http, "GET", gw + URL, partner)
    assert status == 200, streamed
    assert orjson.loads(streamed) == orjson.loads(whole)
    assert len(orjson.loads(streamed)["cdrs"]) == 3000
    rows = await db.fetch("select phase, access, data_sets, subject_users, bytes, reason "
                          "from audit_log where request_id = $1 order by at, seq",
                          headers["X-Request-Id"])
    assert [r["phase"] for r in rows] == ["intent", "outcome"]
    intent, outcome = rows
    assert intent["access"] == outcome["access"] == "served"
    assert outcome["subject_users"] == ["u-alice", "u-bob", "u-carla"]
    assert outcome["bytes"] == len(streamed) and outcome["reason"] is None
    assert set(outcome["data_sets"]) <= set(intent["data_sets"])


async def test_a_wrong_element_cuts_the_stream_and_says_why(calls, database_url, http, token_for, db):
    """A CDR of another user in u-alice's list, past the first byte: the answer is cut
    short (the client cannot take it for a whole one) and the outcome row says why."""
    calls.count, calls.length = 20_000, False
    calls.odd = (15_000, cdr(15_000, "u-bob"))
    settings = gateway_settings(calls.urls, stream_json_above_bytes=1000)
    async with running_gateway(settings, database_url) as gw, http.get(gw + URL + "?user=u-alice",
                        headers={"Authorization": f"Bearer {token_for('partner')}"}) as r:
        assert r.status == 200
        request_id = r.headers["X-Request-Id"]
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()

    async def outcome():
        return await db.fetchrow("select reason, bytes from audit_log where request_id = $1 "
                                 "and phase = 'outcome'", request_id)
    row = await wait_for(outcome, timeout=10)
    assert row["reason"] == "backend_subject_mismatch"


@pytest.mark.slow
async def test_a_list_far_larger_than_the_cap_passes_in_bounded_memory(calls, database_url, http,
                                                                        token_for):
    """400,000 CDRs (~60 MB, 60 times GATEWAY_MAX_JSON_ANSWER_BYTES here) pass whole; the
    process (gateway, backend and client together) grows by well under 64 MiB."""
    calls.count, calls.length = 400_000, False
    settings = gateway_settings(calls.urls, max_json_answer_bytes=1 << 20)
    async with running_gateway(settings, database_url) as gw:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        size = count = 0
        tail = b""                     # a mark may straddle two chunks
        async with http.get(gw + URL, headers={"Authorization": f"Bearer {token_for('partner')}"}) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(1 << 16):
                size += len(chunk)
                count += (tail + chunk).count(b'"user_id"') - tail.count(b'"user_id"')
                tail = chunk[-8:]
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert count == 400_000 and size > 55 << 20
    assert grown_kib < 64 << 10, f"grew by {grown_kib / 1024:.0f} MiB"
