"""The one command an EUO admin runs: `gateway audit verify-slice URL --token T --public-key
KEYS_URL` downloads their slice and checks it with no database, against every published key —
after a key rotation too; a tampered saved slice, a key left out or a bad token fail clearly."""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg
import orjson
import pytest

from .conftest import call, gateway_main, gateway_settings, own_database, running_gateway, wait_for

pytestmark = pytest.mark.slow


async def _cli(*args: str) -> tuple[int, str, str]:
    """`gateway audit …` with no database and no GATEWAY_ settings, in this process (in a
    thread: a download is served by a gateway on this loop)."""
    done = await asyncio.to_thread(gateway_main, "audit", *args,
                                   env={"GATEWAY_DATABASE_URL": NO_DATABASE})
    return done.returncode, done.stdout, done.stderr


NO_DATABASE = "postgresql://nobody@127.0.0.1:1/none"     # never used


async def _cli_process(*args: str) -> tuple[int, str, str]:
    """`gateway audit …` as a user runs it: a process of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATABASE_URL"] = NO_DATABASE
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "audit", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(), err.decode()


async def _all_sealed(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        async def sealed():
            return await conn.fetchval(
                "select bool_and(coalesce((select max(tree_size) from audit_checkpoints c"
                " where c.chain_id = h.chain_id and version = 2), 0) >= h.last_seq)"
                " from audit_chain_heads h")
        return await wait_for(sealed, timeout=10)
    finally:
        await conn.close()


async def test_one_command_downloads_and_verifies_a_slice_across_a_key_rotation(
        tmp_path, database_url, template_database, backends, http, token_for):
    admin = token_for("admin")
    async with own_database(database_url, template_database) as dsn:
        # the first gateway signs with one key and stops (its chain sealed, closed) ...
        first = gateway_settings(backends["urls"], audit_checkpoint_s=0.2, data_dir=tmp_path / "k1")
        async with running_gateway(first, dsn) as gw:
            assert (await call(http, "GET", gw + "/telephony/euos/euo-acme", admin))[0] == 200
            assert await _all_sealed(dsn)
        # ... the next one signs with another (the rotation): the slice spans both
        second = gateway_settings(backends["urls"], audit_checkpoint_s=0.2, data_dir=tmp_path / "k2")
        async with running_gateway(second, dsn) as gw:
            assert (await call(http, "GET", gw + "/telephony/euos/euo-acme/users/u-bob",
                               admin))[0] == 200
            assert await _all_sealed(dsn)
            slice_url, keys_url = f"{gw}/v1/audit/slice?limit=1000", f"{gw}/v1/audit/keys"
            saved = tmp_path / "slice.json"
            code, out, err = await _cli_process("verify-slice", slice_url, "--token", admin,
                                                "--public-key", keys_url, "--save", str(saved))
            assert code == 0, out + err
            report = orjson.loads(out)
            assert report["ok"] and report["checkpoints_checked"] == 2
            assert report["rows_proved"] == report["rows_checked"] > 0
            doc = orjson.loads(saved.read_bytes())
            assert len({cp["key_id"] for cp in doc["checkpoints"]}) == 2     # two keys in play

            _, _, body = await call(http, "GET", keys_url)
            keys = orjson.loads(body)["keys"]
            assert len(keys) == 2
            # the keys as saved files work the same: one PEM file holding both, or the JSON
            both = tmp_path / "keys.pem"
            both.write_text("".join(k["public_key_pem"] for k in keys))
            as_json = tmp_path / "keys.json"
            as_json.write_bytes(body)
            for source in (both, as_json):
                code, out, err = await _cli("verify-slice", str(saved), "--public-key", str(source))
                assert code == 0 and orjson.loads(out)["ok"], out + err
            # only the newest key (a key left out): the older chain's checkpoint cannot be checked
            newest = tmp_path / "newest.pem"
            newest.write_text(keys[-1]["public_key_pem"])
            code, out, _ = await _cli("verify-slice", str(saved), "--public-key", str(newest))
            assert code == 1 and "not among the public keys given" in orjson.loads(out)["problem"]
            # a bad token: the download is refused, named with the gateway's error
            code, out, err = await _cli("verify-slice", slice_url, "--token", "not.a.token",
                                        "--public-key", keys_url)
            assert code == 2 and "401" in err and not out, err

            # a saved slice tampered with: one sealed row's status changed
            entry = next(e for e in doc["rows"] if e["inclusion"] is not None)
            entry["row"]["status"] = 404 if entry["row"]["status"] != 404 else 200
            tampered = tmp_path / "tampered.json"
            tampered.write_bytes(orjson.dumps(doc))
            code, out, _ = await _cli("verify-slice", str(tampered), "--public-key", keys_url)
            report = orjson.loads(out)
            assert code == 1 and not report["ok"]
            assert f"seq {entry['row']['seq']}" in report["problem"], report
            # and --save needs a download, a bad key source is named
            code, _, err = await _cli("verify-slice", str(saved), "--public-key", keys_url,
                                      "--save", str(tmp_path / "x.json"))
            assert code == 2 and "--save" in err
            (tmp_path / "empty.pem").write_text("")
            code, _, err = await _cli("verify-slice", str(saved), "--public-key",
                                      str(tmp_path / "empty.pem"))
            assert code == 2 and "holds no PEM public key" in err


async def test_the_token_is_not_sent_on_where_a_redirect_points(aiohttp_server, tmp_path):
    """A slice URL that redirects elsewhere (a moved gateway, a hostile link) must not hand
    the admin's bearer token to the other host; the download then fails clearly."""
    from aiohttp import web
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"error": {"code": "unauthenticated", "message": "no token"}},
                                  status=401)
    second = web.Application()
    second.router.add_get("/slice", elsewhere)
    other = await aiohttp_server(second)

    async def moved(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer the-admins-token"
        raise web.HTTPFound(str(other.make_url("/slice")))
    first = web.Application()
    first.router.add_get("/v1/audit/slice", moved)
    gateway = await aiohttp_server(first)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = tmp_path / "key.pem"
    key.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    code, _, err = await _cli("verify-slice", str(gateway.make_url("/v1/audit/slice")),
                              "--token", "the-admins-token", "--public-key", str(key))
    assert seen == [None], err
    assert code == 2 and "401" in err
