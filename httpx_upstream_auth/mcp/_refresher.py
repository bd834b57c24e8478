"""``DiscoveringRefresher``: an ``OAuth2Refresher`` whose token URL (and client) come from the MCP server."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import attrs

from .._clock import Clock
from .._dpop import DPoP
from .._exceptions import ReauthenticationRequired, UpstreamAuthError
from .._jose import ClientAssertion
from .._models import UpstreamTokens
from .._refresher import OAuth2Refresher, Refresher, _assertion_for
from .._storages import Storage
from ._discovery import (
    DiscoveryFailed,
    IssuerMismatch,
    MetadataStore,
    ServerMetadata,
    adiscover,
    discover,
    issuers_match,
)

__all__ = [
    "METADATA_NAMESPACE",
    "REGISTRATION_NAMESPACE",
    "ClientNotRegistered",
    "ClientRegistration",
    "DiscoveringRefresher",
]

METADATA_NAMESPACE = "httpx-upstream-auth:mcp-metadata"
"""The provider id under which discovered metadata is stored."""
REGISTRATION_NAMESPACE = "httpx-upstream-auth:mcp-client"
"""The provider id under which client registrations (from the SDK's login) are stored."""


KEEP_ALIVE_MAX = 24 * 3600.0
"""The longest a process refreshes without rewriting the stored registration and metadata it uses."""


class ClientNotRegistered(ReauthenticationRequired):
    """No client registration is stored for the server (never logged in through the SDK, or the record outlived
    the storage's retention): log the user in again, which registers the client again (SDK-login mode does)."""


class ClientRegistration:
    """A client's credentials at an authorization server: id, secret (or ``None``), auth method, and the
    issuer they were registered with (``None``: not recorded, such as a pre-registered client)."""

    __slots__ = ("auth_method", "client_id", "client_secret", "issuer")

    def __init__(
        self, client_id: str, client_secret: str | None, auth_method: str, *, issuer: str | None = None
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.auth_method = auth_method
        self.issuer = issuer

    def __repr__(self) -> str:
        return (
            f"ClientRegistration(client_id={self.client_id!r}, auth_method={self.auth_method!r}, "
            f"issuer={self.issuer!r})"
        )

    def to_json(self) -> str:
        """Serialize (for storage; it holds the secret)."""
        return json.dumps(
            {
                "client_id": self.client_id,
                "client_secret": self.client_secret,
                "auth_method": self.auth_method,
                "issuer": self.issuer,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ClientRegistration:
        """Rebuild from :meth:`to_json` output, or from the SDK's ``OAuthClientInformationFull`` JSON."""
        data = json.loads(text)
        method = data.get("auth_method") or data.get("token_endpoint_auth_method") or "client_secret_basic"
        issuer = data.get("issuer")
        issuer = issuer if isinstance(issuer, str) else None
        return cls(data["client_id"], data.get("client_secret"), method, issuer=issuer)


class DiscoveringRefresher(Refresher):
    """Refreshes at the token endpoint the MCP server at ``server_url`` leads to, found by discovery.

    On the first refresh it reads RFC 9728 protected-resource metadata, then the authorization server's
    RFC 8414 / OpenID metadata (path-aware; nothing is guessed), and builds an :class:`OAuth2Refresher`
    for the token endpoint found, sending the server's ``resource`` (RFC 8707) when it names one. The
    result is kept in memory and, with ``storage`` (normally the manager's), stored: a restart, or
    another process, does not rediscover. Pass ``token_url`` to skip discovery (``resource`` is then the
    server URL itself).

    The client is ``client_id`` / ``client_secret`` / ``auth_method``; leave ``client_id`` out when the
    client was registered at login time (the SDK's dynamic registration through :class:`SDKLoginAuth`
    or :class:`TokenStorageAdapter`): its registration is then read from ``storage``. For
    ``auth_method="private_key_jwt"`` (or ``"client_secret_jwt"`` with a key of its own) pass
    ``client_assertion=ClientAssertion(...)``: its ``aud`` is the discovered token endpoint unless it names
    one. ``dpop=DPoP()`` binds the tokens to a key (RFC 9449) exactly as :class:`OAuth2Refresher` does: proofs
    on every token request, and on API requests of the manager's auth flows and transports (:attr:`dpop`).

    Credentials stay with their issuer: the refresh token and the client secret are sent only to the
    token endpoint of the authorization server that issued them, as recorded on the tokens
    (``UpstreamTokens.issuer``, set on every refresh), on the stored registration, and in ``issuer``
    when you pin it. When the server's metadata names another one, :class:`IssuerMismatch` is raised
    and nothing is sent there. The first discovery of tokens that record no issuer trusts what the
    server names (pin ``issuer`` to avoid that); a configured ``client_id``/``client_secret`` belongs to that
    trusted server (:meth:`atrusted_issuer`). :meth:`arevoke` (a logout with ``revoke=True``) revokes at the
    ``revocation_endpoint`` the same metadata names. Everything before the token request runs in :meth:`aprepare`,
    which ``TokenManager`` calls before its bounded token request: slow or broken metadata costs a typed
    :class:`DiscoveryFailed` / retryable ``RefreshFailed``, never the stored tokens.
    """

    def __init__(
        self,
        server_url: str,
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        auth_method: str = "client_secret_basic",
        scope: str | None = None,
        storage: Storage | None = None,
        token_url: str | None = None,
        issuer: str | None = None,
        send_resource: bool = True,
        timeout: float = 10.0,
        refresher_options: dict[str, Any] | None = None,
        client_assertion: ClientAssertion | None = None,
        dpop: DPoP | None = None,
    ) -> None:
        for name in ("client_assertion", "dpop"):
            if name in (refresher_options or {}):
                raise ValueError(f"pass {name}= to DiscoveringRefresher itself, not in refresher_options")
        if client_id is not None:  # a configured client: its authentication is checked now, not at the first refresh
            _assertion_for(auth_method, client_secret, client_assertion)  # type: ignore[arg-type]
        self.server_url = server_url
        self.dpop = dpop
        self._assertion = client_assertion
        self._client = None if client_id is None else ClientRegistration(client_id, client_secret, auth_method)
        self.scope = scope
        self.issuer = issuer
        """The pinned authorization server (``None``: the one the credentials record, else the server's)."""
        self.send_resource = send_resource
        self.timeout = timeout
        self._token_url = token_url
        self._options = dict(refresher_options or {})
        self._metadata_store = None if storage is None else MetadataStore(storage, METADATA_NAMESPACE)
        self._registrations = None if storage is None else MetadataStore(storage, REGISTRATION_NAMESPACE)
        self._lock = threading.Lock()
        self._metadata: ServerMetadata | None = None
        self._inner: OAuth2Refresher | None = None
        self._inner_for: tuple[str, str, str | None, str, str | None] | None = None
        self.discoveries = 0
        """How many times metadata was fetched from the network (0 after a restart that found it stored)."""
        self.keep_alive = KEEP_ALIVE_MAX if storage is None else min(KEEP_ALIVE_MAX, storage.retention / 3)
        """Seconds between rewrites of the stored registration and metadata while refreshes use them (records
        are kept for the storage's retention after their last write; token entries are rewritten by every
        refresh, these would not be)."""
        self._kept_alive_at: float | None = None

    def __repr__(self) -> str:
        return f"DiscoveringRefresher(server_url={self.server_url!r})"

    @property
    def metadata(self) -> ServerMetadata | None:
        """What discovery found (or was read from storage), once known."""
        return self._metadata

    @property
    def token_url(self) -> str | None:
        """The token endpoint in use, once known."""
        if self._token_url is not None:
            return self._token_url
        return None if self._metadata is None else self._metadata.token_endpoint

    # -- metadata ----------------------------------------------------------------------------------

    async def ametadata(self, www_authenticate: str | None = None, *, issuer: str | None = None) -> ServerMetadata:
        """The server's metadata: from memory, else storage, else discovery (then stored).

        With ``issuer`` (default: the pin), metadata for any other authorization server raises
        :class:`IssuerMismatch`, whether remembered or discovered (then before fetching anything from it).
        """
        issuer = self.issuer if issuer is None else issuer
        if self._metadata is not None:
            return self._checked(self._metadata, issuer)
        if self._metadata_store is not None:
            record = await self._metadata_store.aget(self.server_url)
            if record is not None:
                return self._checked(self._remember(ServerMetadata.from_json(record)), issuer)
        found = await adiscover(self.server_url, www_authenticate=www_authenticate, timeout=self.timeout, issuer=issuer)
        self.discoveries += 1
        if self._metadata_store is not None:
            await self._metadata_store.aput(self.server_url, found.to_json())
        return self._remember(found)

    def metadata_sync(self, *, issuer: str | None = None) -> ServerMetadata:
        """Blocking twin of :meth:`ametadata`."""
        issuer = self.issuer if issuer is None else issuer
        if self._metadata is not None:
            return self._checked(self._metadata, issuer)
        if self._metadata_store is not None:
            record = self._metadata_store.get(self.server_url)
            if record is not None:
                return self._checked(self._remember(ServerMetadata.from_json(record)), issuer)
        found = discover(self.server_url, timeout=self.timeout, issuer=issuer)
        self.discoveries += 1
        if self._metadata_store is not None:
            self._metadata_store.put(self.server_url, found.to_json())
        return self._remember(found)

    def _checked(self, metadata: ServerMetadata, issuer: str | None) -> ServerMetadata:
        if issuer is not None and not issuers_match(metadata.issuer, issuer):
            raise IssuerMismatch(self.server_url, issuer, metadata.issuer)
        return metadata

    async def aforget_metadata(self) -> None:
        """Drop the remembered and stored metadata: the next refresh discovers again (still bound to the
        credentials' issuer)."""
        with self._lock:
            self._metadata = None
        if self._metadata_store is not None:
            await self._metadata_store.adelete(self.server_url)

    def _remember(self, metadata: ServerMetadata) -> ServerMetadata:
        with self._lock:
            if self._metadata is None:
                self._metadata = metadata
            return self._metadata

    async def asave_metadata(self, metadata: ServerMetadata) -> None:
        """Adopt metadata found elsewhere (the SDK's login discovered it) and store it: not fetched again."""
        with self._lock:
            self._metadata = metadata
        if self._metadata_store is not None:
            await self._metadata_store.aput(self.server_url, metadata.to_json())

    # -- client ------------------------------------------------------------------------------------

    async def atrusted_issuer(self) -> str | None:
        """The authorization server this MCP server is bound to: the ``issuer`` pin, else the one the remembered or
        stored metadata records (set by the first discovery or login: trust on first use), else the one the
        stored client registration records; ``None`` before any of them."""
        anchor = await self._aanchor()
        if anchor is not None or self._registrations is None:
            return anchor
        record = await self._registrations.aget(self.server_url)
        return None if record is None else _registration_issuer(record)

    async def _aanchor(self) -> str | None:
        if self.issuer is not None:
            return self.issuer
        if self._metadata is not None:
            return self._metadata.issuer
        record = None if self._metadata_store is None else await self._metadata_store.aget(self.server_url)
        return None if record is None else _metadata_issuer(record)

    def _anchor_sync(self) -> str | None:
        if self.issuer is not None:
            return self.issuer
        if self._metadata is not None:
            return self._metadata.issuer
        record = None if self._metadata_store is None else self._metadata_store.get(self.server_url)
        return None if record is None else _metadata_issuer(record)

    async def aregistration(self) -> ClientRegistration:
        """The client credentials: the configured ones (bound to the trusted issuer, see :meth:`atrusted_issuer`),
        else the registration stored at login."""
        if self._client is not None:
            return self._configured(await self._aanchor())
        record = None if self._registrations is None else await self._registrations.aget(self.server_url)
        return self._registration(record)

    def registration_sync(self) -> ClientRegistration:
        """Blocking twin of :meth:`aregistration`."""
        if self._client is not None:
            return self._configured(self._anchor_sync())
        record = None if self._registrations is None else self._registrations.get(self.server_url)
        return self._registration(record)

    def _configured(self, issuer: str | None) -> ClientRegistration:
        # A configured client was registered at one authorization server: the pinned one, else the one this server
        # was first found with. Its secret goes nowhere else, whatever tokens say.
        client = self._client
        assert client is not None
        return ClientRegistration(client.client_id, client.client_secret, client.auth_method, issuer=issuer)

    def _registration(self, record: str | None) -> ClientRegistration:
        if record is None:
            raise ClientNotRegistered(
                f"no client registration is stored for {self.server_url} (never logged in through the SDK, or "
                "the record outlived the storage's retention): log the user in again (SDK-login mode does, "
                "registering the client again), or pass client_id"
            )
        return ClientRegistration.from_json(record)

    async def asave_registration(self, registration: ClientRegistration) -> None:
        """Store the client registered at login, for every process sharing the storage."""
        if self._registrations is not None:
            await self._registrations.aput(self.server_url, registration.to_json())

    # -- Refresher ---------------------------------------------------------------------------------

    def _refresher(self, metadata: ServerMetadata | None, client: ClientRegistration) -> OAuth2Refresher:
        token_url = self._token_url or (metadata.token_endpoint if metadata else None)
        assert token_url is not None
        # RFC 8707 / the MCP spec: the resource goes with every token request; with an explicit token_url
        # (nothing discovered) it is the server URL itself.
        named = self.server_url if metadata is None else metadata.resource
        resource = named if self.send_resource else None
        # A revocation endpoint given in refresher_options wins over the one the metadata names.
        revocation = self._options.get("revocation_url") or (None if metadata is None else metadata.revocation_endpoint)
        wanted = (token_url, client.client_id, resource, client.auth_method, revocation)
        with self._lock:
            if self._inner is None or self._inner_for != wanted:
                options = dict(self._options)
                options["revocation_url"] = revocation
                extra = dict(options.pop("extra_params", None) or {})
                if resource is not None:
                    extra["resource"] = resource
                previous = self._inner
                self._inner = self._build(token_url, client, extra, options)
                self._inner_for = wanted
                if previous is not None:
                    previous.close()
            return self._inner

    def _build(
        self, token_url: str, client: ClientRegistration, extra: dict[str, str], options: dict[str, Any]
    ) -> OAuth2Refresher:
        try:
            return OAuth2Refresher(
                token_url,
                client.client_id,
                client.client_secret,
                auth_method=client.auth_method,  # type: ignore[arg-type]
                scope=self.scope,
                timeout=self.timeout,
                extra_params=extra,
                client_assertion=self._assertion,
                dpop=self.dpop,
                **options,
            )
        except ValueError as exc:  # a token URL or a client this refresher cannot use
            raise DiscoveryFailed(f"cannot refresh at {token_url}: {exc}", retryable=False) from exc

    def _expected_issuer(self, tokens: UpstreamTokens, client: ClientRegistration) -> str | None:
        """The one issuer the pin, the tokens and the registration agree on (``None``: none recorded)."""
        named = [
            (self.issuer, "the issuer= pin"),
            (client.issuer, "the client registration"),
            (tokens.issuer, "the stored tokens"),
        ]
        known = [(issuer, what) for issuer, what in named if issuer is not None]
        if not known:
            return None
        first, first_what = known[0]
        for issuer, what in known[1:]:
            if not issuers_match(issuer, first):
                message = (
                    f"{what} is bound to {issuer} but {first_what} to {first} (MCP server {self.server_url}); "
                    "nothing was sent. Log the user in again against the issuer you trust, or fix the pin."
                )
                raise IssuerMismatch(self.server_url, first, issuer, message=message)
        return first

    def _bound(self, fresh: UpstreamTokens, metadata: ServerMetadata | None, expected: str | None) -> UpstreamTokens:
        issuer = metadata.issuer if metadata is not None else expected
        return fresh if issuer is None else attrs.evolve(fresh, issuer=issuer)

    async def aprepare(self, tokens: UpstreamTokens) -> None:
        """Everything before the token request: the client, the issuer check, discovery. ``TokenManager`` runs it
        before its bounded token request, so slow or broken metadata costs a retryable error, never the tokens."""
        await self._aready(tokens)

    def prepare(self, tokens: UpstreamTokens) -> None:
        """Blocking twin of :meth:`aprepare`."""
        self._ready_sync(tokens)

    async def _aready(self, tokens: UpstreamTokens) -> tuple[OAuth2Refresher, ServerMetadata | None, str | None]:
        try:
            client = await self.aregistration()
            expected = self._expected_issuer(tokens, client)
            metadata = None if self._token_url is not None else await self.ametadata(issuer=expected)
            return self._refresher(metadata, client), metadata, expected
        except UpstreamAuthError:
            raise
        except Exception as exc:
            raise _not_ready(exc) from None

    def _ready_sync(self, tokens: UpstreamTokens) -> tuple[OAuth2Refresher, ServerMetadata | None, str | None]:
        try:
            client = self.registration_sync()
            expected = self._expected_issuer(tokens, client)
            metadata = None if self._token_url is not None else self.metadata_sync(issuer=expected)
            return self._refresher(metadata, client), metadata, expected
        except UpstreamAuthError:
            raise
        except Exception as exc:
            raise _not_ready(exc) from None

    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Discover (once), check the issuer, then redeem the refresh token at its token endpoint."""
        inner, metadata, expected = await self._aready(tokens)
        fresh = await inner.arefresh(tokens, clock)
        if self._keep_alive_due():
            await self._akeep_alive()
        return self._bound(fresh, metadata, expected)

    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Blocking twin of :meth:`arefresh`."""
        inner, metadata, expected = self._ready_sync(tokens)
        fresh = inner.refresh(tokens, clock)
        if self._keep_alive_due():
            self._keep_alive_sync()
        return self._bound(fresh, metadata, expected)

    async def arevoke(self, tokens: UpstreamTokens, clock: Clock) -> bool:
        """Revoke the refresh token at the authorization server's revocation endpoint (its RFC 8414 metadata's
        ``revocation_endpoint``, or ``refresher_options["revocation_url"]``), after the checks a refresh makes
        (the client, the issuer the credentials are bound to); False when there is none."""
        inner, _, _ = await self._aready(tokens)
        return await inner.arevoke(tokens, clock)

    def revoke(self, tokens: UpstreamTokens, clock: Clock) -> bool:
        """Blocking twin of :meth:`arevoke`."""
        inner, _, _ = self._ready_sync(tokens)
        return inner.revoke(tokens, clock)

    def _keep_alive_due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._kept_alive_at is not None and now - self._kept_alive_at < self.keep_alive:
                return False
            self._kept_alive_at = now
            return True

    async def _akeep_alive(self) -> None:
        # Best effort, after the refresh succeeded: a store that fails now is tried again at the next refresh.
        try:
            if self._client is None and self._registrations is not None:
                await self._registrations.atouch(self.server_url)
            if self._token_url is None and self._metadata_store is not None:
                await self._metadata_store.atouch(self.server_url)
        except UpstreamAuthError:
            with self._lock:
                self._kept_alive_at = None

    def _keep_alive_sync(self) -> None:
        try:
            if self._client is None and self._registrations is not None:
                self._registrations.touch(self.server_url)
            if self._token_url is None and self._metadata_store is not None:
                self._metadata_store.touch(self.server_url)
        except UpstreamAuthError:
            with self._lock:
                self._kept_alive_at = None

    def close(self) -> None:
        """Close the inner refresher's client."""
        with self._lock:
            inner, self._inner = self._inner, None
        if inner is not None:
            inner.close()


def _not_ready(exc: Exception) -> DiscoveryFailed:
    # Anything before the token request that is not ours (a stored record that does not parse, a bug): typed, and
    # not "may have rotated", so the manager keeps the tokens. The text says only the type: the cause may quote
    # what a server sent.
    return DiscoveryFailed(
        f"could not prepare the refresh ({type(exc).__name__}); no token request was sent", retryable=False
    )


def _metadata_issuer(record: str) -> str | None:
    try:
        return ServerMetadata.from_json(record).issuer
    except (ValueError, TypeError, KeyError):
        return None  # an unreadable record binds nothing; it is rewritten by the next discovery


def _registration_issuer(record: str) -> str | None:
    try:
        return ClientRegistration.from_json(record).issuer
    except (ValueError, TypeError, KeyError):
        return None
