"""The command line: gateway serve | check | demo | migrate | grant | token | audit.

One module a family of commands, each with `COMMANDS` (its top-level names) and
`register(sub)`, which adds its parsers and sets `run(settings, args) -> exit status` on
each (with `needs_settings=False` for a command that reads no GATEWAY_* setting). A new
family is a module here and a line in FAMILIES."""

from __future__ import annotations

import argparse
import logging
import sys

from ..db import DatabaseUnavailable
from ..policy.catalog import PolicyError
from ..settings import ConfigError, Settings
from . import audit, database, demo, policy, report, retention, serving, token

FAMILIES = (serving, database, demo, audit, report, policy, retention, token)
NOISY = ("pgserver", "casbin", "casbin.policy", "casbin.enforcer", "casbin.role")


def parser() -> argparse.ArgumentParser:
    """Every command of every family."""
    top = argparse.ArgumentParser(prog="gateway", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "needs_settings", True):
        return args.run(None, args)
    try:
        return args.run(Settings.from_env(), args)
    except (ConfigError, PolicyError, DatabaseUnavailable) as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:     # Ctrl-C while starting: nothing to report
        return 130


if __name__ == "__main__":
    sys.exit(main())
