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
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

import asyncpg
import orjson

from .db import DATABASE_ERRORS, query
from .policy.alert_rules import RULE_WORD, AlertRule

log = logging.getLogger("gateway.alerts")

ALERT_LOCK = 0x616C_6572     # an advisory lock id ("aler"): one evaluator at a time
TAKEOVER_POLLS = 5           # another process's evaluator takes over after this many polls
                             # without a pass by the one that made the last
# a row is evaluated once this much old, by default (app.py passes the backend deadline,
# the audit commit timeout and GATEWAY_ALERT_SETTLE_S: a row's `at` is its request's start,
# committed after the backend answered)
SETTLE_S = 5.0
BATCH_ROWS = 5000            # the most new audit rows one pass reads
_PER = {"actor": 0, "partner": 1, "euo": 2}    # where a group names each key
_DB_ERRORS = DATABASE_ERRORS


def _literal(value: object) -> str:
    """A rule's value as an SQL literal: a word of the policy grammar (a measure, role or
    data set, validated at load), a clock time or ISO weekdays, else refused."""
    if value is None:
        return "null"
    if isinstance(value, time):
        return f"'{value.isoformat()}'::time"
    if isinstance(value, str) and RULE_WORD.fullmatch(value):
        return f"'{value}'"
    if isinstance(value, (tuple, list, frozenset)):
        words = [_literal(v) if isinstance(v, str) else str(int(v)) for v in sorted(value)]
        return f"array[{', '.join(words)}]"
    raise ValueError(f"not a rule value: {value!r}")


def _pass_sql(rules: tuple[AlertRule, ...]) -> str:
    """The query a pass reads its new rows with, for these rules ($1-$3 the watermark,
    $4 the settling lag, $5 BATCH_ROWS).

    It reads the rows after the watermark in index order, settled (a batch of an older time
    commits within the audit writer's deadline), at most BATCH_ROWS. Each row is matched
    with every rule once (one flag a rule: its roles, its data set and alert_counts_of,
    the one definition alert_measure counts with too; the rule's values are written in,
    so each flag is planned for its own rule) and grouped by actor, partner and EUO, the
    keys a rule counts under. One row comes back, none when nothing is new: the last row
    read (the watermark's next place), how many were read, per group touched [sub,
    partner, EUO, then per rule the rows counted and the last one's time], and per group
    [sub, partner, EUO, then per distinct_subjects rule the lists of subjects named]."""
    flags, counted, named = [], [], []
    for i, rule in enumerate(rules):
        hours = rule.working_hours
        roles = (f"actor_role = any({_literal(rule.roles)}::text[])" if rule.roles
                 else "true")
        data_set = (f"{_literal(rule.data_set)} = any(data_sets)" if rule.data_set
                    else "true")
        flags.append(
            f"{roles} and {data_set} and alert_counts_of(decision, access, method, path,"
            f" status, at, {_literal(rule.measure)}, {_literal(hours and hours.start)},"
            f" {_literal(hours and hours.end)},"
            f" {_literal(hours.weekdays) if hours else 'null'}::integer[]) as f{i}")
        counted.append(f"count(*) filter (where f{i}), max(at) filter (where f{i})")
        if rule.measure == "distinct_subjects":
            named.append(f"jsonb_agg(subject_users) filter (where f{i})")
    any_flag = " or ".join(f"f{i}" for i in range(len(rules)))
    distinct = [i for i, rule in enumerate(rules) if rule.measure == "distinct_subjects"]
    keys = "actor_sub, actor_partner, actor_euo"
    return f"""
with new as materialized (
    select at, chain_id, seq, {keys}, subject_users, phase, {", ".join(flags)}
      from audit_log
     where (at, chain_id, seq) > ($1, $2, $3) and at <= now() - make_interval(secs => $4)
     order by at, chain_id, seq
     limit $5
), counted as (
    select jsonb_build_array({keys}, {", ".join(counted)}) as g
      from new where phase is distinct from 'outcome' and ({any_flag})
     group by {keys}
), named as (
    select jsonb_build_array({keys}, {", ".join(named) or "null"}) as g
      from (select {keys}, subject_users,
                   {", ".join(f"bool_or(f{i}) as f{i}" for i in distinct) or "null"}
              from new
             where phase is distinct from 'outcome'
               and ({" or ".join(f"f{i}" for i in distinct) or "false"})
             group by {keys}, subject_users) one_each
     group by {keys}
), last as (
    select at, chain_id, seq from new order by at desc, chain_id desc, seq desc limit 1
)
select last.at, last.chain_id, last.seq, (select count(*) from new) as read,
       (select coalesce(jsonb_agg(g), '[]') from counted) as counted,
       (select coalesce(jsonb_agg(g), '[]') from named) as named
  from last"""


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
        self.pool = pool
        self.queue_event = queue_event      # (conn, payload): the alert.raised webhook
        self.observe = observe              # told each raised alert's rule (metrics)
        self.poll_s, self.settle_s = poll_s, settle_s
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"     # who made a pass
        self._baselines: dict[tuple, float | None] = {}
        self._task: asyncio.Task | None = None
        # what lets a pass skip a measure that cannot pass its limit, exactly: per (rule,
        # key), the value last measured and what the rows since can have added to it (the
        # rows counted; distinct subjects: the subjects they named, up to one more than the
        # limit). Kept only while this process is the one moving the watermark (`_mark`):
        # rows another evaluator read are not in it, so a watermark moved elsewhere empties
        # it.
        self._last: dict[tuple[str, str], int] = {}
        self._since: dict[tuple[str, str], int | set[str]] = {}
        self._mark: tuple | None = None
        # per (rule, key), the end of the latest window alerted: a window that overlaps it
        # raises nothing more, without asking (an alert, once raised, stays)
        self._alerted: dict[tuple[str, str], datetime] = {}
        self.use(rules, version)

    def use(self, rules: tuple[AlertRule, ...], version: str) -> None:
        """These rules (a reloaded policy's), from the next pass on: the pass's query and
        lookups made once here, not at each pass."""
        self.rules, self.version = rules, version
        self._sql = _pass_sql(rules) if rules else None
        self._by_name = {rule.name: rule for rule in rules}
        self._distinct = [rule for rule in rules if rule.measure == "distinct_subjects"]
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
        since = self._since.get((rule.name, key), 0)
        return last + (len(since) if isinstance(since, set) else since) > rule.limit

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
        the lock. The new rows are read and matched with the rules in PostgreSQL: what
        comes back is one line per rule and key they touched, whatever their number."""
        try:
            return await self._pass()
        except BaseException:
            self._forget()                   # what a failed pass measured may not hold
            raise

    async def _pass(self) -> int | None:
        raised: list[Any] = []
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("select pg_try_advisory_xact_lock($1)", ALERT_LOCK):
                return None
            await conn.execute(query("alert_watermark_init"), self.settle_s)
            mark = await conn.fetchrow(query("alert_watermark"), TAKEOVER_POLLS * self.poll_s)
            if mark["evaluator"] not in (None, self.name) and mark["recent"]:
                return None                  # another process is the evaluator
            if not self.rules:               # nothing to raise: nothing to read
                await conn.execute(query("alert_watermark_skip"), self.settle_s, self.name)
                self._forget()
                return 0
            here = (mark["at"], mark["chain_id"], mark["seq"])
            if self._mark != here:
                self._forget()               # another evaluator moved it: start afresh
            # the new rows in index order, read up to the batch's end and no further: never
            # all rows since the watermark sorted first, which the planner picks when it
            # takes them for few (a range to now() is guessed at 0.5 % of the table)
            await conn.execute("set local enable_sort = off")
            new = await conn.fetchrow(self._sql, mark["at"], mark["chain_id"], mark["seq"],
                                      self.settle_s, BATCH_ROWS)
            await conn.execute("set local enable_sort = on")
            if new is None:              # nothing new: this pass made all the same
                await conn.execute(query("alert_watermark_move"), *here, self.name)
                self._mark = here
                return 0
            touched: dict[tuple[str, str], datetime] = {}     # the last counted row's time
            for group in orjson.loads(new["counted"]):
                for i, rule in enumerate(self.rules):
                    rows, key = group[3 + 2 * i], group[_PER[rule.per]]
                    if rows and key is not None:
                        at = datetime.fromisoformat(group[4 + 2 * i])
                        touched[rule.name, key] = max(at, touched.get((rule.name, key), at))
                        if rule.measure != "distinct_subjects":
                            self._since[rule.name, key] = (
                                self._since.get((rule.name, key), 0) + rows)
            for group in orjson.loads(new["named"]):
                for i, rule in enumerate(self._distinct):
                    lists, key = group[3 + i], group[_PER[rule.per]]
                    if lists and key is not None:
                        named = self._since.setdefault((rule.name, key), set())
                        for subjects in lists:
                            if len(named) > rule.limit:
                                break        # past the limit already: measured
                            named.update(subjects)
            for (name, key), at in touched.items():
                rule = self._by_name[name]
                alerted = self._alerted.get((name, key))
                if alerted is not None and alerted > at - rule.window:
                    continue                 # this window already alerted, known here
                if not self._may_pass(rule, key):
                    continue                 # cannot be above its limit: nothing to ask
                alert, observed = await self._measure(conn, rule, key, at)
                self._last[name, key] = observed
                self._since.pop((name, key), None)
                if alert is not None:
                    raised.append(alert)
            await conn.execute(query("alert_watermark_move"), new["at"], new["chain_id"],
                               new["seq"], self.name)
            self._mark = (new["at"], new["chain_id"], new["seq"])
            if len(self._last) > 100_000:    # keys seen long ago: measured again when seen
                self._forget()
                self._alerted.clear()
                self._mark = (new["at"], new["chain_id"], new["seq"])
        for alert in raised:             # committed: known here from now on
            self._alerted[alert["rule"], alert["key"]] = alert["observed_to"]
            log.warning("alert %s raised: %s %s observed %s (limit %s)", alert["id"],
                        alert["rule"], alert["key"], alert["observed"], alert["limit_value"])
            if self.observe:
                self.observe(alert["rule"])
        return new["read"]

    async def _measure(self, conn, rule: AlertRule, key: str, at: datetime):
        """(the alert raised or None, the value observed; unknown: above the limit)."""
        start = at - rule.window
        alerted = await conn.fetchval(query("alert_recent"), rule.name, key, start)
        if alerted is not None:
            self._alerted[rule.name, key] = alerted
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
