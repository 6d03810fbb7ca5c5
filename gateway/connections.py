"""Client connections: how many a process holds, how long one may sit idle, and how long a
request's head may take to arrive.

aiohttp keeps an idle keep-alive connection for an hour and waits for a request's headers
for as long as they trickle in, so 2,000 idle or slowloris sockets were held for ever, and
with 1,024 descriptors 1,100 of them left none for the backends and the database: every
normal request failed. Here:

- an idle connection (no request under way) is closed after GATEWAY_IDLE_TIMEOUT_S
  (aiohttp's keep-alive timeout, which also bounds the wait for a first request);
- a request's head must be complete within GATEWAY_HEADER_TIMEOUT_S of the connection's
  opening, or of the first byte sent after the previous answer; past it the connection is
  cut (slowloris);
- a process holds at most `max_connections` client connections (GATEWAY_MAX_CLIENT_
  CONNECTIONS, by default from the descriptor limit, `gateway serve` having raised its soft
  limit to the hard one): half of what is left once the database's connections and a
  margin are set apart, as each client connection may need a backend connection of its
  own. A connection past the cap takes the place of the oldest idle one (closed), or is
  closed at once when every connection has a request under way: the descriptors the
  backends and the database need are never taken by clients.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .settings import Settings

log = logging.getLogger("gateway.connections")

# descriptors set apart besides the database pool: the mirrors' listeners, the log, policy
# and key files, the embedded database's watchdog, a margin
RESERVED_FDS = 64
WARN_EVERY_S = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    idle_timeout_s: float
    header_timeout_s: float
    max_connections: int


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (what the operator allows); the limit
    now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, e)
    return soft


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The limits of the settings, the connection cap derived from the descriptor limit in
    force unless GATEWAY_MAX_CLIENT_CONNECTIONS sets it."""
    cap = settings.max_client_connections
    if cap is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = min(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
        cap = max(8, (soft - settings.db_pool_max - RESERVED_FDS) // 2)
    return ConnectionLimits(settings.idle_timeout_s, settings.header_timeout_s, cap)


class GuardedServer(web.Server):
    """aiohttp's server, with the cap on connections and `GuardedHandler` per connection."""

    def __init__(self, *args, limits: ConnectionLimits, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.turned_away = 0           # connections closed at once: every slot was busy
        self.evicted = 0               # idle connections closed to make room
        self._warned_at = -WARN_EVERY_S

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if len(self._connections) >= self.limits.max_connections:
            idle = next((h for h in self._connections
                         if isinstance(h, GuardedHandler) and h.idle()), None)
            if idle is None:
                self.turned_away += 1
                self._warn("every one has a request under way: a new one is closed at once")
                transport.abort()
                return
            self.evicted += 1
            self._warn("the oldest idle one is closed for each new one")
            idle.force_close()
            self._connections.pop(idle, None)
        super().connection_made(handler, transport)

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("%d client connections open, the cap (GATEWAY_MAX_CLIENT_CONNECTIONS): "
                        "%s (%d closed idle, %d turned away so far)",
                        len(self._connections), what, self.evicted, self.turned_away)


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler, with a deadline on each request's head."""

    __slots__ = ("_head_timer",)

    def __init__(self, manager: GuardedServer, **kwargs):
        super().__init__(manager, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def idle(self) -> bool:
        """No request under way: waiting for one, or for the rest of its head (aiohttp's
        own test before it closes a connection idle past its keep-alive timeout; a request
        parsed but not yet handled, or being answered, is not idle)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()            # the first request's head is due from the opening

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._disarm()     # a head is complete
        elif self._head_timer is None and self.idle():
            self._arm()        # the first bytes of the next request's head

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        manager = self._manager
        if manager is not None and self._head_timer is None:
            self._head_timer = self._loop.call_later(manager.limits.header_timeout_s,
                                                     self._head_late, self._request_count)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self, heads: int) -> None:
        self._head_timer = None
        if self._request_count == heads and self.idle():
            self.force_close()
