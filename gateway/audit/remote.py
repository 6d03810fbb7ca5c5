"""Reading a slice, a consistency proof or the public keys from where they are published:
a file, or an http(s) URL (the gateway's own endpoint, or wherever the operator publishes
its keys), so `gateway audit verify-slice URL --token T --public-key KEYS_URL` downloads
and checks in one command. The check itself never needs more than the bytes read here."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import orjson
from multidict import MultiDict

from ..settings import ConfigError

TIMEOUT_S = 60
MAX_BYTES = 256 * 1024 * 1024     # a slice of 1000 rows is ~2 MB; anything near this is not one


def is_url(source: str | Path) -> bool:
    return str(source).startswith(("http://", "https://"))


def asked(source: str | Path) -> MultiDict | None:
    """The query parameters of a URL (what a slice fetched from it was asked for); None
    for a file."""
    if not is_url(source):
        return None
    return MultiDict(urllib.parse.parse_qsl(urllib.parse.urlsplit(str(source)).query,
                                            keep_blank_values=True))


def read(source: str | Path, token: str | None = None, what: str = "") -> bytes:
    """The bytes of a file or of a GET of a URL (with the bearer token, if given);
    ConfigError naming the source and what went wrong otherwise."""
    name = what or str(source)
    if not is_url(source):
        try:
            return Path(source).read_bytes()
        except OSError as e:
            raise ConfigError(f"{name}: {e.strerror or e}") from None
    request = urllib.request.Request(str(source), headers={"Accept": "application/json"})
    if token:
        # not sent on to wherever a redirect points (another host must not get the token)
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
            body = answer.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise ConfigError(f"{name}: {e.code} {_error(e)}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"{name}: {getattr(e, 'reason', None) or e}") from None
    if len(body) > MAX_BYTES:
        raise ConfigError(f"{name}: the answer is over {MAX_BYTES} bytes")
    return body


def _error(e: urllib.error.HTTPError) -> str:
    """The gateway's error code and message, or the status's reason."""
    try:
        error = orjson.loads(e.read(65536))["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError, OSError):
        return str(e.reason)
