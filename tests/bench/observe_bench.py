"""What observing one request costs: its access-log line and its metrics, in µs.

    .venv/bin/python -m tests.bench.observe_bench [--n 200000] [--multiprocess]

The access log is written to a pipe drained by `cat` (buffered as in the gateway, and, for
comparison, one write per line); `--multiprocess` measures the metrics as `serve --workers` keeps them
(values in files of PROMETHEUS_MULTIPROC_DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

import orjson


def per_call_us(fn, n: int) -> float:
    """The median of 5 runs of n calls, in µs per call."""
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e6)
    return sorted(runs)[2]


async def bench(n: int) -> None:
    from gateway import access_log
    from gateway.audit import AuditRow
    from gateway.metrics import Metrics

    row = AuditRow(at=datetime.now(UTC), request_id="3f2a9c1d5e7b4a6c0000002a", method="GET",
                   route="telephony:/euos/{euo}/users/{user}", service="telephony",
                   actor_role="partner", actor_partner="p-northwind", decision="allow",
                   status=200, bytes=512, duration_ms=3.25, client_request_id="client-1",
                   trace_id="0af7651916cd43dd8448eb211c80319c")
    denied = AuditRow(at=row.at, request_id="x", route=row.route, decision="deny", status=403,
                      reason="dataset_not_permitted", duration_ms=1.0)
    reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    pipe = reader.stdin.fileno()
    log = access_log.AccessLog(pipe)
    print(f"access log line, buffered (the gateway's): {per_call_us(lambda: log.write(row), n):.2f} µs")
    log.flush()

    def unbuffered():
        os.write(pipe, orjson.dumps(access_log.line(row), option=orjson.OPT_APPEND_NEWLINE))
    print(f"access log line, one write each:           {per_call_us(unbuffered, n):.2f} µs")
    reader.stdin.close()
    reader.wait()
    print(f"line size: {len(orjson.dumps(access_log.line(row))) + 1} bytes")
    metrics = Metrics()
    print(f"metrics, one allowed request (cached children): "
          f"{per_call_us(lambda: metrics.observe(row), n):.2f} µs")
    print(f"metrics, one refused request:                    "
          f"{per_call_us(lambda: metrics.observe(denied), n):.2f} µs")

    def with_labels():
        metrics.requests.labels(row.route, row.decision, str(row.status)).inc()
        metrics.duration.labels(row.route).observe(row.duration_ms / 1000)
    print(f"metrics, labels() each time instead:             {per_call_us(with_labels, n):.2f} µs")
    print(f"backend latency observation:                     "
          f"{per_call_us(lambda: metrics.observe_backend('telephony', 0.003), n):.2f} µs")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--multiprocess", action="store_true")
    args = parser.parse_args()
    if args.multiprocess:   # before prometheus_client is imported, as `serve --workers` does
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="observe-bench-")
    print(f"python {sys.version.split()[0]}, multiprocess metrics: {args.multiprocess}")
    asyncio.run(bench(args.n))


if __name__ == "__main__":
    main()
