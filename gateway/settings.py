"""Frozen settings, read once from the environment (docs/configuration.md) and checked at start-up."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("gateway.settings")


def _package_data(name: str) -> Path:
    """The directory `name` of gateway._data: the wheel's copy, or the checkout's top level."""
    # resolve(): in a checkout the symlink leads to the top-level directory, which is the
    # path an operator knows; Casbin and open() need a real directory, never a zip member
    return Path(str(resources.files("gateway._data") / name)).resolve()


DEFAULT_POLICY_DIR = _package_data("policies")
SQL_DIR = _package_data("sql")


UPSTREAM_PREFIX = "GATEWAY_UPSTREAM_"
# the files of a policy directory (their bytes make the policy version)
POLICY_FILES = ("model.conf", "policy.csv", "roles.yaml", "datasets.yaml", "routes.yaml",
                "export.yaml", "alerts.yaml")


def upstream_variable(service: str) -> str:
    """The environment variable naming a service's backend: meeting -> GATEWAY_UPSTREAM_MEETING."""
    return UPSTREAM_PREFIX + service.upper().replace("-", "_")


ACCESS_LOG_FORMATS = ("off", "json")


DATABASE_POOLERS = ("none", "transaction")


class ConfigError(Exception):
    """A configuration mistake, with a message an operator can act on."""


@dataclass(frozen=True)
class Settings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    database_url: str | None = None
    database_read_url: str | None = None    # a standby for the audit queries (gateway/reads.py)
    database_read_max_wait_s: float = 1.0   # for its replay to reach the primary's, then the primary
    database_listen_url: str | None = None   # the mirrors' LISTEN connection; unset: database_url
    data_dir: Path = Path(".gateway")
    upstreams: Mapping[str, str] = field(default_factory=dict)
    jwt_secret: str | None = None
    jwt_jwks_url: str | None = None
    jwt_public_key_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_jwks_min_refetch_s: float = 5.0     # an unknown kid refetches the key set at most this often
    jwt_jwks_max_age_s: float = 300.0       # the key set is refetched before it is this old
    jwt_jwks_grace_s: float = 900.0         # an unreachable issuer's last set, this long past its age
    # where the role and the tenant claims are in a token: dotted paths (`\.` a literal dot)
    jwt_role_claim: str = "role"
    jwt_partner_claim: str = "partner"
    jwt_euo_claim: str = "euo"
    policy_dir: Path = DEFAULT_POLICY_DIR
    max_body_bytes: int = 1 << 20
    backend_connect_timeout_s: float = 3.0
    backend_read_timeout_s: float = 15.0
    backend_deadline_s: float = 30.0       # a whole JSON answer (or a file's headers) by then
    max_json_answer_bytes: int = 8 << 20
    max_streams: int = 200                 # files copied through at once, per process
    backend_connections: int = 200
    db_pool_min: int = 5
    db_pool_max: int = 12     # the audit lanes hold one each, the rest serve queries
    db_connect_timeout_s: float = 30.0   # how long start-up waits for the database to answer
    db_acquire_timeout_s: float = 5.0    # a call waits this long for a pooled connection, then 503
    # set on every connection of the gateway, whatever the server's default: a commit the
    # gateway answers for is durable (on) or applied on the synchronous standby (remote_apply)
    db_synchronous_commit: str = "on"
    # `transaction`: GATEWAY_DATABASE_URL goes through a transaction-mode pooler (PgBouncer)
    database_pooler: str = "none"
    audit_queue_max: int = 50_000
    audit_retention_days: int = 400
    audit_lanes: int = 1
    audit_commit_timeout_s: float = 2.0   # a request waits this long for its row, then 503
    # while rows come concurrently, a batch waits this long for more (bigger commits)
    audit_linger_ms: float = 1.0
    # an audit row is evaluated for alerts once this much older than the backend deadline
    # and the audit commit timeout (the clocks' and the writer's margin)
    alert_settle_s: float = 5.0
    mirror_staleness_s: float = 2.0       # contracts/restrictions unproven this long: 503
    audit_signing_key_file: Path | None = None   # Ed25519 PEM; unset: generated in data_dir
    audit_checkpoint_s: float = 60.0      # chain heads signed this often (and at shutdown)
    # one JSON line per request on stdout; off unless asked for in code (tests, embedding),
    # on by default when read from the environment (`gateway serve`)
    access_log: str = "off"
    # webhooks (docs/operate.md, Notifications): where events are posted, the file holding the
    # HMAC-SHA256 key that signs them, how often and how long a delivery is retried
    webhook_url: str | None = None
    webhook_secret_file: Path | None = None
    webhook_max_attempts: int = 10
    webhook_backoff_s: float = 5.0         # the first retry; doubling, at most an hour
    webhook_timeout_s: float = 10.0        # one delivery attempt, end to end
    webhook_poll_s: float = 1.0            # how often the outbox is looked at when idle
    webhook_keep_days: int = 30            # finished events are deleted after this long
    dsr_scan_s: float = 60.0               # due-soon/overdue reminders and counts
    erasure_deadline_s: float = 300.0      # an accepted erasure's backend calls, all told
    # a ZIP export holds a pooled connection while it streams the access log (README.md,
    # Data-subject rights): how many may at once (None: a quarter of the pool), how long
    # one write may wait for a client that reads nothing, and the whole log's deadline
    export_db_slots: int | None = None
    export_write_timeout_s: float = 30.0
    stream_write_timeout_s: float = 30.0    # a file download is cut if no chunk is taken by then
    stream_deadline_s: float = 3600.0       # ... and if it is not through by then
    stream_json_above_bytes: int = 1 << 20  # a list answer larger is streamed, element by element
    export_log_deadline_s: float = 300.0
    # the gateway decides by the database's clock (gateway/clock.py); past this much
    # disagreement with the host's, it is not ready and `audit maintain` drops nothing
    max_clock_skew_s: float = 5.0
    # client connections (gateway/connections.py): an idle keep-alive connection is closed
    # after idle_timeout_s, a request head not complete within header_timeout_s is cut, and
    # at most max_client_connections are open per process (None: from RLIMIT_NOFILE)
    idle_timeout_s: float = 75.0      # above the 60 s idle timeout of common load balancers
    header_timeout_s: float = 15.0
    max_client_connections: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from GATEWAY_* variables; raise ConfigError on a malformed value."""
        env = os.environ if env is None else env
        host, port = _parse_listen(env.get("GATEWAY_LISTEN", "127.0.0.1:8080"))
        upstreams = {}
        for name, url in env.items():       # one per service of routes.yaml
            if name.startswith(UPSTREAM_PREFIX) and url:
                service = name[len(UPSTREAM_PREFIX):].lower().replace("_", "-")
                upstreams[service] = _check_url(name, url)
        policy_dir = env.get("GATEWAY_POLICY_DIR")
        key_file = env.get("GATEWAY_JWT_PUBLIC_KEY_FILE")
        return cls(
            listen_host=host,
            listen_port=port,
            database_url=env.get("GATEWAY_DATABASE_URL") or None,
            database_read_url=env.get("GATEWAY_DATABASE_READ_URL") or None,
            database_read_max_wait_s=_positive(env, "GATEWAY_DATABASE_READ_MAX_WAIT_S",
                                               cls.database_read_max_wait_s),
            database_listen_url=env.get("GATEWAY_DATABASE_LISTEN_URL") or None,
            data_dir=Path(env.get("GATEWAY_DATA_DIR", ".gateway")),
            upstreams=upstreams,
            jwt_secret=env.get("GATEWAY_JWT_SECRET") or None,
            jwt_jwks_url=env.get("GATEWAY_JWT_JWKS_URL") or None,
            jwt_public_key_file=Path(key_file) if key_file else None,
            jwt_issuer=env.get("GATEWAY_JWT_ISSUER") or None,
            jwt_audience=env.get("GATEWAY_JWT_AUDIENCE") or None,
            jwt_jwks_max_age_s=_positive(env, "GATEWAY_JWT_JWKS_MAX_AGE_S", cls.jwt_jwks_max_age_s),
            jwt_jwks_grace_s=_float(env, "GATEWAY_JWT_JWKS_GRACE_S", cls.jwt_jwks_grace_s),
            jwt_role_claim=env.get("GATEWAY_JWT_ROLE_CLAIM") or cls.jwt_role_claim,
            jwt_partner_claim=env.get("GATEWAY_JWT_PARTNER_CLAIM") or cls.jwt_partner_claim,
            jwt_euo_claim=env.get("GATEWAY_JWT_EUO_CLAIM") or cls.jwt_euo_claim,
            policy_dir=Path(policy_dir) if policy_dir else _default_policy_dir(),
            max_body_bytes=_int(env, "GATEWAY_MAX_BODY_BYTES", cls.max_body_bytes),
            backend_read_timeout_s=_float(env, "GATEWAY_BACKEND_TIMEOUT_S", 15.0),
            backend_deadline_s=_float(env, "GATEWAY_BACKEND_DEADLINE_S", cls.backend_deadline_s),
            max_json_answer_bytes=_int(env, "GATEWAY_MAX_JSON_ANSWER_BYTES",
                                       cls.max_json_answer_bytes),
            max_streams=_int(env, "GATEWAY_MAX_STREAMS", cls.max_streams),
            db_pool_max=_int(env, "GATEWAY_DB_POOL_MAX", cls.db_pool_max),
            db_connect_timeout_s=_float(env, "GATEWAY_DB_CONNECT_TIMEOUT_S",
                                        cls.db_connect_timeout_s),
            db_acquire_timeout_s=_positive(env, "GATEWAY_DB_ACQUIRE_TIMEOUT_S",
                                           cls.db_acquire_timeout_s),
            db_synchronous_commit=env.get("GATEWAY_DB_SYNCHRONOUS_COMMIT",
                                          cls.db_synchronous_commit),
            database_pooler=_choice(env, "GATEWAY_DATABASE_POOLER", cls.database_pooler,
                                    DATABASE_POOLERS),
            audit_retention_days=_int(env, "GATEWAY_AUDIT_RETENTION_DAYS", cls.audit_retention_days),
            audit_lanes=_int(env, "GATEWAY_AUDIT_LANES", cls.audit_lanes),
            audit_commit_timeout_s=_positive(env, "GATEWAY_AUDIT_COMMIT_TIMEOUT_S",
                                             cls.audit_commit_timeout_s),
            audit_linger_ms=_linger(env),
            alert_settle_s=_positive(env, "GATEWAY_ALERT_SETTLE_S", cls.alert_settle_s),
            mirror_staleness_s=_positive(env, "GATEWAY_MIRROR_STALENESS_S", cls.mirror_staleness_s),
            audit_signing_key_file=(Path(env["GATEWAY_AUDIT_SIGNING_KEY_FILE"])
                                    if env.get("GATEWAY_AUDIT_SIGNING_KEY_FILE") else None),
            audit_checkpoint_s=_positive(env, "GATEWAY_AUDIT_CHECKPOINT_S", cls.audit_checkpoint_s),
            access_log=_choice(env, "GATEWAY_ACCESS_LOG", "json", ACCESS_LOG_FORMATS),
            webhook_url=(_check_url("GATEWAY_WEBHOOK_URL", env["GATEWAY_WEBHOOK_URL"])
                         if env.get("GATEWAY_WEBHOOK_URL") else None),
            webhook_secret_file=(Path(env["GATEWAY_WEBHOOK_SECRET_FILE"])
                                 if env.get("GATEWAY_WEBHOOK_SECRET_FILE") else None),
            webhook_max_attempts=_int(env, "GATEWAY_WEBHOOK_MAX_ATTEMPTS",
                                      cls.webhook_max_attempts),
            webhook_backoff_s=_positive(env, "GATEWAY_WEBHOOK_BACKOFF_S", cls.webhook_backoff_s),
            webhook_timeout_s=_positive(env, "GATEWAY_WEBHOOK_TIMEOUT_S", cls.webhook_timeout_s),
            webhook_keep_days=_int(env, "GATEWAY_WEBHOOK_KEEP_DAYS", cls.webhook_keep_days),
            dsr_scan_s=_positive(env, "GATEWAY_DSR_SCAN_S", cls.dsr_scan_s),
            erasure_deadline_s=_positive(env, "GATEWAY_ERASURE_DEADLINE_S",
                                         cls.erasure_deadline_s),
            export_db_slots=_int(env, "GATEWAY_EXPORT_DB_SLOTS", None),
            export_write_timeout_s=_positive(env, "GATEWAY_EXPORT_WRITE_TIMEOUT_S",
                                             cls.export_write_timeout_s),
            stream_write_timeout_s=_positive(env, "GATEWAY_STREAM_WRITE_TIMEOUT_S",
                                             cls.stream_write_timeout_s),
            stream_deadline_s=_positive(env, "GATEWAY_STREAM_DEADLINE_S", cls.stream_deadline_s),
            stream_json_above_bytes=_int(env, "GATEWAY_STREAM_JSON_ABOVE_BYTES",
                                         cls.stream_json_above_bytes),
            export_log_deadline_s=_positive(env, "GATEWAY_EXPORT_LOG_DEADLINE_S",
                                            cls.export_log_deadline_s),
            max_clock_skew_s=_positive(env, "GATEWAY_MAX_CLOCK_SKEW_S", cls.max_clock_skew_s),
            idle_timeout_s=_positive(env, "GATEWAY_IDLE_TIMEOUT_S", cls.idle_timeout_s),
            header_timeout_s=_positive(env, "GATEWAY_HEADER_TIMEOUT_S", cls.header_timeout_s),
            max_client_connections=_int(env, "GATEWAY_MAX_CLIENT_CONNECTIONS", None),
        )

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    @property
    def discovers_keys(self) -> bool:
        """Whether the token keys come from the issuer's discovery document: the issuer is
        set and no key is (no secret, PEM file or JWKS URL)."""
        return bool(self.jwt_issuer) and not (self.jwt_secret or self.jwt_public_key_file
                                              or self.jwt_jwks_url)

    @property
    def asymmetric_keys(self) -> bool:
        """Whether tokens are checked with public keys (then never with HS256)."""
        return bool(self.jwt_public_key_file or self.jwt_jwks_url or self.discovers_keys)

    def check_for_serving(self, services: Iterable[str] = ()) -> None:
        """Raise ConfigError with every mistake that would stop `gateway serve`; `services`
        are the policy's (routes.yaml), each of which needs its upstream."""
        problems = []
        for service in sorted(services):
            if service not in self.upstreams:
                problems.append(
                    f"{upstream_variable(service)} is not set: the base URL of the "
                    f"{service} backend is required (routes.yaml has {service} routes)"
                )
        problems += self._jwt_problems()
        if self.jwt_public_key_file and not _readable(self.jwt_public_key_file):
            problems.append(f"GATEWAY_JWT_PUBLIC_KEY_FILE {self.jwt_public_key_file} is not readable")
        if self.webhook_url:
            try:
                webhook_secret(self)
            except ConfigError as e:
                problems.append(str(e))
        if self.db_synchronous_commit not in SYNCHRONOUS_COMMIT:
            problems.append("GATEWAY_DB_SYNCHRONOUS_COMMIT must be on or remote_apply (a "
                            "weaker level could lose rows of answered requests in a crash)")
        if self.webhook_keep_days < 1:
            problems.append("GATEWAY_WEBHOOK_KEEP_DAYS must be at least 1")
        if self.webhook_max_attempts < 1:
            problems.append("GATEWAY_WEBHOOK_MAX_ATTEMPTS must be at least 1")
        if not 1 <= export_db_slots(self) < self.db_pool_max - self.audit_lanes:
            problems.append("GATEWAY_EXPORT_DB_SLOTS must be at least 1 and leave connections "
                            "beside the audit lanes (below GATEWAY_DB_POOL_MAX minus "
                            "GATEWAY_AUDIT_LANES)")
        for name in POLICY_FILES:
            if not _readable(self.policy_dir / name):
                problems.append(f"policy file {self.policy_dir / name} is not readable")
        if problems:
            raise ConfigError("; ".join(problems))


    def _jwt_problems(self) -> list[str]:
        problems = []
        if not (self.jwt_secret or self.asymmetric_keys):
            problems.append(
                "no JWT key: set GATEWAY_JWT_ISSUER (keys discovered from the issuer), "
                "GATEWAY_JWT_JWKS_URL, GATEWAY_JWT_PUBLIC_KEY_FILE or GATEWAY_JWT_SECRET (HS256)"
            )
        if self.jwt_secret and self.asymmetric_keys:
            # one key of each kind invites algorithm confusion: a token signed with HS256
            # over a public key (which anyone may read) must never be tried
            problems.append("GATEWAY_JWT_SECRET (HS256) is set together with "
                            "GATEWAY_JWT_PUBLIC_KEY_FILE or GATEWAY_JWT_JWKS_URL: choose one")
        if self.discovers_keys:
            parts = urlsplit(self.jwt_issuer)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                problems.append(f"GATEWAY_JWT_ISSUER={self.jwt_issuer!r} is not an http(s) URL, so "
                                "its keys cannot be discovered: set GATEWAY_JWT_JWKS_URL")
            elif parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
                log.warning("GATEWAY_JWT_ISSUER %s is plain http: its keys could be swapped "
                            "on the way", self.jwt_issuer)
        if self.asymmetric_keys and not self.jwt_audience:
            log.warning("GATEWAY_JWT_AUDIENCE is not set: any token of the issuer is accepted, "
                        "one meant for another API or an ID token included")
        if not self.jwt_jwks_grace_s >= 0:
            problems.append("GATEWAY_JWT_JWKS_GRACE_S must be a number of seconds, 0 or more")
        for name, path in (("GATEWAY_JWT_ROLE_CLAIM", self.jwt_role_claim),
                           ("GATEWAY_JWT_PARTNER_CLAIM", self.jwt_partner_claim),
                           ("GATEWAY_JWT_EUO_CLAIM", self.jwt_euo_claim)):
            if not all(claim_path(path)):
                problems.append(f"{name}={path!r} is not a dotted claim path (a.b.c; \\. "
                                "for a dot in a name)")
        return problems


def claim_path(text: str) -> tuple[str, ...]:
    """A dotted claim path as its names: `realm_access.roles` -> (realm_access, roles);
    `\\.` is a dot within a name (`https://gw\\.example/roles`, one name)."""
    names, name, chars = [], [], iter(text)
    for c in chars:
        if c == "\\":
            name.append(next(chars, "\\"))
        elif c == ".":
            names.append("".join(name))
            name = []
        else:
            name.append(c)
    names.append("".join(name))
    return tuple(names)


SYNCHRONOUS_COMMIT = ("on", "remote_apply")


def export_db_slots(settings: Settings) -> int:
    """How many ZIP exports may hold a database connection at once: GATEWAY_EXPORT_DB_SLOTS,
    or a quarter of the pool, so that exports at their bound leave the rest the other 3/4."""
    if settings.export_db_slots is not None:
        return settings.export_db_slots
    return max(1, settings.db_pool_max // 4)


WEBHOOK_SECRET_MIN_BYTES = 32


def webhook_secret(settings: Settings) -> bytes:
    """The webhook signing key: the bytes of GATEWAY_WEBHOOK_SECRET_FILE, surrounding
    whitespace removed, at least 32 bytes; ConfigError otherwise."""
    if settings.webhook_secret_file is None:
        raise ConfigError("GATEWAY_WEBHOOK_URL is set but GATEWAY_WEBHOOK_SECRET_FILE is not: "
                          "webhooks are always signed")
    try:
        secret = Path(settings.webhook_secret_file).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"GATEWAY_WEBHOOK_SECRET_FILE {settings.webhook_secret_file} is not "
                          f"readable: {e.strerror}") from None
    if len(secret) < WEBHOOK_SECRET_MIN_BYTES:
        raise ConfigError(f"GATEWAY_WEBHOOK_SECRET_FILE {settings.webhook_secret_file} holds "
                          f"fewer than {WEBHOOK_SECRET_MIN_BYTES} bytes")
    return secret


def _default_policy_dir() -> Path:
    local = Path("policies")
    return local if (local / "routes.yaml").is_file() else DEFAULT_POLICY_DIR


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"GATEWAY_LISTEN={value!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}={value!r} is not an http(s) URL")
    return value.rstrip("/")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    return _number(env, name, default, int, "an integer")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, float, "a number")


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if not value > 0:   # zero or NaN would refuse every request
        raise ConfigError(f"{name}={env.get(name)!r} must be a number of seconds above 0")
    return value


def _linger(env: Mapping[str, str]) -> float:
    value = _float(env, "GATEWAY_AUDIT_LINGER_MS", Settings.audit_linger_ms)
    if not 0 <= value <= 50:     # longer would hold every answer for it
        raise ConfigError(f"GATEWAY_AUDIT_LINGER_MS={env.get('GATEWAY_AUDIT_LINGER_MS')!r} "
                          "must be between 0 and 50 (milliseconds)")
    return value


def _number(env: Mapping[str, str], name: str, default, kind, what: str):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {what}") from None
