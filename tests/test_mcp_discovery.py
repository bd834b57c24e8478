"""Discovery of the token endpoint from an MCP server URL: RFC 9728, then RFC 8414 / OpenID, path-aware."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

pytest.importorskip("mcp", reason="the MCP SDK is not installed")

import mcp_fixtures

from httpx_upstream_auth import (
    ClientAssertion,
    DPoP,
    DPoPKey,
    EntryKey,
    MemoryStorage,
    ReauthenticationRequired,
    RefreshFailed,
    SQLiteStorage,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth.mcp import (
    DiscoveringRefresher,
    DiscoveryFailed,
    adiscover,
    authorization_server_metadata_urls,
    discover,
    protected_resource_metadata_urls,
    resource_metadata_from_challenge,
)
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider, ServerThread

# The shared fixtures, served for this module's own ``provider``.
mcp_server = mcp_fixtures.mcp_server
provider_server = mcp_fixtures.provider_server

ISSUER_PATH = "/tenants/acme"


@pytest.fixture
def provider() -> LocalProvider:
    """A provider whose authorization server lives under a path; ``/token`` at its root answers 404."""
    return LocalProvider(access_ttl=60, issuer_path=ISSUER_PATH)


def expired(tokens: UpstreamTokens) -> UpstreamTokens:
    """The same grant, as if its access token had expired."""
    return attrs.evolve(tokens, expires_at=time.time() - 1, issued_at=time.time() - 61)


def test_well_known_urls_are_path_aware() -> None:
    """Metadata URLs insert the path after the well-known prefix (RFC 8414 / 9728), then OpenID forms."""
    assert protected_resource_metadata_urls("https://a.example/v1/mcp") == [
        "https://a.example/.well-known/oauth-protected-resource/v1/mcp",
        "https://a.example/.well-known/oauth-protected-resource",
    ]
    challenge = 'Bearer error="invalid_token", resource_metadata="https://a.example/prm"'
    assert resource_metadata_from_challenge(challenge) == "https://a.example/prm"
    assert protected_resource_metadata_urls("https://a.example/mcp", challenge)[0] == "https://a.example/prm"
    assert authorization_server_metadata_urls("https://id.example/tenants/acme") == [
        "https://id.example/.well-known/oauth-authorization-server/tenants/acme",
        "https://id.example/.well-known/openid-configuration/tenants/acme",
        "https://id.example/tenants/acme/.well-known/openid-configuration",
    ]
    assert authorization_server_metadata_urls("https://id.example") == [
        "https://id.example/.well-known/oauth-authorization-server",
        "https://id.example/.well-known/openid-configuration",
    ]


@pytest.mark.anyio
async def test_discovery_against_the_real_mcp_server(provider_server: ServerThread, mcp_server: LocalMCPServer) -> None:
    """From the MCP URL alone: the server's RFC 9728 metadata, then the issuer's metadata under its path."""
    found = await adiscover(mcp_server.url)
    issuer = provider_server.url + ISSUER_PATH
    assert (found.issuer, found.token_endpoint) == (issuer, issuer + "/token")
    assert found.resource == mcp_server.url
    assert found.registration_endpoint == issuer + "/register"
    async with httpx.AsyncClient() as client:  # a guess at {origin}/token fails
        assert (await client.post(provider_server.url + "/token")).status_code == 404


def test_discovery_from_the_401_challenge(provider_server: ServerThread, mcp_server: LocalMCPServer) -> None:
    """The resource_metadata URL of the server's 401 challenge leads to the same token endpoint (sync twin)."""
    challenge = httpx.post(mcp_server.url, json={}).headers["www-authenticate"]
    assert resource_metadata_from_challenge(challenge) is not None
    found = discover(mcp_server.url, www_authenticate=challenge)
    assert found.token_endpoint == provider_server.url + ISSUER_PATH + "/token"


@pytest.mark.anyio
async def test_refresh_through_discovery_sends_resource_and_is_stored(
    tmp_path: Path, provider: LocalProvider, mcp_server: LocalMCPServer
) -> None:
    """The refresher discovers once, refreshes at the discovered endpoint with ``resource`` (RFC 8707), and a
    restart (a new manager over the same SQLite file) refreshes without discovering again."""
    path = tmp_path / "tokens.db"
    storage = SQLiteStorage(path)
    first = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret", storage=storage)
    manager = TokenManager(refresher=first, provider_id="local", storage=storage)
    try:
        await manager.astore("s", expired(provider.login()))
        await manager.aget_token("s")
    finally:
        await manager.aclose()
    assert first.discoveries == 1 and provider.stats["refresh_ok"] == 1
    assert provider.requests[-1]["form"]["resource"] == mcp_server.url
    metadata_requests = provider.flow_stats["metadata_requests"]

    storage = SQLiteStorage(path)
    again = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret", storage=storage)
    restarted = TokenManager(refresher=again, provider_id="local", storage=storage)
    try:
        await restarted.astore("s", expired(await restarted.aget_token("s")))
        await restarted.aget_token("s")
    finally:
        await restarted.aclose()
    assert again.discoveries == 0 and provider.stats["refresh_ok"] == 2
    assert provider.flow_stats["metadata_requests"] == metadata_requests
    assert again.token_url == first.token_url


@pytest.mark.anyio
async def test_a_dpop_bound_session_refreshes_through_discovery(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """``dpop=`` reaches the refresher discovery builds: the refresh at the discovered token endpoint proves the
    session's key (the provider refuses a bound grant's refresh without it), the answer is DPoP-bound, and the
    manager's auth flow sends API requests with proofs of the same key."""
    key = DPoPKey.generate()
    refresher = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret", dpop=DPoP())
    assert refresher.dpop is not None
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    try:
        bound = provider.login(dpop_jkt=key.thumbprint)
        await manager.astore("s", expired(attrs.evolve(bound, dpop_key=key.to_jwk())))
        fresh = await manager.aget_token("s")
        async with httpx.AsyncClient(auth=manager.auth("s")) as client:
            answer = await client.get(provider_server.url + "/api/me")
    finally:
        await manager.aclose()
    assert fresh.token_type == "DPoP" and fresh.dpop_key == key.to_jwk()
    assert answer.status_code == 200 and answer.request.headers["Authorization"] == "DPoP " + fresh.access_token
    assert provider.requests[-1]["form"]["resource"] == mcp_server.url
    stats = provider.stats
    assert (stats["refresh_ok"], stats["api_ok"], stats["dpop_proofs_ok"]) == (1, 1, 2)
    assert stats["dpop_proofs_invalid"] == stats["dpop_wrong_key"] == 0


@pytest.mark.anyio
async def test_private_key_jwt_through_discovery(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """``client_assertion=`` reaches the refresher discovery builds: the provider verifies a signed assertion whose
    ``aud`` is the discovered token endpoint, and a second refresh signs a new one (no ``jti`` twice)."""
    private = ec.generate_private_key(ec.SECP256R1())
    provider.clients["jwt-client"] = (None, "private_key_jwt")
    provider.client_keys["jwt-client"] = private.public_key()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    refresher = DiscoveringRefresher(
        mcp_server.url, "jwt-client", auth_method="private_key_jwt", client_assertion=ClientAssertion(pem)
    )
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    try:
        await manager.astore("s", expired(provider.login(client_id="jwt-client")))
        await manager.aget_token("s")
        await manager.arefresh("s")
    finally:
        await manager.aclose()
    forms = [request["form"] for request in provider.requests]
    claims = [jwt.decode(form["client_assertion"], options={"verify_signature": False}) for form in forms]
    assert [claim["aud"] for claim in claims] == [provider_server.url + ISSUER_PATH + "/token"] * 2
    assert len({claim["jti"] for claim in claims}) == 2
    stats = provider.stats
    assert (stats["refresh_ok"], stats["assertion_ok"], stats["assertion_invalid"], stats["assertion_replay"]) == (
        2, 2, 0, 0,
    )  # fmt: skip


def test_a_discovering_refresher_checks_its_client_authentication_at_once() -> None:
    """A configured client's assertion settings are checked at construction (a missing key, an assertion for a
    method that does not sign), and ``dpop`` or ``client_assertion`` in ``refresher_options`` is refused."""
    with pytest.raises(ValueError, match="private_key_jwt"):
        DiscoveringRefresher("https://mcp.example/mcp", "c", auth_method="private_key_jwt")
    with pytest.raises(ValueError, match="client_assertion is for"):
        DiscoveringRefresher(
            "https://mcp.example/mcp", "c", "s", client_assertion=ClientAssertion("k" * 32, alg="HS256")
        )
    with pytest.raises(ValueError, match="not in refresher_options"):
        DiscoveringRefresher("https://mcp.example/mcp", "c", "s", refresher_options={"dpop": DPoP()})


@pytest.mark.anyio
async def test_no_metadata_fails_without_guessing(provider: LocalProvider, provider_server: ServerThread) -> None:
    """A server that publishes no protected-resource metadata: DiscoveryFailed (not retryable), no token call."""
    refresher = DiscoveringRefresher(provider_server.url + "/api/me", "test-client", "test-secret")
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    try:
        await manager.astore("s", expired(provider.login()))
        with pytest.raises(DiscoveryFailed) as caught:
            await manager.aget_token("s")
    finally:
        await manager.aclose()
    assert not caught.value.retryable
    assert provider.stats["token_calls"] == 0


def fake_server(documents: dict[str, object]) -> httpx.Client:
    """An httpx client whose server answers the given JSON documents by URL, 404 otherwise."""

    def handle(request: httpx.Request) -> httpx.Response:
        document = documents.get(str(request.url))
        if document is None:
            return httpx.Response(404)
        if isinstance(document, int):
            return httpx.Response(document)
        return httpx.Response(200, content=json.dumps(document).encode())

    return httpx.Client(transport=httpx.MockTransport(handle))


def test_metadata_that_does_not_check_out_is_refused() -> None:
    """An issuer other than the one named, a resource for another server, or a 5xx: DiscoveryFailed."""
    prm = "https://mcp.example/.well-known/oauth-protected-resource/mcp"
    asm = "https://id.example/.well-known/oauth-authorization-server/t"
    good_prm = {"resource": "https://mcp.example/mcp", "authorization_servers": ["https://id.example/t"]}
    good_asm = {"issuer": "https://id.example/t", "token_endpoint": "https://id.example/t/token"}
    with fake_server({prm: good_prm, asm: good_asm}) as client:
        assert discover("https://mcp.example/mcp", client=client).token_endpoint == "https://id.example/t/token"
    with (
        fake_server({prm: good_prm, asm: {**good_asm, "issuer": "https://evil.example/t"}}) as client,
        pytest.raises(DiscoveryFailed, match="names another issuer") as mismatch,
    ):
        discover("https://mcp.example/mcp", client=client)
    assert "evil.example" not in str(mismatch.value)  # what the answer said is not repeated
    with (
        fake_server({prm: {**good_prm, "resource": "https://other.example/mcp"}}) as client,
        pytest.raises(DiscoveryFailed, match="is for"),
    ):
        discover("https://mcp.example/mcp", client=client)
    with fake_server({prm: 503}) as client, pytest.raises(DiscoveryFailed) as caught:
        discover("https://mcp.example/mcp", client=client)
    assert caught.value.retryable
    with pytest.raises(DiscoveryFailed, match="not https"):
        discover("http://mcp.example/mcp")


@pytest.mark.anyio
async def test_an_explicit_token_url_still_sends_resource(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """With token_url given (no discovery), the refresh still names the MCP server as ``resource`` (RFC 8707)."""
    refresher = DiscoveringRefresher(
        mcp_server.url, "test-client", "test-secret", token_url=provider_server.url + ISSUER_PATH + "/token"
    )
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    try:
        await manager.astore("s", expired(provider.login()))
        await manager.aget_token("s")
    finally:
        await manager.aclose()
    assert refresher.discoveries == 0 and provider.requests[-1]["form"]["resource"] == mcp_server.url


class WellKnown:
    """An MCP server's (and its authorization server's) well-known answers, as given: a JSON document (``SELF`` in
    ``resource`` stands for the server's own ``/mcp``), raw bytes, or bytes trickled one per ``pause`` seconds."""

    def __init__(self, prm: object, asm: object = None, *, pause: float = 0.0) -> None:
        self.prm = prm
        self.asm = asm
        self.pause = pause
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one request."""
        assert scope["type"] == "http"
        self.paths.append(scope["path"])
        base = f"http://127.0.0.1:{scope['server'][1]}"
        document = self.prm if scope["path"].startswith("/.well-known/oauth-protected-resource") else self.asm
        if document is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if isinstance(document, dict):
            document = json.dumps(document).replace('"SELF"', json.dumps(base + "/mcp")).encode()
        assert isinstance(document, bytes)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        if not self.pause:
            await send({"type": "http.response.body", "body": document})
            return
        for i in range(len(document)):
            await send({"type": "http.response.body", "body": document[i : i + 1], "more_body": i + 1 < len(document)})
            await anyio.sleep(self.pause)


def hostile_prm(kind: str, issuer: str) -> object:
    """Protected-resource metadata that does not check out, in one of the shapes a hostile server may send."""
    if kind == "resource-not-a-url":
        return {"resource": "urn:example:mcp", "authorization_servers": [issuer]}
    if kind == "issuer-not-a-url":
        return {"resource": "SELF", "authorization_servers": ["as.example"]}
    assert kind == "nested-arrays"
    return b"[" * 60000  # deep enough to exhaust the JSON parser's recursion


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["resource-not-a-url", "issuer-not-a-url", "nested-arrays"])
async def test_malformed_metadata_is_a_typed_error_that_keeps_the_tokens(
    kind: str, provider: LocalProvider, provider_server: ServerThread
) -> None:
    """Metadata that is not even well-formed raises DiscoveryFailed (not retryable) from adiscover and through a
    manager, which keeps the stored tokens: no token request was sent, nothing can have been consumed."""
    app = WellKnown(hostile_prm(kind, provider_server.url + ISSUER_PATH))
    async with ServerThread(app) as running:
        server_url = running.url + "/mcp"
        with pytest.raises(DiscoveryFailed) as direct:
            await adiscover(server_url)
        assert not direct.value.retryable
        storage = MemoryStorage()
        refresher = DiscoveringRefresher(server_url, "test-client", "test-secret", storage=storage)
        manager = TokenManager(refresher=refresher, provider_id="local", storage=storage)
        try:
            stored = await manager.astore("s", expired(provider.login()))
            with pytest.raises(DiscoveryFailed):
                await manager.aget_token("s")
            kept = await storage.aget(EntryKey("local", "s"))
        finally:
            await manager.aclose()
    assert kept is not None and kept.refresh_token == stored.refresh_token
    assert provider.stats["token_calls"] == 0


@pytest.mark.anyio
async def test_metadata_fields_of_the_wrong_type_count_as_not_said() -> None:
    """token_endpoint_auth_methods_supported or code_challenge_methods_supported that are not lists of strings are
    read as not said (no TypeError escapes discovery)."""
    asm = {
        "issuer": "ISSUER",
        "token_endpoint": "ISSUER/token",
        "token_endpoint_auth_methods_supported": 5,
        "code_challenge_methods_supported": {"S256": True},
    }
    app = WellKnown({"resource": "SELF", "authorization_servers": ["ISSUER"]}, asm)
    async with ServerThread(app) as running:
        app.prm = json.loads(json.dumps(app.prm).replace("ISSUER", running.url))
        app.asm = json.loads(json.dumps(asm).replace("ISSUER", running.url))
        found = await adiscover(running.url + "/mcp")
    assert found.token_endpoint == running.url + "/token"
    assert found.token_endpoint_auth_methods == () and found.code_challenge_methods == ()


@pytest.mark.anyio
async def test_a_corrupt_stored_metadata_record_is_typed_and_keeps_the_tokens(
    provider: LocalProvider, mcp_server: LocalMCPServer
) -> None:
    """Whatever fails before the token request (here a stored metadata record that does not parse) is a typed
    DiscoveryFailed that keeps the tokens, not an unknown exception the manager must treat as "maybe sent"."""
    from httpx_upstream_auth.mcp._discovery import MetadataStore
    from httpx_upstream_auth.mcp._refresher import METADATA_NAMESPACE

    storage = MemoryStorage()
    await MetadataStore(storage, METADATA_NAMESPACE).aput(mcp_server.url, "{not json")
    refresher = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret", storage=storage)
    manager = TokenManager(refresher=refresher, provider_id="local", storage=storage)
    try:
        await manager.astore("s", expired(provider.login()))
        with pytest.raises(DiscoveryFailed, match="no token request was sent"):
            await manager.aget_token("s")
        kept = await storage.aget(EntryKey("local", "s"))
    finally:
        await manager.aclose()
    assert kept is not None and provider.stats["token_calls"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize("redeem_in", ["thread", "task"])
async def test_slow_metadata_costs_a_retryable_error_not_the_tokens(
    redeem_in: str, provider: LocalProvider, provider_server: ServerThread
) -> None:
    """Metadata trickling in slower than refresh_timeout: discovery runs before the bounded token request, so its
    timeout is a retryable RefreshFailed that sent nothing, and the stored tokens are kept (they were removed as
    if the token request's answer had been lost)."""
    prm = {"resource": "SELF", "authorization_servers": [provider_server.url + ISSUER_PATH]}
    app = WellKnown(prm, pause=0.05)  # about 5 s for the document; each byte well within the read timeout
    async with ServerThread(app) as running:
        storage = MemoryStorage()
        refresher = DiscoveringRefresher(running.url + "/mcp", "test-client", "test-secret", storage=storage)
        manager = TokenManager(
            refresher=refresher,
            provider_id="local",
            storage=storage,
            refresh_timeout=1.0,
            redeem_in=redeem_in,  # type: ignore[arg-type]
        )
        try:
            stored = await manager.astore("s", expired(provider.login()))
            with pytest.raises(RefreshFailed) as caught:
                await manager.aget_token("s")
            kept = await storage.aget(EntryKey("local", "s"))
        finally:
            await manager.aclose()
    assert caught.value.retryable and not caught.value.may_have_rotated
    assert not isinstance(caught.value, ReauthenticationRequired)
    assert kept is not None and kept.refresh_token == stored.refresh_token
    assert provider.stats["token_calls"] == 0
