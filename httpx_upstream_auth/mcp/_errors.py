"""Our errors across the MCP SDK: carried as a JSON-RPC error, raised again at the call site.

An exception raised inside the SDK's HTTP transport cancels the whole MCP session. So the transport
never raises ours: it answers the request itself with a JSON-RPC error whose ``data`` holds a random
ticket, and keeps the exception under that ticket. The SDK hands the JSON-RPC error to the caller
as an ``MCPError``; :func:`upstream_error` trades the ticket back for our exception. A server cannot
forge one: tickets exist only in this process, and each is redeemed once.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .._exceptions import ReauthenticationRequired, UpstreamAuthError

__all__ = [
    "DATA_KEY",
    "ERROR_CODE",
    "InsecureTransport",
    "InsufficientScope",
    "LoginFailed",
    "ServerRefused",
    "ServerUnreachable",
    "SessionExpired",
    "TokenRejected",
    "error_body",
    "find_upstream_error",
    "insecure_transport",
    "raise_upstream_errors",
    "upstream_error",
]

_S = TypeVar("_S")
_T = TypeVar("_T")

ERROR_CODE = -32042
"""The JSON-RPC error code of an answer the transport made up because the auth failed."""
DATA_KEY = "httpx_upstream_auth"
"""The key of ``error.data`` that holds the ticket."""
_MAX_TICKETS = 1024

_lock = threading.Lock()
_tickets: OrderedDict[str, UpstreamAuthError] = OrderedDict()


class ServerRefused(UpstreamAuthError):
    """The MCP server refused the request although it carried a valid token (a 403, a 401 that a refresh and a
    replay did not cure), or answered it with another HTTP error (a 4xx, a 500, a redirect, which is never
    followed) or with something that is not an MCP answer (an HTML page, JSON that is not JSON-RPC). The
    session stays usable for other requests. (A JSON-RPC error the server sends, whatever the HTTP status, is
    not this: it reaches the caller as the SDK's ``MCPError`` with the server's code.)

    ``status_code`` is the server's status; ``error``, ``scope`` and ``description`` come from its
    ``WWW-Authenticate`` challenge (``None`` when it said nothing).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        error: str | None = None,
        scope: str | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error = error
        self.scope = scope
        self.description = description

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_refused, (type(self), str(self), self.__dict__))


def _rebuild_refused(cls: type[ServerRefused], message: str, fields: dict[str, Any]) -> ServerRefused:
    made = cls.__new__(cls)
    Exception.__init__(made, message)
    made.__dict__.update(fields)
    return made


class TokenRejected(ServerRefused, ReauthenticationRequired):
    """The MCP server answered 401 to a token that was just refreshed: it does not accept this user's tokens
    (another audience or authorization server, a revoked client). Log the user in again; if it keeps
    happening, check the server's ``resource`` and which authorization server it trusts."""


class InsufficientScope(ServerRefused):
    """The MCP server answered 403 ``insufficient_scope``: the user must authorize more. ``scope`` is what the
    server asked for (when it said), to request at the next login (SDK-login mode does that by itself)."""


class SessionExpired(UpstreamAuthError):
    """The MCP server no longer knows this session (404 to a request carrying its session id: the server
    restarted, or expired it). Open a new session (``connect`` again); the tokens are fine."""


class ServerUnreachable(UpstreamAuthError):
    """The request could not reach the MCP server, or its answer was lost (connection refused or reset, a
    timeout), or the server (or a gateway in front of it) answered 502, 503 or 504. Nothing is wrong with the
    tokens: retry later; a server that restarted also lost the session. ``status_code`` is that status
    (``None`` when no answer came)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class LoginFailed(ReauthenticationRequired):
    """The interactive login did not complete (the user closed the browser, a state mismatch, the code
    exchange was refused, the callback timed out). The session stays usable: try the login again."""


class InsecureTransport(UpstreamAuthError, ValueError):
    """A bearer token would travel over plain ``http://`` to a host other than this machine: refused,
    nothing sent. Use the server's ``https://`` URL (plain http is fine for ``localhost``/loopback only)."""


def insecure_transport(url: str) -> InsecureTransport | None:
    """The error for sending a bearer token to ``url``, or ``None`` when that is fine."""
    from urllib.parse import urlsplit

    from ._discovery import is_secure_url

    if is_secure_url(url):
        return None
    parts = urlsplit(url)
    return InsecureTransport(
        f"refusing to send a bearer token over {parts.scheme or 'a non-https'}:// to {parts.hostname!r}: use the "
        "server's https:// URL (plain http only to localhost/loopback); nothing was sent"
    )


def error_body(error: UpstreamAuthError, request_id: Any) -> bytes:
    """A JSON-RPC error answering ``request_id`` that stands for ``error``, and keep ``error`` for it."""
    ticket = secrets.token_urlsafe(12)
    with _lock:
        _tickets[ticket] = error
        while len(_tickets) > _MAX_TICKETS:  # answers nobody read (notifications, dropped calls)
            _tickets.popitem(last=False)
    data = {DATA_KEY: {"ticket": ticket, "error": type(error).__name__}}
    message = {"jsonrpc": "2.0", "id": request_id, "error": {"code": ERROR_CODE, "message": str(error), "data": data}}
    return json.dumps(message).encode()


def upstream_error(exc: BaseException) -> UpstreamAuthError | None:
    """Our error behind an SDK error (``mcp.shared.exceptions.McpError``/``MCPError``), or ``None``.

    For code that drives the SDK itself: ``except MCPError as e: raise upstream_error(e) or e``.
    Each ticket is redeemed once, so the exception returned is the transport's own (with its cause).
    """
    error = getattr(exc, "error", None)
    data = getattr(error, "data", None)
    if getattr(error, "code", None) != ERROR_CODE or not isinstance(data, dict):
        return None
    marker = data.get(DATA_KEY)
    ticket = marker.get("ticket") if isinstance(marker, dict) else None
    if not isinstance(ticket, str):
        return None
    with _lock:
        found = _tickets.pop(ticket, None)
    return found


def raise_upstream_errors(session: _S) -> _S:
    """Make ``session``'s requests raise our errors (``ReauthenticationRequired``, ``RefreshFailed``...).

    ``session`` is the SDK's ``ClientSession`` (2.x or 1.x). Without this the caller gets the SDK's
    ``MCPError``/``McpError`` standing for ours; with it, our error itself (chained to the SDK's).
    :func:`connect` and :func:`connect_session` do it for you; call it on a session you built over
    :func:`http_client`. Returns ``session``.
    """
    for name in ("send_request", "send_discover"):
        method = getattr(session, name, None)
        if method is not None and not getattr(method, "_raises_upstream_errors", False):
            setattr(session, name, _translating(method))
    return session


def _translating(method: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    async def call(*args: Any, **kwargs: Any) -> _T:
        try:
            return await method(*args, **kwargs)
        except Exception as exc:
            ours = upstream_error(exc)
            if ours is None:
                raise
            raise ours from exc

    call._raises_upstream_errors = True  # type: ignore[attr-defined]
    return call


def find_upstream_error(exc: BaseException) -> UpstreamAuthError | None:
    """Our error behind ``exc``: itself, an SDK error standing for it, or one inside exception groups."""
    if isinstance(exc, UpstreamAuthError):
        return exc
    found = upstream_error(exc)
    if found is not None:
        return found
    for inner in getattr(exc, "exceptions", ()):
        found = find_upstream_error(inner)
        if found is not None:
            return found
    return None
