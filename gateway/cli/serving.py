"""`gateway serve` and `gateway reload`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal

from .. import supervisor
from ..check import Findings, check_backends, check_database, key_problems
from ..connections import connection_limits, raise_file_limit
from ..database import database_url
from ..policy.catalog import PolicyError
from ..policy.floors import LOWERED_FILE
from ..settings import ConfigError, Settings

log = logging.getLogger("gateway")
COMMANDS = ("serve", "reload")


def register(sub) -> None:
    serve_cmd = sub.add_parser("serve", help="run the gateway (configured from GATEWAY_* variables)")
    serve_cmd.add_argument("--workers", type=int, default=1,
                           help="worker processes on one listening socket, replaced when they die")
    serve_cmd.add_argument("--no-migrate", action="store_true",
                           help="do not migrate (production: connect as the runtime role); refuse "
                                "to start unless the schema is current")
    serve_cmd.set_defaults(run=lambda settings, args: serve(settings, args.workers,
                                                            migrating=not args.no_migrate))
    sub.add_parser("reload", help="have the running `gateway serve` (found by its pid file in "
                   "GATEWAY_DATA_DIR) reload the policy directory in every worker (SIGHUP)"
                   ).set_defaults(run=lambda settings, args: _reload(settings))


def serve(settings: Settings, workers: int = 1, migrating: bool = True) -> int:
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if workers > 1:
        supervisor.share_metrics()      # before prometheus_client is imported: it picks its mode then
    from ..app import create_app
    from ..policy.policyset import load_policy_set

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
    policy = supervisor.PolicyInForce(settings, policy_set)
    descriptors = raise_file_limit()        # the workers inherit it
    log.info("descriptor limit %d: at most %d client connections per process, idle ones "
             "closed after %g s, request heads due within %g s", descriptors,
             connection_limits(settings).max_connections, settings.idle_timeout_s,
             settings.header_timeout_s)
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(supervisor.listen(settings.listen_host, settings.listen_port))
        stack.enter_context(supervisor.pid_file(settings))
        dsn = database_url(settings, stack)
        _preflight(settings, dsn, migrating)
        create_app = functools.partial(create_app, migrate=False)    # done once, above
        if workers == 1:
            supervisor.run_worker(settings, dsn, sock, create_app, policy)
            return 0
        return supervisor.Supervisor(settings, dsn, sock, create_app, workers, policy).run()


def _reload(settings: Settings) -> int:
    """Send SIGHUP to the serving process named by the pid file; 2 when there is none."""
    path = settings.data_dir / supervisor.PID_FILE
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
