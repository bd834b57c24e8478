"""The refresh_token grant, sans-I/O: build the request, read the response, merge into the entry.

Parameters are prepared and token responses validated with oauthlib; this module adds what oauthlib
leaves to the caller: client authentication, error classification, and the merge rules (binding fields
always from the stored entry; refresh_token, id_token and scope kept when the response omits them;
``expires_at`` from when the request was sent; a missing ``expires_in`` means unknown).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import urllib.parse
from typing import Any, Literal

import attrs
from oauthlib.oauth2 import OAuth2Error
from oauthlib.oauth2.rfc6749.parameters import parse_token_response, prepare_token_request

from ._exceptions import BindingMismatch, ReauthenticationRequired, RefreshFailed
from ._models import UpstreamTokens

__all__ = ["AuthMethod", "RefreshRequest", "build_refresh_request", "check_token_url", "merge_response"]

AuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
RETRYABLE_ERRORS = {"temporarily_unavailable", "server_error", "slow_down"}


@attrs.frozen
class RefreshRequest:
    """A token request ready to send: ``POST url`` with these headers and form body."""

    url: str
    headers: dict[str, str] = attrs.field(repr=False)
    body: str = attrs.field(repr=False)


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
        body = prepare_token_request(
            "refresh_token", client_id=client_id, client_secret=client_secret or "", **params
        )
    else:
        body = prepare_token_request("refresh_token", client_id=client_id, **params)
    return RefreshRequest(token_url, headers, body)


def merge_response(stored: UpstreamTokens, status_code: int, body: bytes, sent_at: float) -> UpstreamTokens:
    """Turn the token endpoint's answer into the next entry, or raise the typed error it calls for.

    ``sent_at`` is the wall time the request was sent: expiries count from it, so a slow answer
    makes the stored expiry early rather than late.
    """
    data = _json_object(body)
    if status_code != 200 or "error" in data:
        raise _error_for(status_code, data)
    try:
        params = parse_token_response(json.dumps(data), scope=None)
    except (OAuth2Error, ValueError, TypeError) as exc:
        raise RefreshFailed(
            f"the token endpoint's answer was not a valid token response ({type(exc).__name__}); stored "
            "tokens are unchanged. Retry later; if it persists, check token_url.",
            retryable=True,
            status_code=status_code,
        ) from None

    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        # oauthlib only checks that the key is present: null, "" or an object would be sent as "Bearer None".
        raise RefreshFailed(
            "the token endpoint's answer had no usable access_token; stored tokens are unchanged. Retry later; "
            "if it persists, check token_url.",
            retryable=True,
            status_code=status_code,
        )
    new_refresh = data.get("refresh_token") or None
    id_token = data.get("id_token") or None
    if id_token is not None and stored.upstream_subject is not None:
        subject = _id_token_subject(id_token)
        if subject != stored.upstream_subject:
            raise BindingMismatch(
                "the provider returned an id_token for another subject than the stored entry; the new "
                "tokens were refused and the stored entry kept. Log the user in again."
            )
    scope = params.get("scope")
    refresh_life = _number(data.get("refresh_expires_in", data.get("refresh_token_expires_in")))
    if refresh_life is not None:
        refresh_expires_at: float | None = sent_at + refresh_life
    elif new_refresh is not None and new_refresh != stored.refresh_token:
        refresh_expires_at = None  # a rotated token's lifetime is unknown: default retention applies
    else:
        refresh_expires_at = stored.refresh_expires_at
    expires_in = _number(data.get("expires_in"))
    return attrs.evolve(
        stored,
        access_token=access_token,
        refresh_token=new_refresh or stored.refresh_token,
        id_token=id_token or stored.id_token,
        token_type=str(data.get("token_type") or stored.token_type),
        scope=" ".join(scope) if isinstance(scope, list) else (scope or stored.scope),
        expires_at=None if expires_in is None else sent_at + expires_in,
        refresh_expires_at=refresh_expires_at,
        issued_at=sent_at,
        version=stored.version + 1,
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def _error_for(status_code: int, data: dict[str, Any]) -> Exception:
    error = data.get("error")
    code = error if isinstance(error, str) else None
    if code == "invalid_grant":
        return ReauthenticationRequired(
            "the provider rejected the refresh token (invalid_grant: expired, revoked or already used); "
            "log the user in again."
        )
    if status_code == 429 or status_code >= 500 or code in RETRYABLE_ERRORS:
        return RefreshFailed(
            f"the token endpoint is unavailable (HTTP {status_code}{f', {code}' if code else ''}); stored "
            "tokens are unchanged. Retry later.",
            retryable=True,
            status_code=status_code,
        )
    if code is not None:
        return RefreshFailed(
            f"the token endpoint refused the refresh ({code}, HTTP {status_code}); stored tokens are "
            "unchanged. Check client_id, client_secret, auth_method and scope.",
            retryable=False,
            status_code=status_code,
        )
    return RefreshFailed(
        f"the token endpoint answered HTTP {status_code} without a token; stored tokens are unchanged. "
        "Check token_url.",
        retryable=status_code == 200,
        status_code=status_code,
    )


def _id_token_subject(id_token: str) -> str | None:
    """The ``sub`` claim of a JWT, read without verifying it: only compared with the stored subject."""
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else None
