"""The httpx2 transport (the MCP SDK 2.x); see ``_transport`` for why it answers failures itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx2

from .._exceptions import UpstreamAuthError
from .._models import Binding
from ._transport import MCPAuthDriver

if TYPE_CHECKING:
    from .._manager import TokenManager

__all__ = ["AsyncMCPAuthTransport"]


class AsyncMCPAuthTransport(httpx2.AsyncBaseTransport):
    """An ``httpx2`` transport that sends as one session of ``manager``, for the MCP SDK 2.x.

    Refreshes and replays like :class:`UpstreamAuth`. When re-authentication is required or a refresh
    fails, the request is answered here with our error (which :func:`connect`'s client raises at the
    call site) instead of raising inside the SDK, where it would cancel the whole session.
    ``auth`` replaces ``manager.auth(session_id)`` with another flow over the same session, such as
    :class:`SDKLoginAuth`.
    """

    def __init__(
        self,
        manager: TokenManager,
        session_id: str,
        *,
        expect: Binding | None = None,
        transport: httpx2.AsyncBaseTransport | None = None,
        auth: httpx2.Auth | None = None,
    ) -> None:
        self._driver = MCPAuthDriver(manager, session_id, expect, auth, transport_errors=(httpx2.TransportError,))
        self._transport = httpx2.AsyncHTTPTransport() if transport is None else transport

    @property
    def last_error(self) -> UpstreamAuthError | None:
        """The error of the last request, ``None`` once a request succeeded."""
        return self._driver.failed

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` with the session's token, or answer it with the auth's error."""
        response: httpx2.Response = await self._driver.send(
            request, self._transport.handle_async_request, httpx2.Response
        )
        return response

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._transport.aclose()
