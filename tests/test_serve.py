"""`gateway serve --workers N`: several processes share one port, each with its own chains
(one per audit lane; with one lane, one chain per worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from .conftest import AUDIENCE, ISSUER, SECRET, call, wait_for


async def test_workers_share_the_port_and_keep_separate_chains(backends, database_url, http,
                                                               token_for, db, tmp_path):
    port = 19000 + os.getpid() % 1000
    env = dict(os.environ, GATEWAY_DATABASE_URL=database_url, GATEWAY_LISTEN=f"127.0.0.1:{port}",
               GATEWAY_UPSTREAM_TELEPHONY=backends["urls"]["telephony"],
               GATEWAY_UPSTREAM_MEETING=backends["urls"]["meeting"], GATEWAY_JWT_SECRET=SECRET,
               GATEWAY_JWT_ISSUER=ISSUER, GATEWAY_JWT_AUDIENCE=AUDIENCE,
               GATEWAY_DATA_DIR=str(tmp_path), GATEWAY_AUDIT_LANES="1")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--workers", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        async def up():
            try:
                return (await call(http, "GET", base + "/healthz"))[0] == 200
            except OSError:
                return False
        assert await wait_for(up, timeout=30)
        ids = []
        for _ in range(60):
            # a new connection each time, so the kernel spreads them over the workers
            status, headers, _ = await call(http, "GET", base + "/telephony/euos/euo-acme",
                                            token_for("staff"), headers={"Connection": "close"})
            assert status == 200
            ids.append(headers["X-Request-Id"])
        chains = await db.fetchval(
            "select count(distinct chain_id) from audit_log where request_id = any($1::text[])", ids)
        assert chains == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
