"""A real HA PostgreSQL on loopback: three etcd members and Patroni members (PostgreSQL 15,
`synchronous_mode: true`), from Debian's packages (`apt-get install patroni etcd-server
etcd-client postgresql`). Used by tests/bench/failover.py and tests/test_failover.py.

Ports, from `base` (default 23100): etcd clients base+0..2, etcd peers base+10..12,
Patroni's REST API base+20..2x, PostgreSQL base+30..3x. PostgreSQL refuses to run as root,
so as root Patroni runs as the `postgres` user (runuser) and the directory is theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER, PASSWORD = "postgres", "ha-test-only"      # a throw-away cluster's, not a secret
SCOPE = "gateway-ha"


def missing() -> str | None:
    """What this machine lacks to run the stack (None when nothing)."""
    for tool in ("etcd", "patroni", "patronictl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install patroni etcd-server etcd-client)"
    if not (PG_BIN / "postgres").exists():
        return f"no PostgreSQL 15 under {PG_BIN} (apt-get install postgresql-15)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


@dataclass
class HaStack:
    root: Path
    base: int = 23100
    members: int = 2
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # --- where ---------------------------------------------------------------------------

    def pg_port(self, i: int) -> int:
        return self.base + 30 + i

    def api_port(self, i: int) -> int:
        return self.base + 20 + i

    def name(self, i: int) -> str:
        return f"pg{i}"

    def ports(self) -> list[int]:
        return ([self.base + i for i in range(3)] + [self.base + 10 + i for i in range(3)]
                + [self.api_port(i) for i in range(self.members)]
                + [self.pg_port(i) for i in range(self.members)])

    def ports_taken(self) -> list[int]:
        """The stack's ports something else listens on (another run of it, say)."""
        taken = []
        for port in self.ports():
            with socket.socket() as s:
                # as the servers bind: a port a closed connection left in TIME_WAIT is free
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    taken.append(port)
        return taken

    def dsn(self, database: str = "postgres", user: str = SUPERUSER,
            password: str = PASSWORD, attrs: str = "read-write") -> str:
        """A multi-host DSN naming every member; libpq's target_session_attrs picks one."""
        hosts = ",".join(f"127.0.0.1:{self.pg_port(i)}" for i in range(self.members))
        return f"postgresql://{user}:{password}@{hosts}/{database}?target_session_attrs={attrs}"

    def member_dsn(self, i: int, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{PASSWORD}@127.0.0.1:{self.pg_port(i)}/{database}"

    # --- up and down ---------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        """etcd x3, then Patroni x members; returns once there is a leader and a
        synchronous standby streaming."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self._start_etcd()
        as_postgres = os.geteuid() == 0
        if as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        for i in range(self.members):
            config = self.root / f"{self.name(i)}.yml"
            config.write_text(json.dumps(self._patroni_config(i), indent=1))
            command = ["patroni", str(config)]
            if as_postgres:
                os.chown(config, pw.pw_uid, pw.pw_gid)
                command = ["runuser", "-u", "postgres", "--"] + command
            with open(self.root / f"{self.name(i)}.log", "wb") as log:
                self.procs[self.name(i)] = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if i == 0:      # the first bootstraps; the others clone it once it leads
                self.wait(lambda: self.leader() is not None, timeout_s, "a leader")
        self.wait(lambda: self.sync_standby() is not None, timeout_s,
                  "a synchronous standby streaming")

    def _start_etcd(self) -> None:
        cluster = ",".join(f"e{i}=http://127.0.0.1:{self.base + 10 + i}" for i in range(3))
        for i in range(3):
            with open(self.root / f"etcd{i}.log", "wb") as log:
                self.procs[f"etcd{i}"] = subprocess.Popen(
                    ["etcd", "--name", f"e{i}", "--data-dir", str(self.root / f"etcd{i}"),
                     "--listen-client-urls", f"http://127.0.0.1:{self.base + i}",
                     "--advertise-client-urls", f"http://127.0.0.1:{self.base + i}",
                     "--listen-peer-urls", f"http://127.0.0.1:{self.base + 10 + i}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.base + 10 + i}",
                     "--initial-cluster", cluster, "--initial-cluster-token", SCOPE,
                     "--initial-cluster-state", "new",
                     # loopback: heartbeats may be quick, elections too
                     "--heartbeat-interval", "50", "--election-timeout", "500"],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _patroni_config(self, i: int) -> dict:
        etcd_hosts = ",".join(f"127.0.0.1:{self.base + j}" for j in range(3))
        data = self.root / self.name(i)
        return {
            "scope": SCOPE, "name": self.name(i),
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{self.api_port(i)}",
                        "connect_address": f"127.0.0.1:{self.api_port(i)}"},
            "etcd3": {"hosts": etcd_hosts},
            "bootstrap": {
                "dcs": {
                    # short, for a test: a dead leader's key lapses after ttl seconds
                    "ttl": 10, "loop_wait": 1, "retry_timeout": 4,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": True,
                    "postgresql": {"use_pg_rewind": True, "use_slots": True, "parameters": {
                        "wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on",
                        "max_wal_senders": 10, "max_replication_slots": 10,
                        "max_connections": 100, "fsync": "on"}},
                },
                "initdb": [{"encoding": "UTF8"}, "data-checksums"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port(i)}",
                "connect_address": f"127.0.0.1:{self.pg_port(i)}",
                "data_dir": str(data), "bin_dir": str(PG_BIN),
                "pgpass": str(self.root / f"pgpass{i}"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": PASSWORD},
                    "replication": {"username": "replicator", "password": PASSWORD},
                    "rewind": {"username": SUPERUSER, "password": PASSWORD},
                },
                "pg_hba": ["local all all trust",
                           "host replication replicator 127.0.0.1/32 md5",
                           "host all all 127.0.0.1/32 md5"],
                "parameters": {"unix_socket_directories": str(self.root)},
            },
        }

    def stop(self) -> None:
        """Stop Patroni (which stops PostgreSQL), then etcd; kill what does not stop."""
        order = [n for n in self.procs if n.startswith("pg")] + \
                [n for n in self.procs if n.startswith("etcd")]
        for name in order:
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        # a postmaster Patroni could not stop (it was killed itself)
        for i in range(self.members):
            pid = self.postmaster_pid(i)
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    # --- state ---------------------------------------------------------------------------

    def cluster(self) -> list[dict]:
        """Patroni's view of the members (GET /cluster of whichever member answers)."""
        for i in range(self.members):
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.api_port(i)}/cluster", timeout=2) as r:
                    return json.load(r)["members"]
            except OSError:
                continue
        return []

    def _role(self, role: str) -> str | None:
        for m in self.cluster():
            if m.get("role") == role and m.get("state") in ("running", "streaming"):
                return m["name"]
        return None

    def leader(self) -> str | None:
        return self._role("leader")

    def sync_standby(self) -> str | None:
        """The synchronous standby, once the leader sees it streaming as `sync` (Patroni's
        /cluster names it from the DCS, which may run ahead of the replication itself)."""
        name, leader = self._role("sync_standby"), self.leader()
        if name is None or leader is None:
            return None
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.api_port(self.index(leader))}/patroni",
                    timeout=2) as r:
                replication = json.load(r).get("replication", [])
        except OSError:
            return None
        streaming = any(s.get("application_name") == name and s.get("state") == "streaming"
                        and s.get("sync_state") in ("sync", "quorum") for s in replication)
        return name if streaming else None

    def index(self, name: str) -> int:
        return int(name.removeprefix("pg"))

    def postmaster_pid(self, i: int) -> int | None:
        pid_file = self.root / self.name(i) / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def wait(self, condition, timeout_s: float, what: str, stable_s: float = 0.0) -> None:
        """Return once `condition()` has held for `stable_s` on end."""
        deadline = time.monotonic() + timeout_s
        since = None
        while time.monotonic() < deadline:
            if not condition():
                since = None
            elif since is None:
                since = time.monotonic()
            if since is not None and time.monotonic() - since >= stable_s:
                return
            time.sleep(0.2)
        raise TimeoutError(f"no {what} after {timeout_s:g} s (logs under {self.root})")

    # --- what happens to it ----------------------------------------------------------------

    def switchover(self) -> tuple[str, str]:
        """`patronictl switchover` from the leader to the synchronous standby; (old, new)."""
        old, new = self.leader(), self.sync_standby()
        subprocess.run(["patronictl", "-c", str(self.root / f"{old}.yml"), "switchover",
                        SCOPE, "--leader", old, "--candidate", new, "--force"],
                       check=True, capture_output=True,
                       env=dict(os.environ, PATRONICTL_CONFIG_FILE=str(self.root / f"{old}.yml")))
        return old, new

    def kill_primary(self, patroni_too: bool = False) -> str:
        """kill -9 of the leader's postmaster (and first of its Patroni, which would restart
        it); the leader's name."""
        old = self.leader()
        if patroni_too:
            proc = self.procs[old]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.kill(self.postmaster_pid(self.index(old)), signal.SIGKILL)
        return old

