"""Refreshers: who redeems a refresh token. ``OAuth2Refresher`` speaks RFC 6749 over its own client."""

from __future__ import annotations

import ssl
import threading
from abc import ABC, abstractmethod
from typing import Any

import httpx

from ._async._http import send_refresh_request as async_send
from ._clock import Clock
from ._models import UpstreamTokens
from ._oauth import AUTH_METHODS, AuthMethod, build_refresh_request, check_token_url, merge_response
from ._sync._http import send_refresh_request as sync_send

__all__ = ["OAuth2Refresher", "Refresher"]


class Refresher(ABC):
    """Redeems a stored entry's refresh token and returns the next entry (``version`` + 1).

    Raises :class:`ReauthenticationRequired` when the grant is dead, :class:`RefreshFailed` when the
    refresh could not complete now, :class:`BindingMismatch` when the answer names another identity.
    Implement it to reach a provider that does not speak plain RFC 6749.
    """

    @abstractmethod
    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Redeem ``tokens.refresh_token``; blocking."""

    @abstractmethod
    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Redeem ``tokens.refresh_token``; async."""


class OAuth2Refresher(Refresher):
    """The OAuth 2.0 ``refresh_token`` grant against ``token_url``.

    Client authentication is ``client_secret_basic`` (default), ``client_secret_post`` or ``none``
    (public clients). It sends with its own httpx clients, never the caller's: pass ``client`` /
    ``async_client`` to control proxies or TLS, otherwise clients with ``timeout`` and no redirects are
    made for it. ``token_url`` must be https (plain http only on loopback). Answers larger than
    ``max_response_bytes`` are refused.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str | None = None,
        *,
        auth_method: AuthMethod = "client_secret_basic",
        scope: str | None = None,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        max_response_bytes: int = 64 * 1024,
        extra_params: dict[str, str] | None = None,
    ) -> None:
        check_token_url(token_url)
        if auth_method not in AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {', '.join(AUTH_METHODS)}, got {auth_method!r}")
        if auth_method != "none" and client_secret is None:
            raise ValueError(f"auth_method={auth_method!r} needs a client_secret (use 'none' for public clients)")
        self.token_url = token_url
        self.client_id = client_id
        self._client_secret = client_secret
        self.auth_method: AuthMethod = auth_method
        self.scope = scope
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._extra_params = dict(extra_params or {})
        self._client = client
        self._owns_client = client is None
        self._async_client = async_client
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return (
            f"OAuth2Refresher(token_url={self.token_url!r}, client_id={self.client_id!r}, "
            f"auth_method={self.auth_method!r})"
        )

    def _request(self, tokens: UpstreamTokens) -> Any:
        assert tokens.refresh_token is not None
        return build_refresh_request(
            token_url=self.token_url,
            client_id=self.client_id,
            client_secret=self._client_secret,
            auth_method=self.auth_method,
            refresh_token=tokens.refresh_token,
            scope=self.scope,
            extra_params=self._extra_params,
        )

    def _ssl_context(self) -> ssl.SSLContext:
        # Loading the CA bundle is the slow part of making a client: do it once.
        with self._lock:
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            return self._ssl

    def _sync_client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(timeout=self.timeout, follow_redirects=False)
            return self._client

    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Redeem the refresh token with the sync client."""
        request = self._request(tokens)
        sent_at = clock.time()
        status, body = sync_send(self._sync_client(), request, self.max_response_bytes)
        return merge_response(tokens, status, body, sent_at)

    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Redeem the refresh token with an async client."""
        request = self._request(tokens)
        if self._async_client is not None:
            sent_at = clock.time()
            status, body = await async_send(self._async_client, request, self.max_response_bytes)
        else:
            # A client per refresh: an async connection pool belongs to one event loop, and one manager
            # serves many (successive anyio.run calls, asyncio and trio). Refreshes are rare.
            async with httpx.AsyncClient(
                timeout=self.timeout, follow_redirects=False, verify=self._ssl_context()
            ) as client:
                sent_at = clock.time()
                status, body = await async_send(client, request, self.max_response_bytes)
        return merge_response(tokens, status, body, sent_at)

    def close(self) -> None:
        """Close the sync client this refresher made (an injected client is the caller's to close)."""
        if not self._owns_client:
            return
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
