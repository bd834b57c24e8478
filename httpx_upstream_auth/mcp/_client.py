"""Connect in one call: an MCP SDK 2.x ``Client`` whose HTTP client sends a session's upstream tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from .._models import Binding
from ._errors import find_upstream_error, insecure_transport, raise_upstream_errors
from ._sdk import SDKLogin
from ._transport2 import AsyncMCPAuthTransport

if TYPE_CHECKING:
    from .._manager import TokenManager

__all__ = ["DEFAULT_TIMEOUT", "connect", "http_client"]

DEFAULT_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
"""The SDK's own defaults: 30 s to connect, write and pool; 300 s to read (a stream may stay quiet)."""


def http_client(
    manager: TokenManager | SDKLogin,
    session_id: str,
    *,
    expect: Binding | None = None,
    user_id: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: httpx2.Timeout | float | None = None,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` for ``streamable_http_client(url, http_client=...)`` that sends as the session.

    Like ``httpx2.AsyncClient(auth=manager.auth(session_id))``, with two differences that matter inside
    the SDK: our errors never cancel the MCP session (the failed request is answered with a JSON-RPC
    error the caller can turn back into ours, see :func:`raise_upstream_errors`), and after a dead grant
    the session's close does not refresh again. Timeouts default to the SDK's. Close it when done.
    With an :class:`SDKLogin` instead of a manager, logins go through the SDK's flow (``user_id`` binds
    the tokens it obtains).
    """
    if isinstance(manager, SDKLogin):
        auth = manager.auth(session_id, user_id=user_id)
        auth_transport = AsyncMCPAuthTransport(manager.manager, session_id, transport=transport, auth=auth)
    else:
        auth_transport = AsyncMCPAuthTransport(manager, session_id, expect=expect, transport=transport)
    return httpx2.AsyncClient(
        transport=auth_transport,
        headers=headers,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
    )


@asynccontextmanager
async def connect(
    url: str,
    manager: TokenManager | SDKLogin,
    session_id: str,
    *,
    expect: Binding | None = None,
    user_id: str | None = None,
    mode: str = "auto",
    headers: dict[str, str] | None = None,
    timeout: httpx2.Timeout | float | None = None,
    terminate_on_close: bool = True,
    max_sse_event_size: int | None = None,
    transport: httpx2.AsyncBaseTransport | None = None,
    **client_options: Any,
) -> AsyncIterator[Client]:
    """Open an MCP session to ``url`` (streamable HTTP) as ``session_id`` of ``manager``; yield the ``mcp.Client``.

    ::

        async with connect("https://mcp.example/mcp", manager, "session-1", mode="legacy") as client:
            result = await client.call_tool("search", {"q": "otters"})

    Tokens are refreshed once per expiry across every task, thread and process sharing the storage, and
    a rejected token is refreshed and the request replayed. When the user must log in again, or a
    refresh fails, the call raises :class:`ReauthenticationRequired` / :class:`RefreshFailed` (and so
    does the connect itself); the session stays usable, and works again once new tokens are stored.

    With an :class:`SDKLogin` in place of the manager, a session without tokens (or with a dead grant)
    logs in through the SDK's interactive flow first; ``user_id`` binds the tokens it obtains.

    ``mode``, ``read_timeout_seconds``, callbacks and every other ``mcp.Client`` option pass through
    ``client_options``; ``headers``, ``timeout`` (the SDK's defaults when ``None``) and ``transport``
    configure the HTTP client; ``terminate_on_close`` and ``max_sse_event_size`` (the SDK's default when
    ``None``) go to ``streamable_http_client``.
    """
    insecure = insecure_transport(url)
    if insecure is not None:
        raise insecure
    async with http_client(
        manager, session_id, expect=expect, user_id=user_id, headers=headers, timeout=timeout, transport=transport
    ) as http:
        stream_options: dict[str, Any] = {"terminate_on_close": terminate_on_close}
        if max_sse_event_size is not None:
            stream_options["max_sse_event_size"] = max_sse_event_size
        streams = streamable_http_client(url, http_client=http, **stream_options)
        client = Client(streams, mode=mode, **client_options)
        try:
            async with client:
                raise_upstream_errors(client.session)
                yield client
        except Exception as exc:  # the connect itself (initialize or discover) failed, maybe in a group
            ours = find_upstream_error(exc)
            if ours is None:
                raise
            raise ours from exc
