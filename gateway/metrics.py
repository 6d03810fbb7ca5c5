"""Prometheus metrics (docs/operate.md, Observability).

Per request: requests by route, decision and status, their latency, and refusals by reason,
observed once per finished call (`Call`'s observer); per backend call, the time to its
answer's headers by service; per audit batch, its size and the time to its COMMIT. Gauges
sampled at scrape time (and every second under `--workers`): rows waiting in the audit
queue, pool connections in use, each mirror's staleness.

With `gateway serve --workers N` the parent sets PROMETHEUS_MULTIPROC_DIR to a fresh
directory before it forks: every worker writes its values to files there, and `/metrics`,
whichever worker answers, renders all of them (prometheus-client's multiprocess mode;
a dead worker's gauges are dropped by the parent, its counters kept). With one process,
its counters and histograms are plain numbers in this module (`PlainCounter`,
`PlainHistogram`: an add per observation, no lock, no value object), turned into the
exposition text only when scraped; under --workers, prometheus-client's own classes, which
keep each value in the worker's file.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Iterator, Mapping

import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    generate_latest,
)
from prometheus_client import Counter as _Counter
from prometheus_client import Histogram as _Histogram
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from .audit import AuditRow

SAMPLE_EVERY_S = 1.0      # under --workers, how often each worker writes its gauges
_LATENCY = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5)


def multiprocess_dir() -> str | None:
    """Where the workers of `serve --workers` keep their values (None: one process)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Count:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)      # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1    # `le`: a bound counts its value
        self.sum += value


class _Plain:
    """A labelled family of plain values, registered as a collector: the request path adds
    to a number (the event loop's thread only, so no lock); a scrape renders them."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                 registry: CollectorRegistry | None = None):
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str):
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {self.labelnames} expected, got {key}")
            child = self._children[key] = self._new()
        return child

    def _new(self):
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError


class PlainCounter(_Plain):
    """prometheus_client.Counter's interface (labels, inc), without its lock and value objects."""

    def _new(self) -> _Count:
        return _Count()

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._children.items():
            family.add_metric(key, child.value)
        yield family


class PlainHistogram(_Plain):
    """prometheus_client.Histogram's interface (labels, observe), as plain bucket counts."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (),
                 registry: CollectorRegistry | None = None, buckets: tuple[float, ...] = _LATENCY):
        self.bounds = tuple(float(b) for b in buckets if b != float("inf"))
        super().__init__(name, documentation, labelnames, registry)
        self._unlabelled = None if labelnames else self.labels()

    def _new(self) -> _Buckets:
        return _Buckets(self.bounds)

    def observe(self, value: float) -> None:
        self._unlabelled.observe(value)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for key, child in self._children.items():
            running, cumulative = 0, []
            for edge, n in zip(edges, child.counts, strict=True):
                running += n
                cumulative.append((edge, running))
            family.add_metric(key, cumulative, child.sum)
        yield family


class Metrics:
    """The gateway's metrics, and where the scrape-time gauges are read from."""

    def __init__(self):
        self.multiprocess = multiprocess_dir() is not None
        self.registry = r = CollectorRegistry()
        # one process: plain numbers; --workers: each value in the worker's file
        Counter, Histogram = (_Counter, _Histogram) if self.multiprocess else (  # noqa: N806
            PlainCounter, PlainHistogram)
        self.requests = Counter("gateway_requests", "Requests by route, decision and status",
                                ("route", "decision", "status"), registry=r)
        self.duration = Histogram("gateway_request_duration_seconds", "Time to answer",
                                  ("route",), registry=r, buckets=_LATENCY)
        self.refusals = Counter("gateway_refusals", "Refusals and failures by reason id",
                                ("reason",), registry=r)
        self.backend = Histogram("gateway_backend_duration_seconds",
                                 "Time from sending a backend call to its answer's headers",
                                 ("service",), registry=r, buckets=_LATENCY)
        self.batch_rows = Histogram("gateway_audit_batch_rows", "Rows per committed audit batch",
                                    registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500,
                                                         1000, 2000, 5000))
        self.batch_seconds = Histogram("gateway_audit_commit_seconds",
                                       "Time from taking an audit batch to its COMMIT",
                                       registry=r, buckets=_LATENCY)
        self.retention = Counter("gateway_retention_withheld",
                                 "Elements a backend served past their data set's retention and "
                                 "the gateway withheld, by data set and backend service",
                                 ("data_set", "service"), registry=r)
        # gauges are per process; across workers, summed (or the worst mirror), live ones only
        self.queue = Gauge("gateway_audit_queue_rows", "Audit rows waiting for a lane",
                           registry=r, multiprocess_mode="livesum")
        self.pool_in_use = Gauge("gateway_db_pool_connections_in_use",
                                 "PostgreSQL pool connections checked out (audit lanes included)",
                                 registry=r, multiprocess_mode="livesum")
        self.staleness = Gauge("gateway_mirror_staleness_seconds",
                               "Seconds since a mirror was last proven fresh (worst worker)",
                               ("mirror",), registry=r, multiprocess_mode="livemax")
        # data-subject requests (every worker reads the same table: the largest is the count)
        self.due_soon = Gauge("gateway_dsr_requests_due_soon",
                              "Unresolved data-subject requests due within 7 days",
                              registry=r, multiprocess_mode="livemax")
        self.overdue = Gauge("gateway_dsr_requests_overdue",
                             "Unresolved data-subject requests past their due date",
                             registry=r, multiprocess_mode="livemax")
        self.jwt_keys = Gauge("gateway_jwt_keys_stale",
                              "The token issuer's key set: 0 fresh, 1 past its maximum age and "
                              "kept for the grace (the issuer cannot be reached), 2 past the "
                              "grace too (every token refused)",
                              registry=r, multiprocess_mode="livemax")
        self.webhooks = Counter("gateway_webhook_deliveries",
                                "Webhook delivery attempts by outcome (delivered, failed, given_up)",
                                ("outcome",), registry=r)
        self.alerts = Counter("gateway_alerts_raised",
                              "Alerts raised by rule (alerts.yaml), by this process's evaluator",
                              ("rule",), registry=r)
        # the labelled children per (route, decision, status, reason): a dict hit per request
        # instead of labels()' validation and locking; bounded, as routes are the route
        # table's templates and reasons the error catalogue's ids
        self._children: dict[tuple, tuple] = {}
        self._backends: dict[str, Histogram] = {}
        self._sources: tuple | None = None
        self._requests = None
        self._keys = None

    def observe(self, row: AuditRow) -> None:
        """Count one finished call (Call's observer)."""
        key = (row.route, row.decision, row.status, row.reason)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._labelled(*key)
        requests, duration, refusals = children
        requests.inc()
        duration.observe(row.duration_ms / 1000)
        if refusals is not None:
            refusals.inc()
        if row.withheld is not None and '"retention"' in row.withheld:   # most are scope only
            retention = orjson.loads(row.withheld).get("retention")
            for data_set, n in (retention or {}).items():
                self.retention.labels(data_set, row.service or "none").inc(n)

    def _labelled(self, route: str | None, decision: str, status: int, reason: str | None):
        route = route or "unmatched"
        return (self.requests.labels(route, decision, str(status)), self.duration.labels(route),
                self.refusals.labels(reason) if decision != "allow" and reason else None)

    def observe_alert(self, rule: str) -> None:
        self.alerts.labels(rule).inc()

    def observe_backend(self, service: str, seconds: float) -> None:
        """One backend call answered after `seconds`."""
        child = self._backends.get(service)
        if child is None:
            child = self._backends[service] = self.backend.labels(service)
        child.observe(seconds)

    def observe_batch(self, rows: int, seconds: float) -> None:
        """One audit batch committed."""
        self.batch_rows.observe(rows)
        self.batch_seconds.observe(seconds)

    def watch(self, audit, pools: tuple, mirrors: Mapping[str, object]) -> None:
        """Where the gauges are read: the audit writer, the database pools (the shared one
        and the audit lanes'), the mirrors by name."""
        self._sources = (audit, pools, dict(mirrors))

    def watch_requests(self, webhooks) -> None:
        """Where the due-soon and overdue counts are read (the reminder scan keeps them)."""
        self._requests = webhooks

    def watch_keys(self, keys) -> None:
        """Where the key set's state is read (the issuer's keys, when tokens are checked with them)."""
        self._keys = keys

    def observe_webhook(self, outcome: str) -> None:
        self.webhooks.labels(outcome).inc()

    def sample(self) -> None:
        """Set the gauges from what they watch (cheap: no I/O)."""
        if self._requests is not None:
            self.due_soon.set(self._requests.due_soon)
            self.overdue.set(self._requests.overdue)
        if self._keys is not None:
            self.jwt_keys.set(2 if self._keys.lost() else 1 if self._keys.stale() else 0)
        if self._sources is None:
            return
        audit, pools, mirrors = self._sources
        self.queue.set(audit.queue_depth())
        self.pool_in_use.set(sum(p.get_size() - p.get_idle_size() for p in pools))
        for name, mirror in mirrors.items():
            self.staleness.labels(name).set(mirror.staleness())   # +Inf while lost

    async def keep_sampling(self) -> None:
        """Under --workers: write this worker's gauges every second, so a scrape answered
        by another worker still sees them recent."""
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_EVERY_S)

    def render(self) -> bytes:
        """The exposition text: this process's registry, or every worker's values."""
        self.sample()
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)


METRICS = web.AppKey("metrics", Metrics)


async def metrics_view(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
