"""The alert evaluator (gateway/alerts.py) over a real audit log: it asks PostgreSQL for a
rule's value only when the rows since its last measure can have pushed it over the limit,
and that shortcut must never cost an alert; one process evaluates while it lives."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.alerts import TAKEOVER_POLLS, AlertEvaluator
from gateway.audit import AuditRow, AuditWriter
from gateway.policy.alert_rules import AlertRule

from .conftest import own_database, wait_for

RULES = (
    AlertRule(name="subjects", description="", measure="distinct_subjects", per="actor",
              window=timedelta(hours=1), limit=100),
    AlertRule(name="probing", description="", measure="refusals", per="actor",
              window=timedelta(minutes=5), limit=20),
    AlertRule(name="partner_rows", description="", measure="rows", per="partner",
              window=timedelta(hours=1), limit=5, data_set="user_name"),
)


def _row(sub: str, users: list[str], *, deny: bool = False, partner: str | None = None,
         at: datetime | None = None) -> AuditRow:
    return AuditRow(at=at or datetime.now(UTC), request_id=uuid.uuid4().hex, actor_sub=sub,
                    actor_role="partner" if partner else "provider_staff",
                    actor_partner=partner, method="GET", path="/telephony/euos/euo-acme/users",
                    service="telephony", data_sets=["user_name"], subject_euo="euo-acme",
                    subject_users=[] if deny else users, decision="deny" if deny else "allow",
                    status=403 if deny else 200, access=None if deny else "served")


@contextlib.asynccontextmanager
async def _log(database_url: str, template: str):
    """A database of its own: (a pool, a function writing audit rows)."""
    async with own_database(database_url, template) as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
        writer = AuditWriter(pool, queue_max=1000)
        writer.start()

        async def write(*rows: AuditRow) -> None:
            for row in rows:
                await writer.commit(row)
        try:
            yield pool, write
        finally:
            await writer.close()
            await pool.close()


async def _evaluated(evaluator: AlertEvaluator) -> None:
    """Passes until every row written is read."""
    while await evaluator.evaluate():
        pass


async def _alerts(pool) -> list[tuple[str, str, int]]:
    return [tuple(r) for r in await pool.fetch(
        "select rule, key, observed from alerts order by rule, key, observed")]


async def test_a_value_that_grows_over_several_passes_alerts_when_it_passes_its_limit(
        database_url, template_database):
    async with _log(database_url, template_database) as (pool, write):
        evaluator = AlertEvaluator(pool, RULES, "test", settle_s=0.0)
        await evaluator.evaluate()                   # the watermark: now
        # 15 refusals, then 6: the second pass's bound (15 + 6) passes 20, and the value does
        await write(*[_row("probe", [], deny=True) for _ in range(15)])
        await _evaluated(evaluator)
        assert await _alerts(pool) == []
        await write(*[_row("probe", [], deny=True) for _ in range(6)])
        await _evaluated(evaluator)
        assert await _alerts(pool) == [("probing", "probe", 21)]
        # 60 users, then 60 of which 30 again (90 in all: the bound passes 100, the value
        # does not), then one row naming 11 more at once
        await write(*[_row("trawl", [f"u-{n}"]) for n in range(60)])
        await _evaluated(evaluator)
        await write(*[_row("trawl", [f"u-{n}"]) for n in range(30, 90)])
        await _evaluated(evaluator)
        assert [a for a in await _alerts(pool) if a[0] == "subjects"] == []
        await write(_row("trawl", [f"u-{n}" for n in range(90, 101)]))
        await _evaluated(evaluator)
        assert ("subjects", "trawl", 101) in await _alerts(pool)
        # a partner's rows counted together, whoever of its accounts made them
        await write(*[_row(f"portal-{n % 2}", ["u-1"], partner="p-x") for n in range(6)])
        await _evaluated(evaluator)
        assert ("partner_rows", "p-x", 6) in await _alerts(pool)
        assert len(await _alerts(pool)) == 3          # each once


async def test_one_process_evaluates_while_it_lives_and_another_takes_over(
        database_url, template_database):
    async with _log(database_url, template_database) as (pool, write):
        first = AlertEvaluator(pool, RULES, "test", settle_s=0.0, poll_s=0.1)
        second = AlertEvaluator(pool, RULES, "test", settle_s=0.0, poll_s=0.1)
        assert await first.evaluate() == 0
        await write(_row("someone", ["u-1"]))
        assert await second.evaluate() is None       # the first made the last pass
        loop = asyncio.get_running_loop()
        stopped = loop.time()    # before the first's last pass began (its moved_at is later)
        assert await first.evaluate() == 1           # and then evaluates no more

        async def took_over() -> bool:
            return await second.evaluate() is not None
        assert await wait_for(took_over, timeout=10)
        assert loop.time() - stopped >= TAKEOVER_POLLS * 0.1 - 0.05   # clocks' rounding
        assert await first.evaluate() is None        # and keeps it now


class _Measuring(AlertEvaluator):
    """The evaluator without its shortcuts: every rule and key the new rows touched is
    measured in PostgreSQL at every pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._alerted = _Forgetting()

    def _may_pass(self, rule, key) -> bool:
        return True


class _Forgetting(dict):
    def __setitem__(self, key, value) -> None:
        pass


async def _both(database_url: str, template: str, chunks) -> None:
    """The same rows, in the same passes, through the evaluator and through _Measuring,
    each over a log of its own: the same alerts."""
    start = datetime.now(UTC) - timedelta(minutes=30)
    raised = []
    for evaluator_class in (AlertEvaluator, _Measuring):
        async with _log(database_url, template) as (pool, write):
            evaluator = evaluator_class(pool, SMALL, "test", settle_s=0.0)
            await pool.execute("insert into alert_watermark (at, chain_id, seq) values "
                               "($1, '00000000-0000-0000-0000-000000000000', -1)", start)
            for n, chunk in enumerate(chunks):
                at = start + timedelta(minutes=n)
                await write(*[_row(sub, users, deny=deny, partner=partner,
                                   at=at + timedelta(milliseconds=i))
                              for i, (sub, users, deny, partner) in enumerate(chunk)])
                await _evaluated(evaluator)
            raised.append(await pool.fetch(
                "select rule, key, observed, window_start from alerts order by 1, 2, 4"))
    assert raised[0] == raised[1], chunks


# the same rules with limits a few rows pass, in windows a few passes (a minute each) span
SMALL = tuple(dataclasses.replace(rule, limit=limit, window=timedelta(minutes=minutes))
              for rule, limit, minutes in zip(RULES, (6, 3, 4), (3, 2, 3), strict=True))
_ROW = st.tuples(st.sampled_from(["ann", "bo"]),
                 st.lists(st.sampled_from([f"u-{n}" for n in range(12)]), max_size=4),
                 st.booleans(), st.sampled_from([None, "p-x"]))


@pytest.mark.slow
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(chunks=st.lists(st.lists(_ROW, max_size=12), min_size=1, max_size=6))
def test_the_shortcut_never_changes_what_is_raised(database_url, template_database, chunks):
    asyncio.run(_both(database_url, template_database, chunks))


async def test_a_rule_naming_a_role_of_any_letters_is_evaluated(database_url, template_database):
    """roles.yaml takes any identifier for a role name, accented letters too; the evaluator
    writes a rule's roles into its query, and such a name failed there (ValueError when the
    evaluator was built, at start or on a reload) where it should simply count."""
    rule = AlertRule(name="checks", description="", measure="refusals", per="actor",
                     window=timedelta(minutes=5), limit=2, roles=frozenset({"prüfer"}))
    async with _log(database_url, template_database) as (pool, write):
        evaluator = AlertEvaluator(pool, (rule,), "test", settle_s=0.0)
        await evaluator.evaluate()                   # the watermark: now
        rows = [dataclasses.replace(_row("auditor-1", [], deny=True), actor_role=role)
                for role in ("prüfer", "prüfer", "pruefer", "prüfer")]
        await write(*rows)
        await _evaluated(evaluator)
        assert await _alerts(pool) == [("checks", "auditor-1", 3)]    # its role's rows only
