"""Explain agrees with the proxy: for every route × role of the visibility matrix, the
decision and reason, and the data sets the proxy's audit row says it served; offline too."""

from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import quote

import orjson
import pytest

from .conftest import CALLERS, audit_row, call, gateway_main
from .test_visibility import CASES, T

CONTRACTS = ["--contract", "euo-acme=p-northwind", "--contract", "euo-globex=p-northwind"]


async def _explain(http, gateway, token, path, method="GET"):
    status, _, body = await call(http, "GET", f"{gateway}/v1/explain?method={method}&path="
                                 f"{quote(path, safe='')}", token)
    assert status == 200, body
    return orjson.loads(body)


@pytest.mark.parametrize(("path", "caller", "expected"), CASES)
async def test_explain_agrees_with_the_proxy(gateway, http, db, token_for, path, caller, expected):
    token = token_for(caller)
    status, headers, body = await call(http, "GET", gateway + path, token)
    row = await audit_row(db, headers["X-Request-Id"])
    said = await _explain(http, gateway, token, path)
    assert said["route"]["name"] == row["route"]
    assert said["status"] == status
    if status != 200:
        assert said["decision"] == "deny"
        assert said["reason"] == orjson.loads(body)["error"]["code"] == row["reason"]
        assert said["served"] == []
        return
    assert said["decision"] == "allow"
    maybe = (said["served_where_the_answer_shows"] or {}).get("data_sets", [])
    # everything the proxy served, explain named; what it named for the document as a whole,
    # the proxy served, or withheld only for what the answer held (its receipt: retention)
    assert set(row["data_sets"]) <= set(said["served"]) | set(maybe)
    receipt = orjson.loads(row["withheld"]) if row["withheld"] else {}
    by_answer = {ds for counts in receipt.values() for ds in counts}
    if len(said["route"]["binary"] or ()) > 1:     # which one a file is, its listing says
        assert row["data_sets"] and len(row["data_sets"]) == 1
    else:
        assert set(said["served"]) <= set(row["data_sets"]) | by_answer
    for line in said["policy_lines"]:
        assert line["line"] and line["rule"].startswith(f"p, {CALLERS[caller]['role']}, ")


async def test_explain_refusals_and_bad_input(gateway, http, token_for):
    said = await _explain(http, gateway, token_for("partner"), "/telephony/euos/euo-initech")
    assert said["decision"] == "deny" and said["reason"] == "no_active_contract"
    assert said["relations"] is None
    said = await _explain(http, gateway, token_for("staff"), f"{T}/users/u-alice/voicemails")
    assert said["reason"] == "dataset_not_permitted" and said["never_served"] == ["voicemails"]
    said = await _explain(http, gateway, token_for("admin"), "/telephony/nowhere")
    assert said["reason"] == "unknown_route" and said["route"] is None
    # a repeated method or path is refused, as the proxy refuses a repeated parameter:
    # explain must not answer for another request than the one a reader of the URL sees
    for query in ("method=GET", "method=BREW&path=/telephony/euos/euo-acme", "path=",
                  "path=/telephony/euos/euo-acme&path=/telephony/euos/euo-initech",
                  "method=GET&method=DELETE&path=/telephony/euos/euo-acme"):
        status, _, body = await call(http, "GET", f"{gateway}/v1/explain?{query}",
                                     token_for("admin"))
        assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_explain"
    status, _, _ = await call(http, "GET", f"{gateway}/v1/explain?path=/telephony/euos/euo-acme")
    assert status == 401


def _offline(*args: str) -> subprocess.CompletedProcess:
    """`gateway policy explain ARGS` (the shipped policy), in this process."""
    return gateway_main("policy", "explain", *args)


def _offline_process(*args: str) -> subprocess.CompletedProcess:
    """`gateway policy explain ARGS` as a process of its own (the command line itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", "policy", "explain", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    (("--role", "partner", "--sub", "x"), "needs the partner claim"),
    (("--role", "user", "--sub", "u-alice"), "needs the euo claim"),
    (("--role", "partner", "--sub", "x", "--partner", "p/x"), "bad_claim"),
    (("--role", "user", "--sub", "u\x07", "--euo", "euo-acme"), "bad_claim"),
])
def test_offline_explain_refuses_a_caller_no_token_could_be(args, message):
    """The proxy never meets a partner without a partner claim (401 missing_tenant_claim):
    explained offline it was allowed into every EUO without a contract (no partner equals
    no contract's partner). Such a caller is an error, exit 2, never a decision."""
    done = _offline(*args, f"{T}/users/u-alice")
    assert done.returncode == 2, done.stdout
    assert message in done.stderr and done.stdout == ""


async def test_offline_explain_matches_the_endpoint(gateway, http, token_for):
    path = f"{T}/users/u-alice/recordings"
    online = await _explain(http, gateway, token_for("partner"), path)
    c = CALLERS["partner"]
    done = _offline_process("--role", c["role"], "--sub", c["sub"], "--partner", c["partner"],
                            *CONTRACTS, path)
    assert done.returncode == 0, done.stderr
    offline = orjson.loads(done.stdout)
    for key in ("route", "relations", "decision", "reason", "served", "removed", "policy_lines"):
        assert offline[key] == online[key], key
    done = _offline("--role", "partner", "--sub", "x", "--partner", "p-northwind", path)
    assert orjson.loads(done.stdout)["reason"] == "no_active_contract"   # no contract given
    assert _offline("--role", "nobody", "--sub", "x", path).returncode == 2


@pytest.mark.parametrize(("path", "caller", "expected"), CASES)
async def test_staff_explaining_for_a_caller_answer_as_that_caller_would_be_answered(
        gateway, http, token_for, path, caller, expected):
    """Provider staff (explain_any) ask for any role and tenant: the answer is the one that
    caller gets asking itself, and says whose view it is and who asked."""
    claims = CALLERS[caller]
    own = await _explain(http, gateway, token_for(caller), path)
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in claims.items())
    status, _, body = await call(http, "GET", f"{gateway}/v1/explain?method=GET&path="
                                 f"{quote(path, safe='')}&{query}", token_for("staff"))
    assert status == 200, body
    for_them = orjson.loads(body)
    assert for_them.pop("explained_by") == {"role": "provider_staff", "sub": "staff-sam"}
    assert for_them == own
    assert for_them["caller"]["role"] == claims["role"]


@pytest.mark.parametrize(("who", "query", "status", "code"), [
    ("partner", "role=user&sub=u-alice&euo=euo-acme", 403, "role_not_permitted"),
    ("alice", "role=user&sub=u-bob&euo=euo-acme", 403, "role_not_permitted"),
    ("admin", "sub=u-bob", 403, "role_not_permitted"),
    ("staff", "role=janitor&sub=x", 400, "bad_explain"),
    ("staff", "sub=u-alice", 400, "bad_explain"),
    ("staff", "role=user&sub=u-alice", 400, "bad_identifier"),           # no euo claim
    ("staff", "role=user&sub=u-alice&euo=euo-acme&partner=p-northwind", 400, "bad_explain"),
    ("staff", "role=user&sub=%00&euo=euo-acme", 400, "bad_identifier"),
    ("staff", "role=user&role=partner&sub=u-alice&euo=euo-acme", 400, "bad_explain"),
])
async def test_explaining_for_another_caller_is_refused_unless_allowed_and_well_formed(
        gateway, http, token_for, who, query, status, code):
    got, _, body = await call(http, "GET", f"{gateway}/v1/explain?method=GET&path=/telephony/"
                              f"euos/euo-acme&{query}", token_for(who))
    assert (got, orjson.loads(body)["error"]["code"]) == (status, code)
