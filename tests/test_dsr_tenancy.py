"""Data-subject requests and restrictions belong to a user of an EUO: the same `sub` in
another EUO is another person, who neither reads nor restricts the first one's."""

from __future__ import annotations

import orjson

from .conftest import call, wait_for

ALICE_RECORD = "/telephony/euos/euo-acme/users/u-alice"


async def test_the_same_sub_in_another_euo_sees_none_of_the_requests(gateway, http, token_for):
    acme_alice = token_for("alice")
    other_alice = token_for(role="user", sub="u-alice", euo="euo-globex")
    status, _, body = await call(http, "POST", gateway + "/v1/me/requests", acme_alice,
                                 json={"type": "rectification", "data_sets": ["user_address"],
                                       "detail": "acme-alice-private-detail"})
    assert status == 201
    filed = orjson.loads(body)["id"]
    _, _, body = await call(http, "GET", gateway + "/v1/me/requests", other_alice)
    assert filed not in {r["id"] for r in orjson.loads(body)["requests"]}
    assert b"acme-alice-private-detail" not in body
    _, _, body = await call(http, "GET", gateway + "/v1/me/requests", acme_alice)
    assert filed in {r["id"] for r in orjson.loads(body)["requests"]}


async def test_a_restriction_blocks_only_its_own_euos_user(gateway, http, token_for, db):
    """u-alice of euo-globex restricting processing does not block staff from u-alice of
    euo-acme (and the NOTIFY payload names both, so other processes agree)."""
    other_alice = token_for(role="user", sub="u-alice", euo="euo-globex")
    status, _, body = await call(http, "POST", gateway + "/v1/me/requests", other_alice,
                                 json={"type": "restriction", "data_sets": ["user_mobile"]})
    assert status == 201
    try:
        status, _, body = await call(http, "GET", gateway + ALICE_RECORD, token_for("staff"))
        assert status == 200 and orjson.loads(body)["mobile"]
        # u-alice of euo-globex is not a user of the demo backend: the record is refused by
        # the backend, never by the restriction (which leaves every other data set)
        status, _, body = await call(http, "GET", gateway + "/telephony/euos/euo-globex/users/u-alice",
                                     token_for("staff"))
        assert orjson.loads(body)["error"]["code"] != "processing_restricted"
        status, _, body = await call(http, "PATCH", gateway + "/telephony/euos/euo-globex/users/u-alice",
                                     token_for("staff"), json={"mobile": "+320"})
        assert status == 403 and orjson.loads(body)["error"]["code"] == "processing_restricted"
        status, _, _ = await call(http, "PATCH", gateway + ALICE_RECORD, token_for("staff"),
                                  json={})
        assert status != 403
    finally:
        await db.execute("update dsr_requests set status = 'rejected' where euo_id = 'euo-globex'"
                         " and user_sub = 'u-alice' and type = 'restriction'")

        async def lifted():
            got, _, _ = await call(http, "PATCH", gateway + "/telephony/euos/euo-globex/users/u-alice",
                                   token_for("staff"), json={"mobile": "+320"})
            return got != 403
        assert await wait_for(lifted)


async def test_the_role_a_restriction_blocks_cannot_lift_it(gateway, http, token_for, db):
    """The partner that a restriction blocks may not reject it; the EUO's admin may."""
    status, _, body = await call(http, "POST", gateway + "/v1/me/requests",
                                 token_for(role="user", sub="u-carla", euo="euo-acme"),
                                 json={"type": "restriction", "data_sets": ["user_mobile"]})
    assert status == 201
    request_id = orjson.loads(body)["id"]
    try:
        status, _, body = await call(http, "PATCH", gateway + f"/v1/requests/{request_id}",
                                     token_for("partner"), json={"status": "rejected"})
        assert status == 403 and orjson.loads(body)["error"]["code"] == "role_not_permitted"
        status, _, _ = await call(http, "PATCH", gateway + f"/v1/requests/{request_id}",
                                  token_for("admin"), json={"status": "rejected"})
        assert status == 200
    finally:
        await db.execute("update dsr_requests set status = 'rejected' where id = $1::uuid",
                         request_id)
