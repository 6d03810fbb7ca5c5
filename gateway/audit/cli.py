"""`gateway audit verify | prune | query`: the operator's side of the audit log."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
from multidict import MultiDict

from ..db import migrate, query
from ..errors import Denied
from ..settings import Settings
from .api import PUBLIC_FIELDS, _cell, parse_filters, public
from .chain import verify


async def run(dsn: str, settings: Settings, args) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        if args.audit_command == "verify":
            report = await verify(conn)
            print(orjson.dumps(report.public(), option=orjson.OPT_INDENT_2).decode())
            return 0 if report.ok else 1
        if args.audit_command == "prune":
            days = args.older_than if args.older_than is not None else settings.audit_retention_days
            cutoff = datetime.now(UTC) - timedelta(days=days)
            dropped = await conn.fetch(query("audit_prune"), cutoff, args.dry_run)
            verb = "would drop" if args.dry_run else "dropped"
            for r in dropped:
                print(f"{verb} {r['partition']} (rows before {r['ends'].date()})")
            if not dropped:
                print(f"no partition ends before {cutoff.date()} ({days} days ago)")
            return 0
        return await _query(conn, args)
    finally:
        await conn.close()


async def _query(conn: asyncpg.Connection, args) -> int:
    params = MultiDict({k: v for k, v in (
        ("actor", args.actor), ("subject_user", args.subject_user), ("euo", args.euo),
        ("dataset", args.dataset), ("decision", args.decision), ("from", getattr(args, "from")),
        ("to", args.to), ("limit", args.limit)) if v is not None})
    try:
        filters = parse_filters(params, download=True)
    except Denied as e:
        print(f"gateway audit query: {e.message}", file=sys.stderr)
        return 2
    out = csv.writer(sys.stdout) if args.format == "csv" else None
    if out:
        out.writerow(PUBLIC_FIELDS)
    async with conn.transaction():
        async for record in conn.cursor(query("audit_query"), *filters.args(None, None)):
            item = public(record)
            if out:
                out.writerow([_cell(item[f]) for f in PUBLIC_FIELDS])
            else:
                sys.stdout.write(orjson.dumps(item).decode() + "\n")
    return 0
