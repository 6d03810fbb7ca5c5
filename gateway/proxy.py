"""Forwarding to the backends: path normalisation, header hygiene, one pooled client,
timeouts mapped to 502/504, and binary bodies streamed through in chunks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from urllib.parse import unquote

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from .errors import Denied

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
# Headers a client might use to claim an identity the backend would believe.
IDENTITY_PREFIXES = ("x-forwarded-", "x-user", "x-remote-", "x-auth", "x-principal",
                     "x-gateway-", "x-role", "x-euo", "x-partner", "x-client-", "x-real-ip",
                     "x-original-", "x-request-id")
DROPPED = frozenset({"host", "content-length", "authorization", "cookie", "forwarded",
                     "accept-encoding", "expect"})
RESPONSE_HEADERS = ("Content-Type", "Content-Disposition", "Cache-Control", "ETag",
                    "Last-Modified", "Content-Language")
_BAD_IN_RAW = ("%2f", "%5c", "%2e", "%00", "\\", ";")
CHUNK = 64 * 1024


def normalise_path(raw_path: str) -> tuple[str, list[str]]:
    """(service, segments) of /<service>/<path>, or Denied(400) for traversal tricks.

    The raw (still percent-encoded) path is checked: encoded slashes, backslashes, dots
    and NULs are refused, as are `.`/`..` segments and empty segments.
    """
    path = raw_path.split("?", 1)[0]
    lowered = path.lower()
    if any(bad in lowered for bad in _BAD_IN_RAW):
        raise Denied(400, "bad_path", "the path contains encoded or forbidden characters")
    segments = path.split("/")[1:]
    if not path.startswith("/") or any(s in ("", ".", "..") for s in segments):
        raise Denied(400, "bad_path", "the path has empty, '.' or '..' segments")
    if "%" in segments[0]:
        raise Denied(400, "bad_path", "the service name must not be percent-encoded")
    decoded = [unquote(s) for s in segments]
    if any(not s.isprintable() or "/" in s for s in decoded):
        raise Denied(400, "bad_path", "the path contains control characters")
    return decoded[0], decoded[1:]


def forward_headers(incoming: CIMultiDictProxy[str], request_id: str,
                    client: str | None) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop and identity headers, plus our own."""
    named_by_connection = {
        h.strip().lower() for h in incoming.get("Connection", "").split(",") if h.strip()}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        low = name.lower()
        if (low in HOP_BY_HOP or low in DROPPED or low in named_by_connection
                or low.startswith(IDENTITY_PREFIXES)):
            continue
        out.add(name, value)
    out["X-Request-Id"] = request_id
    out["Accept-Encoding"] = "identity"
    if client:
        out["X-Forwarded-For"] = client
    return out


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    return {h: upstream[h] for h in RESPONSE_HEADERS if h in upstream}


class Backends:
    """One pooled client session for every backend."""

    def __init__(self, upstreams: Mapping[str, str], session: aiohttp.ClientSession,
                 read_timeout_s: float, connect_timeout_s: float):
        self.upstreams = dict(upstreams)
        self.session = session
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s)

    async def send(self, service: str, path_qs: str, method: str, headers: CIMultiDict[str],
                   body: bytes | None) -> aiohttp.ClientResponse:
        """Send the request upstream and return the response with its body still unread."""
        url = self.upstreams[service] + path_qs
        try:
            return await self.session.request(method, url, headers=headers, data=body,
                                              timeout=self.timeout, allow_redirects=False)
        except TimeoutError:
            raise Denied(504, "backend_timeout", f"the {service} backend did not answer in time") from None
        except aiohttp.ClientError as e:
            raise Denied(502, "backend_unreachable",
                         f"the {service} backend cannot be reached ({type(e).__name__})") from None

    async def read(self, response: aiohttp.ClientResponse, limit: int) -> bytes:
        """The whole body of a JSON answer, bounded; timeouts and cut-offs map to 502/504."""
        try:
            chunks, size = [], 0
            async for chunk in response.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise Denied(502, "backend_answer_too_large",
                                 "the backend's answer is larger than the gateway accepts")
                chunks.append(chunk)
            return b"".join(chunks)
        except TimeoutError:
            raise Denied(504, "backend_timeout", "the backend did not finish its answer in time") from None
        except aiohttp.ClientError:
            raise Denied(502, "backend_unreachable", "the backend broke off its answer") from None
        finally:
            response.release()

    async def ready(self) -> dict[str, bool]:
        """Whether each backend answers HTTP at all (any status counts)."""
        async def probe(base: str) -> bool:
            try:
                async with self.session.get(base + "/", timeout=aiohttp.ClientTimeout(total=2)):
                    return True
            except (TimeoutError, aiohttp.ClientError):
                return False
        results = await asyncio.gather(*(probe(u) for u in self.upstreams.values()))
        return dict(zip(self.upstreams, results, strict=True))
