"""Keep the SDK's login, replace its refresh: the SDK's ``TokenStorage`` over our storage, and an auth that
logs in through the SDK's ``OAuthClientProvider`` only when a login is really needed.

Token conversions: the SDK's ``OAuthToken`` says ``expires_in`` (relative to when it was obtained, and
lost on a restart); our entries say ``expires_at`` (absolute) and carry the identity they belong to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import httpx2
from mcp.client.auth import OAuthClientProvider
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from .._answer import MAX_LIFETIME
from .._exceptions import ReauthenticationRequired, UpstreamAuthError
from .._manager import TokenManager
from .._models import EntryKey, UpstreamTokens
from .._storages import Storage
from ._discovery import (
    DiscoveryFailed,
    IssuerMismatch,
    ServerMetadata,
    check_may_contact,
    issuers_match,
    screen_challenge,
)
from ._errors import LoginFailed
from ._refresher import DiscoveringRefresher

__all__ = ["SDKLogin", "SDKLoginAuth", "TokenStorageAdapter", "oauth_token_from", "tokens_from_oauth"]

logger = logging.getLogger("httpx_upstream_auth.mcp")


def tokens_from_oauth(
    token: OAuthToken,
    *,
    obtained_at: float,
    provider_id: str | None = None,
    user_id: str | None = None,
    upstream_subject: str | None = None,
    client_id: str | None = None,
    issuer: str | None = None,
) -> UpstreamTokens:
    """Our entry for the SDK's ``OAuthToken``: ``expires_in`` made absolute from ``obtained_at``.

    ``obtained_at`` is when the token request was sent (or, at worst, when the answer arrived): the
    expiry is counted from it. The binding fields say whose tokens these are; ``issuer`` the
    authorization server that issued them (refreshes go only there). A lifetime the token answer's reader
    would not take (negative, or beyond ``MAX_LIFETIME``) is unknown, as it is for a refresh.
    """
    lifetime = token.expires_in
    expires_at = None if lifetime is None or not 0 <= lifetime <= MAX_LIFETIME else obtained_at + lifetime
    return UpstreamTokens(
        access_token=token.access_token,
        refresh_token=token.refresh_token,
        token_type=token.token_type,
        scope=token.scope,
        expires_at=expires_at,
        issued_at=obtained_at,
        provider_id=provider_id,
        user_id=user_id,
        upstream_subject=upstream_subject,
        client_id=client_id,
        issuer=issuer,
    )


def oauth_token_from(tokens: UpstreamTokens, *, now: float | None = None) -> OAuthToken:
    """The SDK's ``OAuthToken`` for our entry, ``expires_in`` counted from ``now`` (never negative)."""
    now = time.time() if now is None else now
    expires_in = None if tokens.expires_at is None else max(0, int(tokens.expires_at - now))
    return OAuthToken(
        access_token=tokens.access_token,
        token_type="Bearer",
        expires_in=expires_in,
        scope=tokens.scope,
        refresh_token=tokens.refresh_token,
    )


class TokenStorageAdapter:
    """The SDK's ``TokenStorage`` (four async methods) over a :class:`TokenManager`'s storage.

    For apps that keep the SDK's ``OAuthClientProvider`` but want its tokens persistent and shared:
    tokens are stored as one session of ``manager`` (absolute expiry, binding fields), and the client
    registration next to them. ``get_tokens`` hands out a valid token when it can, refreshed through the
    manager (single-flight, rotation-safe) rather than by the SDK. Pass ``user_id`` and
    ``upstream_subject`` to bind the entry to an identity.
    """

    def __init__(
        self,
        manager: TokenManager,
        session_id: str,
        server_url: str,
        *,
        user_id: str | None = None,
        upstream_subject: str | None = None,
    ) -> None:
        self.manager = manager
        """Where tokens are kept (its storage), and who refreshes them."""
        self.session_id = session_id
        """The session the tokens are stored as."""
        self.server_url = server_url
        """The MCP server the client registration belongs to."""
        self.user_id = user_id
        """Bound into stored entries: the user these tokens belong to."""
        self.upstream_subject = upstream_subject
        """Bound into stored entries: the user's id at the provider."""
        self._registrations = _registration_store(manager.storage)
        self.saves = 0
        """How many times the SDK stored tokens (``set_tokens``)."""

    async def get_tokens(self) -> OAuthToken | None:
        """A valid token for the SDK (refreshed through the manager when needed); ``None`` means log in."""
        try:
            tokens = await self.manager.aget_token(self.session_id)
        except ReauthenticationRequired:
            return None
        except UpstreamAuthError:
            # The refresh cannot happen now: hand the stored entry over as it is.
            entry = await self.manager.storage.aget(EntryKey(self.manager.provider_id, self.session_id))
            return None if entry is None else oauth_token_from(entry)
        return oauth_token_from(tokens)

    async def set_tokens(self, tokens: OAuthToken) -> None:
        """Store tokens the SDK obtained, with an absolute expiry, the binding fields and (when the client
        registration records it) the issuer."""
        await self.store_tokens(tokens)

    async def store_tokens(self, tokens: OAuthToken, *, issuer: str | None = None) -> None:
        """:meth:`set_tokens`, saying which authorization server issued the tokens (default: the one the
        client registration records)."""
        client = await self.get_client_info()
        if issuer is None and client is not None:
            issuer = getattr(client, "issuer", None)
        self.saves += 1
        await self.manager.astore(
            self.session_id,
            tokens_from_oauth(
                tokens,
                obtained_at=time.time(),
                provider_id=self.manager.provider_id,
                user_id=self.user_id,
                upstream_subject=self.upstream_subject,
                client_id=None if client is None else client.client_id,
                issuer=issuer,
            ),
        )

    async def has_client_info(self) -> bool:
        """Whether a client registration is stored (readable or not)."""
        return await self._registrations.aget(self.server_url) is not None

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        """The client registered with the server's authorization server, if any."""
        record = await self._registrations.aget(self.server_url)
        return None if record is None else OAuthClientInformationFull.model_validate_json(record)

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        """Store the client the SDK registered (it holds the secret our refresher authenticates with)."""
        await self._registrations.aput(self.server_url, client_info.model_dump_json(exclude_none=True))

    async def save_client_info(
        self, client_info: OAuthClientInformationFull, *, keep_same_issuer: bool = False
    ) -> OAuthClientInformationFull | None:
        """:meth:`set_client_info`; with ``keep_same_issuer``, unless the stored client is another one registered at
        the same issuer (a concurrent first login elsewhere registered it): then that one is kept and returned
        (compare-and-set: of two such logins, one client wins, whatever the timing)."""
        record = client_info.model_dump_json(exclude_none=True)
        if not keep_same_issuer or client_info.issuer is None:
            await self._registrations.aput(self.server_url, record)
            return None

        def keep(stored: str) -> bool:
            try:
                other = OAuthClientInformationFull.model_validate_json(stored)
            except ValueError:
                return False
            return (
                other.issuer is not None
                and issuers_match(other.issuer, client_info.issuer or "")
                and other.client_id != client_info.client_id
            )

        kept = await self._registrations.aput_unless(self.server_url, record, keep)
        return None if kept is None else OAuthClientInformationFull.model_validate_json(kept)


def _registration_store(storage: Storage) -> Any:
    from ._discovery import MetadataStore
    from ._refresher import REGISTRATION_NAMESPACE

    return MetadataStore(storage, REGISTRATION_NAMESPACE)


RedirectHandler = Callable[[str], Awaitable[None]]
CallbackHandler = Callable[[], Awaitable[AuthorizationCodeResult]]


class SDKLogin:
    """Log users in with the SDK's interactive flow; refresh with ours. One per MCP server.

    ::

        login = SDKLogin("https://mcp.example/mcp", storage=SQLiteStorage("tokens.db"),
                         client_metadata=OAuthClientMetadata(redirect_uris=[...], ...),
                         redirect_handler=open_browser, callback_handler=wait_for_code)
        async with connect(url, login, "session-1") as client:   # or httpx2.AsyncClient(auth=login.auth(...))
            ...

    The first login, and any genuine re-login (the grant died), go through the SDK's own
    ``OAuthClientProvider``: discovery, dynamic client registration, authorization code with PKCE, your
    ``redirect_handler`` / ``callback_handler``. Its tokens, the client it registered and the server's
    metadata are stored in ``storage``, so a restart needs no login. Everything else is ours: one
    single-flight refresh per expiry across tasks and processes, at the discovered token endpoint (with
    ``resource``), a refresh on a 401 before any browser, and no lock held across a request.

    Tokens and the registration record the issuer they came from, and are refreshed only there. Logins go
    only to the trusted authorization server (the ``issuer`` pin, else the one the first login found): when
    the server later names another, the call raises :class:`IssuerMismatch` (nothing is sent to the new one,
    no browser opens) unless ``allow_issuer_change`` sends the user to log in there, which it never does with
    a pin or a pre-registered ``client_information`` (that client belongs to one authorization server).
    """

    def __init__(
        self,
        server_url: str,
        *,
        client_metadata: OAuthClientMetadata | None = None,
        redirect_handler: RedirectHandler | None = None,
        callback_handler: CallbackHandler | None = None,
        storage: Storage | None = None,
        provider_id: str | None = None,
        issuer: str | None = None,
        allow_issuer_change: bool = False,
        client_metadata_url: str | None = None,
        client_information: OAuthClientInformationFull | None = None,
        sdk_provider: Callable[[Any], OAuthClientProvider] | None = None,
        manager_options: dict[str, Any] | None = None,
    ) -> None:
        from .._storages import MemoryStorage

        if client_metadata is None and sdk_provider is None:
            raise TypeError("SDKLogin needs client_metadata (for the SDK's interactive login) or an sdk_provider")

        self.server_url = server_url
        """The MCP server."""
        self.client_metadata = client_metadata
        """What the SDK registers the client with (``None`` with an ``sdk_provider``)."""
        self.redirect_handler = redirect_handler
        self.callback_handler = callback_handler
        self.sdk_provider = sdk_provider
        """Builds the SDK provider that logs in, from the ``TokenStorage`` it must use (default: the SDK's
        ``OAuthClientProvider`` with ``client_metadata`` and the handlers). For grants without a user, such
        as the SDK's ``ClientCredentialsOAuthProvider`` / ``PrivateKeyJWTOAuthProvider``: their tokens carry no
        refresh token, so each expiry is a new grant through that provider."""
        self.client_information = client_information
        """A pre-registered client (id, secret, auth method): used for logins and refreshes, nothing registered."""
        self.client_metadata_url = client_metadata_url
        """An https URL of a client ID metadata document (the SDK uses it as the client id where the authorization
        server supports that, instead of registering)."""
        self.issuer = issuer
        """The pinned authorization server: logins and refreshes anywhere else raise :class:`IssuerMismatch`."""
        self.allow_issuer_change = allow_issuer_change
        """Whether a server that now names another authorization server sends the user to log in there (without
        a pin or a pre-registered client only); by default that is an :class:`IssuerMismatch` and nothing is
        sent to it."""
        storage = MemoryStorage() if storage is None else storage
        if client_information is None:
            self.refresher = DiscoveringRefresher(server_url, storage=storage, issuer=issuer)
        else:
            self.refresher = DiscoveringRefresher(
                server_url,
                client_information.client_id,
                client_information.client_secret,
                auth_method=client_information.token_endpoint_auth_method or "client_secret_basic",
                storage=storage,
                issuer=issuer,
            )
        """Refreshes at the discovered token endpoint with the registered client."""
        self.manager = TokenManager(
            refresher=self.refresher,
            provider_id=provider_id or f"mcp:{server_url}",
            storage=storage,
            **(manager_options or {}),
        )
        """The manager keeping every session's tokens for this server."""
        # Logins in progress, per (session, event loop); and the first client registration in progress, per loop.
        self._logins: dict[tuple[str, object], anyio.Event] = {}
        self._registering: dict[object, anyio.Event] = {}

    @property
    def may_follow_issuer_change(self) -> bool:
        """Whether a login may go to another authorization server than the trusted one: only with
        ``allow_issuer_change``, no ``issuer`` pin and no pre-registered client (which belongs to one server)."""
        return self.allow_issuer_change and self.issuer is None and self.client_information is None

    def auth(self, session_id: str, *, user_id: str | None = None, upstream_subject: str | None = None) -> SDKLoginAuth:
        """An ``httpx2.Auth`` for one session (one per client; cheap)."""
        return SDKLoginAuth(self, session_id, user_id=user_id, upstream_subject=upstream_subject)

    async def aclose(self) -> None:
        """Close the manager (storage, refresher)."""
        await self.manager.aclose()

    async def __aenter__(self) -> SDKLogin:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class SDKLoginAuth(httpx2.Auth):
    """The ``httpx2.Auth`` of one session under :class:`SDKLogin`: ours normally, the SDK's for a login.

    A request is sent with the session's token from the manager (refreshed when due, refreshed and
    replayed once after a 401). Only when the manager says re-authentication is required does the
    request go through the SDK's ``OAuthClientProvider``, whose login stores new tokens through a
    :class:`TokenStorageAdapter`; the SDK never refreshes. Nothing is held across a request, except by
    the SDK while it logs a user in.

    Every request of the SDK's login is vetted before it leaves: https only (plain http only to loopback, and
    only for an MCP server on loopback), a 401's ``resource_metadata`` only on the MCP server's origin, and the
    authorization server it chose must be the trusted one (:meth:`DiscoveringRefresher.atrusted_issuer`)
    unless :attr:`SDKLogin.allow_issuer_change` says to follow. Logins of one session are one at a time (across
    its connections), and the first registration of a client is made once, for every session.
    """

    def __init__(
        self,
        login: SDKLogin,
        session_id: str,
        *,
        user_id: str | None = None,
        upstream_subject: str | None = None,
    ) -> None:
        self._login = login
        self._session_id = session_id
        self._ours = login.manager.auth(session_id)
        self.storage = TokenStorageAdapter(
            login.manager,
            session_id,
            login.server_url,
            user_id=user_id,
            upstream_subject=upstream_subject,
        )
        """The SDK's view of this session's tokens and client registration."""
        self._login_only = login_only = _LoginOnly(self.storage, login)
        if login.sdk_provider is not None:
            self.sdk = login.sdk_provider(login_only)
        else:
            assert login.client_metadata is not None
            self.sdk = OAuthClientProvider(
                login.server_url,
                # A copy per session: the SDK rewrites its scope (from the challenge, or a step-up's union); that
                # must not leak into other sessions' logins.
                login.client_metadata.model_copy(deep=True),
                storage=login_only,
                redirect_handler=None if login.redirect_handler is None else self._redirect,
                callback_handler=login.callback_handler,
                client_metadata_url=login.client_metadata_url,
            )
        """The SDK's own provider, used for logins only."""
        login_only.provider = self.sdk
        self._trusted: str | None = None  # the authorization server the login in progress may use

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        """Ours first; the SDK's login flow when (and only when) re-authentication is required, or the server
        asks for more scope (403 ``insufficient_scope``: the SDK's step-up, once per request)."""
        login = self._login
        step_up: Any = None
        # Per event loop: an anyio event belongs to the loop it is waited on.
        turn = (self._session_id, anyio.lowlevel.current_token())
        for attempt in range(2):  # pragma: no branch - left by a break or a return (the second turn breaks)
            flow: AsyncGenerator[Any, Any] = self._ours.async_auth_flow(request)  # type: ignore[arg-type]
            last: Any = None
            try:
                outgoing: Any = await flow.__anext__()
                while True:
                    last = yield outgoing
                    outgoing = await flow.asend(last)
            except StopAsyncIteration:
                if not _wants_more_scope(last):
                    return
                step_up = last
            except ReauthenticationRequired:
                pass  # no tokens yet, or the grant is dead: log in (below)
            except IssuerMismatch:
                if not login.may_follow_issuer_change:
                    raise
                # The user's configuration allows following the server to its new authorization server: a
                # new login there (the SDK re-registers; nothing of the old issuer's is sent).
            finally:
                await flow.aclose()
            pending = login._logins.get(turn)
            if step_up is not None or pending is None or attempt:
                break
            # Another request of this session (on any of its connections) is logging the user in: wait for it
            # (holding nothing), then try our tokens again rather than start a second login.
            await pending.wait()
        done = anyio.Event()
        login._logins[turn] = done
        registering: anyio.Event | None = None
        try:
            registering = await self._registration_turn()
            self._trusted = await login.refresher.atrusted_issuer()
            context = self.sdk.context
            # The SDK keeps the last tokens it saw in memory; they may be rotated away since. Forget them, so
            # it does not refresh with a consumed refresh token (that would revoke the grant): it logs in. Forget
            # what it discovered before too: the authorization server it chooses now is vetted afresh.
            context.clear_tokens()
            context.auth_server_url = None
            context.oauth_metadata = None
            context.protected_resource_metadata = None
            request.headers.pop("Authorization", None)
            stepped_up = step_up is not None
            # A login (or a step-up), then at most one step-up if the replay lacks scope; left by a break (the second
            # turn breaks).
            for _ in range(2):  # pragma: no branch
                sdk_flow = self.sdk.async_auth_flow(request)
                last = None
                try:
                    outgoing = await sdk_flow.__anext__()
                    if step_up is not None:
                        # The SDK's step-up reads the 403 we already have (not sent twice): it authorizes the
                        # union of the scopes asked before and the challenge's, then replays the request.
                        outgoing = await sdk_flow.asend(self._screened(step_up))
                    while True:
                        self._vet(outgoing, request)
                        last = yield outgoing
                        outgoing = await sdk_flow.asend(self._screened(last))
                except StopAsyncIteration:
                    pass
                except UpstreamAuthError:
                    raise
                except Exception as exc:
                    # The SDK's own errors (the user closed the browser, a state mismatch, a refused code
                    # exchange, a callback that timed out) would escape into the SDK's task group and end the
                    # session: ours reaches the caller instead. Only the type is said: the SDK's text may quote
                    # the provider.
                    raise LoginFailed(
                        f"the login through the MCP SDK did not complete ({type(exc).__name__}): the user may "
                        "have closed the browser, or the authorization server refused the code. Try the login "
                        "again."
                    ) from exc
                finally:
                    await sdk_flow.aclose()
                await self._adopt_metadata()
                if stepped_up or not _wants_more_scope(last):
                    break
                step_up, stepped_up = last, True
        finally:
            # Events, not locks: this generator may be closed from another task, and setting an event from
            # there is fine (releasing a lock is not).
            if login._logins.get(turn) is done:
                del login._logins[turn]
            done.set()
            if registering is not None:
                self._login_only.registered = None
                if login._registering.get(turn[1]) is registering:
                    del login._registering[turn[1]]
                registering.set()

    async def _registration_turn(self) -> anyio.Event | None:
        """Wait while another login of this :class:`SDKLogin` registers the first client (so that every session
        uses that one client, not one each); when none is stored, this login registers it: its event, set
        once the registration is stored."""
        login = self._login
        if login.client_information is not None:
            return None
        loop = anyio.lowlevel.current_token()
        while True:
            if await self.storage.has_client_info():
                return None
            registering = login._registering.get(loop)
            if registering is None:
                break
            await registering.wait()
        registering = login._registering[loop] = anyio.Event()
        self._login_only.registered = registering
        return registering

    def _vet(self, outgoing: httpx2.Request, request: httpx2.Request) -> None:
        """Refuse a request of the SDK's login before it leaves: plain http where it is not allowed, or an
        authorization server that is not the trusted one (when the configuration does not allow following)."""
        login = self._login
        url = str(outgoing.url)
        check_may_contact(url, login.server_url, "URL the login would send a request to")
        if outgoing.url == request.url:
            return  # the MCP request itself (sent first, then replayed with the new token)
        context = self.sdk.context
        chosen = context.auth_server_url
        if chosen is None and context.oauth_metadata is not None:
            chosen = str(context.oauth_metadata.issuer)
        if chosen is None and outgoing.method != "GET":
            # No metadata (the SDK's 2025-03-26 fallback): registration and token requests go to the MCP server's
            # own origin, which acts as the authorization server then.
            parts = urlsplit(login.server_url)
            chosen = f"{parts.scheme}://{parts.netloc}"
        self._check_issuer(chosen)

    def _check_issuer(self, chosen: str | None) -> None:
        trusted = self._trusted
        if chosen is None or trusted is None or issuers_match(chosen, trusted):
            return
        login = self._login
        if login.may_follow_issuer_change:
            return
        why = (
            "a pre-registered client (client_information) belongs to one authorization server"
            if login.client_information is not None
            else "the issuer= pin"
            if login.issuer is not None
            else "allow_issuer_change is off"
        )
        raise IssuerMismatch(
            login.server_url,
            trusted,
            chosen,
            message=(
                f"the MCP server {login.server_url} now names authorization server {chosen}, but logins for it go to "
                f"{trusted} ({why}); nothing was sent there and the user was not sent there. If the server really "
                "moved, check with its operator, then change the configuration."
            ),
        )

    def _screened(self, response: Any) -> Any:
        """``response`` with any ``resource_metadata`` of another origin removed from its challenge: the SDK would
        fetch it wherever it points (an internal service, say)."""
        if response is None or response.status_code not in (401, 403):
            return response
        challenge = response.headers.get("www-authenticate")
        if challenge:
            screened = screen_challenge(challenge, self._login.server_url)
            if screened != challenge:
                response.headers["www-authenticate"] = screened
        return response

    async def _redirect(self, url: str) -> None:
        """The user's ``redirect_handler``, once the authorization server is known to support PKCE S256 (the MCP
        spec forbids the login otherwise, and the SDK does not check it; without any metadata, on the SDK's
        2025-03-26 fallback path, there is nothing to check), is the trusted one, and is reached over https."""
        metadata = self.sdk.context.oauth_metadata
        if metadata is not None and "S256" not in (metadata.code_challenge_methods_supported or ()):
            raise DiscoveryFailed(
                f"the authorization server {metadata.issuer} does not advertise PKCE S256 "
                "(code_challenge_methods_supported): the MCP spec forbids an authorization-code login there, so "
                "the user was not sent to it. Ask its operator to support and advertise S256.",
                retryable=False,
            )
        check_may_contact(url, self._login.server_url, "authorization endpoint")
        self._check_issuer(None if metadata is None else str(metadata.issuer))
        assert self._login.redirect_handler is not None
        await self._login.redirect_handler(url)

    async def _adopt_metadata(self) -> None:
        """Tell our refresher what the SDK discovered, so it never fetches it again (and store it); store the
        client the login used too (the SDK may have reused one it kept in memory, whose record is gone)."""
        context = self.sdk.context
        if context.client_info is not None and self._login.client_information is None:
            await self.storage.set_client_info(context.client_info)
        metadata = context.oauth_metadata
        if metadata is None:
            return
        resource = None
        if context.protected_resource_metadata is not None:
            resource = str(context.protected_resource_metadata.resource)
        found = ServerMetadata(
            server_url=self._login.server_url,
            resource=resource,
            issuer=str(metadata.issuer),
            token_endpoint=str(metadata.token_endpoint),
            authorization_endpoint=str(metadata.authorization_endpoint),
            registration_endpoint=_text(metadata.registration_endpoint),
            token_endpoint_auth_methods=tuple(metadata.token_endpoint_auth_methods_supported or ()),
            code_challenge_methods=tuple(metadata.code_challenge_methods_supported or ()),
            discovered_at=time.time(),
        )
        await self._login.refresher.asave_metadata(found)


def _wants_more_scope(response: Any) -> bool:
    if response is None or response.status_code != 403:
        return False
    from ._transport import challenge_params

    return challenge_params(response.headers.get("www-authenticate")).get("error") == "insufficient_scope"


def _text(value: object) -> str | None:
    return None if value is None else str(value)


class _LoginOnly:
    """The adapter as the SDK's provider sees it in :class:`SDKLoginAuth`: no tokens to start from.

    The SDK is asked only when a login is needed, so it must not find (and refresh) stored tokens. A
    pre-registered client is handed over bound to the trusted issuer (the SDK then never presents it to another
    authorization server); a client the SDK registers is stored unless one was registered at the same issuer
    meanwhile (another process's first login): then the SDK logs in with that one, so the session's tokens
    belong to the client every process refreshes with.
    """

    def __init__(self, adapter: TokenStorageAdapter, login: SDKLogin) -> None:
        self._adapter = adapter
        self._login = login
        self.provider: OAuthClientProvider | None = None
        self.registered: anyio.Event | None = None
        """Set once this login's client registration is stored (see ``SDKLoginAuth._registration_turn``)."""

    async def get_tokens(self) -> OAuthToken | None:
        return None

    async def set_tokens(self, tokens: OAuthToken) -> None:
        # The SDK exchanged the code at the token endpoint of the metadata it discovered: that is the issuer.
        metadata = None if self.provider is None else self.provider.context.oauth_metadata
        await self._adapter.store_tokens(tokens, issuer=None if metadata is None else str(metadata.issuer))

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        preregistered = self._login.client_information
        if preregistered is None:
            return await self._adapter.get_client_info()
        trusted = await self._login.refresher.atrusted_issuer()
        if trusted is None:
            logger.warning(
                "a pre-registered client logs in at the authorization server %s names, trusted on first use: pin "
                "SDKLogin(issuer=...) to the one it was registered at",
                self._login.server_url,
            )
            return preregistered
        return preregistered.model_copy(update={"issuer": trusted})

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        kept = await self._adapter.save_client_info(client_info, keep_same_issuer=True)
        if kept is not None and self.provider is not None:
            self.provider.context.client_info = kept
        if self.registered is not None:
            self.registered.set()
