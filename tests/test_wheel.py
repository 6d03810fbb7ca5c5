"""The wheel works on its own: installed (not editable) into a clean virtual environment and
run outside the checkout, it finds its migrations and default policy, migrates an empty
database and serves a request that is answered and audited.

Slow (a virtual environment and the dependencies from the package index, ~20 s with pip's
cache warm); `-m "not wheel"` leaves it out while iterating.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from .conftest import AUDIENCE, ISSUER, SECRET, call, wait_for

pytestmark = pytest.mark.wheel
REPO = Path(__file__).resolve().parent.parent
# what the wheel is built from, exactly as deploy/Dockerfile copies it
SHIPPED = ("pyproject.toml", "README.md", "gateway", "policies", "sql")


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with its output."""
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Iterator[Path]:
    """A fresh virtual environment with the wheel built from this checkout installed in it."""
    root = tmp_path_factory.mktemp("wheel")
    # a copy, so the build's build/ and *.egg-info stay out of the checkout and runs in
    # parallel do not share them; symlinks=True keeps gateway/_data's links as in git
    src = root / "src"
    src.mkdir()
    for name in SHIPPED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    run(sys.executable, "-m", "venv", root / "venv")
    pip = root / "venv" / "bin" / "pip"
    run(pip, "wheel", "--quiet", "--no-deps", src, "-w", root / "dist", timeout=300)
    (wheel,) = (root / "dist").glob("*.whl")
    run(pip, "install", "--quiet", wheel, timeout=600)
    yield root / "venv"
    shutil.rmtree(root, ignore_errors=True)      # a virtual environment: ~150 MB


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without anything that would lead back to the checkout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GATEWAY_", "PYTHON", "VIRTUAL_ENV"))}
    return env | settings


@pytest.fixture
async def empty_database(database_url):
    """The DSN of a new, empty database on the test server; dropped afterwards."""
    name = f"wheel_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'create database "{name}"')
        yield urlsplit(database_url)._replace(path=f"/{name}").geturl()
        await admin.execute(f'drop database "{name}" with (force)')
    finally:
        await admin.close()


async def test_the_installed_wheel_migrates_and_serves_an_audited_request(
        venv, empty_database, backends, http, token_for, tmp_path):
    env = clean_env(GATEWAY_DATABASE_URL=empty_database, GATEWAY_DATA_DIR=str(tmp_path / "state"),
                    GATEWAY_UPSTREAM_TELEPHONY=backends["urls"]["telephony"],
                    GATEWAY_UPSTREAM_MEETING=backends["urls"]["meeting"],
                    GATEWAY_JWT_SECRET=SECRET, GATEWAY_JWT_ISSUER=ISSUER,
                    GATEWAY_JWT_AUDIENCE=AUDIENCE)
    where = run(venv / "bin" / "python", "-c", "import gateway.settings as s; "
                "print(s.__file__); print(s.SQL_DIR); print(s.DEFAULT_POLICY_DIR)",
                cwd=tmp_path, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    # the shipped policy's own test cases come with it, and pass
    tested = run(venv / "bin" / "gateway", "policy", "test", cwd=tmp_path, env=env).stdout
    assert "144 cases in 2 files, 0 failed" in tested, tested

    run(venv / "bin" / "gateway", "migrate", cwd=tmp_path, env=env, timeout=60)
    conn = await asyncpg.connect(empty_database)
    try:
        applied = await conn.fetch("select name from schema_migrations order by version")
        assert [r["name"] for r in applied] == sorted(p.name for p in (REPO / "sql").glob("0*.sql"))

        with socket.socket() as probe:       # a port free right now
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        log = tmp_path / "serve.log"
        with open(log, "wb") as out:
            serve = subprocess.Popen([venv / "bin" / "gateway", "serve"], cwd=tmp_path,
                                     env=env | {"GATEWAY_LISTEN": f"127.0.0.1:{port}"},
                                     stdout=out, stderr=subprocess.STDOUT)
        try:
            async def up():
                try:
                    return (await call(http, "GET", base + "/healthz"))[0] == 200
                except aiohttp.ClientError:
                    return serve.poll() is not None      # it died: stop waiting
            assert await wait_for(up, timeout=30) and serve.poll() is None, \
                f"gateway serve did not come up:\n{log.read_text()}"
            status, headers, _ = await call(http, "GET", base + "/telephony/euos/euo-acme/users/u-alice",
                                            token_for("alice"))
            assert status == 200
            # the web console's files are in the wheel too
            status, _, script = await call(http, "GET", base + "/console/console.js")
            assert status == 200 and script == (REPO / "gateway/console/static/console.js").read_bytes()
            # the row is committed before the answer leaves, so it is there already
            row = await conn.fetchrow("select decision, status, route, subject_users from audit_log "
                                      "where request_id = $1", headers["X-Request-Id"])
        finally:
            serve.kill()
            serve.wait()
    finally:
        await conn.close()
    assert row is not None
    assert (row["decision"], row["status"], row["subject_users"]) == ("allow", 200, ["u-alice"])
