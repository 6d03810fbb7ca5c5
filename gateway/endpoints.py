"""The gateway's own endpoints: authenticate the caller, check the role, audit the call."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from . import idempotency
from .audit import AuditRow
from .call import Call
from .context import GATEWAY
from .db import DATABASE_ERRORS, POOL
from .errors import Denied
from .grammar import CONTROL, IDENTIFIER, MAX_TEXT
from .principal import Principal

# the call of a handler that committed its audit row itself (a streamed download must do
# so before its first byte)
CALL = web.RequestKey("call", Call)

Handler = Callable[[web.Request, Principal, AuditRow], Awaitable[web.Response]]


ME = "me"      # the /v1/me/ endpoints: for roles whose holder is a data subject


def api(route: str, group: str | None = None) -> Callable[[Handler], Callable]:
    """Authenticate and audit a gateway API call. With a `group`, only roles whose
    gateway_api (roles.yaml) lists it may make it; ME: only data subjects."""
    def wrap(handler: Handler):
        async def endpoint(request: web.Request) -> web.StreamResponse:
            gw = request.app[GATEWAY]
            call = request[CALL] = gw.call(request)
            row = call.row
            row.service, row.route = "gateway", f"gateway:{route}"
            try:
                call.identify(await gw.authn.authenticate_request(request.headers))
                if group is not None and not _may(call.principal, group):
                    raise Denied("role_not_permitted", _NOT_PERMITTED[group is ME])
                try:
                    keyed = await idempotency.begin(request, call.principal, row.request_id)
                    if isinstance(keyed, web.Response):    # a repeat: the first answer again
                        row.reason = "idempotent_replay"
                        response = keyed
                    else:
                        call.idempotent = keyed
                        response = await handler(request, call.principal, row)
                except DATABASE_ERRORS:
                    raise Denied("database_unavailable",
                                 "the gateway's database cannot be reached") from None
                if not call.committed:    # a download commits before its first byte
                    await call.allow(response.status, response.content_length or 0)
                elif call.idempotent is not None:
                    await call.idempotent.answered(request.app[POOL], response)
                return response
            except Exception as e:
                if call.committed:
                    raise                  # the answer is under way: nothing left to say
                return await call.refuse(e)
        return endpoint
    return wrap


def _may(principal: Principal, group: str) -> bool:
    role = principal.kind
    return role.data_subject if group is ME else role.may(group)


_NOT_PERMITTED = {True: "only a data subject (a user of the EUO) may call this endpoint",
                  False: "your role may not call this endpoint (roles.yaml, gateway_api)"}


def json_response(body: object, status: int = 200) -> web.Response:
    """A JSON answer encoded with orjson."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def json_object(request: web.Request, fields: tuple[str, ...], code: str) -> dict:
    """The request's body as a JSON object, or Denied(400, bad_json); a field not among
    `fields` (what the endpoint takes) is Denied(400, code), never silently dropped: a
    misspelt field would otherwise change what was asked (a grant over the whole EUO, a
    contract without an end)."""
    try:
        raw = await request.read()
        body = orjson.loads(raw)
        # a key given twice would be read as its last, whatever the caller meant (or a
        # proxy in front read): refused like two Authorization headers. orjson keeps the
        # last silently, so the (bounded, small) body is walked once more to see
        json.loads(raw, object_pairs_hook=_once_each)
    except web.HTTPRequestEntityTooLarge:
        raise Denied("body_too_large", "the request body is too large") from None
    except orjson.JSONDecodeError:
        raise Denied("bad_json", "the body is not valid JSON") from None
    except _Repeated as e:
        raise Denied("bad_json", f"the body gives the field {str(e)[:64]!r} twice") from None
    except RecursionError:     # the stdlib's walk is recursive: deeper than orjson's own bound
        raise Denied("bad_json", "the body nests too deeply") from None
    if not isinstance(body, dict):
        raise Denied("bad_json", "the body must be a JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise Denied(code, f"this endpoint takes no field {unknown[0][:64]!r} "
                     f"(it takes {', '.join(fields)})")
    return body


class _Repeated(ValueError):
    pass


def _once_each(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _Repeated(key)
        seen.add(key)
    return dict(pairs)


def only(params, names: tuple[str, ...], code: str = "bad_filter") -> None:
    """Query parameters: each one of `names` (what the endpoint takes), each at most once;
    Denied(400, code) otherwise. A listing then answers only the question its URL asks: a
    misspelt filter is not ignored, a repeated one is not read as its first."""
    for name in set(params.keys()):
        if name not in names:
            raise Denied(code, f"this endpoint takes no parameter {name[:64]!r} "
                         f"(it takes {', '.join(names) or 'none'})")
        if len(params.getall(name)) > 1:
            raise Denied(code, f"{name[:64]!r} is given more than once")


def identifier(value: object, what: str) -> str:
    """An identifier of the route table's grammar, or Denied(400, bad_identifier)."""
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value) or value in (".", ".."):
        raise Denied("bad_identifier",
                     f"{what} must be 1-128 characters of A-Z a-z 0-9 . _ ~ @ : -")
    return value


def text(value: object, what: str, required: bool = False) -> str | None:
    """Free text a person typed: at most MAX_TEXT characters, no NUL or other control
    characters but newlines and tabs; Denied(400, invalid_text) otherwise."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or CONTROL.search(value):
        raise Denied("invalid_text",
                     f"{what} must be text of at most {MAX_TEXT} characters, without control "
                     "characters")
    return value
