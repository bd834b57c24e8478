"""Fixtures shared by the MCP test modules: each module defines its own ``provider`` (issuer path, token
lifetime) and imports these, which serve it, put a real MCP server in front of it, and refresh against it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from httpx_upstream_auth import MemoryStorage, OAuth2Refresher, TokenManager
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider, ServerThread, serve_mcp

__all__ = ["HeadlessBrowser", "forgetful_manager", "manager", "mcp_server", "provider_server"]


@pytest.fixture
def provider_server(provider: LocalProvider) -> Iterator[ServerThread]:
    """The module's provider on 127.0.0.1."""
    with ServerThread(provider) as running:
        yield running


@pytest.fixture
def mcp_server(provider: LocalProvider, provider_server: ServerThread) -> Iterator[LocalMCPServer]:
    """A real MCP server (streamable HTTP, stateful) accepting the provider's live tokens."""
    with serve_mcp(provider, provider_server.url + provider.issuer_path) as served:
        yield served


def _manager(provider: LocalProvider, provider_server: ServerThread, **settings: Any) -> TokenManager:
    token_url = provider_server.url + provider.issuer_path + "/token"
    return TokenManager(
        refresher=OAuth2Refresher(token_url, "test-client", "test-secret"),
        provider_id="local",
        storage=MemoryStorage(),
        **settings,
    )


@pytest.fixture
def manager(provider: LocalProvider, provider_server: ServerThread) -> Iterator[TokenManager]:
    """A manager refreshing at the provider's token endpoint (under its issuer path)."""
    made = _manager(provider, provider_server)
    yield made
    made.close()


@pytest.fixture
def forgetful_manager(provider: LocalProvider, provider_server: ServerThread) -> Iterator[TokenManager]:
    """The same, remembering no refresh failure (``failure_window=0``): the next call after one tries again."""
    made = _manager(provider, provider_server, failure_window=0)
    yield made
    made.close()


class HeadlessBrowser:
    """A ``redirect_handler``/``callback_handler`` pair: follows the authorize URL, reads the code from the redirect."""

    def __init__(self) -> None:
        self.visits = 0
        self._result: Any = None

    async def redirect(self, url: str) -> None:
        """Open the authorization URL (the provider approves at once) and keep the code it redirects with."""
        from mcp.shared.auth import AuthorizationCodeResult

        self.visits += 1
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
        query = parse_qs(urlsplit(response.headers["location"]).query)
        self._result = AuthorizationCodeResult(
            code=query["code"][0], state=query["state"][0], iss=query.get("iss", [None])[0]
        )

    async def callback(self) -> Any:
        """Hand the code to the SDK."""
        assert self._result is not None
        return self._result
