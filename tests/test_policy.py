"""The floors check refuses a policy that would lower a floor (docs/contract.md), and the route
table and catalog are data: a new data set, route or service needs no Python change."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys

import orjson
import pytest
import yaml as _yaml
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.demo.run import seed_contracts, start_site
from gateway.policy.authz import load_policy
from gateway.policy.catalog import PolicyError
from gateway.policy.catalog_files import load_catalog
from gateway.settings import ConfigError, Settings

from .conftest import POLICY_DIR, call, free_port, gateway_main, gateway_settings, running_gateway


def load(path):
    return load_policy(path, load_catalog(path))


def test_the_shipped_policy_holds_every_floor():
    load(POLICY_DIR)


@pytest.mark.parametrize(("line", "complaint"), [
    ("p, provider_staff, any, voicemails, read", "hidden from provider_staff"),
    ("p, provider_staff, any, personal_directory, read", "hidden from provider_staff"),
    ("p, provider_staff, any, call_recordings, delete", "hidden from provider_staff"),
    ("p, partner, contracted_partner, chat_messages, read", "hidden from partner"),
    ("p, partner, any, euo_identity, read", "can never hold relation 'any'"),
    ("p, euo_admin, any, user_name, read", "can never hold relation 'any'"),
    ("p, user, same_euo, user_mobile, read", "another user's user_mobile"),
    ("p, user, same_euo, call_history, read", "another user's call_history"),
    ("p, user, organizer, private_notes, read", "only its author may"),
    ("p, euo_admin, same_euo, private_notes, read", "only its author may"),
    ("p, user, self, voicemail, read", "unknown data set 'voicemail'"),
    ("p, auditor, any, euo_identity, read", "unknown role 'auditor'"),
])
def test_a_policy_that_lowers_a_floor_is_refused(policy_dir, line, complaint):
    with open(policy_dir / "policy.csv", "a") as f:
        f.write("\n" + line + "\n")
    with pytest.raises(PolicyError) as e:
        load(policy_dir)
    assert complaint in str(e.value)


def test_taking_a_users_own_data_away_is_refused(policy_dir):
    """Right of access: removing the user's own voicemails is a broken floor."""
    text = (policy_dir / "policy.csv").read_text()
    (policy_dir / "policy.csv").write_text(text.replace("p, user, self, voicemails, read\n", ""))
    with pytest.raises(PolicyError, match="may not read their own voicemails"):
        load(policy_dir)


def test_the_gateway_refuses_to_start_with_a_bad_policy(policy_dir, tmp_path):
    """`gateway serve` exits with a message naming the broken floor, before listening."""
    with open(policy_dir / "policy.csv", "a") as f:
        f.write("\np, provider_staff, any, faxes_incoming, read\n")
    env = {"GATEWAY_POLICY_DIR": str(policy_dir), "GATEWAY_JWT_SECRET": "k" * 40,
           "GATEWAY_UPSTREAM_TELEPHONY": "http://127.0.0.1:9", "GATEWAY_DATA_DIR": str(tmp_path),
           "GATEWAY_UPSTREAM_MEETING": "http://127.0.0.1:9", "GATEWAY_DATABASE_URL": "postgresql://x"}
    done = subprocess.run([sys.executable, "-m", "gateway", "serve"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "faxes_incoming" in done.stderr and "floors" in done.stderr
    assert str(policy_dir / "policy.csv") in done.stderr


@pytest.mark.parametrize(("env", "message"), [
    ({}, "GATEWAY_UPSTREAM_TELEPHONY is not set"),
    ({"GATEWAY_UPSTREAM_TELEPHONY": "ftp://x"}, "is not an http(s) URL"),
    ({"GATEWAY_UPSTREAM_TELEPHONY": "http://a", "GATEWAY_UPSTREAM_MEETING": "http://b"},
     "no JWT key"),
    ({"GATEWAY_JWT_PUBLIC_KEY_FILE": "/nonexistent.pem"}, "is not readable"),
    ({"GATEWAY_POLICY_DIR": "/nonexistent"}, "policy file /nonexistent/model.conf is not readable"),
    ({"GATEWAY_LISTEN": "localhost"}, "is not host:port"),
    ({"GATEWAY_MAX_BODY_BYTES": "lots"}, "GATEWAY_MAX_BODY_BYTES='lots' is not an integer"),
    ({"GATEWAY_BACKEND_TIMEOUT_S": "soon"}, "is not a number"),
])
def test_configuration_mistakes_are_named(env, message, tmp_path):
    """`gateway serve` in this process (the test above runs it as a process): each mistake
    refuses it before it listens. Were one let through, it would not serve here: the
    database it would wait for is nowhere (a fifth of a second), and that exit names no
    mistake of these."""
    done = gateway_main("serve", env={"GATEWAY_DATA_DIR": str(tmp_path),
                                      "GATEWAY_DATABASE_URL": "postgresql://127.0.0.1:9/none",
                                      "GATEWAY_DB_CONNECT_TIMEOUT_S": "0.2",
                                      "GATEWAY_LISTEN": f"127.0.0.1:{free_port()}", **env})
    assert done.returncode == 2
    assert message in done.stderr


def test_a_new_data_set_and_route_need_only_policy_files(policy_dir):
    """Adding voicemail transcripts is a catalog row, a route and a policy line."""
    with open(policy_dir / "datasets.yaml", "a") as f:
        f.write("""
  voicemail_transcripts:
    service: [telephony]
    seed: Voicemail transcripts (**)
    purpose: Read voicemails as text
    retention: As voicemails
    retention_rule: {anchor: never_stored, user_may_keep: true}
    collected_by: The platform
    mandatory: false
    hidden_from: [provider_staff]
    subject: user
""")
    with open(policy_dir / "routes.yaml", "a") as f:
        f.write("""
  - service: telephony
    path: /euos/{euo}/users/{user}/transcripts
    methods: [GET]
    subject: {euo: euo, user: user}
    body:
      object:
        transcripts: voicemail_transcripts
""")
    with open(policy_dir / "policy.csv", "a") as f:
        f.write("\np, user, self, voicemail_transcripts, read\n")
    policy = load(policy_dir)
    route, params = policy.catalog.match("telephony", ["euos", "e", "users", "u", "transcripts"])
    assert params == {"euo": "e", "user": "u"}
    assert policy.granted("user", frozenset({"same_euo", "self"}), "read") >= {"voicemail_transcripts"}
    assert "voicemail_transcripts" not in policy.granted("provider_staff", frozenset({"any"}), "read")


@pytest.mark.parametrize(("broken", "message"), [
    ("routes.yaml", "unknown data set"),
    ("datasets.yaml", "missing"),
])
def test_malformed_policy_files_are_refused(policy_dir, broken, message):
    path = policy_dir / broken
    text = path.read_text()
    if broken == "routes.yaml":
        text = text.replace("name: euo_identity", "name: euo_identty")
    else:
        text = text.replace("    purpose: Invoicing\n", "", 1)
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        load(policy_dir)


async def test_a_new_service_needs_only_policy_files_and_its_upstream(policy_dir, database_url,
                                                                      backends, http, token_for,
                                                                      demo):
    """A `fax-relay` service is a route in routes.yaml and GATEWAY_UPSTREAM_FAX_RELAY: the
    gateway forwards /fax-relay/... to it with everything the other services get."""
    with open(policy_dir / "routes.yaml", "a") as f:
        f.write("""
  - service: fax-relay
    path: /boxes/{euo}
    methods: [GET]
    subject: {euo: euo}
    body:
      object:
        id: identifier
        name: euo_identity
      binds: {id: euo}
""")
    seen = []

    async def box(request):
        seen.append(request.path)
        return web.json_response({"id": request.match_info["euo"], "name": "Acme fax box"})
    app = web.Application()
    app.router.add_get("/boxes/{euo}", box)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        await seed_contracts(database_url, demo)
        env = {"GATEWAY_UPSTREAM_FAX_RELAY": f"http://127.0.0.1:{port}"}
        settings = Settings.from_env({**env, "GATEWAY_UPSTREAM_TELEPHONY": backends["urls"]["telephony"],
                                      "GATEWAY_UPSTREAM_MEETING": backends["urls"]["meeting"]})
        assert settings.upstreams["fax-relay"] == f"http://127.0.0.1:{port}"
        settings = gateway_settings(settings.upstreams, policy_dir=policy_dir)
        async with running_gateway(settings, database_url) as gw:
            status, _, body = await call(http, "GET", gw + "/fax-relay/boxes/euo-acme",
                                         token_for("partner"))
            assert status == 200 and orjson.loads(body)["name"] == "Acme fax box"
            assert seen == ["/boxes/euo-acme"]
            status, _, _ = await call(http, "GET", gw + "/fax-relay/boxes/euo-initech",
                                      token_for("partner"))
            assert status == 403          # tenancy holds for the new service too
    finally:
        await runner.cleanup()
    # and serving without its upstream names the variable
    with pytest.raises(ConfigError, match="GATEWAY_UPSTREAM_FAX_RELAY is not set"):
        gateway_settings(backends["urls"]).check_for_serving(load_catalog(policy_dir).services)


@pytest.mark.parametrize("service", ["v1", "Fax", "metrics", "a/b"])
def test_a_service_name_that_would_shadow_the_gateway_is_refused(policy_dir, service):
    with open(policy_dir / "routes.yaml", "a") as f:
        f.write(f"""
  - service: "{service}"
    path: /x/{{euo}}
    methods: [GET]
    subject: {{euo: euo}}
    body: {{object: {{id: identifier}}}}
""")
    with pytest.raises(PolicyError, match="lower-case name"):
        load(policy_dir)


# --- property: a policy file of any shape is loaded or refused with a PolicyError, never
# another exception (a reload keeps the policy in force only on a PolicyError)

_SHAPES = st.sampled_from([None, True, 0, -1, 1.5, "", "x", [], {}, [[1]], [{}], {"a": [1]},
                           {1: 2}, "euo", "user", [None], 10 ** 30])


@pytest.mark.slow
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(name=st.sampled_from(["roles.yaml", "datasets.yaml", "routes.yaml", "export.yaml",
                             "alerts.yaml"]),
       data=st.data())
def test_a_policy_file_of_any_shape_is_loaded_or_a_policy_error(tmp_path_factory, name, data):
    from gateway.policy.policyset import load_policy_set
    where = tmp_path_factory.mktemp("policy") / "p"
    shutil.copytree(POLICY_DIR, where)
    doc = _yaml.safe_load((where / name).read_text())
    paths = []

    def walk(node, path):
        paths.append(path)
        children = node.items() if isinstance(node, dict) else (
            enumerate(node) if isinstance(node, list) else ())
        for key, child in children:
            walk(child, path + (key,))
    walk(doc, ())
    path = data.draw(st.sampled_from(paths[1:]))
    node = doc
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = data.draw(_SHAPES)
    (where / name).write_text(_yaml.safe_dump(doc))
    with contextlib.suppress(PolicyError):
        load_policy_set(where)
