"""`gateway retention report`: what backends served past retention."""

from __future__ import annotations

from ..database import with_database

COMMANDS = ("retention",)


def register(sub) -> None:
    retention = sub.add_parser("retention", help="what backends served past retention")
    retention_sub = retention.add_subparsers(dest="retention_command", required=True)
    rep = retention_sub.add_parser("report", help="per backend service, route and data set: "
                                   "elements withheld for retention (or anonymised), requests, "
                                   "EUOs, first and last seen; NDJSON")
    rep.add_argument("--from", dest="since",
                     help="ISO 8601 time with zone (inclusive; default 30 days before --to)")
    rep.add_argument("--to", dest="until", help="ISO 8601 time with zone (exclusive; default now)")
    rep.set_defaults(run=_report)


def _report(settings, args) -> int:
    from .. import retention_report
    return with_database(settings, lambda dsn: retention_report.cli(dsn, args.since, args.until))
