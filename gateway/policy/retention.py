"""Retention as data: each data set's machine-readable retention (`retention_rule:` in
datasets.yaml, next to the seed's wording), the cut-off times of one request, and the
report of what backends served past retention.

A rule is one of

    {keep: 180 days}                         counted from each element's own time (the
                                             route table's `age:` field of its object)
    {anchor: sent, keep: 0 days}             the same, the element's time being when it was sent
    {anchor: contract_end, keep: 6 months}   the whole data set of an EUO goes that long
                                             after the EUO's contract ended (contracts mirror)
    {anchor: paid_until, keep: 360 days}     after the account's paid period: the gateway
                                             holds no payment dates, so it cuts nothing
    {anchor: never_stored}                   never held: whatever a backend answers is past
    {anchor: user_exists} / {anchor: organizer_deletes}
                                             held while the user exists / until the organizer
                                             deletes: no time for the gateway to enforce

plus, optionally, `anonymise_after: 90 days` (from the element's own time: the fields the
route table's `mask:` names lose their last 3 digits) and `user_may_keep: true` (the seed
says "by default": a user may choose to keep them, which the gateway cannot see, so it
cuts nothing). Rules are checked at policy load; a bad one refuses the policy.

Per request the route's own list of rules (made at load) is turned once into cut-off
times (`cutoffs`): no lookup grows with the policy, and each element costs one time parse.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

ANCHORS = ("contract_end", "paid_until", "sent", "never_stored", "user_exists",
           "organizer_deletes")
ELEMENT_ANCHORS = (None, "sent")            # counted from the element's own time
UNBOUNDED = ("user_exists", "organizer_deletes")
_DURATION = re.compile(r"\s*(\d{1,5})\s*(day|days|month|months|year|years)\s*")

# whether the data subject's own export is exempt: no (docs/policy.md, Retention)
OWN_EXPORT_EXEMPT = False
OWN_EXPORT_DECISION = (
    "Retention applies to every role, the data subject's own reads and export included. "
    "The seed words each limit as deletion ('deleted immediately after sending', 'not "
    "stored', 'automatically deleted after at most 180 days', 'contract + 6 months'): past "
    "it the Provider has promised the data no longer exists, and old records hold other "
    "people's data too (the numbers a user called, a fax's peer). The audit row of each "
    "request records how many elements were withheld for retention, and the Provider's "
    "retention report names the backends that still hold them.")


class RuleError(ValueError):
    """A retention rule that cannot be read (the message names what is wrong)."""


@dataclass(frozen=True)
class Duration:
    days: int = 0
    months: int = 0

    def before(self, t: datetime) -> datetime:
        """`t` less this long; before the calendar's first day, its first moment (earlier
        than any time an element can carry)."""
        try:
            return _add_months(t, -self.months) - timedelta(days=self.days)
        except (ValueError, OverflowError):
            return datetime.min.replace(tzinfo=t.tzinfo)

    def after(self, d: date) -> date:
        """`d` plus this long; past the calendar's last day (a contract ending 9999-12-31,
        a common "no end"), its last day: later than any today."""
        try:
            return _add_months(d, self.months) + timedelta(days=self.days)
        except (ValueError, OverflowError):
            return date.max

    def __str__(self) -> str:
        if self.months:
            return f"{self.months} months" if self.months % 12 else f"{self.months // 12} years"
        return f"{self.days} days"


def _add_months(t, months: int):
    if not months:
        return t
    index = t.year * 12 + t.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    last = (date(year + (month == 12), month % 12 + 1, 1) - timedelta(days=1)).day
    return t.replace(year=year, month=month, day=min(t.day, last))


def duration(text: Any, what: str) -> Duration:
    """`N days`, `N months` or `N years`."""
    m = _DURATION.fullmatch(str(text)) if isinstance(text, (str, int)) else None
    if m is None:
        raise RuleError(f"{what} must be 'N days', 'N months' or 'N years', not {text!r}")
    n, unit = int(m[1]), m[2]
    if unit.startswith("day"):
        return Duration(days=n)
    return Duration(months=n * (12 if unit.startswith("year") else 1))


@dataclass(frozen=True)
class Rule:
    anchor: str | None
    keep: Duration | None
    anonymise_after: Duration | None = None
    user_may_keep: bool = False

    @property
    def by_element(self) -> bool:
        """Counted from each element's own time (needs an `age:` field in the route table)."""
        return self.enforced and self.anchor in ELEMENT_ANCHORS

    @property
    def enforced(self) -> bool:
        """Whether the gateway withholds anything under this rule."""
        return not self.user_may_keep and self.anchor not in UNBOUNDED + ("paid_until",)

    @property
    def why_not_enforced(self) -> str | None:
        if self.user_may_keep:
            return ("'by default' not stored: a user may choose to keep them, which the "
                    "gateway cannot see")
        if self.anchor == "paid_until":
            return "the gateway holds no payment dates to count from"
        if self.anchor == "user_exists":
            return "held while the user exists: a backend that answers shows they do"
        if self.anchor == "organizer_deletes":
            return "held until the organizer deletes it: no time limit"
        return None

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"anchor": self.anchor,
                               "keep": str(self.keep) if self.keep else None,
                               "anonymise_after": (str(self.anonymise_after)
                                                   if self.anonymise_after else None),
                               "enforced": self.enforced,
                               "own_export_exempt": OWN_EXPORT_EXEMPT}
        if self.user_may_keep:
            out["user_may_keep"] = True
        if not self.enforced:
            out["not_enforced_because"] = self.why_not_enforced
        return out


def parse_rule(raw: Any) -> Rule:
    """A `retention_rule:` mapping as a Rule; RuleError says what is wrong."""
    if not isinstance(raw, dict):
        raise RuleError("retention_rule must be a mapping (anchor, keep, anonymise_after)")
    unknown = set(raw) - {"anchor", "keep", "anonymise_after", "user_may_keep"}
    if unknown:
        raise RuleError(f"retention_rule: unknown key(s) {sorted(unknown)}")
    anchor = raw.get("anchor")
    if anchor is not None and anchor not in ANCHORS:
        raise RuleError(f"retention_rule.anchor must be one of {', '.join(ANCHORS)}, not {anchor!r}")
    keep = duration(raw["keep"], "retention_rule.keep") if "keep" in raw else None
    if anchor in ("never_stored",) + UNBOUNDED and keep is not None:
        raise RuleError(f"retention_rule: anchor {anchor} takes no keep")
    if anchor not in ("never_stored",) + UNBOUNDED and keep is None:
        raise RuleError("retention_rule: keep is required"
                        + (f" with anchor {anchor}" if anchor else " (or an anchor)"))
    anon = raw.get("anonymise_after")
    anon = duration(anon, "retention_rule.anonymise_after") if anon is not None else None
    may_keep = raw.get("user_may_keep", False)
    if not isinstance(may_keep, bool):
        raise RuleError("retention_rule.user_may_keep must be true or false")
    return Rule(anchor, keep, anon, may_keep)


# --- one request's cut-off times ---------------------------------------------------

@dataclass(slots=True)
class Cutoffs:
    """What one request may serve: data sets past retention for this EUO as a whole, the
    oldest element time each element-aged data set may have, and when anonymisation starts.
    Elements whose time is missing or unreadable count as old (fail closed)."""
    expired: frozenset[str]                 # the whole data set is past retention
    oldest: dict[str, datetime]             # elements older than this are past retention
    anonymise_before: dict[str, datetime]   # elements older than this are anonymised

    def __bool__(self) -> bool:
        return bool(self.expired or self.oldest or self.anonymise_before)


NOTHING = Cutoffs(frozenset(), {}, {})


def cutoffs(rules: tuple[tuple[str, Rule], ...], euo: str, now: datetime,
            contract_end: Callable[[str], date | None]) -> Cutoffs:
    """The cut-offs of one request about `euo`, from the route's (data set, rule) pairs.
    `contract_end` may raise (a stale mirror: fail closed)."""
    if not rules:
        return NOTHING
    expired, oldest, anonymise = set(), {}, {}
    today = now.date()
    end: date | None | bool = False            # not looked up yet
    for name, rule in rules:
        if rule.anonymise_after is not None:
            anonymise[name] = rule.anonymise_after.before(now)
        if not rule.enforced:
            continue
        if rule.anchor == "never_stored":
            expired.add(name)
        elif rule.anchor == "contract_end":
            if end is False:
                end = contract_end(euo)
            if end is not None and today >= rule.keep.after(end):
                expired.add(name)
        else:                                   # the element's own time (none, sent)
            oldest[name] = rule.keep.before(now)
    return Cutoffs(frozenset(expired), oldest, anonymise)


def start_of(d: date) -> datetime:
    return datetime.combine(d, time(), UTC)
