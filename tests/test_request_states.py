"""The data-subject request's state machine has one source, TRANSITIONS in
gateway/subject_requests.py; its other copies are tested equal to it: the database's check
constraint and update trigger (tried pair by pair on the migrated schema), the OpenAPI
document's enums, and the console's answer buttons, status filter and final states."""

from __future__ import annotations

import re
from itertools import product
from pathlib import Path

import asyncpg
import yaml

from gateway.subject_requests import ADMIN, FINAL, STATUSES, SUBJECT, TRANSITIONS, TYPES

from .conftest import connected, own_database

ROOT = Path(__file__).resolve().parent.parent
CONSOLE = ROOT / "gateway" / "console" / "static"
INSERT = """insert into dsr_requests (user_sub, euo_id, type, data_sets, status)
            values ('u-states', 'euo-acme', 'erasure', '{voicemails}', $1) returning id"""


async def test_the_database_allows_exactly_the_moves_of_the_state_table(database_url,
                                                                       template_database):
    async with own_database(database_url, template_database) as dsn, connected(dsn) as db:
        storable = set()
        for status in (*STATUSES, "reopened"):
            try:
                async with db.transaction():
                    await db.fetchval(INSERT, status)
                    storable.add(status)
                    raise _Undo
            except (_Undo, asyncpg.CheckViolationError):
                pass
        assert storable == set(STATUSES)
        moves = set()
        for before, after in product(STATUSES, STATUSES):
            if before == after:
                continue
            try:
                async with db.transaction():
                    rid = await db.fetchval(INSERT, before)
                    await db.execute("update dsr_requests set status = $2 where id = $1",
                                     rid, after)
                    moves.add((before, after))
                    raise _Undo
            except (_Undo, asyncpg.CheckViolationError):
                pass
        assert moves == set(TRANSITIONS)
        assert {s for s in STATUSES if not any(f == s for f, _ in moves)} == set(FINAL)


class _Undo(Exception):
    """Roll the probe back."""


def _spec() -> dict:
    return yaml.safe_load((ROOT / "gateway" / "openapi.yaml").read_text())


def _targets(who: str) -> set[str]:
    return {to for (_, to), mover in TRANSITIONS.items() if mover == who}


def test_the_openapi_document_names_the_states_and_who_may_move_to_which():
    paths = _spec()["paths"]

    def body_enum(path: str) -> set[str]:
        schema = paths[path]["patch"]["requestBody"]["content"]["application/json"]["schema"]
        return set(schema["properties"]["status"]["enum"])
    assert body_enum("/v1/requests/{id}") == _targets(ADMIN)
    assert body_enum("/v1/me/requests/{id}") == _targets(SUBJECT)
    filters = [p for p in paths["/v1/requests"]["get"]["parameters"] if p.get("name") == "status"]
    assert set(filters[0]["schema"]["enum"]) == set(STATUSES)
    schemas = _spec()["components"]["schemas"]
    request = next(s for s in schemas.values() if isinstance(s, dict)
                   and set(s.get("properties", {}).get("type", {}).get("enum", ())) == set(TYPES))
    assert set(request["properties"]["status"]["enum"]) == set(STATUSES)


def test_the_console_answers_filters_and_ends_as_the_state_table_says():
    script = (CONSOLE / "console.js").read_text()
    answers = re.search(r"const ANSWERS = \[(.*?)\];", script).group(1)
    assert set(re.findall(r'\["(\w+)", "\w+"\]', answers)) == _targets(ADMIN)
    finals = re.findall(r'!\[([^\]]*)\]\.includes\(q\.status\)', script)
    assert finals and all(set(re.findall(r'"(\w+)"', f)) == set(FINAL) for f in finals)
    page = (CONSOLE / "index.html").read_text()
    select = re.search(r'<select id="q-status">(.*?)</select>', page, re.S).group(1)
    assert set(re.findall(r'<option value="(\w+)">', select)) == set(STATUSES)
