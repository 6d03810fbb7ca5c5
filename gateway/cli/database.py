"""`gateway migrate`, `grant`, `check` and `contracts list`: the schema and what the
deployment is connected to."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from datetime import UTC, datetime

import asyncpg
import orjson

from ..check import (
    Deployment,
    Findings,
    check_backends,
    check_database,
    check_settings,
    effective_configuration,
)
from ..database import database_url, with_database
from ..db import DatabaseUnavailable, ensure_partitions, grant_runtime, migrate, query
from ..settings import Settings

COMMANDS = ("migrate", "grant", "check", "contracts")


def register(sub) -> None:
    check = sub.add_parser("check", help="check settings, policy, database and backends; "
                           "print the effective configuration (secrets masked); exit 2 on a "
                           "problem")
    check.add_argument("--workers", type=_at_least_one, default=1,
                       help="the deployment's `serve --workers` per pod, for the connection "
                       "budget (default 1)")
    check.add_argument("--pods", type=_at_least_one, default=1,
                       help="how many pods (hosts, instances) serve against this database, "
                       "for the connection budget (default 1)")
    check.set_defaults(run=lambda settings, args: _check(settings, args.workers, args.pods))
    sub.add_parser("migrate", help="apply the SQL migrations, create the audit partitions "
                   "ahead, and exit (as the schema's owner)"
                   ).set_defaults(run=lambda settings, args: with_database(settings, _migrate))
    grant = sub.add_parser("grant", help="grant a runtime role what `serve --no-migrate` needs "
                           "(sql/runtime_grants.sql; as the schema's owner)")
    grant.add_argument("--role", required=True, help="the runtime role's name")
    grant.set_defaults(run=lambda settings, args: with_database(
        settings, lambda dsn: _grant(dsn, args.role)))
    contracts = sub.add_parser("contracts", help="the partner <-> EUO contracts")
    contracts_sub = contracts.add_subparsers(dest="contracts_command", required=True)
    contracts_sub.add_parser("list", help="print every contract as NDJSON (euo_id, partner_id, "
                             "contract_end, active)"
                             ).set_defaults(run=lambda settings, args: with_database(
                                 settings, _list_contracts))


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


async def _migrate(dsn: str) -> int:
    """Apply the migrations and create the audit partitions ahead; say what was done."""
    conn = await asyncpg.connect(dsn)
    try:
        applied = await migrate(conn)
        partitions = await ensure_partitions(conn)
    except asyncpg.InsufficientPrivilegeError as e:
        raise DatabaseUnavailable(f"this role may not migrate ({e}): connect as the schema's "
                                  "owner") from None
    finally:
        await conn.close()
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    print("audit partitions: " + ", ".join(
        [f"created {p}" for p in partitions.created] + [f"present {p}" for p in partitions.present]
        + [f"not created {p} (audit_log_default holds rows of that month)"
           for p in partitions.blocked]))
    return 1 if partitions.blocked else 0


async def _grant(dsn: str, role: str) -> int:
    """Run sql/runtime_grants.sql for `role`."""
    conn = await asyncpg.connect(dsn)
    try:
        await grant_runtime(conn, role)
    except asyncpg.PostgresError as e:
        print(f"gateway grant: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        await conn.close()
    print(f"granted role {role} what `gateway serve --no-migrate` needs")
    return 0


def _check(settings: Settings, workers: int = 1, pods: int = 1) -> int:
    """Print the effective configuration and one line per check; 0 if no problem, else 2."""
    found = Findings()
    print("configuration:")
    for line in effective_configuration(settings):
        print(f"  {line}")
    check_settings(settings, found)
    with contextlib.ExitStack() as stack:
        try:
            dsn = database_url(settings, stack)
        except DatabaseUnavailable as e:
            found.problems.append(str(e))
        else:
            asyncio.run(check_database(dsn, found,
                                       deployment=Deployment(settings, workers, pods)))
        asyncio.run(check_backends(settings, found))
    for line in found.lines():
        print(line)
    print(f"{len(found.problems)} problems, {len(found.warnings)} warnings")
    return 2 if found.problems else 0


async def _list_contracts(dsn: str) -> int:
    """Print every contract as one JSON object per line."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(query("all_contracts"))
        # active by the database's date, as the gateway decides it (clock.py)
        today = datetime.fromtimestamp(await conn.fetchval(query("database_clock")), UTC).date()
    finally:
        await conn.close()
    for r in sorted(rows, key=lambda r: r["euo_id"]):
        end = r["contract_end"]
        print(orjson.dumps({"euo_id": r["euo_id"], "partner_id": r["partner_id"],
                            "contract_end": end.isoformat() if end else None,
                            "active": end is None or end > today}).decode())
    return 0
