"""Hardening: bounded metadata reads, no bearer token over plain http to a remote host, no fetching of URLs a
server's 401 names on another origin, and protected-resource metadata without ``resource`` refused."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("mcp", reason="the MCP SDK is not installed")

import mcp_fixtures

from httpx_upstream_auth import TokenManager
from httpx_upstream_auth.mcp import DiscoveryFailed, InsecureTransport, adiscover
from httpx_upstream_auth.mcp._discovery import MAX_METADATA_BYTES
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider, ServerThread

mcp_server = mcp_fixtures.mcp_server
provider_server = mcp_fixtures.provider_server
manager = mcp_fixtures.manager

pytestmark = pytest.mark.anyio

CHUNK = 64 * 1024
HUGE = 48 * 1024 * 1024


@pytest.fixture
def provider() -> LocalProvider:
    """A provider at the root."""
    return LocalProvider(access_ttl=60)


class MetadataServer:
    """An ASGI app answering every GET with a JSON document (or a 48 MiB stream); counts requests by path."""

    def __init__(self, document: dict[str, Any] | None = None, *, declare_length: bool = False) -> None:
        self.document = document
        self.declare_length = declare_length
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one request."""
        assert scope["type"] == "http"
        self.paths.append(scope["path"])
        if self.document is not None:
            body = json.dumps(self.document).encode()
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        headers = [(b"content-type", b"application/json")]
        if self.declare_length:
            headers.append((b"content-length", str(HUGE).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"resource": "', "more_body": True})
        for _ in range(HUGE // CHUNK):
            await send({"type": "http.response.body", "body": b"x" * CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b'"}'})


@pytest.fixture
def metadata_app() -> MetadataServer:
    """A huge, endless-looking protected-resource metadata document."""
    return MetadataServer()


@pytest.fixture
def metadata_server(metadata_app: MetadataServer) -> Iterator[ServerThread]:
    """``metadata_app`` on 127.0.0.1."""
    with ServerThread(metadata_app) as running:
        yield running


class CountingStream(httpx.AsyncByteStream):
    """A response body that counts the bytes the client read from the network."""

    def __init__(self, inner: Any, counter: list[int]) -> None:
        self.inner = inner
        self.counter = counter
        self._chunks: AsyncIterator[bytes] | None = None

    # An iterator object, not an async generator: a reader that stops early leaves nothing for trio to
    # finalize after the test's event loop has ended.
    def __aiter__(self) -> AsyncIterator[bytes]:
        self._chunks = self.inner.__aiter__()
        return self

    async def __anext__(self) -> bytes:
        assert self._chunks is not None
        chunk = await self._chunks.__anext__()
        self.counter[0] += len(chunk)
        return chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountingTransport(httpx.AsyncBaseTransport):
    """A real HTTP transport whose response bodies are counted as they are read."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.read = [0]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        return httpx.Response(
            response.status_code, headers=response.headers, stream=CountingStream(response.stream, self.read)
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_the_metadata_size_cap_stops_the_read(metadata_server: ServerThread) -> None:
    """A 48 MiB protected-resource metadata answer is refused after reading about the cap, not all of it."""
    counting = CountingTransport()
    async with httpx.AsyncClient(transport=counting) as client:
        with pytest.raises(DiscoveryFailed, match="larger than"):
            await adiscover(metadata_server.url + "/mcp", client=client)
    assert MAX_METADATA_BYTES < counting.read[0] <= MAX_METADATA_BYTES + 2 * CHUNK


async def test_a_declared_oversized_metadata_answer_is_not_read(
    metadata_app: MetadataServer, metadata_server: ServerThread
) -> None:
    """With a Content-Length beyond the cap, not one byte of the body is read."""
    metadata_app.declare_length = True
    counting = CountingTransport()
    async with httpx.AsyncClient(transport=counting) as client:
        with pytest.raises(DiscoveryFailed, match="larger than"):
            await adiscover(metadata_server.url + "/mcp", client=client)
    assert counting.read[0] == 0


class NeverSend:
    """An httpx2 transport that fails the test if anything is sent through it."""

    sent = 0

    async def handle_async_request(self, request: Any) -> Any:
        self.sent += 1
        raise AssertionError("a request was sent")

    async def aclose(self) -> None:
        pass


async def test_connect_refuses_plain_http_to_a_remote_host(manager: TokenManager) -> None:
    """connect() to http://<not loopback> raises InsecureTransport before sending anything (the token included)."""
    pytest.importorskip("mcp.server.mcpserver", reason="connect() needs the MCP SDK 2.x")
    import httpx2

    from httpx_upstream_auth.mcp import connect, http_client

    never = NeverSend()
    with pytest.raises(InsecureTransport, match="https://"):
        async with connect("http://mcp.example.com/mcp", manager, "s", transport=never):  # type: ignore[arg-type]
            pass

    # An http_client() used with such a URL answers locally too, with the same error, and sends nothing.
    class Never(NeverSend, httpx2.AsyncBaseTransport):
        pass

    inner = Never()
    async with http_client(manager, "s", transport=inner) as client:
        answer = await client.post("http://mcp.example.com/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert answer.headers["x-upstream-auth-error"] == "InsecureTransport"
    assert never.sent == 0 and inner.sent == 0


async def test_connect_session_refuses_plain_http_to_a_remote_host(manager: TokenManager) -> None:
    """The SDK 1.x twin refuses the same way."""
    from httpx_upstream_auth.mcp import connect_session

    with pytest.raises(InsecureTransport):
        async with connect_session("http://10.0.0.1/mcp", manager, "s"):
            pass


async def test_a_challenge_naming_another_origin_is_not_fetched(
    provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """A 401's resource_metadata on another origin (here an "internal" service) is ignored: no request reaches
    it, and discovery goes on at the MCP server's own well-known URLs."""
    internal = MetadataServer({"resource": mcp_server.url, "authorization_servers": ["http://127.0.0.1:9"]})
    async with ServerThread(internal) as running:
        challenge = f'Bearer error="invalid_token", resource_metadata="{running.url}/admin/delete-everything"'
        found = await adiscover(mcp_server.url, www_authenticate=challenge)
    assert internal.paths == []
    assert found.token_endpoint == provider_server.url + "/token"


async def test_protected_resource_metadata_without_resource_is_refused(
    provider: LocalProvider, provider_server: ServerThread
) -> None:
    """RFC 9728 requires ``resource``: metadata without it is refused, and its authorization server not asked."""
    app = MetadataServer({"authorization_servers": [provider_server.url]})
    async with ServerThread(app) as running:
        with pytest.raises(DiscoveryFailed, match="no resource member"):
            await adiscover(running.url + "/mcp")
    assert provider.flow_stats["metadata_requests"] == 0


class Hosts(httpx.AsyncBaseTransport):
    """Real HTTP to 127.0.0.1 for made-up host names (``https://mcp.test`` served by a local plain-http app), so a
    server can look remote, or an authorization server non-loopback; records every URL asked for."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.asked: list[str] = []
        self.inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(str(request.url))
        mapped = self.names.get(request.url.host)
        if mapped is not None:
            request.url = httpx.URL(mapped + request.url.raw_path.decode())
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_remote_server_cannot_make_discovery_probe_loopback(provider_server: ServerThread) -> None:
    """A remote (https) MCP server naming an authorization server on plain http at this machine's loopback (an
    internal service): refused before any request reaches it. Plain http to loopback is for servers on loopback."""
    internal = MetadataServer({"issuer": "internal-secret-value"})
    async with ServerThread(internal) as inside:
        prm = MetadataServer({"resource": "https://mcp.test/mcp", "authorization_servers": [inside.url + "/admin"]})
        async with ServerThread(prm) as remote:
            hosts = Hosts({"mcp.test": remote.url})
            async with httpx.AsyncClient(transport=hosts) as client:
                with pytest.raises(DiscoveryFailed, match="not https") as caught:
                    await adiscover("https://mcp.test/mcp", client=client)
    assert internal.paths == [] and "internal-secret-value" not in str(caught.value)
    assert prm.paths  # the remote server's metadata was read: the refusal is about what it names


async def test_sdk_login_fetches_no_resource_metadata_on_another_origin() -> None:
    """SDK-login mode: a server whose 401 names a resource_metadata URL on another origin (an internal service,
    with a path and query of its choosing) does not make the SDK's login fetch it; the connect fails typed."""
    pytest.importorskip("mcp.server.mcpserver", reason="SDK-login mode needs the MCP SDK 2.x")
    from httpx_upstream_auth import UpstreamAuthError
    from httpx_upstream_auth.mcp import SDKLogin, connect

    internal = MetadataServer({"resource": "x", "authorization_servers": ["http://127.0.0.1:9"]})
    async with ServerThread(internal) as inside:
        target = inside.url + "/admin/delete-everything?confirm=yes"

        async def hostile(scope: Any, receive: Any, send: Any) -> None:
            """401 to everything, naming the internal service as its metadata."""
            challenge = f'Bearer error="invalid_token", resource_metadata="{target}"'.encode()
            await send({"type": "http.response.start", "status": 401, "headers": [(b"www-authenticate", challenge)]})
            await send({"type": "http.response.body", "body": b""})

        browser = mcp_fixtures.HeadlessBrowser()
        async with ServerThread(hostile) as running:
            login = SDKLogin(
                running.url + "/mcp",
                client_metadata=login_metadata(),
                redirect_handler=browser.redirect,
                callback_handler=browser.callback,
            )
            try:
                with pytest.raises(UpstreamAuthError):
                    async with connect(running.url + "/mcp", login, "s", mode="legacy"):
                        pass  # pragma: no cover
            finally:
                await login.aclose()
    assert internal.paths == [] and browser.visits == 0


async def test_sdk_login_never_logs_in_over_plain_http_at_a_remote_authorization_server(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """SDK-login mode: an MCP server (on loopback) naming an authorization server on plain http at another host:
    DiscoveryFailed before anything is sent there (metadata, registration, code exchange) or the browser opens."""
    pytest.importorskip("mcp.server.mcpserver", reason="SDK-login mode needs the MCP SDK 2.x")
    import httpx2

    from httpx_upstream_auth.mcp import SDKLogin, connect

    asked: list[str] = []

    class Routed(httpx2.AsyncBaseTransport):
        """Sends ``as.test`` to the provider on 127.0.0.1 (keeping its Host header); records every URL."""

        def __init__(self) -> None:
            self.inner = httpx2.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            asked.append(str(request.url))
            if request.url.host == "as.test":
                request.url = request.url.copy_with(host="127.0.0.1")
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    port = httpx.URL(provider_server.url).port
    mcp_server.authorization_servers = [f"http://as.test:{port}"]
    browser = mcp_fixtures.HeadlessBrowser()
    login = SDKLogin(
        mcp_server.url,
        client_metadata=login_metadata(),
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
    )
    try:
        with pytest.raises(DiscoveryFailed, match="not https"):
            async with connect(mcp_server.url, login, "s", mode="legacy", transport=Routed()):
                pass  # pragma: no cover
    finally:
        await login.aclose()
    assert not [url for url in asked if "as.test" in url]
    assert browser.visits == 0 and sum(provider.flow_stats.values()) == 0


def login_metadata() -> Any:
    """What SDK-login mode registers a client with."""
    from mcp.shared.auth import OAuthClientMetadata

    return OAuthClientMetadata(
        redirect_uris=["http://127.0.0.1:9/callback"],  # type: ignore[list-item]
        token_endpoint_auth_method="client_secret_post",
        scope="api",
    )
