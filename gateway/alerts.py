"""The auditor's early warning: alerts.yaml's rules (policy/alert_rules.py) evaluated over
the audit log by one elected process.

A rule raises an alert when the value it measures passes a fixed limit and, when the rule
has a baseline, also `factor` times the median of the actor's role peers over
`baseline.days` days.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

import asyncpg

from .db import DATABASE_ERRORS, query
from .policy.alert_rules import AlertRule

log = logging.getLogger("gateway.alerts")

ALERT_LOCK = 0x616C_6572     # an advisory lock id ("aler"): one evaluator at a time
# a row is evaluated once this much older than the backend deadline and the audit commit
# timeout (app.py): a row's `at` is its request's start, committed after the backend answered
SETTLE_S = 5.0
BATCH_ROWS = 5000            # the most new audit rows one pass reads
_DB_ERRORS = DATABASE_ERRORS


def _wanted(rule: AlertRule, row: Any) -> str | None:
    """The key (actor sub, partner or EUO) under which this new row may change the rule's
    value, or None when it cannot: a cheap test in Python, so a pass asks the database
    once per rule and key touched, never per row."""
    if row["phase"] == "outcome":
        return None
    if rule.roles and row["actor_role"] not in rule.roles:
        return None
    if rule.data_set is not None and rule.data_set not in row["data_sets"]:
        return None
    if (row["decision"] == "deny") != (rule.measure == "refusals"):
        return None
    return {"actor": row["actor_sub"], "partner": row["actor_partner"],
            "euo": row["actor_euo"]}[rule.per]


def audit_link(rule: AlertRule, key: str, start: datetime, end: datetime) -> str:
    """The /v1/audit query listing the rows the rule counted (from inclusive, to exclusive)."""
    params: dict[str, str] = {}
    if rule.per == "actor":
        params["actor"] = key
    if rule.data_set:
        params["dataset"] = rule.data_set
    params["decision"] = "deny" if rule.measure == "refusals" else "allow"
    params["from"] = _iso(start)
    params["to"] = _iso(end + timedelta(microseconds=1))
    return "/v1/audit?" + urlencode(params)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def public(r: Any) -> dict[str, Any]:
    """An alert as GET /v1/alerts shows it."""
    return {
        "id": str(r["id"]), "rule": r["rule"], "per": r["per"], "key": r["key"],
        "window": {"from": _iso(r["observed_from"]), "to": _iso(r["observed_to"])},
        "observed": r["observed"], "limit": r["limit_value"], "baseline": r["baseline"],
        "factor": r["factor"],
        "actor": {"sub": r["actor_sub"], "role": r["actor_role"],
                  "partner": r["actor_partner"], "euo": r["actor_euo"]},
        "subject_euos": list(r["subject_euos"]), "audit": r["audit_query"],
        "policy_version": r["policy_version"], "raised_at": _iso(r["raised_at"]),
        "acked_at": _iso(r["acked_at"]) if r["acked_at"] else None,
        "acked_by": r["acked_by"], "ack_note": r["ack_note"],
    }


class AlertEvaluator:
    """The background pass of one process: every `poll_s`, if it wins the advisory lock,
    it reads the audit rows written since the watermark and raises the alerts they cause,
    in one transaction with the watermark's move and the webhook events: a pass that fails
    leaves nothing half done, and the next one starts from the same row."""

    def __init__(self, pool: asyncpg.Pool, rules: tuple[AlertRule, ...], version: str,
                 queue_event: Callable | None = None, observe: Callable[[str], None] | None = None,
                 poll_s: float = 1.0, settle_s: float = SETTLE_S):
        self.pool, self.rules, self.version = pool, rules, version
        self.queue_event = queue_event      # (conn, payload): the alert.raised webhook
        self.observe = observe              # told each raised alert's rule (metrics)
        self.poll_s, self.settle_s = poll_s, settle_s
        self._baselines: dict[tuple, float | None] = {}
        self._task: asyncio.Task | None = None
        # what lets a pass skip a measure that cannot pass its limit, exactly: per (rule,
        # key), the value last measured and what the rows since can have added to it (a
        # count: one per row; distinct subjects: the subjects they named). Kept only while
        # this process is the one moving the watermark (`_mark`): rows another evaluator
        # read are not in it, so a watermark moved elsewhere empties it.
        self._last: dict[tuple[str, str], int] = {}
        self._since: dict[tuple[str, str], tuple[int, set[str]]] = {}
        self._mark: tuple | None = None

    def use(self, rules: tuple[AlertRule, ...], version: str) -> None:
        """A reloaded policy's rules, from the next pass on."""
        self.rules, self.version = rules, version
        self._baselines.clear()
        self._forget()

    def _forget(self) -> None:
        self._last.clear()
        self._since.clear()
        self._mark = None

    def _may_pass(self, rule: AlertRule, key: str) -> bool:
        """Whether the rule's value for the key can be above its limit now: its last
        measure plus all the rows since could add (rows leaving the window only lower it);
        unknown: yes."""
        last = self._last.get((rule.name, key))
        if last is None:
            return True
        rows, subjects = self._since.get((rule.name, key), (0, set()))
        grown = len(subjects) if rule.measure == "distinct_subjects" else rows
        return last + grown > rule.limit

    def start(self) -> None:
        self._task = asyncio.create_task(self._running())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _running(self) -> None:
        while True:
            try:
                while await self.evaluate() == BATCH_ROWS:
                    pass                    # behind: go on at once
            except _DB_ERRORS as e:
                log.warning("alert evaluation failed, retried: %s", e)
            await asyncio.sleep(self.poll_s)

    async def evaluate(self) -> int | None:
        """One pass; the number of audit rows read, or None when another evaluator holds
        the lock."""
        raised: list[Any] = []
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("select pg_try_advisory_xact_lock($1)", ALERT_LOCK):
                return None
            await conn.execute(query("alert_watermark_init"), self.settle_s)
            mark = await conn.fetchrow(query("alert_watermark"))
            if self._mark != tuple(mark):
                self._forget()               # another evaluator moved it: start afresh
            rows = await conn.fetch(query("alert_new_rows"), mark["at"], mark["chain_id"],
                                    mark["seq"], self.settle_s, BATCH_ROWS)
            if not rows:
                return 0
            touched: dict[tuple[AlertRule, str], datetime] = {}
            for row in rows:
                for rule in self.rules:
                    key = _wanted(rule, row)
                    if key is not None:
                        touched[rule, key] = row["at"]     # the latest: rows come in order
                        count, subjects = self._since.get((rule.name, key), (0, set()))
                        if rule.measure == "distinct_subjects" and len(subjects) <= rule.limit:
                            subjects.update(row["subject_users"] or ())
                        self._since[rule.name, key] = (count + 1, subjects)
            for (rule, key), at in touched.items():
                if not self._may_pass(rule, key):
                    continue                 # cannot be above its limit: nothing to ask
                alert, observed = await self._measure(conn, rule, key, at)
                self._last[rule.name, key] = observed
                self._since.pop((rule.name, key), None)
                if alert is not None:
                    raised.append(alert)
            last = rows[-1]
            await conn.execute(query("alert_watermark_move"), last["at"], last["chain_id"],
                               last["seq"])
            self._mark = (last["at"], last["chain_id"], last["seq"])
            if len(self._last) > 100_000:    # keys seen long ago: measured again when seen
                self._forget()
                self._mark = (last["at"], last["chain_id"], last["seq"])
        for alert in raised:
            log.warning("alert %s raised: %s %s observed %s (limit %s)", alert["id"],
                        alert["rule"], alert["key"], alert["observed"], alert["limit_value"])
            if self.observe:
                self.observe(alert["rule"])
        return len(rows)

    async def _measure(self, conn, rule: AlertRule, key: str, at: datetime):
        """(the alert raised or None, the value observed; unknown: above the limit)."""
        start = at - rule.window
        if await conn.fetchval(query("alert_recent"), rule.name, key, start):
            return None, rule.limit + 1      # this window already alerted
        hours = rule.working_hours
        wh = (hours.start, hours.end, list(hours.weekdays)) if hours else (None, None, None)
        m = await conn.fetchrow(query("alert_measure"), rule.per, key, start, at, rule.measure,
                                rule.data_set, sorted(rule.roles) or None, *wh)
        observed = m["observed"]
        if observed <= rule.limit:
            return None, observed
        baseline = None
        if rule.baseline is not None:
            if m["actor_role"] is None:
                return None, observed        # an anonymous caller has no role peers
            baseline = await self._baseline(conn, rule, m["actor_role"], key, start, wh)
            if baseline is not None and observed <= rule.baseline.factor * baseline:
                return None, observed
        alert = await conn.fetchrow(
            query("alert_raise"), rule.name, rule.per, key, start, start, at, m["observed"],
            rule.limit, baseline, rule.baseline.factor if rule.baseline else None,
            m["actor_sub"], m["actor_role"], m["actor_partner"], m["actor_euo"],
            list(m["subject_euos"]), audit_link(rule, key, start, at), self.version)
        if alert is not None and self.queue_event is not None:
            await self.queue_event(conn, {"alert": public(alert)})
        return alert, observed

    async def _baseline(self, conn, rule: AlertRule, role: str, key: str,
                        start: datetime, wh) -> float | None:
        """The role peers' median over the baseline's days before the window; asked only
        when the fixed limit is passed, and kept for the day."""
        day = start.date()
        cache = (rule.name, role, key, day)
        if cache not in self._baselines:
            if len(self._baselines) > 10_000:
                self._baselines.clear()
            since = datetime.combine(day, time(), UTC) - timedelta(days=rule.baseline.days)
            until = datetime.combine(day, time(), UTC)
            self._baselines[cache] = await conn.fetchval(
                query("alert_baseline"), role, key, since, until, rule.measure, rule.data_set,
                rule.window.total_seconds(), *wh)
        return self._baselines[cache]
