"""Development tokens: `gateway token` and the demo sign HS256 tokens with
GATEWAY_JWT_SECRET, or with a secret generated once under GATEWAY_DATA_DIR (never for
production: a deployment names its issuer, GATEWAY_JWT_JWKS_URL or GATEWAY_OIDC_ISSUER)."""

from __future__ import annotations

import secrets
import sys
import time

import jwt

from .settings import ConfigError, Settings

DEV_SECRET_FILE = "dev-jwt-secret"


def dev_secret(settings: Settings, say_where: bool = False) -> str:
    """GATEWAY_JWT_SECRET, or a development secret generated once under the data dir
    (with say_where, stderr names the file, so a token minted from another directory
    does not silently carry a secret the demo does not know)."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = settings.data_dir / DEV_SECRET_FILE
    if say_where:
        print(f"gateway: signed with {'the' if path.exists() else 'a NEW'} development secret "
              f"{path.resolve()} (the demo must use the same GATEWAY_DATA_DIR)", file=sys.stderr)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def mint_token(settings: Settings, role: str, sub: str, partner: str | None, euo: str | None,
               ttl: int) -> str:
    """A signed development token for this role (of the policy's roles.yaml) and tenant."""
    from .policy.catalog_files import load_catalog
    roles = load_catalog(settings.policy_dir).roles
    if role not in roles:
        raise ConfigError(f"unknown role {role!r}: the policy's roles are {', '.join(roles)}")
    claim = roles[role].tenant_claim
    now = int(time.time())
    claims = {"sub": sub, "role": role, "iat": now, "exp": now + ttl}
    if claim is not None:
        value = {"partner": partner, "euo": euo}[claim]
        if not value:
            raise ConfigError(f"a {role} token needs --{claim}")
        claims[claim] = value
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, dev_secret(settings, say_where=True), algorithm="HS256")
