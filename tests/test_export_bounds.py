"""A ZIP export's access log streams from one snapshot on a pooled connection: a client
that stops reading or trickles is cut within its bounds and the connection goes back; at
most GATEWAY_EXPORT_DB_SLOTS exports hold one at once, the next is refused with 503."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import socket
import time
import uuid
import zipfile
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest
import pytest_asyncio

from gateway.audit.chain import GENESIS, HASHED, canonical, link
from gateway.audit.writer import COLUMNS
from gateway.export import http as export_http
from gateway.settings import ConfigError, Settings, export_db_slots

from .conftest import (
    audit_row,
    call,
    gateway_settings,
    own_database,
    running_gateway,
    unread_get,
    wait_for,
)

# ~11 MB zipped (each access has a random reason, which does not compress): far more than
# the socket buffers between the gateway and a client can hold (Linux lets the gateway's
# send buffer grow to 4 MiB for a client that reads, however slowly)
ROWS = 60_000
SMALL_POOL = dict(db_pool_min=1, db_pool_max=4)     # one export slot (a quarter)


def _accesses(n: int) -> list[tuple]:
    """n accesses by provider staff to u-alice's data (each also naming u-bob, so that two
    users have a log this long), one chain linked as the writer links."""
    chain, prev, records = uuid.uuid4(), GENESIS, []
    start = datetime(2026, 11, 1, tzinfo=UTC)
    rng = random.Random(7)
    for i in range(n):
        v = dict.fromkeys(HASHED)
        v.update(at=start + timedelta(seconds=i), chain_id=chain, seq=i + 1,
                 request_id=f"bulk-{i}", actor_sub="staff-sam", actor_role="provider_staff",
                 method="GET", path="/telephony/euos/euo-acme/users/u-alice",
                 service="telephony", route="telephony:/euos/{euo}/users/{user}",
                 data_sets=["user_name"], fields_removed=[], subject_euo="euo-acme",
                 subject_users=["u-alice", "u-bob"], decision="allow",
                 reason=base64.b64encode(rng.randbytes(150)).decode(), status=200, bytes=10,
                 duration_ms=1.0)
        values = [v[f] for f in HASHED]
        row_hash = link(prev, canonical(values))
        records.append((*values, prev, row_hash))
        prev = row_hash
    return records


@pytest_asyncio.fixture(scope="module")
async def big_log(database_url, template_database):
    """A database of its own in which u-alice's and u-bob's access logs hold ROWS accesses;
    its pool."""
    async with own_database(database_url, template_database) as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                await conn.copy_records_to_table("audit_log", records=_accesses(ROWS),
                                                 columns=COLUMNS)
                # as after any bulk load: without statistics the planner takes the table
                # for empty and reads all ROWS rows for each page of 1,000 (~0.3 s a page
                # idle, 60 pages an export), until autovacuum happens to analyze it (up to
                # a minute later): a reading client's export then ran past its deadline
                await conn.execute("analyze audit_log")
            yield dsn, pool
        finally:
            await pool.close()


async def _stalled(base: str, token: str, rcvbuf: int = 4096) -> tuple[socket.socket, float]:
    """A ZIP export asked for on a raw socket whose headers are read, then nothing more;
    the socket and when the headers came (time.time(), as a log record's; the access log
    streams from then on)."""
    sock, head = await unread_get(base, "/v1/me/export", token, rcvbuf, close=True)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return sock, time.time()


async def _rest(sock: socket.socket) -> bytes:
    """What the socket still gives until the gateway's end is gone."""
    loop, got = asyncio.get_running_loop(), []
    try:
        while chunk := await loop.sock_recv(sock, 1 << 16):
            got.append(chunk)
    except ConnectionResetError:
        pass
    sock.close()
    return b"".join(got)


def _complete(response: bytes) -> bool:
    """Whether a chunked HTTP response ended (its last chunk): a cut one never does, and
    the client sees the download fail."""
    return response.endswith(b"\r\n0\r\n\r\n")


def _cuts(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "failed midway" in r.getMessage()]


def _cut(caplog, n: int):
    """A predicate for wait_for: n exports have been cut."""
    async def done():
        return len(_cuts(caplog)) >= n
    return done


async def _in_use(http, base: str) -> float:
    _, _, body = await call(http, "GET", base + "/metrics")
    (line,) = [x for x in body.decode().splitlines()
               if x.startswith("gateway_db_pool_connections_in_use")]
    return float(line.split()[-1])


async def _access_log_pages(http, base: str, token: str) -> list[bytes]:
    lines, cursor = [], None
    while True:
        status, _, body = await call(http, "GET", base + "/v1/me/access-log?limit=1000"
                                     + (f"&cursor={cursor}" if cursor else ""), token)
        assert status == 200, body
        page = orjson.loads(body)
        lines += [orjson.dumps(entry) + b"\n" for entry in page["accesses"]]
        if not (cursor := page["next_cursor"]):
            return lines


async def test_stalled_readers_are_cut_and_their_connections_come_back(
        big_log, backends, http, token_for, caplog):
    """Two pairs of stalled exports, which with the audit lane's connection need more than
    the pool's four: each is cut once a write has waited GATEWAY_EXPORT_WRITE_TIMEOUT_S,
    without finishing its response, and gives its connection back (had the first pair kept
    theirs, the second would find one for two): the pool is as free as before."""
    dsn, _ = big_log
    alice, bob = token_for("alice"), token_for("bob")
    settings = gateway_settings(backends["urls"], **SMALL_POOL, export_db_slots=2,
                                export_write_timeout_s=0.5, export_log_deadline_s=60)
    async with running_gateway(settings, dsn) as gw:
        assert (await call(http, "GET", gw + "/v1/me/access-log?limit=1", alice))[0] == 200
        before = await _in_use(http, gw)
        for n in (2, 4):
            # two users: one user's second export would be 429 export_under_way
            stalled = await asyncio.gather(_stalled(gw, alice), _stalled(gw, bob))
            assert await wait_for(_cut(caplog, n), timeout=10)
            for cut in _cuts(caplog)[-2:]:
                assert "the client took no page of it within 0.5 s" in cut.getMessage()
                # the stall timeout's, not the 60 s deadline's
                assert cut.created - min(started for _, started in stalled) < 10
            for sock, _ in stalled:
                assert not _complete(await _rest(sock))

        async def as_free_as_before():
            return await _in_use(http, gw) <= before
        assert await wait_for(as_free_as_before)
        assert (await call(http, "GET", gw + "/v1/me/access-log?limit=1", alice))[0] == 200


async def test_a_trickling_reader_is_cut_at_the_logs_deadline(big_log, backends, http,
                                                               token_for, caplog):
    """A client that keeps reading, slowly enough never to trip the write timeout, still
    holds the connection no longer than GATEWAY_EXPORT_LOG_DEADLINE_S."""
    dsn, _ = big_log
    # the write timeout well past the deadline: on a loaded machine a write can wait a
    # second or more for this (in-process) client, and the deadline must be what cuts it
    settings = gateway_settings(backends["urls"], **SMALL_POOL, export_write_timeout_s=10,
                                export_log_deadline_s=1.5)
    async with running_gateway(settings, dsn) as gw:
        sock, started = await _stalled(gw, token_for("alice"), rcvbuf=1 << 16)
        loop, got = asyncio.get_running_loop(), []
        try:
            while chunk := await loop.sock_recv(sock, 16 << 10):
                got.append(chunk)
                if not _cuts(caplog):            # then what the kernel still holds, at once
                    await asyncio.sleep(0.02)    # the client's pace: at most 800 KB/s
        except ConnectionResetError:
            pass
        sock.close()
        (cut,) = _cuts(caplog)
        # (by then at most ~1.2 MB read and ~4 MB in the kernel's buffers, of ~11 MB)
        assert "the access log was not taken within 1.5 s" in cut.getMessage()
        assert 1.5 <= cut.created - started < 5
        assert not _complete(b"".join(got))


async def test_exports_beyond_the_slots_are_refused_and_the_gateway_keeps_serving(
        big_log, backends, http, token_for, caplog, monkeypatch):
    """While a stalled export holds the one slot, as many more exports (of other users)
    as the pool has connections are each refused at once with 503 exports_busy, and the
    stalled user's own next one with 429 export_under_way, before a backend is called or
    a byte sent, audited; every other request is served meanwhile, and once the slot is
    given back an export gets it."""
    dsn, db = big_log
    monkeypatch.setattr(export_http, "EXPORT_SLOT_WAIT_S", 0.2)
    alice = token_for("alice")
    settings = gateway_settings(backends["urls"], **SMALL_POOL, export_write_timeout_s=30,
                                export_log_deadline_s=60)
    assert export_db_slots(settings) == 1
    async with running_gateway(settings, dsn) as gw:
        sock, _ = await _stalled(gw, alice)
        try:
            seen = len(backends["seen"].requests)
            others = [token_for(role="user", sub=f"u-other-{i}", euo="euo-acme")
                      for i in range(settings.db_pool_max)]
            refused = await asyncio.gather(*[call(http, "GET", gw + "/v1/me/export", token)
                                             for token in others])
            for status, headers, body in refused:
                assert (status, orjson.loads(body)["error"]["code"]) == (503, "exports_busy")
                row = await audit_row(db, headers["X-Request-Id"])
                assert (row["decision"], row["reason"]) == ("error", "exports_busy")
            status, headers, body = await call(http, "GET", gw + "/v1/me/export", alice)
            assert (status, orjson.loads(body)["error"]["code"]) == (429, "export_under_way")
            row = await audit_row(db, headers["X-Request-Id"])
            assert (row["decision"], row["reason"]) == ("deny", "export_under_way")
            assert len(backends["seen"].requests) == seen
            assert (await call(http, "GET", gw + "/v1/me/access-log?limit=5", alice))[0] == 200
            assert (await call(http, "GET", gw + "/v1/me/export?format=json", alice))[0] == 200
            assert (await call(http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice",
                               token_for("staff")))[0] == 200
            assert not _cuts(caplog)                        # all that while it was held
        finally:
            sock.close()
        assert await wait_for(_cut(caplog, 1), timeout=10)
        async with http.get(gw + "/v1/me/export", headers={"Authorization": f"Bearer {alice}"}) as r:
            assert r.status == 200           # it has the slot (the rest is left unread)


# ~4.5 s (60,000 accesses read and zipped twice over): the full suite's. In the quick loop
# test_export's whole-log test checks the ZIP's access log against the paged API, and the
# tests above check the bounds on a client that stalls or trickles
@pytest.mark.slow
async def test_a_reading_client_gets_the_whole_log_first_and_every_member(big_log, backends,
                                                                          http, token_for):
    """Bounds that cut a stalled client within seconds do not touch a client that reads:
    access-log.ndjson (first) is the access log byte for byte as GET /v1/me/access-log
    pages it, every page of the snapshot; the attachments follow, export.json last. (The
    bounds leave room for a loaded machine, whose loop, serving both ends, can stall for a
    second or more: a write timeout of 0.5 s or a deadline of 10 s cut this reader there.)"""
    dsn, _ = big_log
    alice = token_for("alice")
    settings = gateway_settings(backends["urls"], **SMALL_POOL, export_write_timeout_s=5,
                                export_log_deadline_s=120)
    async with running_gateway(settings, dsn) as gw:
        # at once (her own calls are not in her access log: both see the same one)
        expected, (status, _, body) = await asyncio.gather(
            _access_log_pages(http, gw, alice), call(http, "GET", gw + "/v1/me/export", alice))
        assert status == 200
        with zipfile.ZipFile(io.BytesIO(body)) as z:
            assert z.testzip() is None
            names = z.namelist()
            log = z.read("access-log.ndjson")
            document = orjson.loads(z.read("export.json"))
    assert len(expected) >= ROWS and log == b"".join(expected)
    assert names[0] == "access-log.ndjson" and names[-1] == "export.json"
    assert names[1:-1] == [a["file"] for a in document["attachments"]] and names[1:-1]
    assert document["held_by_gateway"]["access_log_file"] == "access-log.ndjson"


@pytest.mark.parametrize(("env", "slots", "refused"), [
    ({}, 3, False),
    ({"GATEWAY_DB_POOL_MAX": "40"}, 10, False),
    ({"GATEWAY_EXPORT_DB_SLOTS": "10"}, 10, False),
    ({"GATEWAY_EXPORT_DB_SLOTS": "11"}, 11, True),       # none left beside the audit lane
    ({"GATEWAY_EXPORT_DB_SLOTS": "0"}, 0, True),
])
def test_the_export_slots_are_a_quarter_of_the_pool_and_leave_connections(env, slots, refused,
                                                                          tmp_path):
    settings = Settings.from_env({"GATEWAY_JWT_SECRET": "s" * 32, **env})
    assert export_db_slots(settings) == slots
    if refused:
        with pytest.raises(ConfigError, match="GATEWAY_EXPORT_DB_SLOTS"):
            settings.check_for_serving()
    else:
        settings.check_for_serving()
