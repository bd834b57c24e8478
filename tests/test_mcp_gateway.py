"""The gateway example in docs/examples: sessions outlive many access tokens, 401 to re-authenticate, 503 when
the token store is down."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

pytest.importorskip("starlette", reason="starlette is not installed")

from httpx_upstream_auth import (
    EntryKey,
    OAuth2Refresher,
    SQLiteStorage,
    StorageError,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth.testing import LocalProvider, ServerThread

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "gateway.py"


def load_gateway() -> ModuleType:
    """The example module, imported from its file."""
    spec = importlib.util.spec_from_file_location("gateway_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gateway = load_gateway()


class SwitchableStorage(SQLiteStorage):
    """A SQLite storage that can be switched off, as a store that went away."""

    down = False

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        if self.down:
            raise StorageError("the token store is down")
        return super().get(key)

    async def aget(self, key: EntryKey) -> UpstreamTokens | None:
        if self.down:
            raise StorageError("the token store is down")
        return await super().aget(key)


@pytest.fixture
def provider() -> LocalProvider:
    """The upstream: 1-second access tokens, rotation."""
    return LocalProvider(access_ttl=1.0)


@pytest.fixture
def upstream(provider: LocalProvider) -> Iterator[ServerThread]:
    """The upstream on 127.0.0.1."""
    with ServerThread(provider) as running:
        yield running


@pytest.fixture
def storage(tmp_path: Path) -> SwitchableStorage:
    """The gateway's token store: a SQLite file."""
    return SwitchableStorage(tmp_path / "gateway.db")


@pytest.fixture
def manager(upstream: ServerThread, storage: SwitchableStorage) -> TokenManager:
    """The gateway's manager (the app closes it at shutdown)."""
    refresher = OAuth2Refresher(upstream.url + "/token", "test-client", "test-secret")
    return TokenManager(refresher=refresher, provider_id="local", storage=storage)


@pytest.fixture
def served(manager: TokenManager, upstream: ServerThread) -> Iterator[ServerThread]:
    """The gateway, with its lifespan (it opens its pooled client there)."""
    with ServerThread(gateway.create_app(manager, upstream.url), lifespan="on") as running:
        yield running


def test_sessions_outlive_many_access_tokens(
    provider: LocalProvider, manager: TokenManager, served: ServerThread
) -> None:
    """Two browser sessions call through the gateway across six refreshes of 1-second tokens: every call 200,
    each refresh due (none in the first half of a token's life), no expired token sent, none reused."""
    for session in ("s-1", "s-2"):
        manager.store(session, provider.login(sub=session))
    statuses: list[int] = []
    deadline = time.monotonic() + 60  # a bound against hangs, not a timing check
    browsers = {s: httpx.Client(base_url=served.url, cookies={gateway.SESSION_COOKIE: s}) for s in ("s-1", "s-2")}
    with browsers["s-1"], browsers["s-2"]:
        while provider.stats["refresh_ok"] < 6:
            assert time.monotonic() < deadline, provider.stats
            for session, browser in browsers.items():
                response = browser.get("/upstream/api/me")
                statuses.append(response.status_code)
                assert response.json()["sub"] == session
            time.sleep(0.05)
    stats = provider.stats
    assert set(statuses) == {200}
    assert stats["refresh_reuse"] == 0 and stats["invalid_grant"] == 0
    assert stats["refresh_early"] == 0  # each refresh due: none in the first half of a token's life


def test_reauthentication_required_is_a_bearer_401(
    provider: LocalProvider, manager: TokenManager, served: ServerThread
) -> None:
    """A dead grant (or no session) answers 401 with the challenge that tells the client to log in again."""
    tokens = manager.store("s-1", provider.login())
    provider.revoke_grant(provider.grant_of(tokens.access_token))
    with httpx.Client(base_url=served.url) as client:
        dead = client.get("/upstream/api/me", headers={"x-gateway-session": "s-1"})
        anonymous = client.get("/upstream/api/me")
    for response in (dead, anonymous):
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == (
            'Bearer error="invalid_token", '
            'error_description="upstream token is no longer valid; re-authentication required"'
        )


def test_the_gateway_session_never_reaches_the_upstream(provider: LocalProvider, manager: TokenManager) -> None:
    """The gateway's own session id is a credential for the gateway (who presents it is proxied as that user):
    sent as X-Gateway-Session or as the cookie, the upstream receives the user's bearer token and never it."""
    seen: list[dict[str, str]] = []

    async def upstream_api(scope: Any, receive: Any, send: Any) -> None:
        """Records the headers it receives; answers 200."""
        if scope["type"] != "http":
            return
        seen.append({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    manager.store("gateway-session-42", provider.login())
    with (
        ServerThread(upstream_api) as api,
        ServerThread(gateway.create_app(manager, api.url), lifespan="on") as served,
        httpx.Client(base_url=served.url) as client,
        httpx.Client(base_url=served.url, cookies={gateway.SESSION_COOKIE: "gateway-session-42"}) as browser,
    ):
        by_header = client.get("/upstream/me", headers={"x-gateway-session": "gateway-session-42"})
        by_cookie = browser.get("/upstream/me")
    assert (by_header.status_code, by_cookie.status_code) == (200, 200) and len(seen) == 2
    for headers in seen:
        assert headers["authorization"].startswith("Bearer ")
        assert "gateway-session-42" not in repr(headers)


def test_store_down_is_503(
    provider: LocalProvider, storage: SwitchableStorage, manager: TokenManager, served: ServerThread, tmp_path: Path
) -> None:
    """When the token store fails, the gateway answers 503 (retry later), not 401: nobody must log in again."""
    other = TokenManager(
        refresher=OAuth2Refresher("http://127.0.0.1:9/token", "test-client", "test-secret"),
        provider_id="local",
        storage=SQLiteStorage(tmp_path / "gateway.db"),
    )
    other.store("s-9", provider.login())  # written by another worker: not in this gateway's cache
    other.close()
    storage.down = True
    with httpx.Client(base_url=served.url) as client:
        response = client.get("/upstream/api/me", headers={"x-gateway-session": "s-9"})
    assert response.status_code == 503
    storage.down = False


def test_the_example_runs() -> None:
    """``python docs/examples/gateway.py`` runs its demo clean: no failed request, no reuse, a 401 at the end."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--seconds", "2"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout and "reused refresh tokens: 0" in result.stdout


def test_with_redis_sessions_outlive_tokens_and_a_stopped_store_is_503(
    provider: LocalProvider, upstream: ServerThread
) -> None:
    """The same gateway on Redis: a session lives through 1-second tokens; with Redis stopped, a session not
    cached in this worker gets 503."""
    from redis_servers import RedisServer

    from httpx_upstream_auth import RedisStorage

    server = RedisServer().start()
    try:
        refresher = OAuth2Refresher(upstream.url + "/token", "test-client", "test-secret")
        manager = TokenManager(refresher=refresher, provider_id="local", storage=RedisStorage.from_url(server.url))
        writer = TokenManager(refresher=refresher, provider_id="local", storage=RedisStorage.from_url(server.url))
        manager.store("r-1", provider.login())
        writer.store("r-2", provider.login())  # another worker's session: not in this gateway's cache
        writer.close()
        with (
            ServerThread(gateway.create_app(manager, upstream.url), lifespan="on") as served,
            httpx.Client(base_url=served.url, headers={"x-gateway-session": "r-1"}, timeout=30) as client,
        ):
            started = time.monotonic()
            statuses = []
            while time.monotonic() - started < 2.5:
                statuses.append(client.get("/upstream/api/me").status_code)
                time.sleep(0.05)
            server.stop()
            down = client.get("/upstream/api/me", headers={"x-gateway-session": "r-2"})
        assert set(statuses) == {200} and provider.stats["refresh_ok"] >= 1
        assert provider.stats["refresh_reuse"] == 0
        assert down.status_code == 503
    finally:
        server.stop()


def test_an_mcp_client_works_through_the_gateway(
    provider: LocalProvider, upstream: ServerThread, manager: TokenManager
) -> None:
    """The gateway is a streaming MCP proxy: an MCP SDK client (legacy mode: a session id and a server-sent event
    stream) calls tools through it across token expiries; Mcp-Session-Id and the GET stream pass through."""
    pytest.importorskip("mcp", reason="the MCP SDK is not installed")
    import anyio

    from httpx_upstream_auth.testing import serve_mcp

    manager.store("s-1", provider.login())
    with (
        serve_mcp(provider, upstream.url) as mcp_server,
        ServerThread(gateway.create_app(manager, mcp_server.thread.url), lifespan="on") as served,
    ):
        texts = anyio.run(call_through_gateway, served.url + "/upstream/mcp", mcp_server)
    assert texts == [str(i) for i in range(12)]
    assert mcp_server.streams_opened >= 1 and mcp_server.requests["DELETE"] == 1
    assert provider.stats["refresh_ok"] >= 1 and provider.stats["refresh_reuse"] == 0


async def call_through_gateway(url: str, mcp_server: object) -> list[str]:
    """Open an MCP session through the gateway (SDK 2.x or 1.x), wait for its GET stream, call echo over 1.2 s."""
    import anyio

    headers = {"x-gateway-session": "s-1"}
    texts: list[str] = []
    try:
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client
    except ImportError:  # the SDK 1.x
        import mcp.client.streamable_http as sdk1_http
        from mcp import ClientSession

        # The type checkers see the SDK 2.x, whose opener takes an httpx2 client; this one takes httpx's.
        opener: Any = sdk1_http.streamable_http_client
        async with (
            httpx.AsyncClient(headers=headers, timeout=30) as http,
            opener(url, http_client=http) as streams,
            ClientSession(streams[0], streams[1]) as session,
        ):
            await session.initialize()
            await wait_for_stream(mcp_server)
            for i in range(12):
                result = await session.call_tool("echo", {"text": str(i)})
                texts.append(result.content[0].text)  # type: ignore[union-attr]
                await anyio.sleep(0.1)
        return texts
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as http2,
        Client(streamable_http_client(url, http_client=http2), mode="legacy") as client,
    ):
        await wait_for_stream(mcp_server)
        for i in range(12):
            result = await client.call_tool("echo", {"text": str(i)})
            texts.append(result.content[0].text)  # type: ignore[union-attr]
            await anyio.sleep(0.1)
    return texts


async def wait_for_stream(mcp_server: object) -> None:
    """Until the server-to-client GET stream, opened through the gateway, is open at the MCP server."""
    import anyio

    with anyio.fail_after(10):
        while getattr(mcp_server, "open_streams", 0) == 0:
            await anyio.sleep(0.01)
