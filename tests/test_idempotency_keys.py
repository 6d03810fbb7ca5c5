"""Idempotency keys are remembered for a day (gateway/idempotency.py), then forgotten:
`gateway audit maintain` deletes the ones past their day with the answers they kept, so
the table holds one day of writes, not every write ever made."""

from __future__ import annotations

import asyncio

from .conftest import connected, gateway_main, own_database

ADD = """insert into idempotency_keys (actor, key, fingerprint, request_id, status, body,
                                       created_at)
         values ($1, $2, '\\x00', $2, 200, '{}', now() - make_interval(hours => $3))"""


async def test_maintain_forgets_the_keys_past_their_day_and_keeps_the_others(
        database_url, template_database):
    async with own_database(database_url, template_database) as dsn, connected(dsn) as db:
        for key, hours in (("old", 25), ("older", 24 * 40), ("fresh", 23), ("new", 0)):
            await db.execute(ADD, "user:euo-acme:u-alice", key, hours)
        env = {"GATEWAY_DATABASE_URL": dsn}
        done = await asyncio.to_thread(gateway_main, "audit", "maintain", env=env)
        assert done.returncode == 0, done
        assert "forgot 2 idempotency keys older than a day" in done.stdout
        kept = await db.fetch("select key from idempotency_keys order by key")
        assert [r["key"] for r in kept] == ["fresh", "new"]
        again = await asyncio.to_thread(gateway_main, "audit", "maintain", env=env)
        assert again.returncode == 0 and "forgot" not in again.stdout
