"""The command line: gateway serve | demo | migrate | token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import time

import asyncpg
import jwt
from aiohttp import web

from .catalog import PolicyError
from .db import EmbeddedPostgres, migrate
from .settings import ConfigError, Settings

log = logging.getLogger("gateway")
DEV_SECRET_FILE = "dev-jwt-secret"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (configured from GATEWAY_* variables)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port (SO_REUSEPORT)")
    demo = sub.add_parser("demo", help="embedded database, demo backends, gateway and tokens")
    demo.add_argument("--port", type=int, default=None, help="gateway port (default from "
                      "GATEWAY_LISTEN, 8080)")
    sub.add_parser("migrate", help="apply the SQL migrations and exit")
    audit = sub.add_parser("audit", help="verify, prune or query the access audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("verify", help="check every hash chain; exit 1 on a break")
    prune = audit_sub.add_parser("prune", help="drop whole month partitions past retention")
    prune.add_argument("--older-than", type=_days, default=None, metavar="DAYS",
                       help="e.g. 400d (default: GATEWAY_AUDIT_RETENTION_DAYS)")
    prune.add_argument("--dry-run", action="store_true", help="only list what would go")
    q = audit_sub.add_parser("query", help="print matching rows (all scopes) as NDJSON or CSV")
    for name in ("actor", "subject-user", "euo", "dataset", "decision", "from", "to", "limit"):
        q.add_argument(f"--{name}")
    q.add_argument("--format", choices=("ndjson", "csv"), default="ndjson")
    tok = sub.add_parser("token", help="mint a development token (HS256)")
    tok.add_argument("--role", required=True,
                     choices=("provider_staff", "partner", "euo_admin", "user"))
    tok.add_argument("--sub", required=True)
    tok.add_argument("--partner")
    tok.add_argument("--euo")
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("pgserver", "casbin", "casbin.policy", "casbin.enforcer", "casbin.role"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = Settings.from_env()
        if args.command == "serve":
            return _serve(settings, args.workers)
        if args.command == "demo":
            from .demo.run import run_demo
            return run_demo(settings, args.port)
        if args.command == "migrate":
            return _with_database(settings, _migrate)
        if args.command == "audit":
            from .audit import cli
            return _with_database(settings, lambda dsn: cli.run(dsn, settings, args))
        if args.command == "token":
            print(mint_token(settings, args.role, args.sub, args.partner, args.euo, args.ttl))
            return 0
    except (ConfigError, PolicyError) as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    return 1


def _days(value: str) -> int:
    digits = value[:-1] if value.endswith("d") else value
    if not digits.isdigit():
        raise argparse.ArgumentTypeError("give a number of days, e.g. 400d")
    return int(digits)


def dev_secret(settings: Settings) -> str:
    """GATEWAY_JWT_SECRET, or a development secret generated once under the data dir."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.data_dir / DEV_SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def mint_token(settings: Settings, role: str, sub: str, partner: str | None, euo: str | None,
               ttl: int) -> str:
    """A signed development token for this role and tenant."""
    if role == "partner" and not partner:
        raise ConfigError("a partner token needs --partner")
    if role in ("euo_admin", "user") and not euo:
        raise ConfigError(f"a {role} token needs --euo")
    now = int(time.time())
    claims = {"sub": sub, "role": role, "iat": now, "exp": now + ttl}
    if partner and role == "partner":
        claims["partner"] = partner
    if euo and role in ("euo_admin", "user"):
        claims["euo"] = euo
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, dev_secret(settings), algorithm="HS256")


def database_url(settings: Settings, stack: contextlib.ExitStack) -> str:
    """GATEWAY_DATABASE_URL, or an embedded PostgreSQL stopped when the stack closes."""
    if settings.database_url:
        return settings.database_url
    embedded = EmbeddedPostgres(settings.data_dir)
    dsn = embedded.start()
    stack.callback(embedded.stop)
    log.info("embedded PostgreSQL under %s", embedded.pgdata)
    return dsn


def _with_database(settings: Settings, job) -> int:
    with contextlib.ExitStack() as stack:
        dsn = database_url(settings, stack)
        return asyncio.run(job(dsn))


async def _migrate(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def _serve(settings: Settings, workers: int = 1) -> int:
    settings.check_for_serving()
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    from .app import create_app
    from .authz import load_policy
    from .catalog import load_catalog

    load_policy(settings.policy_dir, load_catalog(settings.policy_dir))   # fail before forking
    with contextlib.ExitStack() as stack:
        dsn = database_url(settings, stack)
        if workers == 1:
            _run_worker(settings, dsn, create_app)
            return 0
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_run_worker, args=(settings, dsn, create_app), daemon=False)
                 for _ in range(workers)]
        for p in procs:
            p.start()
        log.info("%d workers on %s:%d", workers, settings.listen_host, settings.listen_port)

        def stop(signum, _frame):
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        for p in procs:
            p.join()
        return max((p.exitcode or 0) for p in procs)


def _run_worker(settings: Settings, dsn: str, create_app) -> None:
    """One serving process: its own event loop, pools and audit chain, a shared port."""
    _use_uvloop()
    sock = socket.socket(socket.AF_INET6 if ":" in settings.listen_host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((settings.listen_host, settings.listen_port))
    web.run_app(create_app(settings, dsn), sock=sock, access_log=None,
                print=lambda s: log.info(s.strip()))


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


if __name__ == "__main__":
    sys.exit(main())

