"""Stop the embedded PostgreSQL when the gateway that started it is gone, even by SIGKILL.

`python -m gateway.db_watchdog PGDATA PID` blocks reading its stdin, the read end of a pipe
whose write end only the gateway holds. The kernel closes that end however the gateway
dies, so end of file is the signal; no polling, no thread in the gateway. This module
imports nothing heavy: it is a process of its own for as long as the gateway runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import psutil

FAST_SHUTDOWN_S = 20.0    # a fast shutdown waits for a checkpoint; past this, stop at once


def postmaster_pid(pgdata: Path) -> int | None:
    """The pid named by pgdata/postmaster.pid, or None when there is no readable file."""
    try:
        first = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.strip().isdigit() else None


def is_postmaster(pid: int, pgdata: Path) -> bool:
    """Whether pid is a live postgres serving pgdata (not a dead pid, a zombie or a reused pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(cmdline) and Path(cmdline[0]).name == "postgres" and str(pgdata) in cmdline


def stop_postmaster(pgdata: Path, pid: int) -> bool:
    """Shut down the postmaster pid of pgdata (fast, then immediate); False if it was not running."""
    if postmaster_pid(pgdata) != pid or not is_postmaster(pid, pgdata):
        return False    # already stopped, or restarted by someone else: not ours to stop
    for sig, wait_s in ((signal.SIGINT, FAST_SHUTDOWN_S), (signal.SIGQUIT, 5.0),
                        (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not is_postmaster(pid, pgdata):
                return True
            time.sleep(0.05)
    return not is_postmaster(pid, pgdata)


def main(argv: list[str]) -> int:
    """Wait for end of file on stdin, then stop the postmaster named on the command line."""
    pgdata, pid = Path(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # only the pipe tells this process to act
    sys.stdin.buffer.read()
    if stop_postmaster(pgdata, pid):
        print(f"gateway.db_watchdog: the gateway exited without stopping the embedded "
              f"PostgreSQL (pid {pid}); stopped it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
