"""Forwarding to the backends: header allow-lists, one lean pooled client, a total deadline
and a size cap per answer mapped to 504/502, and binary bodies streamed through in chunks."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Callable, Mapping, MutableMapping

import aiohttp

from .backend_client import Answer, BackendClient, TooLarge, probe
from .errors import Denied

# Allow-lists, both ways: a client header reaches a backend only if named here (identity,
# method-override, rewrite, range and caching headers never do), and a backend header
# reaches the client only if named here.
FORWARDED_REQUEST_HEADERS = ("Accept", "Accept-Language", "User-Agent")
# W3C Trace Context: version 00's shape (a later version may only add fields after these);
# version ff and all-zero ids are invalid
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
BINARY_RESPONSE_HEADERS = ("Content-Type",)
# every answer depends on who asks: no shared cache may keep it
PRIVATE = {"Cache-Control": "private, no-store", "Vary": "Authorization",
           "X-Content-Type-Options": "nosniff"}
CHUNK = 64 * 1024


def stamp(headers: MutableMapping[str, str], request_id: str | None) -> MutableMapping[str, str]:
    """What every answer carries, whichever path made it: our request id, and no shared
    caching (PRIVATE; a value the answer already set stays)."""
    if request_id:
        headers["X-Request-Id"] = request_id
    for name, value in PRIVATE.items():
        headers.setdefault(name, value)
    return headers


def traceparent(incoming: Mapping[str, str]) -> str:
    """The caller's W3C traceparent when well-formed; otherwise a new trace the gateway
    starts (not sampled: the gateway records no spans, it only lets the trace be followed)."""
    given = incoming.get("traceparent")
    if given is not None and _TRACEPARENT.fullmatch(given):
        return given
    # ids for following a trace, not secrets: the process's PRNG (reseeded in each forked
    # worker by the random module itself) instead of a getrandom() system call per request;
    # never all zeros, which the format reserves as invalid
    return f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-00"


def trace_id(traceparent: str) -> str:
    """The trace-id field of a well-formed traceparent."""
    return traceparent[3:35]


def forward_headers(incoming: Mapping[str, str], request_id: str, client: str | None,
                    json_body: bool = False, trace: str | None = None) -> dict[str, str]:
    """The headers a backend receives: a few harmless client headers, and our own (the
    request's traceparent, `trace`, when it has one)."""
    # only visible ASCII (and spaces) is sent on: anything else cannot be encoded as an
    # HTTP/1.1 header value, or means something other than it shows
    out = {name: value for name in FORWARDED_REQUEST_HEADERS
           if (value := incoming.get(name)) is not None and value.isascii() and value.isprintable()}
    if trace is not None:
        out["traceparent"] = trace
    out["X-Request-Id"] = request_id
    out["Accept-Encoding"] = "identity"
    if client:
        out["X-Forwarded-For"] = client
    if json_body:
        out["Content-Type"] = "application/json"
    return out


def binary_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """A binary answer's headers: its type, always as an attachment, never cached."""
    out = {h: upstream[h] for h in BINARY_RESPONSE_HEADERS if h in upstream}
    out.setdefault("Content-Type", "application/octet-stream")
    out["Content-Disposition"] = "attachment"
    return out


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

    def deadline(self) -> float:
        """The loop time by which a backend call must have answered (headers and JSON body)."""
        return self._time() + self.deadline_s

    async def send(self, service: str, path_qs: str, method: str, headers: Mapping[str, str],
                   body: bytes | None, deadline: float) -> Answer:
        """Send the request upstream and return the response with its body still unread."""
        started = self._time()
        try:
            answer = await self.client.request(service, method, path_qs, headers, body, deadline)
            if self.observe is not None:
                self.observe(service, self._time() - started)
            return answer
        except TimeoutError:
            raise Denied(504, "backend_timeout", f"the {service} backend did not answer in time") from None
        except aiohttp.ClientError as e:
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

    async def ready(self) -> dict[str, bool]:
        """Whether each backend answers HTTP at all (any status counts)."""
        results = await asyncio.gather(*(probe(self.client, name, 2) for name in self.upstreams))
        return dict(zip(self.upstreams, results, strict=True))


def _too_large() -> Denied:
    return Denied(502, "backend_answer_too_large",
                  "the backend's answer is larger than the gateway accepts")
