"""The grammars of values a caller may send: identifiers and free text."""

from __future__ import annotations

import re

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
