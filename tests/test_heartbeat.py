"""The deployment's one heartbeat (gateway/listener.py): of every process's listener, only
the one holding the advisory lock beats; when it dies another takes over, and no mirror
goes past its staleness bound meanwhile.

Each `Listener` here stands for a process (a connection, a lock and a mirror of its own), on
a database of its own so that no other test's gateway is part of this deployment.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest_asyncio

from gateway.listener import HEARTBEAT_CHANNEL, Listener

from .conftest import own_database
from .test_notified import GatedMirror, until

STALENESS_S = 2.0
BEAT_EVERY_S = STALENESS_S / 4


@pytest_asyncio.fixture
async def deployment_db(database_url, template_database):
    async with own_database(database_url, template_database) as dsn:
        yield dsn


@contextlib.asynccontextmanager
async def heartbeats(dsn: str):
    """Every heartbeat notified, as (loop time heard, sender)."""
    heard: list[tuple[float, str]] = []
    loop = asyncio.get_running_loop()
    watcher = await asyncpg.connect(dsn)
    await watcher.add_listener(HEARTBEAT_CHANNEL,
                               lambda *args: heard.append((loop.time(), args[3].split()[1])))
    try:
        yield heard
    finally:
        watcher.terminate()


async def process(dsn: str, pool) -> tuple[Listener, GatedMirror]:
    listener = Listener(dsn, staleness_s=STALENESS_S)
    cache = GatedMirror(pool, listener, STALENESS_S)
    await cache.start()
    return listener, cache


async def test_one_process_beats_and_another_takes_over_within_the_bound(deployment_db):
    loop = asyncio.get_running_loop()
    pool = await asyncpg.create_pool(deployment_db, min_size=1, max_size=2)
    processes = []
    async with heartbeats(deployment_db) as heard:
        try:
            for _ in range(3):
                processes.append(await process(deployment_db, pool))
            await until(lambda: any(p[0].sender for p in processes), timeout=STALENESS_S)
            # a window of 2 s: beats from the sender only, one per interval
            start = loop.time()
            await asyncio.sleep(2.0)
            window = [sender for at, sender in heard if at >= start]
            assert len(set(window)) == 1 and len(window) <= 2.0 / BEAT_EVERY_S + 1, window
            assert [p[0].sender for p in processes].count(True) == 1
            assert all(p[1].stale_reason() is None for p in processes)

            # the sender dies: its connection ends, and with it the lock
            dead = next(p for p in processes if p[0].sender)
            processes.remove(dead)
            worst = 0.0

            async def watch():
                nonlocal worst
                while True:
                    worst = max(worst, *(p[1].staleness() for p in processes))
                    await asyncio.sleep(0.01)
            watching = asyncio.create_task(watch())
            killed_at = loop.time()
            await dead[1].close()
            await dead[0].close()
            await until(lambda: any(at > killed_at and sender != dead[0]._token
                                    for at, sender in heard), timeout=STALENESS_S)
            took_over = next(at for at, sender in heard if at > killed_at) - killed_at
            assert took_over < STALENESS_S
            # the first beat heard may be a rescue from a process that did not get the lock
            # (the dead one's session had not ended yet) while the other got it later: by
            # design. The window starts once the lock's new holder has been heard
            await until(lambda: any(p[0].sender for p in processes), timeout=STALENESS_S)
            (new,) = [p for p in processes if p[0].sender]
            await until(lambda: any(at > killed_at and sender == new[0]._token
                                    for at, sender in heard), timeout=STALENESS_S)
            start = loop.time()
            await asyncio.sleep(1.5)
            watching.cancel()
            assert worst < STALENESS_S, worst
            window = [sender for at, sender in heard if at >= start]
            assert set(window) == {new[0]._token}, window
            assert [p[0].sender for p in processes].count(True) == 1
        finally:
            for listener, cache in processes:
                await cache.close()
                await listener.close()
            await pool.close()
