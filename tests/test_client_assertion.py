"""Client authentication by signed JWT (RFC 7523): private_key_jwt and client_secret_jwt, over real HTTP."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from support import Driver, FakeClock, astored, expired

from httpx_upstream_auth import (
    ClientAssertion,
    ConfigurationError,
    MemoryStorage,
    OAuth2Refresher,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth._oauth import AuthMethod
from httpx_upstream_auth.testing import LocalProvider, ServerThread
from httpx_upstream_auth.testing import _provider as provider_module

pytestmark = pytest.mark.anyio

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())
JWT_SECRET = "jwt-client-secret-0123456789abcdef0123456789"


def pem(key: Any) -> str:
    """A private key as unencrypted PKCS#8 PEM text."""
    raw: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return raw.decode()


def public_pem(key: Any) -> str:
    """The public half of a key as PEM text."""
    raw: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return raw.decode()


def private_jwk(key: Any, **members: str) -> dict[str, Any]:
    """A private key as a JWK dict, with extra members (kid, alg)."""
    data: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
    return {**data, **members}


def register(provider: LocalProvider) -> None:
    """Register the JWT clients: rsa-client and ec-client (private_key_jwt), hs-client (client_secret_jwt)."""
    provider.clients["rsa-client"] = (None, "private_key_jwt")
    provider.client_keys["rsa-client"] = public_pem(RSA_KEY)
    provider.clients["ec-client"] = (None, "private_key_jwt")
    provider.client_keys["ec-client"] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    provider.clients["hs-client"] = (JWT_SECRET, "client_secret_jwt")


def manager_for(
    token_url: str,
    client_id: str,
    auth_method: AuthMethod,
    assertion: ClientAssertion | None = None,
    secret: str | None = None,
    **kwargs: Any,
) -> TokenManager:
    """A manager whose refresher authenticates ``client_id`` with a JWT assertion."""
    refresher = OAuth2Refresher(token_url, client_id, secret, auth_method=auth_method, client_assertion=assertion)
    return TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage(), **kwargs)


def sent_assertions(provider: LocalProvider) -> list[str]:
    """The client assertions of the logged token requests, oldest first."""
    return [r["form"]["client_assertion"] for r in provider.requests if "client_assertion" in r["form"]]


CASES: dict[str, Callable[[], tuple[str, AuthMethod, ClientAssertion | None, str | None]]] = {
    "RS256-pem": lambda: ("rsa-client", "private_key_jwt", ClientAssertion(pem(RSA_KEY), key_id="rsa-1"), None),
    "PS256-pem-bytes": lambda: (
        "rsa-client",
        "private_key_jwt",
        ClientAssertion(pem(RSA_KEY).encode(), alg="PS256"),
        None,
    ),
    "ES256-jwk": lambda: ("ec-client", "private_key_jwt", ClientAssertion(private_jwk(EC_KEY, kid="ec-1")), None),
    "ES256-jwk-json": lambda: (
        "ec-client",
        "private_key_jwt",
        ClientAssertion(json.dumps(private_jwk(EC_KEY, alg="ES256"))),
        None,
    ),
    "HS256-from-secret": lambda: ("hs-client", "client_secret_jwt", None, JWT_SECRET),
    "HS256-given": lambda: ("hs-client", "client_secret_jwt", ClientAssertion(JWT_SECRET, alg="HS256"), None),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_refreshes_succeed_with_a_signed_assertion(
    case: str, driver: Driver, provider: LocalProvider, token_url: str
) -> None:
    """Each key form and algorithm refreshes; the provider verified an assertion with iss = sub = client id, aud =
    the token endpoint, a short exp and the configured kid, and no client secret went over the wire."""
    register(provider)
    client_id, method, assertion, secret = CASES[case]()
    manager = manager_for(token_url, client_id, method, assertion, secret)
    try:
        first = await driver.store(manager, expired(provider.login(client_id=client_id)))
        fresh = await driver.get_token(manager)
        assert (await driver.request(manager)).status_code == 200
    finally:
        manager.close()
    assert fresh.version == first.version + 1 and provider.stats["refresh_ok"] == provider.stats["assertion_ok"] == 1
    (sent,) = sent_assertions(provider)
    form = provider.requests[0]["form"]
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert form["client_id"] == client_id and "client_secret" not in form
    claims = jwt.decode(sent, options={"verify_signature": False})
    assert claims["iss"] == claims["sub"] == client_id and claims["aud"] == token_url
    assert 0 < claims["exp"] - claims["iat"] <= 60
    header = jwt.get_unverified_header(sent)
    expected_alg = {"PS256-pem-bytes": "PS256", "RS256-pem": "RS256"}.get(case, "ES256" if "ES" in case else "HS256")
    assert header["alg"] == expected_alg
    assert header.get("kid") == {"RS256-pem": "rsa-1", "ES256-jwk": "ec-1"}.get(case)


async def test_a_replayed_assertion_is_refused(provider: LocalProvider, token_url: str, driver: Driver) -> None:
    """An assertion the provider accepted once is refused when presented again (its jti was seen), even with a
    refresh token of another, live grant."""
    register(provider)
    manager = manager_for(token_url, "ec-client", "private_key_jwt", ClientAssertion(private_jwk(EC_KEY)))
    try:
        await driver.store(manager, expired(provider.login(client_id="ec-client")))
        await driver.get_token(manager)
    finally:
        manager.close()
    (sent,) = sent_assertions(provider)
    other = provider.login(client_id="ec-client")
    form = {
        "grant_type": "refresh_token",
        "refresh_token": other.refresh_token,
        "client_id": "ec-client",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": sent,
    }
    async with httpx.AsyncClient() as client:
        replay = await client.post(token_url, data=form)
    assert replay.status_code == 401 and replay.json() == {"error": "invalid_client"}
    assert provider.stats["assertion_replay"] == 1 and provider.stats["refresh_ok"] == 1


async def test_no_assertion_is_reused_across_retries(provider: LocalProvider, token_url: str, driver: Driver) -> None:
    """A 503 then a success: the retry carries a new assertion (two token calls, two distinct jti, both unseen by
    the provider, which accepted the second)."""
    register(provider)
    manager = manager_for(token_url, "rsa-client", "private_key_jwt", ClientAssertion(pem(RSA_KEY)))
    provider.fail_next("503", 2)
    try:
        first = await driver.store(manager, expired(provider.login(client_id="rsa-client")))
        fresh = await driver.get_token(manager)
    finally:
        manager.close()
    assert fresh.version == first.version + 1 and provider.stats["token_calls"] == 3 and provider.stats["faults"] == 2
    jtis = {jwt.decode(a, options={"verify_signature": False})["jti"] for a in sent_assertions(provider)}
    assert len(jtis) == 3
    assert provider.stats["assertion_ok"] == 1 and provider.stats["assertion_replay"] == 0


async def test_the_audience_can_be_the_issuer(provider: LocalProvider, server: ServerThread, driver: Driver) -> None:
    """audience= sets aud (here the issuer's identifier, which the provider also accepts)."""
    register(provider)
    assertion = ClientAssertion(pem(RSA_KEY), audience=server.url)
    manager = manager_for(server.url + "/token", "rsa-client", "private_key_jwt", assertion)
    try:
        await driver.store(manager, expired(provider.login(client_id="rsa-client")))
        await driver.get_token(manager)
    finally:
        manager.close()
    (sent,) = sent_assertions(provider)
    assert jwt.decode(sent, options={"verify_signature": False})["aud"] == server.url
    assert provider.stats["assertion_ok"] == 1


REFUSED: dict[str, Callable[[str], tuple[str, AuthMethod, ClientAssertion | None, str | None]]] = {
    "wrong-key": lambda url: ("ec-client", "private_key_jwt", ClientAssertion(private_jwk(OTHER_EC_KEY)), None),
    "wrong-audience": lambda url: (
        "rsa-client",
        "private_key_jwt",
        ClientAssertion(pem(RSA_KEY), audience="https://elsewhere.example/token"),
        None,
    ),
    "wrong-secret": lambda url: ("hs-client", "client_secret_jwt", None, "not-the-" + JWT_SECRET),
    "not-a-jwt-client": lambda url: ("test-client", "client_secret_jwt", None, JWT_SECRET),
    "unknown-client": lambda url: ("nobody", "private_key_jwt", ClientAssertion(pem(RSA_KEY)), None),
    "too-long-lived": lambda url: (
        "ec-client",
        "private_key_jwt",
        ClientAssertion(private_jwk(EC_KEY), lifetime=600.0),
        None,
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_the_provider_refuses_assertions_that_do_not_prove_the_client(
    case: str, provider: LocalProvider, token_url: str, driver: Driver
) -> None:
    """A wrong key or secret, another audience, a client registered for another method or not at all: 401
    invalid_client, a ConfigurationError naming the client setting, and the entry kept."""
    register(provider)
    if case == "too-long-lived":
        provider.clock = FakeClock(provider.clock.time() - 5)  # the provider's now is 5 s behind the client's
    client_id, method, assertion, secret = REFUSED[case](token_url)
    manager = manager_for(token_url, client_id, method, assertion, secret)
    login_as = client_id if client_id in provider.clients else "test-client"
    try:
        tokens = await driver.store(manager, expired(provider.login(client_id=login_as)))
        with pytest.raises(ConfigurationError) as caught:
            await driver.get_token(manager)
        assert caught.value.setting == "client"
        assert await astored(manager) == tokens
    finally:
        manager.close()
    assert provider.stats["assertion_invalid"] == 1 and provider.stats["invalid_client"] == 1
    assert provider.stats["assertion_ok"] == provider.stats["refresh_ok"] == 0


async def test_an_expired_assertion_is_refused(provider: LocalProvider, token_url: str, driver: Driver) -> None:
    """An assertion whose exp has passed on the provider's clock is refused (the client signed with its own)."""
    register(provider)
    manager = manager_for(token_url, "ec-client", "private_key_jwt", ClientAssertion(private_jwk(EC_KEY)))
    provider.clock = FakeClock(provider.clock.time() + 61)
    try:
        await driver.store(manager, expired(provider.login(client_id="ec-client")))
        with pytest.raises(ConfigurationError):
            await driver.get_token(manager)
    finally:
        manager.close()
    assert provider.stats["assertion_invalid"] == 1


@pytest.mark.parametrize(
    "change",
    [
        {"client_assertion": "not-a-jwt"},
        {"client_assertion_type": "urn:example:other"},
        {"client_secret": JWT_SECRET},
    ],
    ids=["garbage", "other-type", "with-a-secret-too"],
)
async def test_malformed_assertion_requests_are_refused(
    change: dict[str, str], provider: LocalProvider, token_url: str
) -> None:
    """Garbage in client_assertion (401 invalid_client), another assertion type or a secret beside the assertion
    (400 invalid_request): nothing is redeemed."""
    register(provider)
    tokens = provider.login(client_id="hs-client")
    assertion = ClientAssertion(JWT_SECRET, alg="HS256").sign("hs-client", token_url, provider.clock.time())
    form = {
        "grant_type": "refresh_token",
        "refresh_token": tokens.refresh_token or "",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
        **change,
    }
    async with httpx.AsyncClient() as client:
        answer = await client.post(token_url, data=form)
        with_basic = await client.post(token_url, data=form, auth=("hs-client", JWT_SECRET))
    expected = (401, "invalid_client") if "client_assertion" in change else (400, "invalid_request")
    assert (answer.status_code, answer.json()["error"]) == expected
    assert (with_basic.status_code, with_basic.json()["error"]) == (400, "invalid_request")
    assert provider.stats["refresh_ok"] == 0


def test_the_replay_table_forgets_expired_assertions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider's jti table stays bounded: once full, assertions past their exp leave it, and the live ones
    stay (a replay of one is still refused)."""
    monkeypatch.setattr(provider_module, "ASSERTION_TABLE_SIZE", 3)
    register(provider := LocalProvider())
    provider.clock = clock = FakeClock()
    assertion = ClientAssertion(JWT_SECRET, alg="HS256", lifetime=1)
    tokens = provider.login(client_id="hs-client")
    with ServerThread(provider) as server, httpx.Client() as client:
        url = server.url + "/token"

        def redeem(signed: str) -> httpx.Response:
            nonlocal tokens
            form = {
                "grant_type": "refresh_token",
                "refresh_token": tokens.refresh_token or "",
                "client_id": "hs-client",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": signed,
            }
            answer = client.post(url, data=form)
            if answer.status_code == 200:
                tokens = UpstreamTokens(access_token="x", refresh_token=answer.json()["refresh_token"])
            return answer

        for _ in range(3):
            assert redeem(assertion.sign("hs-client", url, clock.time())).status_code == 200
        clock.advance(2)  # the three are past their exp
        live = assertion.sign("hs-client", url, clock.time())
        assert redeem(live).status_code == 200  # the table was full: the expired three left it
        assert redeem(assertion.sign("hs-client", url, clock.time())).status_code == 200
        assert redeem(live).status_code == 401
    assert provider.stats["assertion_ok"] == 5 and provider.stats["assertion_replay"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"auth_method": "private_key_jwt"}, "needs client_assertion"),
        ({"auth_method": "private_key_jwt", "client_assertion": "hs"}, "needs client_assertion"),
        ({"auth_method": "client_secret_jwt"}, "needs a client_secret"),
        ({"auth_method": "client_secret_jwt", "client_assertion": "ec"}, "signs with the client secret"),
        ({"auth_method": "client_secret_basic", "client_assertion": "ec", "client_secret": "s"}, "client_assertion is"),
    ],
)
def test_the_refresher_refuses_mismatched_configurations(kwargs: dict[str, Any], message: str) -> None:
    """Each JWT method needs its kind of assertion (or secret); an assertion is refused for the other methods."""
    made = {"hs": ClientAssertion(JWT_SECRET, alg="HS256"), "ec": ClientAssertion(private_jwk(EC_KEY))}
    if "client_assertion" in kwargs:
        kwargs["client_assertion"] = made[kwargs["client_assertion"]]
    with pytest.raises(ValueError, match=message):
        OAuth2Refresher("https://as.example/token", "c", **kwargs)


def x25519_pem() -> str:
    """An X25519 private key: a key agreement key, which no JWS algorithm signs with."""
    return pem(x25519.X25519PrivateKey.generate())


@pytest.mark.parametrize(
    ("key", "kwargs", "message"),
    [
        ("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n", {}, "not an unencrypted PEM"),
        ({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}, {}, "not a usable JWK"),
        ({"kty": "nope"}, {}, "not a usable JWK"),
        ("{not json", {}, "not a usable JWK"),
        ("public", {}, "holds no private key"),
        ("ec", {"alg": "RS256"}, "cannot sign RS256"),
        ("ec", {"alg": "none"}, "alg must be one of"),
        ({"k": "v"}, {"alg": "HS256"}, "signs with the client secret"),
        ("", {"alg": "HS256"}, "signs with the client secret"),
        ("x25519", {}, "unsupported key type"),
        ("ec", {"lifetime": 0}, "lifetime must be"),
        ("ec", {"lifetime": 601}, "lifetime must be"),
    ],
)
def test_assertion_keys_are_checked_at_construction(key: Any, kwargs: dict[str, Any], message: str) -> None:
    """A key that is not a private PEM or JWK, one that does not fit alg, an unknown alg, a bad lifetime: ValueError
    at construction, never naming the key."""
    if key == "public":
        key = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    elif key == "ec":
        key = pem(EC_KEY)
    elif key == "x25519":
        key = x25519_pem()
    with pytest.raises(ValueError, match=message) as caught:
        ClientAssertion(key, **kwargs)
    assert "PRIVATE KEY" not in str(caught.value)


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
        (ec.generate_private_key(ec.SECP521R1()), "ES512"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        (RSA_KEY, "RS256"),
        (EC_KEY, "ES256"),
    ],
)
def test_the_algorithm_defaults_to_the_keys_usual_one(key: Any, alg: str) -> None:
    """Without alg, the key's type picks it; the repr shows the alg, never the key."""
    assertion = ClientAssertion(pem(key))
    assert assertion.alg == alg and not assertion.is_secret
    assert repr(assertion) == f"ClientAssertion(alg={alg!r}, key_id=None, audience=None)"
    signed = assertion.sign("c", "https://as.example/token", 1_700_000_000.0)
    assert jwt.get_unverified_header(signed)["alg"] == alg


def test_without_the_jwt_extra_the_error_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without PyJWT (or cryptography), making an assertion or a DPoP key raises ImportError naming the extra."""
    from httpx_upstream_auth import DPoP, DPoPKey

    for missing in ("jwt", "cryptography"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, missing, None)
            for make in (lambda: ClientAssertion(JWT_SECRET, alg="HS256"), DPoPKey.generate, DPoP):
                with pytest.raises(ImportError, match=r"httpx-upstream-auth\[jwt\]"):
                    make()


async def test_logout_revokes_with_an_assertion_of_its_own(provider: LocalProvider, server: ServerThread) -> None:
    """delete(revoke=True) authenticates at the revocation endpoint with a new assertion (never the refresh's): the
    provider verifies it and ends the grant; a wrong key is refused there too."""
    register(provider)
    right = OAuth2Refresher(
        server.url + "/token",
        "ec-client",
        auth_method="private_key_jwt",
        client_assertion=ClientAssertion(private_jwk(EC_KEY)),
        revocation_url=server.url + "/revoke",
    )
    wrong = OAuth2Refresher(
        server.url + "/token",
        "ec-client",
        auth_method="private_key_jwt",
        client_assertion=ClientAssertion(private_jwk(OTHER_EC_KEY)),
        revocation_url=server.url + "/revoke",
    )
    outcomes = []
    for refresher in (wrong, right):
        manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
        try:
            login = provider.login(client_id="ec-client")
            await manager.astore("s", expired(login) if refresher is right else login)
            await manager.aget_token("s")  # the right key refreshes first: the revocation's assertion is another
            outcomes.append(await manager.adelete("s", revoke=True))
        finally:
            await manager.aclose()
    assert [(o.deleted, o.revoked, o.reason, o.status_code) for o in outcomes] == [
        (True, False, "refused", 401),
        (True, True, "revoked", None),
    ]
    assert provider.revocation_stats == {"revocation_calls": 2, "revoked_grants": 1}
    stats = provider.stats
    # The right key's refresh and revocation each verified (no replay: a new assertion each); the wrong one refused.
    assert (stats["assertion_ok"], stats["assertion_replay"], stats["assertion_invalid"]) == (2, 0, 1)
