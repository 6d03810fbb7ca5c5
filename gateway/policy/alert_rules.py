"""alerts.yaml's rules, loaded and checked as policy. A rule measures one thing per actor
(or per organisation: the actor's partner or EUO) over a sliding window of the audit log —
distinct data subjects touched, rows of one data set, refusals, break-glass grants, calls
outside working hours — with a fixed limit and, optionally, a baseline of the actor's role
peers. alerts.py evaluates them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time, timedelta
from pathlib import Path
from typing import Any

import yaml

from .catalog import Catalog, PolicyError

ALERTS_FILE = "alerts.yaml"
MEASURES = ("distinct_subjects", "rows", "refusals", "break_glass", "off_hours")
PER = ("actor", "partner", "euo")
RULE_NAME = re.compile(r"[a-z][a-z0-9_]{0,47}")
# a role or data set a rule names, as the evaluator writes it into its query (a literal,
# alerts._literal): every role name (an identifier) fits; a data set named with a quote,
# a backslash or a space is refused here, at load, not by the evaluator at start or reload
RULE_WORD = re.compile(r"[\w.:@-]{1,128}")
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
    if data_set is not None and not RULE_WORD.fullmatch(data_set):
        raise PolicyError(f"{where}: data_set {data_set!r} cannot be named by a rule: only "
                          "names of letters, digits and _ . : @ - can")
    if measure == "rows" and data_set is None:
        raise PolicyError(f"{where}: measure rows needs a data_set")
    roles = raw.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise PolicyError(f"{where}: roles must be a list of role names")
    unknown = sorted(set(roles) - set(catalog.roles))
    if unknown:
        raise PolicyError(f"{where}: roles {unknown} are not in roles.yaml")
    if odd := sorted(r for r in roles if not RULE_WORD.fullmatch(r)):
        raise PolicyError(f"{where}: roles {odd} cannot be named by a rule")
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
