"""Retention as data (docs/policy.md, Retention): elements just inside and just outside each
data set's retention, per anchor and per role; the CDR anonymisation; the outgoing fax's
PDF; the receipt in the audit row; the counter; the report; rules checked at load."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.catalog import PolicyError
from gateway.policy.catalog_files import load_catalog
from gateway.policy.retention import Duration, RuleError, cutoffs, parse_rule

from .conftest import (
    POLICY_DIR,
    audit_row,
    call,
    free_port,
    gateway_main,
    gateway_settings,
    running_gateway,
    serve_env,
)

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


def iso(t: datetime) -> str:
    return t.replace(microsecond=0).isoformat()


def now() -> datetime:
    return datetime.now(UTC)


async def receipt(db, headers) -> dict | None:
    row = await audit_row(db, headers["X-Request-Id"])
    return orjson.loads(row["withheld"]) if row["withheld"] else None


# --- a duration counted from each element's own time: connection statistics (180 days) --

ROLES_SEEING_STATS = [
    dict(role="provider_staff", sub="staff-sam"),
    dict(role="partner", sub="pat@northwind", partner="p-northwind"),
    dict(role="euo_admin", sub="admin@acme", euo="euo-acme"),
    dict(role="user", sub="u-alice", euo="euo-acme"),
]


def _stat(at) -> dict:
    return {"user_id": "u-alice", "at": at, "os": "Linux", "browser": "Firefox", "rtt_ms": 20,
            "jitter_ms": 2, "packet_loss": 0.0, "quality": "good", "errors": []}


@pytest.mark.parametrize("who", ROLES_SEEING_STATS, ids=lambda w: w["role"])
async def test_statistics_just_inside_180_days_are_served_just_outside_withheld(
        hostile_gateway, http, token_for, db, who):
    gw, backend = hostile_gateway
    t = now()
    inside, outside = iso(t - timedelta(days=180) + 5 * MINUTE), iso(t - timedelta(days=180) - MINUTE)
    backend.answer(lambda r: {"stats": [_stat(inside), _stat(outside)]})
    status, headers, body = await call(http, "GET", gw + "/meeting/accounts/euo-acme/connection-stats",
                                       token_for(**who))
    assert status == 200, body
    assert [s["at"] for s in orjson.loads(body)["stats"]] == [inside]
    assert (await receipt(db, headers))["retention"] == {"connection_statistics": 1}
    row = await audit_row(db, headers["X-Request-Id"])
    assert "stats[].at" in row["fields_removed"]


@pytest.mark.parametrize("at", [None, "last spring", True, ...])
async def test_an_element_whose_time_cannot_be_read_counts_as_past(hostile_gateway, http,
                                                                   token_for, at):
    gw, backend = hostile_gateway
    stat = _stat(at)
    if at is ...:
        del stat["at"]
    backend.answer(lambda r: {"stats": [stat, _stat(iso(now()))]})
    status, _, body = await call(http, "GET", gw + "/meeting/accounts/euo-acme/connection-stats",
                                 token_for("staff"))
    assert status == 200 and len(orjson.loads(body)["stats"]) == 1


# --- anchor `sent`: an outgoing fax is deleted immediately after sending ---------------

def _fax(direction: str, at: str, fax_id: str = "f1") -> dict:
    return {"id": fax_id, "direction": direction, "peer": "+3221234567", "at": at, "pages": 1}


async def test_an_outgoing_fax_is_past_once_sent_an_incoming_one_is_kept(hostile_gateway, http,
                                                                          token_for, db):
    gw, backend = hostile_gateway
    t = now()
    faxes = [_fax("out", iso(t + 5 * MINUTE), "queued"), _fax("out", iso(t - MINUTE), "sent"),
             _fax("in", iso(t - timedelta(days=900)), "old-in")]
    backend.answer(lambda r: {"faxes": faxes})
    status, headers, body = await call(
        http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice/faxes", token_for("alice"))
    assert status == 200
    assert [f["id"] for f in orjson.loads(body)["faxes"]] == ["queued", "old-in"]
    assert (await receipt(db, headers)) == {"retention": {"faxes_outgoing": 1}}


async def test_no_outgoing_fax_document_is_served(gateway, http, token_for, db):
    """The demo's outgoing fax was sent yesterday: its PDF is refused (410), its incoming
    one is served, and a fax the list does not name is not fetched at all."""
    base = gateway + "/telephony/euos/euo-acme/users/u-alice/faxes/"
    status, headers, body = await call(http, "GET", base + "fax-u-alice-out", token_for("alice"))
    assert status == 410 and orjson.loads(body)["error"]["code"] == "retention_expired"
    assert not body.startswith(b"%PDF")
    row = await audit_row(db, headers["X-Request-Id"])
    assert row["decision"] == "deny" and row["reason"] == "retention_expired"
    status, headers, body = await call(http, "GET", base + "fax-u-alice-in", token_for("alice"))
    assert status == 200 and body.startswith(b"%PDF")
    assert (await audit_row(db, headers["X-Request-Id"]))["data_sets"] == ["faxes_incoming"]
    status, _, _ = await call(http, "GET", base + "fax-nobody", token_for("alice"))
    assert status == 404


# --- anchor `contract_end`: the whole data set goes `keep` after the contract ended -----

def _months_ago(months: int, days: int = 0) -> date:
    return Duration(months=-months).after(now().date()) + timedelta(days=days)


# a partner and an EUO of these tests alone (audit scopes follow contract history)
RET_PARTNER = dict(role="partner", sub="pat@retention", partner="p-retention")


async def _contract(http, gw, token_for, euo: str, end: date | None) -> None:
    status, _, body = await call(http, "PUT", f"{gw}/v1/admin/euos/{euo}", token_for("staff"),
                                 json={"partner_id": "p-retention",
                                       "contract_end": end.isoformat() if end else None})
    assert status == 200, body


@pytest.fixture
async def euo_ret(hostile_gateway, http, token_for):
    """euo-ret, whose contract each test sets; deleted afterwards."""
    yield "euo-ret"
    await call(http, "DELETE", f"{hostile_gateway[0]}/v1/admin/euos/euo-ret", token_for("staff"))


def _euo_answer(euo):
    def answer(request):
        p = request.path
        if p == f"/euos/{euo}":
            return {"id": euo, "name": "Retained SA", "postal_address": "Somewhere 1",
                    "partner_id": "p-retention"}
        if p.endswith("/directory"):
            return {"entries": [{"name": "Reception", "number": "+3220000000"}]}
        if p.endswith("/cdrs"):
            return {"cdrs": [{"id": "c1", "user_id": "u-ret", "caller": "+3224567890",
                              "callee": "+3225551234", "start": iso(now() - HOUR),
                              "duration_s": 5, "direction": "out"}]}
        if p.endswith("/recordings"):
            return {"recordings": [{"id": "r1", "peer": "+322", "at": iso(now()), "duration_s": 1}]}
        return {}
    return answer


CONTRACT_ROLES = [
    dict(role="provider_staff", sub="staff-sam"),
    dict(role="euo_admin", sub="admin@ret", euo="euo-ret"),
    dict(role="user", sub="u-ret", euo="euo-ret"),
]


@pytest.mark.parametrize("who", CONTRACT_ROLES, ids=lambda w: w["role"])
async def test_euo_identity_and_call_history_go_6_months_after_the_contract(
        hostile_gateway, http, token_for, db, who, euo_ret):
    gw, backend = hostile_gateway
    backend.answer(_euo_answer("euo-ret"))
    token = token_for(**who)
    # ended 6 months ago less a day: still inside (the last day)
    await _contract(http, gw, token_for, "euo-ret", _months_ago(6, days=1))
    status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-ret", token)
    assert status == 200 and orjson.loads(body)["name"] == "Retained SA"
    status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-ret/cdrs", token)
    assert status == 200 and len(orjson.loads(body)["cdrs"]) == 1
    # ended 6 months ago today: past
    await _contract(http, gw, token_for, "euo-ret", _months_ago(6))
    status, headers, body = await call(http, "GET", gw + "/telephony/euos/euo-ret", token)
    assert status == 200 and b"Retained SA" not in body and b"Somewhere" not in body
    assert (await receipt(db, headers)) == {"retention": {"euo_identity": 1}}
    status, headers, body = await call(http, "GET", gw + "/telephony/euos/euo-ret/cdrs", token)
    assert status == 200 and orjson.loads(body)["cdrs"] == []
    assert (await receipt(db, headers))["retention"] == {"call_history": 1}


async def test_a_partner_sees_nothing_after_the_contract(hostile_gateway, http, token_for,
                                                        euo_ret):
    gw, backend = hostile_gateway
    backend.answer(_euo_answer("euo-ret"))
    await _contract(http, gw, token_for, "euo-ret", _months_ago(6))
    status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-ret",
                                 token_for(**RET_PARTNER))
    assert status == 403 and b"Retained" not in body


@pytest.mark.parametrize("who", CONTRACT_ROLES[:2], ids=lambda w: w["role"])
async def test_directory_and_recordings_go_at_contract_end(hostile_gateway, http, token_for, db,
                                                          who, euo_ret):
    gw, backend = hostile_gateway
    backend.answer(_euo_answer("euo-ret"))
    token = token_for(**who)
    await _contract(http, gw, token_for, "euo-ret", now().date() + timedelta(days=1))
    status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-ret/directory", token)
    assert status == 200 and b"Reception" in body
    await _contract(http, gw, token_for, "euo-ret", now().date())
    status, headers, body = await call(http, "GET", gw + "/telephony/euos/euo-ret/directory", token)
    assert status == 200 and b"Reception" not in body
    assert (await receipt(db, headers)) == {"retention": {"company_directory": 1}}
    if who["role"] == "euo_admin":
        status, _, body = await call(
            http, "GET", gw + "/telephony/euos/euo-ret/users/u-ret/recordings/r1", token)
        assert status == 410 and orjson.loads(body)["error"]["code"] == "retention_expired"


async def test_an_open_ended_contract_cuts_nothing(hostile_gateway, http, token_for, euo_ret):
    gw, backend = hostile_gateway
    backend.answer(_euo_answer("euo-ret"))
    await _contract(http, gw, token_for, "euo-ret", None)
    status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-ret", token_for("staff"))
    assert status == 200 and b"Retained SA" in body


@pytest.mark.parametrize("end", [date(9999, 12, 31), date(9999, 7, 1), date(1, 1, 1)], ids=str)
async def test_a_contract_end_at_the_edge_of_the_calendar_is_served_not_a_500(
        hostile_gateway, http, token_for, db, end, euo_ret):
    """9999-12-31 is a common "no end" sentinel: a contract end whose 6 months later (or a
    rule's window before now) falls off the calendar is a contract still running (or long
    ended), never an internal error for everyone reading the EUO."""
    gw, backend = hostile_gateway
    backend.answer(_euo_answer("euo-ret"))
    await _contract(http, gw, token_for, "euo-ret", end)
    running = end > now().date()
    for who in ("staff", RET_PARTNER):
        token = token_for(**who) if isinstance(who, dict) else token_for(who)
        for path in ("/telephony/euos/euo-ret", "/telephony/euos/euo-ret/cdrs",
                     "/telephony/euos/euo-ret/directory"):
            status, _, body = await call(http, "GET", gw + path, token)
            if who == RET_PARTNER and not running:
                assert status == 403, body
                continue
            assert status == 200, (path, body)
            assert (b"Retained SA" in body or b"Reception" in body or b"c1" in body) == running


def test_a_retention_window_off_the_calendar_saturates():
    """after() past the last day is later than any day; before() before the first is
    earlier than any time: comparisons stay right, nothing raises."""
    assert Duration(months=6).after(date.max) == date.max
    assert Duration(days=1).after(date(9999, 12, 31)) == date.max
    assert Duration(months=12 * 5000).before(now()) < now() - timedelta(days=365 * 2025)
    assert Duration(days=10 ** 6).before(now()).year == 1


@pytest.mark.slow
@settings(max_examples=500, deadline=None)
@given(d=st.dates(), days=st.integers(0, 10 ** 6), months=st.integers(0, 12 * 99999),
       t=st.datetimes(timezones=st.just(UTC)))
def test_any_window_from_any_day_is_a_day_never_an_error(d, days, months, t):
    """Property (the cousins of 9999-12-31): whatever the anchor and the rule, a window
    ends on a day no earlier than its anchor and starts no later than its reference."""
    keep = Duration(days=days, months=months)
    assert keep.after(d) >= d
    assert keep.before(t) <= t


async def test_the_demo_euo_whose_contract_ended_long_ago_shows_no_identity(gateway, http,
                                                                           token_for):
    """euo-umbrella's contract ended 2025-06-30: past + 6 months, its name is gone."""
    status, _, body = await call(http, "GET", gateway + "/telephony/euos/euo-umbrella",
                                 token_for("staff"))
    assert status == 200 and b"Umbrella" not in body and b"Leuven" not in body


# --- anonymisation: old CDRs lose the last 3 digits (90 days, the gateway's reading) ----

@pytest.mark.parametrize("who", [dict(role="provider_staff", sub="staff-sam"),
                                 dict(role="partner", sub="pat@northwind", partner="p-northwind"),
                                 dict(role="euo_admin", sub="admin@acme", euo="euo-acme"),
                                 dict(role="user", sub="u-alice", euo="euo-acme")],
                         ids=lambda w: w["role"])
async def test_cdrs_are_anonymised_just_after_90_days(hostile_gateway, http, token_for, db, who):
    gw, backend = hostile_gateway
    t = now()
    cdrs = [{"id": f"c{i}", "user_id": "u-alice", "caller": "+3224567890", "callee": "+3225551234",
             "start": iso(start), "duration_s": 5, "direction": "out"}
            for i, start in enumerate((t - timedelta(days=90) + 5 * MINUTE,
                                       t - timedelta(days=90) - MINUTE))]
    backend.answer(lambda r: {"cdrs": cdrs})
    status, headers, body = await call(http, "GET", gw + "/telephony/euos/euo-acme/cdrs",
                                       token_for(**who))
    assert status == 200
    inside, outside = orjson.loads(body)["cdrs"]
    assert inside["caller"] == "+3224567890" and outside["caller"] == "+3224567XXX"
    assert (await receipt(db, headers)) == {"masking": {"call_history": 1}}


# --- never_stored, paid_until: with a policy of the test's own ---------------------------

async def test_never_stored_withholds_everything_and_paid_until_cuts_nothing(
        hostile_gateway, database_url, http, token_for, tmp_path, db):
    _, backend = hostile_gateway
    policy = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, policy)
    doc = (policy / "datasets.yaml").read_text()
    doc = doc.replace("retention_rule: {anchor: never_stored, user_may_keep: true}",
                      "retention_rule: {anchor: never_stored}", 1)     # voicemails
    (policy / "datasets.yaml").write_text(doc)
    base = hostile_gateway[0]
    async with running_gateway(gateway_settings(
            {"telephony": backend.url, "meeting": backend.url}, policy_dir=policy),
            database_url) as gw:
        backend.answer(lambda r: {"voicemails": [{"id": "v1", "caller": "+32", "received_at":
                                                  iso(now()), "duration_s": 1}]})
        status, headers, body = await call(
            http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice/voicemails",
            token_for("alice"))
        assert status == 200 and b"v1" not in body
        assert (await receipt(db, headers)) == {"retention": {"voicemails": 1}}
        status, _, body = await call(
            http, "GET", gw + "/telephony/euos/euo-acme/users/u-alice/voicemails/v1",
            token_for("alice"))
        assert status == 410
    # the default policy: voicemails are kept by the user's choice; meeting data by payment
    backend.answer(lambda r: {"id": "euo-acme", "account_name": "acme", "company_name": "Acme"})
    status, _, body = await call(http, "GET", base + "/meeting/accounts/euo-acme",
                                 token_for("staff"))
    assert status == 200 and b"Acme" in body


# --- the catalog, the counter, the report -------------------------------------------------

async def test_the_catalog_shows_each_rule_and_the_export_decision(gateway, http, token_for):
    _, _, body = await call(http, "GET", gateway + "/v1/catalog", token_for("bob"))
    doc = orjson.loads(body)
    by_name = {d["name"]: d for d in doc["data_sets"]}
    assert by_name["call_history"]["retention_rule"] == {
        "anchor": "contract_end", "keep": "6 months", "anonymise_after": "90 days",
        "enforced": True, "own_export_exempt": False}
    assert by_name["connection_statistics"]["retention_rule"]["keep"] == "180 days"
    assert by_name["account_name"]["retention_rule"]["enforced"] is False
    assert by_name["account_name"]["retention_rule"]["not_enforced_because"]
    assert all(d["retention_rule"] for d in doc["data_sets"])
    assert doc["retention"]["own_export_exempt"] is False and doc["retention"]["decision"]


def _counter(text: str, data_set: str, service: str) -> float:
    for line in text.splitlines():
        if line.startswith("gateway_retention_withheld_total{") and \
                f'data_set="{data_set}"' in line and f'service="{service}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_the_counter_and_the_report_name_the_demo_backend_that_keeps_stats_too_long(
        gateway, http, token_for, backends, database_url, tmp_path):
    async def counted():
        _, _, text = await call(http, "GET", gateway + "/metrics")
        return _counter(text.decode(), "connection_statistics", "meeting")
    before = await counted()
    status, _, body = await call(http, "GET", gateway + "/meeting/accounts/euo-acme/connection-stats",
                                 token_for("partner"))
    assert status == 200 and b"Edge 109" not in body
    assert await counted() == before + 1

    status, _, body = await call(http, "GET", gateway + "/v1/admin/retention", token_for("staff"))
    assert status == 200, body
    lines = orjson.loads(body)["backends"]
    stats = [x for x in lines if x["data_set"] == "connection_statistics"]
    assert stats and stats[0]["service"] == "meeting" and stats[0]["reason"] == "retention"
    assert stats[0]["route"] == "meeting:/accounts/{euo}/connection-stats"
    assert stats[0]["elements"] >= 1 and "euo-acme" in stats[0]["some_euos"]
    assert stats[0]["last_seen"]

    status, _, body = await call(http, "GET", gateway + "/v1/admin/retention", token_for("partner"))
    assert status == 403
    status, _, body = await call(http, "GET", gateway + "/v1/admin/retention?from=yesterday",
                                 token_for("staff"))
    assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_filter"

    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway", "retention", "report"],
        env=serve_env(backends, database_url, tmp_path, free_port()), capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    printed = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert any(x["data_set"] == "connection_statistics" and x["service"] == "meeting"
               for x in printed)


# --- rules are checked at load -------------------------------------------------------------

@pytest.mark.parametrize(("rule", "message"), [
    ({"anchor": "contract_start", "keep": "1 days"}, "anchor must be one of"),
    ({"anchor": "contract_end"}, "keep is required with anchor contract_end"),
    ({"keep": "six months"}, "keep must be 'N days'"),
    ({"anchor": "never_stored", "keep": "1 days"}, "takes no keep"),
    ({"keep": "1 days", "forever": True}, "unknown key"),
    ("180 days", "must be a mapping"),
])
def test_a_bad_rule_is_refused_naming_the_file_and_the_data_set(tmp_path, rule, message):
    with pytest.raises(RuleError, match=message):
        parse_rule(rule)
    policy = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, policy)
    doc = yaml.safe_load((policy / "datasets.yaml").read_text())
    doc["datasets"]["connection_statistics"]["retention_rule"] = rule
    (policy / "datasets.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicyError, match=f"datasets.yaml: connection_statistics: .*{message}"):
        load_catalog(policy)


def test_a_missing_rule_or_age_field_is_refused(tmp_path):
    policy = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, policy)
    doc = yaml.safe_load((policy / "datasets.yaml").read_text())
    del doc["datasets"]["user_name"]["retention_rule"]
    (policy / "datasets.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicyError, match="datasets.yaml: user_name: missing retention_rule"):
        load_catalog(policy)
    shutil.copy(POLICY_DIR / "datasets.yaml", policy / "datasets.yaml")
    routes = (policy / "routes.yaml").read_text()
    (policy / "routes.yaml").write_text(routes.replace("            age: at\n", "", 1))
    with pytest.raises(PolicyError, match="faxes_outgoing counts from each element's time"):
        load_catalog(policy)


async def test_gateway_check_names_a_bad_rule(tmp_path, database_url):
    """(In a thread: the session's gateways keep their mirrors' heartbeats meanwhile; on the
    session's database, not an embedded one of its own, which the rule has nothing to do
    with.)"""
    policy = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, policy)
    doc = (policy / "datasets.yaml").read_text()
    (policy / "datasets.yaml").write_text(doc.replace("{keep: 180 days}", "{keep: 180 weeks}"))
    done = await asyncio.to_thread(gateway_main, "check", env={
        "GATEWAY_POLICY_DIR": str(policy), "GATEWAY_DATA_DIR": str(tmp_path),
        "GATEWAY_DATABASE_URL": database_url})
    assert done.returncode == 2
    assert "datasets.yaml: connection_statistics: retention_rule.keep" in done.stdout + done.stderr


def test_cutoffs_are_computed_once_per_request_and_look_the_contract_up_once():
    catalog = load_catalog(POLICY_DIR)
    route = next(r for r in catalog.routes if r.path == "/euos/{euo}/cdrs")
    asked = []

    def end(euo):
        asked.append(euo)
        return date(2020, 1, 1)
    cut = cutoffs(route.rules, "euo-x", now(), end)
    assert asked == ["euo-x"] and cut.expired == {"call_history"}
    assert set(cut.anonymise_before) == {"call_history"}
