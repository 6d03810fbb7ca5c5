"""OpenID Connect as operators run it, against a real OpenID Provider (node-oidc-provider,
tests/oidc_provider.py): keys discovered from the issuer alone and kept fresh, a withdrawn
key refused once the set is refetched, an unreachable issuer tolerated for a bounded grace
and then refused, roles where providers put them, every algorithm they sign with."""

from __future__ import annotations

import jwt
import orjson
import pytest_asyncio

from gateway.call import ANONYMOUS_ROUTE
from gateway.demo.run import seed_contracts

from .conftest import (
    SECRET,
    call,
    free_port,
    gateway_settings,
    make_token,
    running_gateway,
    serve_env,
    wait_for,
)
from .oidc_provider import AUDIENCE, new_keys, running_provider
from .roles import gateway_run

PATH = "/telephony/euos/euo-acme"


@pytest_asyncio.fixture(scope="module")
async def _provider_process(tmp_path_factory, http):
    """The OpenID Provider's process, started once for the module (~0.5 s each)."""
    async with running_provider(tmp_path_factory.mktemp("oidc"), http) as p:
        yield p


@pytest_asyncio.fixture
async def provider(_provider_process):
    """The OpenID Provider as started, for each test (tests rotate its keys and stop it)."""
    await _provider_process.reset()
    return _provider_process


@pytest_asyncio.fixture
async def contracts(database_url, demo):
    await seed_contracts(database_url, demo)


def oidc_settings(backends, provider, **changes):
    """The issuer alone, its roles in realm_access.roles, partners and EUOs in org (Keycloak)."""
    return gateway_settings(backends["urls"], **({
        "jwt_secret": None, "jwt_issuer": provider.issuer, "jwt_audience": AUDIENCE,
        "jwt_role_claim": "realm_access.roles", "jwt_partner_claim": "org.partner",
        "jwt_euo_claim": "org.euo"} | changes))


async def status_of(http, gw, token, path: str = PATH) -> tuple[int, str | None]:
    status, _, body = await call(http, "GET", gw + path, token)
    return status, (orjson.loads(body)["error"]["code"] if status >= 400 else None)


async def readyz(http, gw) -> tuple[int, dict]:
    async with http.get(gw + "/readyz") as r:
        return r.status, await r.json()


def signed_with(provider, kid: str, alg: str, **claims) -> str:
    """A token signed with one of the provider's private keys outside the provider: what
    someone holding that key (stolen, or withdrawn since) could make."""
    jwk = provider.ever[kid]
    key = jwt.PyJWK(jwk, algorithm=alg).key
    body = {"iss": provider.issuer, "aud": AUDIENCE, "sub": "mallory", "exp": 2**33,
            "realm_access": {"roles": ["provider_staff"]}} | claims
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid, "typ": "at+jwt"})


async def test_the_issuer_alone_is_enough(backends, database_url, http, provider):
    """With GATEWAY_JWT_ISSUER and no key, the keys come from the issuer's discovery
    document (jwks_uri); an access token of its token endpoint is served."""
    async with running_gateway(oidc_settings(backends, provider), database_url) as gw:
        token = await provider.token("staff-sam")
        assert jwt.get_unverified_header(token)["typ"] == "at+jwt"     # RFC 9068
        assert await status_of(http, gw, token) == (200, None)
        status, body = await readyz(http, gw)
        assert "keys_unavailable" not in body.get("reasons", [])
        async with http.get(gw + "/metrics") as r:
            assert "gateway_jwt_keys_stale 0.0" in (await r.text()).splitlines()
        assert "jwt_keys_stale" not in body.get("warnings", [])


async def test_every_algorithm_the_provider_signs_with_is_accepted(backends, database_url, http,
                                                                  provider):
    """RS256/384/512 and PS256 (one RSA key whose JWK names no alg, as Entra ID's do),
    ES256, ES384 and EdDSA (Ed25519)."""
    async with running_gateway(oidc_settings(backends, provider), database_url) as gw:
        for alg in ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"):
            token = await provider.token("staff-sam", alg)
            assert jwt.get_unverified_header(token)["alg"] == alg
            assert await status_of(http, gw, token) == (200, None), alg


async def test_an_algorithm_that_does_not_fit_its_key_is_refused(backends, database_url, http,
                                                                 provider):
    """A token naming the P-256 key but signed RS256, or naming the P-384 key but claiming
    ES256, is refused whoever signed it; so are `none` and HS256 over the published key."""
    async with running_gateway(oidc_settings(backends, provider), database_url) as gw:
        rsa_signed = signed_with(provider, "rsa-1", "RS256")
        header, rest = rsa_signed.split(".", 1)
        forged = jwt.utils.base64url_encode(orjson.dumps(
            {"alg": "RS256", "kid": "p256-1", "typ": "at+jwt"})).decode() + "." + rest
        assert await status_of(http, gw, forged) == (401, "unsupported_algorithm")
        p256_claiming_es384 = jwt.utils.base64url_encode(orjson.dumps(
            {"alg": "ES384", "kid": "p256-1"})).decode() + "." + signed_with(
            provider, "p256-1", "ES256").split(".", 1)[1]
        assert await status_of(http, gw, p256_claiming_es384) == (401, "unsupported_algorithm")
        hs = make_token("provider_staff", "s", key=SECRET, iss=provider.issuer,
                        headers={"kid": "rsa-1"})
        assert await status_of(http, gw, hs) == (401, "unsupported_algorithm")
        assert await status_of(http, gw, signed_with(provider, "rsa-1", "RS256")) == (200, None)


async def test_hs256_is_refused_where_public_keys_are_configured(backends, database_url, http,
                                                                 provider):
    """With a JWKS and a secret both set (which `serve` refuses to start with), an HS256
    token signed with that secret is still refused: one kind of key at a time."""
    settings = oidc_settings(backends, provider, jwt_secret=SECRET, jwt_jwks_url=provider.jwks_url)
    async with running_gateway(settings, database_url) as gw:
        hs = make_token("provider_staff", "s", iss=provider.issuer,
                        realm_access={"roles": ["provider_staff"]})
        assert await status_of(http, gw, hs) == (401, "unsupported_algorithm")
        assert await status_of(http, gw, await provider.token("staff-sam")) == (200, None)


# client of the provider -> what the gateway answers its token
KEYCLOAK_CLIENTS = [
    ("staff-sam", (200, None)),                   # provider_staff among roles it ignores
    ("two-hats", (401, "ambiguous_role")),        # two roles of roles.yaml: which is meant?
    ("nobody", (401, "unknown_role")),            # none of roles.yaml
    ("pat@northwind", (200, None)),               # partner: org.partner holds a contract
    ("pat@bluesky", (403, "no_active_contract")),  # partner: org.partner read, and it has none
    ("u-alice", (200, None)),                     # a user of org.euo euo-acme
    ("u-bob", (403, "other_euo")),                # org.euo says euo-globex: not one of acme's
]


async def test_roles_in_a_list_and_tenants_in_a_nested_claim(backends, database_url, http,
                                                              provider, contracts):
    """GATEWAY_JWT_ROLE_CLAIM=realm_access.roles (Keycloak): the list must hold exactly one
    role of roles.yaml; GATEWAY_JWT_PARTNER_CLAIM=org.partner and GATEWAY_JWT_EUO_CLAIM=org.euo
    are nested claims. The users read their own record, the others the EUO's."""
    async with running_gateway(oidc_settings(backends, provider), database_url) as gw:
        answers = [(client, await status_of(
            http, gw, await provider.token(client),
            f"{PATH}/users/{client}" if client.startswith("u-") else PATH))
            for client, _ in KEYCLOAK_CLIENTS]
    assert answers == KEYCLOAK_CLIENTS


async def test_claims_named_by_a_url_as_auth0_does(backends, database_url, http, provider,
                                                   contracts):
    """A claim whose name holds dots (an Auth0 namespace) is written with `\\.`."""
    settings = oidc_settings(backends, provider,
                             jwt_role_claim=r"https://gateway\.example/roles",
                             jwt_partner_claim=r"https://gateway\.example/partner")
    async with running_gateway(settings, database_url) as gw:
        assert await status_of(http, gw, await provider.token("auth0-partner")) == (200, None)


async def test_a_withdrawn_key_is_refused_once_the_set_is_refetched(backends, database_url, http,
                                                                    provider):
    """The provider rotates its keys and withdraws the old ones (compromised): within the
    key set's maximum age, tokens signed with them are refused, those already served
    included; tokens of the new keys are served."""
    settings = oidc_settings(backends, provider, jwt_jwks_url=provider.jwks_url,
                             jwt_jwks_max_age_s=1.0, jwt_jwks_min_refetch_s=0.2)
    async with running_gateway(settings, database_url) as gw:
        old = await provider.token("staff-sam")
        assert await status_of(http, gw, old) == (200, None)
        stolen = signed_with(provider, "rsa-1", "RS256")
        assert await status_of(http, gw, stolen) == (200, None)
        await provider.use_keys(new_keys("2"))
        fresh = await provider.token("staff-sam")

        async def served():   # an unknown kid is refetched, at most every min_refetch_s
            return await status_of(http, gw, fresh) == (200, None)
        assert await wait_for(served, timeout=10)

        async def refused():
            return (await status_of(http, gw, old) == (401, "unknown_key")
                    and await status_of(http, gw, stolen) == (401, "unknown_key"))
        assert await wait_for(refused, timeout=10)
        assert await status_of(http, gw, signed_with(provider, "rsa-1", "RS256", sub="x")) == (
            401, "unknown_key")


async def test_a_shorter_cache_control_max_age_is_honoured(backends, database_url, http, provider):
    """GATEWAY_JWT_JWKS_MAX_AGE_S is 300, but the provider says `max-age=1`: a withdrawn
    key is refused within seconds."""
    await provider.cache_control("public, max-age=1")
    async with running_gateway(oidc_settings(backends, provider, jwt_jwks_min_refetch_s=0.2),
                               database_url) as gw:
        old = await provider.token("staff-sam")
        assert await status_of(http, gw, old) == (200, None)
        await provider.use_keys(new_keys("2"))

        async def refused():
            return await status_of(http, gw, old) == (401, "unknown_key")
        assert await wait_for(refused, timeout=10)


async def test_an_unreachable_issuer_is_trusted_for_the_grace_then_refused(
        backends, database_url, http, provider):
    """The issuer goes down: past the set's maximum age its last good set stays in force
    for the grace (/readyz warns, the metrics show its age), then every token is refused
    503 keys_unavailable (/readyz not ready), a token verified before included; once the
    issuer answers again, tokens are served."""
    settings = oidc_settings(backends, provider, jwt_jwks_max_age_s=0.5, jwt_jwks_grace_s=2.0,
                             jwt_jwks_min_refetch_s=0.2)
    async with running_gateway(settings, database_url) as gw:
        token = await provider.token("staff-sam")
        assert await status_of(http, gw, token) == (200, None)
        await provider.go_down()

        async def in_grace():
            status, body = await readyz(http, gw)
            return status == 200 and "jwt_keys_stale" in body.get("warnings", [])
        assert await wait_for(in_grace, timeout=10)
        assert await status_of(http, gw, token) == (200, None)
        # not only the cached token: the set is still in force
        assert await status_of(http, gw, signed_with(provider, "p384-1", "ES384")) == (200, None)
        async with http.get(gw + "/metrics") as r:
            metrics = await r.text()
        age = next(line for line in metrics.splitlines()
                   if line.startswith('gateway_mirror_staleness_seconds{mirror="jwt_keys"}'))
        assert float(age.split()[-1]) > 0.5
        assert "gateway_jwt_keys_stale 1.0" in metrics.splitlines()

        async def lost():
            status, body = await readyz(http, gw)
            return status == 503 and "keys_unavailable" in body.get("reasons", [])
        assert await wait_for(lost, timeout=15)
        assert await status_of(http, gw, token) == (503, "keys_unavailable")
        async with http.get(gw + "/metrics") as r:
            assert "gateway_jwt_keys_stale 2.0" in (await r.text()).splitlines()

        await provider.go_down(False)

        async def back():
            return await status_of(http, gw, token) == (200, None)
        assert await wait_for(back, timeout=10)
        status, body = await readyz(http, gw)
        assert "keys_unavailable" not in body.get("reasons", [])
        async with http.get(gw + "/metrics") as r:
            assert "gateway_jwt_keys_stale 0.0" in (await r.text()).splitlines()


async def test_gateway_check_fetches_the_issuers_keys(backends, database_url, tmp_path, provider):
    """`gateway check` says how many signing keys the issuer publishes, or warns (serve
    would start, not ready) when they cannot be fetched."""
    env = serve_env(backends, database_url, tmp_path, free_port(), GATEWAY_JWT_SECRET="",
                    GATEWAY_JWT_ISSUER=provider.issuer)
    done = await gateway_run("check", env=env)
    assert (f"ok: token issuer's key set: 4 signing keys (discovered from {provider.issuer})"
            in done.stdout.splitlines()), done.stdout + done.stderr
    await provider.go_down()
    done = await gateway_run("check", env=env)
    assert any(line.startswith("warning: token issuer's key set cannot be fetched")
               for line in done.stdout.splitlines()), done.stdout


async def test_a_discovery_document_of_another_issuer_is_not_trusted(backends, database_url, http,
                                                                     db, provider):
    """Discovery from `issuer/` finds the document of `issuer` (no final slash): its keys
    are not taken, and /readyz says why the gateway is not ready. The refusals are audited
    as failures (decision error), not as denials of a bad token."""
    settings = oidc_settings(backends, provider, jwt_issuer=provider.issuer + "/")
    async with running_gateway(settings, database_url) as gw:
        status, body = await readyz(http, gw)
        assert status == 503 and "keys_unavailable" in body["reasons"]
        token = await provider.token("staff-sam")
        assert await status_of(http, gw, token) == (503, "keys_unavailable")
    rows = await db.fetch("select decision, status from audit_log where route = $1 "
                          "and reason = 'keys_unavailable'", ANONYMOUS_ROUTE)
    assert rows and {(r["decision"], r["status"]) for r in rows} == {("error", 503)}
