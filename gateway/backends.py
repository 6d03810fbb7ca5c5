"""The backends, as one resource: every upstream through one lean pooled client
(backend_client.py), a total deadline and a size cap per JSON answer mapped to 504/502,
and each backend's readiness learnt from the calls themselves or from probes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

import aiohttp

from .backend_client import Answer, BackendClient, TooLarge, probe
from .errors import Denied

log = logging.getLogger("gateway.proxy")      # the name operators' log filters know

PROBE_EVERY_S = 5.0       # a backend no call has reached for this long is probed
PROBE_TIMEOUT_S = 2.0     # a probe not answered by then counts the backend as down


class Backends:
    """Every backend, through one lean pooled client (backend_client.py)."""

    def __init__(self, upstreams: Mapping[str, str], client: BackendClient, deadline_s: float,
                 max_json_bytes: int):
        self.upstreams = dict(upstreams)
        self.client = client
        self.deadline_s = deadline_s
        self.max_json_bytes = max_json_bytes
        self._time = asyncio.get_running_loop().time
        # (service, seconds to the answer's headers) of every answered call, for the metrics
        self.observe: Callable[[str, float], None] | None = None
        # readiness from memory: each backend's last known state (answered or not) and
        # when it was learnt, from the calls themselves or, when none was made for
        # PROBE_EVERY_S, from a probe of the background task
        self._state: dict[str, tuple[bool, float]] = {}
        self._watching: asyncio.Task | None = None

    def health(self) -> dict[str, bool]:
        """Whether each backend answered the last call or probe (no I/O: `/readyz` answers
        at once whatever the backends do)."""
        return {name: self._state.get(name, (False, 0.0))[0] for name in self.upstreams}

    async def start_watching(self) -> None:
        """Probe every backend once (at most PROBE_TIMEOUT_S), then keep probing in the
        background those no call has been answered by for PROBE_EVERY_S."""
        await self._probe_quiet(-1.0)
        self._watching = asyncio.create_task(self._keep_watching())

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching

    async def _keep_watching(self) -> None:
        while True:
            await asyncio.sleep(PROBE_EVERY_S / 2)
            try:
                await self._probe_quiet(self._time() - PROBE_EVERY_S)
            except Exception:      # readiness must keep being learnt, whatever one probe did
                log.exception("backend probe failed; probing goes on")

    async def _probe_quiet(self, learnt_before: float) -> None:
        async def one(name: str) -> None:
            started = self._time()
            up = await probe(self.client, name, PROBE_TIMEOUT_S)
            if self._state.get(name, (False, -1.0))[1] < started:   # no call told us since
                self._state[name] = (up, started)
        await asyncio.gather(*(one(name) for name in self.upstreams
                               if self._state.get(name, (False, -1.0))[1] <= learnt_before))

    def deadline(self) -> float:
        """The loop time by which a backend call must have answered (headers and JSON body)."""
        return self._time() + self.deadline_s

    async def send(self, service: str, path_qs: str, method: str, headers: Mapping[str, str],
                   body: bytes | None, deadline: float) -> Answer:
        """Send the request upstream and return the response with its body still unread."""
        started = self._time()
        try:
            answer = await self.client.request(service, method, path_qs, headers, body, deadline)
            self._state[service] = (True, started)
            if self.observe is not None:
                self.observe(service, self._time() - started)
            return answer
        except TimeoutError:
            raise Denied(504, "backend_timeout", f"the {service} backend did not answer in time") from None
        except aiohttp.ClientError as e:
            self._state[service] = (False, started)
            raise Denied(502, "backend_unreachable",
                         f"the {service} backend cannot be reached ({type(e).__name__})") from None

    async def read(self, response: Answer, deadline: float) -> bytes:
        """The whole body of a JSON answer, by the deadline and within the size cap."""
        try:
            return await response.read(self.max_json_bytes, deadline)
        except TooLarge:
            raise _too_large() from None
        except TimeoutError:
            raise Denied(504, "backend_timeout", "the backend did not finish its answer in time") from None
        except aiohttp.ClientError:
            raise Denied(502, "backend_unreachable", "the backend broke off its answer") from None
        finally:
            response.release()


def _too_large() -> Denied:
    return Denied(502, "backend_answer_too_large",
                  "the backend's answer is larger than the gateway accepts")
