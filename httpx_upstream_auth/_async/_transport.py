"""The async transport: the auth flow for code that takes a transport instead of ``auth=``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from .._auth import UpstreamAuth
from .._models import Binding

if TYPE_CHECKING:
    from .._manager import TokenManager


class AsyncUpstreamAuthTransport(httpx.AsyncBaseTransport):
    """Wrap an inner transport so every request carries the session's upstream token.

    For ``mounts=`` (one upstream among several hosts) and SDKs that accept a transport but not an
    ``auth=``. It drives the same flow as :class:`UpstreamAuth`: refresh when needed, replay once on a
    Bearer 401 when the body can be replayed.
    """

    def __init__(
        self,
        manager: TokenManager,
        session_id: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        expect: Binding | None = None,
    ) -> None:
        self._auth = UpstreamAuth(manager, session_id, expect)
        self._transport = httpx.AsyncHTTPTransport() if transport is None else transport

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` with the token, replaying once after a rejected token."""
        flow = self._auth.async_auth_flow(request)
        try:
            request = await flow.__anext__()
            while True:
                response = await self._transport.handle_async_request(request)
                try:
                    request = await flow.asend(response)
                except StopAsyncIteration:
                    return response
                await response.aclose()
        finally:
            await flow.aclose()

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._transport.aclose()
