"""UpstreamAuthTransport / AsyncUpstreamAuthTransport over real HTTP: origins, cleanup, httpx2, cancellation.

The API runs on its own origin (:class:`ApiOrigin`, the provider's ``/api/`` routes plus a redirect and
endpoints that hang); the provider's own server is "another origin", whose ``/api/echo`` reports the
``Authorization`` header it received. Tests taking ``lib`` run with httpx and with httpx2 clients.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import types
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.to_thread
import attrs
import httpx
import pytest
from support import SESSION, SSL

from httpx_upstream_auth import (
    AsyncUpstreamAuthTransport,
    DPoP,
    DPoPKey,
    MemoryStorage,
    OAuth2Refresher,
    TokenManager,
    UpstreamAuth,
    UpstreamAuthError,
    UpstreamAuthTransport,
)
from httpx_upstream_auth.testing import LocalProvider, ServerThread

try:
    import httpx2
except ImportError:  # pragma: no cover - httpx2 is a dev dependency
    httpx2 = None  # type: ignore[assignment]

pytestmark = pytest.mark.anyio

needs_httpx2 = pytest.mark.skipif(httpx2 is None, reason="httpx2 is not installed")
LIBS = [pytest.param("httpx", id="httpx"), pytest.param("httpx2", id="httpx2", marks=needs_httpx2)]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_BEARER_401 = [(b"content-type", b"application/json"), (b"www-authenticate", b'Bearer error="invalid_token"')]


class ApiOrigin:
    """The upstream API on its own origin: the provider's routes, plus ``/redirect?to=<url>`` (a 302),
    ``/hang`` (answers nothing until the client hangs up) and ``/reject-then-hang`` (a Bearer 401 the
    first time, then like ``/hang``)."""

    def __init__(self, provider: LocalProvider) -> None:
        self.provider = provider
        self.url = ""
        self.hanging = 0
        """Requests that reached a hanging endpoint."""
        self.hung_up = 0
        """Hanging requests whose client closed the connection."""
        self.rejected = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if path == "/redirect":
            target = parse_qs(scope["query_string"].decode())["to"][0]
            await send({"type": "http.response.start", "status": 302, "headers": [(b"location", target.encode())]})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/reject-then-hang" and self._reject_first():
            await send({"type": "http.response.start", "status": 401, "headers": _BEARER_401})
            await send({"type": "http.response.body", "body": b'{"error":"invalid_token"}'})
        elif path in ("/hang", "/reject-then-hang"):
            with self._lock:
                self.hanging += 1
            while (await receive())["type"] != "http.disconnect":
                pass
            with self._lock:
                self.hung_up += 1
        else:
            await self.provider(scope, receive, send)

    def _reject_first(self) -> bool:
        with self._lock:
            self.rejected += 1
            return self.rejected == 1

    def counts(self) -> tuple[int, int]:
        """``(hanging, hung_up)``."""
        with self._lock:
            return self.hanging, self.hung_up


@pytest.fixture
def api(provider: LocalProvider) -> Iterator[ApiOrigin]:
    """The test's API origin, served on its own port (so another origin than the provider's server)."""
    app = ApiOrigin(provider)
    running = ServerThread(app).start()
    app.url = running.url
    yield app
    running.stop(timeout=5)


def lib_module(lib: str) -> Any:
    """The client library a test runs with: ``httpx`` or ``httpx2``."""
    return httpx if lib == "httpx" else httpx2


Call = tuple[str, dict[str, Any]]


async def exchange(
    mode: str,
    lib: str,
    manager: TokenManager,
    calls: list[Call],
    *,
    transport_options: dict[str, Any] | None = None,
    follow_redirects: bool = False,
) -> list[Any]:
    """GET each ``(url, kwargs)`` in turn through one client over one (Async)UpstreamAuthTransport."""
    module = lib_module(lib)
    options = transport_options or {}
    if mode == "sync":

        def run() -> list[Any]:
            transport = UpstreamAuthTransport(manager, SESSION, **options)
            with module.Client(transport=transport, timeout=10, follow_redirects=follow_redirects) as client:
                return [client.get(url, **kwargs) for url, kwargs in calls]

        result: list[Any] = await anyio.to_thread.run_sync(run)
        return result
    transport = AsyncUpstreamAuthTransport(manager, SESSION, **options)
    async with module.AsyncClient(transport=transport, timeout=10, follow_redirects=follow_redirects) as client:
        return [await client.get(url, **kwargs) for url, kwargs in calls]


# -- origins ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lib", LIBS)
async def test_redirect_to_another_origin_is_sent_without_the_token(
    lib: str, mode: str, provider: LocalProvider, manager: TokenManager, server: ServerThread, api: ApiOrigin
) -> None:
    """A followed redirect from the API to another origin reaches it without the upstream token."""
    manager.store(SESSION, provider.login())
    first, redirected = await exchange(
        mode,
        lib,
        manager,
        [(api.url + "/api/me", {}), (f"{api.url}/redirect?to={server.url}/api/echo", {})],
        follow_redirects=True,
    )
    assert first.status_code == 200
    assert [r.status_code for r in redirected.history] == [302]
    assert redirected.json()["authorization"] is None
    assert provider.api_calls["/api/echo"] == 1 and provider.stats["api_ok"] == 1


@pytest.mark.parametrize("lib", LIBS)
async def test_redirect_within_the_origin_keeps_the_token(
    lib: str, mode: str, provider: LocalProvider, manager: TokenManager, api: ApiOrigin
) -> None:
    """A followed redirect to another path of the API's origin is authenticated, as with ``auth=``."""
    manager.store(SESSION, provider.login())
    (response,) = await exchange(
        mode, lib, manager, [(f"{api.url}/redirect?to={api.url}/api/me", {})], follow_redirects=True
    )
    assert response.status_code == 200 and [r.status_code for r in response.history] == [302]
    assert provider.stats["api_ok"] == 1 and provider.stats["api_401"] == 0


class HeaderRecorder:
    """Another origin: answers 200 to everything and keeps the headers of each request it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.seen.append({name.decode().lower(): value.decode() for name, value in scope["headers"]})
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("lib", LIBS)
async def test_a_redirect_to_another_origin_carries_neither_the_token_nor_the_dpop_proof(
    lib: str, mode: str, provider: LocalProvider, token_url: str, api: ApiOrigin
) -> None:
    """The API answers a DPoP-bound request with a redirect to another loopback server (another port, so another
    origin): that server gets neither ``Authorization`` nor ``DPoP``, while a hop back to the API's own origin
    carries a proof of its own (the provider refuses a proof made for another URL or sent twice)."""
    key = DPoPKey.generate()
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret", dpop=DPoP())
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    manager.store(SESSION, attrs.evolve(provider.login(dpop_jkt=key.thumbprint), dpop_key=key.to_jwk()))
    elsewhere = HeaderRecorder()
    try:
        async with ServerThread(elsewhere) as other:
            ours, moved, back = await exchange(
                mode,
                lib,
                manager,
                [
                    (api.url + "/api/me", {}),
                    (f"{api.url}/redirect?to={other.url}/landing", {}),
                    (f"{api.url}/redirect?to={api.url}/api/me", {}),
                ],
                follow_redirects=True,
            )
    finally:
        manager.close()
    assert (ours.status_code, moved.status_code, back.status_code) == (200, 200, 200)
    assert [r.status_code for r in moved.history] == [302]
    (landed,) = elsewhere.seen
    assert "dpop" not in landed and "authorization" not in landed
    assert "Authorization" not in ours.request.headers  # the caller's request is left as the caller made it
    stats = provider.stats
    assert (stats["api_ok"], stats["dpop_proofs_invalid"], stats["api_401"]) == (2, 0, 0)


@pytest.mark.parametrize("lib", LIBS)
async def test_explicit_origins_are_not_pinned_by_the_first_request(
    lib: str, mode: str, provider: LocalProvider, manager: TokenManager, server: ServerThread, api: ApiOrigin
) -> None:
    """With ``origins=``, a first request to another origin goes out bare and the API still gets the token."""
    manager.store(SESSION, provider.login())
    elsewhere, ours = await exchange(
        mode,
        lib,
        manager,
        [(server.url + "/api/echo", {}), (api.url + "/api/me", {})],
        transport_options={"origins": [api.url.upper()]},
    )
    assert elsewhere.json()["authorization"] is None
    assert ours.status_code == 200
    assert provider.stats["api_ok"] == 1 and provider.stats["token_calls"] == 0


@pytest.mark.parametrize("lib", LIBS)
async def test_another_origins_authorization_header_is_left_alone(
    lib: str, mode: str, provider: LocalProvider, manager: TokenManager, server: ServerThread, api: ApiOrigin
) -> None:
    """A request to another origin that carries its own Authorization keeps it: ours is never put in."""
    manager.store(SESSION, provider.login())
    ours, theirs = await exchange(
        mode,
        lib,
        manager,
        [(api.url + "/api/me", {}), (server.url + "/api/echo", {"headers": {"Authorization": "Bearer theirs"}})],
    )
    assert ours.status_code == 200
    assert theirs.json()["authorization"] == "Bearer theirs"


@pytest.mark.parametrize("transport_class", [UpstreamAuthTransport, AsyncUpstreamAuthTransport])
def test_origins_must_be_origins(manager: TokenManager, transport_class: Any) -> None:
    """``origins=`` takes a list of scheme://host[:port]; anything else is refused when constructed."""
    for bad in (["api.example.com"], ["ftp://api.example.com"], ["https://api.example.com/v1"]):
        with pytest.raises(ValueError, match="not an origin"):
            transport_class(manager, SESSION, origins=bad)
    with pytest.raises(ValueError, match="origins= is empty"):
        transport_class(manager, SESSION, origins=[])
    with pytest.raises(TypeError):
        transport_class(manager, SESSION, origins="https://api.example.com")


async def test_a_request_of_neither_library_needs_a_transport(manager: TokenManager) -> None:
    """Without transport=, the transport makes httpx's or httpx2's own for their requests; a request of another
    library is refused with a TypeError saying to pass transport=, before anything is sent."""

    class OtherRequest:
        url = httpx.URL("https://api.example.com/data")

    transport = AsyncUpstreamAuthTransport(manager, SESSION, origins=["https://elsewhere.example"])
    with pytest.raises(TypeError, match=r"cannot send a .*OtherRequest: pass transport="):
        await transport.handle_async_request(OtherRequest())  # type: ignore[arg-type]


# -- a failed refresh closes the 401 ---------------------------------------------------------------------


@pytest.mark.parametrize("lib", LIBS)
async def test_failed_refreshes_do_not_leak_pooled_connections(
    lib: str, mode: str, provider: LocalProvider, manager: TokenManager, api: ApiOrigin
) -> None:
    """Three 401s whose refresh fails (503, revoked grant) each close the 401: a one-connection pool still serves."""
    module = lib_module(lib)
    url = api.url + "/api/me"

    def break_session(attempt: int) -> None:
        tokens = manager.store(SESSION, provider.login())
        if attempt % 2:
            provider.revoke_access(tokens.access_token)
            provider.fail_next("503", 5)  # spare faults in case a refresh is retried; later ones fail anyway
        else:
            provider.revoke_grant(provider.grant_of(tokens.access_token))

    def inner(sync: bool) -> Any:
        limits = module.Limits(max_connections=1)
        return (module.HTTPTransport if sync else module.AsyncHTTPTransport)(limits=limits, verify=SSL)

    # The pool timeout only bounds how long the unfixed code waits for the leaked connection.
    timeout = module.Timeout(10, pool=5)
    if mode == "sync":

        def run() -> int:
            transport = UpstreamAuthTransport(manager, SESSION, transport=inner(True))
            with module.Client(transport=transport, timeout=timeout) as client:
                for attempt in range(3):
                    break_session(attempt)
                    with pytest.raises(UpstreamAuthError):
                        client.get(url)
                manager.store(SESSION, provider.login())
                return int(client.get(url).status_code)

        status = await anyio.to_thread.run_sync(run)
    else:
        transport = AsyncUpstreamAuthTransport(manager, SESSION, transport=inner(False))
        async with module.AsyncClient(transport=transport, timeout=timeout) as client:
            for attempt in range(3):
                break_session(attempt)
                with pytest.raises(UpstreamAuthError):
                    await client.get(url)
            manager.store(SESSION, provider.login())
            status = (await client.get(url)).status_code
    assert status == 200
    assert provider.stats["api_401"] == 3 and provider.stats["api_ok"] == 1


# -- httpx2 clients --------------------------------------------------------------------------------------


@needs_httpx2
def test_transports_are_httpx2_transports(manager: TokenManager) -> None:
    """Both transports are also httpx2 base transports, so httpx2 clients and their type checks take them."""
    assert isinstance(UpstreamAuthTransport(manager, SESSION), httpx2.BaseTransport)
    assert isinstance(AsyncUpstreamAuthTransport(manager, SESSION), httpx2.AsyncBaseTransport)


@needs_httpx2
async def test_httpx2_client_with_the_default_inner_transport(
    mode: str, provider: LocalProvider, manager: TokenManager, api: ApiOrigin
) -> None:
    """An httpx2 client over the transport's own inner transport: a revoked token is refreshed and replayed."""
    tokens = manager.store(SESSION, provider.login())
    provider.revoke_access(tokens.access_token)
    first, second = await exchange(mode, "httpx2", manager, [(api.url + "/api/me", {}), (api.url + "/api/me", {})])
    assert (first.status_code, second.status_code) == (200, 200)
    assert isinstance(first, httpx2.Response)
    assert provider.stats["refresh_ok"] == 1 and provider.stats["api_401"] == 1 and provider.stats["api_ok"] == 2


@needs_httpx2
async def test_one_transport_serves_httpx_and_httpx2_clients(
    provider: LocalProvider, manager: TokenManager, api: ApiOrigin
) -> None:
    """One transport object in an httpx client and an httpx2 client: each library gets its own inner transport."""
    manager.store(SESSION, provider.login())
    transport = AsyncUpstreamAuthTransport(manager, SESSION)
    # Statically the transports are httpx transports only (as UpstreamAuth is an httpx.Auth only).
    two = httpx2.AsyncClient(transport=transport)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport) as one, two:
        assert (await one.get(api.url + "/api/me")).status_code == 200
        assert (await two.get(api.url + "/api/me")).status_code == 200
    assert provider.stats["api_ok"] == 2


# -- cancellation ----------------------------------------------------------------------------------------


def open_flows() -> list[Any]:
    """Auth-flow generators that were started and are neither finished nor closed."""
    code = UpstreamAuth.async_auth_flow.__code__
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, types.AsyncGeneratorType) and o.ag_code is code and o.ag_frame is not None
    ]


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll until ``condition()`` holds (the test's timeout bounds it)."""
    while not condition():
        await anyio.sleep(0.01)


async def cancel_when(anyio_backend: str, call: Callable[[], Any], reached: Callable[[], bool]) -> None:
    """Run ``call()``, cancel it once ``reached()``: asyncio's ``Task.cancel``, or a trio cancel scope."""
    finished = False

    async def run() -> None:
        nonlocal finished
        await call()
        finished = True

    if anyio_backend == "asyncio":
        task = asyncio.ensure_future(run())
        await wait_for(reached)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await wait_for(reached)
            tg.cancel_scope.cancel()
    assert not finished


@pytest.mark.parametrize("stage", ["awaiting-the-api", "refreshing-after-401"])
@pytest.mark.parametrize("lib", LIBS)
async def test_cancelled_caller_leaves_no_open_flow_or_connection(
    anyio_backend: str, lib: str, stage: str, provider: LocalProvider, manager: TokenManager, api: ApiOrigin
) -> None:
    """A caller cancelled mid-request (asyncio Task.cancel, trio scope) closes the flow and frees the connection."""
    module = lib_module(lib)
    manager.store(SESSION, provider.login())
    before = {id(flow) for flow in open_flows()}
    inner = module.AsyncHTTPTransport(limits=module.Limits(max_connections=1), verify=SSL)
    transport = AsyncUpstreamAuthTransport(manager, SESSION, transport=inner)
    if stage == "awaiting-the-api":
        path = "/hang"

        def reached() -> bool:
            return api.counts()[0] == 1
    else:
        # The refresh after the 401 is slow; if it finishes before the cancel lands, the replay hangs.
        path = "/reject-then-hang"
        provider.token_delay = 0.5

        def reached() -> bool:
            return provider.stats["token_calls"] == 1

    async with module.AsyncClient(transport=transport, timeout=module.Timeout(30, pool=5)) as client:
        await cancel_when(anyio_backend, lambda: client.get(api.url + path), reached)
        assert [flow for flow in open_flows() if id(flow) not in before] == []
        # One connection in the pool: this request only gets it if the cancelled one gave it back.
        assert (await client.get(api.url + "/api/me")).status_code == 200
        with anyio.fail_after(10):
            await wait_for(lambda: api.counts()[1] == api.counts()[0])
    assert provider.stats["api_ok"] == 1


_WITHOUT_EXTRAS = """
import sys

# `import httpx2` and `import opentelemetry` now raise ImportError, as when they are not installed
sys.modules["httpx2"] = sys.modules["opentelemetry"] = None
import asyncio

import httpx

from httpx_upstream_auth import AsyncUpstreamAuthTransport, MemoryStorage, OAuth2Refresher, TokenManager
from httpx_upstream_auth.testing import LocalProvider, ServerThread

provider = LocalProvider(access_ttl=60)
with ServerThread(provider) as server:
    refresher = OAuth2Refresher(server.url + "/token", "test-client", "test-secret")
    manager = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    provider.revoke_access(manager.store("s", provider.login()).access_token)  # the first request refreshes
    auth = manager.auth("s")
    with httpx.Client(auth=auth) as client:
        print("auth", isinstance(auth, httpx.Auth), client.get(server.url + "/api/me").status_code)

    async def through_transport() -> int:
        transport = AsyncUpstreamAuthTransport(manager, "s")
        async with httpx.AsyncClient(transport=transport) as client:
            return (await client.get(server.url + "/api/me")).status_code

    plain = AsyncUpstreamAuthTransport.__bases__ == (httpx.AsyncBaseTransport,)
    print("transport", plain, asyncio.run(through_transport()))
    manager.close()
print("api_ok", provider.stats["api_ok"], "refresh_ok", provider.stats["refresh_ok"])
"""


def test_without_the_optional_packages_the_adapters_are_httpx_only() -> None:
    """httpx2 and opentelemetry are optional: without them, UpstreamAuth is a plain httpx.Auth and the transport
    a plain httpx transport, and both authenticate requests, refreshing as needed (in a child process where
    their imports fail)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRAS], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["auth True 200", "transport True 200", "api_ok 2 refresh_ok 1"]
