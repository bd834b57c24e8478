"""A real MCP server (the ``mcp`` package, streamable HTTP) protected by a :class:`LocalProvider`.

Imported only when asked for: the rest of ``httpx_upstream_auth.testing`` works without ``mcp``.
Works with the SDK 2.x (``MCPServer``) and 1.x (``FastMCP``).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

import anyio

from ._provider import LocalProvider
from ._server import ServerThread

__all__ = ["LocalMCPServer", "LocalTokenVerifier", "serve_mcp"]


class LocalTokenVerifier:
    """An MCP ``TokenVerifier`` that accepts exactly the live access tokens of a :class:`LocalProvider`.

    Counts what it saw: ``accepted`` and ``rejected`` tokens, and ``subjects`` (who called).
    """

    def __init__(self, provider: LocalProvider) -> None:
        self.provider = provider
        """The provider whose tokens are accepted."""
        self.accepted = 0
        """Requests let through."""
        self.rejected = 0
        """Requests refused with 401 (expired, revoked or unknown token)."""
        self.reject_all = False
        """Reject every token (see :attr:`LocalMCPServer.reject_tokens`)."""
        self._lock = threading.Lock()

    async def verify_token(self, token: str) -> Any:
        """The SDK's ``AccessToken`` for a live token, else ``None`` (the server answers 401)."""
        from mcp.server.auth.provider import AccessToken

        info = None if self.reject_all else self.provider.introspect(token)
        with self._lock:
            if info is None:
                self.rejected += 1
                return None
            self.accepted += 1
        return AccessToken(
            token=token,
            client_id=info["client_id"],
            scopes=(info["scope"] or "").split(),
            expires_at=int(info["exp"]),
            resource=info["resource"],
        )


class LocalMCPServer:
    """A running MCP server made by :func:`serve_mcp`: its endpoint, its verifier, what it served.

    ``requests`` counts HTTP requests by method; ``open_streams`` is how many GET (server-to-client
    SSE) streams are open right now, and ``streams_opened`` how many were ever opened. Stop it with
    :meth:`stop`, or use it as a context manager.
    """

    def __init__(self, thread: ServerThread, verifier: LocalTokenVerifier) -> None:
        self.thread = thread
        """The uvicorn server thread."""
        self.verifier = verifier
        """The token verifier, with its counts."""
        self.requests: Counter[str] = Counter()
        """HTTP requests served, by method."""
        self.open_streams = 0
        """GET streams open now."""
        self.streams_opened = 0
        """GET streams opened since the start."""
        self.sleeping = 0
        """``sleep`` tool calls running now."""
        self.max_sleeping = 0
        """The most ``sleep`` tool calls ever running at once (how parallel the client really was)."""
        self.require_scope: str | None = None
        """Set it (``"api admin"``) to answer 403 ``insufficient_scope`` naming it to POSTs whose token lacks
        one of these scopes, as the MCP spec asks a server to do (the SDK's server does not name the scope)."""
        self.forbidden = False
        """Set it to answer 403 (no challenge) to every POST, as a gateway in front of a server might."""
        self.forget_sessions = False
        """Set it to make the server forget every session (404 to requests carrying a session id)."""
        self.authorization_servers: list[str] | None = None
        """Set it to make the protected-resource metadata name these authorization servers instead (a
        server that moved, or a malicious one naming its own)."""
        self.answer_next_call: tuple[int, dict[str, str], bytes] | None = None
        """Set it to ``(status, headers, body)`` to answer the next ``tools/call`` POST with that instead of the
        server (an overloaded server, a proxy's error page, a redirect); it is cleared once used."""
        self._close_generation = 0
        self._lock = threading.Lock()

    def _sleep_started(self) -> None:
        with self._lock:
            self.sleeping += 1
            self.max_sleeping = max(self.max_sleeping, self.sleeping)

    def _sleep_ended(self) -> None:
        with self._lock:
            self.sleeping -= 1

    @property
    def url(self) -> str:
        """The MCP endpoint, ``http://127.0.0.1:<port>/mcp``."""
        return self.thread.url + "/mcp"

    def close_streams(self) -> None:
        """End every open GET stream, as a server restarting its front end would (the client reconnects)."""
        with self._lock:
            self._close_generation += 1

    def stop(self) -> None:
        """Stop serving."""
        self.thread.stop()

    def __enter__(self) -> LocalMCPServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def reject_tokens(self) -> bool:
        """Set it to make the verifier reject every token (401 to everything, even fresh tokens)."""
        return self.verifier.reject_all

    @reject_tokens.setter
    def reject_tokens(self, value: bool) -> None:
        self.verifier.reject_all = value

    def _lacks_scope(self, scope: Any) -> bool:
        token = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                token = value.decode("latin-1").partition(" ")[2]
        info = self.verifier.provider.introspect(token)
        if info is None:
            return False  # the SDK's server answers 401 itself
        granted = set((info["scope"] or "").split())
        return not set((self.require_scope or "").split()) <= granted

    async def _answer_if_canned(self, receive: Any, send: Any) -> Any:
        """Answer a ``tools/call`` POST with :attr:`answer_next_call` (``None``: answered); else the ``receive``
        that hands the request's body on to the server."""
        received: list[Any] = []
        body = b""
        while not received or received[-1].get("more_body"):
            received.append(await receive())
            body += received[-1].get("body", b"")
        with self._lock:
            canned = self.answer_next_call if b'"tools/call"' in body else None
            if canned is not None:
                self.answer_next_call = None
        if canned is None:
            return _replaying(received, receive)
        status, headers, content = canned
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": content})
        return None

    def _counting(self, app: Any) -> Any:
        async def counted(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            method = scope["method"]
            with self._lock:
                self.requests[method] += 1
            if self.authorization_servers is not None and scope["path"].startswith(
                "/.well-known/oauth-protected-resource"
            ):
                body = json.dumps({"resource": self.url, "authorization_servers": self.authorization_servers})
                headers = [(b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body.encode()})
                return
            if self.forget_sessions and any(name == b"mcp-session-id" for name, _ in scope["headers"]):
                headers = [(n, b"forgotten" if n == b"mcp-session-id" else v) for n, v in scope["headers"]]
                scope = {**scope, "headers": headers}
            if method == "POST" and self.answer_next_call is not None:
                receive = await self._answer_if_canned(receive, send)
                if receive is None:
                    return
            if method == "POST" and self.forbidden:
                await send({"type": "http.response.start", "status": 403, "headers": []})
                await send({"type": "http.response.body", "body": b"forbidden"})
                return
            if method == "POST" and self.require_scope is not None and self._lacks_scope(scope):
                challenge = (
                    f'Bearer error="insufficient_scope", scope="{self.require_scope}", '
                    f'resource_metadata="{self.thread.url}/.well-known/oauth-protected-resource/mcp"'
                )
                headers = [(b"www-authenticate", challenge.encode()), (b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": 403, "headers": headers})
                await send({"type": "http.response.body", "body": b'{"error": "insufficient_scope"}'})
                return
            if method != "GET":
                await app(scope, receive, send)
                return
            status: list[int] = []
            generation = self._close_generation
            ended = False
            send_lock = anyio.Lock()
            disconnected = anyio.Event()

            async def watch(message: Any) -> None:
                async with send_lock:
                    if ended:
                        return  # closed by close_streams(): the app's last words go nowhere
                    if message["type"] == "http.response.start":
                        status.append(message["status"])
                        if message["status"] == 200:
                            with self._lock:
                                self.open_streams += 1
                                self.streams_opened += 1
                    await send(message)

            async def listen() -> Any:
                # The client's messages, or a disconnect once close_streams() ended this stream.
                result: Any = {"type": "http.disconnect"}
                async with anyio.create_task_group() as group:

                    async def real() -> None:
                        nonlocal result
                        result = await receive()
                        group.cancel_scope.cancel()

                    async def closed() -> None:
                        await disconnected.wait()
                        group.cancel_scope.cancel()

                    group.start_soon(real)
                    group.start_soon(closed)
                return result

            async def closer() -> None:
                nonlocal ended
                while self._close_generation == generation:  # set from the test's thread: polled
                    await anyio.sleep(0.01)
                async with send_lock:
                    if status == [200] and not ended:
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    ended = True
                disconnected.set()

            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(closer)
                    await app(scope, listen, watch)
                    group.cancel_scope.cancel()
            finally:
                if status == [200]:
                    with self._lock:
                        self.open_streams -= 1

        return counted


def _replaying(received: list[Any], receive: Any) -> Any:
    """A ``receive`` that hands out the messages already read first."""

    async def replay() -> Any:
        return received.pop(0) if received else await receive()

    return replay


def serve_mcp(
    provider: LocalProvider,
    issuer_url: str,
    *,
    stateless: bool = False,
    json_response: bool = False,
    name: str = "local-mcp",
) -> LocalMCPServer:
    """Start a real MCP server on 127.0.0.1 whose tools need a live token of ``provider``.

    ``issuer_url`` is the provider's issuer (its URL plus its ``issuer_path``), advertised in the
    server's protected-resource metadata (at ``/.well-known/oauth-protected-resource/mcp``). Tools:
    ``echo(text)``, ``sleep(seconds)`` (answers after that many seconds), ``whoami()`` (the client id
    the token was issued to). Needs ``mcp`` (2.x: ``MCPServer``; 1.x: ``FastMCP``).
    """
    thread = ServerThread(_Unset(), lifespan="on")
    url = thread.bind()
    verifier = LocalTokenVerifier(provider)
    served = LocalMCPServer(thread, verifier)
    try:
        app = _build_app(url, issuer_url, served, stateless=stateless, json_response=json_response, name=name)
        thread.app = served._counting(app)
        thread.start()
    except BaseException:
        thread.stop()
        raise
    return served


class _Unset:
    """A placeholder app until the real one, which must know its own URL, is built."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
        # (serve_mcp assigns the real app before the thread starts serving); it says so if that ever changes.
        raise RuntimeError("serve_mcp assigns the app before starting")


def _build_app(
    url: str, issuer_url: str, served: LocalMCPServer, *, stateless: bool, json_response: bool, name: str
) -> Any:
    verifier = served.verifier
    from mcp.server.auth.settings import AuthSettings

    auth_fields: dict[str, Any] = {"issuer_url": issuer_url, "resource_server_url": url + "/mcp"}
    # SDKs before 1.30 (the [mcp] extra allows 1.24) lack the field; both SDKs the tests install have it.
    if "validate_token_resource" in AuthSettings.model_fields:  # pragma: no branch
        auth_fields["validate_token_resource"] = False  # the verifier decides; tokens carry no audience here
    auth = AuthSettings(**auth_fields)
    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:  # pragma: no cover - the SDK 1.x, which .ci/run's SDK-1 step serves through here
        from mcp.server.fastmcp import FastMCP  # type: ignore[attr-defined,unused-ignore]

        legacy = FastMCP(
            name, token_verifier=verifier, auth=auth, stateless_http=stateless, json_response=json_response
        )
        _add_tools(legacy, served)
        return legacy.streamable_http_app()
    modern = MCPServer(name, token_verifier=verifier, auth=auth)
    _add_tools(modern, served)
    return modern.streamable_http_app(stateless_http=stateless, json_response=json_response)


def _add_tools(server: Any, served: LocalMCPServer) -> None:
    from mcp.server.auth.middleware.auth_context import get_access_token

    async def echo(text: str) -> str:
        """Return ``text``."""
        return text

    async def sleep(seconds: float) -> str:
        """Wait ``seconds``, then answer."""
        served._sleep_started()
        try:
            await anyio.sleep(seconds)
        finally:
            served._sleep_ended()
        return "slept"

    async def whoami() -> str:
        """The client id the caller's token was issued to."""
        token = get_access_token()
        return "" if token is None else token.client_id

    for function in (echo, sleep, whoami):
        server.tool()(function)
