"""Serving processes: the listening socket bound once, `serve --workers N` forked workers
replaced when they die (within a restart budget), the policy the supervisor keeps for the
workers it starts, SIGHUP passed on, a clean stop on SIGTERM or SIGINT, and the pid file
`gateway reload` finds the server by."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from aiohttp import web

from .policy.catalog import PolicyError
from .settings import ConfigError, Settings

log = logging.getLogger("gateway")
PR_SET_PDEATHSIG = 1     # linux/prctl.h


PID_FILE = "gateway.pid"


@contextlib.contextmanager
def pid_file(settings: Settings):
    """GATEWAY_DATA_DIR/gateway.pid while serving, so `gateway reload` finds this process."""
    path = settings.data_dir / PID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()


def share_metrics() -> None:
    """Have the workers keep their metrics in files of one clean directory, so /metrics in
    any of them renders all (gateway/metrics.py): the operator's PROMETHEUS_MULTIPROC_DIR
    emptied, or a fresh temporary one removed when the gateway exits."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):     # a previous run's values are not this one's
            if name.endswith(".db"):
                os.remove(os.path.join(given, name))
        return
    path = tempfile.mkdtemp(prefix="gateway-metrics-")
    atexit.register(shutil.rmtree, path, True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def forget_metrics(pid: int) -> None:
    """Drop a dead worker's gauges from what /metrics sums (its counts stay: they happened)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, path)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound once here and inherited by every worker.

    No SO_REUSEPORT: a second, unrelated gateway on the same port must fail to bind rather
    than silently take half of the connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as e:
        hint = " (is another gateway serving it?)" if e.errno == errno.EADDRINUSE else ""
        raise ConfigError(f"cannot listen on {host}:{port} (GATEWAY_LISTEN): "
                          f"{os.strerror(e.errno) if e.errno else e}{hint}") from None


class RestartBudget:
    """When to replace a dead worker, and when to stop trying: more than `limit` deaths within
    `window_s` means something is wrong that a restart will not fix. Pure: times are given."""

    def __init__(self, limit: int = 5, window_s: float = 60.0, first_delay_s: float = 0.5,
                 max_delay_s: float = 10.0):
        self.limit, self.window_s = limit, window_s
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self._deaths: list[float] = []

    def on_death(self, now: float) -> float | None:
        """The delay before the replacement starts, or None to give up."""
        self._deaths = [t for t in self._deaths if now - t < self.window_s] + [now]
        recent = len(self._deaths)
        if recent > self.limit:
            return None
        return min(self.first_delay_s * 2 ** (recent - 1), self.max_delay_s)

    def recent(self) -> int:
        """Deaths counted in the current window."""
        return len(self._deaths)


class Supervisor:
    """N forked workers on one inherited socket: replace the ones that die (with backoff),
    give up past the restart budget, and stop them all on SIGTERM or SIGINT."""

    STOP_GRACE_S = 30.0     # a worker still draining after this is killed

    def __init__(self, settings: Settings, dsn: str, sock: socket.socket, create_app, workers: int,
                 policy: PolicyInForce):
        self.target = (settings, dsn, sock, create_app, policy)
        self.policy = policy
        self.workers = workers
        self.budget = RestartBudget()
        self.stopping = False
        self.reloading = False
        self._fork = multiprocessing.get_context("fork")

    def run(self) -> int:
        """Serve until told to stop (0) or until workers keep dying (1)."""
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_w, False)
        old_wakeup = signal.set_wakeup_fd(wakeup_w)   # a signal ends the wait below at once
        old_handlers = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        procs = {}
        try:
            for _ in range(self.workers):
                p = self._start()
                procs[p.sentinel] = p
            settings = self.target[0]
            log.info("%d workers on %s:%d (pids %s)", self.workers, settings.listen_host,
                     settings.listen_port, ", ".join(str(p.pid) for p in procs.values()))
            pending: list[float] = []     # when each replacement is due
            while not self.stopping:
                timeout = max(0.0, min(pending) - time.monotonic()) if pending else None
                ready = multiprocessing.connection.wait([*procs, wakeup_r], timeout)
                if wakeup_r in ready:
                    os.read(wakeup_r, 512)
                if self.stopping:
                    break
                if self.reloading:
                    self.reloading = False
                    self.policy.reload()          # what replacement workers will start with
                    log.info("reloading the policy in %d workers", len(procs))
                    for p in procs.values():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p.pid, signal.SIGHUP)
                for sentinel in ready:
                    if sentinel in procs:
                        delay = self._on_exit(procs.pop(sentinel))
                        if delay is None:
                            return self._stop(procs.values(), failed=True)
                        pending.append(time.monotonic() + delay)
                now = time.monotonic()
                for due in [d for d in pending if d <= now]:
                    pending.remove(due)
                    p = self._start()
                    procs[p.sentinel] = p
                    log.info("worker pid %d started", p.pid)
            return self._stop(procs.values(), failed=False)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            os.close(wakeup_r)
            os.close(wakeup_w)

    def _start(self):
        p = self._fork.Process(target=run_worker, args=(*self.target, os.getpid()), daemon=False)
        p.start()
        return p

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGHUP:
            self.reloading = True
        else:
            self.stopping = True

    def _on_exit(self, proc) -> float | None:
        """Log a worker's death; the delay before its replacement, or None to give up."""
        proc.join()
        forget_metrics(proc.pid)
        code = proc.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit code {code}")
        delay = self.budget.on_death(time.monotonic())
        if delay is None:
            log.error("worker pid %d died (%s); %d workers died within %g s, giving up",
                      proc.pid, how, self.budget.recent(), self.budget.window_s)
        else:
            log.error("worker pid %d died (%s); replacing it in %g s", proc.pid, how, delay)
        return delay

    def _stop(self, procs, failed: bool) -> int:
        """SIGTERM every worker, wait for them (killing stragglers); the exit status."""
        procs = list(procs)
        if not failed:
            log.info("stopping %d workers", len(procs))
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.STOP_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.error("worker pid %d did not stop within %g s; killing it", p.pid, self.STOP_GRACE_S)
                p.kill()
                p.join()
        if failed:
            return 1
        # a worker still starting has no handler yet: our SIGTERM ends it, which is a clean stop
        return 0 if all(p.exitcode in (0, -signal.SIGTERM) for p in procs) else 1


class PolicyInForce:
    """The supervisor's copy of the policy in force: forked workers start with it, and it
    follows SIGHUP like theirs (kept when the new files are refused)."""

    def __init__(self, settings: Settings, policy_set):
        self.settings = settings
        self.current = policy_set

    def reload(self) -> None:
        from .policy.policyset import load_policy_set
        try:
            self.current = load_policy_set(self.settings.policy_dir)
        except (PolicyError, OSError) as e:
            log.error("supervisor keeps policy %s: %s", self.current.version, e)


def run_worker(settings: Settings, dsn: str, sock: socket.socket, create_app,
                policy: PolicyInForce, parent_pid: int | None = None) -> None:
    """One serving process: its own event loop, pools and audit chain, the shared socket."""
    if parent_pid is not None:
        # the supervisor's handlers came along with the fork; until aiohttp installs its
        # own, SIGTERM must end this process rather than set a flag in its copy of them
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent(parent_pid)
    # a reload asked for before the app listens for it must not end the process
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    use_uvloop()
    asyncio.run(_serve_app(create_app(settings, dsn, reload_on_sighup=True,
                                      policy_set=policy.current), sock))


async def _serve_app(app, sock: socket.socket) -> None:
    """What web.run_app does for one app on an inherited socket, with the gateway's runner
    (proxy paths straight to the pipeline): serve until SIGTERM or SIGINT, then let the
    requests under way finish (aiohttp's shutdown timeout) and close every resource."""
    from .app import GatewayRunner
    stop = stop_on_signal()           # from the start: a SIGTERM during start-up stops cleanly
    runner = GatewayRunner(app, access_log=None)
    try:
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        log.info("serving on %s", site.name)
        await stop.wait()
    finally:
        await runner.cleanup()


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM when the supervisor dies, even by SIGKILL, so no worker
    serves unsupervised (Linux; elsewhere workers outlive a killed supervisor)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:     # the parent died before prctl took effect
        sys.exit(1)


def use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def stop_on_signal() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_signal() -> None:
    await stop_on_signal().wait()
