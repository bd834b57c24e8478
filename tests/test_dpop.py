"""DPoP (RFC 9449) over real HTTP: proofs on refreshes and API requests, keys carried by the entry, nonces."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from redis_servers import RedisServer
from storage_fixtures import redis_server
from support import SSL, Driver, astored, expired

import httpx_upstream_auth._dpop as dpop_module
from httpx_upstream_auth import (
    ConfigurationError,
    DPoP,
    DPoPKey,
    EncryptedStorage,
    EntryKey,
    MemoryStorage,
    OAuth2Refresher,
    ReauthenticationRequired,
    RedisStorage,
    RefreshFailed,
    SQLiteStorage,
    Storage,
    SystemClock,
    TokenManager,
    UpstreamTokens,
    is_token_rejected,
)
from httpx_upstream_auth._dpop import access_token_hash, is_nonce_challenge, is_proof_refused, jwk_thumbprint
from httpx_upstream_auth.testing import LocalProvider, ServerThread

__all__ = ["redis_server"]  # a fixture used below

pytestmark = pytest.mark.anyio

KEY = DPoPKey.generate()
OTHER_KEY = DPoPKey.generate()


@pytest.fixture
def dpop_manager(token_url: str) -> Iterator[TokenManager]:
    """A manager whose refresher uses DPoP with per-session keys."""
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret", dpop=DPoP())
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    yield manager
    manager.close()


def bound_login(provider: LocalProvider, key: DPoPKey = KEY, **kwargs: Any) -> UpstreamTokens:
    """A login whose grant is bound to ``key``, its entry carrying the key, its access token expired."""
    tokens = provider.login(dpop_jkt=key.thumbprint, **kwargs)
    return expired(attrs.evolve(tokens, dpop_key=key.to_jwk()))


def proof_claims(response: httpx.Response) -> dict[str, Any]:
    """The claims of the DPoP proof the request of ``response`` carried."""
    claims: dict[str, Any] = jwt.decode(response.request.headers["DPoP"], options={"verify_signature": False})
    return claims


async def test_a_bound_session_refreshes_and_calls_the_api_with_proofs(
    driver: Driver, provider: LocalProvider, dpop_manager: TokenManager, server: ServerThread
) -> None:
    """The refresh proves the session's key, the provider answers DPoP tokens, and API requests carry
    ``Authorization: DPoP`` with a proof naming the method, the URL without its query, and the token's hash."""
    stored = await driver.store(dpop_manager, bound_login(provider))
    fresh = await driver.get_token(dpop_manager)
    response = await driver.request(dpop_manager, "GET", "/api/me?page=2#top")
    assert response.status_code == 200
    assert fresh.token_type == "DPoP" and fresh.dpop_key == stored.dpop_key and fresh.version == stored.version + 1
    assert response.request.headers["Authorization"] == "DPoP " + fresh.access_token
    claims = proof_claims(response)
    assert (claims["htm"], claims["htu"]) == ("GET", server.url + "/api/me")
    assert claims["ath"] == access_token_hash(fresh.access_token) and "nonce" not in claims
    header = jwt.get_unverified_header(response.request.headers["DPoP"])
    assert header["typ"] == "dpop+jwt" and jwk_thumbprint(header["jwk"]) == KEY.thumbprint and "d" not in header["jwk"]
    stats = provider.stats
    assert (stats["refresh_ok"], stats["dpop_proofs_ok"], stats["api_ok"]) == (1, 2, 1)
    assert stats["dpop_proofs_invalid"] == stats["dpop_wrong_key"] == stats["api_401"] == 0


async def test_a_nonce_challenge_costs_one_retry(
    driver: Driver, provider: LocalProvider, dpop_manager: TokenManager
) -> None:
    """A token endpoint and a resource server that demand nonces: each challenge costs one more request, the
    nonce is then sent from the start, a new nonce costs one more retry, and no challenge causes a refresh."""
    provider.token_nonce, provider.api_nonce = "token-n1", "api-n1"
    await driver.store(dpop_manager, bound_login(provider))
    await driver.get_token(dpop_manager)
    assert (provider.stats["token_calls"], provider.stats["dpop_nonce_challenges"]) == (2, 1)
    first = await driver.request(dpop_manager)
    second = await driver.request(dpop_manager)
    assert first.status_code == second.status_code == 200
    assert provider.api_calls["/api/me"] == 3 and provider.stats["dpop_nonce_challenges"] == 2
    assert proof_claims(second)["nonce"] == "api-n1"
    provider.api_nonce = "api-n2"
    third = await driver.request(dpop_manager)
    assert third.status_code == 200 and proof_claims(third)["nonce"] == "api-n2"
    stats = provider.stats
    assert provider.api_calls["/api/me"] == 5 and stats["dpop_nonce_challenges"] == 3
    assert (stats["refresh_ok"], stats["token_calls"], stats["api_401"], stats["dpop_proofs_invalid"]) == (1, 2, 0, 0)


async def test_a_refresh_with_the_wrong_key_is_refused(
    driver: Driver, provider: LocalProvider, dpop_manager: TokenManager
) -> None:
    """An entry whose key is not the one the grant is bound to: the provider refuses the refresh without consuming
    the refresh token (the right key then refreshes it, no reuse), and the caller gets a typed error."""
    right = bound_login(provider)
    wrong = await driver.store(dpop_manager, attrs.evolve(right, dpop_key=OTHER_KEY.to_jwk()))
    with pytest.raises(RefreshFailed) as caught:
        await driver.get_token(dpop_manager)
    assert not caught.value.retryable and "refused the DPoP proof" in str(caught.value)
    assert not isinstance(caught.value, ConfigurationError)  # one session's fault: other sessions are not parked
    assert await astored(dpop_manager) == wrong
    assert (provider.stats["dpop_wrong_key"], provider.stats["refresh_ok"]) == (1, 0)
    await driver.store(dpop_manager, right)
    assert (await driver.get_token(dpop_manager)).dpop_key == KEY.to_jwk()
    assert (provider.stats["refresh_ok"], provider.stats["refresh_reuse"]) == (1, 0)


async def test_an_entry_without_a_key_gets_one_at_its_next_refresh(
    driver: Driver, provider: LocalProvider, dpop_manager: TokenManager
) -> None:
    """A session logged in without DPoP: its first refresh proves a new key, which the refreshed entry carries
    and the provider binds the grant to (a later refresh with another key is refused)."""
    await driver.store(dpop_manager, expired(provider.login()))
    fresh = await driver.get_token(dpop_manager)
    assert fresh.token_type == "DPoP" and fresh.dpop_key is not None
    assert (await astored(dpop_manager)) == fresh
    assert (await driver.request(dpop_manager)).status_code == 200
    await driver.store(dpop_manager, expired(attrs.evolve(fresh, dpop_key=OTHER_KEY.to_jwk())))
    with pytest.raises(RefreshFailed):
        await driver.get_token(dpop_manager)
    assert provider.stats["dpop_wrong_key"] == 1 and provider.stats["refresh_ok"] == 1


async def test_one_key_can_serve_every_session(driver: Driver, provider: LocalProvider, token_url: str) -> None:
    """DPoP(key=...): every session proves the client's key, and entries carry none."""
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret", dpop=DPoP(key=KEY))
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    try:
        for session in ("a", "b"):
            await driver.store(manager, expired(provider.login(dpop_jkt=KEY.thumbprint)), session)
            fresh = await driver.get_token(manager, session)
            assert fresh.dpop_key is None and fresh.token_type == "DPoP"
            assert (await driver.request(manager, session=session)).status_code == 200
    finally:
        manager.close()
    assert provider.stats["dpop_proofs_ok"] == 4 and provider.stats["refresh_ok"] == 2


async def test_a_token_the_api_refuses_is_refreshed_and_replayed_with_a_new_proof(
    driver: Driver, provider: LocalProvider, dpop_manager: TokenManager
) -> None:
    """A DPoP token the API refuses (a DPoP invalid_token challenge) is a rejection: one refresh, and the replay
    carries the new token with a proof of its own; a nonce given on the replay is kept for the next request."""
    await driver.store(dpop_manager, bound_login(provider))
    old = await driver.get_token(dpop_manager)
    provider.revoke_access(old.access_token)
    provider.api_nonce = "n-after"
    response = await driver.request(dpop_manager)
    assert response.status_code == 401  # the replay met the nonce challenge: no second replay
    again = await driver.request(dpop_manager)
    assert again.status_code == 200 and proof_claims(again)["nonce"] == "n-after"
    new = await driver.get_token(dpop_manager)
    assert new.access_token != old.access_token and proof_claims(again)["ath"] == access_token_hash(new.access_token)
    assert provider.stats["refresh_ok"] == 2 and provider.stats["dpop_proofs_invalid"] == 0


@pytest.mark.parametrize("async_client", [False, True], ids=["own-client", "injected-client"])
async def test_task_jobs_answer_the_token_endpoints_nonce_too(
    async_client: bool, provider: LocalProvider, token_url: str
) -> None:
    """redeem_in='task' (arefresh): the nonce challenge costs one retry there too."""
    provider.token_nonce = "t-1"
    async with httpx.AsyncClient(verify=SSL) as client:
        refresher = OAuth2Refresher(
            token_url, "test-client", "test-secret", dpop=DPoP(), async_client=client if async_client else None
        )
        manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage(), redeem_in="task")
        try:
            await manager.astore("s", bound_login(provider))
            fresh = await manager.aget_token("s")
        finally:
            await manager.aclose()
    assert fresh.token_type == "DPoP"
    assert (provider.stats["token_calls"], provider.stats["dpop_nonce_challenges"], provider.stats["refresh_ok"]) == (
        2,
        1,
        1,
    )


async def test_a_challenged_request_whose_body_cannot_be_resent_is_not_replayed(
    provider: LocalProvider, dpop_manager: TokenManager, server: ServerThread
) -> None:
    """A streamed body goes once: the caller gets the nonce challenge, and the next request carries the nonce."""
    provider.api_nonce = "n-1"
    await dpop_manager.astore("session-1", bound_login(provider))

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 10

    async with httpx.AsyncClient(auth=dpop_manager.auth("session-1"), verify=SSL) as client:
        first = await client.post(server.url + "/api/upload", content=body())
        second = await client.post(server.url + "/api/upload", content=b"y")
    assert first.status_code == 401 and second.status_code == 200
    assert provider.stats["dpop_nonce_challenges"] == 1 and provider.stats["refresh_ok"] == 1


async def test_stolen_dpop_tokens_are_refused_without_a_proof_of_their_key(
    provider: LocalProvider, dpop_manager: TokenManager, server: ServerThread
) -> None:
    """The resource server refuses a DPoP-bound token sent as Bearer, without a proof, with another key's proof,
    with a proof for another request (method, URL, token hash), a replayed proof, or a proof that is not a proof;
    and refuses the DPoP scheme for a token that is not bound."""
    await dpop_manager.astore("session-1", bound_login(provider))
    token = (await dpop_manager.aget_token("session-1")).access_token
    url = server.url + "/api/me"
    good = KEY.proof("GET", url, access_token=token)
    raw = ec.generate_private_key(ec.SECP256R1())
    public = jwt.algorithms.ECAlgorithm.to_jwk(raw.public_key(), as_dict=True)
    numeric_htu = jwt.encode(
        {"htm": "GET", "htu": 7, "iat": int(provider.clock.time()), "jti": "y"},
        raw,
        algorithm="ES256",
        headers={"typ": "dpop+jwt", "jwk": public},
    )
    private_proof = jwt.encode(
        {"htm": "GET", "htu": url, "iat": 1, "jti": "x"}, "k" * 32, algorithm="HS256", headers={"typ": "dpop+jwt"}
    )
    attempts = {
        "bearer": {"Authorization": f"Bearer {token}"},
        "no-proof": {"Authorization": f"DPoP {token}"},
        "other-key": {"Authorization": f"DPoP {token}", "DPoP": OTHER_KEY.proof("GET", url, access_token=token)},
        "method": {"Authorization": f"DPoP {token}", "DPoP": KEY.proof("POST", url, access_token=token)},
        "url": {"Authorization": f"DPoP {token}", "DPoP": KEY.proof("GET", url + "x", access_token=token)},
        "ath": {"Authorization": f"DPoP {token}", "DPoP": KEY.proof("GET", url, access_token=token + "x")},
        "no-ath": {"Authorization": f"DPoP {token}", "DPoP": KEY.proof("GET", url)},
        "old": {"Authorization": f"DPoP {token}", "DPoP": KEY.proof("GET", url, access_token=token, now=1e9)},
        "hmac": {"Authorization": f"DPoP {token}", "DPoP": private_proof},
        "garbage": {"Authorization": f"DPoP {token}", "DPoP": "not.a.jwt"},
        "array-header": {"Authorization": f"DPoP {token}", "DPoP": "W10.e30.x"},
        "numeric-htu": {"Authorization": f"DPoP {token}", "DPoP": numeric_htu},
        "unbound": {"Authorization": f"DPoP {provider.login().access_token}", "DPoP": good},
    }
    async with httpx.AsyncClient() as client:
        assert (await client.get(url, headers={"Authorization": f"DPoP {token}", "DPoP": good})).status_code == 200
        replayed = await client.get(url, headers={"Authorization": f"DPoP {token}", "DPoP": good})
        refused = {name: await client.get(url, headers=headers) for name, headers in attempts.items()}
    # A refused proof is no verdict on the token (no refresh follows it).
    assert replayed.status_code == 401 and is_proof_refused(replayed) and not is_token_rejected(replayed)
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(attempts, 401)
    assert refused["bearer"].headers["www-authenticate"].startswith("Bearer")
    assert refused["no-proof"].headers["www-authenticate"].startswith("DPoP")
    stats = provider.stats
    assert stats["dpop_wrong_key"] == 1 and stats["dpop_proofs_invalid"] == 10 and stats["api_ok"] == 1


async def test_the_token_endpoint_refuses_bad_proofs(provider: LocalProvider, token_url: str) -> None:
    """A token request whose proof is not a proof of this request is refused (400 invalid_dpop_proof), as is one
    without a proof for a bound grant; nothing is consumed (the right proof then redeems the same token)."""
    tokens = provider.login(dpop_jkt=KEY.thumbprint)
    form = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token or ""}
    auth = ("test-client", "test-secret")
    async with httpx.AsyncClient() as client:
        wrong_url = await client.post(
            token_url, data=form, auth=auth, headers={"DPoP": KEY.proof("POST", token_url + "x")}
        )
        none = await client.post(token_url, data=form, auth=auth)
        good = await client.post(token_url, data=form, auth=auth, headers={"DPoP": KEY.proof("POST", token_url)})
    assert (wrong_url.status_code, wrong_url.json()["error"]) == (400, "invalid_dpop_proof")
    assert (none.status_code, none.json()["error"]) == (400, "invalid_dpop_proof")
    assert good.status_code == 200 and good.json()["token_type"] == "DPoP"
    stats = provider.stats
    assert (stats["dpop_proofs_invalid"], stats["dpop_wrong_key"], stats["refresh_ok"]) == (1, 1, 1)


def test_the_proof_replay_table_forgets_old_proofs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider's proof-id table stays bounded: once full, proofs past the iat window leave it, recent ones
    stay (replaying one is still refused)."""
    from httpx_upstream_auth.testing import _provider as provider_module

    monkeypatch.setattr(provider_module, "PROOF_TABLE_SIZE", 2)
    provider = LocalProvider()
    tokens = provider.login(dpop_jkt=KEY.thumbprint, access_ttl=3600)
    with ServerThread(provider) as server, httpx.Client() as client:
        url = server.url + "/api/me"
        now = provider.clock.time()

        def call(proof: str) -> int:
            return client.get(url, headers={"Authorization": f"DPoP {tokens.access_token}", "DPoP": proof}).status_code

        stale = [KEY.proof("GET", url, access_token=tokens.access_token, now=now - 290) for _ in range(2)]
        assert [call(p) for p in stale] == [200, 200]
        provider.clock = type("Later", (), {"time": staticmethod(lambda: now + 20)})()  # the two are now too old
        recent = KEY.proof("GET", url, access_token=tokens.access_token, now=now + 20)
        assert call(recent) == 200  # the table was full: the two old ones left it
        assert call(KEY.proof("GET", url, access_token=tokens.access_token, now=now + 20)) == 200
        assert call(recent) == 401
    assert provider.stats["dpop_proofs_ok"] == 4 and provider.stats["dpop_proofs_invalid"] == 1


# -- the entry carries the key ----------------------------------------------------------------------------


def test_entries_carry_the_key_secretly_and_old_rows_still_read() -> None:
    """dpop_key is hidden from repr, round-trips through JSON, and a stored row written before it existed reads
    (without a key)."""
    tokens = attrs.evolve(UpstreamTokens(access_token="at-1"), dpop_key=KEY.to_jwk())
    assert KEY.to_jwk() not in repr(tokens) and "dpop_key='<hidden>'" in repr(tokens)
    assert UpstreamTokens.from_json(tokens.to_json()) == tokens
    old = tokens.to_dict()
    del old["dpop_key"]
    assert UpstreamTokens.from_dict(old).dpop_key is None
    with pytest.raises(ValueError, match="dpop_key must be a string"):
        UpstreamTokens.from_dict({**old, "dpop_key": 7})


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_sqlite_and_redis_keep_the_key_with_the_entry(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Another storage object (another process's view) reads the entry back with its key."""
    key = EntryKey("local", "s")
    tokens = UpstreamTokens(access_token="at-1", token_type="DPoP", dpop_key=KEY.to_jwk(), version=1)
    writer: Storage
    reader: Storage
    if backend == "sqlite":
        writer, reader = SQLiteStorage(str(tmp_path / "t.db")), SQLiteStorage(str(tmp_path / "t.db"))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"dpop-{id(tmp_path)}"
        writer = RedisStorage.from_url(server.url, prefix=prefix)
        reader = RedisStorage.from_url(server.url, prefix=prefix)
    try:
        assert writer.put(key, tokens, expected_version=None)
        assert reader.get(key) == tokens
    finally:
        writer.close()
        reader.close()


# -- keys, proofs and the configuration --------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "RS256", "PS256", "EdDSA"])
def test_keys_of_every_algorithm_sign_proofs_that_verify(alg: str) -> None:
    """A generated key's proof verifies with the public JWK in its header; to_jwk/load round-trips the key."""
    key = DPoPKey.generate(alg)
    proof = key.proof("post", "https://api.example/x?y=1", access_token="at", nonce="n", now=1_700_000_000)
    header = jwt.get_unverified_header(proof)
    public = jwt.PyJWK(header["jwk"], algorithm=alg).key
    claims = jwt.decode(proof, public, algorithms=[alg])
    assert claims["htm"] == "POST" and claims["htu"] == "https://api.example/x" and claims["nonce"] == "n"
    assert claims["iat"] == 1_700_000_000 and claims["ath"] == access_token_hash("at")
    again = DPoPKey.load(key.to_jwk())
    assert (again.alg, again.thumbprint) == (alg, key.thumbprint)
    assert repr(key) == f"DPoPKey(alg={alg!r}, thumbprint={key.thumbprint!r})"


def test_keys_load_from_pem_and_are_checked() -> None:
    """A PEM loads with the key's usual alg; an unsupported alg, a key that does not fit it, a symmetric alg: errors."""
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert DPoPKey.load(pem).alg == "ES256"
    with pytest.raises(ValueError, match="cannot sign RS256"):
        DPoPKey.load(pem, alg="RS256")
    with pytest.raises(ValueError, match="asymmetric alg"):
        DPoPKey(private, "HS256")
    for alg in ("ES256K", "HS256", "none"):
        with pytest.raises(ValueError, match="unsupported DPoP alg"):
            DPoPKey.generate(alg)
    with pytest.raises(ValueError, match="unsupported DPoP alg"):
        DPoP(alg="HS256")
    with pytest.raises(ValueError, match="max_nonces"):
        DPoP(max_nonces=0)


def test_the_thumbprint_is_rfc_7638s() -> None:
    """The RFC 7638 section 3.1 example key has the RFC's thumbprint; unknown key types are refused."""
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMs"
        "tn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajr"
        "n1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    assert jwk_thumbprint({"kty": "RSA", "e": "AQAB", "n": n, "alg": "RS256"}) == (
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    )
    with pytest.raises(ValueError, match="unsupported JWK key type"):
        jwk_thumbprint({"kty": "oct", "k": "AA"})


def test_nonces_are_kept_per_origin_and_role_in_a_bounded_table() -> None:
    """Each origin and role has its own nonce; past max_nonces the least recently used is dropped."""
    dpop = DPoP(max_nonces=2)
    dpop.remember("https://a.example/token", "token", "a-token")
    dpop.remember("https://A.example:443/x", "resource", "a-api")
    dpop.remember("https://a.example/other", "token", None)  # no nonce given: the one kept stays
    assert dpop.nonce("https://a.example/anything", "token") == "a-token"
    assert dpop.nonce("https://a.example:443/y", "resource") == "a-api"
    dpop.remember("https://b.example/", "resource", "b-api")
    assert dpop.nonce("https://a.example/", "token") is None  # the least recently used left
    assert dpop.nonce("https://b.example/z", "resource") == "b-api"
    assert repr(dpop) == "DPoP(alg='ES256', key=None)"


def test_parsed_session_keys_are_cached_in_a_bounded_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key of an entry is parsed once and reused; past the cache size the oldest is dropped (and parsed
    again when needed), so a gateway with many sessions holds a bounded number of keys."""
    monkeypatch.setattr(dpop_module, "KEY_CACHE_SIZE", 1)
    dpop = DPoP()
    first = UpstreamTokens(access_token="a", dpop_key=KEY.to_jwk())
    second = UpstreamTokens(access_token="b", dpop_key=OTHER_KEY.to_jwk())
    found = dpop.key_for(first)
    assert found is not None and found is dpop.key_for(first)
    assert dpop.key_for(second) is not None
    again = dpop.key_for(first)
    assert again is not found and again is not None and again.thumbprint == KEY.thumbprint
    assert dpop.key_for(UpstreamTokens(access_token="c")) is None


def test_unusable_dpop_entries_are_refused() -> None:
    """An entry whose stored key cannot be read needs a new login (ReauthenticationRequired, a fault of that session
    alone); a DPoP token without any key is a ConfigurationError naming dpop."""
    dpop = DPoP()
    with pytest.raises(ReauthenticationRequired, match="dpop_key"):
        dpop.key_for(UpstreamTokens(access_token="a", dpop_key='{"kty":"EC"}'))
    request = httpx.Request("GET", "https://api.example/")
    with pytest.raises(ConfigurationError, match="no DPoP key") as keyless:
        dpop.authorize(request, UpstreamTokens(access_token="a", token_type="DPoP"), 1_700_000_000)
    assert keyless.value.setting == "dpop"
    request.headers["DPoP"] = "stale"
    dpop.authorize(request, UpstreamTokens(access_token="a"), 1_700_000_000)  # a Bearer token: no proof
    assert request.headers["Authorization"] == "Bearer a" and "DPoP" not in request.headers


@pytest.mark.parametrize(
    ("status", "headers", "body", "expected"),
    [
        (401, {"www-authenticate": 'DPoP error="use_dpop_nonce"'}, None, True),
        (401, {"www-authenticate": 'DPoP error="invalid_token"'}, None, False),
        (400, {}, b'{"error":"use_dpop_nonce"}', True),
        (400, {}, b'{"error":"invalid_grant"}', False),
        (400, {}, b"<html>", False),
        (400, {}, b"[1]", False),
        (400, {}, None, False),
        (200, {}, b'{"error":"use_dpop_nonce"}', False),
    ],
)
def test_nonce_challenges_are_recognised(
    status: int, headers: dict[str, str], body: bytes | None, expected: bool
) -> None:
    """A token endpoint's 400 use_dpop_nonce and a resource server's 401 DPoP use_dpop_nonce are challenges."""
    assert is_nonce_challenge(status, httpx.Headers(headers), body) is expected
    assert is_nonce_challenge(status, None, body) is (expected and status == 400)


@pytest.mark.parametrize(
    ("challenge", "rejected"),
    [
        ('DPoP error="invalid_token"', True),
        ('DPoP algs="ES256"', True),
        ('Basic realm="x", DPoP error="invalid_token"', True),
        ('DPoP error="use_dpop_nonce"', False),
        ('Bearer error="invalid_token", DPoP error="use_dpop_nonce"', False),
        ('DPoP error="invalid_dpop_proof"', False),
        ('Bearer error="invalid_token"', True),
        ('Basic realm="x"', False),
    ],
)
def test_a_nonce_challenge_is_no_token_rejection(challenge: str, rejected: bool) -> None:
    """A DPoP challenge rejects the token unless it asks for a nonce (RFC 9449 section 9) or refuses the proof."""
    response = httpx.Response(401, headers={"WWW-Authenticate": challenge})
    assert is_token_rejected(response) is rejected


def test_the_thumbprint_of_a_stored_key_is_the_providers_jkt() -> None:
    """The key a stored entry carries (JWK JSON, with its alg) is the key whose thumbprint binds the grant."""
    data = json.loads(KEY.to_jwk())
    assert data["alg"] == "ES256" and "d" in data
    assert jwk_thumbprint(data) == KEY.thumbprint


def test_a_key_made_for_a_keyless_entry_is_proven_again_by_a_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two refresh attempts with one refresh token (a retry after a lost answer) prove the same new key; another
    refresh token gets another key; the table of new keys is bounded."""
    monkeypatch.setattr(dpop_module, "NEW_KEYS_SIZE", 1)
    dpop = DPoP()
    first = UpstreamTokens(access_token="a", refresh_token="rt-1")
    key, new = dpop.key_for_refresh(first)
    again, new_again = dpop.key_for_refresh(first)
    assert new and new_again and again is key
    other, _ = dpop.key_for_refresh(UpstreamTokens(access_token="a", refresh_token="rt-2"))
    assert other.thumbprint != key.thumbprint
    assert dpop.key_for_refresh(first)[0].thumbprint != key.thumbprint  # dropped: the table held one
    bound = attrs.evolve(first, dpop_key=KEY.to_jwk())
    assert dpop.key_for_refresh(bound)[0].thumbprint == KEY.thumbprint and not dpop.key_for_refresh(bound)[1]


async def test_a_lost_answer_retried_within_grace_proves_the_key_the_provider_bound(
    driver: Driver, provider: LocalProvider, token_url: str
) -> None:
    """A keyless entry's first DPoP refresh is redeemed (binding the grant to the new key) but its answer is lost:
    the retry within reuse_grace proves the same key, and the provider honours it."""
    provider.reuse_grace = 5.0
    # A retry may take the refresher's timeout to arrive: 1 s, well within the 5-s grace.
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret", dpop=DPoP(), timeout=1.0)
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage(), reuse_grace=5.0)
    provider.fail_next("redeem_then:502")
    try:
        await driver.store(manager, expired(provider.login()))
        fresh = await driver.get_token(manager)
        assert (await driver.request(manager)).status_code == 200
    finally:
        manager.close()
    stats = provider.stats
    assert (stats["grace_reuse"], stats["dpop_wrong_key"], stats["refresh_reuse"]) == (1, 0, 0)
    assert fresh.dpop_key is not None and fresh.token_type == "DPoP"


def test_a_forked_child_signs_and_keeps_nonces() -> None:
    """After fork(), the child's DPoP configuration works (its lock is its own)."""
    if not hasattr(os, "fork"):
        pytest.skip("needs fork()")
    dpop = DPoP()
    dpop.remember("https://api.example/", "resource", "n-parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            dpop.remember("https://api.example/", "resource", "n-child")
            request = httpx.Request("GET", "https://api.example/x")
            dpop.authorize(
                request, attrs.evolve(UpstreamTokens(access_token="a", token_type="DPoP"), dpop_key=KEY.to_jwk()), 1.7e9
            )
            message = f"{dpop.nonce('https://api.example/', 'resource')} {proof_claims_of(request)['nonce']}"
        except BaseException as exc:
            message = f"error: {type(exc).__name__}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    answer = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == "n-child n-child"
    assert dpop.nonce("https://api.example/", "resource") == "n-parent"


def proof_claims_of(request: httpx.Request) -> dict[str, Any]:
    """The claims of the DPoP proof ``request`` carries."""
    claims: dict[str, Any] = jwt.decode(request.headers["DPoP"], options={"verify_signature": False})
    return claims


async def test_a_code_exchange_with_a_proof_binds_the_grant(provider: LocalProvider, server: ServerThread) -> None:
    """The local provider's authorization_code grant binds the grant to the proof's key: DPoP tokens, whose
    refresh without that key is refused."""
    verifier = "v" * 43
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect_uri = "http://127.0.0.1:1/callback"
    query = {
        "response_type": "code",
        "client_id": "test-client",
        "redirect_uri": redirect_uri,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    token_url = server.url + "/token"
    async with httpx.AsyncClient() as client:
        authorized = await client.get(server.url + "/authorize", params=query)
        code = parse_qs(urlsplit(authorized.headers["location"]).query)["code"][0]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        answer = await client.post(
            token_url, data=form, auth=("test-client", "test-secret"), headers={"DPoP": KEY.proof("POST", token_url)}
        )
        refresh = {"grant_type": "refresh_token", "refresh_token": answer.json()["refresh_token"]}
        other = await client.post(
            token_url,
            data=refresh,
            auth=("test-client", "test-secret"),
            headers={"DPoP": OTHER_KEY.proof("POST", token_url)},
        )
    assert answer.json()["token_type"] == "DPoP"
    assert (other.status_code, other.json()["error"]) == (400, "invalid_dpop_proof")
    assert provider.stats["dpop_wrong_key"] == 1


def test_an_encrypting_storage_seals_the_key(tmp_path: Path) -> None:
    """With EncryptedStorage the DPoP private key is sealed with the tokens: the SQLite file holds none of it, and
    the entry reads back whole."""
    path = tmp_path / "t.db"
    storage = EncryptedStorage(SQLiteStorage(str(path)), [bytes(range(32))])
    tokens = UpstreamTokens(access_token="at-1", token_type="DPoP", dpop_key=KEY.to_jwk(), version=1)
    try:
        assert storage.put(EntryKey("local", "s"), tokens, expected_version=None)
        assert storage.get(EntryKey("local", "s")) == tokens
    finally:
        storage.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    private = json.loads(KEY.to_jwk())["d"]
    assert private.encode() not in raw and b"at-1" not in raw


class NonceDemandingElsewhere:
    """Another origin, reached by a redirect: it answers every request with a DPoP nonce challenge."""

    def __init__(self) -> None:
        self.proofs = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.proofs += any(name == b"dpop" for name, _ in scope["headers"])
        headers = [
            (b"www-authenticate", b'DPoP error="use_dpop_nonce"'),
            (b"dpop-nonce", b"nonce-of-another-origin"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


class RedirectingAPI:
    """The API: ``/elsewhere`` redirects to ``target``, anything else answers 200 and keeps the proof's claims."""

    def __init__(self) -> None:
        self.target = ""
        self.claims: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        proof = dict(scope["headers"]).get(b"dpop")
        if proof is not None:
            self.claims.append(jwt.decode(proof, options={"verify_signature": False}))
        moved = scope["path"] == "/elsewhere"
        headers = [(b"location", self.target.encode())] if moved else []
        await send({"type": "http.response.start", "status": 302 if moved else 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


async def test_a_nonce_challenge_from_another_origin_after_a_redirect_is_not_ours(
    provider: LocalProvider, dpop_manager: TokenManager, caplog: pytest.LogCaptureFixture
) -> None:
    """The API redirects to another origin, which demands a nonce: its 401 is returned as it is (no replay to
    it), and its nonce is not kept for the API's origin (the next proof to the API carries none). The proof
    reached that origin (an ``auth=`` flow does not see the client's hops: the documented limit), and a warning
    says so, naming the transport that avoids it."""
    caplog.set_level(logging.DEBUG, logger="httpx_upstream_auth")
    await dpop_manager.astore("s", attrs.evolve(provider.login(dpop_jkt=KEY.thumbprint), dpop_key=KEY.to_jwk()))
    elsewhere, api = NonceDemandingElsewhere(), RedirectingAPI()
    async with ServerThread(elsewhere) as other, ServerThread(api) as served:
        api.target = other.url + "/x"
        async with httpx.AsyncClient(auth=dpop_manager.auth("s"), follow_redirects=True, verify=SSL) as client:
            assert (await client.get(served.url + "/elsewhere")).status_code == 401
            assert (await client.get(served.url + "/ok")).status_code == 200
            api.target = served.url + "/ok"  # a redirect within the origin: no warning
            assert (await client.get(served.url + "/elsewhere")).status_code == 200
    assert elsewhere.proofs == 1 and len(api.claims) == 4
    assert "nonce" not in api.claims[1]
    assert provider.stats["token_calls"] == 0
    (warning,) = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert "UpstreamAuthTransport" in warning.getMessage() and other.url in warning.getMessage()


async def test_a_keyless_entry_whose_grant_another_process_bound_asks_for_a_login(
    provider: LocalProvider, dpop_manager: TokenManager, token_url: str
) -> None:
    """Another process made a key for a keyless entry, its refresh was redeemed (the grant is now bound to that
    key) and it died before saving. This process's own new key is refused: the user is asked to log in, and the
    consumed refresh token is never presented again (no reuse, no stuck session failing for ever)."""
    entry = await dpop_manager.astore("s", expired(provider.login()))
    elsewhere = OAuth2Refresher(token_url, "test-client", "test-secret", dpop=DPoP())
    lost = await elsewhere.arefresh(entry, SystemClock())  # redeemed; its result never reaches the store
    assert lost.dpop_key is not None and provider.stats["refresh_ok"] == 1
    with pytest.raises(ReauthenticationRequired, match="bound to another key"):
        await dpop_manager.aget_token("s")
    with pytest.raises(ReauthenticationRequired):
        await dpop_manager.aget_token("s")
    stats = provider.stats
    assert (stats["token_calls"], stats["refresh_reuse"], stats["dpop_wrong_key"]) == (2, 0, 1)
