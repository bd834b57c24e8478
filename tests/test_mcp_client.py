"""MCP SDK 2.x clients over ``httpx_upstream_auth.mcp.connect``: a real MCPServer, real sessions, typed errors."""

from __future__ import annotations

from typing import Any

import anyio
import attrs
import httpx
import pytest

pytest.importorskip("mcp.server.mcpserver", reason="the MCP SDK 2.x is not installed")

import mcp_fixtures
from support import SSL, ManagerFactory, fail_refresh

from httpx_upstream_auth import (
    ReauthenticationRequired,
    RefreshFailed,
    TokenManager,
    UpstreamAuthError,
)
from httpx_upstream_auth._async._manager import MAX_RETRIES
from httpx_upstream_auth.mcp import AsyncMCPAuthTransport, LegacyAsyncMCPAuthTransport, connect
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider, ServerThread

# The shared fixtures, served for this module's own ``provider``.
manager = mcp_fixtures.manager
forgetful_manager = mcp_fixtures.forgetful_manager
mcp_server = mcp_fixtures.mcp_server
provider_server = mcp_fixtures.provider_server

pytestmark = pytest.mark.anyio

ISSUER_PATH = "/tenants/acme"
SESSION = "mcp-session"
MODES = ["legacy", "auto"]


async def settled(server: LocalMCPServer, mode: str) -> None:
    """Wait until a legacy session's GET stream is open, so it cannot race the test for a fault."""
    if mode == "legacy":
        with anyio.fail_after(10):
            while server.open_streams == 0:
                await anyio.sleep(0.01)


@pytest.fixture
def provider() -> LocalProvider:
    """A provider whose endpoints live under a path (a guessed ``{origin}/token`` would 404)."""
    return LocalProvider(access_ttl=60, issuer_path=ISSUER_PATH)


@pytest.mark.parametrize("mcp_mode", MODES)
async def test_connect_calls_tools(
    mcp_mode: str, provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """connect() opens a session that sends the stored token; tool calls succeed with no refresh."""
    await manager.astore(SESSION, provider.login())
    async with connect(mcp_server.url, manager, SESSION, mode=mcp_mode) as client:
        await settled(mcp_server, mcp_mode)
        result = await client.call_tool("echo", {"text": "hello"})
        assert result.content[0].text == "hello"  # type: ignore[union-attr]
        assert (await client.call_tool("whoami", {})).content[0].text == "test-client"  # type: ignore[union-attr]
    assert provider.stats["token_calls"] == 0
    assert mcp_server.verifier.rejected == 0


@pytest.mark.parametrize("mcp_mode", MODES)
async def test_revoked_access_token_is_refreshed_and_replayed(
    mcp_mode: str, provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """A token the server rejects mid-session is refreshed once and the call replayed: the caller sees nothing."""
    await manager.astore(SESSION, provider.login())
    async with connect(mcp_server.url, manager, SESSION, mode=mcp_mode) as client:
        await settled(mcp_server, mcp_mode)
        await client.call_tool("echo", {"text": "1"})
        provider.revoke_access((await manager.aget_token(SESSION)).access_token)
        assert (await client.call_tool("echo", {"text": "2"})).content[0].text == "2"  # type: ignore[union-attr]
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0
    assert mcp_server.verifier.rejected == 1


@pytest.mark.parametrize("mcp_mode", MODES)
async def test_revoked_grant_raises_reauthentication_required_at_the_call(
    mcp_mode: str, provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """A grant revoked mid-session: the tool call raises ReauthenticationRequired, the session survives the
    error, closing it does not refresh again, and after a new login the same session works again."""
    await manager.astore(SESSION, provider.login())
    async with connect(mcp_server.url, manager, SESSION, mode=mcp_mode) as client:
        await settled(mcp_server, mcp_mode)
        await client.call_tool("echo", {"text": "before"})
        provider.revoke_grant(provider.grant_of((await manager.aget_token(SESSION)).access_token))
        for _ in range(2):  # the second call does not ask the provider again
            with pytest.raises(ReauthenticationRequired) as caught:
                await client.call_tool("echo", {"text": "after"})
            assert isinstance(caught.value, UpstreamAuthError)
        assert provider.stats["invalid_grant"] == 1
        await manager.astore(SESSION, provider.login())  # the user logged in again
        assert (await client.call_tool("echo", {"text": "again"})).content[0].text == "again"  # type: ignore[union-attr]
        provider.revoke_grant(provider.grant_of((await manager.aget_token(SESSION)).access_token))
        with pytest.raises(ReauthenticationRequired):
            await client.call_tool("echo", {"text": "dead again"})
    # The session's close (a DELETE in legacy mode) did not refresh: two dead grants, two token calls.
    assert provider.stats["token_calls"] == 2 and provider.stats["invalid_grant"] == 2


@pytest.mark.parametrize("mcp_mode", MODES)
async def test_failed_refresh_raises_refresh_failed_and_the_next_call_recovers(
    mcp_mode: str, provider: LocalProvider, forgetful_manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """A 503 from the token endpoint reaches the caller as a retryable RefreshFailed; the next call refreshes
    (for a manager that does not remember the failure)."""
    manager = forgetful_manager
    await manager.astore(SESSION, provider.login())
    async with connect(mcp_server.url, manager, SESSION, mode=mcp_mode) as client:
        await settled(mcp_server, mcp_mode)
        provider.revoke_access((await manager.aget_token(SESSION)).access_token)
        fail_refresh(provider, "503")  # on every attempt of the job
        with pytest.raises(RefreshFailed) as caught:
            await client.call_tool("echo", {"text": "x"})
        assert caught.value.retryable
        assert (await client.call_tool("echo", {"text": "y"})).content[0].text == "y"  # type: ignore[union-attr]
    assert provider.stats["refresh_ok"] == 1 and provider.stats["faults"] == 1 + MAX_RETRIES


@pytest.mark.parametrize("mcp_mode", MODES)
async def test_connect_with_a_dead_grant_raises_reauthentication_required(
    mcp_mode: str, provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """When the grant is already dead, the connect itself raises ReauthenticationRequired (no ExceptionGroup)."""
    tokens = await manager.astore(SESSION, provider.login())
    provider.revoke_grant(provider.grant_of(tokens.access_token))
    with pytest.raises(ReauthenticationRequired):
        async with connect(mcp_server.url, manager, SESSION, mode=mcp_mode):
            pass  # pragma: no cover
    assert provider.stats["invalid_grant"] == 1


async def test_no_entry_raises_reauthentication_required(manager: TokenManager, mcp_server: LocalMCPServer) -> None:
    """A session that never logged in: connect raises ReauthenticationRequired, nothing reaches the server."""
    with pytest.raises(ReauthenticationRequired):
        async with connect(mcp_server.url, manager, "nobody", mode="legacy"):
            pass  # pragma: no cover
    assert mcp_server.requests["POST"] == 0


async def test_concurrent_calls_in_one_session_refresh_once(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """Twenty concurrent tool calls on an expired token: one refresh, every call answered."""
    await manager.astore(SESSION, provider.login(access_ttl=30))
    results: list[str] = []
    async with connect(mcp_server.url, manager, SESSION, mode="legacy") as client:
        # Expired as far as the manager knows (the provider would still take it): the next calls refresh, and
        # the new token outlives the test however slow the machine is.
        stale = await manager.aget_token(SESSION)
        await manager.astore(SESSION, attrs.evolve(stale, expires_at=stale.issued_at))

        async def call(i: int) -> None:
            result = await client.call_tool("echo", {"text": str(i)})
            results.append(result.content[0].text)  # type: ignore[union-attr]

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(call, i)
    assert sorted(results, key=int) == [str(i) for i in range(20)]
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


@pytest.mark.parametrize("lib", ["httpx", "httpx2"])
async def test_an_mcp_transport_tells_its_last_error(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread, lib: str
) -> None:
    """Both MCP transports keep the error of their last request (the session had no tokens: nothing was sent)
    in ``last_error`` and answer it to the SDK themselves, naming it in a header; once tokens are stored, the
    next request goes through and ``last_error`` is cleared."""
    manager = make_manager()
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    notice = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    if lib == "httpx":
        legacy = LegacyAsyncMCPAuthTransport(manager, SESSION)
        transport: Any = legacy
        client: Any = httpx.AsyncClient(transport=legacy, verify=SSL)
    else:
        import httpx2

        current = AsyncMCPAuthTransport(manager, SESSION)
        transport, client = current, httpx2.AsyncClient(transport=current, verify=SSL)
    async with client:
        refused = await client.post(server.url + "/api/echo", json=call)
        assert isinstance(transport.last_error, ReauthenticationRequired)
        assert refused.headers["x-upstream-auth-error"] == "ReauthenticationRequired"
        assert provider.api_calls["/api/echo"] == 0
        tokens = await manager.astore(SESSION, provider.login())
        echoed = await client.post(server.url + "/api/echo", json=notice)
    assert echoed.json()["authorization"] == f"Bearer {tokens.access_token}"
    assert transport.last_error is None and provider.api_calls["/api/echo"] == 1
