"""The README's first command: `gateway demo` starts everything and its printed lines work."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys

import orjson

from .conftest import call


async def test_demo_prints_tokens_whose_curl_lines_show_what_each_role_sees(http, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATA_DIR"] = str(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "demo", "--port", str(port), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        printed = []
        async with asyncio.timeout(60):
            while not printed or "Ctrl-C" not in printed[-1]:
                printed.append((await proc.stdout.readline()).decode())
        text = "".join(printed)
        shows = re.findall(r"TOKEN=(\S+)\n\s+curl -s -H \"Authorization: Bearer \$TOKEN\" (\S+)",
                           text)
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
        sliced = outcomes["/v1/audit/slice"]
        assert sliced[0] == 200 and orjson.loads(sliced[1])["format"] == "partner-gateway-slice/1"
        assert "gateway audit verify-slice slice.json --public-key key.pem" in text
        # the break-glass lines, in order: refused, opened, allowed
        block = text[text.index("# provider staff: break-glass"):]
        token = re.search(r"TOKEN=(\S+)", block).group(1)
        sends = re.findall(r"curl -s -X (\w+) -H \"Authorization: Bearer \$TOKEN\" "
                           r"-H 'Content-Type: application/json' -d '(\{.*?\})' (\S+)", block)
        statuses = []
        for method, body, url in sends:
            status, _, answer = await call(http, method, url, token, json=orjson.loads(body))
            statuses.append(status)
        assert statuses == [403, 201, 200], answer
        # the policy's own tests, as printed (from the demo's directory, with its settings)
        assert re.search(r"\n  gateway policy test\n", text)
        tested = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "policy", "test", env=env,
            stdout=asyncio.subprocess.PIPE)
        out, _ = await tested.communicate()
        assert tested.returncode == 0 and b" 0 failed" in out, out
        # the demo's webhook receiver checks the signature and prints the event
        assert re.search(r"Webhooks .* go to http://127\.0\.0\.1:\d+/webhooks", text)
        filer = next(t for t, u in shows if u.endswith("/v1/me/access-log"))
        status, _, _ = await call(http, "POST", f"http://127.0.0.1:{port}/v1/me/requests", filer,
                                  json={"type": "restriction", "data_sets": ["user_mobile"]})
        assert status == 201
        printed = []
        async with asyncio.timeout(30):
            while "webhook request.filed (signature ok)" not in (line := (
                    await proc.stdout.readline()).decode()):
                assert line, "the demo ended without printing the webhook"
                printed.append(line)
        # the break-glass grant opened above is printed as a grant, not as a request
        assert any(re.match(r"webhook break_glass\.opened \(signature ok\): grant [0-9a-f-]{36} "
                            r"by provider_staff over euo-", p) for p in printed), printed
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
