"""The gateway's context: what every feature works with, built once by create_app and found
under the app key GATEWAY. It lies below the request path (pipeline.py) and the features,
and imports neither; they import it.

It has two parts:

- `Decider`, what decides: the catalog and policy in force (swapped whole by a reload), the
  route table's memo, the redaction plans, the retention cut-offs, and the mirrors a
  decision reads (contracts, restrictions, break-glass grants). It does no I/O of its own,
  so `gateway policy explain` builds one from the policy files alone (explain.Offline).
- `Resources`, what acts: the token verifier, the backends, the audit writer, the slots
  and bounds of streams and exports, the request id source.

`Gateway` is both, and opens an audited call (call.py) for a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from aiohttp import web

from .audit import AuditWriter
from .authn import Authenticator
from .backends import Backends
from .call import AnonymousRefusals, Call, Observer, client_request_id, traceparent
from .contracts import ContractCache
from .grants import BreakGlassCache
from .policy.authz import Policy
from .policy.catalog import Catalog, Route
from .policy.retention import Cutoffs, cutoffs
from .redact import RedactionPlan, make_plan
from .restrictions import RestrictionCache
from .stream import list_field
from .target import Targets


@dataclass(kw_only=True)
class Decider:
    """The policy in force and the mirrors a decision reads; what follows from them."""
    catalog: Catalog
    policy: Policy
    contracts: ContractCache            # or anything with active_partner / contract_end
    restrictions: RestrictionCache      # or anything with restricted(euo, user)
    break_glass: BreakGlassCache        # or anything with grant_for(principal, euo, user)
    policy_version: str = ""
    export_sources: Any = None         # export.yaml as loaded (ExportSpec: sources, purposes)
    erasers: tuple = ()                # routes.yaml's erasure: entries, as loaded

    def __post_init__(self):
        self._derive()

    def use(self, catalog: Catalog, policy: Policy, version: str, export_sources: Any,
            erasers: tuple = ()) -> None:
        """Swap the policy whole (no await in between: no request sees half of each).
        Requests under way finish with the routes and plans they started with."""
        self.catalog, self.policy, self.policy_version = catalog, policy, version
        self.export_sources, self.erasers = export_sources, erasers
        self._derive()

    def _derive(self) -> None:
        """What follows from the catalog and policy in force: the route memo, the plan
        cache and the path prefixes the server hands straight to the pipeline."""
        self.targets = Targets(self.catalog)
        self.list_field = lru_cache(maxsize=None)(list_field)
        self.plan = lru_cache(maxsize=4096)(self._plan)
        self.prefixes = tuple(f"/{service}/" for service in self.catalog.services)

    def _plan(self, route: Route, role: str, relations: frozenset[str]) -> RedactionPlan:
        return make_plan(route, role, relations, self.catalog, self.policy.granted)

    def cutoffs(self, route: Route, params: Mapping[str, str], now: datetime) -> Cutoffs:
        """The retention cut-offs of one request (the contract end looked up at most once;
        a stale contracts mirror refuses with 503)."""
        return cutoffs(route.rules, params[route.subject_euo], now, self.contracts.contract_end)


@dataclass(kw_only=True)
class Resources:
    """What acts on a decision, and the bounds it acts within (settings.py)."""
    authn: Authenticator
    backends: Backends
    audit: AuditWriter
    anonymous: AnonymousRefusals
    new_request_id: Callable[[], str]   # the app's (app.request_ids)
    max_body_bytes: int
    max_streams: int = 200             # files being copied through at once, per process
    streams: int = 0
    observe: Observer | None = None    # metrics and access log (wired in app.py)
    erasure_deadline_s: float = 300.0  # an accepted erasure's backend calls, all told
    # ZIP exports streaming the access log, each on a pooled connection (settings.py)
    export_slots: asyncio.Semaphore
    export_write_timeout_s: float = 30.0
    export_log_deadline_s: float = 300.0
    stream_write_timeout_s: float = 30.0   # a file download's client takes each chunk by then
    stream_deadline_s: float = 3600.0      # a whole file download is through by then
    stream_json_above_bytes: int = 1 << 20  # a list answer larger than this is streamed
    exporting: set[tuple[str | None, str]] = field(default_factory=set)  # (euo, sub) of ZIPs under way


@dataclass(kw_only=True)
class Gateway(Decider, Resources):
    """Everything the request path and the features need, built once by create_app."""

    def use(self, catalog: Catalog, policy: Policy, version: str, export_sources: Any,
            erasers: tuple = ()) -> None:
        """Swap the policy whole; the token verifier learns the new roles with it."""
        super().use(catalog, policy, version, export_sources, erasers)
        self.authn.use(catalog.roles)

    def call(self, request: web.BaseRequest, request_id: str | None = None) -> Call:
        """A new audited call for this HTTP request (its id given by the app's middleware,
        or `request_id` on the direct path)."""
        return self.new_call(request_id or request[REQUEST_ID], request.method, request.raw_path,
                             request.remote, client_request_id(request),
                             traceparent(request.headers))

    def new_call(self, request_id: str, method: str, path: str, client: str | None,
                 client_request_id: str | None = None, trace: str | None = None) -> Call:
        """A new audited call (an HTTP request, or one backend call of an export), its row
        naming the policy in force."""
        call = Call(self.audit, self.anonymous, request_id, method, path, client,
                    client_request_id, trace, self.observe)
        call.row.policy_version = self.policy_version
        return call


GATEWAY = web.AppKey("gateway", Gateway)
REQUEST_ID = web.RequestKey("request_id", str)
