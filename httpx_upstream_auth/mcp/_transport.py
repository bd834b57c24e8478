"""Transports that drive the upstream auth for an MCP client and never raise our errors into the SDK.

The SDK runs each HTTP request of a session in a task of the session's task group: an exception there
cancels the whole session (the tool call sees ``CancelledError``, the ``async with`` an
``ExceptionGroup``). So these transports run :class:`UpstreamAuth`'s flow themselves and, when it
fails with an :class:`UpstreamAuthError`, answer the request locally: a JSON-RPC error for a
JSON-RPC request (which the SDK hands to that request's caller, see ``_errors``), a bare status
otherwise. After a dead grant, the session's closing ``DELETE`` is answered locally too, so closing a
session whose grant is dead does not try to refresh again (after any other failure it is sent).
A server's refusal that the SDK would turn into an untyped error, or a dead session (a 401 after the
refresh and replay, a 403, a 404 for the session), and a request that could not reach the server,
are answered locally the same way with our typed error (see docs/mcp.md, "Errors").
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx

from .._exceptions import BindingMismatch, ReauthenticationRequired, RefreshFailed, StorageError, UpstreamAuthError
from .._models import Binding, EntryKey
from ._errors import (
    InsufficientScope,
    LoginFailed,
    ServerRefused,
    ServerUnreachable,
    SessionExpired,
    TokenRejected,
    error_body,
    insecure_transport,
)

if TYPE_CHECKING:
    from .._manager import TokenManager

__all__ = ["LegacyAsyncMCPAuthTransport", "MCPAuthDriver"]

_Send = Callable[[Any], Awaitable[Any]]
logger = logging.getLogger("httpx_upstream_auth.mcp")
_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_MAX_DESCRIPTION = 200
MAX_ERROR_BODY = 64 * 1024
"""The most of an HTTP error answer read to find a JSON-RPC error in it."""


def challenge_params(www_authenticate: str | None) -> dict[str, str]:
    """The auth-params of a ``Bearer`` challenge (``error``, ``scope``, ``resource_metadata``...), lower-cased names."""
    if not www_authenticate:
        return {}
    return {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(www_authenticate)
    }


def refusal(request: Any, response: Any) -> UpstreamAuthError | None:
    """Our error for a server's final answer that the SDK would turn into an untyped error (or a dead session):
    a 401 after the refresh and replay, a 403, a 404 to a request of a session. ``None`` otherwise."""
    status = response.status_code
    if status == 404 and "mcp-session-id" in request.headers:
        return SessionExpired(
            "the MCP server no longer knows this session (404): it restarted or expired it. Open a new session "
            "(connect again); the tokens are fine."
        )
    if status not in (401, 403):
        return None
    params = challenge_params(response.headers.get("www-authenticate"))
    error, scope = params.get("error"), params.get("scope")
    description = (params.get("error_description") or "")[:_MAX_DESCRIPTION] or None
    said = f" ({error}{': ' + description if description else ''})" if error else ""
    if status == 401:
        return TokenRejected(
            f"the MCP server rejected the session's token even after a refresh (401{said}): it does not accept "
            "this user's tokens. Log the user in again; if it persists, check which authorization server and "
            "resource the server expects.",
            status_code=401,
            error=error,
            scope=scope,
            description=description,
        )
    if error == "insufficient_scope":
        wanted = f" it asks for scope {scope!r}" if scope else " it did not say which scope"
        return InsufficientScope(
            f"the MCP server needs more authorization for this request (403 insufficient_scope);{wanted}. Log "
            "the user in again asking for that scope.",
            status_code=403,
            error=error,
            scope=scope,
            description=description,
        )
    return ServerRefused(
        f"the MCP server refused this request (403{said}). The user's account may lack access; ask the server's "
        "operator.",
        status_code=403,
        error=error,
        scope=scope,
        description=description,
    )


def server_error(request: Any, response: Any) -> UpstreamAuthError:
    """Our error for an HTTP error answer to a JSON-RPC request that carries no JSON-RPC error: 502/503/504 mean
    the server (or a gateway) is not there now; any other 3xx/4xx/5xx is a refusal (a redirect is never
    followed: the token stays with the URL it was meant for)."""
    status = response.status_code
    if status in (502, 503, 504):
        return ServerUnreachable(
            f"the MCP server, or a gateway in front of it, answered {status}: it cannot serve now. Retry later; the "
            "tokens are fine.",
            status_code=status,
        )
    if 300 <= status < 400:
        said = (
            f"redirected this request (HTTP {status}); a redirect is not followed, so the token stays with the URL "
            "it was meant for. Use the server's final URL."
        )
    elif status == 404:
        said = "answered 404 (no MCP endpoint at this URL?)"
    else:
        said = f"answered HTTP {status} without a JSON-RPC error"
    return ServerRefused(f"the MCP server {said}", status_code=status)


def _content_type(response: Any) -> str:
    return str(response.headers.get("content-type", "")).partition(";")[0].strip().lower()


def _jsonrpc(body: bytes) -> dict[str, Any] | None:
    """The JSON-RPC message in ``body``, or ``None`` when it is none."""
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(message, dict) and message.get("jsonrpc") == "2.0":
        return message
    return None


async def _read_at_most(response: Any, limit: int) -> bytes | None:
    """The decoded body, or ``None`` past ``limit`` bytes (the rest is not read)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _status(error: UpstreamAuthError) -> int:
    # 503 when trying again later may work; 401 when it cannot until the user logs in (or the
    # configuration is fixed).
    if isinstance(error, StorageError) or (isinstance(error, RefreshFailed) and error.retryable):
        return 503
    return 401


def _plain_headers(response: Any) -> dict[str, str]:
    # The body is handed on decoded: its length and encoding headers no longer apply.
    dropped = ("content-encoding", "content-length", "transfer-encoding")
    return {k: v for k, v in response.headers.items() if k.lower() not in dropped}


def _request_id(request: Any) -> tuple[bool, Any]:
    """``(True, id)`` when the request carries one JSON-RPC request (a method and an id)."""
    if request.method != "POST":
        return False, None
    try:
        message = json.loads(request.content)
    except (ValueError, RuntimeError, TypeError):  # RuntimeError: a streamed body, not read
        return False, None
    if isinstance(message, dict) and "method" in message and "id" in message:
        return True, message["id"]
    return False, None


class MCPAuthDriver:
    """The auth flow around one inner send, plus what a failure leaves behind; shared by both transports.

    After an error that only a new login (or a configuration change) can fix, requests are answered
    with it again, without asking the provider, until the stored entry changes (the user logged in
    again): a dead grant is not presented once per request, and closing the session does not refresh.
    """

    def __init__(
        self,
        manager: TokenManager,
        session_id: str,
        expect: Binding | None,
        auth: Any = None,
        *,
        sdk1: bool = False,
        transport_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.auth = manager.auth(session_id, expect) if auth is None else auth
        self._transport_errors = transport_errors
        # The SDK 1.x raises on any 4xx to a POST (cancelling the session), so there the made-up answer
        # is a 200 carrying the JSON-RPC error, and a notification is answered 202 (it is dropped).
        self._sdk1 = sdk1
        self.failed: UpstreamAuthError | None = None
        """The error of the last request, until a request succeeds again."""
        self._storage = manager.storage
        self._key = EntryKey(manager.provider_id, session_id)
        self._dead_version: int | None = None  # the entry version a terminal error was about
        self._dead = False

    async def send(self, request: Any, send: _Send, answer: Callable[..., Any]) -> Any:
        """Send ``request`` through the auth flow with ``send``; on our error, ``answer`` it locally."""
        insecure = insecure_transport(str(request.url))
        if insecure is not None:  # checked here too: an http_client() may be used with any URL, or redirected
            return self._answer(request, insecure, answer)
        # Only an error that a new login must cure is answered again without asking: after a transient one
        # (a 503 from the token endpoint) the next request, the session's closing DELETE included, tries again.
        if request.method == "GET" and self._dead:
            # The SDK's server-to-client stream reconnecting: answered now it would count as a failed attempt,
            # and the SDK gives that stream up after two. Parked instead until new tokens are stored (the
            # SDK cancels it when the session closes).
            while await self._still_dead():
                await self._storage.awatch(self._key, self._dead_version, 5.0)
        if self.failed is not None and await self._still_dead():
            return self._answer(request, copy.copy(self.failed), answer)
        flow = self.auth.async_auth_flow(request)
        try:
            try:
                outgoing = await flow.__anext__()
            except UpstreamAuthError as exc:
                return await self._fail(request, exc, answer)
            while True:
                try:
                    response = await send(outgoing)
                except self._transport_errors as exc:
                    if not _request_id(request)[0]:
                        raise  # the SDK's own handling (a GET stream reconnects; a DELETE is best effort)
                    unreachable = ServerUnreachable(
                        f"could not reach the MCP server, or its answer was lost ({type(exc).__name__}); retry "
                        "later. The tokens are fine."
                    )
                    unreachable.__cause__ = exc
                    return self._answer(request, unreachable, answer)
                try:
                    outgoing = await flow.asend(response)
                except StopAsyncIteration:
                    self.failed, self._dead = None, False
                    if not _request_id(request)[0]:
                        return response
                    return await self._final(request, response, answer)
                except UpstreamAuthError as exc:  # the refresh after a 401 failed
                    await response.aclose()
                    return await self._fail(request, exc, answer)
                await response.aclose()
        finally:
            await flow.aclose()

    async def _final(self, request: Any, response: Any, answer: Callable[..., Any]) -> Any:
        """The server's answer to a JSON-RPC request, as the SDK can take it: a refusal, an HTTP error, or a body
        that is no MCP answer becomes our typed error (the SDK would make an untyped one, or on 1.x end the
        session); a JSON-RPC error at an HTTP error status stays the server's (on 1.x, at 200)."""
        refused = refusal(request, response)
        if refused is not None:
            await response.aclose()
            return self._answer(request, refused, answer)
        status, kind = response.status_code, _content_type(response)
        if status >= 300:
            body = (
                await _read_at_most(response, MAX_ERROR_BODY) if kind == "application/json" and status >= 400 else None
            )
            await response.aclose()
            message = None if body is None else _jsonrpc(body)
            if message is None or not isinstance(message.get("error"), dict):
                return self._answer(request, server_error(request, response), answer)
            if self._sdk1:  # its transport raises on any 4xx/5xx to a POST, ending the session
                message = {"jsonrpc": "2.0", "id": _request_id(request)[1], "error": message["error"]}
                status, body = 200, json.dumps(message).encode()
            return answer(status, headers=_plain_headers(response), content=body, request=request)
        if status == 202 or kind == "text/event-stream":
            return response
        if kind == "application/json":
            body = await response.aread()
            await response.aclose()
            if _jsonrpc(body) is not None:
                return answer(status, headers=_plain_headers(response), content=body, request=request)
            what = "JSON that is not a JSON-RPC message"
        else:
            await response.aclose()
            what = f"content of type {kind}" if kind else "no content type"
        refused = ServerRefused(
            f"the MCP server answered this request with {what}, not an MCP answer (a proxy or login page in the way?)",
            status_code=status,
        )
        return self._answer(request, refused, answer)

    async def _still_dead(self) -> bool:
        if not self._dead:
            return False
        try:
            entry = await self._storage.aget(self._key)
        except UpstreamAuthError:
            return False
        return (None if entry is None else entry.version) == self._dead_version

    async def _fail(self, request: Any, error: UpstreamAuthError, answer: Callable[..., Any]) -> Any:
        # Only a grant that is dead (or tokens of someone else) waits for new tokens: asking again could not help
        # until they are stored. Anything else, a failed login or a configuration error included, is tried again
        # by the next request: the user may retry, the operator may fix the server or the provider.
        self._dead = isinstance(error, (ReauthenticationRequired, BindingMismatch)) and not isinstance(
            error, LoginFailed
        )
        if self._dead:
            try:
                entry = await self._storage.aget(self._key)
            except UpstreamAuthError:
                self._dead = False
            else:
                self._dead_version = None if entry is None else entry.version
        return self._answer(request, error, answer)

    def _answer(self, request: Any, error: UpstreamAuthError, answer: Callable[..., Any]) -> Any:
        self.failed = error
        headers = {"x-upstream-auth-error": type(error).__name__}
        is_request, request_id = _request_id(request)
        if is_request:
            headers["content-type"] = "application/json"
            status = 200 if self._sdk1 else _status(error)
            return answer(status, headers=headers, content=error_body(error, request_id), request=request)
        if self._sdk1 and request.method == "POST":
            logger.warning("an MCP notification was not sent: %s", type(error).__name__)
            return answer(202, headers=headers, request=request)
        return answer(_status(error), headers=headers, request=request)


class LegacyAsyncMCPAuthTransport(httpx.AsyncBaseTransport):
    """An ``httpx`` transport that sends as one session of ``manager``, for the MCP SDK 1.x.

    The twin of :class:`AsyncMCPAuthTransport` (httpx2, the SDK 2.x): refreshes and replays like
    :class:`UpstreamAuth`, and answers a request itself with our error instead of raising inside the SDK.
    """

    def __init__(
        self,
        manager: TokenManager,
        session_id: str,
        *,
        expect: Binding | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._driver = MCPAuthDriver(manager, session_id, expect, sdk1=True, transport_errors=(httpx.TransportError,))
        self._transport = httpx.AsyncHTTPTransport() if transport is None else transport

    @property
    def last_error(self) -> UpstreamAuthError | None:
        """The error of the last request, ``None`` once a request succeeded."""
        return self._driver.failed

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` with the session's token, or answer it with the auth's error."""
        response: httpx.Response = await self._driver.send(
            request, self._transport.handle_async_request, httpx.Response
        )
        return response

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self._transport.aclose()
