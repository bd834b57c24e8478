"""MCP SDK 1.x clients (httpx) over ``connect_session``: a real FastMCP server, real sessions, typed errors.

Runs in the second environment that ``.ci/run`` builds with ``mcp<2`` (the main one has the SDK 2.x).
"""

from __future__ import annotations

import anyio
import pytest

mcp_server_module = pytest.importorskip("mcp.server.fastmcp", reason="the MCP SDK 1.x is not installed")
if not hasattr(mcp_server_module, "FastMCP"):
    pytest.skip("the MCP SDK 2.x is installed; this module tests 1.x", allow_module_level=True)

import mcp_fixtures  # noqa: E402
from support import fail_refresh  # noqa: E402

from httpx_upstream_auth import (  # noqa: E402
    ReauthenticationRequired,
    RefreshFailed,
    TokenManager,
)
from httpx_upstream_auth.mcp import DiscoveringRefresher, connect_session  # noqa: E402
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider  # noqa: E402

# The shared fixtures, served for this module's own ``provider``.
manager = mcp_fixtures.manager
forgetful_manager = mcp_fixtures.forgetful_manager
mcp_server = mcp_fixtures.mcp_server
provider_server = mcp_fixtures.provider_server

pytestmark = pytest.mark.anyio

ISSUER_PATH = "/tenants/acme"
SESSION = "mcp1-session"


@pytest.fixture
def provider() -> LocalProvider:
    """A provider whose endpoints live under a path."""
    return LocalProvider(access_ttl=60, issuer_path=ISSUER_PATH)


async def settled(server: LocalMCPServer) -> None:
    """Wait until the session's GET stream is open, so it cannot race the test for a fault."""
    with anyio.fail_after(10):
        while server.open_streams == 0:
            await anyio.sleep(0.01)


async def test_connect_session_calls_tools(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """connect_session() gives an initialized 1.x ClientSession sending the stored token."""
    await manager.astore(SESSION, provider.login())
    async with connect_session(mcp_server.url, manager, SESSION) as session:
        result = await session.call_tool("echo", {"text": "hello"})
        assert result.content[0].text == "hello"
    assert provider.stats["token_calls"] == 0 and mcp_server.verifier.rejected == 0


async def test_revoked_access_token_is_refreshed_and_replayed(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """A token the 1.x server rejects mid-session is refreshed once and the call replayed."""
    await manager.astore(SESSION, provider.login())
    async with connect_session(mcp_server.url, manager, SESSION) as session:
        await settled(mcp_server)
        provider.revoke_access((await manager.aget_token(SESSION)).access_token)
        assert (await session.call_tool("echo", {"text": "2"})).content[0].text == "2"
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_revoked_grant_raises_reauthentication_required_at_the_call(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """With the SDK 1.x too: the call raises ReauthenticationRequired, the session survives, close does not
    refresh again, and after a new login the same session works."""
    await manager.astore(SESSION, provider.login())
    async with connect_session(mcp_server.url, manager, SESSION) as session:
        await settled(mcp_server)
        provider.revoke_grant(provider.grant_of((await manager.aget_token(SESSION)).access_token))
        for _ in range(2):
            with pytest.raises(ReauthenticationRequired):
                await session.call_tool("echo", {"text": "after"})
        await manager.astore(SESSION, provider.login())
        assert (await session.call_tool("echo", {"text": "again"})).content[0].text == "again"
    assert provider.stats["token_calls"] == 1 and provider.stats["invalid_grant"] == 1


async def test_failed_refresh_raises_refresh_failed(
    provider: LocalProvider, forgetful_manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """A 503 from the token endpoint reaches the 1.x caller as a retryable RefreshFailed; the next call works (for
    a manager that does not remember the failure)."""
    manager = forgetful_manager
    await manager.astore(SESSION, provider.login())
    async with connect_session(mcp_server.url, manager, SESSION) as session:
        await settled(mcp_server)
        provider.revoke_access((await manager.aget_token(SESSION)).access_token)
        fail_refresh(provider, "503")  # on every attempt of the job
        with pytest.raises(RefreshFailed) as caught:
            await session.call_tool("echo", {"text": "x"})
        assert caught.value.retryable
        assert (await session.call_tool("echo", {"text": "y"})).content[0].text == "y"


async def test_connect_with_a_dead_grant_raises(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """A dead grant at connect time: connect_session raises ReauthenticationRequired."""
    tokens = await manager.astore(SESSION, provider.login())
    provider.revoke_grant(provider.grant_of(tokens.access_token))
    with pytest.raises(ReauthenticationRequired):
        async with connect_session(mcp_server.url, manager, SESSION):
            pass  # pragma: no cover


async def test_discovery_against_the_1x_server(provider: LocalProvider, mcp_server: LocalMCPServer) -> None:
    """The token endpoint is discovered from the 1.x server's metadata, under the provider's path."""
    refresher = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret")
    metadata = await refresher.ametadata()
    assert metadata.token_endpoint.endswith(ISSUER_PATH + "/token")


def test_the_1x_example_in_the_docs_runs() -> None:
    """docs/mcp.md's SDK 1.x example runs as written."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "mcp.md").read_text()
    (source,) = re.findall(r"^```python sdk1\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)
    result = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("refreshes")
