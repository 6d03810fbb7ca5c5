"""The grammars of values a caller may send: identifiers and free text."""

from __future__ import annotations

import re

# as routes.yaml's `identifier` grammar; `.` and `..` alone are refused besides
IDENTIFIER = re.compile(r"[A-Za-z0-9._~@:-]{1,128}")
# C0 and C1 controls but tab and newlines, DEL, and the bidirectional overrides and
# isolates (text that displays other than it reads)
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
MAX_TEXT = 10_000
