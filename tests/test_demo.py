"""The README's first command: `gateway demo` starts everything and its printed lines work."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path

import orjson

from .conftest import call, wait_for


async def test_demo_prints_tokens_whose_curl_lines_show_what_each_role_sees(http, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATA_DIR"] = str(tmp_path)
    env["GATEWAY_AUDIT_CHECKPOINT_S"] = "0.5"     # the slice's rows sealed within the test
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--port", str(port), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        printed = []
        async with asyncio.timeout(60):
            while not printed or "Ctrl-C" not in printed[-1]:
                printed.append((await proc.stdout.readline()).decode())
        text = "".join(printed)
        shows = re.findall(r"TOKEN=(\S+)\n\s+curl -s -H \"Authorization: Bearer \$TOKEN\" "
                           r"'?(http[^'\s]+)", text)
        # every URL a shell would read otherwise is quoted (zsh refuses an unquoted `?`)
        assert not re.findall(r"(?<!')http://\S*[?&*\[]", text)
        assert len(shows) >= 12
        outcomes = {}
        for token, url in shows:
            status, _, body = await call(http, "GET", url, token)
            outcomes[url.split(str(port), 1)[1]] = (status, body)
        staff_view = outcomes["/telephony/euos/euo-acme/users/u-alice"]
        assert staff_view[0] == 200
        assert outcomes["/telephony/euos/euo-initech"][0] == 403
        assert outcomes["/telephony/euos/euo-umbrella"][0] == 403
        voicemail = outcomes["/telephony/euos/euo-acme/users/u-alice/voicemails/vm-u-alice-1"]
        assert voicemail[0] == 200 and voicemail[1].startswith(b"RIFF")
        explained = outcomes["/v1/explain?path=/telephony/euos/euo-acme/users/u-bob/recordings"]
        assert explained[0] == 200 and orjson.loads(explained[1])["decision"] == "allow"
        # every printed shell line after the tokens, run as a user pastes them, in order
        outputs = await _run_as_printed(text, tmp_path / "shell")
        for name, (matches, check) in SHELL_EXPECT.items():
            ran = [(c, o) for c, o in outputs if matches(c)]
            assert ran, f"no printed line for: {name}"
            command, out = ran[0]
            assert check(out), f"{name}: {command}\n{out}"
        # break-glass: refused, allowed under the grant, refused again once it is ended
        patches = [o for c, o in outputs if "-X PATCH" in c]
        assert [_code(o) for o in patches] == ["write_not_permitted", None,
                                              "write_not_permitted"], patches
        # the slice's one command proves rows against the published keys once they are sealed
        (slice_line,) = [c for c, _ in outputs if " audit verify-slice " in c]

        async def proved():
            done = await asyncio.create_subprocess_shell(
                f"ADMIN={shlex.quote(_admin_token(text))}\n{slice_line}",
                cwd=tmp_path / "shell", stdout=asyncio.subprocess.PIPE)
            out, _ = await done.communicate()
            report = orjson.loads(out)
            assert done.returncode == 0 and report["ok"], out
            return report["rows_proved"] > 0
        assert await wait_for(proved, timeout=20)
        assert orjson.loads((tmp_path / "shell" / "slice.json").read_bytes())["rows"]
        # the demo's webhook receiver checks the signature and prints the event
        assert re.search(r"Webhooks .* go to http://127\.0\.0\.1:\d+/webhooks", text)
        filer = next(t for t, u in shows if u.endswith("/v1/me/access-log"))
        status, _, _ = await call(http, "POST", f"http://127.0.0.1:{port}/v1/me/requests", filer,
                                  json={"type": "restriction", "data_sets": ["user_mobile"]})
        assert status == 201
        # the webhooks of the break-glass grant opened above and of this request, in
        # whichever order the receiver gets them (one delivery round may carry both); the
        # grant is printed as a grant, not as a request
        opened = re.compile(r"webhook break_glass\.opened \(signature ok\): grant [0-9a-f-]{36} "
                            r"by provider_staff over euo-")
        printed = []
        async with asyncio.timeout(30):
            while not ("webhook request.filed (signature ok)" in "".join(printed)
                       and any(opened.match(p) for p in printed)):
                line = (await proc.stdout.readline()).decode()
                assert line, f"the demo ended without printing both webhooks: {printed}"
                printed.append(line)
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0


def _code(answer: str) -> str | None:
    try:
        return orjson.loads(answer)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _json(answer: str) -> dict:
    try:
        doc = orjson.loads(answer)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _admin_token(text: str) -> str:
    return re.findall(r"\n  ADMIN=(\S+)\n", text)[-1]


async def _run_as_printed(text: str, where) -> list[tuple[str, str]]:
    """Each shell line the demo prints from its first curl line up to the console tokens,
    run in one bash as printed (TOKEN=… lines set what the next lines use), with no
    GATEWAY_ settings; each command with what it printed."""
    where.mkdir()
    section = text[text.index("# provider staff: a user record"):text.index("# Console")]
    commands = [line.strip() for line in section.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    script = "".join(f"{c}\necho\necho @@@\n" for c in commands)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = await asyncio.create_subprocess_exec(
        "bash", "-c", script, cwd=where, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(done.communicate(), timeout=120)
    assert done.returncode == 0, err
    outs = out.decode().split("@@@\n")
    assert len(outs) == len(commands) + 1, (commands, outs)
    return [(c, o.strip()) for c, o in zip(commands, outs, strict=False)
            if not re.fullmatch(r"[A-Z]+=\S+", c)]


def _has(*words):
    return lambda command: all(w in command for w in words)


# what a printed line (found by what it contains) must print
SHELL_EXPECT = {
    "staff explain for the EUO admin: voicemails refused, naming who asked": (
        _has("/v1/explain?path=", "&role=euo_admin"),
        lambda o: _json(o).get("decision") == "deny"
        and _json(o)["explained_by"]["role"] == "provider_staff"),
    "a grant opened with purpose and ticket": (
        _has("-X POST", "/v1/break-glass"),
        lambda o: _json(o).get("in_force") is True and _json(o)["ticket"] == "INC-1234"),
    "the EUO admin lists the grant in force": (
        lambda c: "$ADMIN" in c and c.endswith("/v1/break-glass"),
        lambda o: any(g["in_force"] and g["ticket"] == "INC-1234"
                      for g in _json(o).get("grants", []))),
    "u-alice sees the access under the grant, with purpose and ticket": (
        _has("$ALICE", "/v1/me/access-log"),
        lambda o: any((a["break_glass"] or {}).get("ticket") == "INC-1234"
                      and a["action"] == "PATCH" for a in _json(o).get("accesses", []))),
    "the EUO admin ends the grant early": (
        _has("-X DELETE", "/v1/break-glass/"),
        lambda o: _json(o).get("in_force") is False
        and _json(o)["ended_by"] == "euo_admin:admin@acme"),
    "explain offline, as the endpoint answers": (
        _has(" policy explain "),
        lambda o: _json(o).get("decision") == "allow"
        and _json(o)["served"] == ["call_recordings"]),
    "the EUO admin's slice downloaded and verified in one command": (
        _has(" audit verify-slice ", "--token", "/v1/audit/keys"),
        lambda o: _json(o).get("ok") is True and _json(o)["rows_checked"] > 0),
    "the policy's own tests pass": (
        _has(" policy test"), lambda o: " 0 failed" in o),
}


async def test_the_backends_run_alone_and_the_printed_lines_serve_a_gateway_in_front(
        http, tmp_path, database_url):
    """`gateway demo --backends-only` starts only the demo backends and prints the `export`
    lines for `gateway serve`: a gateway started with them serves the demo's data."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATA_DIR"] = str(tmp_path / "state")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--backends-only", "--port", "0", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    serve = None
    try:
        printed = []
        async with asyncio.timeout(60):
            while not printed or "Ctrl-C" not in printed[-1]:
                printed.append((await proc.stdout.readline()).decode())
        exports = dict(re.findall(r"^export (GATEWAY_\w+)=(.*)$", "".join(printed), re.M))
        assert {"GATEWAY_UPSTREAM_TELEPHONY", "GATEWAY_UPSTREAM_MEETING", "GATEWAY_JWT_SECRET",
                "GATEWAY_DATA_DIR"} <= exports.keys(), printed
        (secret_file,) = re.fullmatch(r'"\$\(cat (.+)\)"', exports["GATEWAY_JWT_SECRET"]).groups()
        exports["GATEWAY_JWT_SECRET"] = Path(shlex.split(secret_file)[0]).read_text().strip()
        assert any(line.rstrip().endswith("gateway serve") for line in printed)

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        serve = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", env={
                **env, **exports, "GATEWAY_DATABASE_URL": database_url,
                "GATEWAY_LISTEN": f"127.0.0.1:{port}"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"

        async def up():
            try:
                return (await call(http, "GET", base + "/healthz"))[0] == 200
            except OSError:
                return False
        assert await wait_for(up, timeout=60)
        alice = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "token", "--role", "user", "--euo", "euo-acme",
            "--sub", "u-alice", env={**env, **exports}, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        token = (await alice.communicate())[0].decode().strip()
        status, _, body = await call(http, "GET", base + "/telephony/euos/euo-acme/users/u-alice",
                                     token)
        assert status == 200 and orjson.loads(body)["id"] == "u-alice", body
    finally:
        for p in (serve, proc):
            if p is not None and p.returncode is None:
                p.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        if serve is not None:
            await asyncio.wait_for(serve.wait(), 60)
