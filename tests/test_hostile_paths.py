"""Hostile request targets: the backend receives exactly the canonical path and declared
query of the route that was authorized and audited, or nothing at all."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.policy.catalog_files import load_catalog
from gateway.target import Targets

from .conftest import POLICY_DIR, audit_row, call


async def raw_request(base: str, target: bytes, token: str | None,
                      method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Send a request line exactly as given (no client-side normalisation)."""
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    writer.write(method.encode() + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + auth
                 + b"Connection: close\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def _code(body: bytes) -> str | None:
    return orjson.loads(body)["error"]["code"] if body.startswith(b"{") else None


@pytest.mark.parametrize(("caller", "method", "target"), [
    ("partner", "GET", "/telephony/euos/euo-acme/users/u-alice#/recordings/rec-1"),
    ("partner", "DELETE", "/telephony/euos/euo-acme/users/u-alice#/recordings/rec-1"),
    ("admin", "GET", "/telephony/euos/euo-acme/users/u-bob#/voicemails/vm-u-bob-1"),
    ("partner", "GET", "/telephony/euos/euo-acme/users/u-alice%23/recordings/rec-1"),
    ("partner", "GET", "/telephony/euos/euo-acme/users/u-alice?/recordings/rec-1"),
])
async def test_a_fragment_or_query_cannot_choose_the_route(gateway, backends, token_for, db,
                                                          caller, method, target):
    """`u1#/recordings/x` was matched as a recording but answered as the user record:
    now it is 400 before matching, never forwarded, and audited without a subject."""
    before = len(backends["seen"].requests)
    status, headers, body = await raw_request(gateway, target.encode(), token_for(caller), method)
    assert status == 400 and _code(body) in ("bad_path", "query_not_allowed")
    assert len(backends["seen"].requests) == before
    row = await audit_row(db, headers["X-Request-Id"])
    assert row["decision"] == "deny" and row["subject_users"] == [] and row["route"] is None
    assert row["actor_role"] == ("partner" if caller == "partner" else "euo_admin")


@pytest.mark.parametrize(("caller", "path", "code"), [
    ("alice", "/telephony/euos/euo-acme/users/u-alice?user=u-bob", "query_not_allowed"),
    ("partner", "/telephony/euos/euo-acme/users?euo=euo-initech", "query_not_allowed"),
    ("staff", "/telephony/euos/euo-acme/cdrs?user=u-bob&user=u-alice", "bad_query"),
    ("staff", "/telephony/euos/euo-acme/cdrs?user=", "bad_query"),
    ("staff", "/telephony/euos/euo-acme/cdrs?user", "bad_query"),
    ("staff", "/telephony/euos/euo-acme/cdrs?user=u%2Dbob", "bad_query"),
    ("staff", "/telephony/euos/euo-acme/cdrs?user=u-bob&euo=euo-initech", "query_not_allowed"),
])
async def test_only_declared_query_parameters_are_forwarded(gateway, http, backends, token_for,
                                                            caller, path, code):
    """A query parameter a route does not declare (or one given twice, empty or encoded)
    is refused: the query can no longer choose whose data the backend returns."""
    before = len(backends["seen"].requests)
    status, _, body = await raw_request(gateway, path.encode(), token_for(caller))
    assert status == 400 and _code(body) == code
    assert len(backends["seen"].requests) == before


async def test_a_declared_query_parameter_is_forwarded_rebuilt(gateway, http, backends, token_for):
    status, headers, _ = await call(http, "GET", gateway + "/telephony/euos/euo-acme/cdrs?user=u-bob",
                                    token_for("staff"))
    assert status == 200
    seen = [p for _, p, h in backends["seen"].requests
            if h.get("X-Request-Id") == headers["X-Request-Id"]]
    assert seen == ["/euos/euo-acme/cdrs?user=u-bob"]


@pytest.mark.parametrize("target", [
    "/telephony/euos/" + "a" * 129, "/telephony/euos/euo-acme/users/u-alice/", "/telephony/euos/..",
    "/telephony/euos/%65uo-acme", "/telephony/euos/euo acme", "/telephony/euos/é",
    "/telephony/euos/=HYPERLINK(1)/users/u-alice", "/telephony/euos/euo-acme;v=1",
])
async def test_identifiers_outside_the_grammar_are_refused(gateway, backends, token_for, target):
    before = len(backends["seen"].requests)
    status, _, _ = await raw_request(gateway, target.encode(), token_for("staff"))
    assert status == 400
    assert len(backends["seen"].requests) == before


# --- the property ----------------------------------------------------------------------

STATIC = ["telephony", "meeting", "euos", "users", "voicemails", "recordings", "faxes", "cdrs",
          "trunks", "directory", "personal-directory", "accounts", "organizers", "meetings",
          "documents", "connection-stats", "v1", "admin"]
IDS = ["euo-acme", "euo-initech", "u-alice", "u-bob", "vm-u-alice-1", "rec-u-alice-1", "m-1"]
HOSTILE = st.text(alphabet=st.sampled_from(list("aZ09._~@:-#?;%/\\=&+!$'()*,[]{}|^`\"<>é\u202e")),
                  max_size=12)
SEGMENT = st.one_of(st.sampled_from(STATIC), st.sampled_from(IDS), HOSTILE,
                    st.sampled_from(["", ".", "..", "%2e%2e", "%2F", "a" * 200]))
QUERY = st.lists(st.tuples(st.sampled_from(["user", "euo", "x", "", "user[]"]),
                           st.one_of(st.sampled_from(IDS), HOSTILE)), max_size=3)


TEMPLATES = [f"/{r.service}{r.path}" for r in load_catalog(POLICY_DIR).routes]


@st.composite
def targets(draw) -> bytes:
    """Half the time a real route with valid or hostile values (and a suffix), else noise."""
    if draw(st.booleans()):
        parts = []
        for seg in draw(st.sampled_from(TEMPLATES)).split("/")[1:]:
            value = draw(st.sampled_from(IDS) if draw(st.integers(0, 4)) else HOSTILE) \
                if seg.startswith("{") else seg
            parts.append(value)
        target = "/" + "/".join(parts) + draw(st.sampled_from(["", "", "", "", "", "#", "#/x", ";"]))
    else:
        service = draw(st.sampled_from(["telephony", "meeting", "tele%70hony", "v1"]))
        segments = draw(st.lists(SEGMENT, min_size=0, max_size=7))
        target = "/" + "/".join([service, *segments])
    pairs = draw(QUERY) if draw(st.integers(0, 3)) == 0 else []
    if pairs or draw(st.integers(0, 5)) == 0:
        target += "?" + "&".join(f"{k}={v}" for k, v in pairs)
    return target.encode()


@pytest.fixture(scope="module")
def route_table() -> Targets:
    return Targets(load_catalog(POLICY_DIR))


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(target=targets(), caller=st.sampled_from(["staff", "staff", "partner", "alice"]))
async def test_the_backend_receives_only_canonical_authorized_targets(
        gateway, backends, token_for, db, route_table, target, caller):
    """For any request target: either the gateway refuses with 4xx and nothing reaches a
    backend, or the backend receives exactly the canonical path and declared query of the
    route that was authorized and audited."""
    status, headers, _ = await raw_request(gateway, target, token_for(caller))
    assert status < 500 or status in (502, 504), (target, status)
    request_id = headers.get("X-Request-Id")
    if request_id is None:             # refused by the HTTP parser itself
        assert 400 <= status < 500, target
        return
    forwarded = [(s, path) for _, path, h in backends["seen"].requests
                 for s in [h.get("X-Request-Id")] if s == request_id]
    event(f"status {status}, forwarded: {bool(forwarded)}")
    if not forwarded:
        return
    assert len(forwarded) == 1, target
    path_qs = forwarded[0][1]
    row = await audit_row(db, request_id)
    assert row is not None and row["route"] is not None, target
    service = row["route"].split(":", 1)[0]
    canonical = route_table.parse(f"/{service}{path_qs}")
    assert canonical.route.name == row["route"], (target, path_qs)
    assert canonical.upstream == path_qs, (target, path_qs)
    assert row["subject_euo"] == canonical.params[canonical.route.subject_euo]


@pytest.mark.parametrize("head", [
    b"GET /v1/catalog HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n",        # space in a name
    b"GET /v1/catalog HTTP/1.1\r\nHost: x\r\nX: \x00\r\n",              # NUL in a value
    b"GET /v1/catalog HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n",
    b"GET /v1/catalog HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n",   # too long
])
async def test_a_malformed_request_is_refused_with_one_line_of_log_not_a_traceback(
        gateway, head, caplog):
    """The parser's refusals (400) are what an attacker sends at will: each is one WARNING
    line naming the parser's reason, never an ERROR with a traceback."""
    url = urlsplit(gateway)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
        writer.write(head + b"Connection: close\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        writer.close()
    assert data.split(b" ", 2)[1] == b"400", data[:200]
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records, "the refusal was not logged at all"
    for r in records:
        assert r.levelno == logging.WARNING and r.exc_info is None and r.exc_text is None
        assert "malformed HTTP request refused (400)" in r.getMessage()
