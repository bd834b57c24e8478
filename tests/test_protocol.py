"""The refresh protocol under ordinary events: cancellation, timeouts, odd answers, logout and login,
a slow provider, an API that refuses every token. Each test names the promise it proves: a rotated
refresh token is never presented twice, nothing is lost, nothing leaks, nobody hangs.

All over real HTTP: the LocalProvider (rotation, reuse revokes the grant) under uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx
import pytest
from support import (
    PROVIDER_ID,
    SESSION,
    SSL,
    WAIT_LIMIT,
    Driver,
    ManagerFactory,
    UnnotifiedStorage,
    aput_entry,
    astored,
    expired,
    fail_refresh,
    put_entry,
    stored,
    wait_until,
)

from httpx_upstream_auth import (
    Binding,
    BindingMismatch,
    EntryKey,
    Lease,
    MemoryStorage,
    OAuth2Refresher,
    ReauthenticationRequired,
    Refresher,
    RefreshFailed,
    SQLiteStorage,
    Storage,
    StorageError,
    SystemClock,
    TokenManager,
    UpstreamAuthError,
    UpstreamTokens,
)
from httpx_upstream_auth.testing import LocalProvider, ServerThread
from httpx_upstream_auth.testing._provider import Receive, Scope, Send

pytestmark = pytest.mark.anyio


def version_of(manager: TokenManager, session: str = SESSION) -> int | None:
    """The stored entry's version, or None."""
    entry = stored(manager, session)
    return None if entry is None else entry.version


@pytest.fixture(params=["memory", "sqlite"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """Each storage that lives on this host (Redis runs the same contract in test_storage_contract)."""
    made: Storage = MemoryStorage() if request.param == "memory" else SQLiteStorage(tmp_path / "tokens.db")
    yield made
    made.close()


# -- 1. native asyncio cancellation cannot lose a rotation ---------------------------------------------

CANCELLERS: dict[str, Callable[[Callable[[], Awaitable[Any]]], Awaitable[None]]] = {}


async def _by_wait_for(call: Callable[[], Awaitable[Any]]) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call(), timeout=0.2)


async def _by_timeout(call: Callable[[], Awaitable[Any]]) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):  # type: ignore[attr-defined,unused-ignore]
            await call()


async def _by_task_cancel(call: Callable[[], Awaitable[Any]]) -> None:
    task = asyncio.ensure_future(call())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


CANCELLERS["wait_for"] = _by_wait_for
CANCELLERS["task_cancel"] = _by_task_cancel
if hasattr(asyncio, "timeout"):
    CANCELLERS["asyncio_timeout"] = _by_timeout


@pytest.mark.backends("asyncio")
@pytest.mark.parametrize("redeem_in", ["thread", "task"])
@pytest.mark.parametrize("cancel", list(CANCELLERS))
async def test_asyncio_cancellation_mid_refresh_keeps_the_rotation(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread, cancel: str, redeem_in: str
) -> None:
    """A caller cancelled by asyncio (wait_for, asyncio.timeout, Task.cancel) while the provider holds its
    answer: the rotated tokens are still saved, and the next request uses them (no reuse, no revocation)."""
    manager = make_manager(**({} if redeem_in == "thread" else {"redeem_in": redeem_in}))  # thread: the default
    entry = put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:0.6")
    await CANCELLERS[cancel](lambda: manager.aget_token(SESSION))
    await wait_until(lambda: version_of(manager) == entry.version + 1)
    async with httpx.AsyncClient(base_url=server.url, auth=manager.auth(SESSION), verify=SSL) as client:
        assert (await client.get("/api/me")).status_code == 200
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_cancelled_callers_and_waiters_share_one_redemption(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """Every caller of a herd cancelled while the provider holds the answer: one token call, the result saved,
    and the next herd served from it without another."""
    entry = put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:0.5")
    async with anyio.create_task_group() as tg:
        for _ in range(20):

            async def one() -> None:
                with anyio.move_on_after(0.1):
                    await manager.aget_token(SESSION)

            tg.start_soon(one)
    await wait_until(lambda: version_of(manager) == entry.version + 1)
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(manager.aget_token, SESSION)
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


# -- 2. logout and a new login during a refresh ------------------------------------------------------


async def test_login_during_a_refresh_is_never_overwritten(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, storage: Storage
) -> None:
    """Logout and a new login (another user) while the old login's refresh is at the provider: the old
    refresh's result never lands over the new login, and the session serves the new user."""
    manager = make_manager(storage=storage)
    await driver.store(manager, expired(provider.login(sub="alice")))
    provider.fail_next("answer_delay:0.5")
    outcome: list[object] = []

    async def old_refresh() -> None:
        try:
            outcome.append(await manager.aget_token(SESSION))
        except UpstreamAuthError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(old_refresh)
        await wait_until(lambda: provider.stats["token_calls"] == 1)
        assert await anyio.to_thread.run_sync(manager.delete, SESSION)
        bob = await driver.store(manager, provider.login(sub="bob", user_id="user-2"))
    # The old caller waited for the old redemption, whose save was refused: it got the new login or a login
    # request, never the old user's tokens.
    assert isinstance(outcome[0], ReauthenticationRequired) or getattr(outcome[0], "user_id", None) == "user-2"
    assert await astored(manager) == bob
    assert provider.stats["token_calls"] == 1
    assert (await driver.get_token(manager)).upstream_subject == "bob"


# -- 3 and 7. odd token answers never lose the rotated refresh token -----------------------------------


class RewrittenAnswers:
    """The LocalProvider with its successful token answers rewritten (as odd real providers answer)."""

    def __init__(self, provider: LocalProvider, rewrite: Callable[[dict[str, Any]], bytes]) -> None:
        self.provider = provider
        self.rewrite = rewrite

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/token":
            await self.provider(scope, receive, send)
            return
        start: dict[str, Any] = {}
        body = bytearray()

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                body.extend(message.get("body", b""))

        await self.provider(scope, receive, capture)
        data = json.loads(bytes(body))
        out = self.rewrite(data) if start["status"] == 200 and "access_token" in data else bytes(body)
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": start["status"], "headers": headers})
        await send({"type": "http.response.body", "body": out})


def _json(extra: dict[str, Any]) -> Callable[[dict[str, Any]], bytes]:
    return lambda data: json.dumps({**data, **extra}).encode()


def _raw(template: str) -> Callable[[dict[str, Any]], bytes]:
    def rewrite(data: dict[str, Any]) -> bytes:
        return template.replace("ACCESS", data["access_token"]).replace("REFRESH", data["refresh_token"]).encode()

    return rewrite


ODD_ANSWERS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "refresh_expires_in_zero": _json({"refresh_expires_in": 0}),
    "expires_in_string": _json({"expires_in": "3600.5"}),
    "scope_number": _json({"scope": 7}),
    "expires_in_infinite": _raw('{"access_token":"ACCESS","refresh_token":"REFRESH","expires_in":1e999}'),
    "refresh_expires_in_infinite": _raw(
        '{"access_token":"ACCESS","refresh_token":"REFRESH","expires_in":60,"refresh_expires_in":1e999}'
    ),
    "deeply_nested_extra": _raw(
        '{"access_token":"ACCESS","refresh_token":"REFRESH","expires_in":60,"x":' + "[" * 5000 + "]" * 5000 + "}"
    ),
}


@pytest.mark.parametrize("answer", list(ODD_ANSWERS))
async def test_odd_token_answers_keep_the_rotated_token(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, storage: Storage, answer: str
) -> None:
    """Odd but usable 200 answers are saved (numbers bounded, Keycloak's refresh_expires_in 0 meaning no
    expiry), and the next refresh presents the NEW refresh token: two refreshes, no reuse, entry kept."""
    async with ServerThread(RewrittenAnswers(provider, ODD_ANSWERS[answer])) as odd:
        refresher = OAuth2Refresher(odd.url + "/token", "test-client", "test-secret")
        manager = make_manager(storage=storage, refresher=refresher)
        entry = await aput_entry(manager, expired(provider.login()))
        first = await driver.get_token(manager)
        assert first.version == entry.version + 1 and first.refresh_token != entry.refresh_token
        for value in (first.expires_at, first.refresh_expires_at):
            assert value is None or value < entry.issued_at + 20 * 365 * 86400  # type: ignore[operator]
        await aput_entry(manager, expired(first, ago=5))
        second = await driver.get_token(manager)
        assert second.refresh_token not in (first.refresh_token, entry.refresh_token)
        assert await astored(manager) is not None
    assert provider.stats["refresh_ok"] == 2 and provider.stats["refresh_reuse"] == 0


# -- 4. a slow provider never lets a second process in --------------------------------------------------


@pytest.mark.backends("asyncio")
async def test_lease_is_renewed_while_a_sync_refresh_waits_for_a_slow_provider(
    provider: LocalProvider, make_manager: ManagerFactory, tmp_path: Path
) -> None:
    """A provider slower than the lease's ttl: the job renews its lease, so another process (another manager
    on the same SQLite file) waits for the save instead of redeeming the same refresh token."""
    path = tmp_path / "tokens.db"
    first = make_manager(storage=SQLiteStorage(path), lease_ttl=0.3, refresh_timeout=5)
    second = make_manager(storage=SQLiteStorage(path), lease_ttl=0.3, refresh_timeout=5)
    entry = await aput_entry(first, expired(provider.login()))
    provider.fail_next("answer_delay:1.2")
    got: list[UpstreamTokens] = []

    def sync_caller() -> None:
        got.append(first.get_token(SESSION))

    thread = threading.Thread(target=sync_caller)
    thread.start()
    await wait_until(lambda: provider.stats["token_calls"] == 1)
    await anyio.sleep(0.5)  # longer than the lease's ttl: without renewals it would have run out
    other = await second.aget_token(SESSION)
    await anyio.to_thread.run_sync(thread.join)
    assert got == [other] and other.version == entry.version + 1
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


class LateRenewalStorage(MemoryStorage):
    """A MemoryStorage whose first lease renewal is applied at once but answered ``late`` seconds later."""

    blocking = True  # its renewal sleeps: async callers run it in a thread, as for any blocking store

    def __init__(self, late: float) -> None:
        super().__init__()
        self.late = late
        self.renewals = 0

    def renew_lease(self, lease: Lease) -> bool | None:
        renewed = super().renew_lease(lease)
        self.renewals += 1
        if self.renewals == 1:
            time.sleep(self.late)
        return renewed

    def lease_is_live(self, key: EntryKey) -> bool:
        """True while some worker holds the key's (in-process) lease."""
        held = self._leases.get(key)
        return held is not None and held[1] > time.monotonic()


class LeaseWitness(Refresher):
    """Redeems through the real OAuth2Refresher, counting requests sent while the storage's lease had lapsed."""

    def __init__(self, inner: OAuth2Refresher, storage: LateRenewalStorage, key: EntryKey) -> None:
        self.inner, self.storage, self.key = inner, storage, key
        self.sent_without_lease = 0

    def refresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        raise NotImplementedError

    async def arefresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        self.sent_without_lease += not self.storage.lease_is_live(self.key)
        return await self.inner.arefresh(tokens, clock)


async def test_a_renewal_answered_after_the_lease_ran_out_sends_nothing_on_it(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """The renewal just before sending was applied, but its answer came back after the lease's ttl: the lease
    may have lapsed (another worker may hold it), so the job takes it again before the refresh token leaves
    (found by the simulation, seed 9364: a slow store's reply let the token leave on a lapsed lease)."""
    storage = LateRenewalStorage(late=0.4)
    key = EntryKey(PROVIDER_ID, SESSION)
    inner = OAuth2Refresher(token_url, "test-client", "test-secret")  # client_secret_basic, as make_manager's
    witness = LeaseWitness(inner, storage, key)
    manager = make_manager(storage=storage, refresher=witness, redeem_in="task", lease_ttl=0.3, refresh_timeout=5)
    entry = put_entry(manager, expired(provider.login()))
    assert (await manager.aget_token(SESSION)).version == entry.version + 1
    assert witness.sent_without_lease == 0
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


# -- 8. sync inside async ------------------------------------------------------------------------------


@pytest.mark.backends("asyncio")
async def test_blocking_call_on_the_loop_of_its_own_refresh_task_raises_at_once(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """With redeem_in="task", a blocking get_token on the event loop whose task runs the refresh raises a clear
    error at once instead of deadlocking; the refresh finishes and the next async call uses it."""
    manager = make_manager(redeem_in="task")
    entry = put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:0.3")
    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.aget_token, SESSION)
        await wait_until(lambda: provider.stats["token_calls"] == 1)
        with pytest.raises(RuntimeError, match="blocking call"):
            manager.get_token(SESSION)
    assert (await manager.aget_token(SESSION)).version == entry.version + 1
    assert provider.stats["token_calls"] == 1


@pytest.mark.backends("asyncio")
async def test_blocking_call_inside_a_running_loop_completes_with_thread_jobs(
    provider: LocalProvider, manager: TokenManager
) -> None:
    """With the default thread jobs, a blocking get_token called from async code (while a task of the same loop
    waits on the same refresh) completes: the job needs nothing from the blocked loop."""
    entry = put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:0.3")
    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.aget_token, SESSION)
        await wait_until(lambda: provider.stats["token_calls"] == 1)
        assert manager.get_token(SESSION).version == entry.version + 1
    assert provider.stats["token_calls"] == 1


# -- 11. no secret anywhere a reporter looks -----------------------------------------------------------


async def _failure_of(manager: TokenManager) -> BaseException:
    # Caught here, so the traceback holds only the library's frames and this one (no secrets of the test's).
    try:
        await manager.aget_token(SESSION)
    except UpstreamAuthError as exc:
        return exc
    raise AssertionError("the call did not fail")


async def test_no_secret_in_tracebacks_with_locals(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread
) -> None:
    """Every error a caller can get, formatted as Sentry would (traceback with frame locals, causes and
    contexts), names no access token, refresh token or client secret."""
    # No failure memory: each failure below comes from its own token request.
    manager = make_manager(failure_window=0)
    quick = make_manager(
        refresher=OAuth2Refresher(server.url + "/token", "test-client", "test-secret", timeout=0.2), failure_window=0
    )
    caught: list[BaseException] = []
    secrets = {"test-secret"}
    for fault in ("500", "invalid_client", "malformed", "id_token_other_sub", "answer_delay:1"):
        target = quick if fault.startswith("answer") else manager
        tokens = provider.login()
        secrets.update(s for s in (tokens.access_token, tokens.refresh_token) if s)
        put_entry(target, expired(tokens))
        fail_refresh(provider, fault)
        caught.append(await _failure_of(target))
    assert len(caught) == 5
    for logged in provider.requests:
        secrets.add(logged["form"]["refresh_token"])
    for exc in caught:
        text = "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())
        text += str(exc) + repr(exc)
        for secret in secrets:
            assert secret not in text


# -- 12. an API that refuses every token --------------------------------------------------------------


async def _always_401(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def test_api_refusing_every_token_costs_one_refresh(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """An API that answers 401 without a challenge to every request: the first 401 refreshes and replays once;
    the just-minted token is refused too, so later requests get their 401 without another refresh."""
    put_entry(manager, provider.login())
    async with (
        ServerThread(_always_401) as api,
        httpx.AsyncClient(base_url=api.url, auth=manager.auth(SESSION), verify=SSL) as client,
    ):
        statuses = [(await client.get("/data")).status_code for _ in range(10)]
    assert statuses == [401] * 10
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


# -- 13. a custom refresher's odd exception reaches every waiter, typed ---------------------------------


class StatusErrorRefresher(Refresher):
    """A custom refresher that fails the way a hand-written one often does: raise_for_status()."""

    def __init__(self, token_url: str) -> None:
        self.token_url = token_url
        self.calls = 0

    def _fail(self) -> UpstreamTokens:
        self.calls += 1
        request = httpx.Request("POST", self.token_url)
        raise httpx.HTTPStatusError("boom", request=request, response=httpx.Response(500, request=request))

    def refresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        with httpx.Client(verify=SSL) as client:
            client.get(self.token_url.replace("/token", "/api/slow?delay=0.2"))
        return self._fail()

    async def arefresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        async with httpx.AsyncClient(verify=SSL) as client:
            await client.get(self.token_url.replace("/token", "/api/slow?delay=0.2"))
        return self._fail()


@pytest.mark.parametrize("redeem_in", ["thread", "task"])
async def test_custom_refresher_exception_reaches_every_waiter_typed(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread, redeem_in: str
) -> None:
    """A custom refresher raising an exception that cannot be copied (httpx.HTTPStatusError): every waiter gets
    a RefreshFailed, the refresher ran once, and the entry is removed (it cannot say whether it was sent); in
    thread jobs and in task jobs alike."""
    refresher = StatusErrorRefresher(server.url + "/token")
    manager = make_manager(refresher=refresher, redeem_in=redeem_in)
    put_entry(manager, expired(provider.login()))
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await manager.aget_token(SESSION)
        except BaseException as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(one)
    assert [type(e) for e in errors] == [RefreshFailed] * 10
    assert refresher.calls == 1
    assert stored(manager) is None


# -- 16. a logout reaches every manager's cache --------------------------------------------------------


async def test_logout_in_one_manager_stops_another_serving_its_cached_token(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, storage: Storage
) -> None:
    """Two managers (workers) over one store: after a logout through one, the other no longer serves the
    token it had cached, and asks for a login."""
    first = make_manager(storage=storage)
    second = make_manager(storage=storage)
    await driver.store(first, provider.login())
    assert await driver.get_token(second)  # cached in the second worker
    assert await anyio.to_thread.run_sync(first.delete, SESSION)

    async def logged_out() -> bool:
        try:
            await driver.get_token(second)
        except ReauthenticationRequired:
            return True
        return False

    with anyio.fail_after(WAIT_LIMIT):
        while not await logged_out():
            await anyio.sleep(0.01)


# -- 17. a cold herd reads the store once --------------------------------------------------------------


class CountingStorage(MemoryStorage):
    """A MemoryStorage that counts reads, and whose async reads yield to other tasks as a network store's do."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        self.reads += 1
        return super().get(key)


async def test_cold_herd_reads_the_store_once(provider: LocalProvider, make_manager: ManagerFactory) -> None:
    """200 concurrent callers of one session on a cold cache share one storage read (the store's pool is not
    exhausted by a herd), and a fresh entry needs no refresh."""
    storage = CountingStorage()
    manager = make_manager(storage=storage)
    put_entry(manager, provider.login())
    storage.reads = 0
    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(manager.aget_token, SESSION)
    assert storage.reads == 1
    assert provider.stats["token_calls"] == 0


# -- 18. a provider blip never fails a request whose token is still valid -------------------------------


@pytest.mark.parametrize("fault", ["503", "500", "429"])
async def test_provider_blip_inside_the_leeway_serves_the_valid_token(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, fault: str
) -> None:
    """A token with 20 s left (inside the 30 s leeway): the early refresh fails with a provider error, the
    request still succeeds with the stored token, and the next requests do not hammer the provider."""
    manager = make_manager(max_leeway_fraction=1.0)
    tokens = provider.login()
    entry = put_entry(manager, attrs.evolve(tokens, expires_at=tokens.issued_at + 20))  # type: ignore[operator]
    provider.fail_next(fault)
    for _ in range(5):
        response = await driver.request(manager)
        assert response.status_code == 200
    assert provider.stats["token_calls"] == 1
    assert stored(manager) == entry


# -- a refresh job that cannot start -------------------------------------------------------------------


class _NoThreads(threading.Thread):
    def start(self) -> None:
        raise RuntimeError("can't start new thread")


async def test_a_job_that_cannot_start_fails_its_waiters_and_leaves_no_flight(
    provider: LocalProvider, manager: TokenManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When no thread can be started for the refresh (resource limits, interpreter shutdown), the caller gets a
    retryable RefreshFailed at once, and the next call, with threads back, refreshes normally."""
    entry = put_entry(manager, expired(provider.login()))
    monkeypatch.setattr(threading, "Thread", _NoThreads)
    with pytest.raises(RefreshFailed) as caught:
        await manager.aget_token(SESSION)
    assert caught.value.retryable and provider.stats["token_calls"] == 0
    monkeypatch.undo()
    assert (await manager.aget_token(SESSION)).version == entry.version + 1


# -- found by the adversarial review ---------------------------------------------------------------------


def test_task_job_whose_loop_was_closed_does_not_wedge_the_session(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """redeem_in="task", and the caller's loop closed (loop.close(), no shutdown) while its refresh was at the
    provider: later callers on other loops are not left waiting on the dead job, and the consumed refresh
    token is never presented again from this process."""
    manager = make_manager(redeem_in="task")
    put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:0.5")

    async def leave_once_the_refresh_is_at_the_provider() -> None:
        caller = asyncio.ensure_future(manager.aget_token(SESSION))
        await wait_until(lambda: provider.stats["token_calls"] == 1)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller

    loop = asyncio.new_event_loop()
    loop.run_until_complete(leave_once_the_refresh_is_at_the_provider())
    loop.close()
    with pytest.raises(ReauthenticationRequired):
        asyncio.run(asyncio.wait_for(manager.aget_token(SESSION), 10))
    with pytest.raises(ReauthenticationRequired):
        manager.get_token(SESSION)
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


def test_task_job_whose_loop_ends_fails_closed_before_it_ends(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """redeem_in="task", and the caller's asyncio.run() ended while its refresh was at the provider: the run
    cancels the job, which removes the entry (shielded, within refresh_timeout) before the loop is gone, so the
    consumed refresh token is never presented again, by this process or another."""
    manager = make_manager(redeem_in="task")
    put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:0.5")

    async def leave_once_the_refresh_is_at_the_provider() -> None:
        caller = asyncio.ensure_future(manager.aget_token(SESSION))
        await wait_until(lambda: provider.stats["token_calls"] == 1)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller

    asyncio.run(leave_once_the_refresh_is_at_the_provider())
    assert stored(manager) is None
    with pytest.raises(ReauthenticationRequired):
        manager.get_token(SESSION)
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


class FirstReadNeverEnds(MemoryStorage):
    """A MemoryStorage whose first async read waits for ever (its event loop is closed under it)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def aget(self, key: EntryKey) -> UpstreamTokens | None:
        self.reads += 1
        if self.reads == 1:
            await anyio.sleep_forever()
        return await super().aget(key)


def test_a_read_whose_loop_was_closed_does_not_hold_up_the_next_caller(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A caller's loop closed (loop.close(), no shutdown) while its storage read was in progress: a caller on
    another loop reads and refreshes for itself instead of waiting for that read, which can never end, and
    nothing is left in progress (found by the simulation, seed 33: every later call waited wait_timeout)."""
    storage = FirstReadNeverEnds()
    manager = make_manager(storage=storage, redeem_in="task", wait_timeout=2.0)
    entry = put_entry(manager, expired(provider.login()))
    loop = asyncio.new_event_loop()
    # Still referenced (as an application's task list would), so it is not collected: its clean-up never runs.
    pending = loop.create_task(manager.aget_token(SESSION))
    while storage.reads == 0:
        loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    assert asyncio.run(manager.aget_token(SESSION)).version == entry.version + 1
    footprint = manager.footprint()
    assert (footprint.reads, footprint.flights) == (0, 0)
    assert not pending.done()
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


class RegionDown(RefreshFailed):
    """A custom refresher's own RefreshFailed, built from other arguments than RefreshFailed's."""

    def __init__(self, region: str) -> None:
        super().__init__(f"the provider's {region} region is down", retryable=True)


class RegionDownRefresher(Refresher):
    """A custom refresher that fails, before sending anything, with an error of its own kind."""

    def refresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        raise RegionDown("eu-west-secret")

    async def arefresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        raise RegionDown("eu-west-secret")


@pytest.mark.parametrize("redeem_in", ["thread", "task"])
async def test_a_custom_error_that_cannot_be_copied_reaches_the_caller_typed(
    provider: LocalProvider, make_manager: ManagerFactory, redeem_in: str
) -> None:
    """A custom RefreshFailed subclass that cannot be rebuilt from a RefreshFailed's fields (each waiter gets a
    copy): the caller gets a RefreshFailed naming its type, without its text (it may hold anything), and the
    entry is kept (a RefreshFailed without may_have_rotated consumed nothing)."""
    manager = make_manager(refresher=RegionDownRefresher(), redeem_in=redeem_in)
    entry = put_entry(manager, expired(provider.login()))
    with pytest.raises(RefreshFailed) as caught:
        await manager.aget_token(SESSION)
    assert str(caught.value) == "the refresh failed with RegionDown; retry the request"
    assert type(caught.value) is RefreshFailed and stored(manager) == entry


class OddRefresher(Refresher):
    """A custom refresher that redeems the refresh token at the provider, then misbehaves."""

    def __init__(self, inner: OAuth2Refresher, behaviour: str) -> None:
        self.inner = inner
        self.behaviour = behaviour

    def _after(self, tokens: UpstreamTokens) -> Any:
        if self.behaviour == "returns_none":
            return None
        if self.behaviour == "returns_dict":
            return attrs.asdict(tokens)
        raise KeyboardInterrupt

    def refresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        return self._after(self.inner.refresh(tokens, clock))  # type: ignore[no-any-return]

    async def arefresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        return self._after(await self.inner.arefresh(tokens, clock))  # type: ignore[no-any-return]


@pytest.mark.parametrize("redeem_in", ["thread", "task"])
@pytest.mark.parametrize("behaviour", ["returns_none", "returns_dict"])
async def test_custom_refresher_returning_an_odd_object_fails_closed(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str, behaviour: str, redeem_in: str
) -> None:
    """A custom refresher that redeemed the token and returned something other than UpstreamTokens: the entry
    is removed (typed error), so no other worker presents the consumed refresh token (thread or task jobs)."""
    storage = MemoryStorage()
    odd = OddRefresher(OAuth2Refresher(token_url, "test-client", "test-secret"), behaviour)
    manager = make_manager(storage=storage, refresher=odd, redeem_in=redeem_in)
    other = make_manager(storage=storage)
    put_entry(manager, expired(provider.login()))
    with pytest.raises(RefreshFailed):
        await manager.aget_token(SESSION)
    with pytest.raises(ReauthenticationRequired):
        await other.aget_token(SESSION)
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


class MisbehavingStore(MemoryStorage):
    """A store whose saves fail in ways that are not StorageError."""

    def __init__(self, failure: str) -> None:
        super().__init__()
        self.failure = failure
        self.armed = False

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        if self.armed and self.failure == "raises":
            raise ConnectionError("the store went away")
        if self.armed and self.failure == "returns_none":
            return None  # type: ignore[return-value]
        return super().put(key, tokens, expected_version=expected_version)


@pytest.mark.parametrize("failure", ["raises", "returns_none"])
async def test_a_store_failing_oddly_during_the_save_fails_closed(
    provider: LocalProvider, make_manager: ManagerFactory, failure: str
) -> None:
    """A save of rotated tokens that fails with a non-StorageError exception, or a store that answers None:
    retried, then the entry is removed, so no worker presents the consumed refresh token again."""
    storage = MisbehavingStore(failure)
    manager = make_manager(storage=storage, refresh_timeout=1.0)
    other = make_manager(storage=storage)
    put_entry(manager, expired(provider.login()))
    storage.armed = True
    with pytest.raises(StorageError):
        await manager.aget_token(SESSION)
    storage.armed = False
    with pytest.raises(ReauthenticationRequired):
        await other.aget_token(SESSION)
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


class OwnLeaseStore(MemoryStorage):
    """A third-party store with leases of its own and no renew_lease (an optional capability)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[EntryKey, str] = {}

    def acquire_lease(self, key: EntryKey, ttl: float) -> Any:
        if key in self.held:
            return None
        lease = super().acquire_lease(key, ttl)
        assert lease is not None
        self.held[key] = lease.owner
        return lease

    def release_lease(self, lease: Any) -> None:
        self.held.pop(lease.key, None)


async def test_a_store_without_lease_renewal_still_refreshes(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A third-party store that implements acquire and release but not the optional renew_lease: the refresh
    goes through once (its lease simply lives its ttl)."""
    manager = make_manager(storage=OwnLeaseStore())
    entry = put_entry(manager, expired(provider.login()))
    assert (await manager.aget_token(SESSION)).version == entry.version + 1
    assert provider.stats["token_calls"] == 1


async def _trickle(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    for _ in range(40):
        await send({"type": "http.response.body", "body": b" ", "more_body": True})
        await anyio.sleep(0.05)
    await send({"type": "http.response.body", "body": b"{}"})


async def test_a_trickling_token_endpoint_is_bounded_by_the_refresher_timeout(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A token endpoint that answers 200 one byte at a time, each within the read timeout: the exchange is cut
    at the refresher's timeout as a whole, and since a 200 may carry rotated tokens, the entry is removed."""
    async with ServerThread(_trickle) as slow:
        refresher = OAuth2Refresher(slow.url + "/token", "test-client", "test-secret", timeout=0.5)
        manager = make_manager(refresher=refresher)
        put_entry(manager, expired(provider.login()))
        with pytest.raises(ReauthenticationRequired):
            await manager.aget_token(SESSION)
    assert stored(manager) is None


# asyncio only: under trio the early stop leaves httpcore's inner stream generators (below the ones pyproject's
# filterwarnings names) to the collector, and trio warns (reported in issue 14's coverage note, not fixed here).
@pytest.mark.backends("asyncio")
async def test_a_refresher_alone_cuts_a_trickling_answer_at_its_timeout(provider: LocalProvider) -> None:
    """OAuth2Refresher.arefresh called on its own (no manager bounding it): the trickling 200 is dropped at the
    refresher's timeout as a whole, typed as one that may have rotated the refresh token."""
    async with ServerThread(_trickle) as slow:
        refresher = OAuth2Refresher(slow.url + "/token", "test-client", "test-secret", timeout=0.5)
        with pytest.raises(RefreshFailed) as caught:
            await refresher.arefresh(provider.login(), SystemClock())
    assert "still arriving after 0.5s" in str(caught.value)
    assert caught.value.may_have_rotated is True and caught.value.status_code == 200


def _no_access_token(data: dict[str, Any]) -> bytes:
    return json.dumps({"refresh_token": data["refresh_token"], "expires_in": 60}).encode()


async def test_an_answer_without_access_token_never_hands_out_an_expired_one(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A 200 that rotates the refresh token but carries no access token: the caller does not get the old
    (expired) access token; the next flight redeems the NEW refresh token, and nothing is presented twice."""
    rewritten = {"count": 0}

    def first_only(data: dict[str, Any]) -> bytes:
        rewritten["count"] += 1
        return _no_access_token(data) if rewritten["count"] == 1 else json.dumps(data).encode()

    async with ServerThread(RewrittenAnswers(provider, first_only)) as odd:
        manager = make_manager(refresher=OAuth2Refresher(odd.url + "/token", "test-client", "test-secret"))
        entry = put_entry(manager, expired(provider.login()))
        tokens = await manager.aget_token(SESSION)
    assert tokens.expires_at is not None and tokens.expires_at > (entry.expires_at or 0) + 30
    assert provider.stats["refresh_ok"] == 2 and provider.stats["refresh_reuse"] == 0


async def test_binding_is_checked_before_a_refresh_on_a_401(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread
) -> None:
    """A request for alice gets a 401 after the session was handed to bob: BindingMismatch is raised before
    any token request (bob's grant is not refreshed on alice's behalf)."""
    manager = make_manager(storage=UnnotifiedStorage())
    await manager.astore(SESSION, provider.login(sub="alice"))
    auth = manager.auth(SESSION, expect=Binding(upstream_subject="alice"))
    flow = auth.async_auth_flow(httpx.Request("GET", server.url + "/api/me"))
    request = await flow.__anext__()
    put_entry(manager, expired(provider.login(sub="bob")))
    with pytest.raises(BindingMismatch):
        await flow.asend(httpx.Response(401, request=request))
    assert provider.stats["token_calls"] == 0


class AsyncOnlyRefresher(OAuth2Refresher):
    """A refresher written for async code only."""

    def refresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        raise NotImplementedError


class SyncOnlyRefresher(OAuth2Refresher):
    """A refresher written for sync code only."""

    async def arefresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        raise NotImplementedError


async def test_a_sync_only_refresher_in_task_jobs_sends_nothing_and_keeps_the_entry(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """A refresher whose arefresh() is not implemented, with redeem_in="task": a typed error naming the missing
    half and the redeem_in that fits it, nothing sent, the entry kept; with the default thread jobs it refreshes."""
    refresher = SyncOnlyRefresher(token_url, "test-client", "test-secret")
    tasks = make_manager(refresher=refresher, redeem_in="task")
    entry = put_entry(tasks, expired(provider.login()))
    with pytest.raises(
        RefreshFailed, match=r"does not implement arefresh\(\) for task jobs.*redeem_in='thread'"
    ) as caught:
        await tasks.aget_token(SESSION)
    assert caught.value.retryable is False
    assert stored(tasks) == entry and provider.stats["token_calls"] == 0
    threads = make_manager(refresher=refresher, storage=tasks.storage)
    assert (await threads.aget_token(SESSION)).refresh_token != entry.refresh_token


async def test_an_async_only_refresher_in_thread_jobs_sends_nothing_and_keeps_the_entry(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """A refresher whose sync refresh() is not implemented, with the default thread jobs: a typed error that
    says what to do, nothing sent, the entry kept; with redeem_in="task" it refreshes."""
    entry = put_entry(make_manager(), expired(provider.login()))
    refresher = AsyncOnlyRefresher(token_url, "test-client", "test-secret")
    threads = make_manager(refresher=refresher)
    put_entry(threads, entry)
    with pytest.raises(RefreshFailed, match="redeem_in"):
        await threads.aget_token(SESSION)
    assert stored(threads) is not None and provider.stats["token_calls"] == 0
    tasks = make_manager(refresher=refresher, storage=threads.storage, redeem_in="task")
    assert (await tasks.aget_token(SESSION)).refresh_token != entry.refresh_token
