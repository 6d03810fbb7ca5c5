"""Export memory benchmark: the gateway's RSS while a user downloads an export holding
1 GB of attachments (10 voicemails of 100 MB by default).

    .venv/bin/python -m tests.bench.export_bench [--files 10] [--mb 100]

The gateway runs as `gateway serve` in its own process, so its RSS is measured alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import aiohttp

from gateway.demo import data as demo_data
from gateway.demo.backends import meeting_app, telephony_app
from gateway.demo.run import seed_contracts, start_site
from gateway.embedded import EmbeddedPostgres
from tests.conftest import SECRET, make_token


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def run(files: int, mb: int) -> None:
    server = EmbeddedPostgres(tempfile.mkdtemp(prefix="gateway-export-bench-"))
    dsn = server.start()
    data = demo_data.build()
    blob = os.urandom(1 << 20) * mb
    data.voicemails["u-alice"] = [{"id": f"big-{i}", "caller": "+3226400000",
                                   "received_at": "2026-11-01T10:00:00+00:00", "duration_s": 60}
                                  for i in range(files)]
    for i in range(files):
        data.blobs[f"big-{i}"] = ("audio/wav", blob)
    await seed_contracts(dsn, data)
    runners, urls = [], {}
    for service, make in (("telephony", telephony_app), ("meeting", meeting_app)):
        runner, port = await start_site(make(data), "127.0.0.1", 0)
        runners.append(runner)
        urls[service] = f"http://127.0.0.1:{port}"
    port = 18700
    env = dict(os.environ, GATEWAY_DATABASE_URL=dsn, GATEWAY_LISTEN=f"127.0.0.1:{port}",
               GATEWAY_UPSTREAM_TELEPHONY=urls["telephony"], GATEWAY_UPSTREAM_MEETING=urls["meeting"],
               GATEWAY_JWT_SECRET=SECRET, GATEWAY_JWT_ISSUER="https://issuer.test",
               GATEWAY_JWT_AUDIENCE="partner-gateway", GATEWAY_BACKEND_TIMEOUT_S="120")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            for _ in range(100):
                try:
                    async with http.get(base + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
            token = make_token("user", "u-alice", euo="euo-acme")
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(base + "/v1/me/export?format=json", headers=headers) as r:
                await r.read()                              # warm up every code path
            before = rss_mb(proc.pid)
            peak = before
            received = 0
            started = time.perf_counter()
            path = tempfile.mktemp(suffix=".zip")
            with open(path, "wb") as out:
                async with http.get(base + "/v1/me/export", headers=headers) as r:
                    assert r.status == 200, await r.text()
                    async for chunk in r.content.iter_chunked(1 << 20):
                        out.write(chunk)
                        received += len(chunk)
                        peak = max(peak, rss_mb(proc.pid))
            elapsed = time.perf_counter() - started
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
                sizes = sum(i.file_size for i in z.infolist())
            os.unlink(path)
        print(f"export of {files} x {mb} MB attachments: {received / 2**20:,.0f} MiB in "
              f"{elapsed:.1f} s ({received / 2**20 / elapsed:,.0f} MiB/s); archive holds "
              f"{len(names)} files, {sizes / 2**20:,.0f} MiB")
        print(f"gateway RSS: {before:.0f} MiB before, {peak:.0f} MiB peak, "
              f"growth {peak - before:.0f} MiB (target < 100 MiB)")
    finally:
        proc.terminate()
        proc.wait()
        for r in runners:
            await r.cleanup()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(run(args.files, args.mb))


if __name__ == "__main__":
    main()
