"""One catalogue of reason ids: every id the code raises is listed with its status, and
the README's error table lists exactly the catalogue."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from gateway.errors import REASONS

ROOT = Path(__file__).resolve().parent.parent


def _raised() -> set[tuple[int | None, str]]:
    """(status, reason id) of every Denied(...) and _unauthorized(...) literal in gateway/."""
    found = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
            if node.func.id == "Denied" and len(args) >= 2 and isinstance(args[1], str):
                found.add((args[0], args[1]))
            if node.func.id == "_unauthorized" and args and isinstance(args[0], str):
                found.add((401, args[0]))
    return found


def test_every_raised_reason_is_catalogued_with_its_status():
    raised = _raised()
    assert len(raised) > 30
    for status, code in raised:
        assert code in REASONS, code
        assert REASONS[code][0] == status, code


def test_the_readme_lists_every_reason():
    readme = (ROOT / "docs" / "gateway-api.md").read_text()      # its Errors table
    listed = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", readme, flags=re.M))
    assert {k: int(v) for k, v in listed.items()} == {k: v[0] for k, v in REASONS.items()}
