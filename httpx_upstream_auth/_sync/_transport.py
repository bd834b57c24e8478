# Generated from _async by tests/unasync_twins.py: do not edit.
"""The async transport: the auth flow for code that takes a transport instead of ``auth=``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from .._auth import UpstreamAuth
from .._models import Binding

if TYPE_CHECKING:
    from .._manager import TokenManager


class UpstreamAuthTransport(httpx.BaseTransport):
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
        transport: httpx.BaseTransport | None = None,
        expect: Binding | None = None,
    ) -> None:
        self._auth = UpstreamAuth(manager, session_id, expect)
        self._transport = httpx.HTTPTransport() if transport is None else transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` with the token, replaying once after a rejected token."""
        flow = self._auth.sync_auth_flow(request)
        try:
            request = flow.__next__()
            while True:
                response = self._transport.handle_request(request)
                try:
                    request = flow.send(response)
                except StopIteration:
                    return response
                response.close()
        finally:
            flow.close()

    def close(self) -> None:
        """Close the inner transport."""
        self._transport.close()
