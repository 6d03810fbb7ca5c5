"""Tenant isolation, and contracts managed through the gateway and shared between processes."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from .conftest import call, gateway_settings, running_gateway, wait_for


@pytest.mark.parametrize(("caller", "path", "code"), [
    (dict(role="partner", sub="pat", partner="p-northwind"), "/telephony/euos/euo-initech",
     "no_active_contract"),
    (dict(role="partner", sub="bea", partner="p-bluesky"), "/telephony/euos/euo-umbrella",
     "no_active_contract"),
    (dict(role="partner", sub="bea", partner="p-bluesky"), "/telephony/euos/euo-umbrella/cdrs",
     "no_active_contract"),
    (dict(role="partner", sub="zed", partner="p-unknown"), "/meeting/accounts/euo-acme",
     "no_active_contract"),
    (dict(role="euo_admin", sub="admin@acme", euo="euo-acme"), "/telephony/euos/euo-globex/users",
     "other_euo"),
    (dict(role="user", sub="u-alice", euo="euo-acme"),
     "/telephony/euos/euo-globex/users/u-dirk", "other_euo"),
    (dict(role="user", sub="u-alice", euo="euo-acme"), "/meeting/accounts/euo-globex",
     "other_euo"),
    (dict(role="user", sub="u-bob", euo="euo-acme"),
     "/telephony/euos/euo-acme/users/u-alice/recordings", "dataset_not_permitted"),
    (dict(role="user", sub="u-bob", euo="euo-acme"),
     "/meeting/accounts/euo-acme/organizers/u-alice", "dataset_not_permitted"),
])
async def test_callers_never_reach_other_tenants(gateway, http, token_for, backends, caller,
                                                 path, code):
    """A refused request answers 403 with its reason and is never sent upstream."""
    before = len(backends["seen"].requests)
    status, _, body = await call(http, "GET", gateway + path, token_for(**caller))
    assert status == 403
    assert orjson.loads(body)["error"]["code"] == code
    assert len(backends["seen"].requests) == before


async def test_user_in_a_list_sees_no_colleague(gateway, http, token_for):
    """A user reading the EUO's user list receives their own record only."""
    _, _, body = await call(http, "GET", gateway + "/telephony/euos/euo-acme/users",
                            token_for("bob"))
    assert [u["id"] for u in orjson.loads(body)["users"]] == ["u-bob"]


async def test_cdrs_query_for_a_colleague_returns_nothing_of_theirs(gateway, http, token_for):
    """`?user=` naming a colleague cannot widen what a user receives."""
    _, _, body = await call(http, "GET", gateway + "/telephony/euos/euo-acme/cdrs?user=u-alice",
                            token_for("bob"))
    assert orjson.loads(body)["cdrs"] == []


async def put_contract(http, gateway, token, euo, partner, end):
    return await call(http, "PUT", f"{gateway}/v1/admin/euos/{euo}", token,
                      json={"partner_id": partner, "contract_end": end})


async def test_contracts_are_managed_by_provider_staff_only(gateway, http, token_for):
    """Partners and EUO admins cannot grant themselves a contract."""
    for who in ("partner", "admin", "alice"):
        status, _, body = await put_contract(http, gateway, token_for(who), "euo-initech",
                                             "p-northwind", None)
        assert status == 403 and orjson.loads(body)["error"]["code"] == "role_not_permitted"


@pytest.mark.parametrize("body", [
    {"partner_id": ""}, {"partner_id": 7}, {"partner_id": "p", "contract_end": "tomorrow"},
    {"partner_id": "p", "contract_end": "2026-13-01"}, [],
])
async def test_bad_contract_bodies_are_refused(gateway, http, token_for, body):
    status, _, answer = await call(http, "PUT", f"{gateway}/v1/admin/euos/euo-new", token_for("staff"),
                                   json=body)
    assert status == 400
    assert orjson.loads(answer)["error"]["code"] in ("invalid_contract", "bad_json")


async def test_contract_changes_reach_every_gateway_process(gateway, http, token_for, backends,
                                                            database_url):
    """A contract put through one process is honoured by another within a second,
    an ended contract stops access, and deleting it stops access everywhere."""
    partner = token_for(role="partner", sub="pat", partner="p-bluesky")
    path = "/telephony/euos/euo-globex"
    staff = token_for("staff")
    async with running_gateway(gateway_settings(backends["urls"]), database_url) as other:
        assert (await call(http, "GET", other + path, partner))[0] == 403
        future = (dt.date.today() + dt.timedelta(days=30)).isoformat()
        status, _, _ = await put_contract(http, gateway, staff, "euo-globex", "p-bluesky", future)
        assert status == 200

        async def allowed():
            return (await call(http, "GET", other + path, partner))[0] == 200
        assert await wait_for(allowed, timeout=1.0)

        ended = (dt.date.today() - dt.timedelta(days=1)).isoformat()
        await put_contract(http, gateway, staff, "euo-globex", "p-bluesky", ended)

        async def refused():
            return (await call(http, "GET", other + path, partner))[0] == 403
        assert await wait_for(refused, timeout=1.0)

        await put_contract(http, gateway, staff, "euo-globex", "p-bluesky", None)
        assert await wait_for(allowed, timeout=1.0)
        status, _, _ = await call(http, "DELETE", f"{gateway}/v1/admin/euos/euo-globex", staff)
        assert status == 204
        assert await wait_for(refused, timeout=1.0)
    # the demo's own contract comes back for the other tests
    await put_contract(http, gateway, staff, "euo-globex", "p-northwind", None)
