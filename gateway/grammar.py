"""The grammars of values a caller may send: identifiers, free text, and the typed values
of routes.yaml's `grammars:` (patterns, RFC 3339 times, bounded integers, enums, cursors)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

# as routes.yaml's `identifier` grammar; `.` and `..` alone are refused besides
IDENTIFIER = re.compile(r"[A-Za-z0-9._~@:-]{1,128}")
# C0 and C1 controls but tab and newlines, DEL, and the bidirectional overrides and
# isolates (text that displays other than it reads)
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
MAX_TEXT = 10_000

# What may enter an audit row as text: no NUL (PostgreSQL's text cannot hold it), no other
# control or bidirectional character, no lone surrogate (not UTF-8), and bounded
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")
MAX_NAME = 256


def audit_text(value: str, limit: int = MAX_NAME) -> str:
    """`value` as an audit row may hold it: characters outside the grammar written as
    \\uXXXX escapes, cut to `limit` characters (marked with "…")."""
    if len(value) <= limit and not _UNSAFE.search(value):
        return value              # the common case: one scan, no copy
    escaped = _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    return escaped if len(escaped) <= limit else escaped[:limit - 1] + "…"

# --- the typed grammars of routes.yaml (path and query values, declared body values) -----
#
# Each turns a value as the client (or backend) sent it into the form the gateway forwards,
# or None when it is not one: what is forwarded is always rebuilt from what was parsed.

_SAFE = re.compile(r"[A-Za-z0-9._~-]+")       # RFC 3986 unreserved: needs no encoding
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
                      r"(?:([Zz])|([+-])(\d{2}):(\d{2}))")
_DIGITS = re.compile(r"0|[1-9][0-9]{0,17}")
# the escapes a client's URL library may use inside a time (`:` and `+`); no other is read
_TIME_ESCAPES = re.compile(r"%(3[Aa]|2[Bb])")


@dataclass(frozen=True)
class Pattern:
    """Text fully matching a regular expression, forwarded as it is (never `.` or `..`)."""
    regex: re.Pattern

    def normal(self, value: str) -> str | None:
        return value if self.regex.fullmatch(value) and value not in (".", "..") else None


@dataclass(frozen=True)
class DateTime:
    """An RFC 3339 time with its offset, forwarded in UTC: YYYY-MM-DDTHH:MM:SS[.ffffff]Z."""

    def normal(self, value: str) -> str | None:
        if "%" in value:
            value = _TIME_ESCAPES.sub(lambda m: chr(int(m[1], 16)), value)
        m = _RFC3339.fullmatch(value)
        if m is None:
            return None
        year, month, day, hour, minute, second, fraction, _z, sign, oh, om = m.groups()
        try:
            offset = timedelta(0) if sign is None else \
                (-1 if sign == "-" else 1) * timedelta(hours=int(oh), minutes=int(om))
            at = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                          int((fraction or "0")[:6].ljust(6, "0")), tzinfo=timezone(offset))
            at = at.astimezone(UTC)
        except (ValueError, OverflowError):    # 31 February, 24:00, an offset of 24 h, …
            return None
        fraction = f".{at.microsecond:06d}" if at.microsecond else ""
        return (f"{at.year:04d}-{at.month:02d}-{at.day:02d}T{at.hour:02d}:{at.minute:02d}:"
                f"{at.second:02d}{fraction}Z")


@dataclass(frozen=True)
class Integer:
    """A decimal integer within [low, high], forwarded without sign or leading zeros."""
    low: int
    high: int

    def normal(self, value: str) -> str | None:
        if not _DIGITS.fullmatch(value) or not self.low <= int(value) <= self.high:
            return None
        return value


@dataclass(frozen=True)
class Enum:
    """One of a fixed list of words."""
    values: frozenset[str]

    def normal(self, value: str) -> str | None:
        return value if value in self.values else None


@dataclass(frozen=True)
class Cursor:
    """An opaque page token: 1 to max_length characters of A–Z a–z 0–9 - _ . ~ (base64url
    without padding fits), forwarded as it is."""
    max_length: int

    def normal(self, value: str) -> str | None:
        if len(value) > self.max_length or not _SAFE.fullmatch(value) or value in (".", ".."):
            return None
        return value


Grammar = Pattern | DateTime | Integer | Enum | Cursor
SAFE_WORD = _SAFE
