"""Alerts (docs/audit.md, Alerts): alerts.yaml's rules are policy, loaded and checked with the
other policy files; a malformed file is refused by `gateway check`, serve and reload."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.audit import AuditRow
from gateway.context import GATEWAY
from gateway.demo.run import start_site
from gateway.policy.catalog import PolicyError
from gateway.policy.policyset import load_policy_set, policy_version
from gateway.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

from .conftest import (
    POLICY_DIR,
    call,
    free_port,
    gateway_main,
    gateway_settings,
    own_database,
    serve_env,
    shipped_policy_set,
    wait_for,
)


def _own_policy(tmp_path: Path) -> Path:
    policy = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, policy)
    return policy


def test_the_default_rules_load_and_count_in_the_policy_version(tmp_path):
    policy = _own_policy(tmp_path)
    rules = {rule.name: rule for rule in load_policy_set(policy).alert_rules}
    assert set(rules) == {"many_subjects", "many_subjects_partner",
                          "bulk_connection_statistics", "off_hours_access", "refusal_burst",
                          "repeated_break_glass"}
    assert rules["many_subjects"].baseline.factor == 5
    assert rules["refusal_burst"].window == timedelta(minutes=5)
    before = policy_version(policy)
    (policy / "alerts.yaml").write_text((policy / "alerts.yaml").read_text() + "\n# note\n")
    assert policy_version(policy) != before


BAD = [
    # (text replaced, by, what the error says)
    ("window: 5m", "window: 5 minutes", "rule refusal_burst: window must be a duration"),
    ("limit: 3\n", "limit: -3\n", "rule repeated_break_glass: limit must be"),
    ("data_set: connection_statistics", "data_set: connection_stats",
     "data_set 'connection_stats' is not in datasets.yaml"),
    ("measure: refusals", "measure: denials", "rule refusal_burst: measure must be one of"),
    ("roles: [provider_staff]\n", "roles: [staff]\n", "roles ['staff'] are not in roles.yaml"),
    ("{factor: 5, days: 30}", "{factor: 5, days: 365}", "baseline.days must be"),
    ('start: "07:00"', 'start: "21:00"', "working_hours.start must be before end"),
    ("name: refusal_burst", "name: many_subjects", "rule many_subjects is defined twice"),
    ("per: partner", "per: team", "per must be one of"),
    ("per: actor\n    window: 1h\n    limit: 100", "per: euo\n    window: 1h\n    limit: 100",
     "rule many_subjects: a baseline compares an actor with its role peers"),
    ("rules:", "rule:", "expected a mapping with a `rules:` list"),
]


@pytest.mark.parametrize("old, new, says", BAD)
def test_a_malformed_rule_is_a_policy_error_naming_it(tmp_path, old, new, says):
    policy = _own_policy(tmp_path)
    path = policy / "alerts.yaml"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(PolicyError) as e:
        load_policy_set(policy)
    assert "alerts.yaml" in str(e.value) and says in str(e.value), str(e.value)


def test_a_file_of_any_wrong_shape_is_a_policy_error(tmp_path):
    policy = _own_policy(tmp_path)
    for text in ("[]", "rules: {}", "rules: [1]", "rules: [{name: x, measure: rows}]",
                 "rules: [{name: x, measure: refusals, window: 1h, limit: 1, extra: 1}]",
                 "rules: [{name: X, measure: refusals, window: 1h, limit: 1}]",
                 "rules: [{name: x, measure: refusals, window: 1h, limit: true}]",
                 "rules: [{name: x, measure: refusals, window: 1h, limit: 1, "
                 "working_hours: {start: '07:00', end: '20:00'}}]", ": :"):
        (policy / "alerts.yaml").write_text(text)
        with pytest.raises(PolicyError, match="alerts.yaml"):
            load_policy_set(policy)
    (policy / "alerts.yaml").write_text("rules: []\n")
    assert load_policy_set(policy).alert_rules == ()


def _with_data_set(policy: Path, name: str) -> None:
    """A data set `name` added to the policy as connection_statistics is (its read lines),
    holding the CDR statistics' `errors` field, and named by the bulk rule instead."""
    doc = yaml.safe_load((policy / "datasets.yaml").read_text())
    doc["datasets"][name] = dict(doc["datasets"]["connection_statistics"])
    (policy / "datasets.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    lines = (policy / "policy.csv").read_text().splitlines()
    (policy / "policy.csv").write_text("\n".join(
        lines + [line.replace("connection_statistics", name)
                 for line in lines if "connection_statistics" in line]) + "\n")
    for file, old in (("routes.yaml", "errors: connection_statistics"),
                      ("alerts.yaml", "data_set: connection_statistics")):
        text = (policy / file).read_text()
        assert old in text
        (policy / file).write_text(text.replace(old, old.split(": ")[0] + ": " + name, 1))


@pytest.mark.parametrize("name", ["connection'statistics", "connection\\statistics",
                                  "connection statistics"])
def test_a_rule_may_not_name_a_data_set_its_query_could_not_hold(tmp_path, name):
    """The evaluator writes a rule's data set into its query as a literal: a name with a
    quote, a backslash or a space is refused at load, naming the rule (it failed as a
    ValueError when the evaluator was built, at start or on a reload); the same policy
    with a plain new name loads."""
    policy = _own_policy(tmp_path)
    _with_data_set(policy, name)
    with pytest.raises(PolicyError, match="rule bulk_connection_statistics: data_set .* cannot "
                                          "be named by a rule"):
        load_policy_set(policy)
    plain = _own_policy(tmp_path / "plain")
    _with_data_set(plain, "connection_stats")
    rules = {rule.name: rule for rule in load_policy_set(plain).alert_rules}
    assert rules["bulk_connection_statistics"].data_set == "connection_stats"


async def test_gateway_check_refuses_a_bad_alerts_file_and_a_missing_one(
        database_url, backends, tmp_path):
    policy = _own_policy(tmp_path)
    path = policy / "alerts.yaml"
    path.write_text(path.read_text().replace("window: 5m", "window: soon", 1))
    env = {k: v for k, v in serve_env(backends, database_url, tmp_path, free_port(),
                                      GATEWAY_POLICY_DIR=str(policy)).items()
           if k.startswith("GATEWAY_")}
    done = await asyncio.to_thread(gateway_main, "check", env=env)
    assert done.returncode == 2
    assert any(line.startswith(f"problem: policy {policy}") and "alerts.yaml: rule "
               "refusal_burst: window must be" in line
               for line in done.stdout.splitlines()), done.stdout
    path.unlink()
    done = await asyncio.to_thread(gateway_main, "check", env=env)
    assert done.returncode == 2
    assert f"problem: policy file {path} is not readable" in done.stdout, done.stdout


# --- the evaluator and the API, on a real gateway and PostgreSQL ---------------------------

EVE = dict(role="provider_staff", sub="staff-eve")          # trawls 400 users' records
SAM = dict(role="provider_staff", sub="staff-sam")          # opens break-glass 4 times
PAT = dict(role="partner", sub="pat@northwind", partner="p-northwind")   # probes
BLUE = dict(role="partner", sub="bo@bluesky", partner="p-bluesky")
ADMIN = dict(role="euo_admin", sub="admin@acme", euo="euo-acme")


@contextlib.asynccontextmanager
async def alerting_gateway(backends, database_url, template_database, tmp_path,
                           instances: int = 2):
    """Gateways (two instances, each with its evaluator) of one database of their own,
    posting webhooks to a receiver of the test; yields (the first's base URL, its app, the
    receiver's bodies, the database pool, both base URLs)."""
    received: list[tuple[dict, bytes]] = []

    async def receive(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)
    hook = web.Application()
    hook.router.add_post("/in", receive)
    hook_runner = web.AppRunner(hook)
    await hook_runner.setup()
    site = web.TCPSite(hook_runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    key = tmp_path / "webhook.key"
    key.write_bytes(b"k" * 32 + b"\n")
    # short deadlines: a row is evaluated once older than both and the settling margin
    settings = gateway_settings(backends["urls"], webhook_url=f"http://127.0.0.1:{port}/in",
                                webhook_secret_file=key, webhook_poll_s=0.05,
                                backend_deadline_s=2.0, audit_commit_timeout_s=2.0,
                                alert_settle_s=0.5)
    async with own_database(database_url, template_database) as dsn:
        apps, runners, bases = [], [], []
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            for _ in range(instances):
                apps.append(create_app(settings, dsn,
                                       policy_set=shipped_policy_set(settings.policy_dir)))
                runner, gw_port = await start_site(apps[-1], "127.0.0.1", 0)
                runners.append(runner)
                bases.append(f"http://127.0.0.1:{gw_port}")
            yield bases[0], apps[0], received, pool, bases
        finally:
            await pool.close()
            for runner in runners:
                await runner.cleanup()
            await hook_runner.cleanup()


def _read(who: dict, at: datetime, users: list[str], euo: str) -> AuditRow:
    return AuditRow(at=at, request_id=uuid.uuid4().hex, actor_sub=who["sub"],
                    actor_role=who["role"], actor_partner=who.get("partner"),
                    actor_euo=who.get("euo"), method="GET",
                    path=f"/telephony/euos/{euo}/users/{users[0]}", service="telephony",
                    data_sets=["user_name"], subject_euo=euo, subject_users=users,
                    decision="allow", status=200, access="served")


async def _alerts(http, base, token) -> list[dict]:
    status, _, body = await call(http, "GET", base + "/v1/alerts", token)
    assert status == 200, body
    return orjson.loads(body)["alerts"]


async def test_a_trawl_a_probe_and_repeated_break_glass_raise_one_alert_each(
        backends, database_url, template_database, http, token_for, tmp_path):
    async with alerting_gateway(backends, database_url, template_database, tmp_path) as (
            base, app, received, pool, bases):
        writer = app[GATEWAY].audit
        staff = token_for(**SAM)
        # the evaluator has started: its watermark is set before anything below is written
        assert await wait_for(lambda: pool.fetchval("select count(*) from alert_watermark"),
                              timeout=10)
        now = datetime.now(UTC)
        # 30 days' history of two colleagues, about 20 users an hour each (the baseline),
        # written before the watermark: history, never itself alerted on
        rows = [_read(dict(role="provider_staff", sub=peer), now - timedelta(days=day)
                      + timedelta(seconds=n), [f"u-hist-{n}"], "euo-acme")
                for peer in ("staff-ann", "staff-bo") for day in range(1, 6) for n in range(20)]
        # normal traffic now: a colleague looks at 20 users, a partner's portal at a few
        rows += [_read(dict(role="provider_staff", sub="staff-ann"), now, [f"u-norm-{n}"],
                       "euo-acme") for n in range(20)]
        rows += [_read(PAT, now, [f"u-pat-{n}"], "euo-acme") for n in range(5)]
        # the trawl: 400 users of two partners' customers in a couple of minutes
        rows += [_read(EVE, now + timedelta(milliseconds=10 * n), [f"u-{n}"],
                       ("euo-acme", "euo-initech")[n % 2]) for n in range(400)]
        # a partner's portal reads connection statistics 501 times (of one user: a partner
        # reading them in bulk is the rule, however many users)
        bulk = _read(BLUE, now, ["u-farid"], "euo-initech")
        rows += [dataclasses.replace(bulk, request_id=uuid.uuid4().hex,
                                     at=now + timedelta(milliseconds=n),
                                     data_sets=["connection_statistics"]) for n in range(501)]
        await asyncio.gather(*(writer.commit(row) for row in rows))   # batched by the writer
        # the probe: a partner's token refused 25 times (another partner's customer)
        for n in range(25):
            status, _, _ = await call(http, "GET", base + f"/telephony/euos/euo-initech/"
                                      f"users/u-guess-{n}", token_for(**PAT))
            assert status == 403
        # break-glass opened four times by one person
        for n in range(4):
            status, _, body = await call(http, "POST", base + "/v1/break-glass", staff, json={
                "euo": "euo-initech", "purpose": "incident", "ticket": f"INC-{n}",
                "minutes": 5})
            assert status == 201, body

        off_hours = not (7 <= now.hour < 20 and now.isoweekday() <= 5)
        expected = {("many_subjects", "staff-eve"), ("refusal_burst", "pat@northwind"),
                    ("repeated_break_glass", "staff-sam")}
        expected.add(("bulk_connection_statistics", "p-bluesky"))
        if off_hours:           # the trawl's and the bulk read's calls are outside them too
            expected |= {("off_hours_access", "staff-eve"), ("off_hours_access", "bo@bluesky")}

        async def raised():
            got = await _alerts(http, base, staff)
            return {(a["rule"], a["key"]) for a in got} >= expected and got
        assert await wait_for(raised, timeout=30), await _alerts(http, base, staff)
        # and nothing more once every row written is evaluated: each once, nothing about
        # normal traffic
        last = await pool.fetchval("select max(at) from audit_log")
        assert await wait_for(lambda: pool.fetchval(
            "select at >= $1 from alert_watermark", last), timeout=30)
        every = await _alerts(http, base, staff)
        assert sorted((a["rule"], a["key"]) for a in every) == sorted(expected), every
        trawl = next(a for a in every if a["rule"] == "many_subjects")
        # raised as soon as the limit was passed (the evaluator's pass at that moment)
        assert 100 < trawl["observed"] <= 400 and trawl["limit"] == 100
        assert trawl["baseline"] == 20 and trawl["factor"] == 5
        assert sorted(trawl["subject_euos"]) == ["euo-acme", "euo-initech"]
        # the link lists exactly the rows counted
        status, _, body = await call(http, "GET", base + trawl["audit"] + "&limit=1000", staff)
        assert status == 200, body
        listed = orjson.loads(body)["rows"]
        assert len(listed) == trawl["observed"]
        probe = next(a for a in every if a["rule"] == "refusal_burst")
        assert probe["observed"] == 25 and probe["subject_euos"] == []

        # visible to the right people only
        pat = {(a["rule"], a["key"]) for a in await _alerts(http, base, token_for(**PAT))}
        assert ("refusal_burst", "pat@northwind") in pat          # its own person
        assert ("many_subjects", None) in pat                     # its customer's data
        assert all(r != "repeated_break_glass" for r, _ in pat)   # bluesky's customer
        pat_trawl = next(a for a in await _alerts(http, base, token_for(**PAT))
                         if a["rule"] == "many_subjects")
        assert pat_trawl["subject_euos"] == ["euo-acme"] and pat_trawl["actor"]["sub"] is None
        assert "actor=" not in pat_trawl["audit"]
        blue = {a["rule"] for a in await _alerts(http, base, token_for(**BLUE))}
        assert "refusal_burst" not in blue and {"many_subjects", "repeated_break_glass",
                                                "bulk_connection_statistics"} <= blue
        assert "bulk_connection_statistics" not in {r for r, _ in pat}
        admin = {a["rule"] for a in await _alerts(http, base, token_for(**ADMIN))}
        assert admin == {"many_subjects"} | ({"off_hours_access"} if off_hours else set())
        status, _, _ = await call(http, "GET", base + "/v1/alerts", token_for("alice"))
        assert status == 403

        # the webhook: one signed alert.raised per alert
        async def posted():
            return len([b for _, b in received if b"alert.raised" in b]) == len(expected)
        assert await wait_for(posted, timeout=10), received
        headers, body = next((h, b) for h, b in received if b"alert.raised" in b)
        assert verify(b"k" * 32, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])

        # the metric: counted by whichever instance's evaluator raised it, once in all
        counted = 0
        for one in bases:
            status, _, body = await call(http, "GET", one + "/metrics")
            counted += body.decode().count('gateway_alerts_raised_total{rule="many_subjects"} 1.0')
        assert counted == 1

        # acknowledged with a note, audited in the same transaction
        status, _, body = await call(http, "POST", base + f"/v1/alerts/{probe['id']}/ack",
                                     token_for(**BLUE), json={"note": "not mine"})
        assert status == 404, body                                 # not in its scope
        status, _, body = await call(http, "POST", base + f"/v1/alerts/{probe['id']}/ack",
                                     staff, json={})
        assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_ack", body
        status, _, body = await call(http, "POST", base + f"/v1/alerts/{probe['id']}/ack",
                                     staff, json={"note": "called the partner"}, headers={
                                         "X-Request-Id": "ack-probe-1"})
        assert status == 200, body
        acked = orjson.loads(body)
        assert acked["acked_by"] == "provider_staff:staff-sam"
        assert acked["ack_note"] == "called the partner"
        rows = await pool.fetch(
            "select decision, status, reason from audit_log where path = $1 and method = 'POST'"
            " order by at", f"/v1/alerts/{probe['id']}/ack")
        assert [(r["decision"], r["status"]) for r in rows] == [
            ("deny", 404), ("deny", 400), ("allow", 200)], rows
        status, _, body = await call(http, "GET", base + "/v1/alerts?acked=false", staff)
        assert probe["id"] not in {a["id"] for a in orjson.loads(body)["alerts"]}


async def test_normal_demo_traffic_raises_no_alert(backends, database_url, template_database,
                                                   http, token_for, tmp_path):
    """Each demo caller at work through the proxy, a few refusals among it (a stale link, a
    user of another EUO): every row evaluated, no alert."""
    async with alerting_gateway(backends, database_url, template_database, tmp_path) as (
            base, _, received, pool, bases):
        assert await wait_for(lambda: pool.fetchval("select count(*) from alert_watermark"),
                              timeout=10)
        acme = "/telephony/euos/euo-acme/users"
        work = [("staff", acme), ("staff", acme + "/u-alice"), ("staff", acme + "/u-bob"),
                ("partner", acme), ("partner", acme + "/u-bob"),
                ("partner", "/telephony/euos/euo-initech/users"),            # refused
                ("admin", acme), ("admin", acme + "/u-alice/voicemails"),
                ("admin", "/telephony/euos/euo-globex/users"),               # refused
                ("alice", acme + "/u-alice"), ("alice", acme + "/u-alice/voicemails"),
                ("bob", acme + "/u-bob"), ("bob", acme + "/u-alice/voicemails")]   # refused
        statuses = set()
        for n in range(3):
            for who, path in work:
                status, _, _ = await call(http, "GET", bases[n % 2] + path, token_for(who))
                statuses.add(status)
        assert 200 in statuses and 403 in statuses
        last = await pool.fetchval("select max(at) from audit_log")
        assert await wait_for(lambda: pool.fetchval(
            "select at >= $1 from alert_watermark", last), timeout=30)
        assert await pool.fetchval("select count(*) from alerts") == 0
        assert await _alerts(http, base, token_for("staff")) == []
        assert not [b for _, b in received if b"alert.raised" in b]


async def test_a_reload_gives_the_evaluator_the_new_rules(backends, database_url,
                                                          template_database, tmp_path):
    """SIGHUP's reload swaps alerts.yaml's rules into the running evaluator, or keeps the
    rules in force when the new file is refused."""
    from gateway.app import ALERTS, reload_policy
    policy = _own_policy(tmp_path)
    settings = gateway_settings(backends["urls"], policy_dir=policy)
    async with own_database(database_url, template_database) as dsn:
        app = create_app(settings, dsn)
        runner, _ = await start_site(app, "127.0.0.1", 0)
        try:
            assert len(app[ALERTS].rules) == 6
            path = policy / "alerts.yaml"
            good = path.read_text()
            path.write_text(good.replace("window: 5m", "window: later"))
            assert not await reload_policy(app, policy)
            assert len(app[ALERTS].rules) == 6
            path.write_text("rules: []\n")
            assert await reload_policy(app, policy)
            assert app[ALERTS].rules == () and app[ALERTS].version == policy_version(policy)
        finally:
            await runner.cleanup()
