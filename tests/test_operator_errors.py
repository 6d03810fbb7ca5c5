"""What an operator trips over gets one line and exit 2, never a traceback: a policy file or
directory the gateway may not read, an HS256 secret too short to be one. (Files root may not
read need a process that is not root: `serve` and `check` run as processes there, and in
this process for the mistakes in settings.)"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import POLICY_DIR, free_port, gateway_main

NOBODY = 65534


@pytest.fixture
def world_dir():
    """A directory every user may enter (pytest's tmp_path is its owner's only), removed after."""
    path = Path(tempfile.mkdtemp(prefix="gateway-unreadable-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        sub.chmod(0o755 if sub.is_dir() else 0o644)
    shutil.rmtree(path)


def as_another_user() -> list[str]:
    """The command prefix that drops root (root reads any file): setpriv to nobody."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a file root may not read cannot be made")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


COMMANDS = {
    "serve": ["serve"],
    "policy test": ["policy", "test"],
    "policy explain": ["policy", "explain", "--role", "provider_staff", "--sub", "s",
                       "/telephony/euos/euo-acme"],
    "check": ["check"],
}


@pytest.mark.parametrize("unreadable", ["routes.yaml", "policy.csv", "the directory"])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_unreadable_policy_is_one_line_and_exit_2(world_dir, unreadable, command):
    policy = world_dir / "policy"
    shutil.copytree(POLICY_DIR, policy)
    for sub in [policy, *policy.rglob("*")]:
        sub.chmod(0o755 if sub.is_dir() else 0o644)
    target = policy if unreadable == "the directory" else policy / unreadable
    target.chmod(0o000)
    env = {**os.environ, "HOME": str(world_dir), "GATEWAY_DATA_DIR": str(world_dir / "state"),
           "GATEWAY_POLICY_DIR": str(policy), "GATEWAY_JWT_SECRET": "k" * 40,
           "GATEWAY_UPSTREAM_TELEPHONY": "http://127.0.0.1:9",
           "GATEWAY_UPSTREAM_MEETING": "http://127.0.0.1:9",
           "GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
           "GATEWAY_DATABASE_URL": "postgresql://127.0.0.1:9/none",
           "GATEWAY_DB_CONNECT_TIMEOUT_S": "0.1"}
    done = subprocess.run([*as_another_user(), sys.executable, "-m", "gateway",
                           *COMMANDS[command]], env=env, capture_output=True, text=True,
                          timeout=120, cwd=world_dir)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    named = str(policy / ("model.conf" if unreadable == "the directory" else unreadable))
    assert (f"policy file {named} is not readable" in out
            or f"cannot read {target}: Permission denied" in out), out


@pytest.mark.parametrize("command", ["serve", "check"])
def test_a_short_hs256_secret_is_refused(tmp_path, command, caplog):
    """Five characters were a warning: any token the gateway accepted gave the key away to
    an offline guess. Now a problem, like a missing key."""
    env = {"GATEWAY_DATA_DIR": str(tmp_path), "GATEWAY_JWT_SECRET": "short",
           "GATEWAY_UPSTREAM_TELEPHONY": "http://127.0.0.1:9",
           "GATEWAY_UPSTREAM_MEETING": "http://127.0.0.1:9",
           "GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
           "GATEWAY_DATABASE_URL": "postgresql://127.0.0.1:9/none",
           "GATEWAY_DB_CONNECT_TIMEOUT_S": "0.1"}
    caplog.set_level(logging.INFO)     # what a process would have logged to its stderr
    done = gateway_main(command, env=env)       # in this process: the database is nowhere
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in out, out
    assert "GATEWAY_JWT_SECRET is 5 bytes: an HS256 key needs at least 32" in out, out
    if command == "serve":       # refused before it waits for the database
        assert "database" not in done.stderr + caplog.text, out + caplog.text


@pytest.mark.parametrize("command", ["serve", "check"])
def test_a_signing_key_file_that_is_no_key_is_refused_at_start(tmp_path, command, caplog):
    """A placeholder left in the mounted Secret once let `serve` start and each worker die
    at start, over and over, until the restart budget gave up (exit 1)."""
    key = tmp_path / "audit-signing-key.pem"
    key.write_text("REPLACE_ME: -----BEGIN PRIVATE KEY----- ... -----END PRIVATE KEY-----\n")
    env = {"GATEWAY_DATA_DIR": str(tmp_path), "GATEWAY_JWT_SECRET": "k" * 40,
           "GATEWAY_AUDIT_SIGNING_KEY_FILE": str(key),
           "GATEWAY_UPSTREAM_TELEPHONY": "http://127.0.0.1:9",
           "GATEWAY_UPSTREAM_MEETING": "http://127.0.0.1:9",
           "GATEWAY_LISTEN": f"127.0.0.1:{free_port()}",
           "GATEWAY_DATABASE_URL": "postgresql://127.0.0.1:9/none",
           "GATEWAY_DB_CONNECT_TIMEOUT_S": "0.1"}
    caplog.set_level(logging.INFO)     # what a process would have logged to its stderr
    done = gateway_main(command, env=env)       # in this process: the database is nowhere
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in out, out
    assert f"GATEWAY_AUDIT_SIGNING_KEY_FILE {key}" in out, out
    if command == "serve":
        assert "database" not in done.stderr + caplog.text, out + caplog.text
