"""The token issuer's signing keys: a JWKS fetched from GATEWAY_JWT_JWKS_URL, or from the
`jwks_uri` of the issuer's `/.well-known/openid-configuration` (OpenID Connect Discovery).

The set has a maximum age (GATEWAY_JWT_JWKS_MAX_AGE_S, or the JWKS answer's shorter
`Cache-Control: max-age`) and is refetched in the background before it is reached, so a key
the issuer withdrew is refused once the set has been refetched. An issuer that cannot be
reached leaves the last good set in force for GATEWAY_JWT_JWKS_GRACE_S past its maximum
age (`stale`: /readyz warns); after that no token is verified against it (`lost`: 503
keys_unavailable) until a fetch succeeds. A token naming a key id the set lacks refetches
it at once, at most every GATEWAY_JWT_JWKS_MIN_REFETCH_S.

Only asymmetric signing keys are taken (kty RSA, EC, OKP; `use` absent or `sig`): a
symmetric (`oct`) key in a JWKS would let anyone who reads the set sign tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from .errors import Denied

log = logging.getLogger("gateway.keyset")

MAX_DOCUMENT_BYTES = 1 << 20     # a discovery document or a JWKS; real ones are a few KiB
FETCH_TIMEOUT_S = 5.0
RETRY_FIRST_S = 1.0              # after a failed fetch; doubling, at most RETRY_MOST_S
RETRY_MOST_S = 30.0
REFRESH_AT = 0.9                 # of the maximum age: refetched before it is reached

# what a token's `alg` needs of its key: the JWK key type and, for EC and OKP, the curve
ALGORITHMS: dict[str, tuple[str, frozenset[str] | None]] = {
    **{alg: ("RSA", None) for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
_FROM_JWK = {"RSA": RSAAlgorithm.from_jwk, "EC": ECAlgorithm.from_jwk, "OKP": OKPAlgorithm.from_jwk}
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.I)


@dataclass(frozen=True, slots=True)
class Key:
    """One verification key: its JWK type and curve, the `alg` it is pinned to (if the
    JWK names one) and the key itself."""
    kty: str
    crv: str | None
    alg: str | None
    key: object

    def fits(self, alg: str) -> bool:
        """Whether a token of this `alg` may be checked with this key."""
        kty, curves = ALGORITHMS.get(alg, (None, None))
        if kty != self.kty or (curves is not None and self.crv not in curves):
            return False
        return self.alg is None or self.alg == alg


class FetchFailed(Exception):
    """The discovery document or the key set could not be fetched or read (the message says why)."""


def discovery_url(issuer: str) -> str:
    """Where an issuer's OpenID Provider metadata is (OpenID Connect Discovery 1.0, 4)."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def parse_jwks(document: object) -> dict[str, Key]:
    """The usable signing keys of a JWKS document, by key id; FetchFailed if it is not a
    JWKS at all. Keys without a `kid`, symmetric keys, encryption keys and keys this
    gateway cannot read are left out."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise FetchFailed("the key set is not a JSON object with a `keys` list")
    found = {}
    for jwk in keys:
        if not isinstance(jwk, dict):
            continue
        kid, kty, use, alg = jwk.get("kid"), jwk.get("kty"), jwk.get("use"), jwk.get("alg")
        if not isinstance(kid, str) or kty not in _FROM_JWK or use not in (None, "sig"):
            continue
        if alg is not None and alg not in ALGORITHMS:
            continue          # pinned to an algorithm this gateway does not accept
        try:
            key = _FROM_JWK[kty](jwk)
        except Exception:     # a malformed key: the others stay usable
            log.warning("the issuer's key set holds a key that cannot be read (kid %r)", kid)
            continue
        if hasattr(key, "private_bytes"):
            key = key.public_key()
        crv = jwk.get("crv") if isinstance(jwk.get("crv"), str) else None
        found[kid] = Key(kty, crv, alg, key)
    return found


def cache_max_age(headers) -> float | None:
    """The freshness lifetime a response's Cache-Control max-age leaves (less its Age), or None."""
    match = _MAX_AGE.search(headers.get("Cache-Control", ""))
    if match is None:
        return None
    age = headers.get("Age", "")
    return max(0.0, int(match.group(1)) - (int(age) if age.isdigit() else 0))


class KeySet:
    """The issuer's keys by key id, kept fresh in the background (module docstring)."""

    def __init__(self, *, jwks_url: str | None, issuer: str | None, max_age_s: float,
                 grace_s: float, min_refetch_s: float, on_change=None):
        self.jwks_url = jwks_url          # None: discovered from the issuer
        self.issuer = issuer
        self.max_age_s = max_age_s
        self.grace_s = grace_s
        self.min_refetch_s = min_refetch_s
        self.on_change = on_change        # called when keys are added or withdrawn
        self.keys: dict[str, Key] = {}
        self.fetched_at = -math.inf       # monotonic; of the set in force
        self.age_limit_s = max_age_s      # this set's maximum age (Cache-Control may shorten it)
        self.trusted_until = -math.inf    # monotonic: past it the set is lost
        self.last_error: str | None = None
        self.failures = 0                 # fetches failed in a row
        self._tried_at = -math.inf
        self._discovered: str | None = None
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Fetch the set once (an issuer that is down is retried: /readyz says so), then keep
        it fresh in the background."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
        await self.refresh()
        self._task = asyncio.create_task(self._keep_fresh())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    # --- state ------------------------------------------------------------------------------
    def age(self) -> float:
        """Seconds since the set in force was fetched (inf before the first fetch)."""
        return time.monotonic() - self.fetched_at

    def stale(self) -> bool:
        """Past its maximum age and not refetched: in force only for the grace."""
        return self.age() > self.age_limit_s

    def lost(self) -> bool:
        """Never fetched, or past its maximum age and the grace: no token is checked with it."""
        return time.monotonic() > self.trusted_until

    def trusted_for(self) -> float:
        """Seconds the set in force stays usable from now (negative: lost)."""
        return self.trusted_until - time.monotonic()

    def stale_reason(self) -> str | None:
        """/readyz's reason while the set is lost (every token is refused 503)."""
        return "keys_unavailable" if self.lost() else None

    def warning(self) -> str | None:
        """/readyz's warning while the set is kept only for the grace."""
        return "jwt_keys_stale" if self.stale() and not self.lost() else None

    def staleness(self) -> float:
        """What the metrics call the mirror's staleness: the set's age."""
        return self.age()

    # --- use ----------------------------------------------------------------------------------
    async def key(self, kid: object, alg: str):
        """The key a token of this `kid` and `alg` is checked with, or Denied: 401 for a key
        the set lacks or one of another type, 503 keys_unavailable while the set is lost."""
        if not isinstance(kid, str):
            raise Denied("unknown_key", "the token names no key id (kid)")
        key = self.keys.get(kid)
        if key is None or self.lost():
            await self._refetch_soon()
            key = self.keys.get(kid)
        if self.lost():
            raise Denied("keys_unavailable",
                         "the token issuer's keys cannot be fetched right now; try again shortly")
        if key is None:
            raise Denied("unknown_key", "the token's key id is not in the issuer's key set")
        if not key.fits(alg):
            raise Denied("unsupported_algorithm", f"the token's alg {alg} does not fit its key")
        return key.key

    async def _refetch_soon(self) -> None:
        """Refetch now unless one was tried within GATEWAY_JWT_JWKS_MIN_REFETCH_S (callers
        arriving meanwhile wait for the same fetch)."""
        tried = self._tried_at
        async with self._lock:
            if self._tried_at != tried or time.monotonic() - self._tried_at < self.min_refetch_s:
                return
            await self._fetch()

    async def refresh(self) -> bool:
        """Fetch the set now; whether it succeeded (a failure keeps the set in force)."""
        async with self._lock:
            return await self._fetch()

    async def _keep_fresh(self) -> None:
        while True:
            if self.failures:
                wait = min(RETRY_FIRST_S * 2 ** (self.failures - 1), RETRY_MOST_S,
                           max(self.age_limit_s, RETRY_FIRST_S))
            else:
                wait = self.age_limit_s * REFRESH_AT - self.age()
            await asyncio.sleep(max(wait, 0.05))
            try:
                await self.refresh()
            except Exception:   # never stop refreshing: the set would be lost for good
                self.failures += 1
                log.exception("refreshing the token issuer's key set failed unexpectedly")

    async def _fetch(self) -> bool:
        self._tried_at = time.monotonic()
        try:
            url = self.jwks_url or self._discovered or await self._discover()
            document, headers = await self._get(url, "the key set")
            keys = parse_jwks(document)
        except FetchFailed as e:
            self._discovered = None       # rediscovered next time: jwks_uri may have moved
            self.failures += 1
            self.last_error = str(e)
            log.warning("the token issuer's key set could not be refreshed (%s); %s", e,
                        self._standing())
            return False
        fresh = cache_max_age(headers)
        # never above GATEWAY_JWT_JWKS_MAX_AGE_S; a `max-age=0` is not a refetch without pause
        floor = min(self.min_refetch_s, self.max_age_s)
        self.age_limit_s = self.max_age_s if fresh is None else max(min(fresh, self.max_age_s), floor)
        changed = _fingerprint(keys) != _fingerprint(self.keys)
        if changed:
            added, withdrawn = keys.keys() - self.keys.keys(), self.keys.keys() - keys.keys()
            log.info("the token issuer's key set from %s: %d keys (new: %s; withdrawn: %s)",
                     url, len(keys), ", ".join(sorted(added)) or "none",
                     ", ".join(sorted(withdrawn)) or "none")
        self.keys, self.fetched_at = keys, time.monotonic()
        self.trusted_until = self.fetched_at + self.age_limit_s + self.grace_s
        self.failures, self.last_error = 0, None
        if changed and self.on_change is not None:
            self.on_change()
        return True

    def _standing(self) -> str:
        if not self.keys and self.fetched_at == -math.inf:
            return "no key set yet: every token is refused"
        left = self.trusted_for()
        if left <= 0:
            return "the last good set is past its grace: every token is refused"
        return f"the last good set stays in force for {left:.0f} s more"

    async def _discover(self) -> str:
        """The issuer's jwks_uri, from its discovery document (whose `issuer` must be ours)."""
        document, _ = await self._get(discovery_url(self.issuer), "the discovery document")
        if not isinstance(document, dict) or document.get("issuer") != self.issuer:
            raise FetchFailed(f"the discovery document at {discovery_url(self.issuer)} is for "
                              f"issuer {document.get('issuer') if isinstance(document, dict) else None!r}, "
                              f"not {self.issuer!r}")
        uri = document.get("jwks_uri")
        parts = urlsplit(uri) if isinstance(uri, str) else None
        # an https issuer's keys come over https too
        schemes = ("https",) if urlsplit(self.issuer).scheme == "https" else ("http", "https")
        if parts is None or parts.scheme not in schemes or not parts.netloc:
            raise FetchFailed(f"the discovery document's jwks_uri {uri!r} is not an "
                              f"{' or '.join(schemes)} URL")
        self._discovered = uri
        return uri

    async def _get(self, url: str, what: str) -> tuple[object, object]:
        session = self._session
        if session is None:
            raise FetchFailed("not started")
        try:
            async with session.get(url, headers={"Accept": "application/json"}) as r:
                if r.status != 200:
                    raise FetchFailed(f"{what} at {url} answered {r.status}")
                body = bytearray()
                async for chunk in r.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise FetchFailed(f"{what} at {url} is over {MAX_DOCUMENT_BYTES} bytes")
                return orjson.loads(body), r.headers
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as e:
            raise FetchFailed(f"{what} at {url}: {type(e).__name__} {e}".rstrip()) from None


def _fingerprint(keys: dict[str, Key]) -> dict[str, tuple]:
    """What must stay equal for tokens verified with a set to stay verified."""
    return {kid: (k.kty, k.crv, k.alg, _public_numbers(k.key)) for kid, k in keys.items()}


def _public_numbers(key) -> object:
    numbers = getattr(key, "public_numbers", None)
    if numbers is not None:
        return numbers()
    return key.public_bytes_raw() if hasattr(key, "public_bytes_raw") else id(key)
