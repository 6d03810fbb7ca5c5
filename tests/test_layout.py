"""The command line is one module a family of commands (gateway/cli/): every command the
parser has comes from exactly one family's COMMANDS, so a command added outside the table,
or claimed by two families, fails here; and nothing imports gateway.__main__ (the shim
`python -m gateway` runs)."""

from __future__ import annotations

import ast
from pathlib import Path

from gateway import cli

GATEWAY = Path(cli.__file__).resolve().parent.parent


def test_every_command_comes_from_one_family_of_the_table():
    top = cli.parser()
    commands = set(top._subparsers._group_actions[0].choices)
    claimed = [name for family in cli.FAMILIES for name in family.COMMANDS]
    assert sorted(claimed) == sorted(set(claimed)), "a command claimed by two families"
    assert commands == set(claimed)
    assert {"serve", "check", "demo", "migrate", "audit", "policy", "token"} <= commands


def test_every_command_runs_something():
    """Each leaf command, or a command above it, sets `run` (without it the command would
    do nothing)."""
    top = cli.parser()

    def leaves(parser, path, run):
        run = parser.get_default("run") or run
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not actions:
            yield path, run
            return
        for name, child in actions[0].choices.items():
            yield from leaves(child, (*path, name), run)
    found = list(leaves(top, (), None))
    assert len(found) > 15
    for path, run in found:
        assert callable(run), " ".join(path)


def test_nothing_imports_the_main_shim():
    for path in GATEWAY.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "__main__" and not (node.module or "").endswith(
                    "__main__"), f"{path} imports __main__"
