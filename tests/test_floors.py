"""The floors of the data-set table ship with the code (gateway/policy/floors.py): datasets.yaml may
add restrictions, never remove one. Hiding a data set from fewer columns, giving it another
subject or leaving it out is refused by the loader, `gateway check`, `gateway serve` and a
reload, unless lowered_floors.yaml names the floor with a reason; then check warns of it,
/v1/catalog lists it and every audit row's policy version ends in `+floors-lowered-N`."""

from __future__ import annotations

import logging
import re
import signal
from pathlib import Path

import orjson
import pytest
import yaml

from gateway.demo.run import seed_contracts
from gateway.policy import floors
from gateway.policy.catalog import PolicyError
from gateway.policy.policyset import load_policy_set

from .conftest import POLICY_DIR, audit_row, call, free_port, gateway_process, serve_env, wait_for
from .roles import gateway_run

README = POLICY_DIR.parent / "docs" / "contract.md"      # the data-set table
VOICEMAILS = "/telephony/euos/euo-acme/users/u-alice/voicemails"
MEETING = "/meeting/accounts/euo-acme/meetings/mtg-acme-1"


def _edit(policy, data_set: str, policy_line: str, **fields) -> None:
    """Change a data set's fields in datasets.yaml and add a matching policy.csv line."""
    path = policy / "datasets.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["datasets"][data_set].update(fields)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with open(policy / "policy.csv", "a") as f:
        f.write("\n" + policy_line + "\n")


# the two edits that once passed every check: staff read voicemails; an organizer reads
# the private notes others wrote in their meeting
LOWERINGS = {
    "voicemails to staff": ("voicemails", "p, provider_staff, any, voicemails, read",
                            {"hidden_from": []}, "voicemails.hidden_from.provider_staff"),
    "private notes to the organizer": ("private_notes", "p, user, organizer, private_notes, read",
                                       {"subject": "meeting"}, "private_notes.subject.author"),
}


def _lower(policy, which: str) -> str:
    data_set, line, fields, floor = LOWERINGS[which]
    _edit(policy, data_set, line, **fields)
    return floor


def _declare(policy, *floor_ids: str) -> None:
    (policy / floors.LOWERED_FILE).write_text(yaml.safe_dump(
        {"lowered": {f: "ticket SEC-1: a test of the override" for f in floor_ids}}))


def test_the_shipped_floors_are_the_readme_data_set_table():
    """Every row of README's data-set table, with its (**) columns, is a floor in code."""
    table = README.read_text().split("### Data sets", 1)[1].split("### Floors", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            hidden = frozenset() if cells[3] == "—" else frozenset(
                c.strip() for c in cells[3].split(","))
            for name in re.findall(r"`([a-z_]+)`", cells[0]):
                rows[name] = hidden
    assert rows == {name: hidden for name, (_, hidden) in floors.SEED.items()}


def test_the_shipped_policy_lowers_no_floor_and_adds_none():
    catalog = load_policy_set(POLICY_DIR).catalog
    assert catalog.lowered_floors == {}
    for name, (subject, hidden) in floors.SEED.items():
        assert (catalog.data_sets[name].subject, catalog.data_sets[name].hidden_from) == \
            (subject, hidden)


@pytest.mark.parametrize("which", LOWERINGS)
def test_lowering_a_floor_in_datasets_yaml_is_refused(policy_dir, which):
    floor = _lower(policy_dir, which)
    with pytest.raises(PolicyError, match=re.escape(floor)) as e:
        load_policy_set(policy_dir)
    assert "datasets.yaml" in str(e.value) and floors.LOWERED_FILE in str(e.value)


@pytest.mark.parametrize(("data_set", "fields", "floor"), [
    ("address_book", {"hidden_from": ["provider_staff"]}, "address_book.hidden_from.partner"),
    ("call_recordings", {"subject": "euo"}, "call_recordings.subject.user"),
    ("euo_identity", {"subject": "user"}, "euo_identity.subject.euo"),
])
def test_any_lowered_floor_is_refused_even_without_a_policy_line(policy_dir, data_set, fields,
                                                                 floor):
    path = policy_dir / "datasets.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["datasets"][data_set].update(fields)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(PolicyError, match=re.escape(floor)):
        load_policy_set(policy_dir)


def test_leaving_a_data_set_of_the_table_out_lowers_its_floors(policy_dir):
    path = policy_dir / "datasets.yaml"
    doc = yaml.safe_load(path.read_text())
    del doc["datasets"]["connection_statistics"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(PolicyError, match=re.escape("connection_statistics.subject.user")):
        load_policy_set(policy_dir)


def test_datasets_yaml_may_add_a_restriction(policy_dir):
    """Hiding voicemails from partners too is stricter than the table: nothing to declare."""
    path = policy_dir / "datasets.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["datasets"]["voicemails"]["hidden_from"] = ["provider_staff", "partner"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    policy_set = load_policy_set(policy_dir)
    assert policy_set.catalog.lowered_floors == {}
    assert "+" not in policy_set.version


def test_a_declared_floor_is_lowered_and_the_version_says_so(policy_dir):
    plain = load_policy_set(policy_dir).version
    declared = [_lower(policy_dir, which) for which in LOWERINGS]
    _declare(policy_dir, *declared)
    policy_set = load_policy_set(policy_dir)
    assert set(policy_set.catalog.lowered_floors) == set(declared)
    assert policy_set.version.endswith("+floors-lowered-2") and not policy_set.version.startswith(plain)
    assert policy_set.catalog.data_sets["voicemails"].public()["floors_lowered"] == \
        ["voicemails.hidden_from.provider_staff"]
    assert "voicemails" in policy_set.policy.granted("provider_staff", frozenset({"any"}), "read")


@pytest.mark.parametrize(("declaration", "complaint"), [
    ({"lowered": {"voicemails.hidden_from.provider_staff": "why", "voicemail.hidden_from.x": "?"}},
     "'voicemail.hidden_from.x' is no floor"),
    ({"lowered": {"voicemails.hidden_from.provider_staff": "why",
                  "faxes_incoming.hidden_from.provider_staff": "stale"}},
     "faxes_incoming.hidden_from.provider_staff is not lowered by the policy"),
    ({"lowered": {"voicemails.hidden_from.provider_staff": ""}}, "give the reason"),
    ({"lowered": ["voicemails.hidden_from.provider_staff"]}, "expected `lowered:` mapping"),
])
def test_a_wrong_declaration_is_refused(policy_dir, declaration, complaint):
    """A typo, a stale entry (it would claim a lowering that is not there) or no reason."""
    _lower(policy_dir, "voicemails to staff")
    (policy_dir / floors.LOWERED_FILE).write_text(yaml.safe_dump(declaration))
    with pytest.raises(PolicyError, match=re.escape(complaint)):
        load_policy_set(policy_dir)


@pytest.mark.parametrize("which", LOWERINGS)
async def test_check_refuses_a_lowered_floor_and_warns_of_a_declared_one(gateway, database_url,
                                                                         backends, policy_dir,
                                                                         tmp_path, which):
    """(`gateway`: the database migrated, so the policy is check's only finding.)"""
    floor = _lower(policy_dir, which)
    env = serve_env(backends, database_url, tmp_path, free_port(),
                    GATEWAY_POLICY_DIR=str(policy_dir))
    done = await gateway_run("check", env=env)
    assert done.returncode == 2, done.stdout
    assert any(line.startswith(f"problem: policy {policy_dir}") and floor in line
               for line in done.stdout.splitlines()), done.stdout
    _declare(policy_dir, floor)
    done = await gateway_run("check", env=env)
    assert done.returncode == 0, done.stdout
    assert any(line.startswith(f"warning: policy {policy_dir}: floor {floor} lowered")
               for line in done.stdout.splitlines()), done.stdout
    assert "+floors-lowered-1 (" in done.stdout


@pytest.mark.parametrize("which", LOWERINGS)
async def test_serve_refuses_a_lowered_floor(backends, policy_dir, tmp_path, which, caplog):
    """(In this process, its log records read as a process's stderr: a floor refused is
    refused before the database, which is nowhere, is waited for; test_policy's bad policy
    runs serve as a process.)"""
    floor = _lower(policy_dir, which)
    env = serve_env(backends, "postgresql://127.0.0.1:9/none", tmp_path, free_port(),
                    GATEWAY_POLICY_DIR=str(policy_dir), GATEWAY_DB_CONNECT_TIMEOUT_S="0.2")
    caplog.set_level(logging.INFO)
    done = await gateway_run("serve", env=env)
    assert done.returncode == 2
    assert floor in done.stderr and "Traceback" not in done.stderr + caplog.text


@pytest.mark.slow
async def test_a_reload_refuses_a_lowered_floor_until_it_is_declared(backends, database_url, http,
                                                                     token_for, tmp_path, demo,
                                                                     policy_dir, db):
    await seed_contracts(database_url, demo)
    log = tmp_path / "serve.log"
    async with gateway_process(http, backends, database_url, tmp_path, log=log,
                               GATEWAY_POLICY_DIR=str(policy_dir)) as (proc, base):
        staff, organizer = token_for("staff"), token_for("alice")
        _, _, body = await call(http, "GET", base + "/v1/catalog", staff)
        first = orjson.loads(body)["policy_version"]
        declared = [_lower(policy_dir, which) for which in LOWERINGS]

        async def said(text: str, times: int = 1):
            return log.read_text().count(text) >= times
        proc.send_signal(signal.SIGHUP)
        assert await wait_for(lambda: said("policy reload refused"), timeout=30)
        for floor in declared:
            assert floor in log.read_text()
        status, _, _ = await call(http, "GET", base + VOICEMAILS, staff)
        assert status == 403
        _, _, body = await call(http, "GET", base + MEETING, organizer)
        notes = orjson.loads(body)["private_notes"]
        assert {n["author_id"] for n in notes} <= {"u-alice"}, notes

        _declare(policy_dir, *declared)
        proc.send_signal(signal.SIGHUP)
        assert await wait_for(lambda: said("+floors-lowered-2 in force"), timeout=30)
        _, _, body = await call(http, "GET", base + "/v1/catalog", staff)
        catalog = orjson.loads(body)
        version = catalog["policy_version"]
        assert version.endswith("+floors-lowered-2") and version != first
        lowered = {d["name"]: d["floors_lowered"] for d in catalog["data_sets"]}
        assert lowered["voicemails"] == ["voicemails.hidden_from.provider_staff"]
        assert lowered["private_notes"] == ["private_notes.subject.author"]
        status, headers, _ = await call(http, "GET", base + VOICEMAILS, staff)
        assert status == 200
        row = await audit_row(db, headers["X-Request-Id"])
        assert row["policy_version"] == version
        _, _, body = await call(http, "GET", base + MEETING, organizer)
        assert {n["author_id"] for n in orjson.loads(body)["private_notes"]} > {"u-alice"}


# --- the route table's floors (gateway/policy/floors_routes.py) ----------------------------------

VOICEMAIL_LIST = "route:telephony:/euos/{}/users/{}/voicemails"
FAX_FILE = "route:telephony:/euos/{}/users/{}/faxes/{}"
MEETING_ROUTE = "route:meeting:/accounts/{}/meetings/{}"


def _route(doc: dict, service: str, path: str) -> dict:
    return next(r for r in doc["routes"] if r["service"] == service and r["path"] == path)


def _voicemails(doc):
    return _route(doc, "telephony", "/euos/{euo}/users/{user}/voicemails")["body"]["object"]


def _chat(doc):
    return _route(doc, "meeting", "/accounts/{euo}/meetings/{meeting}")["body"]["object"][
        "chat"]["list"]


def _fax_file(doc):
    return _route(doc, "telephony", "/euos/{euo}/users/{user}/faxes/{id}")


# each edit shows a field to more callers than the shipped table does; the floor it lowers
ROUTE_LOWERINGS = {
    "voicemails mapped to call history (staff may read it)":
        (lambda d: _voicemails(d).update(voicemails="call_history"),
         VOICEMAIL_LIST + ".voicemails"),
    "a fax file that needs only the incoming faxes":
        (lambda d: _fax_file(d).update(binary=["faxes_incoming"]),
         FAX_FILE + "@needs.faxes_outgoing"),
    "a chat message's author made an identifier (anyone who sees the meeting)":
        (lambda d: _chat(d)["object"].update(author_id="identifier"),
         MEETING_ROUTE + ".chat[].author_id"),
    "a chat message made its author's own record (self, not author)":
        (lambda d: _chat(d).update(subject={"user": "author_id"}),
         MEETING_ROUTE + ".chat[]@self"),
    "a field the shipped table leaves to the data subject, declared":
        (lambda d: _voicemails(d).update(transcript="call_history"),
         VOICEMAIL_LIST + ".transcript"),
}


def _edit_routes(policy, edit) -> None:
    path = policy / "routes.yaml"
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_the_shipped_route_floors_are_the_shipped_route_table():
    """floors_routes.py is written from policies/routes.yaml; a change to either shows in
    the other (`python -m gateway.policy.pin_routes > gateway/policy/floors_routes.py`)."""
    from gateway.policy import floors_routes, pin_routes
    assert pin_routes.render(POLICY_DIR) == Path(floors_routes.__file__).read_text()


@pytest.mark.parametrize("which", ROUTE_LOWERINGS)
def test_a_route_table_that_shows_a_field_to_more_callers_is_refused(policy_dir, which):
    edit, floor = ROUTE_LOWERINGS[which]
    _edit_routes(policy_dir, edit)
    with pytest.raises(PolicyError, match=re.escape(floor)):
        load_policy_set(policy_dir)
    _declare(policy_dir, floor)
    policy_set = load_policy_set(policy_dir)
    assert floor in policy_set.catalog.lowered_floors
    assert policy_set.version.endswith("+floors-lowered-1")


STRICTER = {
    "a field left to the data subject alone": lambda d: _voicemails(d).pop("voicemails"),
    "a field moved to a data set hidden from more columns":
        lambda d: _voicemails(d).update(voicemails="call_recordings"),
    "a file that needs one data set more":
        lambda d: _fax_file(d).update(binary=["faxes_incoming", "faxes_outgoing",
                                              "call_recordings"]),
    "an identifier made a data set": lambda d: _chat(d)["object"].update(at="chat_messages"),
}


@pytest.mark.parametrize("which", STRICTER)
def test_a_route_table_as_strict_or_stricter_loads(policy_dir, which):
    _edit_routes(policy_dir, STRICTER[which])
    assert load_policy_set(policy_dir).catalog.lowered_floors == {}


def test_a_declared_route_floor_the_table_keeps_is_stale(policy_dir):
    _declare(policy_dir, VOICEMAIL_LIST + ".voicemails")
    with pytest.raises(PolicyError, match=re.escape("voicemails is not lowered by the policy")):
        load_policy_set(policy_dir)
