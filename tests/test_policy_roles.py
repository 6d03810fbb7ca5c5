"""Roles are policy data (policies/roles.yaml): a new role needs its definition and its
allow-lines, no Python change, and is held to the floors like the four of the seed — the
roles.yaml counterpart of test_policy's new data set and new service."""

from __future__ import annotations

import shutil
import uuid

import jwt
import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app, reload_policy
from gateway.demo.run import seed_contracts, start_site
from gateway.policy.authz import load_policy
from gateway.policy.catalog import ACTIONS, RELATIONS, PolicyError
from gateway.policy.catalog_files import load_catalog
from gateway.policy.roles import COLUMNS, COLUMNS_OF_CLAIM

from .conftest import POLICY_DIR, call, gateway_main, gateway_settings, wait_for

ALICE = "/telephony/euos/euo-acme/users/u-alice"

AUDITOR = """
  auditor:
    description: the Provider's internal auditors
    tenant_claim: null
    organisation: Provider internal audit
    column: provider_staff
    gateway_api: [audit, audit_verify]
"""
AUDITOR_LINES = "p, auditor, any, user_name, read\np, auditor, any, euo_identity, read\n"

PARTNER_SUPPORT = """
  partner_support:
    description: a Partner's first-line support
    tenant_claim: partner
    column: partner
    gateway_api: [audit]
"""


def add_roles(policy_dir, roles: str, lines: str = "") -> None:
    path = policy_dir / "roles.yaml"
    path.write_text(path.read_text().replace("\nroles:\n", "\nroles:\n" + roles.lstrip("\n"), 1))
    with open(policy_dir / "policy.csv", "a") as f:
        f.write(lines)


def load(path):
    return load_policy(path, load_catalog(path))


def test_the_shipped_roles_are_the_seeds_four():
    roles = load_catalog(POLICY_DIR).roles
    assert list(roles) == ["provider_staff", "partner", "euo_admin", "user"]
    assert [r.name for r in roles.values() if r.data_subject] == ["user"]
    assert roles["partner"].relations == {"contracted_partner"}
    assert roles["user"].relations == {"same_euo", "self", "organizer", "author"}


def test_a_new_role_is_held_to_its_columns_floors(policy_dir):
    add_roles(policy_dir, AUDITOR, AUDITOR_LINES + "p, auditor, any, voicemails, read\n")
    with pytest.raises(PolicyError, match="auditor may read voicemails, which datasets.yaml "
                                          "marks .* hidden from provider_staff"):
        load(policy_dir)


def test_a_new_role_can_hold_only_the_relations_of_its_tenant_claim(policy_dir):
    add_roles(policy_dir, AUDITOR, "p, auditor, same_euo, user_name, read\n")
    with pytest.raises(PolicyError, match="auditor can never hold relation 'same_euo'"):
        load(policy_dir)


@pytest.mark.parametrize(("role", "message"), [
    # a Provider-side role held to an EUO admin's column would read voicemails everywhere
    ("  sneaky:\n    tenant_claim: null\n    organisation: P\n    column: euo_admin\n",
     "tenant_claim null is held to column provider_staff"),
    ("  sneaky:\n    tenant_claim: partner\n    gateway_api: [contracts]\n    column: partner\n",
     "only a role without a tenant claim"),
    ("  sneaky:\n    tenant_claim: partner\n", "name the data-set table column"),
    ("  sneaky:\n    tenant_claim: null\n    column: provider_staff\n", "needs `organisation`"),
    ("  sneaky:\n    tenant_claim: partner\n    column: partner\n    data_subject: true\n",
     "a data subject is a user of an EUO"),
    ("  sneaky:\n    tenant_claim: euo\n    column: user\n    gateway_api: [everything]\n",
     "gateway_api lists groups"),
    ("  sneaky:\n    tenant_claim: tenant\n    column: user\n", "tenant_claim must be null"),
    ("  sneaky:\n    column: user\n", "tenant_claim is required"),
    ("  sneaky:\n    tenant_claim: euo\n    column: user\n    claims: [x]\n", "unknown keys"),
])
def test_a_role_that_could_lower_a_floor_is_refused(policy_dir, role, message):
    add_roles(policy_dir, "\n" + role)
    with pytest.raises(PolicyError, match=message):
        load(policy_dir)


@pytest.mark.parametrize("key", ["true", "no", "null", "1"])
def test_a_role_name_yaml_reads_as_no_text_is_refused(policy_dir, key):
    add_roles(policy_dir, f"\n  {key}:\n    tenant_claim: euo\n    column: euo_admin\n")
    with pytest.raises(PolicyError, match="role names must be text"):
        load_catalog(policy_dir)


def test_every_data_subject_role_keeps_the_right_of_access(policy_dir):
    add_roles(policy_dir, "\n  guest:\n    tenant_claim: euo\n    column: user\n"
                          "    data_subject: true\n")
    with pytest.raises(PolicyError, match="a guest may not read their own voicemails"):
        load(policy_dir)


def test_without_a_data_subject_role_the_policy_is_refused(policy_dir):
    path = policy_dir / "roles.yaml"
    path.write_text(path.read_text().replace("    data_subject: true\n", ""))
    with pytest.raises(PolicyError, match="no role is a data subject"):
        load_catalog(policy_dir)


def test_policy_lines_for_a_role_nobody_defined_are_refused(policy_dir):
    with open(policy_dir / "policy.csv", "a") as f:
        f.write("p, auditor, any, user_name, read\n")
    with pytest.raises(PolicyError, match="unknown role 'auditor' .roles.yaml."):
        load(policy_dir)


async def test_a_new_role_needs_only_policy_files(policy_dir, backends, database_url, http,
                                                  token_for, demo):
    """An `auditor` (the Provider's, audit API only, reads names) and a `partner_support`
    (a Partner's, audit only): tokens, relations, API groups, audit scope and the access
    log all follow roles.yaml."""
    add_roles(policy_dir, AUDITOR + PARTNER_SUPPORT,
              AUDITOR_LINES + "p, partner_support, contracted_partner, user_name, read\n")
    await seed_contracts(database_url, demo)
    app = create_app(gateway_settings(backends["urls"], policy_dir=policy_dir), database_url)
    runner, port = await start_site(app, "127.0.0.1", 0)
    gw = f"http://127.0.0.1:{port}"
    auditor = token_for(role="auditor", sub="audrey")
    support = token_for(role="partner_support", sub="sue@northwind", partner="p-northwind")
    try:
        # the proxy: what its allow-lines grant, through relation `any`
        status, _, body = await call(http, "GET", gw + ALICE, auditor)
        assert status == 200, body
        user = orjson.loads(body)
        assert user["first_name"] == "Alice" and "mobile" not in user and "email" not in user
        status, _, body = await call(http, "GET", gw + ALICE + "/voicemails", auditor)
        assert status == 403 and orjson.loads(body)["error"]["code"] == "dataset_not_permitted"
        # the gateway API: the groups roles.yaml lists, and no others
        for path, expected in (("/v1/audit?limit=1", 200), ("/v1/audit/verify", 200),
                               ("/v1/admin/euos", 403), ("/v1/requests", 403),
                               ("/v1/me/access-log", 403)):
            status, _, body = await call(http, "GET", gw + path, auditor)
            assert status == expected, (path, body)
            if expected == 403:
                assert orjson.loads(body)["error"]["code"] == "role_not_permitted"
        # a Partner's new role reaches its partner's contracted EUOs only
        status, _, _ = await call(http, "GET", gw + ALICE, support)
        assert status == 200
        status, _, body = await call(http, "GET", gw + "/telephony/euos/euo-initech", support)
        assert status == 403 and orjson.loads(body)["error"]["code"] == "no_active_contract"
        # ...and the partner sees its colleague by name in its audit scope, not the auditor
        status, _, body = await call(http, "GET", gw + "/v1/audit?actor=sue@northwind&limit=5",
                                     token_for("partner"))
        assert status == 200 and orjson.loads(body)["rows"], body
        status, _, body = await call(http, "GET", gw + "/v1/audit?actor=audrey&limit=5",
                                     token_for("partner"))
        assert status == 200 and orjson.loads(body)["rows"] == []

        async def accessors():      # Alice's access log names each role's organisation
            _, _, body = await call(http, "GET", gw + "/v1/me/access-log?limit=200",
                                    token_for("alice"))
            return {(a["accessor"]["role"], a["accessor"]["organisation"])
                    for a in orjson.loads(body)["accesses"]}
        assert {("auditor", "Provider internal audit"),
                ("partner_support", "p-northwind")} <= await wait_for(accessors)
        # /v1/catalog describes the roles in force
        _, _, body = await call(http, "GET", gw + "/v1/catalog", auditor)
        roles = {r["name"]: r for r in orjson.loads(body)["roles"]}
        assert roles["auditor"]["relations"] == ["any"]
        assert roles["auditor"]["gateway_api"] == ["audit", "audit_verify"]
        # a reload that removes the role refuses its tokens at once (no cached principal)
        shutil.copy(POLICY_DIR / "roles.yaml", policy_dir / "roles.yaml")
        shutil.copy(POLICY_DIR / "policy.csv", policy_dir / "policy.csv")
        assert await reload_policy(app, policy_dir)
        status, _, body = await call(http, "GET", gw + ALICE, auditor)
        assert status == 401 and orjson.loads(body)["error"]["code"] == "unknown_role"
    finally:
        await runner.cleanup()


def test_gateway_token_mints_any_role_of_the_policy(policy_dir, tmp_path):
    add_roles(policy_dir, PARTNER_SUPPORT)
    env = {"GATEWAY_POLICY_DIR": str(policy_dir), "GATEWAY_DATA_DIR": str(tmp_path),
           "GATEWAY_JWT_SECRET": "k" * 40}

    def token(*args):          # in this process (test_cli runs `gateway token` as one)
        return gateway_main("token", *args, env=env)
    done = token("--role", "partner_support", "--sub", "sue", "--partner", "p-northwind")
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), "k" * 40, algorithms=["HS256"],
                        options={"verify_aud": False})
    assert claims["role"] == "partner_support" and claims["partner"] == "p-northwind"
    done = token("--role", "partner_support", "--sub", "sue")
    assert done.returncode == 2 and "needs --partner" in done.stderr
    done = token("--role", "auditor", "--sub", "audrey")
    assert done.returncode == 2 and "unknown role 'auditor'" in done.stderr


@pytest.mark.parametrize("role", [
    # held to the user's column without being a data subject: still never another user's
    "  helper:\n    tenant_claim: euo\n    column: user\n",
    # the seed's user, its column kept, as a new name
    "  member:\n    tenant_claim: euo\n    column: user\n    gateway_api: [requests]\n",
])
def test_a_role_held_to_the_users_column_never_reads_another_users_data(policy_dir, role):
    name = role.split(":")[0].strip()
    add_roles(policy_dir, "\n" + role, f"p, {name}, same_euo, voicemails, read\n")
    with pytest.raises(PolicyError, match=f"a {name} may read another user's voicemails"):
        load(policy_dir)


DATA_SETS = load_catalog(POLICY_DIR).data_sets
REACH_OF = {None: {"any"}, "partner": {"contracted_partner"}, "euo": {"same_euo"}}


def _held(spec) -> set[str]:
    """The relations a role of this spec can hold (docs/contract.md, Roles and tokens), on their own."""
    return REACH_OF[spec["tenant_claim"]] | (
        {"break_glass"} if spec["break_glass"] else set()) | (
        {"self", "organizer", "author"} if spec["data_subject"] else set())


@st.composite
def _roles_and_lines(draw):
    claim = draw(st.sampled_from([None, "partner", "euo"]))
    fitting = list(COLUMNS_OF_CLAIM[claim])
    spec = {"tenant_claim": claim,
            "column": draw(st.sampled_from(fitting * 3 + list(COLUMNS))),
            "data_subject": draw(st.booleans()), "break_glass": draw(st.booleans())}
    if claim is None:
        spec["organisation"] = "Elsewhere"
    # mostly relations it can hold (a line it cannot is refused, which proves little)
    rels = st.sampled_from(sorted(_held(spec))) | st.sampled_from(RELATIONS)
    lines = draw(st.lists(st.tuples(rels, st.sampled_from(sorted(DATA_SETS)),
                                    st.sampled_from(ACTIONS)), min_size=1, max_size=2))
    return spec, lines


@pytest.mark.slow
@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=_roles_and_lines())
def test_whatever_a_new_role_says_a_policy_that_loads_keeps_the_floors(tmp_path, drawn):
    """Any new role (tenant claim, column, data subject, break-glass) with any allow-lines:
    either the policy is refused, or every line keeps the floors of README.md, stated
    here again on their own."""
    spec, lines = drawn
    where = tmp_path / uuid.uuid4().hex
    shutil.copytree(POLICY_DIR, where)
    raw = yaml.safe_load((where / "roles.yaml").read_text())
    raw["roles"]["newcomer"] = spec
    (where / "roles.yaml").write_text(yaml.safe_dump(raw))
    with open(where / "policy.csv", "a") as f:
        f.writelines(f"p, newcomer, {rel}, {ds}, {act}\n" for rel, ds, act in lines)
    try:
        load(where)
    except PolicyError:
        return
    claim, column = spec["tenant_claim"], spec["column"]
    held = _held(spec)
    for rel, name, _ in lines:
        ds = DATA_SETS[name]
        assert rel in held, (spec, rel)
        assert column in COLUMNS_OF_CLAIM[claim]
        assert column not in ds.hidden_from, (spec, rel, name)
        if ds.subject == "author":
            assert rel == "author", (spec, rel, name)
        if (column == "user" or spec["data_subject"]) and ds.subject in ("user", "meeting"):
            assert rel in ("self", "organizer", "author"), (spec, rel, name)
        if rel == "organizer":
            assert ds.subject == "meeting", (spec, rel, name)
