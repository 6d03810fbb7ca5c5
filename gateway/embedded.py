"""The embedded PostgreSQL of development and the demo (pgserver's wheel): started by the
first process on a data dir, watched by gateway.db_watchdog, used by the others."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from . import db_watchdog
from .db import DatabaseUnavailable

log = logging.getLogger("gateway.db")


# Descriptors that only the process owning an embedded server may hold: a forked worker
# that kept them would keep the owner lock and the watchdog's pipe alive after its parent died.
_OWNER_FDS: set[int] = set()


def _close_owner_fds_in_child() -> None:
    for fd in _OWNER_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _OWNER_FDS.clear()


os.register_at_fork(after_in_child=_close_owner_fds_in_child)


class EmbeddedPostgres:
    """A PostgreSQL server under data_dir/pgdata, from the pgserver wheel.

    The first process to start it owns it (an flock on data_dir/embedded-postgres.lock):
    it removes a stale postmaster.pid or stops an orphaned server left by a crashed owner,
    starts the server, and spawns `gateway.db_watchdog`, which stops the server if the
    owner dies without doing so (SIGKILL included). Later processes on the same data dir
    (`gateway audit …` next to `gateway serve`) use the running server and never stop it.
    """

    def __init__(self, data_dir: Path):
        self.pgdata = Path(data_dir).resolve() / "pgdata"
        self._lock_fd: int | None = None
        self._pipe_fd: int | None = None
        self._watchdog: subprocess.Popen | None = None
        self._pid: int | None = None

    def start(self) -> str:
        """Start the server (or use the one its owner runs) and return its DSN."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if not self._take_ownership():
            return self._running_uri()
        try:
            self._clear_leftovers()
            uri = self._start_server()
            self._spawn_watchdog()
        except BaseException:
            self.stop()
            raise
        return uri

    def stop(self) -> None:
        """Stop the server if this process owns it; release the ownership either way."""
        if self._pid is not None:
            db_watchdog.stop_postmaster(self.pgdata, self._pid)
            self._pid = None
        for fd in (self._pipe_fd, self._lock_fd):
            if fd is not None:
                _OWNER_FDS.discard(fd)
                os.close(fd)
        self._pipe_fd = self._lock_fd = None
        if self._watchdog is not None:
            self._watchdog.wait(timeout=30)     # end of file on its stdin: it exits at once
            self._watchdog = None

    def _take_ownership(self) -> bool:
        """Take the owner lock without waiting; False when a live process already holds it."""
        fd = os.open(self.pgdata.parent / "embedded-postgres.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        _OWNER_FDS.add(fd)
        return True

    def _clear_leftovers(self) -> None:
        """Make a crashed owner's state harmless: stop its orphaned server, drop a stale pid file."""
        pid = db_watchdog.postmaster_pid(self.pgdata)
        if pid is not None and db_watchdog.is_postmaster(pid, self.pgdata):
            log.warning("an embedded PostgreSQL (pid %d) outlived the gateway that started it; "
                        "restarting it", pid)
            if not db_watchdog.stop_postmaster(self.pgdata, pid):
                raise DatabaseUnavailable(f"the orphaned PostgreSQL pid {pid} under {self.pgdata} "
                                          f"does not stop")
        pid_file = self.pgdata / "postmaster.pid"
        if pid_file.exists():
            # its pid is dead or belongs to another program now (pids are reused after a
            # reboot or in a new container); pgserver would take it for a running server
            log.warning("removing stale %s (pid %s is not a running PostgreSQL)", pid_file, pid)
            pid_file.unlink()
        # the socket's lock file (the socket lives in pgdata) outlives a killed server too,
        # and PostgreSQL refuses to start while its pid exists at all: a zombie not yet
        # reaped (PID 1 of a container that reaps nothing) or a reused pid would block it
        for lock in self.pgdata.glob(".s.PGSQL.*.lock"):
            log.warning("removing stale %s (no PostgreSQL runs on %s)", lock, self.pgdata)
            lock.unlink(missing_ok=True)
        # pgserver counts its users in this file and never stops a server while a pid it
        # lists (dead ones included) remains; this process manages the lifetime instead
        (self.pgdata / ".handle_pids.json").unlink(missing_ok=True)

    def _start_server(self) -> str:
        """Start PostgreSQL with pgserver; DatabaseUnavailable with the log's path if it fails."""
        pgserver = _import_pgserver()
        from pgserver.postgres_server import PostgresServer

        # pgserver caches one handle per directory, which would name a server stopped since
        PostgresServer._instances.pop(self.pgdata, None)
        try:
            server = pgserver.get_server(self.pgdata, cleanup_mode=None)
        except Exception as e:      # pg_ctl's failures, pgserver's assertions: say where to look
            raise DatabaseUnavailable(
                f"the embedded PostgreSQL under {self.pgdata} did not start "
                f"({type(e).__name__}); see {self.pgdata / 'log'}") from None
        self._pid = server.get_pid()
        return server.get_uri()

    def _spawn_watchdog(self) -> None:
        """Start the process that stops the server once this one is gone."""
        read_end, write_end = os.pipe()
        self._pipe_fd = write_end
        _OWNER_FDS.add(write_end)
        try:
            # a session of its own: a Ctrl-C or a signal to the gateway's group must not
            # take the watchdog down before the gateway has stopped the server
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "gateway.db_watchdog", str(self.pgdata), str(self._pid)],
                stdin=read_end, start_new_session=True)
        finally:
            os.close(read_end)

    def _running_uri(self) -> str:
        """The DSN of the server another live process owns, once it is ready."""
        _import_pgserver()
        from pgserver.utils import PostmasterInfo

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid = db_watchdog.postmaster_pid(self.pgdata)
            if pid is not None and db_watchdog.is_postmaster(pid, self.pgdata):
                with contextlib.suppress(Exception):    # a file still being written
                    info = PostmasterInfo.read_from_pgdata(self.pgdata)
                    if info is not None and info.status == "ready":
                        return info.get_uri()
            time.sleep(0.1)
        raise DatabaseUnavailable(f"another process holds {self.pgdata.parent}/embedded-postgres.lock "
                                  f"but no PostgreSQL became ready under {self.pgdata}")


def _import_pgserver():
    """pgserver, imported late: serving with GATEWAY_DATABASE_URL never needs it."""
    with warnings.catch_warnings():     # platformdirs' XDG_RUNTIME_DIR notice is noise here
        warnings.simplefilter("ignore")
        import pgserver
    return pgserver
