"""The gateway's own API is described by gateway/openapi.yaml: served, equal to the
README's table, and honoured by a live gateway (schemathesis finds no 5xx and no answer
outside the document)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from .conftest import call

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"GET", "PUT", "POST", "PATCH", "DELETE"}


def _readme_operations() -> set[tuple[str, str]]:
    text = (ROOT / "docs" / "gateway-api.md").read_text()
    table = text.split("# Gateway API", 1)[1].split("\n## ", 1)[0]
    found = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        pending: list[str] = []       # "`PUT`, `DELETE /path`": both methods on /path
        methods: list[str] = []
        for token in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            words = token.split()
            if words[0] in METHODS and len(words) == 1:
                pending.append(words[0])
                continue
            if words[0] in METHODS:
                methods, pending = pending + [words[0]], []
                words = words[1:]
            found.update((m, words[0]) for m in methods)
    return found


def _spec() -> dict:
    return yaml.safe_load((ROOT / "gateway" / "openapi.yaml").read_text())


def test_the_readme_table_is_the_openapi_document():
    spec = {(m.upper(), p) for p, ops in _spec()["paths"].items() for m in ops
            if m.upper() in METHODS}
    assert _readme_operations() == spec


def test_every_route_of_the_app_is_in_the_document_and_every_operation_is_a_route():
    """Walks the application's router (the proxy's catch-all and the console's files
    aside): an endpoint added without its description, or a description left behind by a
    removed endpoint, fails here."""
    from gateway.app import create_app

    from .conftest import gateway_settings
    app = create_app(gateway_settings({"telephony": "http://127.0.0.1:9",
                                       "meeting": "http://127.0.0.1:9"}),
                     "postgresql://127.0.0.1:9/none", migrate=False)
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method in METHODS and not r.resource.canonical.startswith("/console")
              and "{tail" not in r.resource.canonical}
    spec = {(m.upper(), p) for p, ops in _spec()["paths"].items() for m in ops
            if m.upper() in METHODS}
    assert len(routes) > 30
    assert routes == spec, {"undocumented": sorted(routes - spec),
                            "not served": sorted(spec - routes)}


def test_every_write_that_takes_an_idempotency_key_says_so():
    """The gateway API's writes take an Idempotency-Key (gateway/idempotency.py): each
    write operation of the document declares the header."""
    writes = [(m.upper(), p, op) for p, ops in _spec()["paths"].items() for m, op in ops.items()
              if m.upper() in {"PUT", "POST", "PATCH", "DELETE"}]
    assert writes
    for method, path, op in writes:
        names = {(prm.get("in"), prm.get("name")) for prm in op.get("parameters", [])
                 if isinstance(prm, dict)}
        names |= {("ref", prm["$ref"]) for prm in op.get("parameters", []) if "$ref" in prm}
        assert ("header", "Idempotency-Key") in names or \
            ("ref", "#/components/parameters/idempotency_key") in names, f"{method} {path}"


async def test_the_document_is_served(gateway, http):
    status, headers, body = await call(http, "GET", gateway + "/v1/openapi.json")
    assert status == 200 and orjson.loads(body) == _spec()


@pytest.mark.slow
@pytest.mark.parametrize("caller", ["staff", "alice", "partner"])
async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
        gateway, token_for, caller, tmp_path):
    st = shutil.which("st", path=os.path.dirname(sys.executable))
    assert st, "schemathesis is installed with the test extra"
    proc = await asyncio.create_subprocess_exec(
        st, "run", gateway + "/v1/openapi.json", "--url", gateway,
        "-H", f"Authorization: Bearer {token_for(caller)}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_schema_conformance",
        "--max-examples", "25", "--generation-deterministic", "--phases", "examples,fuzzing",
        "--exclude-path", "/metrics",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=dict(os.environ, SCHEMATHESIS_HOOKS="", NO_COLOR="1"), cwd=tmp_path)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()[-6000:]
