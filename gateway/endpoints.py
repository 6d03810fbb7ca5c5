"""The gateway's own endpoints: authenticate the caller, check the role, audit the call."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import asyncpg
import orjson
from aiohttp import web

from . import pipeline
from .audit import AuditRow
from .catalog import ROLES
from .errors import Denied
from .principal import Principal

# set by a handler that committed its audit row itself (a streamed download must do so
# before its first byte)
AUDITED = web.RequestKey("audited", bool)
STARTED = web.RequestKey("started", float)

Handler = Callable[[web.Request, Principal, AuditRow], Awaitable[web.Response]]


def api(route: str, roles: tuple[str, ...] = ROLES) -> Callable[[Handler], Callable]:
    """Authenticate and audit a gateway API call; only `roles` may make it."""
    def wrap(handler: Handler):
        async def endpoint(request: web.Request) -> web.StreamResponse:
            gw = request.app[pipeline.GATEWAY]
            started = request[STARTED] = time.perf_counter()
            row = pipeline.new_row(request)
            row.service, row.route = "gateway", f"gateway:{route}"
            try:
                principal = await gw.authn.authenticate(request.headers.get("Authorization"))
                row.actor_sub, row.actor_role, row.actor_partner, row.actor_euo = (
                    principal.audit_fields())
                if principal.role not in roles:
                    raise Denied(403, "role_not_permitted",
                                 f"only {', '.join(roles)} may call this endpoint")
                try:
                    response = await handler(request, principal, row)
                except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    raise Denied(503, "database_unavailable",
                                 "the gateway's database cannot be reached") from None
            except Denied as d:
                pipeline.record_denial(request.app[pipeline.GATEWAY], row, d, started)
                raise
            if not request.get(AUDITED):
                pipeline.finish(row, response.status, response.content_length or 0, started)
                await gw.audit.commit(row)
            return response
        return endpoint
    return wrap


def json_response(body: object, status: int = 200) -> web.Response:
    """A JSON answer encoded with orjson."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def json_object(request: web.Request) -> dict:
    """The request's body as a JSON object, or Denied(400, bad_json)."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise Denied(400, "bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Denied(400, "bad_json", "the body must be a JSON object")
    return body
