"""The refresh_token grant, sans-I/O: build the request, read the answer, merge it into the entry.

Request parameters are prepared with oauthlib. Answers are read by ``_answer`` rather than by oauthlib,
because reading must be total: any status and any bytes give the next entry or a typed error (never an
``OverflowError`` or a ``RecursionError``), independent of oauthlib's environment switches.

Merge rules: binding fields always come from the stored entry; refresh_token, id_token and scope are kept
when the answer omits them; expiries count from when the request was sent; a lifetime that is missing,
negative, not finite, not a number or longer than :data:`MAX_LIFETIME` is unknown, and so is a refresh
token lifetime of 0 (Keycloak's offline tokens, which do not expire). Errors never quote the answer: only
a registered OAuth error code and the status appear in their messages.
"""

from __future__ import annotations

import base64
import email.utils
import ipaddress
import socket
import ssl
import urllib.parse
from typing import Any, Literal

import attrs
import httpx
from oauthlib.oauth2.rfc6749.parameters import prepare_token_request

from ._answer import (
    MAX_LIFETIME,
    REGISTERED_ERRORS,
    AnswerFields,
    is_sendable_refresh_token,
    read_token_answer,
)
from ._exceptions import BindingMismatch, ConfigurationError, RefreshFailed, UpstreamAuthError
from ._jose import ASSERTION_TYPE
from ._models import UpstreamTokens

__all__ = [
    "MAX_LIFETIME",
    "REGISTERED_ERRORS",
    "AuthMethod",
    "RefreshRequest",
    "TokenAnswer",
    "build_refresh_request",
    "build_revocation_request",
    "check_token_url",
    "is_sendable_refresh_token",
    "merge_response",
    "oversize_failure",
    "retry_after_seconds",
    "transport_failure",
]

AuthMethod = Literal["client_secret_basic", "client_secret_post", "none", "private_key_jwt", "client_secret_jwt"]
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none", "private_key_jwt", "client_secret_jwt")
#: Methods that authenticate the client with a signed JWT (RFC 7523 section 2.2).
JWT_METHODS = ("private_key_jwt", "client_secret_jwt")
#: Methods configured by a client secret alone (no key or assertion object): what a configuration file can name.
SECRET_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
# httpx errors raised before any byte of the request could reach the provider.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
    httpx.InvalidURL,
)


@attrs.frozen
class RefreshRequest:
    """A token request ready to send: ``POST url`` with these headers and form body (``method`` ``"GET"``
    with an empty body reads a metadata document through the same capped, deadline-bound exchange)."""

    url: str
    headers: dict[str, str] = attrs.field(repr=False)
    body: str = attrs.field(repr=False)
    method: str = "POST"


@attrs.frozen
class TokenAnswer:
    """The token endpoint's answer as received: its status, its (size-capped) body, hidden from repr, its
    ``Retry-After`` in seconds (see :func:`retry_after_seconds`) and its ``DPoP-Nonce``."""

    status_code: int
    body: bytes = attrs.field(repr=False)
    retry_after: float | None = None
    dpop_nonce: str | None = None


#: The longest ``Retry-After`` taken at its word (seconds); longer ones are cut to it.
MAX_RETRY_AFTER = 3600.0


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header (delay-seconds or an HTTP date, RFC 9110 §10.2.3) as seconds from ``now``
    (wall time), capped at :data:`MAX_RETRY_AFTER`; ``None`` when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():  # str.isdigit() also takes "²" and other digits float() refuses
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def check_token_url(url: str, name: str = "token_url") -> None:
    """Refuse a token URL (or another endpoint's, ``name``) that would send secrets in clear text (plain http is
    allowed on loopback)."""
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        # Credentials go in the client authentication, never in the URL: a DPoP proof's htu and logs would
        # carry them (and the request line never does, so the provider could not match the proof's htu).
        raise ValueError(
            f"{name} must not carry credentials (user:password@); give them as client_id and client_secret, got "
            f"{parts.scheme}://{parts.hostname}"
        )
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ValueError(
        f"{name} must be an https:// URL (plain http is only allowed on loopback), got {parts.scheme}://"
        f"{parts.hostname}"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_refresh_request(
    *,
    token_url: str,
    client_id: str,
    client_secret: str | None,
    auth_method: AuthMethod,
    refresh_token: str,
    scope: str | None,
    extra_params: dict[str, str] | None = None,
    client_assertion: str | None = None,
) -> RefreshRequest:
    """The RFC 6749 section 6 request for ``refresh_token``, with the configured client authentication
    (``client_assertion``: the signed JWT the two JWT methods send, RFC 7523 section 2.2)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    params: dict[str, Any] = {"refresh_token": refresh_token, **(extra_params or {})}
    if scope:
        params["scope"] = scope
    if auth_method == "client_secret_basic":
        # RFC 6749 2.3.1: both halves are form-urlencoded before base64
        pair = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret or '', safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        body = prepare_token_request("refresh_token", include_client_id=False, **params)
    elif auth_method in JWT_METHODS:
        assert client_assertion is not None
        body = prepare_token_request(
            "refresh_token",
            client_id=client_id,
            client_assertion_type=ASSERTION_TYPE,
            client_assertion=client_assertion,
            **params,
        )
    elif auth_method == "client_secret_post":
        body = prepare_token_request("refresh_token", client_id=client_id, client_secret=client_secret or "", **params)
    else:
        body = prepare_token_request("refresh_token", client_id=client_id, **params)
    return RefreshRequest(token_url, headers, body)


#: The form fields of a token request that authenticate the client (RFC 6749 section 2.3.1, RFC 7523 section 2.2).
CLIENT_AUTH_FIELDS = ("client_id", "client_secret", "client_assertion_type", "client_assertion")


def build_revocation_request(token_request: RefreshRequest, revocation_url: str, token: str) -> RefreshRequest:
    """The RFC 7009 request revoking the refresh token ``token`` at ``revocation_url``, with the client
    authentication of ``token_request`` (the token request built for that token).

    Built from the token request rather than from the settings, so the client authenticates at the revocation
    endpoint exactly as at the token endpoint, whichever method it uses: its ``Authorization`` header and its
    client authentication fields are kept, the grant's fields are replaced by ``token`` and its type hint.
    """
    fields = urllib.parse.parse_qsl(token_request.body, keep_blank_values=True)
    params = [(name, value) for name, value in fields if name in CLIENT_AUTH_FIELDS]
    body = urllib.parse.urlencode([("token", token), ("token_type_hint", "refresh_token"), *params])
    return RefreshRequest(revocation_url, dict(token_request.headers), body)


def merge_response(
    stored: UpstreamTokens, status_code: int, body: bytes, sent_at: float, retry_after: float | None = None
) -> UpstreamTokens:
    """Turn the token endpoint's answer into the next entry, or raise the typed error it calls for.

    ``sent_at`` is the wall time the request was sent: expiries count from it, so a slow answer makes
    the stored expiry early rather than late. Any status and any bytes give an entry or an
    :class:`UpstreamAuthError`:

    - A 2xx answer with a usable ``access_token`` gives the next entry; odd extra fields (an ``error``
      included) are ignored rather than allowed to void tokens the provider has issued.
    - A 2xx answer with no usable ``access_token`` but a usable ``refresh_token`` gives an entry with that
      refresh token and the stored access token marked expired: the provider may have rotated, so the
      new refresh token is kept and the next call refreshes with it.
    - A 2xx ``refresh_token`` that is present but cannot be sent back (not a string, not UTF-8) leaves
      the entry without a refresh token: the stored one may have been rotated away, and presenting it
      again could trip reuse detection. The user logs in again once the access token expires.
    - A 2xx answer without usable tokens is :class:`RefreshFailed` with ``may_have_rotated``, unless it
      carries a registered OAuth ``error`` code, which is classified as for an error status.
    - Any other status is an error answer (a 3xx included: redirects are never followed): ``invalid_grant``
      is :class:`ReauthenticationRequired`, what a setting must fix :class:`ConfigurationError`, the rest
      :class:`RefreshFailed` (see ``_answer.error_for``); none rotated, except a 5xx that is not the
      provider's own OAuth error.
    """
    outcome: UpstreamTokens | UpstreamAuthError
    try:
        outcome = _read_answer(stored, status_code, body, sent_at)
        if isinstance(outcome, RefreshFailed) and outcome.retryable:
            outcome.retry_after = retry_after
    except Exception as exc:  # reading is meant to be total; should a bug break it, fail typed and quiet
        outcome = RefreshFailed(
            f"the token endpoint's answer could not be read (a bug in httpx-upstream-auth: "
            f"{type(exc).__name__}); please report it. Retry later.",
            retryable=True,
            status_code=status_code,
            may_have_rotated=_is_success(status_code),
        )
    # Raised from this frame, holding no answer: error reporters record every frame's locals.
    del body
    if isinstance(outcome, UpstreamAuthError):
        raise outcome
    return outcome


def _read_answer(
    stored: UpstreamTokens, status_code: int, body: bytes, sent_at: float
) -> UpstreamTokens | UpstreamAuthError:
    """:func:`merge_response`'s decision, returning the error rather than raising it (see there)."""
    fields = read_token_answer(status_code, body)
    if isinstance(fields, UpstreamAuthError):
        return fields
    return _merge(stored, fields, sent_at)


def _merge(stored: UpstreamTokens, fields: AnswerFields, sent_at: float) -> UpstreamTokens | UpstreamAuthError:
    """The next entry: the answer's fields over the stored entry, by the merge rules (module docstring)."""
    new_refresh = fields.refresh_token
    refresh_token = new_refresh if new_refresh is not None or fields.refresh_unusable else stored.refresh_token

    id_token = stored.id_token
    if fields.id_token_given:
        if stored.upstream_subject is not None and fields.id_subject != stored.upstream_subject:
            return BindingMismatch(
                "the provider returned an id_token for another subject than the stored entry (or one that "
                "could not be read); the new tokens were refused. Log the user in again."
            )
        if fields.id_token is not None:
            id_token = fields.id_token

    expires_at: float | None
    access_token = fields.access_token
    if access_token is None:
        # Keep the rotated refresh token; the stored access token counts as expired from the send time.
        access_token, expires_at = stored.access_token, sent_at
    else:
        # A stated lifetime of 0 would make a token born expired, refreshed again at once, forever: unknown
        # instead (the token is used until the API refuses it).
        expires_at = None if not fields.lifetime else sent_at + fields.lifetime

    if refresh_token is None:
        refresh_expires_at = None
    elif fields.refresh_lifetime is not None:
        refresh_expires_at = sent_at + fields.refresh_lifetime
    elif fields.refresh_lifetime_stated:
        refresh_expires_at = None  # stated, but not as a usable number
    elif new_refresh is not None and new_refresh != stored.refresh_token:
        refresh_expires_at = None  # a rotated token's lifetime is unknown: default retention applies
    else:
        refresh_expires_at = stored.refresh_expires_at

    return attrs.evolve(
        stored,
        access_token=access_token,
        refresh_token=refresh_token,
        id_token=id_token,
        token_type=fields.token_type or stored.token_type,
        scope=fields.scope or stored.scope,
        expires_at=expires_at,
        refresh_expires_at=refresh_expires_at,
        issued_at=sent_at,
        version=stored.version + 1,
    )


def _is_success(status_code: int) -> bool:
    return 200 <= status_code < 300


def oversize_failure(status_code: int, max_bytes: int) -> RefreshFailed:
    """The error for an answer larger than ``max_bytes``; a 2xx one may have carried rotated tokens."""
    return _dropped(status_code, f"exceeded {max_bytes} bytes", "Check token_url.", retryable=False)


def slow_failure(status_code: int, seconds: float) -> RefreshFailed:
    """The error for an answer still arriving after ``seconds``; a 2xx one may have carried rotated tokens."""
    return _dropped(status_code, f"was still arriving after {seconds:g}s", "Retry later.", retryable=True)


def _dropped(status_code: int, why: str, advice: str, *, retryable: bool) -> RefreshFailed:
    # A 5xx that could not be read cannot show it was the provider's own OAuth error: a gateway's may
    # follow a redemption.
    rotated = _is_success(status_code) or status_code >= 500
    return RefreshFailed(
        f"the token endpoint's answer (HTTP {status_code}) {why} and was dropped"
        + ("; it may have rotated the refresh token. " if rotated else "; stored tokens are unchanged. ")
        + advice,
        retryable=retryable,
        status_code=status_code,
        may_have_rotated=rotated,
    )


def transport_failure(exc: Exception, status_code: int | None) -> RefreshFailed:
    """The error for a failed exchange; ``status_code`` is the answer's status if its head had arrived.

    It may have rotated unless the request certainly never left (no connection, an unusable URL, a
    request refused locally) or the provider had already answered with a non-2xx status. A failed write
    counts as sent: the failing write may be the last, after the whole request went out. A connection
    that a setting keeps from ever opening (a host name that does not exist, a certificate refused, a
    proxy's refusal) is a :class:`ConfigurationError`; a temporary resolver failure is retryable.
    """
    kind = type(exc).__name__
    if isinstance(exc, _NOT_SENT):
        refused = _configuration_failure(exc)
        if refused is not None:
            return refused
        why = "a temporary DNS failure" if _resolver_errno(exc) == socket.EAI_AGAIN else kind
        message = f"could not reach the token endpoint ({why}); nothing was sent and stored tokens are unchanged."
        rotated = False
    elif status_code is not None and not _is_success(status_code) and status_code < 500:
        message = (
            f"the token endpoint answered HTTP {status_code}, but reading the answer failed ({kind}); stored "
            "tokens are unchanged."
        )
        rotated = False
    else:
        message = (
            f"the token endpoint's answer was lost ({kind}) after the request may have reached it; it may have "
            "rotated the refresh token."
        )
        rotated = True
    return RefreshFailed(message + " Retry later.", retryable=True, status_code=status_code, may_have_rotated=rotated)


#: Resolver answers that say the name does not exist (as opposed to EAI_AGAIN: the resolver could not answer).
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
#: TLS errors that are a connection's end, not a handshake's refusal.
_TLS_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ssl.SSLWantReadError)


def _configuration_failure(exc: Exception) -> ConfigurationError | None:
    """The configuration error behind a connection that could not open, or ``None`` if it may open later."""
    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.InvalidURL)):
        return ConfigurationError(
            f"the token request could not be sent ({type(exc).__name__}); nothing was sent. Check token_url and "
            "the proxy setting.",
            setting="token_url",
        )
    if isinstance(exc, httpx.ProxyError):
        # httpcore words a refused CONNECT as "<status> <reason>".
        status, _, _ = str(exc).partition(" ")
        if status.isdigit() and 400 <= int(status) < 500:
            return ConfigurationError(
                f"the proxy refused to open a tunnel to the token endpoint (HTTP {int(status)}); nothing was sent. "
                "Check the proxy setting (proxy=, or HTTPS_PROXY/HTTP_PROXY), its credentials, and that it lets "
                "this host through.",
                setting="proxy",
                status_code=int(status),
            )
        return None
    if _resolver_errno(exc) in _NO_SUCH_NAME:
        return ConfigurationError(
            "the token endpoint's host name does not exist (DNS); nothing was sent. Check token_url's host (and "
            "the proxy's, when one is set).",
            setting="token_url",
        )
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return ConfigurationError(
                f"the token endpoint's TLS certificate was refused ({cause.verify_message or 'not trusted'}); "
                "nothing was sent. Check token_url's host, and verify= (the CA bundle that signs the provider's "
                "certificate).",
                setting="tls",
            )
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, _TLS_TRANSIENT):
            return ConfigurationError(
                f"the TLS handshake with the token endpoint failed ({cause.reason or type(cause).__name__}); "
                "nothing was sent. Check token_url (https to a port that speaks TLS?) and verify=.",
                setting="tls",
            )
    return None


def _resolver_errno(exc: BaseException) -> int | None:
    """The ``getaddrinfo`` error code among ``exc``'s causes, if a name lookup failed."""
    for cause in _causes(exc):
        if isinstance(cause, socket.gaierror):
            return cause.errno
    return None


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or while handling (httpx wraps httpcore, which wraps the OS)."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(found) < 16 and not any(current is seen for seen in found):
        found.append(current)
        current = current.__cause__ or current.__context__
    return found
