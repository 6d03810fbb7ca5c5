"""Forwarding to the backends: the header allow-lists both ways and what every answer
carries. The backends themselves (the pooled client, deadlines, size caps) are backends.py."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

# Allow-lists, both ways: a client header reaches a backend only if named here (identity,
# method-override, rewrite, range and caching headers never do), and a backend header
# reaches the client only if named here.
FORWARDED_REQUEST_HEADERS = ("Accept", "Accept-Language", "User-Agent")
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
