"""A token endpoint's answer, read totally: any status and any body give checked fields or a typed error.

Reading never raises anything else (no ``OverflowError``, no ``RecursionError``), whatever the bytes, and
whatever a caller's already parsed mapping holds. A refresh merges the fields into the stored entry
(``_oauth.merge_response``); a login's answer becomes a new entry (``UpstreamTokens.from_token_response``):
both read it here, by the same rules. A lifetime is a number (or numeric string) that is finite, from 0 to
:data:`MAX_LIFETIME`; a token is used only when it can go into a header line; an error code is quoted
only when it is a registered one, because the ``error`` field is free text that a broken provider may
fill with anything, a token included.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import attrs

from ._exceptions import ConfigurationError, ReauthenticationRequired, RefreshFailed, UpstreamAuthError

__all__ = [
    "MAX_LIFETIME",
    "REGISTERED_ERRORS",
    "AnswerFields",
    "error_for",
    "is_header_token",
    "is_sendable_refresh_token",
    "read_token_answer",
]

MAX_LIFETIME = 10 * 365 * 24 * 3600.0
"""The longest token lifetime, in seconds, taken at its word; a longer stated lifetime means unknown."""

RETRYABLE_ERRORS = {"temporarily_unavailable", "server_error", "slow_down"}
# Codes from RFC 6749, 6750, 8628, 8693, 8707 and 9449: only these are quoted in messages.
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
#: Codes that say the client itself is refused (RFC 6749 5.2): its id, secret, authentication method or grants.
CLIENT_ERRORS = frozenset({"invalid_client", "unauthorized_client", "unsupported_grant_type"})
#: Statuses that say nothing answers token requests at the URL (not found, wrong method, gone).
NO_ENDPOINT_STATUSES = frozenset({404, 405, 410})

# RFC 6749 A.12: access-token = 1*VSCHAR. Edge spaces are refused too: it goes into a header line.
_HEADER_TOKEN = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
# RFC 6749 A.13 token types are names or URIs: no spaces, printable ASCII.
_TOKEN_TYPE = re.compile(r"[\x21-\x7e]+")

# Token answers are flat; deeper values are read as null when the whole is too deep for json.loads.
MAX_JSON_DEPTH = 32
# The parts of JSON text that matter for nesting: whole strings (so brackets in them are skipped) and brackets.
_JSON_SKELETON = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


@attrs.frozen
class AnswerFields:
    """What a successful (2xx) token answer says, each field checked; ``None`` is absent or unusable."""

    access_token: str | None = attrs.field(repr=False)
    refresh_token: str | None = attrs.field(repr=False)
    #: The answer has a ``refresh_token`` (not null, not empty) that cannot be sent back (not a string, not UTF-8).
    refresh_unusable: bool
    #: The answer has an ``id_token`` (a non-empty string), usable or not, naming ``id_subject`` (None: unreadable).
    id_token_given: bool
    id_subject: str | None
    id_token: str | None = attrs.field(repr=False)
    #: ``expires_in`` in seconds (0 included: what it means is the reader's decision).
    lifetime: float | None
    #: The first positive one of ``refresh_expires_in`` and ``refresh_token_expires_in``, and whether either was given.
    refresh_lifetime: float | None
    refresh_lifetime_stated: bool
    token_type: str | None
    scope: str | None


def read_token_answer(status_code: int, body: bytes | Mapping[Any, Any]) -> AnswerFields | UpstreamAuthError:
    """The answer's fields, or the typed error it calls for (returned, not raised; see ``error_for``).

    ``body`` is the raw body, or the JSON object already parsed. A non-2xx status is an error answer. A 2xx
    answer with neither a usable ``access_token`` nor a usable ``refresh_token`` is an error too:
    classified as for an error status when it carries a registered OAuth ``error`` code and no refresh
    token, else :class:`RefreshFailed` with ``may_have_rotated`` (a 200 may carry a rotation the client
    cannot read). A 2xx answer with only a usable refresh token gives fields without an access token.
    """
    if isinstance(body, Mapping):
        data: dict[Any, Any] = dict(body)
        is_object = True
    else:
        data, is_object = _json_object(body)
    code = data.get("error") if isinstance(data.get("error"), str) else None
    if not 200 <= status_code < 300:
        return error_for(status_code, code)
    access_token = data.get("access_token")
    if not is_header_token(access_token):
        access_token = None
    refresh_field = data.get("refresh_token")
    refresh_token: str | None = None
    refresh_unusable = False
    if refresh_field is not None and refresh_field != "":
        if is_sendable_refresh_token(refresh_field):
            refresh_token = refresh_field
        else:
            refresh_unusable = True
    if access_token is None and refresh_token is None:
        if code in REGISTERED_ERRORS and not refresh_unusable:
            return error_for(status_code, code)  # a stated refusal: nothing was issued
        if not is_object:
            return RefreshFailed(
                f"the token endpoint answered HTTP {status_code} with a body that is not a JSON object (a web page?"
                " token_url may point elsewhere than the token endpoint); it may have rotated the refresh token. "
                "Check token_url.",
                retryable=True,
                status_code=status_code,
                may_have_rotated=True,
            )
        return RefreshFailed(
            f"the token endpoint answered HTTP {status_code} without a usable token; it may have rotated the "
            "refresh token. Retry later; if it persists, check token_url.",
            retryable=True,
            status_code=status_code,
            may_have_rotated=True,
        )
    id_field = data.get("id_token")
    id_token = id_field if isinstance(id_field, str) and id_field else None
    refresh_fields = [data.get("refresh_expires_in"), data.get("refresh_token_expires_in")]
    # A stated refresh lifetime of 0 or less is unknown: Keycloak sends 0 for offline tokens that never expire.
    refresh_lives = [life for life in map(_lifetime, refresh_fields) if life is not None and life > 0]
    token_type = data.get("token_type")
    return AnswerFields(
        access_token=access_token,
        refresh_token=refresh_token,
        refresh_unusable=refresh_unusable,
        id_token_given=id_token is not None,
        id_subject=None if id_token is None else _id_token_subject(id_token),
        id_token=id_token if is_header_token(id_token) else None,
        lifetime=_lifetime(data.get("expires_in")),
        refresh_lifetime=refresh_lives[0] if refresh_lives else None,
        refresh_lifetime_stated=any(field is not None for field in refresh_fields),
        token_type=token_type if isinstance(token_type, str) and _TOKEN_TYPE.fullmatch(token_type) else None,
        scope=_scope(data.get("scope")),
    )


def is_header_token(value: object) -> bool:
    """True for a string that can be sent in a header line as a token (RFC 6749 A.12)."""
    return isinstance(value, str) and _HEADER_TOKEN.fullmatch(value) is not None


def is_sendable_refresh_token(value: object) -> bool:
    """True for a refresh token that can be sent back: a non-empty string that encodes as UTF-8."""
    if not isinstance(value, str) or not value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which a JSON \ud800 escape can carry
        return False
    return True


def _json_object(body: bytes) -> tuple[dict[Any, Any], bool]:
    """The body's JSON object, and whether it was one (``{}`` and False for anything else)."""
    try:
        data = json.loads(body)
    except RecursionError:
        data = _load_flattened(body)
    except ValueError:
        return {}, False
    return (data, True) if isinstance(data, dict) else ({}, False)


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


def _id_token_subject(id_token: str) -> str | None:
    """The ``sub`` claim of a JWT, read without verifying it: only compared with the stored subject."""
    if not is_header_token(id_token):
        return None
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, RecursionError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else None


def error_for(status_code: int, code: str | None) -> UpstreamAuthError:
    """The typed error for an error answer (``code``: its ``error`` field, if a string).

    ``invalid_grant`` is :class:`ReauthenticationRequired`. What a setting must fix is a
    :class:`ConfigurationError` naming it: no token endpoint at the URL (404, 405, 410, or a redirect,
    which is never followed), a proxy's refusal (407), the client refused (``invalid_client``,
    ``unauthorized_client``, ``unsupported_grant_type``, or a 401 without a code), ``invalid_scope``. The
    rest is :class:`RefreshFailed`: retryable for 408, 429, 5xx and the retryable codes; with
    ``may_have_rotated`` for a 5xx without a registered code (a gateway may answer after the provider
    redeemed the token behind it).
    """
    if code == "invalid_grant" and not 300 <= status_code < 400:
        return ReauthenticationRequired(
            "the provider rejected the refresh token (invalid_grant: expired, revoked or already used); "
            "log the user in again."
        )
    named = f", {code}" if code in REGISTERED_ERRORS else ", an unregistered error code" if code else ""
    if 300 <= status_code < 400:
        return ConfigurationError(
            f"the token endpoint answered with a redirect (HTTP {status_code}), which is never followed: it "
            "would send the refresh token elsewhere. Stored tokens are unchanged; set token_url to the final "
            "URL.",
            setting="token_url",
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
    if status_code in NO_ENDPOINT_STATUSES:
        return ConfigurationError(
            f"nothing answers token requests at token_url (HTTP {status_code}{named}); stored tokens are "
            "unchanged. Check the token URL: its host, its path (and a tenant's or issuer's path in it).",
            setting="token_url",
            status_code=status_code,
        )
    if status_code == 407:
        return ConfigurationError(
            "a proxy refused the token request (HTTP 407, proxy authentication required); stored tokens are "
            "unchanged. Check the proxy setting (proxy=, or HTTPS_PROXY/HTTP_PROXY) and its credentials.",
            setting="proxy",
            status_code=status_code,
        )
    if code in CLIENT_ERRORS or (status_code == 401 and code is None):
        return ConfigurationError(
            f"the token endpoint refused this client (HTTP {status_code}{named}); stored tokens are unchanged. "
            "Check client_id, client_secret and auth_method (and that the client may use refresh tokens).",
            setting="client",
            status_code=status_code,
        )
    if code == "invalid_scope":
        return ConfigurationError(
            f"the token endpoint refused the requested scope (HTTP {status_code}, invalid_scope); stored tokens "
            "are unchanged. Check the refresher's scope: a refresh may only narrow the granted scope.",
            setting="scope",
            status_code=status_code,
        )
    if code == "invalid_dpop_proof":
        # This session's proof (RFC 9449): another key than the one its grant is bound to, or a clock far off.
        return RefreshFailed(
            f"the token endpoint refused the DPoP proof (HTTP {status_code}, invalid_dpop_proof): the session's key "
            "is not the one its grant is bound to, or this host's clock is far off; stored tokens are unchanged.",
            retryable=False,
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
