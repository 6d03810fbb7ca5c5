"""The auditor's early warning: alerts.yaml's rules, loaded and checked as policy.

A rule measures one thing per actor (or per organisation: the actor's partner or EUO) over a
sliding window of the audit log — distinct data subjects touched, rows of one data set,
refusals, break-glass grants, calls outside working hours — and raises an alert when the
value passes a fixed limit and, when the rule has a baseline, also `factor` times the
median of the actor's role peers over `baseline.days` days.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import yaml

from .catalog import Catalog, PolicyError
from .db import DATABASE_ERRORS, query

log = logging.getLogger("gateway.alerts")

ALERTS_FILE = "alerts.yaml"
MEASURES = ("distinct_subjects", "rows", "refusals", "break_glass", "off_hours")
PER = ("actor", "partner", "euo")
RULE_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
_DURATION = re.compile(r"([1-9][0-9]{0,4})([mhd])")
_UNIT = {"m": "minutes", "h": "hours", "d": "days"}
_CLOCK = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
MAX_WINDOW = timedelta(days=31)
MAX_BASELINE_DAYS = 90
_KEYS = {"name", "description", "measure", "per", "window", "limit", "baseline", "data_set",
         "roles", "working_hours"}


@dataclass(frozen=True)
class Baseline:
    factor: float       # the value must pass factor × the peers' median too
    days: int           # over how many days before the window the peers' median is taken


@dataclass(frozen=True)
class WorkingHours:
    start: time         # UTC; a call at or after `end` or before `start` is outside them
    end: time
    weekdays: tuple[int, ...]    # ISO weekdays (1 = Monday) that are working days


@dataclass(frozen=True)
class AlertRule:
    name: str
    description: str
    measure: str
    per: str
    window: timedelta
    limit: int
    baseline: Baseline | None = None
    data_set: str | None = None          # rows: the data set counted (others: a filter)
    roles: frozenset[str] = frozenset()  # empty: every role's actors
    working_hours: WorkingHours | None = None

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "measure": self.measure,
            "per": self.per, "window_seconds": int(self.window.total_seconds()),
            "limit": self.limit,
            "baseline": ({"factor": self.baseline.factor, "days": self.baseline.days}
                         if self.baseline else None),
            "data_set": self.data_set, "roles": sorted(self.roles),
        }


def load_alert_rules(policy_dir: Path, catalog: Catalog) -> tuple[AlertRule, ...]:
    """alerts.yaml's rules; PolicyError naming the rule and what is wrong. The file is
    required (settings.POLICY_FILES): a directory without it would silently watch nothing;
    `rules: []` says so on purpose."""
    path = Path(policy_dir) / ALERTS_FILE
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PolicyError(f"cannot read {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PolicyError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise PolicyError(f"{ALERTS_FILE}: expected a mapping with a `rules:` list")
    if set(doc) - {"rules"}:
        raise PolicyError(f"{ALERTS_FILE}: unknown top-level keys {sorted(set(doc) - {'rules'})}")
    rules, seen = [], set()
    for n, raw in enumerate(doc["rules"], 1):
        rule = _rule(n, raw, catalog)
        if rule.name in seen:
            raise PolicyError(f"{ALERTS_FILE}: rule {rule.name} is defined twice")
        seen.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def _rule(n: int, raw: Any, catalog: Catalog) -> AlertRule:
    where = f"{ALERTS_FILE}: rule {n}"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not RULE_NAME.fullmatch(name):
        raise PolicyError(f"{where}: name must be lower-case letters, digits and _ "
                          "(at most 48), starting with a letter")
    where = f"{ALERTS_FILE}: rule {name}"
    if set(raw) - _KEYS:
        raise PolicyError(f"{where}: unknown keys {sorted(set(raw) - _KEYS)}")
    description = raw.get("description", "")
    if not isinstance(description, str) or len(description) > 500:
        raise PolicyError(f"{where}: description must be text of at most 500 characters")
    measure = raw.get("measure")
    if measure not in MEASURES:
        raise PolicyError(f"{where}: measure must be one of {', '.join(MEASURES)}")
    per = raw.get("per", "actor")
    if per not in PER:
        raise PolicyError(f"{where}: per must be one of {', '.join(PER)}")
    window = _duration(where, "window", raw.get("window"))
    if window > MAX_WINDOW:
        raise PolicyError(f"{where}: window may be at most 31d")
    limit = raw.get("limit")
    if type(limit) is not int or not 1 <= limit <= 10 ** 9:
        raise PolicyError(f"{where}: limit must be a whole number from 1 to 10^9")
    data_set = raw.get("data_set")
    if data_set is not None and (not isinstance(data_set, str)
                                 or data_set not in catalog.data_sets):
        raise PolicyError(f"{where}: data_set {data_set!r} is not in datasets.yaml")
    if measure == "rows" and data_set is None:
        raise PolicyError(f"{where}: measure rows needs a data_set")
    roles = raw.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise PolicyError(f"{where}: roles must be a list of role names")
    unknown = sorted(set(roles) - set(catalog.roles))
    if unknown:
        raise PolicyError(f"{where}: roles {unknown} are not in roles.yaml")
    if raw.get("baseline") is not None and per != "actor":
        raise PolicyError(f"{where}: a baseline compares an actor with its role peers: "
                          "only with per: actor")
    hours = raw.get("working_hours")
    if (measure == "off_hours") != (hours is not None):
        raise PolicyError(f"{where}: working_hours is required by measure off_hours "
                          "and allowed only there")
    return AlertRule(name, description, measure, per, window, limit,
                     _baseline(where, raw.get("baseline")), data_set, frozenset(roles),
                     _working_hours(where, hours) if hours is not None else None)


def _duration(where: str, key: str, value: Any) -> timedelta:
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise PolicyError(f"{where}: {key} must be a duration such as 15m, 1h or 7d")
    return timedelta(**{_UNIT[match[2]]: int(match[1])})


def _baseline(where: str, raw: Any) -> Baseline | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"factor", "days"}:
        raise PolicyError(f"{where}: baseline must be a mapping of factor and days")
    factor, days = raw.get("factor"), raw.get("days", 30)
    if type(factor) not in (int, float) or not 1 <= factor <= 1000:
        raise PolicyError(f"{where}: baseline.factor must be a number from 1 to 1000")
    if type(days) is not int or not 1 <= days <= MAX_BASELINE_DAYS:
        raise PolicyError(f"{where}: baseline.days must be a whole number from 1 to "
                          f"{MAX_BASELINE_DAYS}")
    return Baseline(float(factor), days)


def _working_hours(where: str, raw: Any) -> WorkingHours:
    if not isinstance(raw, dict) or set(raw) - {"start", "end", "weekdays"}:
        raise PolicyError(f"{where}: working_hours must be a mapping of start, end "
                          "and weekdays")
    times = []
    for key in ("start", "end"):
        value = raw.get(key)
        match = _CLOCK.fullmatch(value) if isinstance(value, str) else None
        if not match:
            raise PolicyError(f"{where}: working_hours.{key} must be a UTC time HH:MM "
                              "(quoted)")
        times.append(time(int(match[1]), int(match[2])))
    if times[0] >= times[1]:
        raise PolicyError(f"{where}: working_hours.start must be before end")
    weekdays = raw.get("weekdays", [1, 2, 3, 4, 5])
    if (not isinstance(weekdays, list) or not weekdays
            or not all(type(d) is int and 1 <= d <= 7 for d in weekdays)):
        raise PolicyError(f"{where}: working_hours.weekdays must list ISO weekdays "
                          "(1 = Monday … 7 = Sunday)")
    return WorkingHours(times[0], times[1], tuple(sorted(set(weekdays))))


# --- the evaluator ---------------------------------------------------------------------

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

    def use(self, rules: tuple[AlertRule, ...], version: str) -> None:
        """A reloaded policy's rules, from the next pass on."""
        self.rules, self.version = rules, version
        self._baselines.clear()

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
            for (rule, key), at in touched.items():
                alert = await self._measure(conn, rule, key, at)
                if alert is not None:
                    raised.append(alert)
            last = rows[-1]
            await conn.execute(query("alert_watermark_move"), last["at"], last["chain_id"],
                               last["seq"])
        for alert in raised:
            log.warning("alert %s raised: %s %s observed %s (limit %s)", alert["id"],
                        alert["rule"], alert["key"], alert["observed"], alert["limit_value"])
            if self.observe:
                self.observe(alert["rule"])
        return len(rows)

    async def _measure(self, conn, rule: AlertRule, key: str, at: datetime):
        start = at - rule.window
        if await conn.fetchval(query("alert_recent"), rule.name, key, start):
            return None                      # this window already alerted
        hours = rule.working_hours
        wh = (hours.start, hours.end, list(hours.weekdays)) if hours else (None, None, None)
        m = await conn.fetchrow(query("alert_measure"), rule.per, key, start, at, rule.measure,
                                rule.data_set, sorted(rule.roles) or None, *wh)
        if m["observed"] <= rule.limit:
            return None
        baseline = None
        if rule.baseline is not None:
            if m["actor_role"] is None:
                return None                  # an anonymous caller has no role peers
            baseline = await self._baseline(conn, rule, m["actor_role"], key, start, wh)
            if baseline is not None and m["observed"] <= rule.baseline.factor * baseline:
                return None
        alert = await conn.fetchrow(
            query("alert_raise"), rule.name, rule.per, key, start, start, at, m["observed"],
            rule.limit, baseline, rule.baseline.factor if rule.baseline else None,
            m["actor_sub"], m["actor_role"], m["actor_partner"], m["actor_euo"],
            list(m["subject_euos"]), audit_link(rule, key, start, at), self.version)
        if alert is not None and self.queue_event is not None:
            await self.queue_event(conn, {"alert": public(alert)})
        return alert

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
