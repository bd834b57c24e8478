"""MCP clients (the MCP Python SDK) that refresh upstream tokens instead of logging in again.

Install with ``pip install httpx-upstream-auth[mcp]``. With the SDK 2.x::

    from httpx_upstream_auth.mcp import connect

    async with connect("https://mcp.example/mcp", manager, "session-1") as client:
        await client.call_tool("search", {"q": "otters"})   # may raise ReauthenticationRequired

:func:`connect` gives an ``mcp.Client`` whose HTTP client carries the session's tokens; our errors
reach the caller of each request (the SDK would otherwise cancel the whole session). With the SDK 1.x,
:func:`connect_session` gives a ``ClientSession``. See docs/mcp.md.

Also here: discovery of the token endpoint from the server URL (:class:`DiscoveringRefresher`,
:func:`adiscover`), and SDK-login mode (:class:`SDKLogin`: the SDK's interactive login, our refresh)
with :class:`TokenStorageAdapter` for apps that keep the SDK's own provider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._discovery import (
    DiscoveryFailed,
    IssuerMismatch,
    MetadataStore,
    ServerMetadata,
    adiscover,
    authorization_server_metadata_urls,
    discover,
    protected_resource_metadata_urls,
    resource_metadata_from_challenge,
)
from ._errors import (
    ERROR_CODE,
    InsecureTransport,
    InsufficientScope,
    LoginFailed,
    ServerRefused,
    ServerUnreachable,
    SessionExpired,
    TokenRejected,
    raise_upstream_errors,
    upstream_error,
)
from ._refresher import ClientNotRegistered, ClientRegistration, DiscoveringRefresher
from ._session1 import connect_session, legacy_http_client
from ._transport import LegacyAsyncMCPAuthTransport

if TYPE_CHECKING:
    from ._client import DEFAULT_TIMEOUT, connect, http_client
    from ._sdk import SDKLogin, SDKLoginAuth, TokenStorageAdapter, oauth_token_from, tokens_from_oauth
    from ._transport2 import AsyncMCPAuthTransport

__all__ = [
    "DEFAULT_TIMEOUT",
    "ERROR_CODE",
    "AsyncMCPAuthTransport",
    "ClientNotRegistered",
    "ClientRegistration",
    "DiscoveringRefresher",
    "DiscoveryFailed",
    "InsecureTransport",
    "InsufficientScope",
    "IssuerMismatch",
    "LegacyAsyncMCPAuthTransport",
    "LoginFailed",
    "MetadataStore",
    "SDKLogin",
    "SDKLoginAuth",
    "ServerMetadata",
    "ServerRefused",
    "ServerUnreachable",
    "SessionExpired",
    "TokenRejected",
    "TokenStorageAdapter",
    "adiscover",
    "authorization_server_metadata_urls",
    "connect",
    "connect_session",
    "discover",
    "http_client",
    "legacy_http_client",
    "oauth_token_from",
    "protected_resource_metadata_urls",
    "raise_upstream_errors",
    "resource_metadata_from_challenge",
    "tokens_from_oauth",
    "upstream_error",
]

_SDK2 = {
    "DEFAULT_TIMEOUT": "._client",
    "connect": "._client",
    "http_client": "._client",
    "AsyncMCPAuthTransport": "._transport2",
    "SDKLogin": "._sdk",
    "SDKLoginAuth": "._sdk",
    "TokenStorageAdapter": "._sdk",
    "oauth_token_from": "._sdk",
    "tokens_from_oauth": "._sdk",
}


def __getattr__(name: str) -> Any:
    # The SDK 2.x names import httpx2 and mcp 2.x only when used, so the SDK 1.x helpers work without them.
    module = _SDK2.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)
