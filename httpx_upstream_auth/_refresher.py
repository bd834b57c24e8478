"""Refreshers: who redeems a refresh token. ``OAuth2Refresher`` speaks RFC 6749 over its own client."""

from __future__ import annotations

import json
import ssl
import threading
from abc import ABC, abstractmethod

import attrs
import httpx

from ._async._http import send_refresh_request as async_send
from ._clock import Clock
from ._dpop import DPoP, DPoPKey, is_nonce_challenge
from ._exceptions import ReauthenticationRequired, RefreshFailed, UpstreamAuthError
from ._jose import ClientAssertion
from ._models import UpstreamTokens
from ._oauth import (
    AUTH_METHODS,
    JWT_METHODS,
    AuthMethod,
    RefreshRequest,
    TokenAnswer,
    build_refresh_request,
    build_revocation_request,
    check_token_url,
    is_sendable_refresh_token,
    merge_response,
)
from ._sync._http import send_refresh_request as sync_send
from ._synchronization import ForkRegistry

__all__ = ["OAuth2Refresher", "Refresher"]


class Refresher(ABC):
    """Redeems a stored entry's refresh token and returns the next entry (``version`` + 1).

    Raises :class:`ReauthenticationRequired` when the grant is dead, :class:`RefreshFailed` when the
    refresh could not complete now, :class:`BindingMismatch` when the answer names another identity.
    Implement it to reach a provider that does not speak plain RFC 6749.
    """

    dpop: DPoP | None = None
    """The DPoP configuration the manager's auth flows sign API requests with (``None``: no DPoP)."""

    @abstractmethod
    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Redeem ``tokens.refresh_token``; blocking."""

    @abstractmethod
    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Redeem ``tokens.refresh_token``; async."""

    def prepare(self, tokens: UpstreamTokens) -> None:
        """Work the refresh needs before its token request, that sends no refresh token (such as finding the
        token endpoint); blocking. ``TokenManager`` calls it before the refresh lease and the bounded token
        request, itself bounded by ``refresh_timeout``: whatever fails or times out here consumed nothing, so
        the stored entry is kept. The default does nothing."""

    async def aprepare(self, tokens: UpstreamTokens) -> None:
        """Async twin of :meth:`prepare`."""

    def revoke(self, tokens: UpstreamTokens, clock: Clock) -> bool:
        """Revoke ``tokens.refresh_token`` at the provider (RFC 7009); blocking. True when the provider confirmed
        it, False when this refresher cannot revoke (the default: no revocation endpoint). Raises
        :class:`RefreshFailed` when the request failed or was refused. ``TokenManager.delete(..., revoke=True)``
        calls it after removing the entry, bounded in time."""
        return False

    async def arevoke(self, tokens: UpstreamTokens, clock: Clock) -> bool:
        """Async twin of :meth:`revoke`."""
        return False

    def cannot_redeem_in(self, mode: str) -> str | None:
        """Why this refresher cannot redeem as a ``mode`` job (``"thread"``: :meth:`refresh`; ``"task"``:
        :meth:`arefresh`) with the configuration it was given, or ``None`` when it can.
        ``TokenManager`` refuses the combination at construction with this text."""
        return None


class OAuth2Refresher(Refresher):
    """The OAuth 2.0 ``refresh_token`` grant against ``token_url``.

    Client authentication is ``client_secret_basic`` (default), ``client_secret_post``, ``none`` (public
    clients), or a signed JWT (RFC 7523, the ``[jwt]`` extra): ``private_key_jwt`` with a
    :class:`ClientAssertion` over the client's private key as ``client_assertion``, or
    ``client_secret_jwt`` (HS256 over ``client_secret``, or the ``client_assertion`` given). A new
    assertion, with a fresh ``jti``, is signed for every token request, retries included.

    With ``dpop=DPoP()`` (RFC 9449) every token request carries a DPoP proof signed with the session's key
    (see :class:`DPoP`); an answer asking for a server nonce (``use_dpop_nonce``) is answered by sending the
    request once more, with the nonce and a new proof (and a new assertion).

    It sends with its own httpx clients, never the caller's, made from ``timeout``, ``verify`` (a CA bundle
    path, ``False``, or an ``ssl.SSLContext``, which also carries a client certificate for mTLS), ``proxy`` and
    ``trust_env``, so a refresh goes out the same way from a worker thread (sync) and from a task (async). Or
    pass your own ``client`` (used by thread jobs, the default) and ``async_client`` (used by
    ``redeem_in="task"`` jobs): a manager refuses a refresher that has only the other kind, rather than redeem
    with settings it was not given. The token request never follows a redirect, whatever the client's setting.
    ``token_url`` must be https (plain http only on loopback). Answers larger than ``max_response_bytes``, or
    still arriving ``timeout`` seconds after the request was sent, are refused.

    With ``revocation_url`` (the provider's RFC 7009 revocation endpoint, https as ``token_url``), :meth:`revoke`
    revokes a refresh token there, authenticating the client as for the token request: a logout with
    ``TokenManager.delete(session_id, revoke=True)`` ends the grant at the provider too.

    Every failure is an :class:`UpstreamAuthError` (see :func:`merge_response` for how answers are read);
    :attr:`RefreshFailed.may_have_rotated` is set when the request may have reached the provider and its
    answer was lost or unusable. No exception it raises holds a secret, in its text or in the locals of
    its traceback's frames.
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
        verify: ssl.SSLContext | str | bool = True,
        proxy: str | None = None,
        trust_env: bool = True,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        max_response_bytes: int = 64 * 1024,
        extra_params: dict[str, str] | None = None,
        revocation_url: str | None = None,
        client_assertion: ClientAssertion | None = None,
        dpop: DPoP | None = None,
    ) -> None:
        check_token_url(token_url)
        if revocation_url is not None:
            check_token_url(revocation_url, "revocation_url")
        if auth_method not in AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {', '.join(AUTH_METHODS)}, got {auth_method!r}")
        self._assertion = _assertion_for(auth_method, client_secret, client_assertion)
        self.dpop = dpop
        if auth_method not in ("none", "private_key_jwt") and client_secret is None and self._assertion is None:
            raise ValueError(f"auth_method={auth_method!r} needs a client_secret (use 'none' for public clients)")
        self.token_url = token_url
        self.revocation_url = revocation_url
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
        self._verify = verify
        self._proxy = proxy
        self._trust_env = trust_env
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        _forked.add(self)

    def cannot_redeem_in(self, mode: str) -> str | None:
        """A refresher given only ``async_client`` cannot redeem in a worker thread, nor one given only
        ``client`` in a task: their proxy and TLS settings would be bypassed."""
        if mode == "thread" and self._client is None and self._async_client is not None:
            return (
                "OAuth2Refresher was given async_client= only, but thread jobs (TokenManager's default "
                "redeem_in='thread') send with a sync client: pass client= too (an httpx.Client with the same "
                "settings), or pass verify=/proxy= instead of clients, or use TokenManager(redeem_in='task')"
            )
        if mode == "task" and self._async_client is None and self._client is not None:
            return (
                "OAuth2Refresher was given client= only, but redeem_in='task' jobs send with an async client: "
                "pass async_client= too (an httpx.AsyncClient with the same settings), or pass verify=/proxy= "
                "instead of clients, or use TokenManager(redeem_in='thread')"
            )
        return None

    def __repr__(self) -> str:
        return (
            f"OAuth2Refresher(token_url={self.token_url!r}, client_id={self.client_id!r}, "
            f"auth_method={self.auth_method!r})"
        )

    def _request(self, tokens: UpstreamTokens, clock: Clock, key: DPoPKey | None) -> RefreshRequest:
        outcome = self._prepare(tokens, clock, key)
        # Raised here, outside the except block that may have built it: no chained error with secrets.
        if isinstance(outcome, UpstreamAuthError):
            raise outcome from None
        return outcome

    def _prepare(self, tokens: UpstreamTokens, clock: Clock, key: DPoPKey | None) -> RefreshRequest | UpstreamAuthError:
        if tokens.refresh_token is None or not is_sendable_refresh_token(tokens.refresh_token):
            return ReauthenticationRequired(
                "the stored entry has no refresh token that can be sent (none, or not UTF-8); log the user in again."
            )
        try:
            # Signed per request: each attempt (a retry included) presents an assertion never sent before.
            assertion = (
                None if self._assertion is None else self._assertion.sign(self.client_id, self.token_url, clock.time())
            )
            built = build_refresh_request(
                token_url=self.token_url,
                client_id=self.client_id,
                client_secret=self._client_secret,
                auth_method=self.auth_method,
                refresh_token=tokens.refresh_token,
                scope=self.scope,
                extra_params=self._extra_params,
                client_assertion=assertion,
            )
        except ValueError as exc:  # a configured value that cannot be form-encoded (a lone surrogate)
            return RefreshFailed(
                f"the token request could not be encoded ({type(exc).__name__}); nothing was sent. Check "
                "client_id, client_secret, scope and extra_params.",
                retryable=False,
            )
        if key is not None and self.dpop is not None:
            nonce = self.dpop.nonce(self.token_url, "token")
            built.headers["DPoP"] = key.proof("POST", self.token_url, nonce=nonce, now=clock.time())
        return built

    def _dpop_key(self, tokens: UpstreamTokens) -> tuple[DPoPKey | None, bool]:
        """The DPoP key this refresh proves (``None`` without DPoP), and whether the entry must take it."""
        return (None, False) if self.dpop is None else self.dpop.key_for_refresh(tokens)

    def _nonce_asked(self, answer: TokenAnswer, key: DPoPKey | None) -> bool:
        """Remember the answer's DPoP nonce; True when it refused the request for want of one (send again)."""
        if key is None or self.dpop is None:
            return False
        self.dpop.remember(self.token_url, "token", answer.dpop_nonce)
        return answer.dpop_nonce is not None and is_nonce_challenge(answer.status_code, None, answer.body)

    def _merged(
        self, tokens: UpstreamTokens, answer: TokenAnswer, sent_at: float, key: DPoPKey | None, new_key: bool
    ) -> UpstreamTokens:
        try:
            fresh = merge_response(tokens, answer.status_code, answer.body, sent_at, answer.retry_after)
        except RefreshFailed as exc:
            if new_key and _error_code(answer.body) == "invalid_dpop_proof":
                # The entry had no key, so its grant is not bound to one we know: another process that made a
                # key for it had its refresh redeemed and died before saving. No key this process can make will
                # do; the refresh token is not presented again, and the user logs in.
                raise ReauthenticationRequired(
                    "the token endpoint refused the DPoP proof of a key made for an entry that had none: the grant "
                    "is bound to another key (another process's refresh was redeemed, and its result lost). Log "
                    "the user in again."
                ) from exc
            raise
        if new_key:
            assert key is not None
            # The key this refresh proved: every process refreshing the session next must prove the same.
            fresh = attrs.evolve(fresh, dpop_key=key.to_jwk())
        return fresh

    def _ssl_context(self) -> ssl.SSLContext:
        # Loading the CA bundle is the slow part of making a client: do it once.
        if isinstance(self._verify, ssl.SSLContext):
            return self._verify
        with self._lock:
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context(verify=self._verify, trust_env=self._trust_env)
            return self._ssl

    def _sync_client(self) -> httpx.Client:
        verify = self._ssl_context()  # outside the lock, which it takes
        with self._lock:
            if self._client is None:
                # No keep-alive: a pooled connection that a middlebox dropped while idle fails only after
                # the request is written, which would count as possibly rotated and cost the user a login.
                self._client = httpx.Client(
                    timeout=self.timeout,
                    follow_redirects=False,
                    limits=httpx.Limits(max_keepalive_connections=0),
                    verify=verify,
                    proxy=self._proxy,
                    trust_env=self._trust_env,
                )
            return self._client

    # refresh and arefresh stay hand-written: they differ in which client sends (one long-lived sync client;
    # an injected async client, else one per refresh), and both send through the generated _http twins.
    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Redeem the refresh token with the sync client."""
        key, new_key = self._dpop_key(tokens)
        sent_at, answer = self._send(self._request(tokens, clock, key), clock)
        if self._nonce_asked(answer, key):
            sent_at, answer = self._send(self._request(tokens, clock, key), clock)
            self._nonce_asked(answer, key)
        return self._merged(tokens, answer, sent_at, key, new_key)

    def _send(self, request: RefreshRequest, clock: Clock) -> tuple[float, TokenAnswer]:
        """Send with the sync client; ``(sent_at, answer)``."""
        client = self._sync_client()
        sent_at = clock.time()
        return sent_at, sync_send(client, request, self.max_response_bytes, self.timeout)

    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Redeem the refresh token with an async client."""
        key, new_key = self._dpop_key(tokens)
        sent_at, answer = await self._asend(self._request(tokens, clock, key), clock)
        if self._nonce_asked(answer, key):
            sent_at, answer = await self._asend(self._request(tokens, clock, key), clock)
            self._nonce_asked(answer, key)
        return self._merged(tokens, answer, sent_at, key, new_key)

    async def _asend(self, request: RefreshRequest, clock: Clock) -> tuple[float, TokenAnswer]:
        """Send with the injected async client, or one made for this request; ``(sent_at, answer)``."""
        if self._async_client is not None:
            sent_at = clock.time()
            answer = await async_send(self._async_client, request, self.max_response_bytes, self.timeout)
        else:
            # A client per refresh: an async connection pool belongs to one event loop, and one manager
            # serves many (successive anyio.run calls, asyncio and trio). Refreshes are rare.
            async with self._new_async_client() as client:
                sent_at = clock.time()
                answer = await async_send(client, request, self.max_response_bytes, self.timeout)
        return sent_at, answer

    def _new_async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self.timeout,
            follow_redirects=False,
            verify=self._ssl_context(),
            proxy=self._proxy,
            trust_env=self._trust_env,
        )

    def _revocation(self, tokens: UpstreamTokens, clock: Clock) -> RefreshRequest | None:
        if self.revocation_url is None:
            return None
        # The token request for this refresh token carries the client authentication (whatever the method);
        # the revocation request takes it from there, so both endpoints see the client the same way.
        token_request = self._request(tokens, clock, None)  # no DPoP proof: RFC 9449 defines none for revocation
        assert tokens.refresh_token is not None  # _request refused an entry without one
        return build_revocation_request(token_request, self.revocation_url, tokens.refresh_token)

    def revoke(self, tokens: UpstreamTokens, clock: Clock) -> bool:
        """Revoke the refresh token at ``revocation_url`` with the sync client (False without one)."""
        request = self._revocation(tokens, clock)
        if request is None:
            return False
        return _revoked(sync_send(self._sync_client(), request, self.max_response_bytes, self.timeout))

    async def arevoke(self, tokens: UpstreamTokens, clock: Clock) -> bool:
        """Revoke the refresh token at ``revocation_url`` with an async client (False without one)."""
        request = self._revocation(tokens, clock)
        if request is None:
            return False
        if self._async_client is not None:
            answer = await async_send(self._async_client, request, self.max_response_bytes, self.timeout)
        else:
            async with self._new_async_client() as client:
                answer = await async_send(client, request, self.max_response_bytes, self.timeout)
        return _revoked(answer)

    def _reset_in_child(self) -> None:
        # After fork(): a parent thread may have held the lock (loading the CA bundle), and the client this
        # refresher made holds the parent's connection pool. Neither is used, nor closed, by the child.
        self._lock = threading.Lock()
        if self._owns_client:
            self._client = None

    def close(self) -> None:
        """Close the sync client this refresher made (an injected client is the caller's to close)."""
        if not self._owns_client:
            return
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


def _revoked(answer: TokenAnswer) -> bool:
    """True for the revocation endpoint's 200 (RFC 7009 section 2.2), else the typed refusal."""
    if answer.status_code == 200:
        return True
    status = answer.status_code
    raise RefreshFailed(
        f"the revocation endpoint answered HTTP {status}; the token was not revoked.",
        retryable=status >= 500 or status in (408, 429),
        status_code=status,
        retry_after=answer.retry_after,
    )


def _assertion_for(
    auth_method: AuthMethod, client_secret: str | None, client_assertion: ClientAssertion | None
) -> ClientAssertion | None:
    """The assertion signer ``auth_method`` uses (``None`` for the methods without one), or ``ValueError``."""
    if auth_method not in JWT_METHODS:
        if client_assertion is not None:
            raise ValueError(
                f"client_assertion is for auth_method='private_key_jwt' or 'client_secret_jwt', not {auth_method!r}"
            )
        return None
    if auth_method == "private_key_jwt":
        if client_assertion is None or client_assertion.is_secret:
            raise ValueError(
                "auth_method='private_key_jwt' needs client_assertion=ClientAssertion(private_key) with an asymmetric "
                "alg (RS256, PS256, ES256...)"
            )
        return client_assertion
    if client_assertion is None:
        if client_secret is None:
            raise ValueError("auth_method='client_secret_jwt' needs a client_secret (the HMAC key)")
        return ClientAssertion(client_secret, alg="HS256")
    if not client_assertion.is_secret:
        raise ValueError("auth_method='client_secret_jwt' signs with the client secret: use alg='HS256' (or HS384/512)")
    return client_assertion


_forked: ForkRegistry[OAuth2Refresher] = ForkRegistry(OAuth2Refresher._reset_in_child)


def _error_code(body: bytes) -> object:
    """The ``error`` field of a JSON object body, else ``None``."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data.get("error") if isinstance(data, dict) else None
