"""The command line: gateway serve | check | demo | migrate | grant | token | audit."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import errno
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import jwt
import orjson
from aiohttp import web

from .check import (
    Findings,
    check_backends,
    check_database,
    check_settings,
    effective_configuration,
    key_problems,
)
from .connections import connection_limits, raise_file_limit
from .db import (
    DatabaseUnavailable,
    EmbeddedPostgres,
    ensure_partitions,
    grant_runtime,
    migrate,
    query,
    wait_for_database,
)
from .policy.catalog import PolicyError
from .policy.floors import LOWERED_FILE
from .settings import ConfigError, Settings

log = logging.getLogger("gateway")
DEV_SECRET_FILE = "dev-jwt-secret"
PR_SET_PDEATHSIG = 1     # linux/prctl.h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway (configured from GATEWAY_* variables)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes on one listening socket, replaced when they die")
    serve.add_argument("--no-migrate", action="store_true",
                       help="do not migrate (production: connect as the runtime role); refuse "
                            "to start unless the schema is current")
    sub.add_parser("check", help="check settings, policy, database and backends; print the "
                   "effective configuration (secrets masked); exit 2 on a problem")
    demo = sub.add_parser("demo", help="embedded database, demo backends, gateway and tokens")
    demo.add_argument("--port", type=int, default=None, help="gateway port (default from "
                      "GATEWAY_LISTEN, 8080)")
    demo.add_argument("--reset", action="store_true", help="start from a clean state: delete "
                      "the embedded database under GATEWAY_DATA_DIR first")
    demo.add_argument("--backends-only", action="store_true", help="only the demo telephony "
                      "and meeting backends (--port: telephony's, meeting on the next; default "
                      "8081; 0: any free ports), and the lines that run `gateway serve` "
                      "against them")
    sub.add_parser("migrate", help="apply the SQL migrations, create the audit partitions "
                   "ahead, and exit (as the schema's owner)")
    grant = sub.add_parser("grant", help="grant a runtime role what `serve --no-migrate` needs "
                           "(sql/runtime_grants.sql; as the schema's owner)")
    grant.add_argument("--role", required=True, help="the runtime role's name")
    sub.add_parser("reload", help="have the running `gateway serve` (found by its pid file in "
                   "GATEWAY_DATA_DIR) reload the policy directory in every worker (SIGHUP)")
    audit = sub.add_parser("audit", help="verify, prune or query the access audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify_cmd = audit_sub.add_parser("verify", help="check every hash chain (and, with "
                                      "--public-key, the signed checkpoints); exit 1 on a break")
    keys_help = ("the Ed25519 public keys: a file or http(s) URL holding PEM keys or the "
                 "answer of GET /v1/audit/keys (every key ever used, rotated ones included); "
                 "repeatable")
    verify_cmd.add_argument("--public-key", action="append", default=[], metavar="KEYS",
                            help=keys_help + ". Rows after a chain's last checkpoint are "
                            "reported as not yet sealed")
    for name, what in (("verify-slice", "check a slice of GET /v1/audit/slice with no "
                         "database: signatures, every row against its signed root"),
                       ("verify-consistency", "check a consistency proof of GET "
                        "/v1/audit/consistency with no database: the later signed tree "
                        "extends the earlier")):
        offline = audit_sub.add_parser(name, help=what + "; exit 1 if anything fails")
        offline.add_argument("file", metavar="FILE_OR_URL", help="the saved JSON answer, or "
                             "the endpoint's http(s) URL (query included) to download it from "
                             "with --token (a slice must then be of the window its URL asks)")
        offline.add_argument("--public-key", action="append", required=True, metavar="KEYS",
                             help=keys_help)
        offline.add_argument("--token", help="the bearer token to download FILE_OR_URL with")
        offline.add_argument("--save", type=Path, metavar="FILE", help="keep what was "
                             "downloaded here (e.g. for a later --previous)")
        if name == "verify-slice":
            offline.add_argument("--previous", metavar="FILE_OR_URL", help="an earlier "
                                 "slice of the same caller and window: each of its proved rows "
                                 "must still be there, unchanged")
    audit_sub.add_parser("maintain", help="create the audit partitions ahead and drop those "
                         "past GATEWAY_AUDIT_RETENTION_DAYS (a periodic job, as the owner)")
    prune = audit_sub.add_parser("prune", help="drop whole month partitions past retention")
    prune.add_argument("--older-than", type=_days, default=None, metavar="DAYS",
                       help="e.g. 400d (default: GATEWAY_AUDIT_RETENTION_DAYS)")
    prune.add_argument("--dry-run", action="store_true", help="only list what would go")
    q = audit_sub.add_parser("query", help="print matching rows (all scopes) as NDJSON or CSV")
    for name, what in (("actor", "the acting token's sub"),
                       ("subject-user", "a data subject (user id)"),
                       ("euo", "the data subject's EUO"), ("dataset", "a data set name"),
                       ("decision", "allow, deny or error"),
                       ("from", "ISO 8601 time with zone, e.g. 2026-11-01T00:00:00Z (inclusive)"),
                       ("to", "ISO 8601 time with zone (exclusive)"),
                       ("limit", "at most this many rows (default: all)")):
        q.add_argument(f"--{name}", help=what)
    q.add_argument("--format", choices=("ndjson", "csv"), default="ndjson",
                   help="NDJSON (default) or CSV (formula cells neutralised)")
    retention = sub.add_parser("retention", help="what backends served past retention")
    retention_sub = retention.add_subparsers(dest="retention_command", required=True)
    rep = retention_sub.add_parser("report", help="per backend service, route and data set: "
                                   "elements withheld for retention (or anonymised), requests, "
                                   "EUOs, first and last seen; NDJSON")
    rep.add_argument("--from", dest="since",
                     help="ISO 8601 time with zone (inclusive; default 30 days before --to)")
    rep.add_argument("--to", dest="until", help="ISO 8601 time with zone (exclusive; default now)")
    pol = sub.add_parser("policy", help="ask the policy directory (GATEWAY_POLICY_DIR) offline")
    pol_sub = pol.add_subparsers(dest="policy_command", required=True)
    exp = pol_sub.add_parser("explain", help="what the gateway would decide for a request and "
                             "why (route, relations, data sets served and removed, the policy "
                             "lines), as GET /v1/explain answers, without database or backend")
    exp.add_argument("path", help="the backend path, e.g. /telephony/euos/euo-acme/users/u-alice")
    exp.add_argument("--method", default="GET", help="GET (default), POST, PUT, PATCH or DELETE")
    exp.add_argument("--role", required=True, help="the caller's role (roles.yaml)")
    exp.add_argument("--sub", required=True, help="the caller's token subject")
    exp.add_argument("--partner", help="the partner claim")
    exp.add_argument("--euo", help="the EUO claim")
    exp.add_argument("--contract", action="append", default=[], metavar="EUO=PARTNER",
                     help="an active contract to assume (repeat); none by default")
    exp.add_argument("--restricted", action="append", default=[], metavar="EUO/USER",
                     help="a user who restricted processing (repeat); none by default")
    pt = pol_sub.add_parser("test", help="run the YAML cases of DIR (default: the policy "
                            "directory's tests/) against the policy, as explain decides them; "
                            "exit 1 when one fails, 2 when a case file is malformed")
    pt.add_argument("dir", nargs="?", help="a directory of *.yaml case files")
    contracts = sub.add_parser("contracts", help="the partner <-> EUO contracts")
    contracts_sub = contracts.add_subparsers(dest="contracts_command", required=True)
    contracts_sub.add_parser("list", help="print every contract as NDJSON (euo_id, partner_id, "
                             "contract_end, active)")
    tok = sub.add_parser("token", help="mint a development token (HS256), signed with "
                         "GATEWAY_JWT_SECRET or the demo's secret under GATEWAY_DATA_DIR")
    tok.add_argument("--role", required=True,
                     help="the token's role claim: a role of the policy's roles.yaml "
                     "(default policy: provider_staff, partner, euo_admin, user)")
    tok.add_argument("--sub", required=True, help="the token's subject (who calls)")
    tok.add_argument("--partner", help="the partner claim (roles whose tenant_claim is partner)")
    tok.add_argument("--euo", help="the EUO claim (roles whose tenant_claim is euo)")
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("pgserver", "casbin", "casbin.policy", "casbin.enforcer", "casbin.role"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "audit" and args.audit_command in ("verify-slice", "verify-consistency"):
        return _verify_offline(args)
    try:
        settings = Settings.from_env()
        if args.command == "serve":
            return _serve(settings, args.workers, migrating=not args.no_migrate)
        if args.command == "check":
            return _check(settings)
        if args.command == "demo":
            from .demo.run import run_backends, run_demo
            if args.backends_only:
                if args.reset:
                    raise ConfigError("--backends-only starts no database: --reset does not apply")
                return run_backends(settings, args.port)
            return run_demo(settings, args.port, reset=args.reset)
        if args.command == "migrate":
            return _with_database(settings, _migrate)
        if args.command == "grant":
            return _with_database(settings, lambda dsn: _grant(dsn, args.role))
        if args.command == "audit":
            from .audit import cli
            return _with_database(settings, lambda dsn: cli.run(dsn, settings, args))
        if args.command == "policy":
            return (_explain_offline(settings, args) if args.policy_command == "explain"
                    else _policy_test(settings, args))
        if args.command == "contracts":
            return _with_database(settings, _list_contracts)
        if args.command == "retention":
            from . import retention_report
            return _with_database(settings, lambda dsn: retention_report.cli(dsn, args.since,
                                                                             args.until))
        if args.command == "token":
            print(mint_token(settings, args.role, args.sub, args.partner, args.euo, args.ttl))
            return 0
        if args.command == "reload":
            return _reload(settings)
    except (ConfigError, PolicyError, DatabaseUnavailable) as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:     # Ctrl-C while starting: nothing to report
        return 130
    return 1


def _explain_offline(settings: Settings, args) -> int:
    """gateway policy explain: the policy files alone (contracts and restrictions as given)."""
    from .explain import Offline, explain
    from .policy.policyset import load_policy_set
    from .principal import Principal
    policy_set = load_policy_set(settings.policy_dir)
    kind = policy_set.catalog.roles.get(args.role)
    if kind is None:
        print(f"gateway policy explain: no role {args.role!r} in roles.yaml", file=sys.stderr)
        return 2
    try:
        contracts = dict(c.split("=", 1) for c in args.contract)
        restricted = {tuple(r.split("/", 1)) for r in args.restricted}
    except ValueError:
        print("gateway policy explain: --contract EUO=PARTNER, --restricted EUO/USER",
              file=sys.stderr)
        return 2
    if args.method not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        print("gateway policy explain: --method is one of GET POST PUT PATCH DELETE",
              file=sys.stderr)
        return 2
    # the caller a token with these claims would be, or none (as the proxy would refuse it)
    from .authn import _principal
    from .errors import Denied
    if kind.tenant_claim is not None and getattr(args, kind.tenant_claim) is None:
        print(f"gateway policy explain: role {kind.name} needs the {kind.tenant_claim} claim "
              f"(--{kind.tenant_claim})", file=sys.stderr)
        return 2
    try:
        claims = {"role": args.role, "sub": args.sub, "exp": 0,
                  "partner": args.partner, "euo": args.euo}
        token_caller = _principal(claims, policy_set.catalog.roles)
    except Denied as e:
        print(f"gateway policy explain: a token with these claims is refused ({e.code}: "
              f"{e.message})", file=sys.stderr)
        return 2
    principal = Principal(sub=token_caller.sub, role=token_caller.role,
                          partner=token_caller.partner, euo=token_caller.euo, kind=kind)
    gw = Offline(policy_set.catalog, policy_set.policy, policy_set.version, contracts, restricted)
    print(orjson.dumps(explain(gw, principal, args.method, args.path),
                       option=orjson.OPT_INDENT_2).decode())
    return 0


def _policy_test(settings: Settings, args) -> int:
    """gateway policy test: every case of DIR against the policy directory."""
    from .policy.policyset import load_policy_set
    from .policytest import CaseError, run
    policy_set = load_policy_set(settings.policy_dir)
    directory = Path(args.dir) if args.dir else settings.policy_dir / "tests"
    try:
        cases, failures = run(directory, policy_set)
    except CaseError as e:
        print(f"gateway policy test: {e}", file=sys.stderr)
        return 2
    for failure in failures:
        print(failure)
    files = len({c.file for c in cases})
    print(f"policy test: {len(cases)} cases in {files} file{'s' if files != 1 else ''}, "
          f"{len(failures)} failed (policy {policy_set.version}, {settings.policy_dir})")
    return 1 if failures else 0


def _verify_offline(args) -> int:
    """verify-slice / verify-consistency: files, URLs and keys only, no settings, no
    database; a document given by URL is downloaded (with --token) and checked at once."""
    from .audit import checkpoints, remote, slices
    try:
        if args.save and not remote.is_url(args.file):
            raise ConfigError("--save keeps a download: give FILE_OR_URL as an http(s) URL")
        keys = checkpoints.load_public_keys(args.public_key)
        data = remote.read(args.file, args.token)
        if args.save:
            args.save.write_bytes(data)
        doc = _json(data, args.file)
        if args.audit_command == "verify-consistency":
            report = slices.verify_consistency_doc(doc, keys)
        else:
            previous = (_json(remote.read(args.previous, args.token), args.previous)
                        if args.previous else None)
            # downloaded, the slice must be of the window its URL asked for
            report = slices.verify_slice(doc, keys, previous, remote.asked(args.file),
                                         remote.asked(args.previous) if args.previous else None)
            if isinstance(doc, dict) and doc.get("next_cursor"):
                report["next_cursor"] = doc["next_cursor"]     # more rows: ask with cursor=
    except ConfigError as e:
        print(f"gateway audit {args.audit_command}: {e}", file=sys.stderr)
        return 2
    except OSError as e:                   # --save unwritable
        print(f"gateway audit {args.audit_command}: {e}", file=sys.stderr)
        return 2
    except (TypeError, KeyError, AttributeError, IndexError, RecursionError) as e:
        # a value of the wrong type where the format has another: never verified, and a
        # message rather than a traceback
        print(f"gateway audit {args.audit_command}: the file is not in the format the "
              f"gateway writes ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0 if report["ok"] else 1


def _json(data: bytes, source) -> object:
    try:
        return orjson.loads(data)
    except ValueError as e:
        raise ConfigError(f"{source}: not a JSON document ({e})") from None


def _days(value: str) -> int:
    digits = value[:-1] if value.endswith("d") else value
    if not digits.isdigit():
        raise argparse.ArgumentTypeError("give a number of days, e.g. 400d")
    return int(digits)


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


def dev_secret(settings: Settings, say_where: bool = False) -> str:
    """GATEWAY_JWT_SECRET, or a development secret generated once under the data dir
    (with say_where, stderr names the file, so a token minted from another directory
    does not silently carry a secret the demo does not know)."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.data_dir / DEV_SECRET_FILE
    if say_where:
        print(f"gateway: signed with {'the' if path.exists() else 'a NEW'} development secret "
              f"{path.resolve()} (the demo must use the same GATEWAY_DATA_DIR)", file=sys.stderr)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def mint_token(settings: Settings, role: str, sub: str, partner: str | None, euo: str | None,
               ttl: int) -> str:
    """A signed development token for this role (of the policy's roles.yaml) and tenant."""
    from .policy.catalog_files import load_catalog
    roles = load_catalog(settings.policy_dir).roles
    if role not in roles:
        raise ConfigError(f"unknown role {role!r}: the policy's roles are {', '.join(roles)}")
    claim = roles[role].tenant_claim
    now = int(time.time())
    claims = {"sub": sub, "role": role, "iat": now, "exp": now + ttl}
    if claim is not None:
        value = {"partner": partner, "euo": euo}[claim]
        if not value:
            raise ConfigError(f"a {role} token needs --{claim}")
        claims[claim] = value
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, dev_secret(settings, say_where=True), algorithm="HS256")


def database_url(settings: Settings, stack: contextlib.ExitStack) -> str:
    """GATEWAY_DATABASE_URL, or an embedded PostgreSQL stopped when the stack closes; either
    answers by the time this returns (DatabaseUnavailable after GATEWAY_DB_CONNECT_TIMEOUT_S)."""
    if settings.database_url:
        dsn = settings.database_url
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        stack.callback(embedded.stop)
        try:
            dsn = embedded.start()
        except ImportError as e:     # an installation without pgserver (the container image)
            raise DatabaseUnavailable(f"GATEWAY_DATABASE_URL is not set and this installation "
                                      f"has no embedded PostgreSQL ({e}): set "
                                      "GATEWAY_DATABASE_URL") from None
        log.info("embedded PostgreSQL under %s", embedded.pgdata)
    asyncio.run(wait_for_database(dsn, settings.db_connect_timeout_s))
    return dsn


def _with_database(settings: Settings, job) -> int:
    with contextlib.ExitStack() as stack:
        dsn = database_url(settings, stack)
        return asyncio.run(job(dsn))


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


def _check(settings: Settings) -> int:
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
            asyncio.run(check_database(dsn, found))
        asyncio.run(check_backends(settings, found))
    for line in found.lines():
        print(line)
    print(f"{len(found.problems)} problems, {len(found.warnings)} warnings")
    return 2 if found.problems else 0


def _serve(settings: Settings, workers: int = 1, migrating: bool = True) -> int:
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if workers > 1:
        _share_metrics()      # before prometheus_client is imported: it picks its mode then
    from .app import create_app
    from .policy.policyset import load_policy_set

    services, refused = None, None
    try:                                   # fail before forking
        policy_set = load_policy_set(settings.policy_dir)
        services = policy_set.catalog.services
    except PolicyError as e:
        refused = e
    problems = key_problems(settings)
    try:
        settings.check_for_serving(services or ())   # every mistake at once, an upstream per service
    except ConfigError as e:
        problems.insert(0, str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    if refused is not None:
        raise refused
    for floor, reason in policy_set.catalog.lowered_floors.items():
        log.warning("policy %s lowers floor %s (%s): %s", policy_set.version, floor,
                    LOWERED_FILE, reason)
    policy = PolicyInForce(settings, policy_set)
    descriptors = raise_file_limit()        # the workers inherit it
    log.info("descriptor limit %d: at most %d client connections per process, idle ones "
             "closed after %g s, request heads due within %g s", descriptors,
             connection_limits(settings).max_connections, settings.idle_timeout_s,
             settings.header_timeout_s)
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(listen(settings.listen_host, settings.listen_port))
        stack.enter_context(pid_file(settings))
        dsn = database_url(settings, stack)
        _preflight(settings, dsn, migrating)
        create_app = functools.partial(create_app, migrate=False)    # done once, above
        if workers == 1:
            _run_worker(settings, dsn, sock, create_app, policy)
            return 0
        return Supervisor(settings, dsn, sock, create_app, workers, policy).run()


PID_FILE = "gateway.pid"


@contextlib.contextmanager
def pid_file(settings: Settings):
    """GATEWAY_DATA_DIR/gateway.pid while serving, so `gateway reload` finds this process."""
    path = settings.data_dir / PID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()


def _reload(settings: Settings) -> int:
    """Send SIGHUP to the serving process named by the pid file; 2 when there is none."""
    path = settings.data_dir / PID_FILE
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no running `gateway serve` found through {path} ({e})") from None
    print(f"asked gateway serve (pid {pid}) to reload the policy; its log says whether it did")
    return 0


def _preflight(settings: Settings, dsn: str, migrating: bool) -> None:
    """Migrate (unless --no-migrate), then the database checks of `gateway check`: raise
    ConfigError on a problem; log the warnings (an unreachable backend is one for serve)."""
    found = Findings()

    async def checks():
        await check_database(dsn, found, migrating=migrating)
        await check_backends(settings, found)
    asyncio.run(checks())
    for warning in found.warnings:
        log.warning(warning)
    if found.problems:
        raise ConfigError("; ".join(found.problems))


def _share_metrics() -> None:
    """Have the workers keep their metrics in files of one clean directory, so /metrics in
    any of them renders all (gateway/metrics.py): the operator's PROMETHEUS_MULTIPROC_DIR
    emptied, or a fresh temporary one removed when the gateway exits."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):     # a previous run's values are not this one's
            if name.endswith(".db"):
                os.remove(os.path.join(given, name))
        return
    path = tempfile.mkdtemp(prefix="gateway-metrics-")
    atexit.register(shutil.rmtree, path, True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def _forget_metrics(pid: int) -> None:
    """Drop a dead worker's gauges from what /metrics sums (its counts stay: they happened)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, path)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound once here and inherited by every worker.

    No SO_REUSEPORT: a second, unrelated gateway on the same port must fail to bind rather
    than silently take half of the connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as e:
        hint = " (is another gateway serving it?)" if e.errno == errno.EADDRINUSE else ""
        raise ConfigError(f"cannot listen on {host}:{port} (GATEWAY_LISTEN): "
                          f"{os.strerror(e.errno) if e.errno else e}{hint}") from None


class RestartBudget:
    """When to replace a dead worker, and when to stop trying: more than `limit` deaths within
    `window_s` means something is wrong that a restart will not fix. Pure: times are given."""

    def __init__(self, limit: int = 5, window_s: float = 60.0, first_delay_s: float = 0.5,
                 max_delay_s: float = 10.0):
        self.limit, self.window_s = limit, window_s
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self._deaths: list[float] = []

    def on_death(self, now: float) -> float | None:
        """The delay before the replacement starts, or None to give up."""
        self._deaths = [t for t in self._deaths if now - t < self.window_s] + [now]
        recent = len(self._deaths)
        if recent > self.limit:
            return None
        return min(self.first_delay_s * 2 ** (recent - 1), self.max_delay_s)

    def recent(self) -> int:
        """Deaths counted in the current window."""
        return len(self._deaths)


class Supervisor:
    """N forked workers on one inherited socket: replace the ones that die (with backoff),
    give up past the restart budget, and stop them all on SIGTERM or SIGINT."""

    STOP_GRACE_S = 30.0     # a worker still draining after this is killed

    def __init__(self, settings: Settings, dsn: str, sock: socket.socket, create_app, workers: int,
                 policy: PolicyInForce):
        self.target = (settings, dsn, sock, create_app, policy)
        self.policy = policy
        self.workers = workers
        self.budget = RestartBudget()
        self.stopping = False
        self.reloading = False
        self._fork = multiprocessing.get_context("fork")

    def run(self) -> int:
        """Serve until told to stop (0) or until workers keep dying (1)."""
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_w, False)
        old_wakeup = signal.set_wakeup_fd(wakeup_w)   # a signal ends the wait below at once
        old_handlers = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        procs = {}
        try:
            for _ in range(self.workers):
                p = self._start()
                procs[p.sentinel] = p
            settings = self.target[0]
            log.info("%d workers on %s:%d (pids %s)", self.workers, settings.listen_host,
                     settings.listen_port, ", ".join(str(p.pid) for p in procs.values()))
            pending: list[float] = []     # when each replacement is due
            while not self.stopping:
                timeout = max(0.0, min(pending) - time.monotonic()) if pending else None
                ready = multiprocessing.connection.wait([*procs, wakeup_r], timeout)
                if wakeup_r in ready:
                    os.read(wakeup_r, 512)
                if self.stopping:
                    break
                if self.reloading:
                    self.reloading = False
                    self.policy.reload()          # what replacement workers will start with
                    log.info("reloading the policy in %d workers", len(procs))
                    for p in procs.values():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p.pid, signal.SIGHUP)
                for sentinel in ready:
                    if sentinel in procs:
                        delay = self._on_exit(procs.pop(sentinel))
                        if delay is None:
                            return self._stop(procs.values(), failed=True)
                        pending.append(time.monotonic() + delay)
                now = time.monotonic()
                for due in [d for d in pending if d <= now]:
                    pending.remove(due)
                    p = self._start()
                    procs[p.sentinel] = p
                    log.info("worker pid %d started", p.pid)
            return self._stop(procs.values(), failed=False)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            os.close(wakeup_r)
            os.close(wakeup_w)

    def _start(self):
        p = self._fork.Process(target=_run_worker, args=(*self.target, os.getpid()), daemon=False)
        p.start()
        return p

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reloading = True
        else:
            self.stopping = True

    def _on_exit(self, proc) -> float | None:
        """Log a worker's death; the delay before its replacement, or None to give up."""
        proc.join()
        _forget_metrics(proc.pid)
        code = proc.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit code {code}")
        delay = self.budget.on_death(time.monotonic())
        if delay is None:
            log.error("worker pid %d died (%s); %d workers died within %g s, giving up",
                      proc.pid, how, self.budget.recent(), self.budget.window_s)
        else:
            log.error("worker pid %d died (%s); replacing it in %g s", proc.pid, how, delay)
        return delay

    def _stop(self, procs, failed: bool) -> int:
        """SIGTERM every worker, wait for them (killing stragglers); the exit status."""
        procs = list(procs)
        if not failed:
            log.info("stopping %d workers", len(procs))
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.STOP_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not stop within %g s; killing it", p.pid, self.STOP_GRACE_S)
                p.kill()
                p.join()
        if failed:
            return 1
        # a worker still starting has no handler yet: our SIGTERM ends it, which is a clean stop
        return 0 if all(p.exitcode in (0, -signal.SIGTERM) for p in procs) else 1


class PolicyInForce:
    """The supervisor's copy of the policy in force: forked workers start with it, and it
    follows SIGHUP like theirs (kept when the new files are refused)."""

    def __init__(self, settings: Settings, policy_set):
        self.settings = settings
        self.current = policy_set

    def reload(self) -> None:
        from .policy.policyset import load_policy_set
        try:
            self.current = load_policy_set(self.settings.policy_dir)
        except (PolicyError, OSError) as e:
            log.error("supervisor keeps policy %s: %s", self.current.version, e)


def _run_worker(settings: Settings, dsn: str, sock: socket.socket, create_app,
                policy: PolicyInForce, parent_pid: int | None = None) -> None:
    """One serving process: its own event loop, pools and audit chain, the shared socket."""
    if parent_pid is not None:
        # the supervisor's handlers came along with the fork; until aiohttp installs its
        # own, SIGTERM must end this process rather than set a flag in its copy of them
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent(parent_pid)
    # a reload asked for before the app listens for it must not end the process
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _use_uvloop()
    asyncio.run(_serve_app(create_app(settings, dsn, reload_on_sighup=True,
                                      policy_set=policy.current), sock))


async def _serve_app(app, sock: socket.socket) -> None:
    """What web.run_app does for one app on an inherited socket, with the gateway's runner
    (proxy paths straight to the pipeline): serve until SIGTERM or SIGINT, then let the
    requests under way finish (aiohttp's shutdown timeout) and close every resource."""
    from .app import GatewayRunner
    stop = stop_on_signal()           # from the start: a SIGTERM during start-up stops cleanly
    runner = GatewayRunner(app, access_log=None)
    try:
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        log.info("serving on %s", site.name)
        await stop.wait()
    finally:
        await runner.cleanup()


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM when the supervisor dies, even by SIGKILL, so no worker
    serves unsupervised (Linux; elsewhere workers outlive a killed supervisor)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:     # the parent died before prctl took effect
        sys.exit(1)


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def stop_on_signal() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_signal() -> None:
    await stop_on_signal().wait()


if __name__ == "__main__":
    sys.exit(main())

