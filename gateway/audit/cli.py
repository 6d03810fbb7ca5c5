"""`gateway audit verify | maintain | prune | query`: the operator's side of the audit log."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import asyncpg
import orjson
from multidict import MultiDict

from ..clock import MAX_SKEW_S, measure_skew
from ..db import ensure_partitions, pending_migrations, query, with_lock_retries
from ..errors import Denied
from ..settings import Settings
from .api import PUBLIC_FIELDS, _cell, parse_filters, public
from .chain import save_watermarks, verify
from .checkpoints import (
    load_public_keys,
    load_signing_key,
    seal_abandoned,
    signing_key_path,
    verify_checkpoints,
)


async def run(dsn: str, settings: Settings, args) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        # no migrating here: these commands may run as the runtime role (verify, query)
        pending = await pending_migrations(conn)
        if pending:
            print(f"gateway audit: the database schema is not current ({', '.join(pending)} not "
                  "applied): run `gateway migrate` as the schema's owner", file=sys.stderr)
            return 2
        if args.audit_command == "verify":
            report = await verify(conn, incremental=args.incremental)
            await save_watermarks(conn, report)
            out = report.public()
            ok = report.ok
            if args.public_key:
                sealed = await verify_checkpoints(conn, load_public_keys(args.public_key))
                out["checkpoints"] = sealed.public()
                ok = ok and sealed.ok
            print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
            return 0 if ok else 1
        if args.audit_command == "maintain":
            return await _maintain(conn, settings)
        if args.audit_command == "prune":
            days = args.older_than if args.older_than is not None else settings.audit_retention_days
            return 0 if await _prune(conn, days, args.dry_run, settings.max_clock_skew_s) else 2
        return await _query(conn, args)
    except asyncpg.InsufficientPrivilegeError as e:
        print(f"gateway audit {args.audit_command}: {e} (run it as the schema's owner)",
              file=sys.stderr)
        return 2
    finally:
        await conn.close()


async def _maintain(conn: asyncpg.Connection, settings: Settings) -> int:
    """Create the partitions ahead, seal the chains of writers that are gone, forget the
    idempotency keys past their day, then prune past retention; 1 if a month could not get
    its partition (its rows sit in audit_log_default: they stay there, and are kept), 2 if
    the host's clock and the database's disagree (nothing is pruned then)."""
    report = await ensure_partitions(conn)
    for name in report.created:
        print(f"created {name}")
    for name in report.blocked:
        print(f"could not create {name}: audit_log_default already holds rows of that month "
              "(they stay there, chained and verified, and are never pruned)")
    if report.present:
        print(f"present {', '.join(report.present)}")
    await _seal_abandoned(conn, settings)
    forgotten = await conn.fetchval(query("idempotency_keys_forget"))
    if forgotten:
        print(f"forgot {forgotten} idempotency keys older than a day")
    if not await _prune(conn, settings.audit_retention_days, dry_run=False,
                        max_skew_s=settings.max_clock_skew_s):
        return 2
    return 1 if report.blocked else 0


async def _seal_abandoned(conn: asyncpg.Connection, settings: Settings) -> None:
    """Seal the chains of writers that are gone, with the deployment's signing key (the
    one GATEWAY_AUDIT_SIGNING_KEY_FILE names, or the one the gateway generated under
    GATEWAY_DATA_DIR); said and skipped when there is none (a new key is never made here:
    auditors would not know it)."""
    path = signing_key_path(settings.audit_signing_key_file, settings.data_dir)
    if not Path(path).exists():
        print("no audit signing key (GATEWAY_AUDIT_SIGNING_KEY_FILE): chains whose writer is "
              "gone are not sealed", file=sys.stderr)
        return
    pool = _OneConnection(conn)
    # a live writer signs its heads every GATEWAY_AUDIT_CHECKPOINT_S (which maintain must
    # share with the gateways): three intervals without a write and unsealed rows, it is gone
    idle_s = 3 * settings.audit_checkpoint_s
    for chain in await seal_abandoned(pool, load_signing_key(Path(path)), idle_s):
        print(f"sealed chain {chain} (its writer is gone)")


class _OneConnection:
    """The Pool methods seal_abandoned uses, on the command's one connection."""

    def __init__(self, conn: asyncpg.Connection):
        self.conn = conn

    def acquire(self):
        return _Held(self.conn)

    async def fetch(self, *args):
        return await self.conn.fetch(*args)

    async def execute(self, *args):
        return await self.conn.execute(*args)


class _Held:
    def __init__(self, conn):
        self.conn = conn

    async def __aenter__(self):
        return self.conn

    async def __aexit__(self, *exc):
        return False


async def _prune(conn: asyncpg.Connection, days: int, dry_run: bool,
                 max_skew_s: float = MAX_SKEW_S) -> bool:
    """Drop (or with dry_run, list) the month partitions that ended `days` ago or earlier,
    by the database's clock; never this month's or last month's (sql/030). False, with
    nothing dropped, when the host's clock and the database's disagree by more than
    `max_skew_s`: one of them is wrong, and retention is not decided on a wrong clock."""
    skew, uncertainty = await measure_skew(conn)
    if abs(skew) > max_skew_s + uncertainty:
        print(f"gateway audit: refusing to drop any partition: this host's clock is "
              f"{abs(skew):.1f} s {'behind' if skew > 0 else 'ahead of'} the database's "
              f"(more than GATEWAY_MAX_CLOCK_SKEW_S, {max_skew_s:g} s). Retention is counted "
              "by the database's clock; set the clocks right (NTP) and run it again",
              file=sys.stderr)
        return False

    async def prune():
        async with conn.transaction():
            await conn.execute(query("partition_lock_timeout"))
            return await conn.fetch(query("audit_prune"), days, dry_run)
    dropped = await with_lock_retries(conn, prune)
    verb = "would drop" if dry_run else "dropped"
    for r in dropped:
        print(f"{verb} {r['partition']} (rows before {r['ends'].date()})")
    if not dropped:
        cutoff = await conn.fetchval(query("audit_prune_cutoff"), days)
        print(f"no partition ends before {cutoff.date()} ({days} days ago) and before last "
              "month (by the database's clock)")
    return True


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
        async for record in conn.cursor(query("audit_query"), *filters.args(None, None, None)):
            item = public(record)
            if out:
                out.writerow([_cell(item[f]) for f in PUBLIC_FIELDS])
            else:
                sys.stdout.write(orjson.dumps(item).decode() + "\n")
    return 0
