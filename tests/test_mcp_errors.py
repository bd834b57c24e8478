"""The error table of docs/mcp.md ("Errors"), one test per row, on whichever MCP SDK is installed (2.x through
``connect``, 1.x through ``connect_session``): each failure kind reaches the caller of ``call_tool`` (and of the
connect) as one typed exception, never an ExceptionGroup, a CancelledError or a bare MCPError."""

from __future__ import annotations

import copy
import importlib.util
import json
import pickle
import sys
import time
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import pytest

pytest.importorskip("mcp", reason="the MCP SDK is not installed")

import mcp_fixtures
from support import fail_refresh

from httpx_upstream_auth import (
    MemoryStorage,
    ReauthenticationRequired,
    RefreshFailed,
    TokenManager,
    UpstreamAuthError,
    UpstreamTokens,
)
from httpx_upstream_auth.mcp import (
    DiscoveringRefresher,
    DiscoveryFailed,
    InsufficientScope,
    IssuerMismatch,
    ServerRefused,
    ServerUnreachable,
    SessionExpired,
    TokenRejected,
    upstream_error,
)
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider, ServerThread

manager = mcp_fixtures.manager
forgetful_manager = mcp_fixtures.forgetful_manager
mcp_server = mcp_fixtures.mcp_server
provider_server = mcp_fixtures.provider_server

pytestmark = pytest.mark.anyio

SDK2 = importlib.util.find_spec("mcp.server.mcpserver") is not None
ISSUER_PATH = "/tenants/acme"
SESSION = "table-session"


@pytest.fixture
def provider() -> LocalProvider:
    """A provider under a path, 60-second tokens."""
    return LocalProvider(access_ttl=60, issuer_path=ISSUER_PATH)


@asynccontextmanager
async def session(url: str, manager: TokenManager, session_id: str = SESSION) -> AsyncIterator[Any]:
    """A connected session of the installed SDK: ``connect`` (2.x, legacy mode) or ``connect_session`` (1.x)."""
    if SDK2:
        from httpx_upstream_auth.mcp import connect

        async with connect(url, manager, session_id, mode="legacy") as client:
            yield client
    else:
        from httpx_upstream_auth.mcp import connect_session

        async with connect_session(url, manager, session_id) as opened:
            yield opened


async def echo(client: Any, text: str) -> str:
    """Call the echo tool; its text."""
    result = await client.call_tool("echo", {"text": text})
    return str(result.content[0].text)


async def settled(server: LocalMCPServer) -> None:
    """Wait until the session's GET stream is open, so it cannot race the test for a fault."""
    with anyio.fail_after(10):
        while server.open_streams == 0:
            await anyio.sleep(0.01)


def expired(tokens: UpstreamTokens) -> UpstreamTokens:
    """The same grant, as if its access token had expired."""
    return attrs.evolve(tokens, expires_at=time.time() - 1, issued_at=time.time() - 61)


async def test_row_dead_grant(provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer) -> None:
    """Dead grant: ReauthenticationRequired at the call; the session survives a new login."""
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        provider.revoke_grant(provider.grant_of((await manager.aget_token(SESSION)).access_token))
        with pytest.raises(ReauthenticationRequired):
            await echo(client, "x")
        await manager.astore(SESSION, provider.login())
        assert await echo(client, "y") == "y"


async def test_row_transient_refresh_failure(
    provider: LocalProvider, forgetful_manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """Token endpoint 503: a retryable RefreshFailed; the next call works (for a manager that does not remember
    the failure); the closing DELETE is still sent."""
    manager = forgetful_manager
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        provider.revoke_access((await manager.aget_token(SESSION)).access_token)
        fail_refresh(provider, "503")  # on every attempt of the job
        with pytest.raises(RefreshFailed) as caught:
            await echo(client, "x")
        assert caught.value.retryable
        assert await echo(client, "y") == "y"
        provider.revoke_access((await manager.aget_token(SESSION)).access_token)
        fail_refresh(provider, "503")  # on every attempt of the job
        with pytest.raises(RefreshFailed):
            await echo(client, "z")
    # Issue 13 item 9: the closing DELETE is sent after a transient failure (it was skipped after any failure).
    assert mcp_server.requests["DELETE"] >= 1


async def test_row_401_after_refresh(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """The server rejects even a fresh token: TokenRejected (a ReauthenticationRequired) after one refresh and
    replay; the session survives once the server accepts tokens again."""
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        mcp_server.reject_tokens = True
        with pytest.raises(TokenRejected) as caught:
            await echo(client, "x")
        assert isinstance(caught.value, ReauthenticationRequired) and caught.value.status_code == 401
        assert caught.value.error == "invalid_token"
        mcp_server.reject_tokens = False
        assert await echo(client, "y") == "y"
    assert provider.stats["refresh_ok"] == 1  # one refresh, not a loop


async def test_row_403_insufficient_scope(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """403 insufficient_scope: InsufficientScope carrying the scope the server asked for; the session survives."""
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        mcp_server.require_scope = "api admin"
        with pytest.raises(InsufficientScope) as caught:
            await echo(client, "x")
        assert caught.value.scope == "api admin" and caught.value.status_code == 403
        mcp_server.require_scope = None
        assert await echo(client, "y") == "y"
    assert provider.stats["token_calls"] == 0  # a 403 is not cured by a refresh


async def test_row_403_other(provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer) -> None:
    """Another 403 (no insufficient_scope): ServerRefused with the status; the session survives."""
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        mcp_server.forbidden = True
        with pytest.raises(ServerRefused) as caught:
            await echo(client, "x")
        assert type(caught.value) is ServerRefused and caught.value.status_code == 403
        mcp_server.forbidden = False
        assert await echo(client, "y") == "y"


async def test_row_404_session_expired(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """404 for the session: SessionExpired; that session is over, a new connect works."""
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        mcp_server.forget_sessions = True
        with pytest.raises(SessionExpired):
            await echo(client, "x")
        mcp_server.forget_sessions = False
    async with session(mcp_server.url, manager) as client:
        assert await echo(client, "y") == "y"


async def test_row_discovery_failure(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """Discovery failure (the server's metadata names no authorization server): DiscoveryFailed, not retryable."""
    refresher = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret")
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    try:
        await manager.astore(SESSION, provider.login())
        async with session(mcp_server.url, manager) as client:
            await settled(mcp_server)
            mcp_server.authorization_servers = []
            await manager.astore(SESSION, expired(await manager.aget_token(SESSION)))
            with pytest.raises(DiscoveryFailed) as caught:
                await echo(client, "x")
            assert not caught.value.retryable
            await manager.astore(SESSION, provider.login())  # fixed (here: fresh tokens, no refresh needed)
            assert await echo(client, "y") == "y"
    finally:
        await manager.aclose()


async def test_row_issuer_mismatch(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """The server now names another authorization server: IssuerMismatch; nothing is sent there."""
    attacker = LocalProvider(issuer_path="/evil")
    async with ServerThread(attacker) as evil:
        refresher = DiscoveringRefresher(
            mcp_server.url, "test-client", "test-secret", issuer=provider_server.url + ISSUER_PATH
        )
        manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
        try:
            await manager.astore(SESSION, provider.login())
            async with session(mcp_server.url, manager) as client:
                await settled(mcp_server)
                mcp_server.authorization_servers = [evil.url + "/evil"]
                await manager.astore(SESSION, expired(await manager.aget_token(SESSION)))
                with pytest.raises(IssuerMismatch):
                    await echo(client, "x")
        finally:
            await manager.aclose()
    assert attacker.stats["token_calls"] == 0 and attacker.flow_stats["metadata_requests"] == 0


async def test_row_transport_error(provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer) -> None:
    """The server went away mid-session: ServerUnreachable at the call (the tokens are untouched)."""
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        mcp_server.stop()
        with pytest.raises(ServerUnreachable):
            await echo(client, "x")
    assert provider.stats["token_calls"] == 0


# What a server (or a proxy in front of it) may answer a tool call instead of an MCP answer, and the error it means.
HTTP_ERRORS: dict[str, tuple[tuple[int, dict[str, str], bytes], type[Exception]]] = {
    "503": ((503, {"content-type": "text/plain"}, b"overloaded"), ServerUnreachable),
    "500": ((500, {"content-type": "text/plain"}, b"oops"), ServerRefused),
    "400": ((400, {"content-type": "text/plain"}, b"bad request"), ServerRefused),
    "307": ((307, {"location": "http://127.0.0.1:9/mcp"}, b""), ServerRefused),
    "html": ((200, {"content-type": "text/html"}, b"<html>please log in</html>"), ServerRefused),
    "garbage-json": ((200, {"content-type": "application/json"}, b"nope"), ServerRefused),
    "json-not-jsonrpc": ((200, {"content-type": "application/json"}, b'{"result": "ok"}'), ServerRefused),
    # A JSON error body past the 64-KiB cap is not read to its end for a JSON-RPC error: a refusal by its status.
    "huge-json-error": (
        (500, {"content-type": "application/json"}, b'{"error": "%s"}' % (b"x" * 70_000)),
        ServerRefused,
    ),
}


@pytest.mark.parametrize("kind", sorted(HTTP_ERRORS))
async def test_row_http_error(
    kind: str, provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """Another HTTP error, a redirect (not followed), or an answer that is no MCP answer: ServerRefused with the
    status (502/503/504: ServerUnreachable); the session survives, on 1.x too (whose SDK would end it)."""
    canned, expected = HTTP_ERRORS[kind]
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        mcp_server.answer_next_call = canned
        with pytest.raises(expected) as caught:
            await echo(client, "x")
        assert type(caught.value) is expected and getattr(caught.value, "status_code", None) == canned[0]
        assert await echo(client, "y") == "y"
    assert provider.stats["token_calls"] == 0  # none of these is about the token


async def test_row_jsonrpc_error_from_the_server(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """A JSON-RPC error the server sends at an HTTP error status is the server's answer: the SDK's MCPError with its
    code (not ours), and the session survives, on 1.x too (whose SDK would end it on the 4xx)."""
    error = {"code": -32602, "message": "bad arguments"}
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "error": error}).encode()
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        mcp_server.answer_next_call = (400, {"content-type": "application/json"}, body)
        with pytest.raises(Exception) as caught:
            await echo(client, "x")
        assert not isinstance(caught.value, UpstreamAuthError)
        assert (caught.value.error.code, caught.value.error.message) == (-32602, "bad arguments")  # type: ignore[attr-defined]
        assert await echo(client, "y") == "y"


async def test_a_configuration_error_does_not_park_the_session(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """A non-retryable failure that is not a dead grant (the server's metadata names an authorization server that
    publishes none, until its operator fixes it): the next call asks again and works, no new tokens needed."""
    refresher = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret")
    # failure_window=0: the manager's own (bounded) memory of failures is not what this is about.
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage(), failure_window=0)
    try:
        await manager.astore(SESSION, provider.login())
        async with session(mcp_server.url, manager) as client:
            await settled(mcp_server)
            await manager.astore(SESSION, expired(await manager.aget_token(SESSION)))
            mcp_server.authorization_servers = [provider_server.url + "/nowhere"]
            with pytest.raises(DiscoveryFailed) as caught:
                await echo(client, "x")
            assert not caught.value.retryable
            mcp_server.authorization_servers = None  # fixed
            assert await echo(client, "y") == "y"
    finally:
        await manager.aclose()
    assert provider.stats["refresh_ok"] == 1


@pytest.mark.parametrize("kind", ["401", "403", "unreachable"])
async def test_rows_at_connect(
    kind: str, provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """The same failures at connect time raise the same typed exceptions from the ``async with``."""
    await manager.astore(SESSION, provider.login())
    url = mcp_server.url
    expected: type[Exception]
    if kind == "401":
        mcp_server.reject_tokens, expected = True, TokenRejected
    elif kind == "403":
        mcp_server.require_scope, expected = "api admin", InsufficientScope
    else:
        mcp_server.stop()
        expected = ServerUnreachable
    with pytest.raises(expected):
        async with session(url, manager):
            pass  # pragma: no cover


async def test_a_url_without_an_mcp_endpoint_is_a_refusal_at_connect(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """A URL where no MCP endpoint answers (404 to the initialize, no session yet): ServerRefused with the status,
    saying so, at the connect; no token request (nothing is wrong with the tokens)."""
    await manager.astore(SESSION, provider.login())
    with pytest.raises(ServerRefused) as caught:
        async with session(mcp_server.thread.url + "/not-mcp", manager):
            pass  # pragma: no cover
    assert type(caught.value) is ServerRefused and caught.value.status_code == 404
    assert "no MCP endpoint at this URL" in str(caught.value) and provider.stats["token_calls"] == 0


def leaves(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions inside it, through exception groups."""
    found = [error]
    for inner in getattr(error, "exceptions", ()):
        found += leaves(inner)
    return found


async def test_errors_raised_in_the_block_leave_it_as_they_are(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """An error of the caller's own raised inside the ``async with`` leaves it as the SDK raises it (in its task
    group's ExceptionGroup), nothing of ours put in its place; our error from a call the block does not catch
    leaves it as the typed exception itself, never in a group."""
    await manager.astore(SESSION, provider.login())
    raised = KeyError("the caller's own")
    with pytest.raises(Exception) as own:
        async with session(mcp_server.url, manager):
            raise raised
    assert raised in leaves(own.value) and not isinstance(own.value, UpstreamAuthError)
    with pytest.raises(ReauthenticationRequired) as ours:
        async with session(mcp_server.url, manager) as client:
            await settled(mcp_server)
            provider.revoke_grant(provider.grant_of((await manager.aget_token(SESSION)).access_token))
            await echo(client, "x")
    assert type(ours.value) is ReauthenticationRequired


class ClosingBrowser(mcp_fixtures.HeadlessBrowser):
    """A browser the user closes (the redirect handler fails) while ``closed`` is set."""

    closed = True

    async def redirect(self, url: str) -> None:
        """Fail like a user who closed the window, or log in."""
        if self.closed:
            self.visits += 1
            raise TimeoutError("the user closed the browser")
        await super().redirect(url)


def sdk_login(server: LocalMCPServer, browser: mcp_fixtures.HeadlessBrowser) -> Any:
    """SDK-login mode with this browser."""
    from mcp.shared.auth import OAuthClientMetadata

    from httpx_upstream_auth.mcp import SDKLogin

    metadata = OAuthClientMetadata(
        redirect_uris=["http://127.0.0.1:9/callback"],  # type: ignore[list-item]
        token_endpoint_auth_method="client_secret_post",
        scope="api",
    )
    return SDKLogin(
        server.url,
        client_metadata=metadata,
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
        storage=MemoryStorage(),
    )


async def test_row_login_abandoned(provider: LocalProvider, mcp_server: LocalMCPServer) -> None:
    """SDK-login mode, the user closes the browser: LoginFailed (a ReauthenticationRequired) at the connect and at
    a call after a dead grant; the session survives and the next login works (SDK 2.x only)."""
    if not SDK2:
        pytest.skip("SDK-login mode needs the MCP SDK 2.x")
    from httpx_upstream_auth.mcp import LoginFailed, connect

    browser = ClosingBrowser()
    login = sdk_login(mcp_server, browser)
    try:
        with pytest.raises(LoginFailed) as caught:
            async with connect(mcp_server.url, login, SESSION, mode="legacy"):
                pass  # pragma: no cover
        assert isinstance(caught.value, ReauthenticationRequired)
        assert "the user closed the browser" not in str(caught.value)  # the SDK's text is not repeated
        browser.closed = False
        async with connect(mcp_server.url, login, SESSION, mode="legacy") as client:
            assert await echo(client, "1") == "1"
            await settled(mcp_server)
            provider.revoke_grant(provider.grant_of((await login.manager.aget_token(SESSION)).access_token))
            browser.closed = True
            with pytest.raises(LoginFailed):
                await echo(client, "2")
            browser.closed = False
            assert await echo(client, "3") == "3"
    finally:
        await login.aclose()
    assert browser.visits == 4 and provider.flow_stats["code_exchanges"] == 2


def test_the_docs_table_names_a_test_per_row() -> None:
    """docs/mcp.md's error table: every row names a test that exists, and every row test here is in the table."""
    import re
    import sys
    from pathlib import Path

    import test_mcp_hardening

    # Tests of SDK-login mode (2.x only) live in test_mcp_sdk_login, which does not import under 1.x.
    sdk_login_source = (Path(__file__).parent / "test_mcp_sdk_login.py").read_text()

    text = (Path(__file__).resolve().parent.parent / "docs" / "mcp.md").read_text()
    table = text.split("## Errors", 1)[1].split("\n## ", 1)[0]
    lines = table.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| failure", "| ---"))]
    named = {name for row in rows for name in re.findall(r"`(test_\w+)`", row)}
    here = sys.modules[__name__]
    assert len(rows) >= 11 and all(re.search(r"`(test_\w+)`", row) for row in rows)
    for name in named:
        assert hasattr(here, name) or hasattr(test_mcp_hardening, name) or f"def {name}(" in sdk_login_source, name
    assert {name for name in dir(here) if name.startswith("test_row_")} <= named


async def test_the_server_stream_comes_back_after_a_dead_grant_and_a_new_login(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """Issue 13 item 8: the GET stream, ended while the grant is dead, reconnects once new tokens are stored
    (its reconnects wait for them instead of being refused until the SDK gives up)."""
    await manager.astore(SESSION, provider.login())
    async with session(mcp_server.url, manager) as client:
        await settled(mcp_server)
        provider.revoke_grant(provider.grant_of((await manager.aget_token(SESSION)).access_token))
        with pytest.raises(ReauthenticationRequired):
            await echo(client, "x")
        mcp_server.close_streams()
        with anyio.fail_after(10):
            while mcp_server.open_streams:
                await anyio.sleep(0.01)
        await anyio.sleep(3.5)  # longer than the SDK's two reconnect attempts, one second apart
        await manager.astore(SESSION, provider.login())
        await settled(mcp_server)  # the stream is back
        assert await echo(client, "y") == "y"
    assert mcp_server.streams_opened == 2


def test_a_server_refusal_survives_copy_and_pickle() -> None:
    """ServerRefused copies (each waiter gets its own) and pickles (across processes) with every field, though
    its fields are keyword-only."""
    error = ServerRefused(
        "the MCP server refused the token: insufficient_scope",
        status_code=403,
        error="insufficient_scope",
        scope="tools:write",
        description="needs tools:write",
    )
    for again in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(again) is ServerRefused and again is not error
        fields = (str(again), again.status_code, again.error, again.scope, again.description)
        assert fields == (str(error), 403, "insufficient_scope", "tools:write", "needs tools:write")


def _sdk_error(body: bytes) -> Any:
    """What the SDK raises for a JSON-RPC error answer: an exception whose ``error`` has code and data."""
    error = json.loads(body)["error"]

    class SDKError(Exception):
        pass

    raised = SDKError(error["message"])
    raised.error = types.SimpleNamespace(code=error["code"], data=error.get("data"))  # type: ignore[attr-defined]
    return raised


def test_our_errors_come_back_from_the_sdk_once_and_only_ours() -> None:
    """An error the transport answered comes back from the SDK's exception, once; a server's error that borrows
    our code without our ticket is not taken for ours; tickets nobody redeemed are kept 1,024 at most; and our
    error is found inside exception groups (the SDK's task groups), or not at all."""
    from httpx_upstream_auth.mcp._errors import error_body, find_upstream_error

    if sys.version_info >= (3, 11):
        group_type: Any = BaseExceptionGroup  # noqa: F821 (a builtin from 3.11)
    else:
        from exceptiongroup import BaseExceptionGroup as group_type  # anyio's dependency before 3.11
    ours = ReauthenticationRequired("log in again")
    answered = _sdk_error(error_body(ours, 1))
    assert upstream_error(answered) is ours and upstream_error(answered) is None
    borrowed = _sdk_error(error_body(ours, 2))
    borrowed.error.data["httpx_upstream_auth"]["ticket"] = 7
    assert upstream_error(borrowed) is None
    oldest = _sdk_error(error_body(RefreshFailed("first", retryable=True), 3))
    for n in range(1024):
        error_body(RefreshFailed(f"unread {n}", retryable=True), None)  # notifications: nobody reads them
    assert upstream_error(oldest) is None
    latest = _sdk_error(error_body(ours, 4))
    group = group_type("tasks", [ValueError("other"), group_type("inner", [latest])])
    assert find_upstream_error(group) is ours
    assert find_upstream_error(group_type("tasks", [ValueError("other")])) is None


async def test_a_session_made_to_raise_our_errors_twice_translates_once() -> None:
    """raise_upstream_errors wraps each request method of a session once (a second call changes nothing, so an
    error is not looked up twice), and leaves out a method the session does not have (the SDK 1.x has no
    send_discover)."""
    from httpx_upstream_auth.mcp import raise_upstream_errors
    from httpx_upstream_auth.mcp._errors import error_body

    ours = ReauthenticationRequired("log in again")

    class Session:
        async def send_request(self, *args: Any) -> Any:
            raise _sdk_error(error_body(ours, 1))

    session = raise_upstream_errors(Session())
    wrapped = session.send_request
    assert raise_upstream_errors(session) is session and session.send_request is wrapped
    assert not hasattr(session, "send_discover")
    with pytest.raises(ReauthenticationRequired) as caught:
        await session.send_request()
    assert caught.value is ours and type(caught.value.__cause__).__name__ == "SDKError"
