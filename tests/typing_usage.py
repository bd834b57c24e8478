"""The public API used the way an application uses it, for the type checkers only (never run).

mypy --strict (the README's test command) and pyright --strict (``.ci/run``) both check this file: a
public signature that stops fitting httpx, httpx2 or the MCP SDK breaks the check, not a user's build.
"""

from __future__ import annotations

import time

import httpx
import httpx2
from mcp.shared.auth import OAuthClientMetadata
from pydantic import AnyUrl

import httpx_upstream_auth as hua
from httpx_upstream_auth.mcp import (
    AsyncMCPAuthTransport,
    DiscoveringRefresher,
    LegacyAsyncMCPAuthTransport,
    SDKLogin,
    TokenStorageAdapter,
    connect,
    connect_session,
    http_client,
    legacy_http_client,
)

API = "https://api.example/user"


def build_manager() -> hua.TokenManager:
    """One manager per upstream provider, as the README's quick start builds it."""
    manager = hua.TokenManager(
        provider_id="github",
        storage=hua.SQLiteStorage("tokens.db"),
        refresher=hua.OAuth2Refresher("https://github.example/token", client_id="app", client_secret="secret"),
        refresh_timeout=10.0,
    )
    stored: hua.UpstreamTokens = manager.store(
        "session-1",
        hua.UpstreamTokens(
            access_token="at",
            refresh_token="rt",
            expires_at=time.time() + 3600,
            user_id="u-1",
            upstream_subject="12345",
            client_id="app",
        ),
    )
    assert stored.version >= 1
    return manager


def security_clients(pem: str, code_exchange: httpx.Response) -> hua.TokenManager:
    """A private_key_jwt client whose tokens are DPoP-bound, as docs/security-clients.md configures them."""
    assertion = hua.ClientAssertion(pem, key_id="2026-12", alg="PS256", audience="https://login.example")
    refresher = hua.OAuth2Refresher(
        "https://login.example/token",
        "my-client",
        auth_method="private_key_jwt",
        client_assertion=assertion,
        dpop=hua.DPoP(alg="ES256", max_nonces=64),
    )
    manager = hua.TokenManager(provider_id="login", storage=hua.MemoryStorage(), refresher=refresher)
    key = hua.DPoPKey.generate("ES256")
    proof: str = key.proof("POST", "https://login.example/token", nonce=None)
    print(proof, key.thumbprint, hua.DPoP(key=hua.DPoPKey.load(pem)))
    tokens = hua.UpstreamTokens.from_token_response(code_exchange, user_id="u-1")
    manager.store("session-1", hua.UpstreamTokens(access_token=tokens.access_token, dpop_key=key.to_jwk()))
    return manager


def sync_clients(manager: hua.TokenManager) -> None:
    """httpx and httpx2 sync clients, with ``auth=`` and with a transport."""
    auth: httpx.Auth = manager.auth("session-1", expect=hua.Binding(user_id="u-1"))
    with httpx.Client(auth=auth) as client:
        response: httpx.Response = client.get(API)
        response.raise_for_status()
    with httpx2.Client(auth=manager.auth("session-1")) as client2:
        client2.get(API)
    transport = hua.UpstreamAuthTransport(manager, "session-1", origins=["https://api.example"])
    with httpx.Client(transport=transport) as through_transport:
        through_transport.get(API)
    with httpx.Client(mounts={"https://api.example": hua.UpstreamAuthTransport(manager, "session-1")}) as mounted:
        mounted.get(API)
    token: hua.UpstreamTokens = manager.get_token("session-1")
    print(token.expires_at, manager.footprint())
    try:
        manager.get_token("unknown")
    except hua.ReauthenticationRequired:
        manager.delete("unknown")
    except hua.RefreshFailed as exc:
        print(exc.retryable)
    manager.close(timeout=5.0)


async def async_clients(manager: hua.TokenManager) -> None:
    """httpx and httpx2 async clients, with ``auth=`` and with a transport."""
    async with httpx.AsyncClient(auth=manager.auth("session-1")) as client:
        await client.get(API)
    legacy: httpx2.Auth = manager.auth("session-1")
    async with httpx2.AsyncClient(auth=legacy) as client2:
        await client2.get(API)
    transport = hua.AsyncUpstreamAuthTransport(manager, "session-1", transport=httpx.AsyncHTTPTransport(retries=1))
    async with httpx.AsyncClient(transport=transport) as through_transport:
        await through_transport.get(API)
    token: hua.UpstreamTokens = await manager.aget_token("session-1")
    await manager.astore("session-2", token)
    deleted: bool = await manager.adelete("session-2")
    print(deleted)
    logout: hua.Logout = await manager.adelete("session-1", revoke=True, revoke_timeout=2.0)
    print(logout.revoked, logout.reason)
    await manager.aclose()


def security(manager: hua.TokenManager) -> None:
    """Encryption at rest over a backend, rotation, and a logout that revokes."""
    storage = hua.EncryptedStorage(
        hua.SQLiteStorage("tokens.db"), keys=[hua.EncryptionKey.generate("2026-12"), bytes(32)], allow_plaintext=True
    )
    counts: hua.Reencrypted = storage.reencrypt()
    print(counts.rewritten, storage.decryptions)
    try:
        manager.get_token("session-1")
    except hua.EntryRefused as exc:
        print(exc.reason, exc.key_id)
    result: hua.Logout = manager.delete("session-1", revoke=True)
    print(result.deleted, result.status_code)
    either: bool | hua.Logout = manager.delete("session-1", revoke=bool(result.revoked))
    print(either)


async def mcp_clients(manager: hua.TokenManager) -> None:
    """The MCP helpers: SDK 2.x clients and transports, discovery, SDK login, the SDK 1.x session."""
    async with connect("https://mcp.example/mcp", manager, "session-1", mode="legacy") as client:
        await client.call_tool("echo", {"text": "hello"})
    async with http_client(manager, "session-1", timeout=30.0) as http:
        assert isinstance(http, httpx2.AsyncClient)
    mcp_transport: httpx2.AsyncBaseTransport = AsyncMCPAuthTransport(manager, "session-1")
    legacy_transport: httpx.AsyncBaseTransport = LegacyAsyncMCPAuthTransport(manager, "session-1")
    async with legacy_http_client(manager, "session-1") as legacy_http:
        assert isinstance(legacy_http, httpx.AsyncClient)
    async with connect_session("https://mcp.example/mcp", manager, "session-1") as session:
        await session.call_tool("echo", {"text": "hello"})
    storage = hua.MemoryStorage()
    refresher = DiscoveringRefresher("https://mcp.example/mcp", "app", "secret", storage=storage)
    discovered = hua.TokenManager(refresher=refresher, provider_id="mcp", storage=storage)
    print(mcp_transport, legacy_transport, refresher.token_url, discovered)

    async def open_browser(url: str) -> None:
        print(url)

    login = SDKLogin(
        "https://mcp.example/mcp",
        client_metadata=OAuthClientMetadata(redirect_uris=[AnyUrl("http://127.0.0.1:8765/callback")]),
        redirect_handler=open_browser,
        storage=storage,
    )
    async with login, connect("https://mcp.example/mcp", login, "session-1", user_id="u-1") as logged_in:
        try:
            await logged_in.call_tool("echo", {"text": "hello"})
        except hua.ReauthenticationRequired:
            print("log the user in again")
    async with httpx2.AsyncClient(auth=login.auth("session-1")) as with_login:
        await with_login.get(API)
    adapter = TokenStorageAdapter(manager, "session-1", "https://mcp.example/mcp", user_id="u-1")
    print(await adapter.get_tokens())
