"""The operator's command line: every option explained, contracts listed, a clean demo,
and tokens that say which secret signed them."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from .conftest import call, gateway_main


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_every_command_and_option_has_help():
    top = run_cli("--help").stdout
    for command in ("serve", "check", "demo", "migrate", "grant", "reload", "audit", "contracts",
                    "token"):
        assert command in top
    for args in (("token",), ("audit", "query"), ("demo",), ("contracts", "list")):
        text = gateway_main(*args, "--help").stdout
        options = [w for w in text.split() if w.startswith("--") and w != "--help"]
        for option in options:
            line = next(li for li in text.splitlines() if option in li)
            assert len(line.split()) > 2 or option in ("--role", "--sub"), (args, line)


async def test_contracts_are_listed_by_the_api_and_the_cli(gateway, http, token_for, database_url):
    status, _, body = await call(http, "GET", gateway + "/v1/admin/euos", token_for("staff"))
    assert status == 200
    listed = {c["euo_id"]: c for c in orjson.loads(body)["contracts"]}
    assert listed["euo-acme"]["partner_id"] == "p-northwind" and listed["euo-acme"]["active"]
    assert (await call(http, "GET", gateway + "/v1/admin/euos", token_for("partner")))[0] == 403
    done = run_cli("contracts", "list", GATEWAY_DATABASE_URL=database_url)
    assert done.returncode == 0, done.stderr
    printed = {c["euo_id"]: c for c in map(orjson.loads, done.stdout.splitlines())}
    assert printed["euo-acme"] == listed["euo-acme"]


def test_a_token_says_which_secret_signed_it(tmp_path):
    done = run_cli("token", "--role", "user", "--euo", "euo-acme", "--sub", "u-bob",
                   GATEWAY_DATA_DIR=str(tmp_path), GATEWAY_JWT_SECRET="")
    assert done.returncode == 0 and done.stdout.count(".") == 2
    assert "a NEW development secret" in done.stderr and str(tmp_path) in done.stderr
    again = run_cli("token", "--role", "user", "--euo", "euo-acme", "--sub", "u-bob",
                    GATEWAY_DATA_DIR=str(tmp_path), GATEWAY_JWT_SECRET="")
    assert "the development secret" in again.stderr


def test_demo_reset_refuses_an_external_database(tmp_path):
    done = run_cli("demo", "--reset", GATEWAY_DATA_DIR=str(tmp_path),
                   GATEWAY_DATABASE_URL="postgresql://x@127.0.0.1:9/x")
    assert done.returncode == 2 and "deletes only the embedded database" in done.stderr
