"""The refresh_token grant, sans-I/O: build the request, read the answer, merge it into the entry.

Request parameters are prepared with oauthlib. Answers are read here rather than by oauthlib, because
reading must be total: any status and any bytes give the next entry or a typed error (never an
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
import json
import math
import re
import urllib.parse
from typing import Any, Literal

import attrs
import httpx
from oauthlib.oauth2.rfc6749.parameters import prepare_token_request

from ._exceptions import BindingMismatch, ReauthenticationRequired, RefreshFailed, UpstreamAuthError
from ._models import UpstreamTokens

__all__ = [
    "MAX_LIFETIME",
    "AuthMethod",
    "RefreshRequest",
    "TokenAnswer",
    "build_refresh_request",
    "check_token_url",
    "is_sendable_refresh_token",
    "merge_response",
    "oversize_failure",
    "retry_after_seconds",
    "transport_failure",
]

AuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
RETRYABLE_ERRORS = {"temporarily_unavailable", "server_error", "slow_down"}

MAX_LIFETIME = 10 * 365 * 24 * 3600.0
"""The longest token lifetime, in seconds, taken at its word; a longer stated lifetime means unknown."""

# Codes from RFC 6749, 6750, 8628, 8693, 8707 and 9449: only these are quoted in messages, because the
# ``error`` field is free text that a broken provider may fill with anything, a token included.
REGISTERED_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "access_denied",
        "server_error",
        "temporarily_unavailable",
        "slow_down",
        "authorization_pending",
        "expired_token",
        "invalid_token",
        "insufficient_scope",
        "invalid_target",
        "invalid_dpop_proof",
        "use_dpop_nonce",
    }
)

# RFC 6749 A.12: access-token = 1*VSCHAR. Edge spaces are refused too: it goes into a header line.
_HEADER_TOKEN = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
# RFC 6749 A.13 token types are names or URIs: no spaces, printable ASCII.
_TOKEN_TYPE = re.compile(r"[\x21-\x7e]+")

# Token answers are flat; deeper values are read as null when the whole is too deep for json.loads.
MAX_JSON_DEPTH = 32
# The parts of JSON text that matter for nesting: whole strings (so brackets in them are skipped) and brackets.
_JSON_SKELETON = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)

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
    """A token request ready to send: ``POST url`` with these headers and form body."""

    url: str
    headers: dict[str, str] = attrs.field(repr=False)
    body: str = attrs.field(repr=False)


@attrs.frozen
class TokenAnswer:
    """The token endpoint's answer as received: its status, its (size-capped) body, hidden from repr, and
    its ``Retry-After`` in seconds (see :func:`retry_after_seconds`)."""

    status_code: int
    body: bytes = attrs.field(repr=False)
    retry_after: float | None = None


#: The longest ``Retry-After`` taken at its word (seconds); longer ones are cut to it.
MAX_RETRY_AFTER = 3600.0


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A ``Retry-After`` header (delay-seconds or an HTTP date, RFC 9110 §10.2.3) as seconds from ``now``
    (wall time), capped at :data:`MAX_RETRY_AFTER`; ``None`` when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
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


def check_token_url(url: str) -> None:
    """Refuse a token URL that would send secrets in clear text (plain http is allowed on loopback)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ValueError(
        f"token_url must be an https:// URL (plain http is only allowed on loopback), got {parts.scheme}://"
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
) -> RefreshRequest:
    """The RFC 6749 section 6 request for ``refresh_token``, with the configured client authentication."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    params: dict[str, Any] = {"refresh_token": refresh_token, **(extra_params or {})}
    if scope:
        params["scope"] = scope
    if auth_method == "client_secret_basic":
        # RFC 6749 2.3.1: both halves are form-urlencoded before base64
        pair = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret or '', safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        body = prepare_token_request("refresh_token", include_client_id=False, **params)
    elif auth_method == "client_secret_post":
        body = prepare_token_request("refresh_token", client_id=client_id, client_secret=client_secret or "", **params)
    else:
        body = prepare_token_request("refresh_token", client_id=client_id, **params)
    return RefreshRequest(token_url, headers, body)


def is_sendable_refresh_token(value: object) -> bool:
    """True for a refresh token that can be sent back: a non-empty string that encodes as UTF-8."""
    if not isinstance(value, str) or not value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which a JSON \ud800 escape can carry
        return False
    return True


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
    - Any other status is an error answer: ``invalid_grant`` is :class:`ReauthenticationRequired`, the
      rest :class:`RefreshFailed` (a 3xx included: redirects are never followed); none rotated.
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
    data = _json_object(body)
    code = data.get("error") if isinstance(data.get("error"), str) else None
    if not _is_success(status_code):
        return _error_for(status_code, code)
    access_token = data.get("access_token")
    if not _is_header_token(access_token):
        access_token = None
    refresh_field = data.get("refresh_token")
    if refresh_field is None or refresh_field == "":
        new_refresh: str | None = None
        refresh_token = stored.refresh_token
    elif is_sendable_refresh_token(refresh_field):
        new_refresh = refresh_token = refresh_field
    else:
        new_refresh = refresh_token = None
    if access_token is None and new_refresh is None:
        if code in REGISTERED_ERRORS and refresh_field in (None, ""):
            return _error_for(status_code, code)  # a stated refusal: nothing was issued
        return RefreshFailed(
            f"the token endpoint answered HTTP {status_code} without a usable token; it may have rotated the "
            "refresh token. Retry later; if it persists, check token_url.",
            retryable=True,
            status_code=status_code,
            may_have_rotated=True,
        )

    id_token = stored.id_token
    id_field = data.get("id_token")
    if isinstance(id_field, str) and id_field:
        if stored.upstream_subject is not None and _id_token_subject(id_field) != stored.upstream_subject:
            return BindingMismatch(
                "the provider returned an id_token for another subject than the stored entry (or one that "
                "could not be read); the new tokens were refused. Log the user in again."
            )
        if _is_header_token(id_field):
            id_token = id_field

    expires_at: float | None
    if access_token is None:
        # Keep the rotated refresh token; the stored access token counts as expired from the send time.
        access_token, expires_at = stored.access_token, sent_at
    else:
        lifetime = _lifetime(data.get("expires_in"))
        # A stated lifetime of 0 would make a token born expired, refreshed again at once, forever: unknown
        # instead (the token is used until the API refuses it).
        expires_at = None if not lifetime else sent_at + lifetime

    refresh_fields = [data.get("refresh_expires_in"), data.get("refresh_token_expires_in")]
    # A stated refresh lifetime of 0 or less is unknown: Keycloak sends 0 for offline tokens that never expire.
    refresh_lives = [life for life in map(_lifetime, refresh_fields) if life is not None and life > 0]
    if refresh_token is None:
        refresh_expires_at = None
    elif refresh_lives:
        refresh_expires_at = sent_at + refresh_lives[0]
    elif any(field is not None for field in refresh_fields):
        refresh_expires_at = None  # stated, but not as a usable number
    elif new_refresh is not None and new_refresh != stored.refresh_token:
        refresh_expires_at = None  # a rotated token's lifetime is unknown: default retention applies
    else:
        refresh_expires_at = stored.refresh_expires_at

    token_type = data.get("token_type")
    if not isinstance(token_type, str) or not _TOKEN_TYPE.fullmatch(token_type):
        token_type = stored.token_type
    return attrs.evolve(
        stored,
        access_token=access_token,
        refresh_token=refresh_token,
        id_token=id_token,
        token_type=token_type,
        scope=_scope(data.get("scope")) or stored.scope,
        expires_at=expires_at,
        refresh_expires_at=refresh_expires_at,
        issued_at=sent_at,
        version=stored.version + 1,
    )


def _is_success(status_code: int) -> bool:
    return 200 <= status_code < 300


def _is_header_token(value: object) -> bool:
    return isinstance(value, str) and _HEADER_TOKEN.fullmatch(value) is not None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except RecursionError:
        data = _load_flattened(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _load_flattened(body: bytes) -> Any:
    """``body`` parsed with every value nested deeper than ``MAX_JSON_DEPTH`` read as null.

    For answers whose nesting the interpreter's recursion limit refuses: an odd extra field must not
    make the tokens beside it unreadable.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    pieces: list[str] = []
    depth = 0
    kept_until = 0  # text before this index is in pieces
    for match in _JSON_SKELETON.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth == MAX_JSON_DEPTH + 1:
                pieces.append(text[kept_until : match.start()])
        elif token in ("]", "}"):
            if depth == MAX_JSON_DEPTH + 1:
                pieces.append("null")
                kept_until = match.end()
            depth -= 1
    if depth > MAX_JSON_DEPTH:
        return None  # unbalanced: not JSON anyway
    pieces.append(text[kept_until:])
    try:
        return json.loads("".join(pieces))
    except (ValueError, RecursionError):
        return None


def _lifetime(value: object) -> float | None:
    """Seconds from a JSON number or numeric string; None (unknown) unless finite, >= 0 and <= MAX_LIFETIME."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_LIFETIME:
        return None
    return seconds


def _scope(value: object) -> str | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = " ".join(value)
    return value if isinstance(value, str) and value.strip() else None


def _error_for(status_code: int, code: str | None) -> UpstreamAuthError:
    if code == "invalid_grant" and not 300 <= status_code < 400:
        return ReauthenticationRequired(
            "the provider rejected the refresh token (invalid_grant: expired, revoked or already used); "
            "log the user in again."
        )
    named = f", {code}" if code in REGISTERED_ERRORS else ", an unregistered error code" if code else ""
    if 300 <= status_code < 400:
        return RefreshFailed(
            f"the token endpoint answered with a redirect (HTTP {status_code}), which is never followed: it "
            "would send the refresh token elsewhere. Stored tokens are unchanged; set token_url to the final "
            "URL.",
            retryable=False,
            status_code=status_code,
        )
    if status_code >= 500 and code not in REGISTERED_ERRORS:
        # Not an OAuth error from the authorization server itself: a gateway in front of it (502, 504, an
        # HTML page, a framework's JSON such as {"error": "Gateway Timeout"}) may answer after the provider
        # redeemed the token. Only the server's own (registered) error code proves nothing was consumed.
        return RefreshFailed(
            f"the token endpoint answered HTTP {status_code} without an OAuth error (a gateway or proxy in front "
            "of the provider?); the provider may have rotated the refresh token meanwhile. Retry later.",
            retryable=True,
            status_code=status_code,
            may_have_rotated=True,
        )
    if status_code in (408, 429) or status_code >= 500 or code in RETRYABLE_ERRORS:
        return RefreshFailed(
            f"the token endpoint is unavailable (HTTP {status_code}{named}); stored tokens are unchanged. Retry later.",
            retryable=True,
            status_code=status_code,
        )
    if code is not None:
        return RefreshFailed(
            f"the token endpoint refused the refresh (HTTP {status_code}{named}); stored tokens are "
            "unchanged. Check client_id, client_secret, auth_method and scope.",
            retryable=False,
            status_code=status_code,
        )
    return RefreshFailed(
        f"the token endpoint answered HTTP {status_code} without a token; stored tokens are unchanged. "
        "Check token_url.",
        retryable=False,
        status_code=status_code,
    )


def _id_token_subject(id_token: str) -> str | None:
    """The ``sub`` claim of a JWT, read without verifying it: only compared with the stored subject."""
    if not _is_header_token(id_token):
        return None
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, RecursionError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else None


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
    counts as sent: the failing write may be the last, after the whole request went out.
    """
    kind = type(exc).__name__
    if isinstance(exc, _NOT_SENT):
        message = f"could not reach the token endpoint ({kind}); nothing was sent and stored tokens are unchanged."
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
