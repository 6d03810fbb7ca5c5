"""The issuer's key set, read without a server: which JWKs are taken, which algorithm fits
which key, how long an answer's Cache-Control lets it be kept."""

from __future__ import annotations

import json

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from multidict import CIMultiDict

from gateway.demo.run import start_site
from gateway.keyset import FetchFailed, KeySet, cache_max_age, discovery_url, parse_jwks


def _public_jwk(private_key, **members) -> dict:
    algorithm = {rsa.RSAPrivateKey: jwt.algorithms.RSAAlgorithm,
                 ec.EllipticCurvePrivateKey: jwt.algorithms.ECAlgorithm,
                 ed25519.Ed25519PrivateKey: jwt.algorithms.OKPAlgorithm}
    kind = next(v for k, v in algorithm.items() if isinstance(private_key, k))
    return json.loads(kind.to_jwk(private_key.public_key())) | members


@pytest.fixture(scope="module")
def jwks():
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {"keys": [
        _public_jwk(rsa_key, kid="rsa", use="sig"),                   # no alg, as Entra ID's
        _public_jwk(rsa_key, kid="rsa-rs256", alg="RS256"),
        _public_jwk(ec.generate_private_key(ec.SECP256R1()), kid="p256"),
        _public_jwk(ec.generate_private_key(ec.SECP384R1()), kid="p384", alg="ES384"),
        _public_jwk(ed25519.Ed25519PrivateKey.generate(), kid="ed"),
        # left out: a symmetric key, an encryption key, a key without kid, a key pinned to
        # an algorithm the gateway refuses, a key that cannot be read, not a JWK at all
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"},
        _public_jwk(rsa_key, kid="enc", use="enc"),
        _public_jwk(rsa_key),
        _public_jwk(rsa_key, kid="rsa-hs", alg="HS256"),
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        "not a key",
    ]}


def test_only_asymmetric_signing_keys_with_a_kid_are_taken(jwks):
    assert sorted(parse_jwks(jwks)) == ["ed", "p256", "p384", "rsa", "rsa-rs256"]


@pytest.mark.parametrize(("kid", "fits"), [
    ("rsa", {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("rsa-rs256", {"RS256"}),                 # the JWK's alg pins it
    ("p256", {"ES256"}),
    ("p384", {"ES384"}),
    ("ed", {"EdDSA"}),
])
def test_an_algorithm_fits_only_keys_of_its_type_and_curve(jwks, kid, fits):
    every = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
             "EdDSA", "HS256", "none"}
    key = parse_jwks(jwks)[kid]
    assert {alg for alg in every if key.fits(alg)} == fits


@pytest.mark.parametrize("document", [None, [], {"keys": {}}, {"no": "keys"}])
def test_what_is_no_key_set_is_a_failed_fetch(document):
    with pytest.raises(FetchFailed):
        parse_jwks(document)


def test_an_empty_key_set_is_taken_at_its_word():
    """An issuer that publishes no key trusts no token: nothing is kept from before."""
    assert parse_jwks({"keys": []}) == {}


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"Cache-Control": "public, max-age=60"}, 60),
    ({"Cache-Control": "max-age=60, must-revalidate", "Age": "50"}, 10),
    ({"Cache-Control": "max-age=60", "Age": "90"}, 0),
    ({"Cache-Control": 'max-age="30"'}, 30),
    ({"Cache-Control": "no-cache"}, None),
    ({"Cache-Control": "s-maxage=10"}, None),
    ({}, None),
])
def test_cache_control_max_age(headers, seconds):
    assert cache_max_age(CIMultiDict(headers)) == seconds


@pytest.mark.parametrize(("issuer", "url"), [
    ("https://kc.example/realms/gw", "https://kc.example/realms/gw/.well-known/openid-configuration"),
    ("https://tenant.auth0.com/", "https://tenant.auth0.com/.well-known/openid-configuration"),
])
def test_the_discovery_document_is_under_the_issuer(issuer, url):
    assert discovery_url(issuer) == url


@pytest.mark.parametrize(("cache_control", "max_age_s", "min_refetch_s", "limit"), [
    (None, 300.0, 5.0, 300.0),                 # GATEWAY_JWT_JWKS_MAX_AGE_S
    ("max-age=60", 300.0, 5.0, 60.0),          # a shorter max-age is honoured
    ("max-age=3600", 300.0, 5.0, 300.0),       # a longer one is not
    ("max-age=0", 300.0, 5.0, 5.0),            # no refetch without pause
    ("max-age=0", 2.0, 5.0, 2.0),              # never past GATEWAY_JWT_JWKS_MAX_AGE_S
])
async def test_the_sets_maximum_age(jwks, cache_control, max_age_s, min_refetch_s, limit):
    """How long a fetched set is kept, from the settings and the answer's Cache-Control."""
    async def serve(request):
        headers = {"Cache-Control": cache_control} if cache_control else {}
        return web.json_response(jwks, headers=headers)
    app = web.Application()
    app.router.add_get("/jwks", serve)
    runner, port = await start_site(app, "127.0.0.1", 0)
    keys = KeySet(jwks_url=f"http://127.0.0.1:{port}/jwks", issuer=None, max_age_s=max_age_s,
                  grace_s=0.0, min_refetch_s=min_refetch_s)
    try:
        await keys.start()
        assert keys.last_error is None and len(keys.keys) == 5
        assert keys.age_limit_s == limit
    finally:
        await keys.close()
        await runner.cleanup()
