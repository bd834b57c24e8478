"""Credentials bound to their issuer: a refresh token and a client secret go only to the authorization server
that issued them, whatever the MCP server's metadata names later (a malicious server naming its own AS)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

pytest.importorskip("mcp", reason="the MCP SDK is not installed")

import mcp_fixtures

from httpx_upstream_auth import EntryKey, MemoryStorage, TokenManager, UpstreamTokens
from httpx_upstream_auth.mcp import (
    ClientRegistration,
    DiscoveringRefresher,
    IssuerMismatch,
    TokenRejected,
    adiscover,
)
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider, ServerThread

mcp_server = mcp_fixtures.mcp_server
provider_server = mcp_fixtures.provider_server

pytestmark = pytest.mark.anyio

ISSUER_PATH = "/tenants/acme"


@pytest.fixture
def provider() -> LocalProvider:
    """The user's real authorization server."""
    return LocalProvider(access_ttl=60, issuer_path=ISSUER_PATH)


@pytest.fixture
def attacker() -> LocalProvider:
    """The attacker's authorization server: it accepts anything (the test-client secret too)."""
    return LocalProvider(access_ttl=60, issuer_path="/evil")


@pytest.fixture
def attacker_server(attacker: LocalProvider) -> Iterator[ServerThread]:
    """The attacker's AS on 127.0.0.1."""
    with ServerThread(attacker) as running:
        yield running


def contacts(provider: LocalProvider) -> int:
    """Every request an authorization server received: token calls, metadata, registration, logins."""
    return provider.stats["token_calls"] + sum(provider.flow_stats.values()) + len(provider.requests)


def expired(tokens: UpstreamTokens) -> UpstreamTokens:
    """The same grant, as if its access token had expired."""
    return attrs.evolve(tokens, expires_at=time.time() - 1, issued_at=time.time() - 61)


async def test_a_server_switching_to_an_attacker_as_gets_nothing(
    provider: LocalProvider,
    provider_server: ServerThread,
    mcp_server: LocalMCPServer,
    attacker: LocalProvider,
    attacker_server: ServerThread,
) -> None:
    """Tokens refreshed once are bound to their issuer; when the server's metadata later names an attacker's AS
    (and the cached discovery is gone), the refresh raises IssuerMismatch and the attacker receives nothing."""
    storage = MemoryStorage()
    refresher = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret", storage=storage)
    manager = TokenManager(refresher=refresher, provider_id="local", storage=storage)
    good = provider_server.url + ISSUER_PATH
    try:
        await manager.astore("s", expired(provider.login()))
        assert (await manager.aget_token("s")).issuer == good  # bound on its first refresh
        mcp_server.authorization_servers = [attacker_server.url + "/evil"]
        await refresher.aforget_metadata()  # as after the cache expired, or in a process without it
        await manager.astore("s", expired(await manager.aget_token("s")))
        with pytest.raises(IssuerMismatch) as caught:
            await manager.aget_token("s")
        stored = await storage.aget(EntryKey("local", "s"))
    finally:
        await manager.aclose()
    assert contacts(attacker) == 0
    assert (caught.value.expected, caught.value.found) == (good, attacker_server.url + "/evil")
    assert not caught.value.retryable and "nothing was sent" in str(caught.value)
    assert stored is not None and stored.refresh_token is not None  # kept: the grant is still good at its AS
    assert "test-secret" not in str(caught.value) and stored.refresh_token not in str(caught.value)


async def test_a_pinned_issuer_refuses_a_server_naming_another_from_the_start(
    provider: LocalProvider,
    mcp_server: LocalMCPServer,
    attacker: LocalProvider,
    attacker_server: ServerThread,
    provider_server: ServerThread,
) -> None:
    """With issuer= pinned, a server whose very first metadata names another AS gets nothing: not even a metadata
    request reaches that AS (the check happens on the resource's list, before its metadata is fetched)."""
    mcp_server.authorization_servers = [attacker_server.url + "/evil"]
    refresher = DiscoveringRefresher(
        mcp_server.url, "test-client", "test-secret", issuer=provider_server.url + ISSUER_PATH
    )
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    try:
        await manager.astore("s", expired(provider.login()))
        with pytest.raises(IssuerMismatch):
            await manager.aget_token("s")
    finally:
        await manager.aclose()
    assert contacts(attacker) == 0 and refresher.discoveries == 0


async def test_a_server_listing_several_as_uses_the_pinned_one(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer, attacker_server: ServerThread
) -> None:
    """RFC 9728 allows several authorization servers: with a pin (or bound credentials) the listed one is chosen."""
    good = provider_server.url + ISSUER_PATH
    mcp_server.authorization_servers = [attacker_server.url + "/evil", good]
    assert (await adiscover(mcp_server.url, issuer=good)).token_endpoint == good + "/token"


async def test_a_registration_bound_to_another_issuer_is_never_presented(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """A stored client registration records its issuer: tokens from another issuer are not refreshed with it."""
    storage = MemoryStorage()
    refresher = DiscoveringRefresher(mcp_server.url, storage=storage)
    await refresher.asave_registration(
        ClientRegistration("dyn-1", "dyn-secret", "client_secret_post", issuer="https://elsewhere.example")
    )
    manager = TokenManager(refresher=refresher, provider_id="local", storage=storage)
    try:
        await manager.astore("s", attrs.evolve(expired(provider.login()), issuer=provider_server.url + ISSUER_PATH))
        with pytest.raises(IssuerMismatch, match="registration"):
            await manager.aget_token("s")
    finally:
        await manager.aclose()
    assert provider.stats["token_calls"] == 0
    assert "dyn-secret" not in repr(ClientRegistration("dyn-1", "dyn-secret", "none"))


def sdk_login(
    server: LocalMCPServer, browser: mcp_fixtures.HeadlessBrowser, storage: MemoryStorage, **options: object
) -> object:
    """SDK-login mode for ``server`` with the headless browser (2.x only)."""
    from mcp.shared.auth import OAuthClientMetadata

    from httpx_upstream_auth.mcp import SDKLogin

    metadata = OAuthClientMetadata(
        redirect_uris=["http://127.0.0.1:9/callback"],  # type: ignore[list-item]
        token_endpoint_auth_method="client_secret_post",
        scope="api",
    )
    return SDKLogin(
        server.url,
        client_metadata=metadata,
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
        storage=storage,
        provider_id="mcp-test",
        **options,  # type: ignore[arg-type]
    )


async def test_sdk_login_mode_refuses_an_issuer_change_at_the_call(
    provider: LocalProvider,
    provider_server: ServerThread,
    mcp_server: LocalMCPServer,
    attacker: LocalProvider,
    attacker_server: ServerThread,
) -> None:
    """SDK-login mode: after a login at the real AS, a server naming the attacker's AS makes the tool call raise
    IssuerMismatch (no second login, nothing sent to the attacker: not the refresh token, not the DCR secret)."""
    pytest.importorskip("mcp.server.mcpserver", reason="SDK-login mode needs the MCP SDK 2.x")
    from httpx_upstream_auth.mcp import SDKLogin, connect

    browser = mcp_fixtures.HeadlessBrowser()
    storage = MemoryStorage()
    login = sdk_login(mcp_server, browser, storage)
    assert isinstance(login, SDKLogin)
    try:
        async with connect(mcp_server.url, login, "s", mode="legacy") as client:
            await client.call_tool("echo", {"text": "1"})
            entry = await login.manager.aget_token("s")
            assert entry.issuer == provider_server.url + ISSUER_PATH  # recorded at the login
            mcp_server.authorization_servers = [attacker_server.url + "/evil"]
            await login.refresher.aforget_metadata()
            await login.manager.astore("s", expired(entry))
            with pytest.raises(IssuerMismatch):
                await client.call_tool("echo", {"text": "2"})
    finally:
        await login.aclose()
    assert contacts(attacker) == 0 and browser.visits == 1


async def test_sdk_login_mode_with_a_pin_logs_in_nowhere_else(
    mcp_server: LocalMCPServer, provider_server: ServerThread, attacker: LocalProvider, attacker_server: ServerThread
) -> None:
    """SDK-login mode pinned to the real AS: a server naming another AS from the start gets no login at all."""
    pytest.importorskip("mcp.server.mcpserver", reason="SDK-login mode needs the MCP SDK 2.x")
    from httpx_upstream_auth.mcp import SDKLogin, connect

    mcp_server.authorization_servers = [attacker_server.url + "/evil"]
    browser = mcp_fixtures.HeadlessBrowser()
    login = sdk_login(mcp_server, browser, MemoryStorage(), issuer=provider_server.url + ISSUER_PATH)
    assert isinstance(login, SDKLogin)
    try:
        with pytest.raises(IssuerMismatch):
            async with connect(mcp_server.url, login, "s", mode="legacy"):
                pass
    finally:
        await login.aclose()
    assert contacts(attacker) == 0 and browser.visits == 0


async def test_sdk_login_mode_follows_a_move_only_when_allowed(
    provider: LocalProvider,
    provider_server: ServerThread,
    mcp_server: LocalMCPServer,
    attacker: LocalProvider,
    attacker_server: ServerThread,
) -> None:
    """allow_issuer_change=True: the user logs in at the new AS, which never sees the old refresh token or the
    client the old AS registered."""
    pytest.importorskip("mcp.server.mcpserver", reason="SDK-login mode needs the MCP SDK 2.x")
    from httpx_upstream_auth.mcp import SDKLogin, connect

    browser = mcp_fixtures.HeadlessBrowser()
    login = sdk_login(mcp_server, browser, MemoryStorage(), allow_issuer_change=True)
    assert isinstance(login, SDKLogin)
    try:
        async with connect(mcp_server.url, login, "s", mode="legacy") as client:
            await client.call_tool("whoami", {})
            old = await login.manager.aget_token("s")
            old_client = await login.refresher.aregistration()
            mcp_server.authorization_servers = [attacker_server.url + "/evil"]
            await login.refresher.aforget_metadata()
            await login.manager.astore("s", expired(old))
            # The new AS's tokens are not valid at this MCP server (it trusts the old AS): the call fails, but
            # only after a login there.
            with pytest.raises(TokenRejected):
                await client.call_tool("echo", {"text": "2"})
    finally:
        await login.aclose()
    assert browser.visits == 2 and attacker.flow_stats["code_exchanges"] == 1
    sent = repr(attacker.requests)
    assert old.refresh_token is not None and old.refresh_token not in sent
    assert old_client.client_secret is not None and old_client.client_secret not in sent
    assert old_client.client_id not in sent


async def test_sdk_login_mode_refuses_an_authorization_server_without_pkce_s256(mcp_server: LocalMCPServer) -> None:
    """The MCP spec forbids an authorization-code login at an AS whose metadata lacks PKCE S256 (the SDK does not
    check): DiscoveryFailed at the connect; the user is never sent there, no code is exchanged."""
    pytest.importorskip("mcp.server.mcpserver", reason="SDK-login mode needs the MCP SDK 2.x")
    from httpx_upstream_auth.mcp import DiscoveryFailed, SDKLogin, connect

    paths: list[str] = []

    async def no_pkce(scope: Any, receive: Any, send: Any) -> None:
        """An authorization server whose metadata says nothing about PKCE (it registers anyone)."""
        path = scope["path"]
        paths.append(path)
        base = f"http://127.0.0.1:{scope['server'][1]}"
        status, document = 404, {}
        if path == "/.well-known/oauth-authorization-server":
            status, document = (
                200,
                {
                    "issuer": base,
                    "authorization_endpoint": base + "/authorize",
                    "token_endpoint": base + "/token",
                    "registration_endpoint": base + "/register",
                    "response_types_supported": ["code"],
                },
            )
        elif path == "/register":
            status, document = 201, {"client_id": "weak-client", "redirect_uris": ["http://127.0.0.1:9/callback"]}
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(document).encode()})

    browser = mcp_fixtures.HeadlessBrowser()
    async with ServerThread(no_pkce) as weak:
        mcp_server.authorization_servers = [weak.url]
        login = sdk_login(mcp_server, browser, MemoryStorage())
        assert isinstance(login, SDKLogin)
        try:
            with pytest.raises(DiscoveryFailed, match="PKCE S256"):
                async with connect(mcp_server.url, login, "s", mode="legacy"):
                    pass  # pragma: no cover
        finally:
            await login.aclose()
    assert browser.visits == 0 and "/authorize" not in paths and "/token" not in paths


@pytest.mark.parametrize("allow_issuer_change", [False, True])
async def test_a_pre_registered_clients_secret_never_reaches_another_authorization_server(
    allow_issuer_change: bool,
    provider: LocalProvider,
    mcp_server: LocalMCPServer,
    attacker: LocalProvider,
    attacker_server: ServerThread,
) -> None:
    """SDK-login mode with a pre-registered client: once a user logged in at the real AS, a server naming the
    attacker's AS gets no login of another user there (IssuerMismatch), even with allow_issuer_change (a
    pre-registered client belongs to one AS): the attacker receives nothing, its secret least of all."""
    pytest.importorskip("mcp.server.mcpserver", reason="SDK-login mode needs the MCP SDK 2.x")
    from mcp.shared.auth import OAuthClientInformationFull

    from httpx_upstream_auth.mcp import SDKLogin, connect

    secret = "pre-registered-secret-of-the-real-as"
    provider.clients["pre-client"] = (secret, "client_secret_post")
    attacker.clients["pre-client"] = ("anything", "client_secret_post")
    client = OAuthClientInformationFull(
        client_id="pre-client",
        client_secret=secret,
        token_endpoint_auth_method="client_secret_post",
        redirect_uris=["http://127.0.0.1:9/callback"],  # type: ignore[list-item]
    )
    browser = mcp_fixtures.HeadlessBrowser()
    login = sdk_login(
        mcp_server, browser, MemoryStorage(), client_information=client, allow_issuer_change=allow_issuer_change
    )
    assert isinstance(login, SDKLogin)
    try:
        async with connect(mcp_server.url, login, "alice", mode="legacy") as session:
            await session.call_tool("echo", {"text": "1"})
        mcp_server.authorization_servers = [attacker_server.url + "/evil"]
        with pytest.raises(IssuerMismatch, match="pre-registered"):
            async with connect(mcp_server.url, login, "carol", mode="legacy"):
                pass  # pragma: no cover
        alice = await login.manager.aget_token("alice")
        await login.manager.astore("alice", expired(alice))  # alice's refresh still goes to the real AS only
        assert (await login.manager.aget_token("alice")).access_token != alice.access_token
    finally:
        await login.aclose()
    assert contacts(attacker) == 0 and secret not in repr(attacker.requests)
    assert browser.visits == 1


async def test_sdk_login_mode_never_logs_in_at_another_as_unless_allowed(
    provider: LocalProvider,
    provider_server: ServerThread,
    mcp_server: LocalMCPServer,
    attacker: LocalProvider,
    attacker_server: ServerThread,
) -> None:
    """Without a pin, the first login's AS is trusted: when the server later names another, neither a re-login
    after a dead grant nor a new user's first login goes there (IssuerMismatch, the browser never opened), the
    stored registration and metadata stay the real AS's, and other users keep refreshing there."""
    pytest.importorskip("mcp.server.mcpserver", reason="SDK-login mode needs the MCP SDK 2.x")
    from httpx_upstream_auth.mcp import SDKLogin, connect

    good = provider_server.url + ISSUER_PATH
    browser = mcp_fixtures.HeadlessBrowser()
    login = sdk_login(mcp_server, browser, MemoryStorage())
    assert isinstance(login, SDKLogin)
    try:
        for user in ("alice", "bob"):
            async with connect(mcp_server.url, login, user, mode="legacy") as session:
                await session.call_tool("echo", {"text": user})
        mcp_server.authorization_servers = [attacker_server.url + "/evil"]
        provider.revoke_grant(provider.grant_of((await login.manager.aget_token("alice")).access_token))
        for user in ("alice", "carol"):  # a re-login after a dead grant; a new user's first login
            with pytest.raises(IssuerMismatch) as caught:
                async with connect(mcp_server.url, login, user, mode="legacy") as session:
                    await session.call_tool("echo", {"text": user})
            assert (caught.value.expected, caught.value.found) == (good, attacker_server.url + "/evil")
        assert await login.refresher.atrusted_issuer() == good
        assert (await login.refresher.aregistration()).issuer == good
        mcp_server.authorization_servers = None
        await login.manager.astore("bob", expired(await login.manager.aget_token("bob")))
        async with connect(mcp_server.url, login, "bob", mode="legacy") as session:
            await session.call_tool("echo", {"text": "bob again"})
    finally:
        await login.aclose()
    assert contacts(attacker) == 0 and browser.visits == 2
    assert provider.stats["refresh_ok"] == 1


@pytest.mark.parametrize("kind", ["resource-not-a-url", "nested-arrays"])
async def test_sdk_login_with_a_pin_and_broken_metadata_raises_a_typed_error(
    kind: str, provider_server: ServerThread
) -> None:
    """SDK-login mode pinned to an issuer, against a server whose protected-resource metadata is broken: the
    connect raises one typed error (no ExceptionGroup of a ValueError or RecursionError), no browser opened."""
    pytest.importorskip("mcp.server.mcpserver", reason="SDK-login mode needs the MCP SDK 2.x")
    from httpx_upstream_auth import UpstreamAuthError
    from httpx_upstream_auth.mcp import SDKLogin, connect

    pinned = provider_server.url + ISSUER_PATH
    prm = (
        b"[" * 60000
        if kind == "nested-arrays"
        else json.dumps({"resource": "urn:x", "authorization_servers": [pinned]})
    )

    async def hostile(scope: Any, receive: Any, send: Any) -> None:
        """Broken metadata; 401 to everything else."""
        if scope["path"].startswith("/.well-known/oauth-protected-resource"):
            body = prm if isinstance(prm, bytes) else prm.encode()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": body})
            return
        challenge = (b"www-authenticate", b'Bearer error="invalid_token"')
        await send({"type": "http.response.start", "status": 401, "headers": [challenge]})
        await send({"type": "http.response.body", "body": b""})

    browser = mcp_fixtures.HeadlessBrowser()
    async with ServerThread(hostile) as running:
        server = running.url + "/mcp"
        login = SDKLogin(
            server,
            client_metadata=sdk_login_metadata(),
            redirect_handler=browser.redirect,
            callback_handler=browser.callback,
            issuer=pinned,
        )
        try:
            with pytest.raises(UpstreamAuthError):
                async with connect(server, login, "s", mode="legacy"):
                    pass  # pragma: no cover
        finally:
            await login.aclose()
    assert browser.visits == 0


def sdk_login_metadata() -> Any:
    """The client metadata ``sdk_login`` registers with."""
    from mcp.shared.auth import OAuthClientMetadata

    return OAuthClientMetadata(
        redirect_uris=["http://127.0.0.1:9/callback"],  # type: ignore[list-item]
        token_endpoint_auth_method="client_secret_post",
        scope="api",
    )
