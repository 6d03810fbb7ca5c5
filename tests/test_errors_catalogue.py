"""One catalogue of reason ids: every id the code raises is in it, the status comes from
it (Denied(code, message) takes no status of its own), and the docs' error table lists
exactly the catalogue."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from gateway.errors import REASONS, Denied

ROOT = Path(__file__).resolve().parent.parent


def _raised() -> set[str]:
    """The reason id of every Denied(...) literal in gateway/."""
    found = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                continue
            args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
            if node.func.id == "Denied" and args and isinstance(args[0], str):
                found.add(args[0])
    return found


def test_every_raised_reason_is_catalogued():
    raised = _raised()
    assert len(raised) > 30
    assert raised <= set(REASONS), sorted(raised - set(REASONS))


def test_a_refusal_takes_its_status_from_the_catalogue_and_an_unknown_id_is_a_bug():
    assert Denied("contracts_unavailable", "x").status == 503
    assert Denied("bad_filter", "x").status == 400
    with pytest.raises(ValueError, match="not a reason id"):
        Denied("no_such_reason", "x")


def test_the_readme_lists_every_reason():
    readme = (ROOT / "docs" / "gateway-api.md").read_text()      # its Errors table
    listed = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", readme, flags=re.M))
    assert {k: int(v) for k, v in listed.items()} == {k: v[0] for k, v in REASONS.items()}
