"""What `gateway check` reports and `gateway serve` checks before it listens: the settings,
the policy (floors), the database (reachable, schema current, audit partitions ahead, the
runtime role's grants) and the backends. Every finding is one line an operator can act on.

A problem stops `serve` (exit 2); a warning does not: a missing audit partition only sends
rows to audit_log_default, and an unreachable backend is answered 502 and shows in /readyz.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import asyncpg

from .db import (
    PARTITION_MONTHS_REQUIRED,
    RUNTIME_GRANTS,
    SQL_DIR,
    durability_problems,
    ensure_partitions,
    migrate,
    missing_partitions,
    pending_migrations,
    query,
)
from .keyset import KeySet
from .policy.catalog import PolicyError
from .policy.floors import LOWERED_FILE
from .settings import ConfigError, Settings

log = logging.getLogger("gateway.check")

# What the runtime role needs, table by table: read from sql/runtime_grants.sql itself
# (its `grant … on TABLE to` lines), so the check and the grants cannot drift apart.
_GRANT = re.compile(r"grant ([a-z, ]+) on ([a-z_]+) to", re.I)


def runtime_privileges(sql_dir: Path = SQL_DIR) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(table, privileges) for every table runtime_grants.sql grants on (not sequences,
    schemas or functions)."""
    text = (sql_dir / RUNTIME_GRANTS).read_text(encoding="utf-8")
    return tuple((table, tuple(p.strip().upper() for p in privs.split(",")))
                 for privs, table in _GRANT.findall(text)
                 if not privs.strip().lower().startswith(("usage", "execute")))


MIGRATE_HINT = "run `gateway migrate` as the schema's owner"
SECRET_FIELDS = ("jwt_secret",)
LISTENERS_PER_PROCESS = 1     # gateway/listener.py: one LISTEN connection for every mirror
URL_FIELDS = ("database_url", "database_listen_url", "jwt_jwks_url", "webhook_url")


@dataclass
class Findings:
    passed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report: what passed, then warnings, then problems, one line each."""
        return ([f"ok: {x}" for x in self.passed] + [f"warning: {x}" for x in self.warnings]
                + [f"problem: {x}" for x in self.problems])


JWT_SECRET_MIN_BYTES = 32


def key_problems(settings: Settings) -> list[str]:
    """Keys the gateway cannot serve with (the demo mints its own and never asks): an HS256
    secret under 32 bytes, which can be guessed offline from any one token it signed, and
    a GATEWAY_AUDIT_SIGNING_KEY_FILE that is no Ed25519 key (each worker would die at
    start, over and over, rather than the gateway refusing once)."""
    from .audit.checkpoints import load_signing_key
    problems = []
    secret = settings.jwt_secret
    if secret and len(secret.encode()) < JWT_SECRET_MIN_BYTES:
        problems.append(f"GATEWAY_JWT_SECRET is {len(secret.encode())} bytes: an HS256 key "
                        f"needs at least {JWT_SECRET_MIN_BYTES} random bytes (a shorter one "
                        "can be guessed offline from any token it signed)")
    if settings.audit_signing_key_file is not None:
        try:
            load_signing_key(settings.audit_signing_key_file)
        except ConfigError as e:
            problems.append(str(e))
    return problems


def check_settings(settings: Settings, found: Findings) -> None:
    """What `serve` needs from the environment, and the policy against its floors."""
    weak = key_problems(settings)
    try:
        settings.check_for_serving()
    except ConfigError as e:
        found.problems += str(e).split("; ")     # check_for_serving joins its problems so
    else:
        if not weak:
            found.passed.append("settings")
    found.problems += weak
    if any("policy file" in p for p in found.problems):
        return                                   # unreadable files: said once already
    from .policy.policyset import load_policy_set
    try:
        policy_set = load_policy_set(settings.policy_dir)
    except PolicyError as e:
        found.problems += [f"policy {settings.policy_dir}: {line.strip()}"
                           for line in str(e).splitlines() if line.strip()]
    else:
        lowered = policy_set.catalog.lowered_floors
        found.passed.append(f"policy {settings.policy_dir} version {policy_set.version} "
                            f"({len(policy_set.catalog.data_sets)} data sets, "
                            f"{f'{len(lowered)} floors lowered' if lowered else 'floors kept'})")
        found.warnings += [f"policy {settings.policy_dir}: floor {floor} lowered "
                           f"({LOWERED_FILE}): {reason}" for floor, reason in lowered.items()]
        try:
            settings.check_for_serving(policy_set.catalog.services)
        except ConfigError as e:
            found.problems += [p for p in str(e).split("; ") if p not in found.problems]


@dataclass(frozen=True)
class Deployment:
    """How many gateway processes share the database: `serve --workers` per pod, pods."""
    settings: Settings
    workers: int = 1
    pods: int = 1


def connection_budget(deployment: Deployment, max_connections: int,
                      reserved: int) -> tuple[bool, str]:
    """Whether the deployment's connections fit in what the server lets the gateway's role
    open, and the line that says so: each process holds GATEWAY_DB_POOL_MAX plus its one
    listener; behind a transaction pooler only the listeners reach PostgreSQL directly (the
    pooler's own server connections, its default_pool_size, come on top)."""
    settings, processes = deployment.settings, deployment.workers * deployment.pods
    available = max_connections - reserved
    who = f"{deployment.workers} workers (--workers) × {deployment.pods} pods (--pods)"
    limit = (f"max_connections {max_connections}, {reserved} reserved for superusers: "
             f"{available} for the gateway")
    if settings.database_pooler == "transaction":
        need = processes * LISTENERS_PER_PROCESS
        return need <= available, (
            f"database connections: {need} listeners ({who}) straight to PostgreSQL; the "
            f"{processes * settings.db_pool_max} pooled ones (GATEWAY_DB_POOL_MAX "
            f"{settings.db_pool_max} each) go through the pooler, whose server connections "
            f"come on top; {limit}")
    per_process = settings.db_pool_max + LISTENERS_PER_PROCESS
    need = processes * per_process
    return need <= available, (
        f"database connections: {need} = {per_process} a process (GATEWAY_DB_POOL_MAX "
        f"{settings.db_pool_max} + {LISTENERS_PER_PROCESS} listener) × {who}; {limit}")


async def check_database(dsn: str, found: Findings, migrating: bool = False,
                         deployment: Deployment | None = None) -> None:
    """Schema current, partitions ahead and, for a role that does not own the schema, its
    grants; with `deployment`, its connections against max_connections. With `migrating`,
    first migrate and create the partitions ahead (the owner's job)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except Exception as e:      # wait_for_database let it through a moment ago
        found.problems.append(f"the database refused the gateway: {type(e).__name__}: {e}")
        return
    try:
        me = await conn.fetchrow(query("whoami"))
        role = me["role"]
        if migrating:
            try:
                await migrate(conn)
                await ensure_partitions(conn)
            except asyncpg.InsufficientPrivilegeError as e:
                found.problems.append(
                    f"role {role} may not migrate ({e}): {MIGRATE_HINT}, then start "
                    "`gateway serve --no-migrate` as this role")
                return
            me = await conn.fetchrow(query("whoami"))
        pending = await pending_migrations(conn)
        if pending:
            found.problems.append(f"the database schema is not current ({', '.join(pending)} "
                                  f"not applied): {MIGRATE_HINT}")
            return
        found.passed.append(f"database reachable as {role}, schema current")
        limits = await conn.fetchrow(query("connection_limits"))
        if deployment is None:
            found.passed.append(
                f"database max_connections is {limits['max_connections']}: each gateway worker "
                f"process holds GATEWAY_DB_POOL_MAX + {LISTENERS_PER_PROCESS}, its listener "
                "(docs/scale.md)")
        else:
            fits, line = connection_budget(deployment, limits["max_connections"],
                                           limits["reserved"])
            if fits:
                found.passed.append(line)
            else:
                found.problems.append(
                    f"{line}: too few; raise max_connections, lower GATEWAY_DB_POOL_MAX or "
                    "put a transaction pooler in front (docs/scale.md)")
        not_durable = await durability_problems(conn, session=False)
        if not_durable:
            found.problems.append(f"the database's commits are not durable ({', '.join(not_durable)}):"
                                  " a crash would lose audit rows of answered requests")
        else:
            found.passed.append("database commits are durable (fsync and full_page_writes on; "
                                "the gateway's connections set synchronous_commit)")
        missing = await missing_partitions(conn, PARTITION_MONTHS_REQUIRED)
        if missing:
            found.warnings.append(
                f"audit partitions missing: {', '.join(missing)} (rows go to audit_log_default); "
                "run `gateway audit maintain` as the schema's owner")
        else:
            found.passed.append("audit partitions for this month and the next")
        if me["owner"]:
            found.passed.append(f"role {role} owns the schema (may migrate)")
            return
        await _check_grants(conn, role, me, found)
    except asyncpg.PostgresError as e:
        found.problems.append(f"the database check failed as {role}: {type(e).__name__}: {e}")
    finally:
        await conn.close()


async def _check_grants(conn: asyncpg.Connection, role: str, me, found: Findings) -> None:
    """The privileges a runtime role needs (sql/runtime_grants.sql), and none to create."""
    needed = runtime_privileges()
    tables = [t for t, privs in needed for _ in privs]
    privileges = [p for _, privs in needed for p in privs]
    lacking = await conn.fetch(query("missing_privileges"), tables, privileges)
    for r in lacking:
        found.problems.append(f"role {role} lacks {r['priv']} on {r['tbl']}: run "
                              f"`gateway grant --role {role}` as the schema's owner")
    if not lacking:
        found.passed.append(f"role {role} holds the runtime grants")
    if me["may_create"]:
        found.warnings.append(f"role {role} may create objects in schema {me['schema']}: "
                              "a runtime role needs no CREATE")


async def check_backends(settings: Settings, found: Findings) -> None:
    """Whether each backend answers HTTP at all (any status counts), within 3 s, and the
    token issuer's key set can be fetched (an issuer that is down is a warning: `serve`
    starts, not ready, and fetches it as soon as the issuer answers)."""
    timeout = aiohttp.ClientTimeout(total=3)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def probe(service: str, base: str) -> None:
            try:
                async with session.get(base + "/"):
                    found.passed.append(f"backend {service} answers ({mask_url(base)})")
            except (TimeoutError, aiohttp.ClientError) as e:
                found.warnings.append(f"backend {service} ({mask_url(base)}) does not answer: "
                                      f"{type(e).__name__}")
        await asyncio.gather(*(probe(s, u) for s, u in settings.upstreams.items()),
                             check_token_keys(settings, found))


async def check_token_keys(settings: Settings, found: Findings) -> None:
    """The issuer's key set (GATEWAY_JWT_JWKS_URL, or discovered from GATEWAY_JWT_ISSUER)
    fetched once, as `serve` will."""
    if not (settings.jwt_jwks_url or settings.discovers_keys):
        return
    keys = KeySet(jwks_url=settings.jwt_jwks_url, issuer=settings.jwt_issuer,
                  max_age_s=settings.jwt_jwks_max_age_s, grace_s=0.0, min_refetch_s=0.0)
    where = mask_url(settings.jwt_jwks_url) if settings.jwt_jwks_url else \
        f"discovered from {settings.jwt_issuer}"
    try:
        await keys.start()
        if keys.last_error is None:
            found.passed.append(f"token issuer's key set: {len(keys.keys)} signing keys ({where})")
        else:
            found.warnings.append(f"token issuer's key set cannot be fetched ({keys.last_error}): "
                                  "every token is refused until it can")
    finally:
        await keys.close()


def effective_configuration(settings: Settings) -> list[str]:
    """`name = value` per setting, secrets masked (the JWT secret, passwords in URLs)."""
    lines = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name in SECRET_FIELDS:
            value = "(set, hidden)" if value else "(unset)"
        elif f.name in URL_FIELDS and value:
            value = mask_url(value)
        elif f.name == "upstreams":
            value = ", ".join(f"{k}={mask_url(v)}" for k, v in value.items()) or "(none)"
        elif f.name == "database_url":
            value = "(unset: embedded PostgreSQL under data_dir)"
        elif f.name == "database_listen_url":
            value = "(unset: database_url)"
        lines.append(f"{f.name} = {value}")
    return lines


def mask_url(url: str) -> str:
    """The URL with any password (in the authority or a `password` parameter) replaced by ***."""
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{host}"
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if any(k.lower() == "password" for k, _ in pairs):
            query_ = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs],
                               safe="*")
            parts = parts._replace(query=query_)
        return parts._replace(netloc=netloc).geturl()
    return "(unparsable, hidden)"


class PartitionWatch:
    """Which audit partitions of this month and the next are missing, re-read every few
    minutes, so /readyz can warn without querying the database itself."""

    EVERY_S = 300.0

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool
        self.missing: list[str] = []
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        """Re-read the partitions; log when some go missing (a failure keeps the last answer)."""
        try:
            async with self.pool.acquire() as conn:
                missing = await missing_partitions(conn, PARTITION_MONTHS_REQUIRED)
        except Exception as e:     # the writer and the mirrors report an outage; not this
            log.debug("could not read the audit partitions: %s", e)
            return
        if missing and missing != self.missing:
            log.warning("audit partitions missing: %s; rows go to audit_log_default until "
                        "`gateway audit maintain` creates them", ", ".join(missing))
        self.missing = missing

    async def start(self) -> None:
        """Read once now, then every EVERY_S in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.EVERY_S)
            await self.refresh()

    async def close(self) -> None:
        """Stop re-reading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def warnings(self) -> list[str]:
        """What /readyz lists under `warnings` (it stays ready: rows still commit)."""
        return [f"audit_partition_missing:{name}" for name in self.missing]
