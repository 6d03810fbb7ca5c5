"""Policy reload without a restart: SIGHUP (or `gateway reload`) loads the policy
directory in every worker, checks its floors and swaps it whole — or keeps the policy in
force and says why."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import orjson
import pytest

from gateway.demo.run import seed_contracts

from .conftest import POLICY_DIR, call, gateway_process, wait_for

pytestmark = pytest.mark.slow

USER = "/telephony/euos/euo-acme/users/u-bob"
MOBILE_LINE = "p, partner, contracted_partner, user_mobile, read\n"


def _own_policy(tmp_path):
    """A copy of the default policy for the test to edit."""
    policy = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, policy)
    return policy


async def _version(http, base, token) -> str:
    _, _, body = await call(http, "GET", base + "/v1/catalog", token)
    return orjson.loads(body)["policy_version"]


async def test_a_bad_policy_is_refused_and_a_good_one_swapped_in(backends, database_url, http,
                                                                token_for, tmp_path, demo):
    await seed_contracts(database_url, demo)
    policy, log = _own_policy(tmp_path), tmp_path / "serve.log"
    async with gateway_process(http, backends, database_url, tmp_path, "--workers", "2", log=log,
                               GATEWAY_POLICY_DIR=str(policy)) as (proc, base):
        staff, partner = token_for("staff"), token_for("partner")
        first = await _version(http, base, staff)
        # a line that breaks a floor: staff may read voicemails
        csv_path = policy / "policy.csv"
        good = csv_path.read_text()
        csv_path.write_text(good + "p, provider_staff, any, voicemails, read\n")
        async def refused_twice():       # both workers said so
            return log.read_text().count("policy reload refused") >= 2
        for _ in range(10):              # a worker still starting has not heard the first
            proc.send_signal(signal.SIGHUP)
            if await wait_for(refused_twice, timeout=2):
                break
        assert await refused_twice()
        assert "voicemails" in log.read_text()
        for _ in range(6):
            assert await _version(http, base, staff) == first
            status, _, _ = await call(http, "GET", base + USER + "/voicemails", staff)
            assert status == 403
        # a good change: partners no longer read users' mobile numbers
        assert MOBILE_LINE in good
        csv_path.write_text(good.replace(MOBILE_LINE, ""))
        env = dict(os.environ, GATEWAY_DATA_DIR=str(tmp_path))
        done = subprocess.run([sys.executable, "-m", "gateway", "reload"], env=env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr

        async def everywhere():          # every worker answers with the new version
            versions = {await _version(http, base, staff) for _ in range(8)}
            return versions and first not in versions
        assert await wait_for(everywhere, timeout=10)
        status, _, body = await call(http, "GET", base + USER, partner)
        assert status == 200 and "mobile" not in orjson.loads(body), body


MALFORMED = [
    # (file, text, replaced by): typos of the shape, not of the floors
    ("routes.yaml", "subject: {euo: euo, user: user}", "subject: [euo, user]"),
    ("roles.yaml", "gateway_api: [", "gateway_api: [{audit: 1}, "),
    ("alerts.yaml", "window: 5m", "window: [5m]"),
]


async def test_a_malformed_policy_file_is_refused_and_the_gateway_keeps_serving(
        backends, database_url, http, token_for, tmp_path, demo):
    """A policy file of the wrong shape (a list where a mapping is due) once raised a
    TypeError or AttributeError through the reload: the supervisor died with it and took
    the workers down. It is refused like a floor break, and the policy in force stays."""
    await seed_contracts(database_url, demo)
    policy, log = _own_policy(tmp_path), tmp_path / "serve.log"
    async with gateway_process(http, backends, database_url, tmp_path, "--workers", "2", log=log,
                               GATEWAY_POLICY_DIR=str(policy)) as (proc, base):
        staff = token_for("staff")
        first = await _version(http, base, staff)
        for n, (name, old, new) in enumerate(MALFORMED, 1):
            path = policy / name
            good = path.read_text()
            assert old in good
            path.write_text(good.replace(old, new, 1))

            async def refused(n=n):          # both workers and the supervisor said so
                text = log.read_text()
                return (text.count("policy reload refused") >= 2 * n
                        and text.count("supervisor keeps policy") >= n)
            for _ in range(10):              # a worker still starting has not heard the first
                proc.send_signal(signal.SIGHUP)
                if await wait_for(refused, timeout=2):
                    break
            assert await refused(), log.read_text()[-3000:]
            assert proc.poll() is None, log.read_text()[-3000:]
            assert "Traceback" not in log.read_text()
            assert name in log.read_text()
            for _ in range(4):
                assert await _version(http, base, staff) == first
            path.write_text(good)
            env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
            path.write_text(good.replace(old, new, 1))
            done = subprocess.run([sys.executable, "-m", "gateway", "policy", "test"],
                                  env=dict(env, GATEWAY_POLICY_DIR=str(policy)),
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
            assert name in done.stderr
            path.write_text(good)


async def test_reload_without_a_running_gateway_says_so(tmp_path):
    env = dict(os.environ, GATEWAY_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "gateway", "reload"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "no running `gateway serve`" in done.stderr
