"""Connect in one call with the MCP SDK 1.x (httpx): a ``ClientSession`` that sends a session's upstream tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx

from .._models import Binding
from ._errors import find_upstream_error, insecure_transport, raise_upstream_errors
from ._transport import LegacyAsyncMCPAuthTransport

if TYPE_CHECKING:
    from .._manager import TokenManager

__all__ = ["connect_session", "legacy_http_client"]


def legacy_http_client(
    manager: TokenManager,
    session_id: str,
    *,
    expect: Binding | None = None,
    headers: dict[str, str] | None = None,
    timeout: httpx.Timeout | float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for the SDK 1.x's ``streamable_http_client(url, http_client=...)``.

    The 1.x twin of :func:`http_client`: our errors reach the caller of each request instead of
    cancelling the session. Timeouts default to the SDK's (30 s, 300 s to read). Close it when done.
    """
    return httpx.AsyncClient(
        transport=LegacyAsyncMCPAuthTransport(manager, session_id, expect=expect, transport=transport),
        headers=headers,
        timeout=httpx.Timeout(30.0, read=300.0) if timeout is None else timeout,
    )


@asynccontextmanager
async def connect_session(
    url: str,
    manager: TokenManager,
    session_id: str,
    *,
    expect: Binding | None = None,
    headers: dict[str, str] | None = None,
    timeout: httpx.Timeout | float | None = None,
    terminate_on_close: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
    **session_options: Any,
) -> AsyncIterator[Any]:
    """Open an initialized MCP SDK 1.x ``ClientSession`` to ``url`` as ``session_id`` of ``manager``.

    ::

        async with connect_session("https://mcp.example/mcp", manager, "session-1") as session:
            await session.call_tool("search", {"q": "otters"})   # may raise ReauthenticationRequired

    The same guarantees as :func:`connect` (2.x): refresh once per expiry, replay after a 401, our
    errors raised at the call (and at the connect), the session kept usable after them.
    ``session_options`` go to ``ClientSession`` (``read_timeout_seconds``, callbacks...).
    """
    from mcp import ClientSession
    from mcp.client import streamable_http

    insecure = insecure_transport(url)
    if insecure is not None:
        raise insecure
    async with legacy_http_client(
        manager, session_id, expect=expect, headers=headers, timeout=timeout, transport=transport
    ) as http:
        opener: Any = streamable_http.streamable_http_client  # the 1.x signature (httpx); mypy may see 2.x
        try:
            async with (
                opener(url, http_client=http, terminate_on_close=terminate_on_close) as streams,
                ClientSession(streams[0], streams[1], **session_options) as session,
            ):
                raise_upstream_errors(session)
                await session.initialize()
                yield session
        except Exception as exc:
            ours = find_upstream_error(exc)
            if ours is None:
                raise
            raise ours from exc
