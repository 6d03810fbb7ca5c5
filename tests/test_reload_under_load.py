"""A policy reload under load: the files are read and checked off the event loop, only the
swap runs on it, so requests go on being answered and the mirrors stay fresh throughout."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import time

import orjson

from gateway.app import create_app, reload_policy
from gateway.demo.run import seed_contracts, start_site

from .conftest import call, gateway_settings

ALICE = "/telephony/euos/euo-acme/users/u-alice"
MOBILE_LINE = "p, partner, contracted_partner, user_mobile, read\n"


class LoopProbe:
    """How long the event loop went at a stretch without coming back to a 5 ms timer: in
    the loop thread's CPU time (what the loop itself was busy doing: a load run on the loop
    shows in full, the machine's other processes do not) and in wall time (reported)."""

    def __init__(self):
        self.busy_s = self.late_s = 0.0
        self.ticks = 0

    async def run(self) -> None:
        while True:
            cpu, wall = time.thread_time(), time.monotonic()
            await asyncio.sleep(0.005)
            self.busy_s = max(self.busy_s, time.thread_time() - cpu)
            self.late_s = max(self.late_s, time.monotonic() - wall - 0.005)
            self.ticks += 1


async def test_a_reload_under_load_never_blocks_the_loop_nor_answers_503(
        backends, database_url, http, token_for, demo, policy_dir):
    """Four partners call without pause while the policy is reloaded twice (a policy directory
    that takes some 0.4 s of CPU to read: its routes.yaml ends in a long comment, which the
    YAML reader walks character by character). Requests are answered while it loads, none
    with anything but 200, the loop is never busy for 100 ms at a stretch, and each reload
    is in force after."""
    await seed_contracts(database_url, demo)
    routes = policy_dir / "routes.yaml"
    routes.write_text(routes.read_text() + "".join(
        f"# a long comment, line {i:05d}: {'x' * 60}\n" for i in range(5_000)))
    csv_path = policy_dir / "policy.csv"
    with_mobile = csv_path.read_text()
    assert MOBILE_LINE in with_mobile
    app = create_app(gateway_settings(backends["urls"], policy_dir=policy_dir), database_url)
    runner, port = await start_site(app, "127.0.0.1", 0)
    gw, partner = f"http://127.0.0.1:{port}", token_for("partner")
    statuses: collections.Counter[int] = collections.Counter()
    mobiles: list[bool] = []

    async def partner_calls() -> None:
        while True:
            status, _, body = await call(http, "GET", gw + ALICE, partner)
            statuses[status] += 1
            if status == 200:
                mobiles.append("mobile" in orjson.loads(body))

    probe = LoopProbe()
    # the test process's own heap (pytest, hypothesis, every module's fixtures) is not the
    # gateway's: `gateway serve` freezes what start-up built (app._settle_gc), so a full
    # collection there is small; here it would be one long callback that is not the reload
    gc.disable()
    tasks = [asyncio.create_task(probe.run()), *(asyncio.create_task(partner_calls())
                                                 for _ in range(4))]
    try:
        while sum(statuses.values()) < 20:          # under way before the first reload
            await asyncio.sleep(0.05)
        for text, mobile in ((with_mobile.replace(MOBILE_LINE, ""), False), (with_mobile, True)):
            csv_path.write_text(text)
            answered, ticks = sum(statuses.values()), probe.ticks
            assert await reload_policy(app, policy_dir)
            assert sum(statuses.values()) > answered and probe.ticks > ticks  # served meanwhile
            mobiles.clear()
            while len(mobiles) < 8:
                await asyncio.sleep(0.01)
            assert set(mobiles[4:]) == {mobile}      # the new policy decides
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        gc.enable()
        await runner.cleanup()
    assert set(statuses) == {200}, statuses
    assert probe.busy_s < 0.1, (f"the loop was busy {probe.busy_s * 1000:.0f} ms at a stretch "
                                f"(late {probe.late_s * 1000:.0f} ms)")
