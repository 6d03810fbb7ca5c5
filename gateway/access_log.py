"""The access log: one JSON line per request on stdout, for operators (docs/operate.md, Observability).

A line says what an operator needs to follow traffic — the gateway's request id and the
client's, the method, the route's template (`telephony:/euos/{euo}/users/{user}`, never the
path: its values identify people), the caller's role and organisation, the decision, reason,
status, size, duration, backend service and trace id — and nothing that identifies a person:
no token, no `sub`, no path or query value, no client address. Who saw whose data is the
audit log's business, not stdout's.

Lines are gathered in memory and written a little later (or once PIPE_BUF bytes are waiting)
with one `os.write` of whole lines of at most PIPE_BUF bytes: the workers of `gateway serve
--workers N` share stdout, and writes that small reach a pipe whole, so their lines never
interleave. A failed write drops the lines (logged once): requests never wait on stdout's
reader beyond one blocking write.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select

import orjson

from .audit import AuditRow

log = logging.getLogger("gateway.access_log")

PIPE_BUF = getattr(select, "PIPE_BUF", 512)   # POSIX guarantees at least 512
FLUSH_AFTER_S = 0.2


class AccessLog:
    """Buffered JSON lines on a file descriptor (stdout by default)."""

    def __init__(self, fd: int = 1, flush_after_s: float = FLUSH_AFTER_S):
        self.fd = fd
        self.flush_after_s = flush_after_s
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._broken = False

    def write(self, row: AuditRow) -> None:
        """Queue the line of one finished request; written within `flush_after_s`."""
        self._buffer += orjson.dumps(line(row), option=orjson.OPT_APPEND_NEWLINE)
        if len(self._buffer) >= PIPE_BUF:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_after_s, self.flush)

    def flush(self) -> None:
        """Write every waiting line now, in whole lines of at most PIPE_BUF bytes each."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        buffer = self._buffer
        while buffer:
            end = len(buffer) if len(buffer) <= PIPE_BUF else buffer.rfind(b"\n", 0, PIPE_BUF) + 1
            if end == 0:           # one line longer than PIPE_BUF: written alone
                end = buffer.find(b"\n") + 1 or len(buffer)
            try:
                with memoryview(buffer) as view:
                    written = os.write(self.fd, view[:end])
            except OSError as e:
                if not self._broken:
                    log.error("access log lines dropped: cannot write to fd %d: %s", self.fd, e)
                    self._broken = True
                buffer.clear()
                return
            del buffer[:written]


def line(row: AuditRow) -> dict:
    """The access-log fields of a finished request (no personal data: see the module)."""
    return {
        "at": row.at,
        "request_id": row.request_id,
        "client_request_id": row.client_request_id,
        "trace_id": row.trace_id,
        "method": row.method,
        "route": row.route,
        "service": row.service,
        "role": row.actor_role,
        "organisation": row.actor_partner or row.actor_euo,
        "decision": row.decision,
        "reason": row.reason,
        "status": row.status,
        "bytes": row.bytes,
        "duration_ms": round(row.duration_ms, 3),
    }
