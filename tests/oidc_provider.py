"""A real OpenID Provider on loopback for the tests: node-oidc-provider (tests/oidc/), run
with Node. Its keys are made here, so a test can rotate and withdraw them; tokens come
from its token endpoint (client credentials, RFC 9068 `at+jwt`, one resource indicator
per signing algorithm), never from the test itself.

Without node or the package (`npm ci` in tests/oidc; .ci/run does it) the tests that need
it are skipped with the reason, unless GATEWAY_TEST_REQUIRE_OIDC=1 (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

HERE = Path(__file__).resolve().parent / "oidc"
AUDIENCE = "partner-gateway"
SECRET = "client-secret-" + "z" * 32      # the test clients' secret (a test value)

# client id -> the claims its access tokens carry beside the standard ones (sub = client id)
CLIENTS = {
    # Keycloak: realm roles in realm_access.roles, beside roles of no concern to the gateway
    "staff-top": {"role": "provider_staff"},      # the gateway's own default: a top-level `role`
    "staff-sam": {"realm_access": {"roles": ["provider_staff", "offline_access",
                                             "default-roles-gateway"]}},
    "two-hats": {"realm_access": {"roles": ["provider_staff", "partner"]}},
    "nobody": {"realm_access": {"roles": ["offline_access"]}},
    "pat@northwind": {"realm_access": {"roles": ["partner"]}, "org": {"partner": "p-northwind"}},
    "pat@bluesky": {"realm_access": {"roles": ["partner"]}, "org": {"partner": "p-bluesky"}},
    "u-alice": {"realm_access": {"roles": ["user"]}, "org": {"euo": "euo-acme"}},
    "u-bob": {"realm_access": {"roles": ["user"]}, "org": {"euo": "euo-globex"}},
    # Auth0: custom claims under a namespace that is a URL, dots and all
    "auth0-partner": {"https://gateway.example/roles": ["partner"],
                      "https://gateway.example/partner": "p-northwind"},
}


def new_keys(tag: str = "1") -> list[dict]:
    """Private JWKs of every type the provider signs with: RSA (RS*, PS*), P-256, P-384, Ed25519."""
    made = [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), jwt.algorithms.RSAAlgorithm),
        (ec.generate_private_key(ec.SECP256R1()), jwt.algorithms.ECAlgorithm),
        (ec.generate_private_key(ec.SECP384R1()), jwt.algorithms.ECAlgorithm),
        (ed25519.Ed25519PrivateKey.generate(), jwt.algorithms.OKPAlgorithm),
    ]
    keys = []
    for (key, algorithm), name in zip(made, ("rsa", "p256", "p384", "ed25519"), strict=True):
        jwk = json.loads(algorithm.to_jwk(key))
        jwk.pop("key_ops", None)    # node-oidc-provider 8 picks a signing key as if to verify
        jwk["kid"] = f"{name}-{tag}"
        keys.append(jwk)
    return keys


def unavailable() -> str | None:
    """Why the provider cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (HERE / "node_modules" / "oidc-provider").is_dir():
        return "oidc-provider is not installed: run `npm ci` in tests/oidc (.ci/run does)"
    return None


class Provider:
    """The running provider: its issuer, token endpoint and test controls."""

    def __init__(self, port: int, http: aiohttp.ClientSession, keys: list[dict]):
        self.issuer = f"http://127.0.0.1:{port}"
        self.jwks_url = f"{self.issuer}/jwks"
        self.http = http
        self.keys = keys
        self.ever = {k["kid"]: k for k in keys}     # every key it signed with, withdrawn ones too
        self.first_keys = keys

    async def token(self, client: str, alg: str = "RS256") -> str:
        """An access token for `client` from the token endpoint, signed with `alg`."""
        async with self.http.post(
                f"{self.issuer}/token", headers={"Authorization": "Basic " + base64.b64encode(
                    f"{client}:{SECRET}".encode()).decode()},
                data={"grant_type": "client_credentials", "resource": f"urn:gateway:{alg}",
                      "scope": "gateway"}) as r:
            body = await r.json()
            assert r.status == 200, body
        assert body["token_type"] == "Bearer"
        return body["access_token"]

    async def use_keys(self, keys: list[dict]) -> None:
        """Sign with these keys from now on and publish only them (the others withdrawn)."""
        self.keys = keys
        self.ever |= {k["kid"]: k for k in keys}
        await self._control("keys", {"keys": keys})

    async def go_down(self, down: bool = True) -> None:
        """Drop every connection (down) or answer again."""
        await self._control("down", {"down": down})

    async def cache_control(self, value: str | None) -> None:
        """The Cache-Control header of the JWKS answer."""
        await self._control("cache-control", {"value": value})

    async def reset(self) -> None:
        """As it was started: up, its first keys (the node provider built anew on them, as
        use_keys does: no token or grant of before), the JWKS's own Cache-Control."""
        await self.go_down(False)
        await self.cache_control(None)
        await self.use_keys(self.first_keys)
        self.ever = {k["kid"]: k for k in self.first_keys}

    async def _control(self, what: str, body: dict) -> None:
        async with self.http.put(f"{self.issuer}/__test/{what}", json=body) as r:
            assert r.status == 204


@contextlib.asynccontextmanager
async def running_provider(where: Path, http: aiohttp.ClientSession) -> AsyncIterator[Provider]:
    """The provider on a free loopback port, with fresh keys; stopped on exit."""
    why = unavailable()
    if why is not None:
        if os.environ.get("GATEWAY_TEST_REQUIRE_OIDC") == "1":
            pytest.fail(f"the OpenID Provider tests must run here: {why}")
        pytest.skip(why)
    keys = new_keys()
    config = where / "provider.json"
    config.write_text(json.dumps({
        "audience": AUDIENCE, "keys": keys,
        "clients": [{"client_id": c, "client_secret": SECRET, "claims": claims}
                    for c, claims in CLIENTS.items()]}))
    process = await asyncio.create_subprocess_exec(
        "node", str(HERE / "provider.mjs"), str(config), cwd=HERE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        async def listening() -> int:
            while line := await process.stdout.readline():
                if line.startswith(b"listening "):
                    return int(line.split()[1])
            raise RuntimeError("the OpenID Provider stopped before it listened")
        yield Provider(await asyncio.wait_for(listening(), 30), http, keys)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
