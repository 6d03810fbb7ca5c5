"""/v1/admin/euos: the partner <-> EUO contracts, read and changed by provider staff; each
change commits with its audit row and lands in this process's mirror at once (contracts.py)."""

from __future__ import annotations

from datetime import date

from aiohttp import web

from .audit import AuditRow
from .context import GATEWAY
from .db import POOL, query
from .endpoints import CALL, IDENTIFIER, api, identifier, json_object, json_response
from .errors import Denied
from .principal import Principal


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/admin/euos", list_contracts)
    app.router.add_put("/v1/admin/euos/{euo}", put_contract)
    app.router.add_delete("/v1/admin/euos/{euo}", delete_contract)


@api("/v1/admin/euos", "contracts")
async def list_contracts(request: web.Request, principal: Principal, row: AuditRow) -> web.Response:
    """Every contract, with whether it is active today."""
    rows = await request.app[POOL].fetch(query("all_contracts"))
    today = request.app[GATEWAY].contracts.clock.today()   # the database's date
    return json_response({"contracts": [
        {"euo_id": r["euo_id"], "partner_id": r["partner_id"],
         "contract_end": r["contract_end"].isoformat() if r["contract_end"] else None,
         "active": r["contract_end"] is None or r["contract_end"] > today}
        for r in sorted(rows, key=lambda r: r["euo_id"])]})


@api("/v1/admin/euos/{euo}", "contracts")
async def put_contract(request: web.Request, principal: Principal, row: AuditRow) -> web.Response:
    """Create or change the commercial relationship of an EUO with its partner."""
    euo = identifier(request.match_info["euo"], "the EUO id")
    row.subject_euo = euo
    body = await json_object(request, ("partner_id", "contract_end"), "invalid_contract")
    partner = body.get("partner_id")
    if not isinstance(partner, str) or not IDENTIFIER.fullmatch(partner):
        raise Denied("invalid_contract",
                     "partner_id must be an identifier (1-128 of A-Z a-z 0-9 . _ ~ @ : -)")
    end = body.get("contract_end")
    if end is not None:
        try:
            end = date.fromisoformat(end) if isinstance(end, str) and len(end) == 10 else None
        except ValueError:
            end = None
        if end is None:
            raise Denied("invalid_contract", "contract_end must be YYYY-MM-DD or null")
    async def change(conn):
        return await conn.fetchrow(query("put_contract"), euo, partner, end)
    record = await request[CALL].allow(200, 0, change=change)
    request.app[GATEWAY].contracts.remember(euo, partner, end)
    return json_response({"euo_id": record["euo_id"], "partner_id": record["partner_id"],
                          "contract_end": end.isoformat() if end else None})


@api("/v1/admin/euos/{euo}", "contracts")
async def delete_contract(request: web.Request, principal: Principal,
                          row: AuditRow) -> web.Response:
    """End the relationship outright: the partner loses access at once."""
    euo = identifier(request.match_info["euo"], "the EUO id")
    row.subject_euo = euo
    async def change(conn):
        if await conn.fetchval(query("delete_contract"), euo) is None:
            raise Denied("no_contract", "this EUO has no contract")
    await request[CALL].allow(204, 0, change=change)
    request.app[GATEWAY].contracts.remember(euo, None, None)
    return web.Response(status=204)
