"""The gateway's own endpoints about itself: liveness, readiness, its OpenAPI document and
the catalog of data sets under the policy in force."""

from __future__ import annotations

import functools
import importlib.resources

import orjson
import yaml
from aiohttp import web

from .audit import AuditRow
from .check import PartitionWatch
from .clock import Clock
from .context import GATEWAY
from .endpoints import api, json_response
from .policy.retention import OWN_EXPORT_DECISION, OWN_EXPORT_EXEMPT
from .principal import Principal

PARTITIONS = web.AppKey("partitions", PartitionWatch)
CLOCK = web.AppKey("clock", Clock)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/catalog", catalog_view)
    app.router.add_get("/v1/openapi.json", openapi_view)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when audit rows commit within their deadline, the mirrors are proven fresh, the
    host's clock agrees with the database's and the backends answer. Everything is judged
    from memory — what the writer, the mirrors' heartbeats, the clock's readings and the last
    backend calls or probes saw — never asked here, so the answer comes at once whatever
    PostgreSQL or a backend does."""
    gw = request.app[GATEWAY]
    stale = [r for r in (gw.contracts.stale_reason(), gw.restrictions.stale_reason(),
                         gw.break_glass.stale_reason()) if r]
    keys = gw.authn.keys
    reasons = gw.audit.health() + stale + request.app[CLOCK].health()
    if keys is not None and keys.stale_reason():
        reasons.append(keys.stale_reason())       # no token can be verified
    backends = gw.backends.health()
    reasons += [f"backend_unreachable:{name}" for name, up in backends.items() if not up]
    body = {"status": "not_ready" if reasons else "ready",
            "database": not stale,   # each heartbeat is a round trip within the staleness bound
            "backends": backends}
    if reasons:
        body["reasons"] = reasons
    warnings = request.app[PARTITIONS].warnings()
    if keys is not None and keys.warning():
        warnings.append(keys.warning())           # the last good key set, within its grace
    if warnings:     # rows still commit (to audit_log_default): worth a look, not a 503
        body["warnings"] = warnings
    return json_response(body, status=503 if reasons else 200)


@functools.cache
def openapi_document() -> bytes:
    """gateway/openapi.yaml (shipped in the package) as JSON bytes, read once."""
    text = importlib.resources.files("gateway").joinpath("openapi.yaml").read_text("utf-8")
    return orjson.dumps(yaml.safe_load(text))


async def openapi_view(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of the gateway's own API (no token: it names no data)."""
    return web.Response(body=openapi_document(), content_type="application/json")


@api("/v1/catalog")
async def catalog_view(request: web.Request, principal: Principal, row: AuditRow) -> web.Response:
    """The data sets with their purpose, retention and who may see them under the policy."""
    gw = request.app[GATEWAY]
    policy = gw.policy
    out = []
    for ds in gw.catalog.data_sets.values():
        entry = ds.public()
        entry["visible_to"] = policy.who_may(ds.name)
        out.append(entry)
    return json_response({"policy_version": gw.policy_version, "data_sets": out,
                          "roles": [role.public() for role in gw.catalog.roles.values()],
                          "retention": {"own_export_exempt": OWN_EXPORT_EXEMPT,
                                        "decision": OWN_EXPORT_DECISION}})
