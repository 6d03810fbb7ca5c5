"""Forwarding: path tricks, unmapped routes, header hygiene, limits and broken backends."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp import web

from gateway import backends as backends_module
from gateway.demo.run import start_site

from .conftest import call, gateway_settings, running_gateway


async def raw_request(base: str, raw_path: str, token: str, method: str = "GET") -> tuple[int, dict]:
    """Send a request line exactly as given (no client-side normalisation)."""
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(f"{method} {raw_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 f"Connection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body) if body.startswith(b"{") else {}


@pytest.mark.parametrize("raw_path", [
    "/telephony/euos/euo-acme/users/../users/u-alice/voicemails",
    "/telephony/euos/euo-acme/users/u-bob/%2e%2e/u-alice/voicemails",
    "/telephony/euos/euo-acme/users/u-alice%2Fvoicemails",
    "/telephony/euos/euo-acme//users/u-alice",
    "/telephony/euos/euo-acme/users/u-alice\\voicemails",
    "/telephony/euos/euo-acme/users/u-alice%00",
    "/telephony/euos/./euo-acme",
    "/telephony/../v1/catalog",
    "/telephony/euos/euo-acme;x=1/users",
    "/tele%70hony/euos/euo-acme",
])
async def test_path_tricks_are_refused(gateway, token_for, backends, raw_path):
    """Traversal and encoding tricks get 400 bad_path and never reach a backend."""
    before = len(backends["seen"].requests)
    status, body = await raw_request(gateway, raw_path, token_for("bob"))
    assert status == 400 and body["error"]["code"] == "bad_path"
    assert len(backends["seen"].requests) == before


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/telephony/euos/euo-acme/secrets"),
    ("GET", "/telephony/admin"),
    ("DELETE", "/telephony/euos/euo-acme/users/u-alice"),
    ("POST", "/meeting/accounts/euo-acme"),
    ("GET", "/billing/euos/euo-acme"),
])
async def test_unmapped_routes_are_404_and_never_forwarded(gateway, http, token_for, backends,
                                                          method, path):
    before = len(backends["seen"].requests)
    status, _, body = await call(http, method, gateway + path, token_for("staff"))
    assert status == 404
    assert orjson.loads(body)["error"]["code"] in ("unknown_route", "not_found")
    assert len(backends["seen"].requests) == before


async def test_identity_and_hop_by_hop_headers_are_stripped(gateway, http, token_for, backends):
    """The backend sees our request id and none of the client's identity claims."""
    sneaky = {"X-Forwarded-User": "root", "X-User-Id": "u-bob", "X-Remote-User": "root",
              "X-Auth-Request-Email": "a@b", "Cookie": "session=1", "X-Request-Id": "client-id-1",
              "Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "X-Custom": "x"}
    status, headers, _ = await call(http, "GET", gateway + "/telephony/euos/euo-acme",
                                    token_for("staff"), headers=sneaky)
    assert status == 200
    assert headers["X-Request-Id"] != "client-id-1"        # the gateway's own id, unique
    _, _, seen = backends["seen"].requests[-1]
    seen = {k.lower(): v for k, v in seen.items()}
    for name in ("x-forwarded-user", "x-user-id", "x-remote-user", "x-auth-request-email",
                 "cookie", "authorization", "x-secret-hop", "x-custom"):
        assert name not in seen
    assert seen["x-request-id"] == headers["X-Request-Id"]


async def test_every_response_carries_a_request_id(gateway, http):
    for path in ("/healthz", "/nowhere", "/telephony/euos/euo-acme"):
        _, headers, _ = await call(http, "GET", gateway + path)
        assert headers["X-Request-Id"]


async def test_patch_checks_each_field_it_writes(gateway, http, token_for):
    """A user may change their own record; an admin may not touch the personal directory,
    identifiers cannot be changed, and bodies over the limit are 413."""
    url = gateway + "/telephony/euos/euo-acme/users/u-carla"
    me = {"role": "user", "sub": "u-carla", "euo": "euo-acme"}
    status, _, body = await call(http, "PATCH", url, token_for(**me), json={"language": "en"})
    assert status == 200 and orjson.loads(body)["language"] == "en"
    status, _, body = await call(http, "PATCH", url, token_for("admin"),
                                 json={"personal_directory": []})
    assert status == 403 and orjson.loads(body)["error"]["code"] == "write_not_permitted"
    status, _, body = await call(http, "PATCH", url, token_for("admin"), json={"id": "u-x"})
    assert status == 400 and orjson.loads(body)["error"]["code"] == "field_not_writable"
    status, _, body = await call(http, "PATCH", url, token_for(**me), data=b"{not json")
    assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_json"
    status, _, body = await call(http, "PATCH", url, token_for(**me),
                                 data=b'{"address": "' + b"x" * (2 << 20) + b'"}')
    assert status == 413 and orjson.loads(body)["error"]["code"] == "body_too_large"


async def test_staff_cannot_delete_a_voicemail_but_its_user_can(gateway, http, token_for, demo):
    url = gateway + "/telephony/euos/euo-globex/users/u-eva/voicemails/vm-u-eva-1"
    status, _, _ = await call(http, "DELETE", url, token_for("staff"))
    assert status == 403
    status, _, _ = await call(http, "DELETE", url, token_for(role="user", sub="u-eva", euo="euo-globex"))
    assert status == 204
    assert demo.voicemails["u-eva"] == []


# --- broken backends -----------------------------------------------------------------

@pytest.fixture
async def faulty(backends, database_url):
    """A gateway whose telephony backend misbehaves as each request asks (?fault=...)."""
    done = asyncio.Event()

    async def handler(request):
        fault = request.path.split("/")[2]          # /euos/<fault>/...
        if fault == "slow":         # past the gateway's read timeout: until the test is done
            await done.wait()
        if fault == "malformed":
            return web.Response(body=b'{"id": "malformed", "name": ', content_type="application/json")
        if fault == "shape":
            return web.json_response({"users": {"not": "a list"}})
        if fault == "html":
            return web.Response(text="<html>oops</html>", content_type="text/html")
        if fault == "500":
            return web.Response(status=500, text="boom")
        return web.json_response({"id": fault, "name": "Acme", "postal_address": "x",
                                  "partner_id": "p"})
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner, port = await start_site(app, "127.0.0.1", 0)
    urls = dict(backends["urls"], telephony=f"http://127.0.0.1:{port}")
    settings = gateway_settings(urls, backend_read_timeout_s=0.5)
    async with running_gateway(settings, database_url) as gw:
        yield gw
        done.set()
    await runner.cleanup()


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/telephony/euos/slow", 504, "backend_timeout"),
    ("/telephony/euos/malformed", 502, "backend_unmappable"),
    ("/telephony/euos/shape/users", 502, "backend_unmappable"),
    ("/telephony/euos/html", 502, "backend_unmappable"),
    ("/telephony/euos/500", 502, "backend_error"),
])
async def test_broken_backend_answers_never_pass_through(faulty, http, token_for, path, status, code):
    got, _, body = await call(http, "GET", faulty + path, token_for("staff"))
    assert got == status
    error = orjson.loads(body)["error"]
    assert error["code"] == code
    assert b"Acme" not in body


async def test_unreachable_backend_is_502(backends, database_url, http, token_for):
    urls = dict(backends["urls"], telephony="http://127.0.0.1:9")   # nothing listens there
    async with running_gateway(gateway_settings(urls), database_url) as gw:
        status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-acme", token_for("staff"))
        assert status == 502 and orjson.loads(body)["error"]["code"] == "backend_unreachable"
        status, _, body = await call(http, "GET", gw + "/readyz")
        assert status == 503 and orjson.loads(body)["backends"]["telephony"] is False


async def test_readiness_answers_at_once_while_a_backend_hangs(backends, database_url, http,
                                                               token_for, monkeypatch):
    """A backend that takes connections and never answers: `/readyz` says so from what the
    last probe saw, at once (it waited for a live probe of 2 s before). The gateway's start
    waits for its first probes: theirs are cut at 0.3 s here; a probe after that would take
    the whole PROBE_TIMEOUT_S again, which /readyz must not wait for."""
    probe_timeout_s = backends_module.PROBE_TIMEOUT_S
    assert probe_timeout_s >= 1.0         # what a live probe on /readyz would take, below
    monkeypatch.setattr(backends_module, "PROBE_TIMEOUT_S", 0.3)
    held: list[asyncio.StreamWriter] = []

    async def hold(reader, writer):
        held.append(writer)                  # read nothing, answer nothing

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    urls = dict(backends["urls"], telephony=f"http://127.0.0.1:{port}")
    try:
        async with running_gateway(gateway_settings(urls), database_url) as gw:
            monkeypatch.setattr(backends_module, "PROBE_TIMEOUT_S", probe_timeout_s)
            for _ in range(3):
                started = time.monotonic()
                status, _, body = await call(http, "GET", gw + "/readyz")
                assert time.monotonic() - started < 0.5
                assert status == 503
                assert orjson.loads(body)["reasons"] == ["backend_unreachable:telephony"]
                assert orjson.loads(body)["backends"] == {"telephony": False, "meeting": True}
    finally:
        silent.close()
        for writer in held:
            writer.close()


async def test_health_and_readiness(gateway, http):
    assert (await call(http, "GET", gateway + "/healthz"))[0] == 200
    status, _, body = await call(http, "GET", gateway + "/readyz")
    assert status == 200 and orjson.loads(body) == {
        "status": "ready", "database": True, "backends": {"telephony": True, "meeting": True}}


async def test_catalog_lists_every_data_set_with_who_may_see_it(gateway, http, token_for):
    status, _, body = await call(http, "GET", gateway + "/v1/catalog", token_for("bob"))
    assert status == 200
    data_sets = {d["name"]: d for d in orjson.loads(body)["data_sets"]}
    assert len(data_sets) == 32
    voicemails = data_sets["voicemails"]
    assert voicemails["hidden_from"] == ["provider_staff"]
    assert {v["role"] for v in voicemails["visible_to"]} == {"user"}
    assert (await call(http, "GET", gateway + "/v1/catalog"))[0] == 401


async def test_metrics_count_requests_by_route_and_decision(gateway, http, token_for):
    await call(http, "GET", gateway + "/telephony/euos/euo-acme/users/u-alice/voicemails",
               token_for("staff"))
    status, headers, body = await call(http, "GET", gateway + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert ('gateway_requests_total{decision="deny",'
            'route="telephony:/euos/{euo}/users/{user}/voicemails",status="403"}') in text
    assert "gateway_request_duration_seconds_bucket" in text


async def test_metrics_of_one_process_count_each_request_once(gateway, http, token_for):
    """One process keeps plain numbers and renders them at scrape: what Prometheus parses
    must add up (counters by the requests made, histograms cumulative with +Inf = count)."""
    from prometheus_client.parser import text_string_to_metric_families

    route = "telephony:/euos/{euo}/users/{user}"

    async def scrape() -> dict[str, dict[tuple, float]]:
        body = (await call(http, "GET", gateway + "/metrics"))[2].decode()
        out: dict[str, dict[tuple, float]] = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return out

    before = await scrape()
    user = "/telephony/euos/euo-acme/users/u-alice"
    for path in (user, user, user + "/voicemails"):
        await call(http, "GET", gateway + path, token_for("staff"))
    after = await scrape()

    def delta(name: str, **labels) -> float:
        key = tuple(sorted(labels.items()))
        return after[name].get(key, 0) - before.get(name, {}).get(key, 0)
    assert delta("gateway_requests_total", route=route, decision="allow", status="200") == 2
    assert delta("gateway_refusals_total", reason="dataset_not_permitted") == 1
    assert delta("gateway_request_duration_seconds_count", route=route) == 2
    assert delta("gateway_request_duration_seconds_sum", route=route) > 0
    buckets = sorted(((float(dict(k)["le"]), v) for k, v in
                      after["gateway_request_duration_seconds_bucket"].items()
                      if dict(k)["route"] == route))
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == float("inf")
    assert counts[-1] == after["gateway_request_duration_seconds_count"][(("route", route),)]
    assert delta("gateway_backend_duration_seconds_count", service="telephony") == 2
    assert after["gateway_audit_batch_rows_count"][()] >= 1


async def test_streamed_answers_carry_the_request_id_too(gateway, http, token_for, db):
    """Binary and ZIP answers are prepared before the handler returns; the id is still
    there, and the client's own id is kept beside it in the audit row."""
    for path in ("/telephony/euos/euo-acme/users/u-alice/voicemails/vm-u-alice-1", "/v1/me/export"):
        status, headers, _ = await call(http, "GET", gateway + path, token_for("alice"),
                                        headers={"X-Request-Id": "stream-id-1"})
        assert status == 200 and headers["X-Request-Id"] != "stream-id-1"
        row = await db.fetchrow("select client_request_id from audit_log where request_id = $1"
                                " and path = $2", headers["X-Request-Id"], path)
        assert row["client_request_id"] == "stream-id-1"


async def test_an_empty_write_without_write_rights_is_refused_before_forwarding(
        gateway, http, token_for, backends):
    """A colleague's PATCH with an empty body never reaches the backend."""
    before = len(backends["seen"].requests)
    status, _, body = await call(http, "PATCH", gateway + "/telephony/euos/euo-acme/users/u-alice",
                                 token_for("bob"), json={})
    assert status == 403 and orjson.loads(body)["error"]["code"] == "write_not_permitted"
    assert len(backends["seen"].requests) == before
