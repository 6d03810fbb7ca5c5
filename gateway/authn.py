"""Bearer token -> Principal, or Denied(401) with a stable reason id (503 keys_unavailable
while the issuer's key set is lost: the token may be good, but cannot be checked).

Keys: HS256 with GATEWAY_JWT_SECRET; or public keys, from a PEM file or the issuer's JWKS
(GATEWAY_JWT_JWKS_URL, or discovered from GATEWAY_JWT_ISSUER: gateway/keyset.py), checking
RS256/384/512, PS256/384/512, ES256/384/512 and EdDSA. An algorithm is checked only against
a key of its own kind (and curve), `none` never, and HS256 never where public keys are
configured (a token signed with HS256 over a public key is refused). Where the role and the
tenant claims are is configured as dotted claim paths; a role claim that is a list must hold
exactly one role of roles.yaml. Verified tokens are cached until they expire, while the key
set they were verified with is in force: a repeat caller costs one dictionary look-up.
"""

from __future__ import annotations

import time

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .clock import HOST_CLOCK, Clock
from .errors import Denied
from .grammar import IDENTIFIER
from .keyset import ALGORITHMS, Key, KeySet
from .policy.roles import Role
from .principal import Principal
from .settings import ConfigError, Settings, claim_path

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

    def __init__(self, settings: Settings, roles: dict[str, Role], clock: Clock | None = None):
        self.roles = roles
        self.secret = settings.jwt_secret
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.paths = ClaimPaths.of(settings)
        self.public_key: Key | None = None
        if settings.jwt_public_key_file:
            self.public_key = _load_public_key(settings.jwt_public_key_file)
        self.keys: KeySet | None = None
        if settings.jwt_jwks_url or settings.discovers_keys:
            self.keys = KeySet(jwks_url=settings.jwt_jwks_url, issuer=settings.jwt_issuer,
                               max_age_s=settings.jwt_jwks_max_age_s,
                               grace_s=settings.jwt_jwks_grace_s,
                               min_refetch_s=settings.jwt_jwks_min_refetch_s,
                               on_change=self._forget)
        self.asymmetric = settings.asymmetric_keys
        self._cache: dict[str, Principal] = {}
        # exp, nbf and iat are checked against the database's clock (gateway/clock.py), never
        # the host's: a host clock stepped back would accept a token that has expired
        self.clock = clock or HOST_CLOCK

    async def start(self) -> None:
        """Fetch the issuer's key set, if tokens are checked with one, and keep it fresh."""
        if self.keys is not None:
            await self.keys.start()

    async def close(self) -> None:
        if self.keys is not None:
            await self.keys.close()

    def _forget(self) -> None:
        """Keys were added or withdrawn: tokens verified before are verified again."""
        self._cache = {}

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
            if cached.exp <= self.clock.now() - LEEWAY_S:
                del self._cache[token]
            elif self.keys is None or time.monotonic() < self.keys.trusted_until:
                return cached           # (the key set it was verified with is not lost)
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
                options={"require": ["exp", "sub"], "verify_aud": bool(self.audience),
                         "verify_iss": bool(self.issuer), "verify_exp": False,
                         "verify_nbf": False, "verify_iat": False},
            )
            _check_times(claims, self.clock.now())
        except jwt.PyJWTError as e:
            for kind, code, message in _REASONS:
                if isinstance(e, kind):
                    raise _unauthorized(code, message) from None
            raise _unauthorized("invalid_token", "the token is not valid") from None
        return _principal(claims, self.roles, self.paths)   # no await from here to the cache

    async def _key_for(self, alg: object, kid: object):
        if alg == "HS256":
            if self.asymmetric or not self.secret:
                raise _unauthorized("unsupported_algorithm", "HS256 tokens are not accepted here")
            return self.secret
        if alg in ALGORITHMS:
            if self.public_key is not None and self.public_key.fits(alg):
                return self.public_key.key
            if self.keys is not None:
                return await self.keys.key(kid, alg)
            raise _unauthorized("unsupported_algorithm", f"{alg} tokens are not accepted here")
        raise _unauthorized("unsupported_algorithm", f"algorithm {alg!r} is not accepted")


class ClaimPaths:
    """Where a token carries the role and each tenant claim (GATEWAY_JWT_*_CLAIM)."""

    __slots__ = ("role", "tenant")

    def __init__(self, role: str = "role", partner: str = "partner", euo: str = "euo"):
        self.role = (role, claim_path(role))
        self.tenant = {"partner": (partner, claim_path(partner)), "euo": (euo, claim_path(euo))}

    @classmethod
    def of(cls, settings: Settings) -> ClaimPaths:
        return cls(settings.jwt_role_claim, settings.jwt_partner_claim, settings.jwt_euo_claim)


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


DEFAULT_PATHS = ClaimPaths()


def _at(claims: dict, path: tuple[str, ...]) -> object:
    """The value at a claim path, or None."""
    value: object = claims
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _role(claims: dict, roles: dict[str, Role], paths: ClaimPaths) -> Role:
    """The one role of roles.yaml the role claim names (a text, or a list holding exactly one)."""
    where, path = paths.role
    value = _at(claims, path)
    if value is None:
        raise _unauthorized("missing_claim", f"the token has no role claim ({where})")
    if isinstance(value, list):
        named = {v for v in value if isinstance(v, str) and v in roles}
        if len(named) > 1:
            raise _unauthorized("ambiguous_role", f"the {where} claim names several roles "
                                f"({', '.join(sorted(named))}): a token must hold one")
        value = named.pop() if named else None
    role = roles.get(value) if isinstance(value, str) else None
    if role is None:
        raise _unauthorized("unknown_role", f"role must be one of {', '.join(roles)}")
    return role


def _principal(claims: dict, roles: dict[str, Role], paths: ClaimPaths = DEFAULT_PATHS) -> Principal:
    role = _role(claims, roles, paths)
    name = role.name
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
        where, path = paths.tenant[tenant]
        value = _at(claims, path)
        if not isinstance(value, str) or not value:
            raise _unauthorized("missing_tenant_claim",
                                f"a {name} token must carry the {where!r} claim")
        if not IDENTIFIER.fullmatch(value) or value in (".", ".."):
            raise _unauthorized("bad_claim", f"the {where!r} claim must be 1-128 characters "
                                "of A-Z a-z 0-9 . _ ~ @ : -")
        values[tenant] = value
    return Principal(sub=sub, role=name, exp=float(claims["exp"]), kind=role, **values)


def _load_public_key(path) -> Key:
    """The PEM file's public key: RSA (RS*, PS*), EC P-256/384/521 (ES256/384/512) or
    Ed25519/Ed448 (EdDSA)."""
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"GATEWAY_JWT_PUBLIC_KEY_FILE {path}: not a PEM public key ({e})") from None
    if isinstance(key, rsa.RSAPublicKey):
        return Key("RSA", None, None, key)
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        return Key("EC", _CURVES[key.curve.name], None, key)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return Key("OKP", "Ed25519", None, key)
    if isinstance(key, ed448.Ed448PublicKey):
        return Key("OKP", "Ed448", None, key)
    raise ConfigError(f"GATEWAY_JWT_PUBLIC_KEY_FILE {path}: only RSA, EC (P-256, P-384, P-521) "
                      "and Ed25519/Ed448 keys are supported")


_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
