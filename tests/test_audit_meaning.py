"""What an audit row means is explicit (`access`): a read serves, a write acts upon, a
data-subject request only names, an explain explains; a refusal touches nothing. A user's
access log shows an explain about her, and each row she can see whole names only her."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import orjson

from .conftest import call, wait_for

CARLA = "/telephony/euos/euo-acme/users/u-carla"


async def rows_of(db, request_id: str):
    return await db.fetch("select access, phase, decision, data_sets, subject_users "
                          "from audit_log where request_id = $1 order by at, seq", request_id)


async def test_each_kind_of_call_says_how_it_touched_the_data(gateway, http, token_for, db):
    """A read is `served`; a write `acted_upon` (its intent and outcome); filing a request
    `named` (it names data sets, it serves none: it was written as data served); a refusal
    touches nothing."""
    carla = token_for(role="user", sub="u-carla", euo="euo-acme")
    _, headers, _ = await call(http, "GET", gateway + CARLA, token_for("staff"))
    assert [r["access"] for r in await rows_of(db, headers["X-Request-Id"])] == ["served"]
    _, headers, _ = await call(http, "PATCH", gateway + CARLA, carla, json={"language": "fr"})
    assert [(r["phase"], r["access"]) for r in await rows_of(db, headers["X-Request-Id"])] == [
        ("intent", "acted_upon"), ("outcome", "acted_upon")]
    status, headers, _ = await call(http, "POST", gateway + "/v1/me/requests", carla,
                                    json={"type": "rectification", "data_sets": ["user_mobile"]})
    assert status == 201
    (filed,) = await rows_of(db, headers["X-Request-Id"])
    assert (filed["access"], filed["data_sets"]) == ("named", ["user_mobile"])
    status, headers, _ = await call(http, "GET", gateway + CARLA + "/voicemails", token_for("staff"))
    assert status == 403
    assert [r["access"] for r in await rows_of(db, headers["X-Request-Id"])] == [None]


async def test_an_explain_about_a_user_is_in_her_access_log(gateway, http, token_for):
    """A partner's explain of u-carla's record tells what it may see of her (her
    restrictions too): it once left no row in her access log."""
    path = quote(CARLA, safe="")
    status, _, _ = await call(http, "GET", f"{gateway}/v1/explain?path={path}",
                              token_for("partner"))
    assert status == 200

    async def logged():
        _, _, body = await call(http, "GET", gateway + "/v1/me/access-log?limit=200",
                                token_for(role="user", sub="u-carla", euo="euo-acme"))
        return [a for a in orjson.loads(body)["accesses"]
                if a["route"] == "gateway:/v1/explain" and a["access"] == "explained"]
    seen = await wait_for(logged, timeout=5)
    assert seen and seen[0]["accessor"] == {"role": "partner", "organisation": "p-northwind"}


async def test_the_audit_api_filters_by_access(gateway, http, token_for):
    """`access` is a filter of GET /v1/audit; a value it does not know is 400 bad_filter."""
    marker = f"u-{uuid.uuid4().hex[:6]}"
    await call(http, "GET", f"{gateway}/v1/explain?path=" + quote(f"/telephony/euos/euo-acme/users/{marker}",
                                                                   safe=""), token_for("staff"))
    status, _, body = await call(http, "GET", f"{gateway}/v1/audit?access=explained&subject_user={marker}",
                                 token_for("staff"))
    rows = orjson.loads(body)["rows"]
    assert status == 200 and rows and {r["access"] for r in rows} == {"explained"}
    status, _, body = await call(http, "GET", f"{gateway}/v1/audit?access=seen", token_for("staff"))
    assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_filter"
