"""Bearer token -> Principal, or Denied(401) with a stable reason id.

HS256 with GATEWAY_JWT_SECRET; RS256/ES256 with a PEM public key or a JWKS URL (cached,
refetched when a token names an unknown `kid`). Each algorithm is checked only against a
key of its own kind, so a token signed with HS256 over a public key is refused. Verified
tokens are cached until they expire: a repeat caller costs one dictionary look-up.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .clock import HOST_CLOCK, Clock
from .errors import Denied
from .grammar import IDENTIFIER
from .principal import Principal
from .roles import Role
from .settings import ConfigError, Settings

LEEWAY_S = 10
CACHE_MAX = 100_000
MAX_SUB = 256      # as the audit API's actor filter

_REASONS = [  # most specific first: several are subclasses of others
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet (nbf/iat)"),
    (jwt.InvalidAudienceError, "wrong_audience", "the token is not meant for this gateway"),
    (jwt.InvalidIssuerError, "wrong_issuer", "the token comes from an unexpected issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
    (jwt.InvalidSignatureError, "bad_signature", "the token's signature does not verify"),
    (jwt.DecodeError, "malformed_token", "the token cannot be decoded"),
]


def _bearer(authorization: str | None) -> str:
    """The token of an Authorization header's value, or Denied(401)."""
    if not authorization:
        raise _unauthorized("missing_token", "send Authorization: Bearer <token>")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("malformed_authorization", "expected Authorization: Bearer <token>")
    return token


def _unauthorized(code: str, message: str) -> Denied:
    return Denied(401, code, message)


class Authenticator:
    """Verifies bearer tokens against the configured keys."""

    def __init__(self, settings: Settings, roles: dict[str, Role],
                 session: aiohttp.ClientSession | None = None, clock: Clock | None = None):
        self.roles = roles
        self.secret = settings.jwt_secret
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.jwks_url = settings.jwt_jwks_url
        self.jwks_min_refetch_s = settings.jwt_jwks_min_refetch_s
        self.session = session
        self.public_key = None
        self.public_alg = None
        if settings.jwt_public_key_file:
            self.public_key, self.public_alg = _load_public_key(settings.jwt_public_key_file)
        self._jwks: dict[str, jwt.PyJWK] = {}
        self._jwks_fetched_at = -float("inf")
        self._jwks_lock = asyncio.Lock()
        self._cache: dict[str, Principal] = {}
        # exp, nbf and iat are checked against the database's clock (gateway/clock.py), never
        # the host's: a host clock stepped back would accept a token that has expired
        self.clock = clock or HOST_CLOCK

    def use(self, roles: dict[str, Role]) -> None:
        """The roles of a new policy: tokens are checked against them from now on."""
        self.roles = roles
        self._cache = {}

    async def authenticate_request(self, headers) -> Principal:
        """The caller of a request (see `token_of`)."""
        token = self.token_of(headers)
        return self.known(token) or await self.verified(token)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller's principal; raise Denied(401) when the token is absent or bad."""
        token = _bearer(authorization)
        return self.known(token) or await self.verified(token)

    @staticmethod
    def token_of(headers) -> str:
        """The bearer token of a request's one Authorization header, or Denied(401) (two
        are refused, as a proxy in front may add its own after the client's: which is
        meant is unknowable)."""
        given = headers.getall("Authorization", ())
        if len(given) > 1:
            raise _unauthorized("malformed_authorization",
                                "send one Authorization header, not several")
        return _bearer(given[0] if given else None)

    def known(self, token: str) -> Principal | None:
        """The principal of a token verified before and not expired since, without a
        coroutine (the proxy's path calls it directly); None: `verified` must decide."""
        cached = self._cache.get(token)
        if cached is not None:
            if cached.exp > self.clock.now() - LEEWAY_S:
                return cached
            del self._cache[token]
        return None

    async def verified(self, token: str) -> Principal:
        """The principal of a token `known` does not hold: verified, then remembered."""
        principal = await self._verify(token)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[token] = principal
        return principal

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _unauthorized("malformed_token", "the token cannot be decoded") from None
        alg = header.get("alg")
        key = await self._key_for(alg, header.get("kid"))
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                options={"require": ["exp", "sub", "role"], "verify_aud": bool(self.audience),
                         "verify_iss": bool(self.issuer), "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False},
            )
            _check_times(claims, self.clock.now())
        except jwt.PyJWTError as e:
            for kind, code, message in _REASONS:
                if isinstance(e, kind):
                    raise _unauthorized(code, message) from None
            raise _unauthorized("invalid_token", "the token is not valid") from None
        return _principal(claims, self.roles)   # no await from here to the cache: same roles

    async def _key_for(self, alg: object, kid: object):
        if alg == "HS256":
            if not self.secret:
                raise _unauthorized("unsupported_algorithm", "HS256 tokens are not accepted here")
            return self.secret
        if alg in ("RS256", "ES256"):
            if self.public_key is not None and alg == self.public_alg:
                return self.public_key
            if self.jwks_url:
                return await self._jwks_key(alg, kid)
            raise _unauthorized("unsupported_algorithm", f"{alg} tokens are not accepted here")
        raise _unauthorized("unsupported_algorithm", f"algorithm {alg!r} is not accepted")

    async def _jwks_key(self, alg: str, kid: object):
        if not isinstance(kid, str):
            raise _unauthorized("unknown_key", "the token names no key id (kid)")
        jwk = self._jwks.get(kid)
        if jwk is None:
            async with self._jwks_lock:
                jwk = self._jwks.get(kid)
                if jwk is None and time.monotonic() - self._jwks_fetched_at >= self.jwks_min_refetch_s:
                    await self._fetch_jwks()
                    jwk = self._jwks.get(kid)
        if jwk is None:
            raise _unauthorized("unknown_key", "the token's key id is not in the key set")
        if jwk.algorithm_name != alg:
            raise _unauthorized("unsupported_algorithm", "the token's alg does not match its key")
        return jwk.key

    async def _fetch_jwks(self) -> None:
        self._jwks_fetched_at = time.monotonic()
        session = self.session
        if session is None:
            raise _unauthorized("unknown_key", "no client to fetch the key set with")
        try:
            async with session.get(self.jwks_url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                r.raise_for_status()
                data = await r.json(content_type=None)
            keys = jwt.PyJWKSet.from_dict(data).keys
        except (TimeoutError, aiohttp.ClientError, ValueError, jwt.PyJWTError):
            # keep the keys we had; the token is refused as having an unknown key
            return
        self._jwks = {k.key_id: k for k in keys if k.key_id}


def _check_times(claims: dict, now: float) -> None:
    """PyJWT's checks of exp, nbf and iat (the same errors, LEEWAY_S either way), made
    against `now`, the database's time, where PyJWT would read the host's clock."""
    for name, error in (("exp", jwt.DecodeError), ("nbf", jwt.DecodeError),
                        ("iat", jwt.InvalidIssuedAtError)):
        if name not in claims:
            continue
        try:
            value = int(claims[name])
        except (ValueError, TypeError, OverflowError):
            raise error(f"the {name} claim must be an integer") from None
        if name == "exp" and value <= now - LEEWAY_S:
            raise jwt.ExpiredSignatureError("Signature has expired")
        if name != "exp" and value > now + LEEWAY_S:
            raise jwt.ImmatureSignatureError(f"The token is not yet valid ({name})")


def _principal(claims: dict, roles: dict[str, Role]) -> Principal:
    name = claims.get("role")
    role = roles.get(name) if isinstance(name, str) else None
    if role is None:
        raise _unauthorized("unknown_role", f"role must be one of {', '.join(roles)}")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise _unauthorized("missing_claim", "the token has no subject (sub)")
    # the claims go into the audit row: a value it cannot store (a NUL, a lone surrogate)
    # would fail the batch of every caller it shares, so each is checked against a grammar
    if len(sub) > MAX_SUB or not sub.isprintable():
        raise _unauthorized("bad_claim", f"sub must be at most {MAX_SUB} printable characters")
    tenant = role.tenant_claim
    values = {"partner": None, "euo": None}
    if tenant is not None:
        value = claims.get(tenant)
        if not isinstance(value, str) or not value:
            raise _unauthorized("missing_tenant_claim",
                                f"a {name} token must carry the {tenant!r} claim")
        if not IDENTIFIER.fullmatch(value) or value in (".", ".."):
            raise _unauthorized("bad_claim", f"the {tenant!r} claim must be 1-128 characters "
                                "of A-Z a-z 0-9 . _ ~ @ : -")
        values[tenant] = value
    return Principal(sub=sub, role=name, exp=float(claims["exp"]), kind=role, **values)


def _load_public_key(path) -> tuple[object, str]:
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"GATEWAY_JWT_PUBLIC_KEY_FILE {path}: not a PEM public key ({e})") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, "ES256"
    raise ConfigError(f"GATEWAY_JWT_PUBLIC_KEY_FILE {path}: only RSA and EC keys are supported")
