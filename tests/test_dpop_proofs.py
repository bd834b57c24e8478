"""Proofs the API refuses, redirects under ``auth=``, userinfo in URLs, and damaged sealed entries (issue 18's
security review: F1-F4, F6), over real HTTP against the local provider."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import anyio.to_thread
import attrs
import httpx
import jwt
import pytest

from httpx_upstream_auth import (
    DPoP,
    DPoPKey,
    EncryptedStorage,
    EncryptionKey,
    EntryKey,
    EntryRefused,
    MemoryStorage,
    OAuth2Refresher,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth.testing import LocalProvider, ServerThread

pytestmark = pytest.mark.anyio

KEY = DPoPKey.generate()
OTHER_KEY = DPoPKey.generate()


class Events:
    """The names and fields of the events a manager emits."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: Any) -> None:
        self.seen.append((event.name, dict(event.fields)))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [fields for seen, fields in self.seen if seen == name]


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def manager(token_url: str, events: Events) -> Iterator[TokenManager]:
    """A DPoP manager (per-session keys) that records its events."""
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret", dpop=DPoP())
    made = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage(), on_event=events)
    yield made
    made.close()


class MovedPaths:
    """The provider's API behind a proxy that answers ``307 Location: /api/...`` for ``/old/api/...``: a path the
    API moved within its origin. It keeps every proof each hop carried."""

    def __init__(self, provider: LocalProvider) -> None:
        self.provider = provider
        self.hops: list[tuple[str, str | None]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            proof = dict(scope["headers"]).get(b"dpop")
            self.hops.append((scope["path"], None if proof is None else proof.decode()))
            if scope["path"].startswith("/old/"):
                location = scope["path"][len("/old") :].encode()
                await send({"type": "http.response.start", "status": 307, "headers": [(b"location", location)]})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.provider(scope, receive, send)


def claims(proof: str | None) -> dict[str, Any]:
    assert proof is not None
    decoded: dict[str, Any] = jwt.decode(proof, options={"verify_signature": False})
    return decoded


async def send(mode: str, manager: TokenManager, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request through an ``auth=`` client that follows redirects, sync (in a thread) or async."""
    if mode == "async":
        async with httpx.AsyncClient(auth=manager.auth("s"), follow_redirects=True) as client:
            return await client.request(method, url, **kwargs)

    def run() -> httpx.Response:
        with httpx.Client(auth=manager.auth("s"), follow_redirects=True) as client:
            return client.request(method, url, **kwargs)

    return await anyio.to_thread.run_sync(run)


@pytest.mark.parametrize("flavour", ["async", "sync"])
@pytest.mark.parametrize("nonce", [None, "api-n1"])
async def test_a_redirect_within_the_origin_under_auth_replays_once_with_a_fresh_proof(
    flavour: str, nonce: str | None, provider: LocalProvider, manager: TokenManager, events: Events
) -> None:
    """httpx sends the proof signed for ``/old/api/me`` again on the hop to ``/api/me``, where the API refuses
    it (its htu names the old URL). The flow replays that hop once with a proof of its own (the server's nonce
    in it when it asked for one), and the request succeeds: no refresh, no distrust, no refusal reported, and
    the proof the API accepted was presented once."""
    provider.api_nonce = nonce
    await manager.astore("s", attrs.evolve(provider.login(dpop_jkt=KEY.thumbprint), dpop_key=KEY.to_jwk()))
    moved = MovedPaths(provider)
    async with ServerThread(moved) as server:
        for _ in range(2):
            response = await send(flavour, manager, "GET", server.url + "/old/api/me")
            assert response.status_code == 200
            accepted = claims(response.request.headers["DPoP"])
            assert (accepted["htm"], accepted["htu"]) == ("GET", server.url + "/api/me")
            assert [claims(proof)["jti"] for _, proof in moved.hops].count(accepted["jti"]) == 1
    stats = provider.stats
    assert (stats["token_calls"], stats["api_ok"]) == (0, 2)
    # One refused hop per request, and with a nonce, one challenge to the first request's fresh proof.
    assert (stats["dpop_proofs_invalid"], stats["dpop_nonce_challenges"]) == (2, int(nonce is not None))
    assert not events.named("distrusted") and not events.named("replayed") and not events.named("dpop.proof_refused")
    assert len(moved.hops) == 6 + int(nonce is not None)


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_a_refused_proof_is_no_verdict_on_the_token(
    flavour: str, provider: LocalProvider, manager: TokenManager, events: Events, server: ServerThread
) -> None:
    """The API refuses the proof (the entry's key is not the one the token is bound to): the 401 goes back
    as it is, with neither a refresh nor a replay nor a distrust, and an event says the proof was refused."""
    await manager.astore("s", attrs.evolve(provider.login(dpop_jkt=KEY.thumbprint), dpop_key=OTHER_KEY.to_jwk()))
    for _ in range(2):
        response = await send(flavour, manager, "GET", server.url + "/api/me")
        assert response.status_code == 401 and "invalid_dpop_proof" in response.headers["www-authenticate"]
    assert (provider.stats["token_calls"], provider.stats["dpop_wrong_key"]) == (0, 2)
    assert events.named("dpop.proof_refused") == [{"origin": server.url, "redirected": False}] * 2
    assert not events.named("replayed") and not events.named("distrusted")


async def test_userinfo_never_reaches_a_proof_nor_the_nonce_table(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """A request URL with ``user:password@``: its proof's htu names scheme, host, port and path only (the API
    accepts it), and the nonce the API gave is the origin's, used by the next request without the userinfo."""
    provider.api_nonce = "api-n1"
    await manager.astore("s", attrs.evolve(provider.login(dpop_jkt=KEY.thumbprint), dpop_key=KEY.to_jwk()))
    with_userinfo = server.url.replace("http://", "http://svc:Pa55w0rd@") + "/api/me"
    first = await send("async", manager, "GET", with_userinfo)
    second = await send("async", manager, "GET", server.url + "/api/me")
    assert first.status_code == second.status_code == 200
    assert claims(first.request.headers["DPoP"])["htu"] == server.url + "/api/me"
    assert "Pa55w0rd" not in first.request.headers["DPoP"]
    stats = provider.stats
    assert (stats["dpop_nonce_challenges"], stats["dpop_proofs_invalid"], stats["token_calls"]) == (1, 0, 0)


def test_a_token_url_with_userinfo_is_refused(token_url: str) -> None:
    """Credentials in the token URL would be signed into every token request's proof: refused, unrepeated."""
    with pytest.raises(ValueError, match="must not carry credentials") as refused:
        OAuth2Refresher(token_url.replace("http://", "http://u:Pa55w0rd@"), "c", "s", dpop=DPoP())
    assert "Pa55w0rd" not in str(refused.value)
    with pytest.raises(ValueError, match="revocation_url must not carry credentials"):
        OAuth2Refresher(token_url, "c", "s", revocation_url=token_url.replace("http://", "http://u:p@"))


ENTRY = EntryKey("local", "s")


def sealed_entry(storage: EncryptedStorage) -> UpstreamTokens:
    tokens = UpstreamTokens(access_token="at-1", refresh_token="rt-1", expires_at=None, provider_id="local")
    storage.put(ENTRY, tokens, expected_version=None)
    stored = storage.inner.get(ENTRY)
    assert stored is not None
    return stored


@pytest.mark.parametrize("allow_plaintext", [False, True])
@pytest.mark.parametrize(
    "garble",
    [
        lambda text: text.replace("hua-aesgcm-1.", "hua-aesgcm-1_", 1),
        lambda text: text.replace("hua", "HUA", 1),
        lambda text: text.replace("hua-aesgcm-1.", "hub-aesgcm-1.", 1),
        lambda text: text[: len("hua-aesgcm-1")],
        lambda text: text[1:],
    ],
    ids=["separator", "case", "one-letter", "marker-only", "first-byte-lost"],
)
def test_a_damaged_seal_is_refused_as_malformed_never_read_as_plaintext(allow_plaintext: bool, garble: Any) -> None:
    """A sealed value whose marker got damaged is refused as ``malformed`` (delete it, log in again), with or
    without ``allow_plaintext``, and ``reencrypt()`` does not seal it anew; a real plaintext entry still migrates."""
    storage = EncryptedStorage(MemoryStorage(), [EncryptionKey.generate("k1")], allow_plaintext=allow_plaintext)
    stored = sealed_entry(storage)
    damaged = attrs.evolve(stored, access_token=garble(stored.access_token))
    storage.inner.put(ENTRY, damaged, expected_version=stored.version)
    with pytest.raises(EntryRefused, match="format marker is damaged") as refused:
        storage.get(ENTRY)
    assert refused.value.reason == "malformed"
    assert storage.reencrypt([ENTRY]).refused == 1
    plain = EntryKey("local", "plain")
    storage.inner.put(
        plain,
        UpstreamTokens(access_token="eyJhbGciOi.plain", refresh_token="rt", expires_at=None),
        expected_version=None,
    )
    assert storage.reencrypt([plain]).rewritten == int(allow_plaintext)


def test_a_wrong_key_under_the_right_id_is_named_as_a_possible_cause() -> None:
    """A key configured as ``k1`` that did not seal the entry: the refusal names that cause first."""
    stored = sealed_entry(EncryptedStorage(MemoryStorage(), [EncryptionKey.generate("k1")]))
    other = EncryptedStorage(MemoryStorage(), [EncryptionKey(os.urandom(32), "k1")])
    other.inner.put(ENTRY, stored, expected_version=None)
    with pytest.raises(EntryRefused, match="the key configured as 'k1' is not the one that sealed it") as refused:
        other.get(ENTRY)
    assert refused.value.reason == "unauthentic"


class RefusesThenBreaksTheProof:
    """The provider's API behind a proxy that refuses the first request's token (``invalid_token``) and garbles
    the proof of every later one, so the provider refuses that proof (``invalid_dpop_proof``)."""

    def __init__(self, provider: LocalProvider) -> None:
        self.provider = provider
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/api/me":
            self.calls += 1
            if self.calls == 1:
                headers = [(b"www-authenticate", b'DPoP error="invalid_token"')]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
            garbled = [(name, b"not.a.proof" if name == b"dpop" else value) for name, value in scope["headers"]]
            scope = {**scope, "headers": garbled}
        await self.provider(scope, receive, send)


async def test_a_refused_proof_on_the_replay_after_a_refresh_is_no_distrust(
    provider: LocalProvider, manager: TokenManager, events: Events
) -> None:
    """The API rejects the token: one refresh, one replay. It refuses the replay's proof: the 401 goes back, an
    event says the proof was refused, and the new token is not distrusted (the next request uses it at once)."""
    await manager.astore("s", attrs.evolve(provider.login(dpop_jkt=KEY.thumbprint), dpop_key=KEY.to_jwk()))
    proxy = RefusesThenBreaksTheProof(provider)
    async with ServerThread(proxy) as server:
        response = await send("async", manager, "GET", server.url + "/api/me")
        assert response.status_code == 401 and "invalid_dpop_proof" in response.headers["www-authenticate"]
        assert await send("async", manager, "GET", server.url + "/api/me") is not None
    assert (provider.stats["refresh_ok"], provider.stats["dpop_proofs_invalid"], proxy.calls) == (1, 2, 3)
    assert len(events.named("replayed")) == 1 and not events.named("distrusted")
    assert events.named("dpop.proof_refused") == [{"origin": server.url, "redirected": False}] * 2


def test_an_ipv6_origin_keeps_its_brackets_and_loses_its_userinfo() -> None:
    """``htu`` and the nonce table's origin for an IPv6 literal: brackets kept, userinfo and case dropped."""
    dpop = DPoP(key=KEY)
    dpop.remember("http://u:p@[::1]:8080/a", "resource", "n1")
    assert dpop.nonce("HTTP://[::1]:8080/b", "resource") == "n1"
    assert claims(KEY.proof("GET", "http://u:p@[::1]:8080/a?q=1"))["htu"] == "http://[::1]:8080/a"
