"""create_app(settings, dsn): the only place the gateway is wired together."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import logging
import secrets
import signal
from collections.abc import Callable

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import (
    alerts_api,
    console,
    contracts_api,
    explain,
    export,
    pipeline,
    reads,
    retention_report,
    service_api,
    subject_requests,
)
from . import break_glass as break_glass_api
from .access_log import AccessLog
from .alerts import AlertEvaluator
from .audit import AuditRow, AuditWriter
from .audit import api as audit_api
from .audit import per_day as audit_per_day
from .audit import report as audit_report
from .audit import slices as audit_slices
from .audit.checkpoints import CHECKPOINTER, Checkpointer, signing_key
from .authn import Authenticator
from .backend_client import BackendClient
from .backends import Backends
from .call import AnonymousRefusals
from .check import PartitionWatch
from .clock import Clock
from .connections import ConnectionLimits, GuardedServer, connection_limits
from .context import GATEWAY, REQUEST_ID, Gateway
from .contracts import ContractCache
from .db import POOL, create_pool, durability_problems, ensure_partitions, migrate
from .errors import Denied, error_response
from .grants import BreakGlassCache
from .listener import Listener
from .metrics import METRICS, Metrics, metrics_view
from .policy.authz import Policy
from .policy.catalog import PolicyError
from .policy.policyset import PolicySet, load_policy_set
from .proxy import stamp
from .reads import READ_POOL_MAX, READS, Reads
from .restrictions import RestrictionCache
from .service_api import CLOCK, PARTITIONS
from .settings import Settings, export_db_slots, webhook_secret
from .webhooks import WEBHOOKS, Webhooks

log = logging.getLogger("gateway")

NEW_REQUEST_ID = web.AppKey("new_request_id", Callable[[], str])
CONNECTIONS = web.AppKey("connections", ConnectionLimits)


class MalformedRequests(logging.Filter):
    """aiohttp logs each request its parser refuses (400) at ERROR with a traceback; for a
    gateway on a hostile network that is one attacker-made traceback per packet. Such a
    record becomes one WARNING line with the parser's reason, and no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and exc.code == 400:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "%s: malformed HTTP request refused (400): %s", (
                record.getMessage(), type(exc).__name__)
            record.exc_info = record.exc_text = None
        return True


_MALFORMED = MalformedRequests()


def create_app(settings: Settings, dsn: str, reload_on_sighup: bool = False,
               policy_set: PolicySet | None = None, migrate: bool = True) -> web.Application:
    """The gateway application; resources open and close with its cleanup contexts. With
    reload_on_sighup (`gateway serve`), SIGHUP reloads the policy directory; `policy_set`
    is the policy in force (a supervisor's, so a replacement worker uses what the others
    use, not whatever the files say now), else it is loaded from the policy directory.
    With `migrate` (development), it migrates and creates the audit partitions ahead at
    start; `gateway serve` does that once before its workers start, or not at all
    (--no-migrate)."""
    policy_set = policy_set or load_policy_set(settings.policy_dir)
    catalog, policy = policy_set.catalog, policy_set.policy
    server_log = logging.getLogger("aiohttp.server")
    if _MALFORMED not in server_log.filters:
        server_log.addFilter(_MALFORMED)
    app = web.Application(middlewares=[_request_ids], client_max_size=settings.max_body_bytes)
    app[NEW_REQUEST_ID] = request_ids()
    app[CONNECTIONS] = connection_limits(settings)
    app.on_response_prepare.append(_private_answers)
    app.on_response_prepare.append(reads.stamp)
    metrics = app[METRICS] = Metrics()
    app.cleanup_ctx.append(_resources(settings, dsn, catalog, policy, metrics, migrate))
    app.cleanup_ctx.append(_observability(settings, metrics))
    service_api.add_routes(app)
    app.router.add_get("/metrics", metrics_view)
    contracts_api.add_routes(app)
    audit_api.add_routes(app)
    audit_per_day.add_routes(app)
    audit_slices.add_routes(app)
    audit_report.add_routes(app)
    explain.add_routes(app)
    subject_requests.add_routes(app)
    break_glass_api.add_routes(app)
    alerts_api.add_routes(app)
    export.add_routes(app)
    console.add_routes(app)
    retention_report.add_routes(app)
    app[POLICY_SET] = policy_set
    app[RELOADING] = asyncio.Lock()
    if reload_on_sighup:
        app.on_startup.append(_reload_on_sighup(settings))
        app.on_startup.append(_settle_gc)         # a serving process, not a test's app
    for service in catalog.services:
        app.router.add_route("*", f"/{service}/{{tail:.*}}", pipeline.handle)
    return app


def _resources(settings: Settings, dsn: str, catalog, policy: Policy, metrics: Metrics,
               migrating: bool):
    async def ctx(app: web.Application):
        # the audit lanes' connections are a pool of their own, out of GATEWAY_DB_POOL_MAX:
        # calls holding every other connection cannot keep a row from being written
        shared = settings.db_pool_max - settings.audit_lanes
        pool = await create_pool(dsn, min(settings.db_pool_min, shared), shared,
                                 settings.db_acquire_timeout_s, settings.db_synchronous_commit,
                                 settings.database_pooler)
        lanes_pool = await create_pool(dsn, settings.audit_lanes, settings.audit_lanes,
                                       settings.audit_commit_timeout_s,
                                       settings.db_synchronous_commit, settings.database_pooler)
        # the audit queries' standby, if any: a small pool of its own (gateway/reads.py),
        # empty at first: a standby down must not keep the gateway from starting
        standby = None if settings.database_read_url is None else await create_pool(
            settings.database_read_url, 0, READ_POOL_MAX, settings.db_acquire_timeout_s)
        app[READS] = Reads(pool, standby, settings.database_read_max_wait_s)
        if migrating:
            async with pool.acquire() as conn:
                await migrate(conn)
                await ensure_partitions(conn)
        partitions = app[PARTITIONS] = PartitionWatch(pool)
        await partitions.start()
        # before anything that decides by the time of day: the database's clock, read once
        clock = app[CLOCK] = Clock(pool, settings.max_clock_skew_s)
        await clock.start()
        # one LISTEN connection for every mirror, straight to PostgreSQL (not a pooler)
        listener = Listener(settings.database_listen_url or dsn, clock,
                            settings.mirror_staleness_s)
        contracts = ContractCache(pool, listener, settings.mirror_staleness_s, clock)
        await contracts.start()
        restrictions = RestrictionCache(pool, listener, settings.mirror_staleness_s)
        await restrictions.start()
        break_glass = BreakGlassCache(pool, listener, settings.mirror_staleness_s, clock)
        await break_glass.start()
        audit = AuditWriter(lanes_pool, settings.audit_queue_max, settings.audit_lanes,
                            settings.audit_commit_timeout_s, settings.audit_linger_ms / 1000)
        async with pool.acquire() as conn:     # then at each lane's (re)connection
            audit.not_durable = await durability_problems(conn)
        audit.start()
        anonymous = AnonymousRefusals(audit)
        anonymous.start()
        checkpointer = app[CHECKPOINTER] = Checkpointer(
            pool, audit.heads, signing_key(settings.audit_signing_key_file, settings.data_dir),
            settings.audit_checkpoint_s, leaves=audit.leaves, sealed=audit.sealed)
        await checkpointer.start()
        connector = aiohttp.TCPConnector(limit=settings.backend_connections,
                                         limit_per_host=settings.backend_connections,
                                         keepalive_timeout=30)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        client = BackendClient(settings.upstreams, settings.backend_connections,
                               settings.backend_connect_timeout_s, settings.backend_read_timeout_s)
        backends = Backends(settings.upstreams, client, settings.backend_deadline_s,
                            settings.max_json_answer_bytes)
        await backends.start_watching()
        webhooks = app[WEBHOOKS] = Webhooks(
            pool, session, settings.webhook_url,
            webhook_secret(settings) if settings.webhook_url else None,
            settings.webhook_max_attempts, settings.webhook_backoff_s, settings.webhook_timeout_s,
            settings.webhook_poll_s, settings.dsr_scan_s, observe=metrics.observe_webhook,
            keep_days=settings.webhook_keep_days)
        webhooks.start()
        metrics.watch_requests(webhooks)
        policy_set = app[POLICY_SET]
        alerts = app[ALERTS] = AlertEvaluator(
            pool, policy_set.alert_rules, policy_set.version,
            queue_event=lambda conn, payload: webhooks.queue_payload(conn, "alert.raised",
                                                                     payload),
            observe=metrics.observe_alert,
            # a row's `at` is its request's start; it commits once the backend answered
            settle_s=(settings.backend_deadline_s + settings.audit_commit_timeout_s
                      + settings.alert_settle_s))
        alerts.start()
        authn = Authenticator(settings, catalog.roles, clock)
        await authn.start()          # the issuer's key set, if any: fetched, then kept fresh
        app[POOL] = pool
        gateway = app[GATEWAY] = Gateway(
            catalog=catalog, policy=policy, authn=authn,
            contracts=contracts, restrictions=restrictions, break_glass=break_glass,
            backends=backends, audit=audit,
            anonymous=anonymous, max_body_bytes=settings.max_body_bytes,
            max_streams=settings.max_streams, policy_version=app[POLICY_SET].version,
            export_sources=app[POLICY_SET].export_sources, erasers=app[POLICY_SET].erasers,
            erasure_deadline_s=settings.erasure_deadline_s,
            export_slots=asyncio.Semaphore(export_db_slots(settings)),
            export_write_timeout_s=settings.export_write_timeout_s,
            stream_write_timeout_s=settings.stream_write_timeout_s,
            stream_deadline_s=settings.stream_deadline_s,
            stream_json_above_bytes=settings.stream_json_above_bytes,
            export_log_deadline_s=settings.export_log_deadline_s,
            new_request_id=app[NEW_REQUEST_ID])
        # an erasure still `accepted` well past its deadline ran in a gateway that stopped
        webhooks.sweeps.append(functools.partial(
            subject_requests.fail_interrupted_erasures, gateway, webhooks, pool,
            2 * settings.erasure_deadline_s + settings.backend_deadline_s))
        del gateway
        try:
            yield
        finally:
            await alerts.close()
            await webhooks.close()
            await authn.close()
            await anonymous.close()
            await audit.close()
            await checkpointer.close()        # seals the closed chains
            await contracts.close()
            await restrictions.close()
            await break_glass.close()
            await listener.close()
            await partitions.close()
            await clock.close()
            await backends.close()
            await client.close()
            await session.close()
            await pool.close()
            await lanes_pool.close()
            await app[READS].close()
    return ctx


class GatewayRunner(web.AppRunner):
    """The app's runner, whose server hands the proxy's paths to the pipeline directly
    (pipeline.direct): no route resolution, middleware or prepare signal per proxied
    request. Everything else, and any request if this runner is not used, goes through the
    app as before, with the same answers. Its server bounds the client connections
    (connections.py: how many, how long idle, how long a request's head may take)."""

    async def _make_server(self) -> web.Server:
        limits = self.app.get(CONNECTIONS)
        if limits is not None:
            self._kwargs["keepalive_timeout"] = limits.idle_timeout_s
        server = await super()._make_server()
        handler = pipeline.direct(self.app, server.request_handler)
        if limits is None:
            server.request_handler = handler
            return server
        return GuardedServer(handler, request_factory=server.request_factory,
                             handler_cancellation=server.handler_cancellation,
                             loop=asyncio.get_running_loop(), limits=limits,
                             **server._kwargs)


POLICY_SET = web.AppKey("policy_set", PolicySet)
ALERTS = web.AppKey("alerts", AlertEvaluator)


GC_THRESHOLDS = (GC_GEN0, GC_GEN1, GC_GEN2) = (20_000, 20, 100)


async def _settle_gc(app: web.Application) -> None:
    """Once started: what start-up built (modules, policy, route table, caches) lives as long
    as the process, so it is moved out of the collector's sight (gc.freeze), and the young
    generation is collected less often (a request makes a few hundred objects; most are
    freed by reference counting, never by the collector)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _reload_on_sighup(settings: Settings):
    async def install(app: web.Application) -> None:
        reloads: set[asyncio.Task] = set()      # held until done (the loop keeps weak refs)

        def on_sighup() -> None:
            task = asyncio.create_task(reload_policy(app, settings.policy_dir))
            reloads.add(task)
            task.add_done_callback(reloads.discard)
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    return install


RELOADING = web.AppKey("reloading", asyncio.Lock)


async def reload_policy(app: web.Application, policy_dir) -> bool:
    """Load the policy directory, check its floors and swap it in whole — or keep the
    policy in force and log why. Returns whether the new policy is in force.

    The files are read and checked in a thread, so the loop goes on serving (and the
    mirrors' heartbeats on being heard) meanwhile; only the swap runs on the loop. Reloads
    run one at a time, so the last one asked for is the one left in force."""
    gw = app[GATEWAY]
    async with app[RELOADING]:
        try:
            new = await asyncio.to_thread(load_policy_set, policy_dir)
        except (PolicyError, OSError) as e:
            log.error("policy reload refused, policy %s stays in force: %s", gw.policy_version, e)
            return False
        gw.use(new.catalog, new.policy, new.version, new.export_sources, new.erasers)
        if ALERTS in app:
            app[ALERTS].use(new.alert_rules, new.version)
    log.info("policy %s in force (reloaded from %s)", new.version, policy_dir)
    return True


def _observability(settings: Settings, metrics: Metrics):
    """Metrics and the access log, hooked onto the resources opened before: every finished
    call, backend call and audit batch is observed; the gauges read what they watch."""
    async def ctx(app: web.Application):
        gw = app[GATEWAY]
        access_log = AccessLog() if settings.access_log == "json" else None
        gw.observe = metrics.observe if access_log is None else _both(metrics.observe,
                                                                       access_log.write)
        gw.backends.observe = metrics.observe_backend
        gw.audit.on_batch = metrics.observe_batch
        mirrors = {"contracts": gw.contracts, "restrictions": gw.restrictions,
                   "break_glass": gw.break_glass}
        if gw.authn.keys is not None:
            mirrors["jwt_keys"] = gw.authn.keys      # the issuer's key set: its age
            metrics.watch_keys(gw.authn.keys)
        metrics.watch(gw.audit, (app[POOL], gw.audit.pool), mirrors)
        # under --workers a scrape reads every worker's gauges from their files: keep ours fresh
        sampling = asyncio.create_task(metrics.keep_sampling()) if metrics.multiprocess else None
        try:
            yield
        finally:
            if sampling is not None:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
            if access_log is not None:
                access_log.flush()
    return ctx


def _both(first: Callable[[AuditRow], None], second: Callable[[AuditRow], None]):
    def observe(row: AuditRow) -> None:
        first(row)
        second(row)
    return observe


@web.middleware
async def _request_ids(request: web.Request, handler) -> web.StreamResponse:
    """Give every request its own id and turn every failure into the contract's error body."""
    request_id = request[REQUEST_ID] = request.app[NEW_REQUEST_ID]()
    try:
        return await handler(request)
    except web.HTTPException as e:
        # aiohttp's own refusals (no such endpoint, body too large): audited like any other
        gw = request.app[GATEWAY]
        call = gw.call(request)
        with contextlib.suppress(Denied):
            call.identify(await gw.authn.authenticate_request(request.headers))
        return await call.refuse(_http_denial(e))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in request %s", request_id)
        return error_response(502, "internal_error",
                              "the gateway could not complete the request", request_id)


async def _private_answers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, streamed ones included: our request id, and no shared caching
    (every answer depends on who asks)."""
    stamp(response.headers, request.get(REQUEST_ID))


def request_ids() -> Callable[[], str]:
    """Unique, unguessable request ids without a system call each: a random prefix for
    this process and a counter."""
    prefix = secrets.token_hex(8)
    counter = itertools.count()
    return lambda: f"{prefix}{next(counter):08x}"


def _http_denial(e: web.HTTPException) -> Denied:
    """aiohttp's own refusals (no route, wrong method, body too large) as error bodies."""
    if e.status == 413:
        return Denied("body_too_large", "the request body is too large")
    if e.status in (404, 405):
        return Denied("not_found", "no such endpoint")
    return Denied("bad_request", e.reason or "request refused")
