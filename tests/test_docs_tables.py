"""Tables of the docs that restate a policy file or the code are tested equal to it, so a
change to one that forgets the other fails here: the roles (roles.yaml), the backend API
(routes.yaml, service by service), the alert rules (alerts.yaml), the retention rules
(datasets.yaml), the request states (subject_requests.TRANSITIONS) and the assisted
export's purposes (export.yaml, also the OpenAPI enum), and the audit rows' access kinds
(audit.api.ACCESS, also the OpenAPI enums). The data-set table is pinned by
tests/test_floors.py."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gateway.subject_requests import TRANSITIONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
POLICIES = ROOT / "policies"


def _rows(page: str, header: str) -> list[list[str]]:
    """The rows of the table of `page` whose header line starts with `header`."""
    lines = (DOCS / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def _policy(name: str) -> dict:
    return yaml.safe_load((POLICIES / name).read_text())


def test_the_roles_table_is_roles_yaml():
    roles = _policy("roles.yaml")["roles"]
    table = {re.search(r"`(\w+)`", r[0]).group(1): r[2] for r in
             _rows("contract.md", "| role (`role` claim)")}
    assert set(table) == set(roles)
    for name, claim in table.items():
        expected = roles[name].get("tenant_claim")
        assert claim == (f"`{expected}`" if expected else "none"), name


def _documented_routes() -> set[tuple[str, str, str]]:
    """(service, METHOD, /path with {}) of the backend API tables in docs/contract.md."""
    text = (DOCS / "contract.md").read_text()
    found = set()
    for heading, service in (("Telephony (", ("telephony", "trunking")), ("Meeting:", ("meeting",))):
        block = text.split("\n" + heading, 1)[1].split("\n\n", 2)[1]
        for line in block.splitlines()[2:]:
            cell = line.split(" | ")[0].lstrip("| ")
            methods = re.findall(r"\b(GET|PATCH|PUT|POST|DELETE)\b", cell.split("`")[0])
            path = re.sub(r"\[\?[^\]]*\]", "", cell.split("`")[1])
            for s in service:
                found.update((s, m, re.sub(r"\{[^}]*\}", "{}", path)) for m in methods)
    return found


def test_the_backend_api_tables_are_the_route_table():
    """Every documented call is a route of routes.yaml (trunking shares the telephony
    table), and every route of routes.yaml is documented."""
    routes = {(r["service"], m.upper(), re.sub(r"\{[^}]*\}", "{}", r["path"]))
              for r in _policy("routes.yaml")["routes"] for m in r["methods"]}
    documented = _documented_routes()
    assert routes <= documented, sorted(routes - documented)
    telephony = {(m, p) for s, m, p in documented if s == "telephony"}
    assert documented - routes <= {("trunking", m, p) for m, p in telephony}


def test_the_alert_rules_table_is_alerts_yaml():
    rules = {r["name"]: r for r in _policy("alerts.yaml")["rules"]}
    table = {re.search(r"`(\w+)`", r[0]).group(1): r[1] for r in
             _rows("audit.md", "| rule | raises when")}
    assert set(table) == set(rules)
    for name, says in table.items():
        assert f"more than {rules[name]['limit']} " in says, name
        factor = (rules[name].get("baseline") or {}).get("factor")
        assert (f"{factor} ×" in says) == (factor is not None), name


def test_the_retention_table_is_the_rules_of_datasets_yaml():
    """Each data set named in the table shows its rule's anchor, how long it is kept and
    when it is anonymised; each rule the gateway applies by itself (from a contract's end,
    from sending, from the element's time) is in the table."""
    data_sets = _policy("datasets.yaml")["datasets"]
    table = {name: r[1] for r in _rows("policy.md", "| data set | rule |")
             for name in re.findall(r"`(\w+)`", r[0]) if name in data_sets}
    assert len(table) >= 8
    for name, says in table.items():
        rule = data_sets[name]["retention_rule"]
        assert f"`{rule['anchor']}`" in says if "anchor" in rule else "from `at`" in says, name
        keep = rule.get("keep")
        if keep is not None:
            number, unit = keep.split()
            assert (f"+ {number}" in says if number == "0" else keep in says), (name, says)
        if "anonymise_after" in rule:
            assert f"anonymise_after: {rule['anonymise_after']}" in says, name
    applied = {name for name, spec in data_sets.items()
               if spec["retention_rule"].get("anchor") in (None, "contract_end", "sent")}
    assert applied <= set(table), sorted(applied - set(table))


def test_the_request_states_table_is_the_state_machine():
    moves = set()
    for before, after, _ in _rows("data-subject-rights.md", "| from | to | who"):
        if before.startswith("(filed)"):
            continue
        for b in re.findall(r"`(\w+)`", before):
            moves.update((b, a) for a in re.findall(r"`(\w+)`", after))
    assert moves == set(TRANSITIONS)


def test_the_assisted_export_purposes_are_those_of_export_yaml():
    """docs/data-subject-rights.md's list of purposes and the OpenAPI document's enum are
    the ids of `assisted.purposes` in export.yaml."""
    purposes = list(_policy("export.yaml")["assisted"]["purposes"])
    text = (DOCS / "data-subject-rights.md").read_text()
    listed = text.split("Purposes (`assisted.purposes` in `export.yaml`):", 1)[1].split(".", 1)[0]
    assert re.findall(r"`(\w+)`", listed) == purposes
    spec = yaml.safe_load((ROOT / "gateway" / "openapi.yaml").read_text())
    operation = spec["paths"]["/v1/euos/{euo}/users/{user}/export"]["get"]
    (purpose,) = [p for p in operation["parameters"] if p.get("name") == "purpose"]
    assert purpose["schema"]["enum"] == purposes


def test_the_access_table_and_enums_are_the_audit_access_kinds():
    """docs/audit.md's `access` table and the OpenAPI document's access filter and row
    field name exactly gateway.audit.api.ACCESS (and null, a refusal's)."""
    from gateway.audit.api import ACCESS

    table = [row[0].strip("`") for row in _rows("audit.md", "| `access` | the row is")]
    assert table == [*ACCESS, "null"]
    spec = yaml.safe_load((ROOT / "gateway" / "openapi.yaml").read_text())
    (access,) = [p for p in spec["paths"]["/v1/audit"]["get"]["parameters"]
                 if p.get("name") == "access"]
    assert access["schema"]["enum"] == list(ACCESS)
    fields = [s["properties"]["access"]["enum"] for s in spec["components"]["schemas"].values()
              if "access" in s.get("properties", {})]
    assert fields and all(enum == [*ACCESS, None] for enum in fields)
