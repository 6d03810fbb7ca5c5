"""`gateway report`: a month's report of an EUO or a partner's customers (gateway/audit/
report.py), from the database, as the Provider's operator sees it."""

from __future__ import annotations

import sys
from pathlib import Path

from ..database import with_database
from ..settings import ConfigError

COMMANDS = ("report",)


def register(sub) -> None:
    rep = sub.add_parser("report", help="a month's report of an EUO or of a partner's "
                         "customers: accesses by role and data set, refusals, break-glass, "
                         "data-subject requests and their deadlines, alerts (JSON, CSV or HTML)")
    rep.add_argument("--month", required=True, help="YYYY-MM (UTC)")
    rep.add_argument("--euo", help="the EUO the report is about")
    rep.add_argument("--partner", help="the partner whose customers it is about")
    rep.add_argument("--format", choices=("html", "csv", "json"), default="html")
    rep.add_argument("--out", type=Path, help="write it here (default: standard output)")
    rep.set_defaults(run=_report)


def _report(settings, args) -> int:
    from ..audit.report import month_window, monthly, render
    from ..errors import Denied
    if args.euo is None and args.partner is None:
        raise ConfigError("name the report's --euo or --partner")
    try:
        month_window(args.month)
    except Denied as e:
        raise ConfigError(f"--month: {e.message}") from None

    async def run(dsn: str) -> int:
        import asyncpg
        conn = await asyncpg.connect(dsn)
        try:
            body, _ = render(await monthly(conn, args.month, args.euo, args.partner), args.format)
        finally:
            await conn.close()
        if args.out:
            args.out.write_bytes(body)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(body.decode())
        return 0
    return with_database(settings, run)
