"""`gateway serve --workers N`: several processes share one port, each with its own chains
(one per audit lane; with one lane, one chain per worker)."""

from __future__ import annotations

import signal

from .conftest import call, gateway_process, wait_for


async def test_workers_share_the_port_and_keep_separate_chains(backends, database_url, http,
                                                               token_for, db, tmp_path):
    async with gateway_process(http, backends, database_url, tmp_path, "--workers", "2",
                               GATEWAY_AUDIT_LANES="1") as (proc, base):
        ids = []

        async def both_workers_answered():
            # a new connection each time, so the kernel spreads them over the workers
            # (the second worker may still be starting when the first answers /healthz)
            for _ in range(20):
                status, headers, _ = await call(http, "GET", base + "/telephony/euos/euo-acme",
                                                token_for("staff"), headers={"Connection": "close"})
                assert status == 200
                ids.append(headers["X-Request-Id"])
            return await db.fetchval("select count(distinct chain_id) from audit_log "
                                     "where request_id = any($1::text[])", ids) >= 2
        assert await wait_for(both_workers_answered, timeout=20)
        chains = await db.fetchval(
            "select count(distinct chain_id) from audit_log where request_id = any($1::text[])", ids)
        assert chains == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
