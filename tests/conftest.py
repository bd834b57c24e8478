"""Shared fixtures: a fresh LocalProvider served over real HTTP per test, managers, and sync/async drivers.

Every async test runs on asyncio and trio (``anyio_backend``). Tests that take ``mode`` run the same body
through the sync API (in a worker thread) and the async API: (asyncio, sync), (asyncio, async), (trio, async).
Every async test fails if an event loop makes a blocking call while it runs (:func:`_event_loops_never_block`).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import blockbuster.blockbuster
import pytest
import trio.lowlevel
from blockbuster import blockbuster_ctx
from support import AUTH_METHODS, CLIENT_SECRETS, PROVIDER_ID, Driver, ManagerFactory

from httpx_upstream_auth import MemoryStorage, OAuth2Refresher, RedisStorage, SQLiteStorage, Storage, TokenManager
from httpx_upstream_auth.testing import LocalProvider, ServerThread

BACKENDS = ["asyncio", "trio"]
MODES = [("asyncio", "sync"), ("asyncio", "async"), ("trio", "async")]

_servers: list[ServerThread] = []


def pytest_configure(config: pytest.Config) -> None:
    """Under the MCP SDK 1.x (CI's second environment), ignore the warnings about the async generators its
    SSE reader (httpx-sse over httpx and httpcore) leaves to the garbage collector when a session's task
    group is cancelled at its close; trio warns when it collects them. The 2.x SDK does the same over
    httpx2 (see pyproject.toml); in the main environment httpx's warnings stay errors, for our own reads."""
    try:
        sdk = metadata.version("mcp")
    except metadata.PackageNotFoundError:
        return
    if sdk.startswith("1."):
        config.addinivalue_line(
            "filterwarnings", r"ignore:Async generator '(httpx_sse|httpx|httpcore)\.:ResourceWarning"
        )


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The backend of this run of an async test; parametrized in :func:`pytest_generate_tests`."""
    return str(request.param)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every ``@pytest.mark.anyio`` test runs on asyncio and trio; tests taking ``mode`` (or ``driver``) run
    through the sync API once and through the async API on both backends."""
    if "anyio_backend" not in metafunc.fixturenames:
        return
    only = metafunc.definition.get_closest_marker("backends")
    if only is not None:  # a test of one runtime's own behaviour (asyncio's native cancellation, say)
        metafunc.parametrize("anyio_backend", list(only.args), indirect=True)
    elif "mode" in metafunc.fixturenames:
        metafunc.parametrize(
            ("anyio_backend", "mode"), MODES, indirect=["anyio_backend"], ids=[f"{b}-{m}" for b, m in MODES]
        )
    else:
        metafunc.parametrize("anyio_backend", BACKENDS, indirect=True)


class _EventLoopProbe:
    """Stands in for the asyncio module inside blockbuster, which asks it only whether the calling thread runs
    an event loop: a trio run counts too (blockbuster knows asyncio's alone)."""

    @staticmethod
    def get_running_loop() -> object:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return trio.lowlevel.current_task()  # RuntimeError outside a trio task as well


@pytest.fixture(autouse=True)
def _event_loops_never_block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While an async test runs, a blocking call (time.sleep, blocking socket, file or sqlite3 I/O) made on a
    thread that runs an event loop (asyncio or trio) raises ``BlockingError``: the library's, the test's and
    the local servers' loops alike. Sync code that must block runs in a worker thread, as the library's own does."""
    if "anyio_backend" not in request.fixturenames:
        yield
        return
    monkeypatch.setattr(blockbuster.blockbuster, "asyncio", _EventLoopProbe)
    with blockbuster_ctx() as guard:
        # A threading lock taken on the loop is no blocking call unless another thread holds it for long,
        # and the library's table locks are held for a few statements: blockbuster would flag them only
        # when the scheduler happens to interleave, so a failure would say nothing about the code.
        guard.functions["threading.Lock.acquire"].deactivate()
        guard.functions["threading.Lock.acquire_lock"].deactivate()
        # Managers and storages are built once, at start-up, by sync constructors that open files and
        # connections (as open() does); what must never block is what they do afterwards, per request.
        for built_at_start_up in (TokenManager, SQLiteStorage, RedisStorage):
            where = inspect.getsourcefile(built_at_start_up)
            assert where is not None
            for function in guard.functions.values():
                function.can_block_in(where, {"__init__"})
        for function in guard.functions.values():
            # A module's first import reads files (httpx2 imports httpcore2 when its first transport is
            # built), and jsonschema reads its bundled meta-schemas when the MCP SDK first validates a tool
            # result: once per process, so whichever test came first would fail.
            function.can_block_in("<frozen importlib._bootstrap>", {"_find_and_load"})
            function.can_block_in("jsonschema_specifications/_core.py", {"_schemas"})
        yield


@pytest.fixture(scope="session", autouse=True)
def _join_servers() -> Iterator[None]:
    """Servers are told to stop without waiting (uvicorn takes ~0.2 s); wait for all of them once, at the end."""
    yield
    for server in _servers:
        server.stop(timeout=5)


@pytest.fixture
def provider() -> LocalProvider:
    """A fresh provider per test: its counters, grants and faults are this test's alone."""
    return LocalProvider(access_ttl=60)


@pytest.fixture
def server(provider: LocalProvider) -> Iterator[ServerThread]:
    """The test's provider served by uvicorn on 127.0.0.1."""
    running = ServerThread(provider).start()
    _servers.append(running)
    yield running
    running.stop(timeout=0)


@pytest.fixture
def dead_url() -> Iterator[str]:
    """An http:// origin on 127.0.0.1 where a connection is refused for the whole test: its port is bound and
    held, never listened on (a fixed port such as 1 can be taken by another process on the machine)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture
def token_url(server: ServerThread) -> str:
    """The provider's token endpoint."""
    return server.url + "/token"


@pytest.fixture
def make_manager(token_url: str) -> Iterator[ManagerFactory]:
    """Build TokenManagers against the test's provider; all are closed at teardown."""
    made: list[TokenManager] = []

    def make(
        *,
        client_id: str = "test-client",
        storage: Storage | None = None,
        refresher: Any = None,
        **kwargs: Any,
    ) -> TokenManager:
        if refresher is None:
            refresher = OAuth2Refresher(
                token_url,
                client_id,
                CLIENT_SECRETS[client_id],
                auth_method=AUTH_METHODS[client_id],  # type: ignore[arg-type]
            )
        manager = TokenManager(
            refresher=refresher,
            provider_id=PROVIDER_ID,
            storage=MemoryStorage() if storage is None else storage,
            **kwargs,
        )
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


@pytest.fixture
def manager(make_manager: ManagerFactory) -> TokenManager:
    """A manager with the defaults: basic client auth, memory storage."""
    return make_manager()


@pytest.fixture
def driver(mode: str, server: ServerThread) -> Driver:
    """The sync or async way into the manager, per the test's ``mode``."""
    return Driver(mode, server.url)
