"""Fixtures: a real PostgreSQL, real backends on loopback, the real gateway in front."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import jwt
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict

from gateway.app import create_app
from gateway.demo import data as demo_data
from gateway.demo.backends import meeting_app, telephony_app
from gateway.demo.run import seed_contracts, start_site
from gateway.embedded import EmbeddedPostgres
from gateway.policy.policyset import PolicySet, load_policy_set, policy_version
from gateway.settings import DEFAULT_POLICY_DIR, Settings

SECRET = "test-only-secret-" + "x" * 32          # a test key, not a secret
ISSUER = "https://issuer.test"
AUDIENCE = "partner-gateway"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    """GATEWAY_TEST_DATABASE_URL, or an embedded PostgreSQL for this test session."""
    given = os.environ.get("GATEWAY_TEST_DATABASE_URL")
    if given:
        yield given
        return
    where = tmp_path_factory.mktemp("db")
    server = EmbeddedPostgres(where)
    yield server.start()
    server.stop()
    shutil.rmtree(where, ignore_errors=True)      # ~40 MB a run, kept by pytest otherwise


@contextlib.asynccontextmanager
async def private_database(where: Path, demo: demo_data.DemoData) -> AsyncIterator[EmbeddedPostgres]:
    """A PostgreSQL server of a module's own (for tests that freeze, stop or kill it), the
    demo contracts seeded; yields the server (its DSN as `.dsn`). A test that only needs a
    database nobody else writes to takes `own_database` (a second, not a fifth)."""
    server = EmbeddedPostgres(where)
    server.dsn = await asyncio.to_thread(server.start)
    await seed_contracts(server.dsn, demo)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(where, ignore_errors=True)


def _on_database(dsn: str, name: str) -> str:
    """The DSN of another database of the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest_asyncio.fixture(scope="session")
async def template_database(database_url, demo) -> AsyncIterator[str]:
    """A database of the test server, migrated and with the demo contracts, that nobody
    connects to: `own_database` copies it (CREATE DATABASE … TEMPLATE). Its name."""
    name = f"gateway_template_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'create database "{name}"')
        await seed_contracts(_on_database(database_url, name), demo)
        yield name
        await admin.execute(f'drop database "{name}" with (force)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def own_database(database_url: str, template: str) -> AsyncIterator[str]:
    """A database of the test server for one test or module alone (whose rows it may
    tamper with, its triggers disable), migrated, the demo contracts seeded; its DSN.
    A copy of `template_database`: ~0.2 s, where a server of its own takes ~5 s and 64 MB."""
    name = f"own_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'create database "{name}" template "{template}"')
        try:
            yield _on_database(database_url, name)
        finally:
            await admin.execute(f'drop database "{name}" with (force)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def demo() -> demo_data.DemoData:
    return demo_data.build()


class Seen:
    """What the backends received: (method, path_qs, headers) per request. A gateway's
    readiness probes (GET / with no request id, every 5 s a backend is idle, from any
    gateway the session runs) are counted apart: a test that finds no request reached a
    backend, or reads the last one, is not about them (one fell into a loaded run's window
    and failed test_export_bounds' slot test)."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.probes = 0

    def middleware(self):
        @web.middleware
        async def record(request, handler):
            if request.path_qs == "/" and "X-Request-Id" not in request.headers:
                self.probes += 1
            else:
                self.requests.append((request.method, request.path_qs,
                                      CIMultiDict(request.headers)))
            return await handler(request)
        return record

    def paths(self) -> list[str]:
        return [p for _, p, _ in self.requests]


@pytest_asyncio.fixture(scope="session")
async def backends(demo) -> AsyncIterator[dict]:
    """The demo telephony and meeting backends on loopback, recording what they receive."""
    seen = Seen()
    runners, urls = [], {}
    for service, make in (("telephony", telephony_app), ("meeting", meeting_app)):
        runner, port = await start_site(make(demo, [seen.middleware()]), "127.0.0.1", 0)
        runners.append(runner)
        urls[service] = f"http://127.0.0.1:{port}"
    yield {"urls": urls, "seen": seen}
    for r in runners:
        await r.cleanup()


# A loaded CI machine can stall the event loop for a second or more; the tests that are
# about the audit deadline set their own. Everywhere else a 503 for a slow commit would be
# noise, not a finding.
TEST_COMMIT_TIMEOUT_S = 15.0


def gateway_settings(upstreams: dict[str, str], **changes) -> Settings:
    base = Settings(upstreams=upstreams, jwt_secret=SECRET, jwt_issuer=ISSUER,
                    jwt_audience=AUDIENCE, policy_dir=DEFAULT_POLICY_DIR,
                    audit_commit_timeout_s=TEST_COMMIT_TIMEOUT_S)
    return base.with_(**changes)


_SHIPPED: dict[str, PolicySet] = {}


def shipped_policy_set(policy_dir) -> PolicySet | None:
    """The shipped policy directory loaded once per content (its version), for the many
    gateways the tests start (~0.2 s each, most of it reading YAML); None for any other
    directory, which create_app loads itself."""
    if Path(policy_dir).resolve() != Path(DEFAULT_POLICY_DIR).resolve():
        return None
    version = policy_version(policy_dir)
    if version not in _SHIPPED:
        _SHIPPED.clear()
        _SHIPPED[version] = load_policy_set(policy_dir)
    return _SHIPPED[version]


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, dsn: str) -> AsyncIterator[str]:
    """A gateway on a free loopback port; yields its base URL."""
    app = create_app(settings, dsn, policy_set=shipped_policy_set(settings.policy_dir))
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="session")
async def gateway(backends, database_url, demo) -> AsyncIterator[str]:
    """The gateway in front of the demo backends, contracts seeded; its base URL."""
    await seed_contracts(database_url, demo)
    async with running_gateway(gateway_settings(backends["urls"]), database_url) as url:
        yield url


@pytest_asyncio.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture(scope="session")
async def db(database_url) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    yield pool
    await pool.close()


async def move_due_date(db: asyncpg.Pool, request_id, interval: str) -> None:
    """Time travel for a test: a request's due date set to now() + `interval`. No role may
    change it (025's guard), so it is done with the guard off for one transaction."""
    async with db.acquire() as conn, conn.transaction():
        await conn.execute("alter table dsr_requests disable trigger dsr_requests_guard")
        await conn.execute("update dsr_requests set due_at = now() + $2::text::interval "
                           "where id = $1::uuid", str(request_id), interval)
        await conn.execute("alter table dsr_requests enable trigger dsr_requests_guard")


def make_token(role: str, sub: str, *, partner: str | None = None, euo: str | None = None,
               key=SECRET, alg: str = "HS256", ttl: int = 600, headers=None, **claims) -> str:
    now = int(time.time())
    body = {"sub": sub, "role": role, "iss": ISSUER, "aud": AUDIENCE, "iat": now,
            "exp": now + ttl}
    if partner:
        body["partner"] = partner
    if euo:
        body["euo"] = euo
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=alg, headers=headers)


# The callers of the visibility matrix, by name.
CALLERS = {
    "staff": dict(role="provider_staff", sub="staff-sam"),
    "partner": dict(role="partner", sub="pat@northwind", partner="p-northwind"),
    "admin": dict(role="euo_admin", sub="admin@acme", euo="euo-acme"),
    "alice": dict(role="user", sub="u-alice", euo="euo-acme"),
    "bob": dict(role="user", sub="u-bob", euo="euo-acme"),
}


@pytest.fixture(scope="session")
def token_for() -> Callable[..., str]:
    """token_for("alice") or token_for(role=..., sub=..., ...): a valid bearer token."""
    def make(name: str | None = None, **kwargs) -> str:
        spec = dict(CALLERS[name]) if name else {}
        spec.update(kwargs)
        return make_token(spec.pop("role"), spec.pop("sub"), **spec)
    return make


async def call(http: aiohttp.ClientSession, method: str, url: str, token: str | None = None,
               **kwargs) -> tuple[int, CIMultiDict[str], bytes]:
    headers = dict(kwargs.pop("headers", {}) or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with http.request(method, url, headers=headers, **kwargs) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


@contextlib.asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own to `dsn` (for locking, tampering, inspecting), cut
    without waiting when done (a locked or frozen server may not answer a goodbye)."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        conn.terminate()


async def wait_for(predicate, timeout: float = 3.0):
    """Poll an async predicate until it is truthy; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


POLICY_DIR = Path(DEFAULT_POLICY_DIR)


# The longest modules first. Under -n 2 a test of 20 s that happened to be shuffled to the
# end ran alone while the other worker had nothing left: the run took up to 15 s longer.
# Each run keeps how long each test took (setup, call and teardown) in pytest's cache; the
# next one, after pytest-randomly's shuffle, moves the modules that hold a test of LONG_S or
# more to the front, the longest first, each module's tests kept together and in their
# shuffled order (its fixtures set up once). A first run, or one without the cache, keeps
# the shuffled order as it is.
DURATIONS_KEY = "gateway/durations"
LONG_S = 3.0
_durations: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """(Under xdist the controller is handed every worker's reports: it keeps them all.)"""
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


@pytest.hookimpl(trylast=True)         # after -m and -k have deselected what does not run
def pytest_collection_modifyitems(session, config, items):
    cache = getattr(config, "cache", None)         # None under -p no:cacheprovider
    known = cache.get(DURATIONS_KEY, {}) if cache is not None else {}
    weight: dict[str, float] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        weight[module] = max(weight.get(module, 0.0), known.get(item.nodeid, 0.0))
    order = {module: -w for module, w in weight.items() if w >= LONG_S}
    first = {module: i for i, module in enumerate(sorted(order, key=order.get))}
    items.sort(key=lambda item: first.get(item.nodeid.split("::")[0], len(first)))


def _keep_durations(config) -> None:
    cache = getattr(config, "cache", None)
    if cache is None or hasattr(config, "workerinput") or not _durations:
        return
    known = cache.get(DURATIONS_KEY, {})
    known.update({nodeid: round(seconds, 2) for nodeid, seconds in _durations.items()})
    cache.set(DURATIONS_KEY, known)


def pytest_sessionfinish(session, exitstatus):
    """PostgreSQL data directories are ~40-160 MB each and pytest keeps its last three
    runs' temporary directories: remove each one the run left (its servers are stopped by
    now), all but its log. The run's durations are kept (above)."""
    _keep_durations(session.config)
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    if basetemp is None or not basetemp.is_dir():
        return
    for pgdata in list(basetemp.rglob("pgdata")):
        if pgdata.is_dir() and (pgdata / "PG_VERSION").exists():
            for entry in pgdata.iterdir():
                if entry.name != "log":
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The test order's seed, even under -q: `pytest --randomly-seed=N` repeats it."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None:
        terminalreporter.write_line(f"test order: --randomly-seed={seed}")


MIRRORS = {"contracts_unavailable", "restrictions_unavailable", "break_glass_unavailable"}


GATEWAYS = ("gateway", "hostile_gateway")


@pytest.fixture(autouse=True)
def _fresh_mirrors(request):
    """Each test that uses a session gateway starts with its mirrors proven fresh: a test
    before it (a synchronous one above all: the session's event loop does not run while it
    does) may have held the loop past the staleness bound, and a stale mirror fails closed
    with 503 — right for the gateway, noise for the next test. (Synchronous, so that a
    gateway not yet started is set up here, outside the running loop.)"""
    if any(name in request.fixturenames for name in GATEWAYS):
        for name in GATEWAYS:
            if name in request.fixturenames:
                request.getfixturevalue(name)
        request.getfixturevalue("_mirrors_proven_fresh")


@pytest_asyncio.fixture
async def _mirrors_proven_fresh(request, http):
    for name in GATEWAYS:
        if name in request.fixturenames:
            value = request.getfixturevalue(name)          # set up already: cached
            base = value[0] if isinstance(value, tuple) else value

            async def fresh(base=base):
                async with http.get(base + "/readyz") as r:
                    reasons = (await r.json()).get("reasons", ())
                return not MIRRORS & set(reasons)
            assert await wait_for(fresh, timeout=15), f"{base}: mirrors stay stale"


@pytest.fixture
def policy_dir(tmp_path) -> Path:
    """A writable copy of the shipped policies."""
    target = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, target)
    return target


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_env(backends, database_url: str, tmp_path, port: int, **env: str) -> dict[str, str]:
    """The environment of a `gateway serve` process in front of the test backends."""
    return {**os.environ, "GATEWAY_DATABASE_URL": database_url,
            "GATEWAY_LISTEN": f"127.0.0.1:{port}",
            "GATEWAY_UPSTREAM_TELEPHONY": backends["urls"]["telephony"],
            "GATEWAY_UPSTREAM_MEETING": backends["urls"]["meeting"], "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_JWT_ISSUER": ISSUER, "GATEWAY_JWT_AUDIENCE": AUDIENCE,
            "GATEWAY_DATA_DIR": str(tmp_path),
            "GATEWAY_AUDIT_COMMIT_TIMEOUT_S": str(TEST_COMMIT_TIMEOUT_S), **env}



def gateway_main(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`gateway ARGV` run in this process (gateway.cli.main) with `env` as its only
    GATEWAY_* variables: its exit status and what it printed, as a subprocess would give
    them, without starting Python and importing the gateway again (~1 s a command). Not
    for `serve` and `demo`, which install uvloop's event loop policy for the whole process
    (it is put back here, but they serve until a signal); a command that runs an event
    loop of its own (asyncio.run) is called in a thread from an async test. Each command
    family keeps one test through a real process (`python -m gateway ...`)."""
    from gateway.cli import main
    saved = {k: v for k, v in os.environ.items() if k.startswith("GATEWAY_")}
    policy = asyncio.get_event_loop_policy()
    out, err = io.StringIO(), io.StringIO()
    try:
        for name in saved:
            del os.environ[name]
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:            # argparse's usage errors and --help
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        for name in [k for k in os.environ if k.startswith("GATEWAY_")]:
            del os.environ[name]
        os.environ.update(saved)
        asyncio.set_event_loop_policy(policy)
    return subprocess.CompletedProcess(["gateway", *argv], code, out.getvalue(), err.getvalue())

SERVE = [sys.executable, "-m", "gateway", "serve"]


@contextlib.asynccontextmanager
async def gateway_process(http, backends, database_url: str, tmp_path, *args: str,
                          log: Path | None = None, stdout: Path | None = None,
                          up_within_s: float = 30, max_files: int | None = None,
                          **env: str) -> AsyncIterator[tuple[subprocess.Popen, str]]:
    """`gateway serve` as a process of its own (killed at the end); yields it and its URL.
    With log, its stderr (where it logs) goes to that file; with stdout (the access log),
    its stdout; with max_files, its descriptor limit (soft and hard: it cannot raise it)."""
    port = free_port()
    with contextlib.ExitStack() as files:
        err = files.enter_context(open(log, "ab")) if log else subprocess.DEVNULL
        out = files.enter_context(open(stdout, "wb")) if stdout else subprocess.DEVNULL
        limit = None if max_files is None else functools.partial(
            resource.setrlimit, resource.RLIMIT_NOFILE, (max_files, max_files))
        proc = subprocess.Popen([*SERVE, *args], stdout=out, stderr=err, preexec_fn=limit,
                                env=serve_env(backends, database_url, tmp_path, port, **env))
    base = f"http://127.0.0.1:{port}"
    try:
        async def up():
            try:
                return (await call(http, "GET", base + "/healthz"))[0] == 200
            except aiohttp.ClientError:
                return False
        assert await wait_for(up, timeout=up_within_s), "gateway serve did not come up"
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def unread_get(base: str, path: str, token: str, rcvbuf: int = 4096,
                     close: bool = False) -> tuple[socket.socket, bytes]:
    """A GET sent on a raw socket with a small receive buffer, whose answer's head is read
    and nothing more (a client that stops reading); the socket and the head."""
    loop = asyncio.get_running_loop()
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)    # before connect: fixed
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, int(port)))
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
               + ("Connection: close\r\n" if close else "") + "\r\n")
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1024)
    return sock, head


class Hostile:
    """A backend that answers whatever the test scripts, and records what it received."""

    def __init__(self):
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.script: Callable[[web.Request], Any] | None = None
        self.url = ""                    # where it listens, once started

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs, CIMultiDict(request.headers)))
        if self.script is None:
            return web.json_response({"error": "no script"}, status=500)
        answer = self.script(request)
        if asyncio.iscoroutine(answer):
            answer = await answer
        if isinstance(answer, web.StreamResponse):
            return answer
        return web.Response(body=orjson.dumps(answer), content_type="application/json",
                            headers={"Cache-Control": "public, max-age=3600", "ETag": '"v1"',
                                     "Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT",
                                     "Set-Cookie": "backend=1", "X-Backend-Secret": "s"})

    def answer(self, script) -> Hostile:
        """Answer every request with script(request): a JSON-able value or a response."""
        self.script = script
        self.seen.clear()
        return self


@pytest_asyncio.fixture(scope="session")
async def hostile_gateway(database_url, demo) -> AsyncIterator[tuple[str, Hostile]]:
    """The gateway in front of a hostile backend (both services); (its URL, the backend)."""
    await seed_contracts(database_url, demo)
    backend = Hostile()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    runner, port = await start_site(app, "127.0.0.1", 0)
    url = backend.url = f"http://127.0.0.1:{port}"
    settings = gateway_settings({"telephony": url, "meeting": url}, backend_read_timeout_s=1.0,
                                backend_deadline_s=1.5, max_json_answer_bytes=1 << 20)
    async with running_gateway(settings, database_url) as gw:
        yield gw, backend
    await runner.cleanup()


async def audit_row(db, request_id: str):
    """The audit row of a request the gateway answered (committed before the answer)."""
    return await db.fetchrow("select * from audit_log where request_id = $1", request_id)


# Each phase's report on the item, so a fixture's teardown can tell that its test failed
# (tests/test_console.py saves a screenshot then).
REPORTS = pytest.StashKey[dict]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    return report
