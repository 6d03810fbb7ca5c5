"""Prometheus metrics: requests by route, decision and status, and their latency.

Each worker process keeps its own registry; scrape every worker (or run one) to see all.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from .audit import AuditRow

REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("gateway_requests", "Requests by route, decision and status",
                                ("route", "decision", "status"), registry=self.registry)
        self.duration = Histogram("gateway_request_duration_seconds", "Time to answer",
                                  ("route",), registry=self.registry,
                                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5))

    def observe(self, row: AuditRow) -> None:
        route = row.route or "unmatched"
        self.requests.labels(route, row.decision, str(row.status)).inc()
        self.duration.labels(route).observe(row.duration_ms / 1000)


async def metrics_view(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
