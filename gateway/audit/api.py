"""GET /v1/audit, /v1/audit/verify and /v1/me/access-log: asking "who saw this?".

Each caller is narrowed to their scope in SQL: provider staff see everything; a partner
its own actions and the EUOs it held, for the time it held them; an EUO admin its EUO.
Filters and the keyset cursor are parameters of one named query. A download
(`Accept: text/csv` or `application/x-ndjson`) streams from a server-side cursor, so its
memory stays flat however many rows match.
"""

from __future__ import annotations

import base64
import csv
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..context import GATEWAY
from ..db import query
from ..endpoints import CALL, ME, api, json_response, only
from ..errors import Denied
from ..principal import Principal, scope
from ..reads import READS
from .chain import verify
from .checkpoints import FORMAT, checkpoint_json, public_pem
from .writer import AuditRow

DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
PREFETCH = 1000
PUBLIC_FIELDS = ("at", "chain_id", "seq", "request_id", "actor_sub", "actor_role", "actor_partner",
                 "actor_euo", "method", "path", "service", "route", "data_sets", "fields_removed",
                 "subject_euo", "subject_users", "decision", "reason", "status", "bytes",
                 "duration_ms", "client_addr", "client_request_id", "requests", "trace_id",
                 "policy_version", "break_glass", "withheld", "phase", "access", "outcome")
DOWNLOADS = {"text/csv": "csv", "application/x-ndjson": "ndjson"}
FILTERS = ("actor", "subject_user", "euo", "dataset", "decision", "access", "from", "to")
ACCESS = ("served", "acted_upon", "named", "explained")   # sql/028
PAGING = ("limit", "cursor")
WINDOW = ("from", "to") + PAGING          # a data subject's own log: a window only


@dataclass(frozen=True)
class Filters:
    actor: str | None = None
    subject_user: str | None = None
    euo: str | None = None
    dataset: str | None = None
    decision: str | None = None
    access: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    cursor: tuple[datetime, uuid.UUID, int] | None = None
    limit: int | None = DEFAULT_LIMIT

    def args(self, scope_euo: str | None, scope_partner: str | None,
             colleagues: list[str] | None) -> list[Any]:
        """The audit_query parameters; `colleagues`: the roles of the caller's own
        organisation (None for the Provider's), whose actors the actor filter may match."""
        at, chain, seq = self.cursor or (None, None, None)
        return [self.actor, self.subject_user, self.euo, self.dataset, self.decision,
                self.since, self.until, at, chain, seq, scope_euo, scope_partner, self.limit,
                colleagues, self.access]


def parse_filters(params, download: bool, takes: tuple[str, ...] = FILTERS + PAGING) -> Filters:
    """Filters from query parameters; Denied(400, bad_filter) for a malformed one, a
    repeated one or one not in `takes`."""
    only(params, takes)
    decision = params.get("decision")
    if decision not in (None, "allow", "deny", "error"):
        raise Denied("bad_filter", "decision must be allow, deny or error")
    access = params.get("access")
    if access not in (None, *ACCESS):
        raise Denied("bad_filter", f"access must be one of {', '.join(ACCESS)}")
    raw_limit = params.get("limit")
    if raw_limit is None:
        limit = None if download else DEFAULT_LIMIT
    else:
        try:
            limit = int(raw_limit)
        except ValueError:
            raise Denied("bad_filter", "limit must be an integer") from None
        if not 1 <= limit <= (10**9 if download else MAX_LIMIT):
            raise Denied("bad_filter", f"limit must be between 1 and {MAX_LIMIT}")
    return Filters(
        actor=_word(params, "actor"), subject_user=_word(params, "subject_user"),
        euo=_word(params, "euo"), dataset=_word(params, "dataset"), decision=decision,
        access=access, since=_time(params, "from"), until=_time(params, "to"),
        cursor=decode_cursor(params["cursor"]) if "cursor" in params else None, limit=limit)


def _word(params, name: str) -> str | None:
    """A text filter: at most 256 printable characters (a NUL is the caller's mistake)."""
    raw = params.get(name)
    if raw is not None and (len(raw) > 256 or not raw.isprintable()):
        raise Denied("bad_filter", f"{name} must be at most 256 printable characters")
    return raw


def _time(params, name: str) -> datetime | None:
    raw = params.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise Denied("bad_filter", f"{name} must be an ISO 8601 time") from None
    if value.tzinfo is None:
        raise Denied("bad_filter", f"{name} must carry a time zone (e.g. Z)")
    return in_range(value, "bad_filter", name)


def in_range(value: datetime, code: str, name: str) -> datetime:
    """The time in UTC, or Denied(400) when it falls outside the years 1-9999 in UTC."""
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise Denied(code, f"{name} is outside the years 1-9999 (UTC)") from None


def encode_cursor(row) -> str:
    raw = orjson.dumps([row["at"].isoformat(), str(row["chain_id"]), row["seq"]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, uuid.UUID, int]:
    """The (time, chain, seq) a cursor names; Denied(400, bad_cursor) for anything else."""
    try:
        at, chain, seq = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not (isinstance(at, str) and isinstance(chain, str) and type(seq) is int
                and 0 <= seq < 2**63):
            raise ValueError("not a cursor")
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("no time zone")
        return in_range(when, "bad_cursor", "the cursor"), uuid.UUID(chain), seq
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise Denied("bad_cursor", "the cursor is not one this API gave out") from None


def public(row, principal: Principal | None = None) -> dict[str, Any]:
    """A row as the caller may see it (everything for the operator's CLI): other
    organisations' actors by role and organisation only, never by name or address."""
    out = {name: row.get(name) for name in PUBLIC_FIELDS}
    out["at"] = row["at"].isoformat()
    out["chain_id"] = str(row["chain_id"])
    out["break_glass"] = str(row["break_glass"]) if row["break_glass"] else None
    if out["withheld"] is not None:     # the receipt, stored as canonical JSON text
        out["withheld"] = orjson.loads(out["withheld"])
    if (principal is not None and principal.kind.tenant_claim is not None
            and not _same_organisation(row, principal)):
        # the trace id is the caller's to choose, like its request id: it could tie rows together
        out["actor_sub"] = out["client_addr"] = out["client_request_id"] = out["trace_id"] = None
    return out


def _same_organisation(row, principal: Principal) -> bool:
    """Whether the row's actor is of the caller's own organisation (same tenant claim and
    value; an actor whose role the policy no longer knows is nobody's colleague)."""
    claim = principal.kind.tenant_claim
    return (row["actor_role"] in colleagues(principal)
            and row[f"actor_{claim}"] == getattr(principal, claim))


def scoped_args(filters: Filters, principal: Principal) -> list[Any]:
    """The audit_query parameters for this caller: its filters within its scope."""
    return filters.args(*scope(principal), colleagues(principal))


def colleagues(principal: Principal) -> list[str] | None:
    """The roles of the caller's kind of organisation (its tenant claim); None: the
    Provider's own roles, which see every actor."""
    claim = principal.kind.tenant_claim
    return None if claim is None else list(principal.kind.peers)


@api("/v1/audit", "audit")
async def audit_query(request: web.Request, principal: Principal, row: AuditRow):
    """The access log within the caller's scope: a page of JSON, or a CSV/NDJSON download."""
    kind = DOWNLOADS.get(request.headers.get("Accept", "").split(";")[0].strip())
    filters = parse_filters(request.query, download=kind is not None)
    args = scoped_args(filters, principal)
    if kind is None:
        async with request.app[READS].acquire(request) as conn, conn.transaction():
            await conn.execute("set local plan_cache_mode = force_custom_plan")
            rows = await conn.fetch(query("audit_query"), *args)
        next_cursor = (encode_cursor(rows[-1])
                       if filters.limit is not None and len(rows) == filters.limit else None)
        return json_response({"rows": [public(r, principal) for r in rows],
                              "next_cursor": next_cursor})
    return await _download(request, principal, kind, query("audit_query"), args)


async def _download(request: web.Request, principal: Principal, kind: str, sql: str, args: list):
    """Stream every matching row from a server-side cursor. The first rows are fetched
    before the audit row is committed and the answer begins, so a query that fails is an
    error status, not an empty 200."""
    async with request.app[READS].acquire(request) as conn, conn.transaction():
        await conn.execute("set local plan_cache_mode = force_custom_plan")
        cursor = await conn.cursor(sql, *args)
        rows = await cursor.fetch(PREFETCH)
        await request[CALL].allow(200, 0)
        response = web.StreamResponse(headers={
            "Content-Type": "text/csv; charset=utf-8" if kind == "csv" else "application/x-ndjson",
            "Content-Disposition": f'attachment; filename="audit.{kind}"'})
        await response.prepare(request)
        buf = io.StringIO()
        writer = csv.writer(buf)
        if kind == "csv":
            writer.writerow(PUBLIC_FIELDS)      # a header even when nothing matches
        while rows:
            chunk: list[bytes] = []
            for record in rows:
                item = public(record, principal)
                if kind == "csv":
                    writer.writerow([_cell(item[f]) for f in PUBLIC_FIELDS])
                else:
                    chunk.append(orjson.dumps(item) + b"\n")
            if kind == "csv":
                chunk.append(buf.getvalue().encode())
                buf.seek(0)
                buf.truncate()
            await response.write(b"".join(chunk))
            rows = await cursor.fetch(PREFETCH)
        if kind == "csv" and buf.tell():
            await response.write(buf.getvalue().encode())
    await response.write_eof()
    return response


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ tab or CR gets a
    leading ' (OWASP's CSV-injection rule); NDJSON stays raw."""
    if isinstance(value, (list, dict)):
        value = orjson.dumps(value).decode()
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in _FORMULA:
        return "'" + value
    return value


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


@api("/v1/audit/verify", "audit_verify")
async def audit_verify(request: web.Request, principal: Principal, row: AuditRow):
    """Check every hash chain; say what was checked and where the first break is."""
    async with request.app[READS].acquire(request) as conn:
        report = await verify(conn)
    return json_response(report.public())


@api("/v1/me/access-log", ME)
async def access_log(request: web.Request, principal: Principal, row: AuditRow):
    """Who (by role and organisation, never a person) accessed the caller's data."""
    row.subject_euo, row.subject_users = principal.euo, [principal.sub]
    filters = parse_filters(request.query, download=False, takes=WINDOW)
    at, chain, seq = filters.cursor or (None, None, None)
    catalog = request.app[GATEWAY].catalog
    async with request.app[READS].acquire(request) as conn, conn.transaction():
        await conn.execute("set local plan_cache_mode = force_custom_plan")
        rows = await conn.fetch(query("access_log"), principal.sub, principal.euo, filters.since,
                                filters.until, at, chain, seq, filters.limit,
                                catalog.data_subject_roles)
    entries = [access_entry(catalog.roles, r) for r in rows]
    next_cursor = encode_cursor(rows[-1]) if len(rows) == filters.limit else None
    return json_response({"accesses": entries, "next_cursor": next_cursor})


def access_entry(roles, r) -> dict[str, Any]:
    """One access in a user's access log: who by role and organisation, never a person."""
    return {
        "at": r["at"].isoformat(),
        "accessor": {"role": r["actor_role"], "organisation": _organisation(roles, r)},
        "action": r["method"], "route": r["route"], "data_sets": r["data_sets"],
        "decision": r["decision"], "reason": r["reason"], "access": r["access"],
        # a change or a file is two rows: its intent, then its outcome (docs/audit.md, Guarantees)
        "phase": r["phase"], "outcome": r["outcome"],
        "break_glass": {"id": str(r["break_glass"]), "purpose": r["purpose"],
                        "ticket": r["ticket"]} if r["break_glass"] else None,
    }


async def newest_accesses(pool, catalog, sub: str, euo: str,
                          most: int) -> tuple[list[dict[str, Any]], bool]:
    """The newest `most` entries of a user's access log, and whether that is all of it."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute("set local plan_cache_mode = force_custom_plan")
        rows = await conn.fetch(query("access_log"), sub, euo, None, None, None, None, None,
                                most + 1, catalog.data_subject_roles)
    return [access_entry(catalog.roles, r) for r in rows[:most]], len(rows) <= most


async def access_log_pages(pool, catalog, sub: str, euo: str,
                           page: int = 1000) -> AsyncIterator[list[dict[str, Any]]]:
    """Every entry of a user's access log, newest first, a page at a time, in one snapshot
    so that a page boundary neither repeats nor skips a row (close it: `aclosing`)."""
    at = chain = seq = None
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                        readonly=True):
        await conn.execute("set local plan_cache_mode = force_custom_plan")
        while True:
            rows = await conn.fetch(query("access_log"), sub, euo, None, None, at, chain, seq,
                                    page, catalog.data_subject_roles)
            if rows:
                yield [access_entry(catalog.roles, r) for r in rows]
            if len(rows) < page:
                return
            at, chain, seq = rows[-1]["at"], rows[-1]["chain_id"], rows[-1]["seq"]


def _organisation(roles, row) -> str | None:
    role = roles.get(row["actor_role"])
    return role.organisation_of(row) if role is not None else None


async def audit_keys(request: web.Request) -> web.Response:
    """The public keys of the audit checkpoints, every one ever used (no token: they are
    public, so that anyone can verify)."""
    async with request.app[READS].acquire(request) as conn:
        rows = await conn.fetch(query("audit_keys"))
    return json_response({"keys": [{
        "key_id": r["key_id"], "algorithm": "Ed25519",
        "public_key_pem": public_pem(Ed25519PublicKey.from_public_bytes(bytes(r["public_key"]))),
        "first_used": r["first_used"].isoformat()} for r in rows]})


@api("/v1/audit/checkpoints", "audit")
async def audit_checkpoints(request: web.Request, principal: Principal, row: AuditRow):
    """Signed chain heads, oldest first; `after` (a checkpoint id) and `limit` page them."""
    only(request.query, ("after", "limit"))
    after = request.query.get("after")
    raw_limit = request.query.get("limit", str(DEFAULT_LIMIT))
    if (after is not None and not (after.isdigit() and int(after) < 2**63)) \
            or not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise Denied("bad_filter", f"after must be a checkpoint id, limit 1-{MAX_LIMIT}")
    async with request.app[READS].acquire(request) as conn:
        rows = await conn.fetch(query("audit_checkpoints"), int(after) if after else None,
                                int(raw_limit))
    return json_response({"format": FORMAT.decode().strip(),
                          "checkpoints": [checkpoint_json(r) for r in rows]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/audit/keys", audit_keys)
    app.router.add_get("/v1/audit/checkpoints", audit_checkpoints)
    app.router.add_get("/v1/audit", audit_query)
    app.router.add_get("/v1/audit/verify", audit_verify)
    app.router.add_get("/v1/me/access-log", access_log)
