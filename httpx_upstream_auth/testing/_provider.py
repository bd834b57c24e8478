"""An in-process OAuth provider: a refresh-token endpoint and a protected API, as one pure ASGI app."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import itertools
import json
import secrets
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote_plus, urlencode, urlsplit

import anyio

from .._clock import Clock, SystemClock
from .._dpop import access_token_hash, jwk_thumbprint
from .._jose import ASSERTION_TYPE, ASYMMETRIC_ALGS, SECRET_ALGS, load_jwt
from .._models import UpstreamTokens

__all__ = ["ASGIApp", "LocalProvider", "Receive", "Scope", "Send", "protected_resource_metadata"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Headers = list[tuple[bytes, bytes]]

STAT_NAMES = (
    "token_calls",
    "refresh_ok",
    "refresh_early",
    "refresh_reuse",
    "grace_reuse",
    "invalid_grant",
    "invalid_client",
    "faults",
    "api_ok",
    "api_401",
    "assertion_ok",
    "assertion_replay",
    "assertion_invalid",
    "dpop_proofs_ok",
    "dpop_proofs_invalid",
    "dpop_nonce_challenges",
    "dpop_wrong_key",
)
REVOCATION_STAT_NAMES = ("revocation_calls", "revoked_grants")
FAULT_KINDS = frozenset(
    {
        "500",
        "503",
        "429",
        "malformed",
        "no_access_token",
        "invalid_client",
        "invalid_scope",
        "huge",
        "id_token_other_sub",
    }
)
FLOW_STAT_NAMES = ("registrations", "authorizations", "code_exchanges", "metadata_requests")
CODE_TTL = 60.0
HUGE_SIZE = 2 * 1024 * 1024
REQUEST_LOG_SIZE = 1000

_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")
_TOKEN_HEADERS: Headers = [_JSON, _NO_STORE, (b"pragma", b"no-cache")]
_API_HEADERS: Headers = [_JSON]
_BEARER_CHALLENGE: Headers = [_JSON, (b"www-authenticate", b'Bearer error="invalid_token"')]
_DPOP_CHALLENGE: Headers = [_JSON, (b"www-authenticate", b'DPoP error="invalid_token", algs="ES256 RS256 PS256 EdDSA"')]
_DPOP_PROOF_CHALLENGE: Headers = [_JSON, (b"www-authenticate", b'DPoP error="invalid_dpop_proof"')]
_DPOP_NONCE_CHALLENGE: Headers = [_JSON, (b"www-authenticate", b'DPoP error="use_dpop_nonce"')]
_BASIC_CHALLENGE: Headers = [*_TOKEN_HEADERS, (b"www-authenticate", b"Basic")]
_INVALID_TOKEN = b'{"error":"invalid_token"}'
_API_METHODS = {"/api/me": "GET", "/api/upload": "POST", "/api/slow": "GET"}
_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
_JWT_METHODS = ("private_key_jwt", "client_secret_jwt")
#: The longest-lived client assertion accepted (seconds from now to its exp): a replay table keeps each jti
#: until its exp, so exp must be near.
MAX_ASSERTION_LIFETIME = 600.0
#: How many seen assertion ids the replay table holds before it drops those past their exp.
ASSERTION_TABLE_SIZE = 1000
#: How far a DPoP proof's iat may be from the provider's now (seconds), and how many proof ids are kept for
#: replay checks before those older than that are dropped.
PROOF_WINDOW = 300.0
PROOF_TABLE_SIZE = 100_000


def protected_resource_metadata(
    resource: str, authorization_servers: list[str], *, scopes: list[str] | None = None
) -> dict[str, Any]:
    """An RFC 9728 protected-resource metadata document naming ``resource``'s authorization servers.

    Serve it as JSON at ``/.well-known/oauth-protected-resource`` plus the resource's path (for
    ``https://api.example/mcp``: ``https://api.example/.well-known/oauth-protected-resource/mcp``).
    """
    document: dict[str, Any] = {
        "resource": resource,
        "authorization_servers": list(authorization_servers),
        "bearer_methods_supported": ["header"],
    }
    if scopes is not None:
        document["scopes_supported"] = list(scopes)
    return document


@dataclass(slots=True)
class _Grant:
    id: str
    sub: str
    client_id: str
    scope: str | None
    access_ttl: float | None
    revoked: bool = False
    resource: str | None = None
    # The life of the grant's newest access token, for counting refreshes that came early.
    access_issued_at: float | None = None
    access_expires_at: float | None = None
    # The thumbprint of the DPoP key the grant's tokens are bound to (cnf.jkt), once bound.
    jkt: str | None = None


@dataclass(slots=True)
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str | None
    resource: str | None
    sub: str
    expires_at: float


@dataclass(slots=True)
class _Access:
    grant: _Grant
    expires_at: float
    revoked: bool = False
    jkt: str | None = None


@dataclass(slots=True)
class _Refresh:
    grant: _Grant
    expires_at: float | None
    #: When a refresh first consumed it (provider clock); None while it is unused.
    consumed_at: float | None = None


class _Reply:
    """A finished HTTP answer: status, headers, body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: Headers) -> None:
        self.status = status
        self.body = body
        self.headers = headers


def _error(status: int, error: str, headers: Headers = _TOKEN_HEADERS) -> _Reply:
    return _Reply(status, json.dumps({"error": error}).encode(), headers)


def _seconds(value: float) -> float | int:
    # Whole numbers go out as JSON integers (RFC 6749 says so); fractions stay, for sub-second test TTLs.
    return int(value) if float(value).is_integer() else value


def _b64url(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class LocalProvider:
    """A local OAuth 2.0 provider for tests, demos and benchmarks: a pure ASGI app plus its state.

    It serves the refresh-token grant at ``POST /token`` and a protected API under ``/api/``
    (``GET /api/me``, ``POST /api/upload``, ``GET /api/slow?delay=s``, any method on ``/api/echo``).
    Grants are created by :meth:`login`, as if a user had just signed in. Its clients are ``test-client`` /
    ``test-secret`` (``client_secret_basic``), ``post-client`` / ``post-secret`` (``client_secret_post``) and
    ``public-client`` (no secret, ``none``): see :attr:`clients`. With ``rotate=True`` every
    refresh consumes the presented refresh token and issues a new one; presenting a consumed refresh
    token again revokes the whole grant, as Auth0 and Okta do, unless it comes within ``reuse_grace``
    seconds of its first use: then it is honoured with a fresh pair, as Okta's grace period and Ory Hydra's
    ``rotation_grace_period`` do. Faults are injected with
    :meth:`fail_next`. Run it with :class:`ServerThread` (or any ASGI server, or
    ``httpx.ASGITransport``); it does no I/O of its own and is safe to drive from several threads.

    ``clock`` decides expiries (default: the system clock): pass a fake one to expire tokens without
    sleeping.

    It is also an authorization server for interactive clients (the MCP SDK's login): dynamic client
    registration (RFC 7591) at ``POST {issuer_path}/register``, an authorization endpoint at
    ``GET {issuer_path}/authorize`` that approves at once as :attr:`authorize_sub` and redirects with a
    code (PKCE ``S256`` required), the ``authorization_code`` grant at the token endpoint, and its
    metadata (RFC 8414 and OpenID discovery) at the well-known URLs for its issuer. Its revocation endpoint
    (RFC 7009) at ``POST {issuer_path}/revoke`` authenticates the client as the token endpoint does, answers 200
    for tokens it does not know, revokes the whole grant for a refresh token and the one token for an access
    token; :meth:`fail_next_revocation` makes it fail. With an
    ``issuer_path`` such as ``"/tenants/acme"`` every endpoint lives under that path and ``/token`` at
    the root answers 404, so a client that guesses ``{origin}/token`` instead of discovering fails.
    """

    def __init__(
        self,
        *,
        access_ttl: float = 60.0,
        rotate: bool = True,
        token_delay: float = 0.0,
        refresh_ttl: float | None = None,
        issue_id_token: bool = False,
        issuer: str = "local-provider",
        clock: Clock | None = None,
        issuer_path: str = "",
        reuse_grace: float = 0.0,
    ) -> None:
        if issuer_path and (not issuer_path.startswith("/") or issuer_path.endswith("/")):
            raise ValueError("issuer_path must start with '/' and not end with one, like '/tenants/acme'")
        self.access_ttl = access_ttl
        """Lifetime in seconds of access tokens, for grants that did not set their own at login."""
        self.rotate = rotate
        """Whether a refresh consumes the presented refresh token and issues a new one."""
        self.token_delay = token_delay
        """Seconds to wait before handling each token request (widens races in concurrency tests)."""
        self.refresh_ttl = refresh_ttl
        """Lifetime in seconds of each issued refresh token; ``None``: they never expire."""
        self.issue_id_token = issue_id_token
        """Whether login and refresh return an (unsigned) ID token."""
        self.issuer = issuer
        """The ``iss`` claim of issued ID tokens."""
        self.clock: Clock = clock or SystemClock()
        """Where expiry checks read the time."""
        self.clients: dict[str, tuple[str | None, str]] = {
            "test-client": ("test-secret", "client_secret_basic"),
            "post-client": ("post-secret", "client_secret_post"),
            "public-client": (None, "none"),
        }
        """Registered clients: ``client_id -> (secret or None, auth method)``; add or change freely. The auth
        methods are ``client_secret_basic``, ``client_secret_post``, ``none``, ``client_secret_jwt`` (the
        secret is the HMAC key of its assertions) and ``private_key_jwt`` (its key is in :attr:`client_keys`)."""
        self.client_keys: dict[str, Any] = {}
        """Public keys of ``private_key_jwt`` clients: ``client_id -> key`` as PEM (text or bytes), a JWK
        (dict) or a ``cryptography`` public key. Assertions must carry ``iss`` = ``sub`` = the client id, an
        ``aud`` naming the token endpoint's URL or the issuer's (as the client reached them), an ``exp`` in the
        next 10 minutes and a ``jti`` never seen before (``stats["assertion_replay"]`` counts the refused
        replays)."""
        self._assertion_jtis: dict[str, float] = {}
        self.token_nonce: str | None = None
        """When set, DPoP proofs at the token endpoint must carry this ``nonce``: others are answered 400
        ``use_dpop_nonce`` with it in a ``DPoP-Nonce`` header (counted in ``stats["dpop_nonce_challenges"]``).
        Change it to make clients learn a new one."""
        self.api_nonce: str | None = None
        """The same for the resource server: 401 with ``WWW-Authenticate: DPoP error="use_dpop_nonce"``."""
        self._proof_jtis: dict[str, float] = {}
        self.issuer_path = issuer_path
        """Where the authorization-server endpoints live (``""``: at the root)."""
        self.reuse_grace = reuse_grace
        """Seconds after its first use during which a consumed refresh token is still honoured with a fresh
        pair (counted in ``stats["grace_reuse"]``); later, presenting it is reuse and revokes the grant."""
        self.authorize_sub = "alice"
        """The user the authorization endpoint signs in, without asking (a headless browser's user)."""
        self._redirect_uris: dict[str, list[str]] = {}
        self._codes: dict[str, _Code] = {}
        self._flow_stats = dict.fromkeys(FLOW_STAT_NAMES, 0)
        self._lock = threading.Lock()
        self._grant_ids = itertools.count(1)
        self._grants: dict[str, _Grant] = {}
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._faults: deque[str] = deque()
        self._revocation_faults: deque[str] = deque()
        self._revocation_stats = dict.fromkeys(REVOCATION_STAT_NAMES, 0)
        self._stats = dict.fromkeys(STAT_NAMES, 0)
        self._api_calls: Counter[str] = Counter()
        self._requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_SIZE)

    # -- test-side controls -------------------------------------------------------------------------

    def login(
        self,
        *,
        sub: str = "alice",
        client_id: str = "test-client",
        scope: str | None = "api",
        access_ttl: float | None = None,
        user_id: str | None = "user-1",
        provider_id: str | None = "local",
        dpop_jkt: str | None = None,
    ) -> UpstreamTokens:
        """Create a grant as if ``sub`` had just logged in through ``client_id``; return its tokens.

        ``access_ttl`` overrides the provider's for this grant's access tokens (refreshes included).
        ``dpop_jkt`` binds the grant to that DPoP key (``DPoPKey.thumbprint``), as a login whose code
        exchange carried its proof: its tokens are ``token_type="DPoP"``, refreshes must prove that key, and
        its access tokens are accepted only with a proof from it. A grant not bound at login is bound by its
        first refresh that carries a proof.
        The result carries the binding fields (``provider_id``, ``user_id``, ``upstream_subject=sub``,
        ``client_id``) and ``version=0``, ready to put in a storage.
        """
        if client_id not in self.clients:
            raise ValueError(f"unknown client {client_id!r}; register it in provider.clients first")
        with self._lock:
            now = self.clock.time()
            grant = _Grant(f"grant-{next(self._grant_ids)}", sub, client_id, scope, access_ttl, jkt=dpop_jkt)
            self._grants[grant.id] = grant
            access, expires_at = self._new_access(grant, now)
            refresh, refresh_expires_at = self._new_refresh(grant, now)
        return UpstreamTokens(
            access_token=access,
            refresh_token=refresh,
            id_token=self._id_token(grant, sub, now) if self.issue_id_token else None,
            token_type="Bearer" if dpop_jkt is None else "DPoP",
            scope=scope,
            expires_at=expires_at,
            refresh_expires_at=refresh_expires_at,
            issued_at=now,
            provider_id=provider_id,
            user_id=user_id,
            upstream_subject=sub,
            client_id=client_id,
            version=0,
        )

    def grant_of(self, token: str) -> str:
        """The id of the grant an access or refresh token belongs to; ``KeyError`` if unknown."""
        with self._lock:
            record = self._access.get(token) or self._refresh.get(token)
            if record is None:
                raise KeyError("unknown token")
            return record.grant.id

    def introspect(self, access_token: str) -> dict[str, Any] | None:
        """What a resource server learns about a presented access token: ``None`` unless it is live.

        Live means issued here, not expired, and neither it nor its grant revoked. The answer is an
        RFC 7662-style dict: ``active``, ``sub``, ``client_id``, ``scope``, ``exp``, ``grant``, and
        ``resource`` when the client named one at authorization.
        """
        with self._lock:
            record = self._access.get(access_token)
            if record is None or record.revoked or record.grant.revoked or self.clock.time() >= record.expires_at:
                return None
            grant = record.grant
            return {
                "active": True,
                "sub": grant.sub,
                "client_id": grant.client_id,
                "scope": grant.scope,
                "exp": record.expires_at,
                "grant": grant.id,
                "resource": grant.resource,
            }

    def register_client(
        self,
        redirect_uris: list[str],
        *,
        auth_method: str = "client_secret_basic",
        client_id: str | None = None,
    ) -> tuple[str, str | None]:
        """Register a client as dynamic registration would; return ``(client_id, secret or None)``."""
        if auth_method not in _AUTH_METHODS:
            raise ValueError(f"auth_method must be one of {', '.join(_AUTH_METHODS)}")
        client_id = client_id or "dyn-" + secrets.token_urlsafe(9)
        secret = None if auth_method == "none" else "sec-" + secrets.token_urlsafe(18)
        with self._lock:
            self.clients[client_id] = (secret, auth_method)
            self._redirect_uris[client_id] = list(redirect_uris)
        return client_id, secret

    def authorization_server_metadata(self, base_url: str) -> dict[str, Any]:
        """The RFC 8414 metadata this provider serves when reached at ``base_url`` (scheme and host)."""
        issuer = base_url.rstrip("/") + self.issuer_path
        return {
            "issuer": issuer,
            "authorization_endpoint": issuer + "/authorize",
            "token_endpoint": issuer + "/token",
            "registration_endpoint": issuer + "/register",
            "revocation_endpoint": issuer + "/revoke",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": list(_AUTH_METHODS),
            "authorization_response_iss_parameter_supported": True,
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["none"],
            "jwks_uri": issuer + "/jwks",
        }

    @property
    def flow_stats(self) -> dict[str, int]:
        """A snapshot of the interactive-login counters: ``registrations`` (dynamic client
        registrations), ``authorizations`` (codes issued by the authorization endpoint),
        ``code_exchanges`` (codes redeemed: that is, completed logins), ``metadata_requests``."""
        with self._lock:
            return dict(self._flow_stats)

    def revoke_access(self, access_token: str) -> None:
        """Make the API reject this access token from now on, though its expiry has not passed."""
        with self._lock:
            self._access[access_token].revoked = True

    def revoke_grant(self, grant_id: str) -> None:
        """Kill every token of the grant: the API rejects them and refreshing answers ``invalid_grant``."""
        with self._lock:
            self._grants[grant_id].revoked = True

    def is_revoked(self, grant_id: str) -> bool:
        """Whether the grant was revoked (by :meth:`revoke_grant`, reuse detection or the revocation endpoint)."""
        with self._lock:
            return self._grants[grant_id].revoked

    def fail_next(self, kind: str, count: int = 1) -> None:
        """Make the next ``count`` token requests fail in the way ``kind`` names.

        Faults queue up in order and each token request takes one. Kinds: ``"500"``, ``"503"``,
        ``"429"`` (with ``Retry-After: 1``), ``"malformed"`` (200, not JSON), ``"no_access_token"``
        (200 JSON without ``access_token``), ``"invalid_client"`` (401), ``"invalid_scope"`` (400),
        ``"huge"`` (200 with a 2 MiB JSON body whose ``access_token`` is unusable): these answer without
        looking at the request and
        change no grant. ``"delay:<seconds>"`` waits, then handles the request normally (if the client
        hung up meanwhile, nothing is handled). ``"answer_delay:<seconds>"`` handles the request at once
        (the refresh token is consumed and rotated) and only then waits before answering, as a slow real
        provider does: a client that gives up meanwhile loses the new tokens. ``"id_token_other_sub"``
        handles the request normally (a refresh token is consumed and rotated as usual) but the ID token
        names sub ``"mallory"``. ``"redeem_then:<status>"`` handles the request (consumed and rotated),
        then answers ``<status>`` with an HTML page, as a gateway in front of a provider does when the
        provider's answer does not reach it (502, 504). ``"expires_in:<seconds>"`` handles the request
        normally but states that access-token lifetime. ``"token_type:<type>"`` handles the request normally
        but states that token type (``"mac"``: a type no Bearer client may use). ``"html:<status>"`` answers
        that 5xx status with an HTML page without looking at the request, as a gateway does when the provider
        is down. ``"redirect:<status>"`` answers that 3xx status pointing at the same URL. ``"huge:<bytes>"``
        is ``"huge"`` with a body of that many bytes, ``"429:<seconds>"`` is ``"429"`` with that ``Retry-After``.
        """
        option = kind.partition(":")[2]
        if kind.startswith(("delay:", "answer_delay:", "expires_in:")):
            try:
                ok = float(option) >= 0
            except ValueError:
                ok = False
        elif kind.startswith(("redeem_then:", "html:")):
            ok = option in {"500", "502", "503", "504"}
        elif kind.startswith("redirect:"):
            ok = option in {"301", "302", "303", "307", "308"}
        elif kind.startswith("token_type:"):
            ok = bool(option) and option.isascii() and option.isalnum()
        elif kind.startswith("huge:"):
            ok = option.isdigit() and 0 < int(option) <= 64 * 1024 * 1024
        elif kind.startswith("429:"):
            ok = option.isascii() and option.isdigit()
        else:
            ok = kind in FAULT_KINDS
        if not ok:
            raise ValueError(f"unknown fault kind {kind!r}")
        if count < 0:
            raise ValueError("count must not be negative")
        with self._lock:
            self._faults.extend([kind] * count)

    def fail_next_revocation(self, kind: str, count: int = 1) -> None:
        """Make the next ``count`` requests to the revocation endpoint fail as ``kind`` says: ``"503"`` (answered
        ``temporarily_unavailable``, nothing revoked) or ``"hang:<seconds>"`` (no answer for that long, or until
        the client hangs up; then a 503, nothing revoked)."""
        if kind != "503":
            head, _, seconds = kind.partition(":")
            try:
                valid = head == "hang" and float(seconds) >= 0
            except ValueError:
                valid = False
            if not valid:
                raise ValueError(f"unknown revocation fault kind {kind!r}")
        with self._lock:
            self._revocation_faults.extend([kind] * count)

    @property
    def stats(self) -> dict[str, int]:
        """A snapshot of the counters.

        ``token_calls`` counts every ``POST /token``; ``refresh_ok`` successful refreshes (grace reuses
        included); ``refresh_early`` those that came while the grant's newest access token still had more
        than half its lifetime left (a client that refreshes once per expiry makes none, unless the token was
        revoked or refused); ``refresh_reuse`` consumed refresh tokens presented again outside the grace (each
        revokes its grant); ``grace_reuse`` those presented again within ``reuse_grace`` (honoured);
        ``invalid_grant`` and
        ``invalid_client`` those answers (reuse included; injected faults excluded); ``faults``
        injected faults taken; ``api_ok`` and ``api_401`` authenticated API answers; ``assertion_ok``,
        ``assertion_replay`` and ``assertion_invalid`` JWT client assertions accepted, refused as replays (a
        ``jti`` seen before) and refused otherwise (signature, ``aud``, ``iss``/``sub``, ``exp``, unknown client);
        ``dpop_proofs_ok`` and ``dpop_proofs_invalid`` DPoP proofs accepted and refused (malformed, signature,
        ``htm``/``htu``/``ath``, ``iat`` more than 5 minutes off, a ``jti`` seen before), at the token endpoint
        and the API; ``dpop_nonce_challenges`` requests answered ``use_dpop_nonce`` (not counted in ``api_401``);
        ``dpop_wrong_key`` requests for a DPoP-bound grant or token without a proof of its key (refused, nothing
        consumed).
        """
        with self._lock:
            return dict(self._stats)

    @property
    def revocation_stats(self) -> dict[str, int]:
        """A snapshot of the revocation endpoint's counters: ``revocation_calls`` (every ``/revoke`` request) and
        ``revoked_grants`` (grants a revocation ended)."""
        with self._lock:
            return dict(self._revocation_stats)

    @property
    def issued_tokens(self) -> set[str]:
        """Every access and refresh token issued so far (to check that none shows in logs or errors)."""
        with self._lock:
            return set(self._access) | set(self._refresh)

    @property
    def api_calls(self) -> Counter[str]:
        """A snapshot: how many times each API path was requested."""
        with self._lock:
            return Counter(self._api_calls)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """The last token requests, oldest first: ``{"form": {...}, "auth_method": ..., "client_id": ...}``.

        ``auth_method`` is what the request used (``""`` if it authenticated no client); the form is
        kept as sent, refresh token included.
        """
        with self._lock:
            return list(self._requests)

    def reset_stats(self) -> None:
        """Zero the counters and forget the API call counts and the logged token requests."""
        with self._lock:
            self._stats = dict.fromkeys(STAT_NAMES, 0)
            self._flow_stats = dict.fromkeys(FLOW_STAT_NAMES, 0)
            self._revocation_stats = dict.fromkeys(REVOCATION_STAT_NAMES, 0)
            self._api_calls.clear()
            self._requests.clear()

    # -- token issuing (caller holds the lock) -------------------------------------------------------

    def _new_access(self, grant: _Grant, now: float) -> tuple[str, float]:
        ttl = self.access_ttl if grant.access_ttl is None else grant.access_ttl
        token = "at-" + secrets.token_urlsafe(18)
        self._access[token] = _Access(grant, now + ttl, jkt=grant.jkt)
        grant.access_issued_at, grant.access_expires_at = now, now + ttl
        return token, now + ttl

    def _new_refresh(self, grant: _Grant, now: float) -> tuple[str, float | None]:
        expires_at = None if self.refresh_ttl is None else now + self.refresh_ttl
        token = "rt-" + secrets.token_urlsafe(18)
        self._refresh[token] = _Refresh(grant, expires_at)
        return token, expires_at

    def _id_token(self, grant: _Grant, sub: str, now: float) -> str:
        ttl = self.access_ttl if grant.access_ttl is None else grant.access_ttl
        claims = {
            "iss": self.issuer,
            "sub": sub,
            "aud": grant.client_id,
            "iat": int(now),
            "exp": int(now + ttl),
        }
        return f"{_b64url({'alg': 'none', 'typ': 'JWT'})}.{_b64url(claims)}."

    # -- ASGI ---------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 entry point."""
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            prefix = self.issuer_path
            if path == prefix + "/token":
                reply = await self._token(scope, receive)
            elif path == prefix + "/revoke":
                reply = await self._revoke(scope, receive)
            elif path == prefix + "/authorize":
                reply = self._authorize(scope)
            elif path == prefix + "/register":
                reply = await self._register(scope, receive)
            elif path in self._metadata_paths():
                reply = self._metadata(scope)
            elif path.startswith("/api/"):
                reply = await self._api(scope, receive, path)
            else:
                reply = _Reply(404, b'{"error":"not_found"}', _API_HEADERS)
            await send({"type": "http.response.start", "status": reply.status, "headers": reply.headers})
            await send({"type": "http.response.body", "body": reply.body})
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # -- authorization server: metadata, registration, authorization ----------------------------------

    def _metadata_paths(self) -> tuple[str, ...]:
        prefix = self.issuer_path
        return (
            "/.well-known/oauth-authorization-server" + prefix,
            "/.well-known/openid-configuration" + prefix,
            prefix + "/.well-known/openid-configuration",
        )

    def _metadata(self, scope: Scope) -> _Reply:
        with self._lock:
            self._flow_stats["metadata_requests"] += 1
        document = self.authorization_server_metadata(_base_url(scope))
        return _Reply(200, json.dumps(document).encode(), _API_HEADERS)

    async def _register(self, scope: Scope, receive: Receive) -> _Reply:
        body = await _read_body(receive)
        if scope["method"] != "POST":
            return _Reply(405, b'{"error":"invalid_request"}', [*_API_HEADERS, (b"allow", b"POST")])
        try:
            request = json.loads(body)
            uris = request["redirect_uris"]
            method = request.get("token_endpoint_auth_method", "client_secret_basic")
            valid = isinstance(uris, list) and uris and all(isinstance(u, str) for u in uris)
        except (ValueError, KeyError, TypeError):
            valid = False
        if not valid or not isinstance(request, dict):
            return _error(400, "invalid_client_metadata", _API_HEADERS)
        if method not in _AUTH_METHODS:
            return _error(400, "invalid_client_metadata", _API_HEADERS)
        client_id, secret = self.register_client(uris, auth_method=method)
        with self._lock:
            self._flow_stats["registrations"] += 1
        answer = {
            **request,
            "client_id": client_id,
            "client_id_issued_at": int(self.clock.time()),
            "token_endpoint_auth_method": method,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
        }
        if secret is not None:
            answer["client_secret"] = secret
            answer["client_secret_expires_at"] = 0
        return _Reply(201, json.dumps(answer).encode(), _TOKEN_HEADERS)

    def _authorize(self, scope: Scope) -> _Reply:
        query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
        client_id = query.get("client_id", "")
        redirect_uri = query.get("redirect_uri", "")
        with self._lock:
            known = client_id in self.clients
            allowed = self._redirect_uris.get(client_id)
        # Never redirect to an unregistered URI: answer errors about the client itself directly.
        if not known or (allowed is not None and redirect_uri not in allowed) or not redirect_uri:
            return _error(400, "invalid_request", _API_HEADERS)
        params: dict[str, str] = {}
        if query.get("state") is not None:
            params["state"] = query["state"]
        params["iss"] = _base_url(scope) + self.issuer_path
        challenge = query.get("code_challenge", "")
        if query.get("response_type") != "code":
            params["error"] = "unsupported_response_type"
        elif query.get("code_challenge_method") != "S256" or not 43 <= len(challenge) <= 128:
            params["error"] = "invalid_request"  # PKCE S256 is required
        else:
            code = "code-" + secrets.token_urlsafe(18)
            with self._lock:
                self._codes[code] = _Code(
                    client_id,
                    redirect_uri,
                    challenge,
                    query.get("scope"),
                    query.get("resource"),
                    self.authorize_sub,
                    self.clock.time() + CODE_TTL,
                )
                self._flow_stats["authorizations"] += 1
            params["code"] = code
        separator = "&" if urlsplit(redirect_uri).query else "?"
        location = redirect_uri + separator + urlencode(params)
        return _Reply(302, b"", [(b"location", location.encode()), (b"cache-control", b"no-store")])

    def _code_grant(self, form: dict[str, str], client_id: str, jkt: str | None = None) -> _Reply:
        """The ``authorization_code`` grant (caller holds the lock; the client is authenticated)."""
        record = self._codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        now = self.clock.time()
        if (
            record is None
            or record.client_id != client_id
            or record.redirect_uri != form.get("redirect_uri")
            or now >= record.expires_at
        ):
            self._stats["invalid_grant"] += 1
            return _error(400, "invalid_grant")
        expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if not hmac.compare_digest(expected, record.challenge):
            self._stats["invalid_grant"] += 1
            return _error(400, "invalid_grant")
        # A code exchange with a DPoP proof binds the grant to its key (RFC 9449 section 5).
        grant = _Grant(f"grant-{next(self._grant_ids)}", record.sub, client_id, record.scope, None, jkt=jkt)
        grant.resource = record.resource
        self._grants[grant.id] = grant
        access, _ = self._new_access(grant, now)
        refresh, _ = self._new_refresh(grant, now)
        answer: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer" if jkt is None else "DPoP",
            "expires_in": _seconds(self.access_ttl),
            "refresh_token": refresh,
        }
        if record.scope is not None:
            answer["scope"] = record.scope
        if self.refresh_ttl is not None:
            answer["refresh_token_expires_in"] = _seconds(self.refresh_ttl)
        if self.issue_id_token:
            answer["id_token"] = self._id_token(grant, grant.sub, now)
        self._flow_stats["code_exchanges"] += 1
        return _Reply(200, json.dumps(answer).encode(), _TOKEN_HEADERS)

    # -- token endpoint -----------------------------------------------------------------------------

    async def _token(self, scope: Scope, receive: Receive) -> _Reply:
        body = await _read_body(receive)
        if scope["method"] != "POST":
            with self._lock:
                self._stats["token_calls"] += 1
            return _Reply(405, b'{"error":"invalid_request"}', [*_TOKEN_HEADERS, (b"allow", b"POST")])
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        basic = None
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                basic = value.decode("latin-1")
        auth_method, client_id, secret = _client_credentials(basic, form)
        issuer = _base_url(scope) + self.issuer_path
        proof = _header(scope, b"dpop")
        checked = None if proof is None else _check_proof(proof, "POST", issuer + "/token", None, self.clock.time())
        fault = None
        with self._lock:
            self._stats["token_calls"] += 1
            self._requests.append({"form": form, "auth_method": auth_method, "client_id": client_id or ""})
            refused, jkt = self._token_proof(proof, checked)
            if refused is None:
                fault = self._faults.popleft() if self._faults else None
            if fault is not None:
                self._stats["faults"] += 1
        if refused is not None:
            return refused
        delay = self.token_delay
        other_sub = False
        answer_delay = 0.0
        gateway: int | None = None
        expires_in: float | None = None
        token_type: str | None = None
        if fault is not None:
            if fault.startswith("delay:"):
                delay += float(fault[6:])
            elif fault.startswith("answer_delay:"):
                answer_delay = float(fault[13:])
            elif fault == "id_token_other_sub":
                other_sub = True
            elif fault.startswith("redeem_then:"):
                gateway = int(fault[12:])
            elif fault.startswith("expires_in:"):
                expires_in = float(fault[11:])
            elif fault.startswith("token_type:"):
                token_type = fault[11:]
            else:
                return _fault_reply(fault, scope)
        if delay > 0 and not await _sleep_unless_disconnected(delay, receive):
            return _error(400, "invalid_request")  # nobody is listening; nothing was changed
        with self._lock:
            if auth_method == "jwt":
                auth_method, client_id = self._check_assertion(secret or "", client_id, (issuer + "/token", issuer))
            reply = self._refresh_grant(form, auth_method, client_id, secret, other_sub, expires_in, token_type, jkt)
        if gateway is not None:
            page = f"<html><body>{gateway} Bad Gateway</body></html>".encode()
            return _Reply(gateway, page, [(b"content-type", b"text/html")])
        if answer_delay > 0:
            # As real providers do: the refresh token is already consumed; only the answer is late, and it
            # is lost if the client hangs up meanwhile.
            await anyio.sleep(answer_delay)
        return reply

    def _authenticated(self, client_id: str | None, auth_method: str, secret: str | None) -> bool:
        """True when ``client_id`` is registered for ``auth_method`` and, for a secret method, ``secret`` is its
        secret (a client assertion was checked already: ``auth_method`` then names its JWT method)."""
        registered = self.clients.get(client_id or "")
        return (
            registered is not None
            and registered[1] == auth_method
            and (
                auth_method in _JWT_METHODS or registered[0] is None or hmac.compare_digest(registered[0], secret or "")
            )
        )

    def _refresh_grant(
        self,
        form: dict[str, str],
        auth_method: str,
        client_id: str | None,
        secret: str | None,
        other_sub: bool,
        expires_in: float | None = None,
        token_type: str | None = None,
        jkt: str | None = None,
    ) -> _Reply:
        if auth_method == "ambiguous":
            return _error(400, "invalid_request")
        if not self._authenticated(client_id, auth_method, secret):
            self._stats["invalid_client"] += 1
            return _error(401, "invalid_client", _BASIC_CHALLENGE)
        assert client_id is not None
        grant_type = form.get("grant_type")
        if not grant_type:
            return _error(400, "invalid_request")
        if grant_type == "authorization_code":
            return self._code_grant(form, client_id, jkt)
        if grant_type != "refresh_token":
            return _error(400, "unsupported_grant_type")
        presented = form.get("refresh_token")
        if not presented:
            return _error(400, "invalid_request")
        now = self.clock.time()
        record = self._refresh.get(presented)
        if record is None or record.grant.client_id != client_id:
            self._stats["invalid_grant"] += 1
            return _error(400, "invalid_grant")
        grant = record.grant
        if grant.jkt is not None and jkt != grant.jkt:
            # Checked before anything is consumed: a stolen refresh token without its key redeems nothing.
            self._stats["dpop_wrong_key"] += 1
            return _error(400, "invalid_dpop_proof")
        if record.consumed_at is not None:
            if now - record.consumed_at < self.reuse_grace and not grant.revoked:
                self._stats["grace_reuse"] += 1  # honoured: a client whose answer was lost tries again
            else:
                self._stats["refresh_reuse"] += 1
                grant.revoked = True
        if grant.revoked or (record.expires_at is not None and now >= record.expires_at):
            self._stats["invalid_grant"] += 1
            return _error(400, "invalid_grant")
        # Every grant got an access token when it was made (login, code exchange).
        assert grant.access_issued_at is not None and grant.access_expires_at is not None
        half_life = (grant.access_expires_at - grant.access_issued_at) / 2
        if grant.access_expires_at - now > half_life:
            self._stats["refresh_early"] += 1
        if grant.jkt is None:
            grant.jkt = jkt  # bound by its first refresh with a proof (if this one carried none, not yet)
        access, _ = self._new_access(grant, now)
        ttl = self.access_ttl if grant.access_ttl is None else grant.access_ttl
        stated = _seconds(ttl) if expires_in is None else _seconds(expires_in)
        if token_type is None:  # as bound, unless a token_type: fault says otherwise
            token_type = "Bearer" if grant.jkt is None else "DPoP"
        answer: dict[str, Any] = {"access_token": access, "token_type": token_type, "expires_in": stated}
        scope = form.get("scope") or grant.scope
        if scope is not None:
            answer["scope"] = scope
        if self.rotate:
            if record.consumed_at is None:
                record.consumed_at = now
            answer["refresh_token"], _ = self._new_refresh(grant, now)
            if self.refresh_ttl is not None:
                answer["refresh_token_expires_in"] = _seconds(self.refresh_ttl)
        if self.issue_id_token or other_sub:
            answer["id_token"] = self._id_token(grant, "mallory" if other_sub else grant.sub, now)
        self._stats["refresh_ok"] += 1
        return _Reply(200, json.dumps(answer).encode(), _TOKEN_HEADERS)

    # -- revocation endpoint (RFC 7009) -------------------------------------------------------------------

    async def _revoke(self, scope: Scope, receive: Receive) -> _Reply:
        body = await _read_body(receive)
        with self._lock:
            self._revocation_stats["revocation_calls"] += 1
            fault = self._revocation_faults.popleft() if self._revocation_faults else None
        if scope["method"] != "POST":
            return _Reply(405, b'{"error":"invalid_request"}', [*_TOKEN_HEADERS, (b"allow", b"POST")])
        if fault == "503":
            return _error(503, "temporarily_unavailable")
        if fault is not None:  # "hang:<seconds>": no answer that long (or until the client hangs up), nothing revoked
            await _sleep_unless_disconnected(float(fault.partition(":")[2]), receive)
            return _error(503, "temporarily_unavailable")
        form = dict(parse_qsl(body.decode("latin-1"), keep_blank_values=True))
        basic = None
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                basic = value.decode("latin-1")
        auth_method, client_id, secret = _client_credentials(basic, form)
        issuer = _base_url(scope) + self.issuer_path
        with self._lock:
            if auth_method == "jwt":  # a client assertion: its aud names the token endpoint or the issuer
                auth_method, client_id = self._check_assertion(secret or "", client_id, (issuer + "/token", issuer))
            if not self._authenticated(client_id, auth_method, secret):
                return _error(401, "invalid_client", _BASIC_CHALLENGE)
            token = form.get("token")
            if not token:
                return _error(400, "invalid_request")
            refresh = self._refresh.get(token)
            access = self._access.get(token)
            record = refresh or access
            if record is not None and record.grant.client_id != client_id:
                return _error(400, "unauthorized_client")
            if refresh is not None:
                if not refresh.grant.revoked:
                    self._revocation_stats["revoked_grants"] += 1
                refresh.grant.revoked = True  # a refresh token's revocation ends its grant, access tokens included
            elif access is not None:
                access.revoked = True
        # RFC 7009 section 2.2: 200 for a token the server does not know, too (the client's aim is met).
        return _Reply(200, b"", [_NO_STORE])

    def _check_assertion(
        self, assertion: str, form_client_id: str | None, audiences: tuple[str, ...]
    ) -> tuple[str, str | None]:
        """``(the client's auth method, client_id)`` when the assertion proves the client, else ``("jwt",
        client_id)``, which no client is registered with (caller holds the lock)."""
        jwt = load_jwt()
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            unverified = {}
        claimed = unverified.get("iss")
        client_id = form_client_id if form_client_id is not None else claimed if isinstance(claimed, str) else None
        registered = self.clients.get(client_id or "")
        if registered is None or registered[1] not in _JWT_METHODS:
            self._stats["assertion_invalid"] += 1
            return "jwt", client_id
        key: Any
        if registered[1] == "client_secret_jwt":
            key, algorithms = (registered[0] or "").encode(), sorted(SECRET_ALGS)
        else:
            known = self.client_keys.get(client_id or "")
            key, algorithms = (
                jwt.PyJWK(dict(known)).key if isinstance(known, Mapping) else known,
                sorted(ASYMMETRIC_ALGS),
            )
        now = self.clock.time()
        try:
            # exp is checked against this provider's clock (a test's fake one included), not PyJWT's.
            claims = jwt.decode(
                assertion,
                key,
                algorithms=algorithms,
                audience=list(audiences),
                issuer=client_id,
                options={"require": ["iss", "sub", "aud", "exp", "jti"], "verify_exp": False, "verify_iat": False},
            )
        except (jwt.InvalidTokenError, ValueError, TypeError):
            claims = None
        if (
            claims is None
            or claims["sub"] != client_id
            or not isinstance(claims["exp"], (int, float))
            or not now < claims["exp"] <= now + MAX_ASSERTION_LIFETIME
            or not isinstance(claims["jti"], str)
        ):
            self._stats["assertion_invalid"] += 1
            return "jwt", client_id
        if len(self._assertion_jtis) >= ASSERTION_TABLE_SIZE:
            self._assertion_jtis = {jti: exp for jti, exp in self._assertion_jtis.items() if exp > now}
        if claims["jti"] in self._assertion_jtis:
            self._stats["assertion_replay"] += 1
            return "jwt", client_id
        self._assertion_jtis[claims["jti"]] = float(claims["exp"])
        self._stats["assertion_ok"] += 1
        return registered[1], client_id

    # -- DPoP (caller holds the lock) ---------------------------------------------------------------

    def _token_proof(self, proof: str | None, checked: dict[str, Any] | None) -> tuple[_Reply | None, str | None]:
        """``(refusal or None, the proven key's thumbprint or None)`` for a token request's DPoP proof."""
        if proof is None:
            return None, None
        if checked is None or not self._fresh_proof(checked):
            self._stats["dpop_proofs_invalid"] += 1
            return _error(400, "invalid_dpop_proof"), None
        if self.token_nonce is not None and checked.get("nonce") != self.token_nonce:
            self._stats["dpop_nonce_challenges"] += 1
            headers = [*_TOKEN_HEADERS, (b"dpop-nonce", self.token_nonce.encode())]
            return _error(400, "use_dpop_nonce", headers), None
        self._stats["dpop_proofs_ok"] += 1
        return None, checked["jkt"]

    def _resource_proof(
        self, record: _Access, scheme: str, proof: str | None, checked: dict[str, Any] | None
    ) -> _Reply | None:
        """The refusal of a request with a DPoP-bound token (or a DPoP scheme), or ``None`` to serve it."""
        if record.jkt is None or scheme != "dpop" or proof is None:
            self._stats["api_401"] += 1
            return _Reply(401, _INVALID_TOKEN, _BEARER_CHALLENGE if scheme == "bearer" else _DPOP_CHALLENGE)
        if checked is None or not self._fresh_proof(checked):
            self._stats["dpop_proofs_invalid"] += 1
            self._stats["api_401"] += 1
            return _Reply(401, b'{"error":"invalid_dpop_proof"}', _DPOP_PROOF_CHALLENGE)
        if checked["jkt"] != record.jkt:
            self._stats["dpop_wrong_key"] += 1
            self._stats["api_401"] += 1
            return _Reply(401, b'{"error":"invalid_dpop_proof"}', _DPOP_PROOF_CHALLENGE)
        if self.api_nonce is not None and checked.get("nonce") != self.api_nonce:
            self._stats["dpop_nonce_challenges"] += 1
            headers = [*_DPOP_NONCE_CHALLENGE, (b"dpop-nonce", self.api_nonce.encode())]
            return _Reply(401, b'{"error":"use_dpop_nonce"}', headers)
        self._stats["dpop_proofs_ok"] += 1
        return None

    def _fresh_proof(self, checked: dict[str, Any]) -> bool:
        """True when the proof's iat is within PROOF_WINDOW of now and its jti was never seen (then kept)."""
        now = self.clock.time()
        if abs(checked["iat"] - now) > PROOF_WINDOW:
            return False
        if len(self._proof_jtis) >= PROOF_TABLE_SIZE:
            self._proof_jtis = {jti: iat for jti, iat in self._proof_jtis.items() if iat > now - PROOF_WINDOW}
        if checked["jti"] in self._proof_jtis:
            return False
        self._proof_jtis[checked["jti"]] = float(checked["iat"])
        return True

    # -- resource server ----------------------------------------------------------------------------

    async def _api(self, scope: Scope, receive: Receive, path: str) -> _Reply:
        method: str = scope["method"]
        if path == "/api/echo":
            size = len(await _read_body(receive))
            authorization = None
            for name, value in scope["headers"]:
                if name.lower() == b"authorization":
                    authorization = value.decode("latin-1")
            with self._lock:
                self._api_calls[path] += 1
            answer = {"method": method, "authorization": authorization, "bytes": size}
            return _Reply(200, json.dumps(answer).encode(), _API_HEADERS)
        expected = _API_METHODS.get(path)
        if expected is None:
            return _Reply(404, b'{"error":"not_found"}', _API_HEADERS)
        if method != expected:
            return _Reply(405, b'{"error":"method_not_allowed"}', [*_API_HEADERS, (b"allow", expected.encode())])
        size = 0
        if path == "/api/upload":
            size = await _body_size(receive)
        elif path == "/api/slow":
            values = parse_qs(scope["query_string"].decode("latin-1")).get("delay", ["1"])
            await anyio.sleep(float(values[0]))
        token: str | None = None
        scheme = "bearer"
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                kind, _, token = value.decode("latin-1").partition(" ")
                scheme = kind.lower()
                if scheme not in ("bearer", "dpop"):
                    token = None
        proof = _header(scope, b"dpop")
        # The signature is checked outside the lock (the costly part); its jti and key under it.
        checked = (
            None
            if proof is None or token is None
            else _check_proof(proof, method, _base_url(scope) + path, token, self.clock.time())
        )
        with self._lock:
            self._api_calls[path] += 1
            record = self._access.get(token) if token else None
            if record is None or record.revoked or record.grant.revoked or self.clock.time() >= record.expires_at:
                self._stats["api_401"] += 1
                return _Reply(401, _INVALID_TOKEN, _BEARER_CHALLENGE if scheme == "bearer" else _DPOP_CHALLENGE)
            if record.jkt is not None or scheme == "dpop":
                refused = self._resource_proof(record, scheme, proof, checked)
                if refused is not None:
                    return refused
            self._stats["api_ok"] += 1
            grant = record.grant
        if path == "/api/upload":
            return _Reply(200, b'{"bytes":%d}' % size, _API_HEADERS)
        return _Reply(200, json.dumps({"sub": grant.sub, "token_grant": grant.id}).encode(), _API_HEADERS)


def _header(scope: Scope, name: bytes) -> str | None:
    """The value of the request's header ``name`` (lowercase), or ``None``."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _same_target(htu: object, url: str) -> bool:
    """True when a proof's ``htu`` names ``url`` (scheme and host compared without case; no query, no fragment)."""
    if not isinstance(htu, str):
        return False
    given, expected = urlsplit(htu), urlsplit(url)
    return (given.scheme.lower(), given.netloc.lower(), given.path, given.query, given.fragment) == (
        expected.scheme.lower(),
        expected.netloc.lower(),
        expected.path,
        "",
        "",
    )


@functools.lru_cache(maxsize=256)
def _public_key(jwk: str, alg: str) -> Any:
    """A proof's public key, parsed once per key: parsing costs more than verifying, and a client signs every
    proof of a session with one key."""
    return load_jwt().PyJWK(json.loads(jwk), algorithm=alg).key


def _check_proof(proof: str, method: str, url: str, access_token: str | None, now: float) -> dict[str, Any] | None:
    """A DPoP proof's claims plus ``jkt`` (its key's thumbprint) when it is a well-formed proof for this request
    (RFC 9449 section 4.3: typ, an asymmetric alg, a public jwk that verifies the signature, htm, htu, a numeric
    iat, a jti, and ath for ``access_token``); ``None`` otherwise. Freshness and replay are the caller's."""
    jwt = load_jwt()
    try:
        # The header read by hand (json of base64url), not by PyJWT's get_unverified_header: PyJWT checks
        # every character of every segment in Python, and decode() does it again. No signature is involved.
        segment = proof.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        if not isinstance(header, dict):
            return None
        jwk, alg = header.get("jwk"), header.get("alg")
        if header.get("typ") != "dpop+jwt" or alg not in ASYMMETRIC_ALGS or not isinstance(jwk, dict) or "d" in jwk:
            return None
        key = _public_key(json.dumps(jwk, sort_keys=True), alg)
        claims: dict[str, Any] = jwt.decode(
            proof, key, algorithms=[alg], options={"require": ["htm", "htu", "iat", "jti"], "verify_iat": False}
        )
        claims["jkt"] = jwk_thumbprint(jwk)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):  # binascii.Error is a ValueError
        return None
    if (
        claims["htm"] != method
        or not _same_target(claims["htu"], url)
        or isinstance(claims["iat"], bool)
        or not isinstance(claims["iat"], (int, float))
        or not isinstance(claims["jti"], str)
        or (access_token is not None and claims.get("ath") != access_token_hash(access_token))
    ):
        return None
    return claims


def _base_url(scope: Scope) -> str:
    """``scheme://host[:port]`` as the client addressed this server (the Host header)."""
    host = ""
    for name, value in scope["headers"]:
        if name.lower() == b"host":
            host = value.decode("latin-1")
    if not host and scope.get("server"):
        address, port = scope["server"][:2]
        host = f"{address}:{port}"
    return f"{scope.get('scheme', 'http')}://{host}"


def _client_credentials(authorization: str | None, form: dict[str, str]) -> tuple[str, str | None, str | None]:
    """``(auth method, client_id, secret)`` as the request presents them (RFC 6749 section 2.3.1); for a JWT
    client assertion (RFC 7523 section 2.2) the method is ``"jwt"`` and the secret is the assertion."""
    if authorization is not None and authorization[:6].lower() == "basic ":
        if "client_secret" in form or "client_assertion" in form:
            return "ambiguous", None, None
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return "client_secret_basic", None, None
        client_id, sep, secret = decoded.partition(":")
        if not sep or ("client_id" in form and form["client_id"] != unquote_plus(client_id)):
            return "client_secret_basic", None, None
        return "client_secret_basic", unquote_plus(client_id), unquote_plus(secret)
    if "client_assertion" in form:
        if "client_secret" in form or form.get("client_assertion_type") != ASSERTION_TYPE:
            return "ambiguous", None, None
        return "jwt", form.get("client_id"), form["client_assertion"]
    if "client_secret" in form:
        return "client_secret_post", form.get("client_id"), form["client_secret"]
    if "client_id" in form:
        return "none", form["client_id"], None
    return "", None, None


def _fault_reply(kind: str, scope: Scope) -> _Reply:
    option = kind.partition(":")[2]
    if kind.startswith("html:"):
        page = f"<html><body><h1>{option} Service Unavailable</h1></body></html>".encode()
        return _Reply(int(option), page, [(b"content-type", b"text/html")])
    if kind.startswith("redirect:"):
        return _Reply(int(option), b"", [(b"location", scope["path"].encode("latin-1"))])
    if kind == "500":
        return _error(500, "server_error")
    if kind == "503":
        return _error(503, "temporarily_unavailable")
    if kind == "429" or kind.startswith("429:"):
        wait = (option or "1").encode()
        return _Reply(429, b'{"error":"slow_down"}', [*_TOKEN_HEADERS, (b"retry-after", wait)])
    if kind == "malformed":
        return _Reply(200, b"<html>upstream proxy error</html>", [(b"content-type", b"text/html")])
    if kind == "no_access_token":
        return _Reply(200, b'{"token_type":"Bearer","expires_in":60}', _TOKEN_HEADERS)
    if kind == "invalid_client":
        return _error(401, "invalid_client", _BASIC_CHALLENGE)
    if kind == "invalid_scope":
        return _error(400, "invalid_scope")
    size = int(option) if kind.startswith("huge:") else HUGE_SIZE
    head = b'{"access_token":"huge-unusable","token_type":"Bearer","expires_in":60,"padding":"'
    return _Reply(200, head + b"x" * max(0, size - len(head) - 2) + b'"}', _TOKEN_HEADERS)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _body_size(receive: Receive) -> int:
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return size
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return size


async def _sleep_unless_disconnected(delay: float, receive: Receive) -> bool:
    """Sleep ``delay`` seconds; ``False`` (cut short) as soon as the client disconnects.

    The request's body is read by then, so the next message is the disconnect (ASGI): it is awaited in this task,
    under the deadline. (A watcher task cancelling the sleeper's task group raced with the group's exit under
    uvicorn: the handler died of the CancelledError instead of answering.)"""
    with anyio.move_on_after(delay):
        while (await receive())["type"] != "http.disconnect":
            pass
        return False
    return True
