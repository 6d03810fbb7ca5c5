"""Authentication: every bad token is a 401 with a stable reason id, and is audited."""

from __future__ import annotations

import base64
import json

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.demo.run import start_site

from .conftest import call, gateway_settings, make_token, running_gateway

PATH = "/telephony/euos/euo-acme"


def _unsigned(claims: dict) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'none', 'typ': 'JWT'})}.{enc(claims)}."


BAD_TOKENS = [
    ("expired", lambda: make_token("provider_staff", "s", ttl=-120), "token_expired"),
    ("not yet valid", lambda: make_token("provider_staff", "s", nbf=2**33), "token_not_yet_valid"),
    ("wrong key", lambda: make_token("provider_staff", "s", key="another-key-" + "y" * 32),
     "bad_signature"),
    ("alg none", lambda: _unsigned({"sub": "s", "role": "provider_staff", "exp": 2**33}),
     "unsupported_algorithm"),
    ("wrong audience", lambda: make_token("provider_staff", "s", aud="someone-else"),
     "wrong_audience"),
    ("wrong issuer", lambda: make_token("provider_staff", "s", iss="https://evil.test"),
     "wrong_issuer"),
    ("no exp", lambda: make_token("provider_staff", "s", exp=None), "missing_claim"),
    ("partner without partner claim", lambda: make_token("partner", "p"), "missing_tenant_claim"),
    ("user without euo claim", lambda: make_token("user", "u-alice"), "missing_tenant_claim"),
    ("unknown role", lambda: make_token("root", "s"), "unknown_role"),
    ("garbage", lambda: "not.a.token", "malformed_token"),
    ("RS256 without a public key", lambda: make_token(
        "provider_staff", "s", key=_rsa_key(), alg="RS256"), "unsupported_algorithm"),
]


def _rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(("token_fn", "code"), [pytest.param(f, c, id=n) for n, f, c in BAD_TOKENS])
async def test_bad_tokens_are_refused(gateway, http, token_fn, code):
    """Each bad token gets 401 with its own reason id (the refusals are counted, not
    written one row each: see test_audit_noise.py)."""
    status, _, body = await call(http, "GET", gateway + PATH, token_fn())
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == code


@pytest.mark.parametrize(("header", "code"), [
    (None, "missing_token"), ("Basic dXNlcjpwYXNz", "malformed_authorization"),
    ("Bearer", "malformed_authorization"),
])
async def test_missing_or_malformed_authorization(gateway, http, header, code):
    headers = {"Authorization": header} if header else {}
    status, _, body = await call(http, "GET", gateway + PATH, headers=headers)
    assert status == 401 and orjson.loads(body)["error"]["code"] == code


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """An RSA and an EC key pair, with the RSA public key written as PEM."""
    rsa_key, ec_key = _rsa_key(), ec.generate_private_key(ec.SECP256R1())
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path_factory.mktemp("keys") / "public.pem"
    path.write_bytes(pem)
    return {"rsa": rsa_key, "ec": ec_key, "pem_path": path, "pem": pem}


async def test_rs256_with_a_public_key_file(backends, database_url, http, keys):
    """RS256 tokens verify against the PEM file; HS256 signed with that PEM is refused."""
    settings = gateway_settings(backends["urls"], jwt_secret=None,
                                jwt_public_key_file=keys["pem_path"])
    async with running_gateway(settings, database_url) as gw:
        good = make_token("provider_staff", "s", key=keys["rsa"], alg="RS256")
        assert (await call(http, "GET", gw + PATH, good))[0] == 200
        # key confusion: the public key used as an HMAC secret
        forged = _hs256_over(keys["pem"], {"sub": "s", "role": "provider_staff", "exp": 2**33,
                                          "iss": "https://issuer.test", "aud": "partner-gateway"})
        status, _, body = await call(http, "GET", gw + PATH, forged)
        assert status == 401 and orjson.loads(body)["error"]["code"] == "unsupported_algorithm"


def _hs256_over(secret: bytes, claims: dict) -> str:
    import hashlib
    import hmac
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")  # noqa: E731
    signing = enc(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + enc(
        json.dumps(claims).encode())
    return (signing + b"." + enc(hmac.new(secret, signing, hashlib.sha256).digest())).decode()


async def test_jwks_keys_are_fetched_and_refetched_for_a_new_kid(backends, database_url, http,
                                                                 keys):
    """ES256 and RS256 keys come from the JWKS URL; a rotated key is found by its kid."""
    served = {"keys": [_jwk(keys["ec"], "ec-1", "ES256")]}
    fetches = []

    async def jwks(request):
        fetches.append(1)
        return web.json_response(served)
    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    runner, port = await start_site(app, "127.0.0.1", 0)
    try:
        settings = gateway_settings(backends["urls"], jwt_secret=None,
                                    jwt_jwks_url=f"http://127.0.0.1:{port}/jwks.json",
                                    jwt_jwks_min_refetch_s=0.0)
        async with running_gateway(settings, database_url) as gw:
            es = make_token("provider_staff", "s", key=keys["ec"], alg="ES256",
                            headers={"kid": "ec-1"})
            assert (await call(http, "GET", gw + PATH, es))[0] == 200
            served["keys"].append(_jwk(keys["rsa"], "rsa-2", "RS256"))
            rs = make_token("provider_staff", "s", key=keys["rsa"], alg="RS256",
                            headers={"kid": "rsa-2"})
            assert (await call(http, "GET", gw + PATH, rs))[0] == 200
            assert len(fetches) == 2
            unknown = make_token("provider_staff", "s", key=keys["rsa"], alg="RS256",
                                 headers={"kid": "nope"})
            status, _, body = await call(http, "GET", gw + PATH, unknown)
            assert status == 401 and orjson.loads(body)["error"]["code"] == "unknown_key"
    finally:
        await runner.cleanup()


def _jwk(private_key, kid: str, alg: str) -> dict:
    algo = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    jwk = json.loads(algo.to_jwk(private_key.public_key()))
    jwk.update(kid=kid, alg=alg, use="sig")
    return jwk
