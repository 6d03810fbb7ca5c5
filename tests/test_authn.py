"""Authentication: every bad token is a 401 with a stable reason id, and is audited."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re

import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway.demo.run import start_site
from gateway.settings import ConfigError, Settings, claim_path

from .conftest import AUDIENCE, ISSUER, SECRET, call, gateway_settings, make_token, running_gateway

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


@pytest.mark.parametrize("path", [PATH, "/v1/catalog", "/v1/audit"])
async def test_two_authorization_headers_are_refused_whichever_comes_first(gateway, http,
                                                                          path):
    """A proxy in front may add its own Authorization after the client's: the gateway
    cannot know which is meant, so it takes neither (the first once won: a user's token
    then a staff token was served as the user, staff then user as staff)."""
    for first, second in (("user", "provider_staff"), ("provider_staff", "user")):
        tokens = {"user": make_token("user", "u-alice", euo="euo-acme"),
                  "provider_staff": make_token("provider_staff", "staff-sam")}
        headers = CIMultiDict([("Authorization", f"Bearer {tokens[first]}"),
                               ("Authorization", f"Bearer {tokens[second]}")])
        async with http.get(gateway + path, headers=headers) as answer:
            body = await answer.read()
        assert answer.status == 401, body
        assert orjson.loads(body)["error"]["code"] == "malformed_authorization"


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


# Claims a token may carry but the gateway must not take at face value: the audit row
# stores them, so a value PostgreSQL cannot store (a NUL, a lone surrogate) would fail the
# whole batch its row is in, every other caller of that batch included.
BAD_CLAIMS = [
    ("NUL in the euo claim", dict(role="user", sub="u-alice", euo="euo-acme\x00")),
    ("NUL in the sub", dict(role="user", sub="u-alice\x00", euo="euo-acme")),
    ("lone surrogate in the sub", dict(role="provider_staff", sub="staff-\ud800")),
    ("partner claim outside the grammar", dict(role="partner", sub="p", partner="p-north wind")),
    ("euo claim of 129 characters", dict(role="euo_admin", sub="a", euo="e" * 129)),
    ("euo claim ..", dict(role="euo_admin", sub="a", euo="..")),
    ("bidi override in the sub", dict(role="provider_staff", sub="staff\u202esam")),
    ("sub of 257 characters", dict(role="provider_staff", sub="s" * 257)),
]


def _token(claims: dict) -> str:
    # pyjwt cannot encode a lone surrogate: sign the JSON ourselves
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": 2**33} | claims
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")  # noqa: E731
    signing = enc(b'{"alg":"HS256","typ":"JWT"}') + b"." + enc(
        json.dumps(body, ensure_ascii=True).encode())
    return (signing + b"." + enc(hmac.new(SECRET.encode(), signing, hashlib.sha256).digest())).decode()


@pytest.mark.parametrize("claims", [pytest.param(c, id=n) for n, c in BAD_CLAIMS])
async def test_claims_outside_their_grammar_are_refused_and_cost_nobody_else(
        gateway, http, token_for, claims):
    """A claim outside its grammar is 401 bad_claim; callers whose rows would share its
    audit batch are served as usual."""
    good = token_for("staff")
    answers = await asyncio.gather(*(
        call(http, "GET", gateway + PATH, _token(claims) if i % 5 == 0 else good)
        for i in range(25)))
    refused = [(s, orjson.loads(b)["error"]["code"]) for i, (s, _, b) in enumerate(answers)
               if i % 5 == 0]
    assert refused == [(401, "bad_claim")] * 5
    assert [s for i, (s, _, _) in enumerate(answers) if i % 5] == [200] * 20


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(role=st.sampled_from(["provider_staff", "partner", "euo_admin", "user"]),
       sub=st.text(min_size=1, max_size=300), tenant=st.text(min_size=1, max_size=140))
async def test_any_claim_values_get_an_answer_never_a_failure(gateway, http, role, sub, tenant):
    """Whatever text a signed token carries in sub and its tenant claim, the caller gets
    an answer or a 4xx; the audit log never fails on it."""
    claims = {"role": role, "sub": sub, "partner": tenant, "euo": tenant}
    status, _, body = await call(http, "GET", gateway + PATH, _token(claims))
    assert status < 500, (claims, body)


@pytest.fixture(scope="module")
def more_keys(tmp_path_factory):
    """An Ed25519, a P-384 and an RSA key pair, each public key written as PEM."""
    where = tmp_path_factory.mktemp("more-keys")
    made = {"ed25519": ed25519.Ed25519PrivateKey.generate(),
            "p384": ec.generate_private_key(ec.SECP384R1()), "rsa": _rsa_key()}
    for name, key in made.items():
        (where / f"{name}.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return made, where


@pytest.mark.parametrize(("kind", "alg", "refused"), [
    ("ed25519", "EdDSA", ()),
    ("p384", "ES384", ("ES256",)),          # the curve names the one ES algorithm it fits
    ("rsa", "PS256", ("HS256",)),
    ("rsa", "RS512", ()),
])
async def test_a_public_key_file_of_each_kind(backends, database_url, http, more_keys, kind, alg,
                                             refused):
    """GATEWAY_JWT_PUBLIC_KEY_FILE may hold an Ed25519, EC P-256/384/521 or RSA key; tokens
    of the algorithms that key fits are served, others refused."""
    made, where = more_keys
    settings = gateway_settings(backends["urls"], jwt_secret=None,
                                jwt_public_key_file=where / f"{kind}.pem")
    async with running_gateway(settings, database_url) as gw:
        good = make_token("provider_staff", "s", key=made[kind], alg=alg)
        assert (await call(http, "GET", gw + PATH, good))[0] == 200
        for other in refused:
            key = SECRET if other.startswith("HS") else ec.generate_private_key(ec.SECP256R1())
            status, _, body = await call(http, "GET", gw + PATH,
                                         make_token("provider_staff", "s", key=key, alg=other))
            assert (status, orjson.loads(body)["error"]["code"]) == (401, "unsupported_algorithm")


def test_the_token_settings_are_read_from_the_environment():
    env = {"GATEWAY_JWT_ISSUER": "https://login.example/realms/gw",
           "GATEWAY_JWT_JWKS_MAX_AGE_S": "60", "GATEWAY_JWT_JWKS_GRACE_S": "0",
           "GATEWAY_JWT_ROLE_CLAIM": "realm_access.roles", "GATEWAY_JWT_PARTNER_CLAIM": "org.partner",
           "GATEWAY_JWT_EUO_CLAIM": r"https://gw\.example/euo"}
    s = Settings.from_env(env)
    assert (s.jwt_jwks_max_age_s, s.jwt_jwks_grace_s) == (60.0, 0.0)
    assert (s.jwt_role_claim, s.jwt_partner_claim, s.jwt_euo_claim) == (
        "realm_access.roles", "org.partner", r"https://gw\.example/euo")
    assert claim_path(s.jwt_euo_claim) == ("https://gw.example/euo",)
    assert s.discovers_keys and s.asymmetric_keys
    defaults = Settings.from_env({})
    assert (defaults.jwt_role_claim, defaults.jwt_partner_claim, defaults.jwt_euo_claim,
            defaults.jwt_jwks_max_age_s) == ("role", "partner", "euo", 300.0)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"jwt_issuer": "https://login.example/realms/gw"}, None),      # the issuer alone is enough
    ({}, "no JWT key"),
    ({"jwt_secret": SECRET, "jwt_jwks_url": "https://login.example/jwks"}, "choose one"),
    ({"jwt_issuer": "urn:example:issuer"}, "is not an http(s) URL"),
    ({"jwt_issuer": "https://login.example/", "jwt_role_claim": "realm_access..roles"},
     "GATEWAY_JWT_ROLE_CLAIM='realm_access..roles' is not a dotted claim path"),
    ({"jwt_issuer": "https://login.example/", "jwt_jwks_grace_s": -1.0}, "GRACE_S"),
])
def test_token_settings_serve_checks(changes, problem):
    """What `gateway serve` and `gateway check` say about the token settings."""
    settings = Settings(upstreams={"telephony": "http://t", "meeting": "http://m"}).with_(**changes)
    if problem is None:
        settings.check_for_serving()
        return
    with pytest.raises(ConfigError, match=re.escape(problem)):
        settings.check_for_serving()
