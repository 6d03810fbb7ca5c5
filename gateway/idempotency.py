"""Idempotency keys of the gateway API's writes (RFC draft `Idempotency-Key`).

A caller that sends a write with an `Idempotency-Key` and loses its answer (503
`outcome_unknown`, a timeout, a crash) sends it again with the same key and learns what
happened, never causing a second change. The key is recorded in the same transaction as
the change it carried (the audit writer's batch), so "the key is there" means "the change
committed"; the answer is stored right after. Keys belong to their caller (`actor`: role,
organisation and sub): one caller's key never tells another anything.

A repeat of a key whose answer is stored gets that answer again (`Idempotency-Replayed:
true`); one whose answer was lost with the confirmation gets 409 `idempotency_answer_lost`
naming the first request (the change was made); a key reused for another request (method,
path or body) gets 422 `idempotency_key_reused`; a key whose first request is still under
way gets 409 `idempotency_key_in_use`. A key is remembered for 24 hours (sql/queries.sql).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from .audit.writer import Change
from .db import DATABASE_ERRORS, POOL, query
from .errors import Denied
from .principal import Principal

KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")
WRITES = frozenset(("POST", "PUT", "PATCH", "DELETE"))
HEADER = "Idempotency-Key"


@dataclass(slots=True)
class Idempotent:
    """A write carrying a key: who, the key, what the request was."""
    actor: str
    key: str
    fingerprint: bytes
    request_id: str

    def keyed(self, change: Change, status: int) -> Change:
        """`change`, recording the key (and the status it is answered with) in its transaction."""
        async def run(conn: asyncpg.Connection):
            result = await change(conn)
            if await conn.fetchval(query("idempotency_key_add"), self.actor, self.key,
                                   self.fingerprint, self.request_id, status) is None:
                raise _in_use()
            return result
        return run

    async def answered(self, pool: asyncpg.Pool, response: web.Response) -> None:
        """Keep the answer for a repeat (best effort: without it a repeat gets 409
        idempotency_answer_lost, which still says the change was made)."""
        body = response.body if isinstance(response.body, bytes) else b""
        with contextlib.suppress(*DATABASE_ERRORS):
            await pool.execute(query("idempotency_key_answer"), self.actor, self.key, body)


async def begin(request: web.Request, principal: Principal,
                request_id: str) -> Idempotent | web.Response | None:
    """The write's key (None: it carries none), or the answer to a repeat of a known key."""
    if request.method not in WRITES or HEADER not in request.headers:
        return None
    given = request.headers.getall(HEADER)
    if len(given) != 1 or not KEY.fullmatch(given[0]):
        raise Denied("bad_idempotency_key",
                     "Idempotency-Key must be given once, 1-128 of A-Z a-z 0-9 . _ : -")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Denied("body_too_large", "the request body is too large") from None
    actor = f"{principal.role}/{_organisation(principal)}/{principal.sub}"
    fingerprint = hashlib.sha256(b"\0".join(
        (request.method.encode(), request.raw_path.encode(), body))).digest()
    known = await request.app[POOL].fetchrow(query("idempotency_key_get"), actor, given[0])
    if known is None:
        return Idempotent(actor, given[0], fingerprint, request_id)
    if bytes(known["fingerprint"]) != fingerprint:
        raise Denied("idempotency_key_reused",
                     "this Idempotency-Key was used for another request (method, path or body)")
    if known["body"] is None:
        raise Denied("idempotency_answer_lost",
                     f"the request with this Idempotency-Key was carried out (request id "
                     f"{known['request_id']}, status {known['status']}); its answer was not "
                     f"kept: read the resource back")
    response = web.Response(status=known["status"], body=bytes(known["body"]),
                            content_type="application/json" if known["body"] else None)
    response.headers["Idempotency-Replayed"] = "true"
    response.headers["X-Original-Request-Id"] = known["request_id"]
    return response


def _in_use() -> Denied:
    return Denied("idempotency_key_in_use",
                  "a request with this Idempotency-Key is under way; try again shortly")


def _organisation(principal: Principal) -> str:
    claim = principal.kind.tenant_claim
    return getattr(principal, claim) or "" if claim else ""
