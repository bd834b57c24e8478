"""Single flight over real HTTP: herds of tasks and threads, 401 storms, cancellation, one-shot bodies, secrets.

Every assertion is on exact counts from the provider or the storage, never on timings; waits only poll for
a state to be reached (a token request arrived, followers are parked on the flight).
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import attrs
import httpx
import pytest
from support import (
    SESSION,
    SSL,
    WAIT_LIMIT,
    Driver,
    FlakyStorage,
    HeldLeaseStorage,
    ManagerFactory,
    UnnotifiedStorage,
    expired,
    fail_refresh,
    put_entry,
    stored,
    wait_until,
)

from httpx_upstream_auth import (
    Binding,
    BindingMismatch,
    OAuth2Refresher,
    ReauthenticationRequired,
    RefreshFailed,
    TokenManager,
    UpstreamAuthError,
)
from httpx_upstream_auth._async._manager import MAX_RETRIES
from httpx_upstream_auth.testing import LocalProvider, ServerThread

pytestmark = pytest.mark.anyio


def wait_until_sync(condition: Callable[[], bool]) -> None:
    """Blocking twin of :func:`wait_until`, for thread tests."""
    deadline = time.monotonic() + WAIT_LIMIT
    while not condition():
        assert time.monotonic() < deadline, "condition never reached"
        time.sleep(0.005)


def followers_parked(manager: TokenManager, count: int, session: str = SESSION) -> Callable[[], bool]:
    """True once ``count`` callers wait on the key's flight."""

    def check() -> bool:
        return manager.footprint().waiting >= count

    return check


def async_client(server: ServerThread, manager: TokenManager, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, auth=manager.auth(SESSION, **kwargs), timeout=30, verify=SSL)


# -- herds ---------------------------------------------------------------------------------------------


async def test_200_tasks_on_expired_token_refresh_once(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """200 concurrent tasks on an expired token cause exactly one refresh, no reuse, and 200 OK answers."""
    put_entry(manager, expired(provider.login()))
    provider.token_delay = 0.1
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(
        base_url=server.url, auth=manager.auth(SESSION), limits=limits, timeout=30, verify=SSL
    ) as client:

        async def one() -> None:
            statuses.append((await client.get("/api/me")).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one)
    assert statuses == [200] * 200
    assert provider.stats["token_calls"] == 1
    assert provider.stats["refresh_ok"] == 1
    assert provider.stats["refresh_reuse"] == 0
    assert provider.stats["api_ok"] == 200 and provider.stats["api_401"] == 0


def test_16_threads_sharing_a_client_refresh_once(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """16 threads sharing one httpx.Client, 5 requests each, on an expired token: one refresh, 80 OK."""
    put_entry(manager, expired(provider.login()))
    provider.token_delay = 0.1
    statuses: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)
    limits = httpx.Limits(max_connections=16)
    with httpx.Client(base_url=server.url, auth=manager.auth(SESSION), limits=limits, timeout=30, verify=SSL) as client:

        def worker() -> None:
            try:
                barrier.wait()
                for _ in range(5):
                    statuses.append(client.get("/api/me").status_code)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert statuses == [200] * 80
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_50_concurrent_401s_refresh_once_and_replay(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """50 concurrent requests with a token revoked server-side: one refresh, all 50 replayed to 200."""
    tokens = await manager.astore(SESSION, provider.login())
    provider.revoke_access(tokens.access_token)
    provider.token_delay = 0.1
    statuses: list[int] = []
    async with async_client(server, manager) as client:

        async def one() -> None:
            statuses.append((await client.get("/api/me")).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
    assert statuses == [200] * 50
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0
    assert provider.stats["api_401"] == 50 and provider.stats["api_ok"] == 50


async def test_failed_refresh_is_shared_not_repeated(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """When the leader's refresh fails (after its own retries), its followers get the same error without
    calling the provider again."""
    entry = put_entry(manager, expired(provider.login()))
    # The 503 comes back at once, but all 30 tasks join the flight in their first step, before any I/O.
    fail_refresh(provider, "503")
    errors: list[BaseException] = []
    async with async_client(server, manager) as client:

        async def one() -> None:
            try:
                await client.get("/api/me")
            except RefreshFailed as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(one)
    assert len(errors) == 30
    assert all(isinstance(e, RefreshFailed) and e.retryable for e in errors)
    assert len({id(e) for e in errors}) == 30  # each follower raises its own copy
    assert provider.stats["token_calls"] == 1 + MAX_RETRIES  # one job's attempts, not one per caller
    assert stored(manager) == entry


def test_failed_refresh_is_shared_across_threads(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """Threads parked on a refresh whose answer is lost all get the one outcome (the entry removed, log in
    again); the provider is called once and the consumed refresh token never presented again."""
    manager = make_manager(refresher=OAuth2Refresher(token_url, "test-client", "test-secret", timeout=0.5))
    put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:2")
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            manager.get_token(SESSION)
        except BaseException as exc:
            errors.append(exc)

    leader = threading.Thread(target=worker)
    leader.start()
    wait_until_sync(lambda: provider.stats["token_calls"] == 1)
    followers = [threading.Thread(target=worker) for _ in range(8)]
    for thread in followers:
        thread.start()
    wait_until_sync(followers_parked(manager, 8))
    for thread in [leader, *followers]:
        thread.join()
    assert len(errors) == 9
    assert all(isinstance(e, ReauthenticationRequired) for e in errors), [type(e) for e in errors]
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0
    assert stored(manager) is None


async def test_dead_grant_is_shared_not_repeated(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """A revoked grant gives every waiting caller ReauthenticationRequired after one token request."""
    tokens = provider.login()
    entry = put_entry(manager, expired(tokens))
    provider.revoke_grant(provider.grant_of(tokens.access_token))
    provider.token_delay = 0.2
    errors: list[BaseException] = []
    async with async_client(server, manager) as client:

        async def one() -> None:
            try:
                await client.get("/api/me")
            except ReauthenticationRequired as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(one)
    assert len(errors) == 30
    assert provider.stats["token_calls"] == 1
    assert provider.api_calls == {}
    assert stored(manager) == entry


# -- stale 401s ----------------------------------------------------------------------------------------


async def test_stale_401_replays_with_stored_token_without_refresh(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A 401 for a token older than the stored one replays with the stored token and refreshes nothing."""
    manager = make_manager(storage=UnnotifiedStorage())
    old = await driver.store(manager, provider.login())  # cached in the manager
    newer = put_entry(manager, provider.login())  # another worker saved a newer entry meanwhile
    provider.revoke_access(old.access_token)
    response = await driver.request(manager)
    assert response.status_code == 200
    assert response.json()["token_grant"] == provider.grant_of(newer.access_token)
    assert provider.stats["token_calls"] == 0
    assert provider.stats["api_401"] == 1 and provider.stats["api_ok"] == 1


async def test_stale_401_driven_by_hand(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread
) -> None:
    """Driving the flow: a 401 for the old token yields a replay carrying the newer stored token."""
    manager = make_manager(storage=UnnotifiedStorage())
    old = await manager.astore(SESSION, provider.login())
    newer = put_entry(manager, provider.login())
    flow = manager.auth(SESSION).async_auth_flow(httpx.Request("GET", server.url + "/api/me"))
    request = await flow.asend(None)  # type: ignore[arg-type]
    assert request.headers["Authorization"] == old.authorization
    rejected = httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}, request=request)
    replay = await flow.asend(rejected)
    assert replay.headers["Authorization"] == newer.authorization
    with pytest.raises(StopAsyncIteration):
        await flow.asend(httpx.Response(200, request=replay))
    assert provider.stats["token_calls"] == 0


async def test_non_bearer_401_is_not_replayed(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """A 401 challenging another scheme (Basic) goes back to the caller: no refresh, no replay."""
    await manager.astore(SESSION, provider.login())
    flow = manager.auth(SESSION).async_auth_flow(httpx.Request("GET", server.url + "/api/me"))
    request = await flow.asend(None)  # type: ignore[arg-type]
    with pytest.raises(StopAsyncIteration):
        await flow.asend(httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="x"'}, request=request))
    assert provider.stats["token_calls"] == 0


# -- cancellation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("at", ["first-yield", "replay-yield"])
async def test_flow_closed_at_yield_from_another_task_leaves_nothing(
    provider: LocalProvider, manager: TokenManager, server: ServerThread, at: str
) -> None:
    """A flow closed at a yield by another task holds no flight, and the next request on the key proceeds."""
    tokens = await manager.astore(SESSION, provider.login())
    provider.revoke_access(tokens.access_token)
    flow = manager.auth(SESSION).async_auth_flow(httpx.Request("GET", server.url + "/api/me"))
    request = await flow.asend(None)  # type: ignore[arg-type]
    if at == "replay-yield":
        await flow.asend(httpx.Response(401, headers={"WWW-Authenticate": "Bearer"}, request=request))
    async with anyio.create_task_group() as tg:
        tg.start_soon(flow.aclose)
    assert manager.footprint().flights == 0
    async with async_client(server, manager) as client:
        response = await client.get("/api/me")
    assert response.status_code == 200
    assert manager.footprint().flights == 0
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_cancelled_leader_mid_refresh_still_saves_once(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread
) -> None:
    """A leader cancelled while its refresh is at the provider still saves it once; followers get 200."""
    storage = FlakyStorage()
    manager = make_manager(storage=storage)
    entry = put_entry(manager, expired(provider.login()))
    puts_before = storage.puts
    provider.fail_next("delay:0.5")
    leader_scope = anyio.CancelScope()
    statuses: list[int] = []
    leader_got: list[int] = []
    async with async_client(server, manager) as client:

        async def leader() -> None:
            with leader_scope:
                leader_got.append((await client.get("/api/me")).status_code)

        async def follower() -> None:
            statuses.append((await client.get("/api/me")).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(leader)
            await wait_until(lambda: provider.stats["token_calls"] == 1)  # the refresh reached the provider
            for _ in range(10):
                tg.start_soon(follower)
            await wait_until(followers_parked(manager, 10))
            leader_scope.cancel()
    assert leader_scope.cancelled_caught and leader_got == []
    assert statuses == [200] * 10
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_ok"] == 1
    assert provider.stats["refresh_reuse"] == 0
    assert storage.puts - puts_before == 1
    now = stored(manager)
    assert now is not None and now.version == entry.version + 1 and now.refresh_token != entry.refresh_token


async def test_cancelled_lone_leader_still_saves(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """With no follower, a leader cancelled mid-refresh still saves the rotated token; the next call uses it."""
    entry = put_entry(manager, expired(provider.login()))
    provider.fail_next("delay:0.3")
    async with anyio.create_task_group() as tg:
        scope = anyio.CancelScope()

        async def leader() -> None:
            with scope:
                await manager.aget_token(SESSION)

        tg.start_soon(leader)
        await wait_until(lambda: provider.stats["token_calls"] == 1)
        scope.cancel()
    assert scope.cancelled_caught
    await wait_until(lambda: getattr(stored(manager), "version", None) == entry.version + 1)  # the job saves
    async with async_client(server, manager) as client:
        assert (await client.get("/api/me")).status_code == 200
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_cancelled_follower_does_not_disturb_the_flight(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """A follower cancelled while parked on the flight leaves the leader and the other followers unharmed."""
    put_entry(manager, expired(provider.login()))
    provider.fail_next("delay:0.3")
    quitter = anyio.CancelScope()
    statuses: list[int] = []
    async with async_client(server, manager) as client:

        async def one() -> None:
            statuses.append((await client.get("/api/me")).status_code)

        async def follower_that_quits() -> None:
            with quitter:
                await client.get("/api/me")

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await wait_until(lambda: provider.stats["token_calls"] == 1)
            tg.start_soon(follower_that_quits)
            for _ in range(5):
                tg.start_soon(one)
            await wait_until(followers_parked(manager, 6))
            quitter.cancel()
    assert quitter.cancelled_caught
    assert statuses == [200] * 6
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0
    assert manager.footprint().flights == 0


async def test_wait_timeout_bounds_the_caller_not_the_refresh(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread
) -> None:
    """A caller waits at most wait_timeout for a slow refresh (retryable RefreshFailed); the refresh itself goes
    on, saves the rotated tokens, and the next call uses them without another token request."""
    manager = make_manager(wait_timeout=0.2)
    entry = put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:1")
    with pytest.raises(RefreshFailed) as caught:
        await manager.aget_token(SESSION)
    assert caught.value.retryable is True
    await wait_until(lambda: getattr(stored(manager), "version", None) == entry.version + 1)
    async with async_client(server, manager) as client:
        assert (await client.get("/api/me")).status_code == 200
    assert provider.stats["token_calls"] == 1
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_leader_cancelled_before_sending_hands_over(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread
) -> None:
    """A leader cancelled while waiting for another process's lease sent nothing; a follower takes over."""
    storage = HeldLeaseStorage()
    manager = make_manager(storage=storage)
    put_entry(manager, expired(provider.login()))
    leader_scope = anyio.CancelScope()
    statuses: list[int] = []
    async with async_client(server, manager) as client:

        async def leader() -> None:
            with leader_scope:
                await client.get("/api/me")

        async def follower() -> None:
            statuses.append((await client.get("/api/me")).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(leader)
            await wait_until(lambda: storage.attempts >= 1)  # the leader found the lease taken
            tg.start_soon(follower)
            await wait_until(followers_parked(manager, 1))
            storage.held = False  # the other process is done; the leader is cancelled before it notices
            leader_scope.cancel()
    assert leader_scope.cancelled_caught
    assert statuses == [200]
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_ok"] == 1
    assert manager.footprint().flights == 0


# -- bodies and bindings -------------------------------------------------------------------------------


async def test_one_shot_body_is_not_sent_twice(driver: Driver, provider: LocalProvider, manager: TokenManager) -> None:
    """A streamed body is not replayed after a 401: the caller gets the 401, the next request the new token."""
    tokens = await driver.store(manager, provider.login())
    provider.revoke_access(tokens.access_token)

    def chunks() -> Iterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 1000

    async def achunks() -> AsyncIterator[bytes]:
        for chunk in chunks():
            yield chunk

    content: Any = chunks() if driver.mode == "sync" else achunks()
    response = await driver.request(manager, "POST", "/api/upload", content=content)
    assert response.status_code == 401
    assert provider.api_calls["/api/upload"] == 1
    assert provider.stats["token_calls"] == 1  # the new token is ready for the next request
    response = await driver.request(manager, "POST", "/api/upload", content=b"c" * 10)
    assert response.status_code == 200 and response.json() == {"bytes": 10}
    assert provider.api_calls["/api/upload"] == 2
    assert provider.stats["token_calls"] == 1


async def test_in_memory_body_is_replayed(driver: Driver, provider: LocalProvider, manager: TokenManager) -> None:
    """A bytes body is replayed after a 401, with the same bytes."""
    tokens = await driver.store(manager, provider.login())
    provider.revoke_access(tokens.access_token)
    response = await driver.request(manager, "POST", "/api/upload", content=b"x" * 1234)
    assert response.status_code == 200 and response.json() == {"bytes": 1234}
    assert provider.api_calls["/api/upload"] == 2


@pytest.mark.parametrize("is_expired", [False, True], ids=["fresh", "expired"])
async def test_binding_mismatch_sends_nothing(
    driver: Driver, provider: LocalProvider, manager: TokenManager, is_expired: bool
) -> None:
    """An auth expecting another identity raises BindingMismatch before any API or token request."""
    tokens = provider.login()
    put_entry(manager, expired(tokens) if is_expired else tokens)
    with pytest.raises(BindingMismatch):
        await driver.request(manager, expect=Binding(user_id="mallory"))
    assert provider.api_calls == {}
    assert provider.stats["token_calls"] == 0
    response = await driver.request(manager, expect=Binding(user_id="user-1", upstream_subject="alice"))
    assert response.status_code == 200


async def test_entry_of_another_provider_is_refused(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """An entry stored under this key but bound to another provider is refused; nothing is sent."""
    put_entry(manager, attrs.evolve(provider.login(), provider_id="someone-else"))
    with pytest.raises(BindingMismatch):
        await driver.request(manager)
    assert provider.api_calls == {} and provider.stats["token_calls"] == 0


# -- secrets -------------------------------------------------------------------------------------------


async def test_secrets_never_logged_or_in_errors(
    provider: LocalProvider,
    make_manager: ManagerFactory,
    token_url: str,
    server: ServerThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over refresh, replay and failures, no token or client secret appears in DEBUG logs or in any error."""
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret")
    manager = make_manager(refresher=refresher, failure_window=0)  # every failure below reaches the token endpoint
    caplog.set_level(logging.DEBUG)
    secrets: set[str] = {"test-secret", base64.b64encode(b"test-client:test-secret").decode()}
    errors: list[UpstreamAuthError] = []
    first = provider.login()
    put_entry(manager, expired(first))
    async with async_client(server, manager) as client:
        assert (await client.get("/api/me")).status_code == 200  # refresh
        current = stored(manager)
        assert current is not None
        provider.revoke_access(current.access_token)
        assert (await client.get("/api/me")).status_code == 200  # 401, refresh, replay
        latest = stored(manager)
        assert latest is not None
        manager.delete(SESSION)  # drops the cached token too
        put_entry(manager, expired(latest))
        for fault in ("500", "invalid_client", "id_token_other_sub"):
            fail_refresh(provider, fault)
            try:
                await client.get("/api/me")
            except UpstreamAuthError as exc:
                errors.append(exc)
        provider.revoke_grant(provider.grant_of(first.access_token))
        try:
            await client.get("/api/me")
        except UpstreamAuthError as exc:
            errors.append(exc)
    assert [type(e).__name__ for e in errors] == [
        "RefreshFailed",
        "ConfigurationError",
        "BindingMismatch",
        "ReauthenticationRequired",
    ]
    secrets.update(s for s in (first.access_token, first.refresh_token) if s)
    for logged in provider.requests:
        secrets.add(logged["form"]["refresh_token"])
    secrets.update(provider.issued_tokens)
    assert len(secrets) >= 10
    assert any(r.name == "httpx_upstream_auth" for r in caplog.records)  # the library's DEBUG lines were captured
    texts = [caplog.text]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
    for error in errors:
        texts.extend([str(error), repr(error), repr(error.args), repr(error.__context__)])
    texts.extend([repr(manager), repr(manager.auth(SESSION)), repr(refresher)])
    for text in texts:
        for secret in secrets:
            assert secret not in text


# -- sync and async together ---------------------------------------------------------------------------


@pytest.mark.parametrize("leader", ["thread", "task"])
async def test_threads_and_tasks_on_one_key_refresh_once(
    provider: LocalProvider, manager: TokenManager, server: ServerThread, leader: str
) -> None:
    """Sync threads and async tasks on the same key at once share one refresh, whichever side leads."""
    put_entry(manager, expired(provider.login()))
    provider.token_delay = 0.3
    statuses: list[int] = []

    def sync_burst() -> None:
        with httpx.Client(base_url=server.url, auth=manager.auth(SESSION), timeout=30, verify=SSL) as client:
            for _ in range(3):
                statuses.append(client.get("/api/me").status_code)

    async with async_client(server, manager) as client:

        async def one() -> None:
            statuses.append((await client.get("/api/me")).status_code)

        async with anyio.create_task_group() as tg:
            if leader == "thread":
                tg.start_soon(anyio.to_thread.run_sync, sync_burst)
                await wait_until(lambda: provider.stats["token_calls"] == 1)
                for _ in range(20):
                    tg.start_soon(one)
                await wait_until(followers_parked(manager, 20))
            else:
                tg.start_soon(one)
                await wait_until(lambda: provider.stats["token_calls"] == 1)
                for _ in range(19):
                    tg.start_soon(one)
                tg.start_soon(anyio.to_thread.run_sync, sync_burst)
                await wait_until(followers_parked(manager, 20))
    assert statuses == [200] * 23
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0
