"""A deployment's life: heavy traffic over many sessions, fork, shutdown mid-refresh, hung refreshers,
blips that end, redirects, answers from gateways, managers made and dropped.

Over real HTTP: the LocalProvider (rotation; presenting a consumed refresh token revokes the grant)
under uvicorn on 127.0.0.1, and small ASGI APIs for the resource-server side. Every assertion is a
count or a state; waits are bounded against hangs, never timed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx
import pytest
from support import (
    SESSION,
    SSL,
    WAIT_LIMIT,
    Driver,
    FakeClock,
    FlakyStorage,
    ManagerFactory,
    ScriptedAPI,
    aput_entry,
    assert_fails_closed,
    astored,
    expired,
    fail_refresh,
    put_entry,
    stored,
    wait_until,
)

import httpx_upstream_auth._core as state_module
import httpx_upstream_auth._storages._shared as shared_module
from httpx_upstream_auth import (
    EntryKey,
    MemoryStorage,
    OAuth2Refresher,
    ReauthenticationRequired,
    Refresher,
    RefreshFailed,
    SQLiteStorage,
    Storage,
    StorageError,
    TokenManager,
    UpstreamAuthError,
    UpstreamTokens,
)
from httpx_upstream_auth.testing import LocalProvider, ServerThread
from httpx_upstream_auth.testing._provider import Receive, Scope, Send

pytestmark = pytest.mark.anyio


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    """A token file shared by the 'processes' of a test (one SQLiteStorage object each)."""
    return tmp_path / "tokens.db"


async def _reauth_required(driver: Driver, manager: TokenManager, session: str = SESSION) -> bool:
    try:
        await driver.get_token(manager, session)
    except ReauthenticationRequired:
        return True
    return False


# -- 1. a logout elsewhere is honoured after heavy traffic over other sessions -------------------------


@pytest.mark.parametrize("event", ["logout", "login"])
async def test_change_elsewhere_is_honoured_after_many_other_sessions(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, sqlite_path: Path, event: str
) -> None:
    """A worker keeps a session cached while it sees many times cache_size other session ids (random
    cookies that have no entry): another worker's logout, or a login of another user, still reaches it."""
    here = make_manager(storage=SQLiteStorage(sqlite_path), cache_size=4)
    there = make_manager(storage=SQLiteStorage(sqlite_path), cache_size=4)
    first = await driver.store(there, provider.login(sub="alice", user_id="u-alice"))
    assert (await driver.get_token(here)).access_token == first.access_token  # cached here
    for n in range(40):
        with pytest.raises(ReauthenticationRequired):
            await driver.get_token(here, f"cookie-{n}")
    if event == "logout":
        assert await anyio.to_thread.run_sync(there.delete, SESSION)
        with anyio.fail_after(WAIT_LIMIT):
            while not await _reauth_required(driver, here):
                await anyio.sleep(0.01)
    else:
        second = await driver.store(there, provider.login(sub="bob", user_id="u-bob"))
        with anyio.fail_after(WAIT_LIMIT):
            while (await driver.get_token(here)).user_id != "u-bob":
                await anyio.sleep(0.01)
        assert (await driver.get_token(here)).access_token == second.access_token
    footprint = here.footprint()
    assert footprint.cached <= 4 and footprint.epochs <= 8 and footprint.digests <= 8


# -- 3. fork while a refresh job runs --------------------------------------------------------------


def _in_child(run: Any) -> str:
    """Run ``run()`` in a forked child; return what it printed to the pipe (its result or its error)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            message = str(run())
        except BaseException as exc:
            message = f"error: {type(exc).__name__}: {exc}"
        os.write(write, message.encode()[:4000])
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 4096):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_while_a_refresh_job_runs_leaves_the_child_a_working_manager(
    provider: LocalProvider, make_manager: ManagerFactory, sqlite_path: Path
) -> None:
    """The parent's refresh job is at the provider when the process forks: the child has no copy of that
    flight to wait on forever; it refreshes (or reads the parent's result) on its own."""
    manager = make_manager(storage=SQLiteStorage(sqlite_path), wait_timeout=30)
    put_entry(manager, expired(provider.login()))
    provider.fail_next("delay:0.5")
    caller = threading.Thread(target=manager.get_token, args=(SESSION,))
    caller.start()
    with anyio.from_thread.start_blocking_portal() as portal:
        portal.call(wait_until, lambda: provider.stats["token_calls"] == 1)
    assert manager.footprint().flights == 1

    def child() -> str:
        tokens = manager.get_token(SESSION)
        return "ok" if manager.footprint().flights == 0 and tokens.version > 1 else "bad"

    assert _in_child(child) == "ok"
    caller.join()
    assert provider.stats["refresh_reuse"] == 0


def _plain_manager(token_url: str, storage: Storage) -> TokenManager:
    """A manager with the default settings, as an app builds it (the test closes it)."""
    return TokenManager(
        provider_id="local", storage=storage, refresher=OAuth2Refresher(token_url, "test-client", "test-secret")
    )


async def _refresh_at_the_provider(manager: TokenManager, provider: LocalProvider, fault: str) -> threading.Thread:
    """Start a blocking get_token in a thread, with ``fault`` on its token request; return once the request
    has reached the provider."""
    provider.fail_next(fault)
    caller = threading.Thread(target=manager.get_token, args=(SESSION,))
    caller.start()
    await wait_until(lambda: provider.stats["token_calls"] == 1)
    return caller


# -- 4. close() and aclose() during a refresh job ----------------------------------------------------


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_close_during_a_refresh_waits_for_the_job_to_save(
    provider: LocalProvider, token_url: str, sqlite_path: Path, how: str
) -> None:
    """An app shuts down while the provider is redeeming (it consumed the refresh token and answers
    late): close waits for the job, which saves the rotation; the next worker refreshes with it."""
    manager = _plain_manager(token_url, SQLiteStorage(sqlite_path))
    first = await aput_entry(manager, expired(provider.login()))
    caller = await _refresh_at_the_provider(manager, provider, "answer_delay:0.5")
    if how == "close":
        await anyio.to_thread.run_sync(manager.close)
    else:
        await manager.aclose()

    def the_next_worker() -> None:
        caller.join()
        later = _plain_manager(token_url, SQLiteStorage(sqlite_path))
        try:
            saved = stored(later)
            assert saved is not None and saved.version == first.version + 1
            later.get_token(SESSION)
            with pytest.raises(UpstreamAuthError):  # a closed manager reads and refreshes nothing (typed)
                manager.get_token(SESSION + "-other")
        finally:
            later.close()

    await anyio.to_thread.run_sync(the_next_worker)
    assert provider.stats["refresh_reuse"] == 0 and provider.stats["refresh_ok"] == 1


async def test_a_closed_manager_starts_no_refresh(provider: LocalProvider, make_manager: ManagerFactory) -> None:
    """After aclose(), a manager still reads (its storage is another open manager's too) but starts no refresh:
    a typed error that says so, nothing sent, and the entry left for the open manager to refresh."""
    storage = MemoryStorage()
    still_open = make_manager(storage=storage)
    manager = make_manager(storage=storage)
    entry = await aput_entry(manager, expired(provider.login()))
    await manager.aclose()
    with pytest.raises(RefreshFailed, match="the TokenManager is closed, so no refresh starts") as caught:
        await manager.aget_token(SESSION)
    assert caught.value.retryable is False and provider.stats["token_calls"] == 0
    assert (await still_open.aget_token(SESSION)).version == entry.version + 1


# -- 5. refresh_timeout bounds a thread job whose refresher hangs -----------------------------------


class HangingRefresher(Refresher):
    """A custom refresher that hangs after its request may have left, until the test releases it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def refresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        self.calls += 1
        self.release.wait()
        raise RefreshFailed("released", retryable=True)

    async def arefresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        self.calls += 1
        await anyio.sleep(3600)
        raise AssertionError("unreachable")


@pytest.mark.parametrize("redeem_in", ["thread", "task"])
async def test_a_hung_refresher_is_bounded_by_refresh_timeout(
    provider: LocalProvider, make_manager: ManagerFactory, redeem_in: str
) -> None:
    """A refresher that never returns: after refresh_timeout the job fails closed (the entry is removed, as
    after a lost answer), its flight ends and its lease is released; the session is not wedged."""
    refresher = HangingRefresher()
    storage = MemoryStorage()
    manager = make_manager(refresher=refresher, storage=storage, refresh_timeout=0.3, redeem_in=redeem_in)
    put_entry(manager, expired(provider.login()))
    try:
        with anyio.fail_after(WAIT_LIMIT), pytest.raises(ReauthenticationRequired):
            await manager.aget_token(SESSION)
        assert stored(manager) is None
        assert manager.footprint().flights == 0
        lease = storage.acquire_lease(EntryKey(manager.provider_id, SESSION), 5)
        assert lease is not None  # released by the job, not left to expire
        assert refresher.calls == 1
    finally:
        refresher.release.set()


# -- 6. every import is a declared dependency --------------------------------------------------------


def test_task_jobs_work_without_sniffio(token_url: str, provider: LocalProvider, tmp_path: Path) -> None:
    """sniffio is not a dependency (recent anyio and httpx do not bring it): a task-job refresh works
    in an interpreter where it cannot be imported."""
    script = tmp_path / "no_sniffio.py"
    tokens = expired(provider.login())
    script.write_text(
        "import sys\n"
        "sys.modules['sniffio'] = None\n"
        "import asyncio, json\n"
        "import httpx_upstream_auth as hua\n"
        f"tokens = hua.UpstreamTokens.from_json({tokens.to_json()!r})\n"
        "m = hua.TokenManager(provider_id='local', redeem_in='task',\n"
        f"    refresher=hua.OAuth2Refresher({token_url!r}, 'test-client', 'test-secret'))\n"
        "m.store('s', tokens)\n"
        "print(asyncio.run(m.aget_token('s')).version > tokens.version)\n"
    )
    import subprocess

    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.stdout.strip() == "True", done.stderr[-2000:]


# -- 7. one refresher, two kinds of job ---------------------------------------------------------------


def test_a_refresher_is_refused_for_a_job_kind_it_cannot_serve_as_configured() -> None:
    """Given only an async client, a refresher cannot redeem in a worker thread without bypassing its
    settings (proxy, TLS): the manager says so at construction. Likewise a sync client in task jobs."""
    async_only = OAuth2Refresher("https://as.example/token", "c", "s", async_client=httpx.AsyncClient())
    with pytest.raises(ValueError, match="redeem_in='task'"):
        TokenManager(provider_id="p", refresher=async_only)
    TokenManager(provider_id="p", refresher=async_only, redeem_in="task").close()
    sync_only = OAuth2Refresher("https://as.example/token", "c", "s", client=httpx.Client())
    with pytest.raises(ValueError, match="redeem_in='thread'"):
        TokenManager(provider_id="p", refresher=sync_only, redeem_in="task")


class _ForwardProxy:
    """A plain-HTTP forward proxy on 127.0.0.1 that answers every token request itself (and counts them)."""

    def __init__(self, provider: LocalProvider) -> None:
        self.provider = provider
        self.requests: list[str] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                self.requests.append(data.split(b"\r\n", 1)[0].decode())
                body = b'{"access_token":"via-proxy","token_type":"Bearer","expires_in":3600}'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
        self._sock.close()
        self._thread.join(timeout=5)


@pytest.mark.parametrize("redeem_in", ["thread", "task"])
async def test_refresher_settings_are_honoured_by_both_kinds_of_job(
    provider: LocalProvider, make_manager: ManagerFactory, redeem_in: str
) -> None:
    """``proxy=`` given once reaches the token request whichever kind of job redeems."""
    proxy = _ForwardProxy(provider)
    try:
        refresher = OAuth2Refresher(
            "http://127.0.0.1:9/token", "test-client", "test-secret", proxy=proxy.url, trust_env=False
        )
        manager = make_manager(refresher=refresher, redeem_in=redeem_in)
        put_entry(manager, expired(provider.login()))
        tokens = await manager.aget_token(SESSION)
        assert tokens.access_token == "via-proxy"
        assert proxy.requests == ["POST http://127.0.0.1:9/token HTTP/1.1"]
    finally:
        proxy.close()


# -- 8. a distrust ends when the API accepts the token -------------------------------------------------


async def test_a_distrust_ends_when_the_api_accepts_the_token(provider: LocalProvider, manager: TokenManager) -> None:
    """A 401 on the replay right after a refresh was a blip: once the API accepts that token, a later real
    revocation refreshes again instead of returning 401s until the token expires."""
    put_entry(manager, provider.login())
    api = ScriptedAPI([401, 401, 200, 401, 200])
    async with (
        ServerThread(api) as served,
        httpx.AsyncClient(base_url=served.url, auth=manager.auth(SESSION), verify=SSL) as client,
    ):
        statuses = [(await client.get("/data")).status_code for _ in range(3)]
    assert statuses == [401, 200, 200]
    assert provider.stats["token_calls"] == 2 and provider.stats["refresh_reuse"] == 0


# -- 9. a 401 from another origin after a redirect is not about our token ------------------------------


class Redirect:
    """An API that redirects every request to another origin."""

    def __init__(self, to: str) -> None:
        self.to = to

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"location", self.to.encode()), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 302, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


async def test_a_401_after_a_redirect_to_another_origin_refreshes_nothing(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """The client drops our token on a hop to another origin; that origin's 401 says nothing about it:
    no refresh, no replay, no distrust (the next request to our API still refreshes on a real 401)."""
    put_entry(manager, provider.login())
    elsewhere = ScriptedAPI([401] * 5)
    async with ServerThread(elsewhere) as other, ServerThread(Redirect(other.url + "/landing")) as api:
        response = await Driver(driver.mode, api.url).request(manager, path="/data", follow_redirects=True)
    assert response.status_code == 401
    assert elsewhere.seen == [None]
    assert provider.stats["token_calls"] == 0


class RejectThenRedirect(ScriptedAPI):
    """A ScriptedAPI whose second request (the replay after its first 401) is redirected to ``to``."""

    def __init__(self, statuses: list[int], to: str) -> None:
        super().__init__(statuses)
        self.to = to

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(self.seen) == 1:
            self.seen.append(dict(scope["headers"]).get(b"authorization", b"").decode())
            await Redirect(self.to)(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def test_a_401_after_the_replay_is_redirected_to_another_origin_distrusts_nothing(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """Our API refuses the token, the replay with the refreshed one is redirected to another origin, which
    answers 401 to a request without our token: the caller gets that 401, and the refreshed token is not
    distrusted (a later real 401 from our API refreshes and replays again)."""
    put_entry(manager, provider.login())
    elsewhere = ScriptedAPI([401] * 5)
    async with ServerThread(elsewhere) as other:
        api = RejectThenRedirect([401, 401, 200], other.url + "/landing")
        async with ServerThread(api) as served:
            through = Driver(driver.mode, served.url)
            assert (await through.request(manager, path="/data", follow_redirects=True)).status_code == 401
            assert elsewhere.seen == [None] and provider.stats["token_calls"] == 1
            assert (await through.request(manager, path="/data", follow_redirects=True)).status_code == 200
    assert provider.stats["token_calls"] == 2 and provider.stats["refresh_reuse"] == 0
    assert len(set(api.seen)) == 3  # the first token, the refreshed one (twice), the next one


# -- 10. a lost answer is remembered however many refreshes succeed after it ---------------------------


class DeleteFailsStorage(FlakyStorage):
    """A FlakyStorage whose deletes fail too while ``fail_delete`` is set."""

    fail_delete = False

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        if self.fail_delete:
            raise StorageError("the store is down")
        return super().delete(key, expected_version=expected_version)


async def test_a_lost_answer_outlives_many_successful_rotations(
    provider: LocalProvider, token_url: str, make_manager: ManagerFactory
) -> None:
    """An answer lost while the store was down (the fail-closed delete could not land) is remembered
    beyond any number of ordinary refreshes (they leave nothing in the memory of presented tokens, so none
    can push it out): the consumed token is never presented again."""
    storage = DeleteFailsStorage()
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret", timeout=1.0)
    manager = make_manager(storage=storage, refresher=refresher, refresh_timeout=1.5)
    put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:3")
    storage.fail_delete = True
    with pytest.raises(ReauthenticationRequired):
        await manager.aget_token(SESSION)
    storage.fail_delete = False
    assert stored(manager) is not None  # the delete could not land
    for n in range(6):
        put_entry(manager, expired(provider.login()), session=f"other-{n}")
        await manager.aget_token(f"other-{n}")
    assert manager.footprint().consumed == 1
    with pytest.raises(ReauthenticationRequired):
        await manager.aget_token(SESSION)
    assert stored(manager) is None  # removed now that the store is back
    assert manager.footprint().consumed == 0
    assert provider.stats["refresh_reuse"] == 0 and provider.stats["refresh_ok"] == 7


# -- 11. "expires_in": 0 --------------------------------------------------------------------------------


async def test_an_answer_with_expires_in_zero_costs_one_refresh(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """A provider stating a zero lifetime: the token counts as of unknown lifetime (used until the API
    refuses it), not as born expired and refreshed again at once."""
    put_entry(manager, expired(provider.login()))
    provider.fail_next("expires_in:0")
    tokens = await driver.get_token(manager)
    assert tokens.expires_at is None
    assert (await driver.request(manager)).status_code == 200
    assert provider.stats["token_calls"] == 1


# -- answers that may follow a redemption ---------------------------------------------------------------


@pytest.mark.parametrize("status", ["502", "504"])
async def test_a_gateway_error_after_redeeming_fails_closed(
    driver: Driver, provider: LocalProvider, manager: TokenManager, status: str
) -> None:
    """A gateway in front of the provider answers 502/504 (HTML) after the provider rotated: the consumed
    refresh token is never presented again (the entry is removed), so the grant is not revoked."""
    put_entry(manager, expired(provider.login()))
    provider.fail_next(f"redeem_then:{status}")
    await assert_fails_closed(driver, manager, provider)


async def test_an_oauth_error_from_the_provider_changes_nothing(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """The provider's own error answer (JSON with an OAuth error code) proves nothing was consumed."""
    manager = make_manager(failure_window=0)  # the next call tries again at once
    first = put_entry(manager, expired(provider.login()))
    fail_refresh(provider, "503")
    with pytest.raises(RefreshFailed):
        await driver.get_token(manager)
    assert stored(manager) == first
    assert (await driver.get_token(manager)).version == first.version + 1
    assert provider.stats["refresh_reuse"] == 0


# -- 12. bounded state ------------------------------------------------------------------------------------


async def test_backoff_and_distrust_end_with_a_logout(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """The back-off after a harmless early-refresh failure is forgotten by a logout."""
    manager = make_manager(leeway=30, max_leeway_fraction=0.5)
    login = provider.login(access_ttl=20)
    assert login.expires_at is not None
    tokens = put_entry(manager, attrs.evolve(login, issued_at=login.expires_at - 60))  # inside the leeway
    provider.fail_next("503")
    assert (await driver.get_token(manager)).access_token == tokens.access_token  # served through the blip
    assert manager.footprint().backing_off == 1
    await anyio.to_thread.run_sync(manager.delete, SESSION)
    assert manager.footprint().backing_off == 0


class CountingNotices(MemoryStorage):
    """A MemoryStorage that counts change callbacks run (one per subscribed manager per write)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def subscribe(self, callback: Any) -> Any:
        def counted(digest: str | None) -> None:
            self.calls += 1
            callback(digest)

        return super().subscribe(counted)


def test_managers_dropped_without_close_are_freed(provider: LocalProvider, token_url: str) -> None:
    """Per-tenant managers made and dropped over one long-lived storage: the storage's change notices
    hold none of them (the first notice after they are gone removes their subscriptions), so a write costs
    one callback per live manager, not per manager ever made."""
    storage = CountingNotices()

    def manager() -> TokenManager:
        return _plain_manager(token_url, storage)

    for n in range(200):
        manager().store(f"tenant-{n}", provider.login())
    gc.collect()
    alive, other = manager(), manager()
    try:
        alive.get_token("tenant-0")
        other.store("tenant-1", provider.login())  # the first notice: the dropped managers' subscriptions go
        storage.calls = 0
        other.delete("tenant-0")
        assert storage.calls == 2  # the two live managers, nothing else
        with pytest.raises(ReauthenticationRequired):
            alive.get_token("tenant-0")
    finally:
        alive.close()
        other.close()


async def test_save_retries_end_with_the_job_whatever_the_store_does(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """The store refuses every write after a rotation: the job retries within refresh_timeout, then fails
    closed and ends (its lease lapses, its flight is gone); it does not retry past the lease's renewals."""
    storage = DeleteFailsStorage()
    manager = make_manager(storage=storage, refresh_timeout=1.0, wait_timeout=10)
    put_entry(manager, expired(provider.login()))
    storage.fail_put = storage.fail_delete = True
    with pytest.raises(StorageError):
        await manager.aget_token(SESSION)
    assert manager.footprint().flights == 0
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_backoff_table_is_bounded_by_cache_size(provider: LocalProvider, make_manager: ManagerFactory) -> None:
    """Many sessions whose early refresh hit a provider blip: the back-off table keeps at most cache_size of
    them (forgetting one costs one early retry, never a request)."""
    manager = make_manager(leeway=30, max_leeway_fraction=0.5, cache_size=4)
    for n in range(12):
        login = provider.login(access_ttl=20)
        assert login.expires_at is not None
        put_entry(manager, attrs.evolve(login, issued_at=login.expires_at - 60), session=f"s-{n}")
        provider.fail_next("503")
        assert (await manager.aget_token(f"s-{n}")).access_token == login.access_token
    assert 1 <= manager.footprint().backing_off <= 4


@pytest.mark.parametrize("how", ["close", "aclose"])
async def test_close_under_a_job_that_outlives_its_wait_leaves_the_store_to_the_job(
    provider: LocalProvider, token_url: str, sqlite_path: Path, how: str
) -> None:
    """close(timeout=...) returns before a slow job ends: the storage stays open for the job, which saves the
    rotation and then closes it."""
    manager = _plain_manager(token_url, SQLiteStorage(sqlite_path))
    first = await aput_entry(manager, expired(provider.login()))
    caller = await _refresh_at_the_provider(manager, provider, "answer_delay:0.8")
    if how == "close":
        await anyio.to_thread.run_sync(lambda: manager.close(timeout=0.01))
    else:
        await manager.aclose(timeout=0.01)
    assert manager.footprint().flights == 1  # close returned; the job goes on
    await anyio.to_thread.run_sync(caller.join)
    await wait_until(lambda: manager.footprint().flights == 0)

    def read_as_another_process() -> UpstreamTokens | None:
        other = SQLiteStorage(sqlite_path)
        try:
            return other.get(EntryKey("local", SESSION))
        finally:
            other.close()

    saved = await anyio.to_thread.run_sync(read_as_another_process)
    assert saved is not None and saved.version == first.version + 1
    assert provider.stats["refresh_reuse"] == 0


class SlowDeleteStorage(MemoryStorage):
    """A MemoryStorage whose delete waits, once armed, until the test lets it go, and whose change notices
    come late (never, here), as a shared store's change feed does."""

    def notify_change(self, key: EntryKey | None) -> None:
        return None

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.go = threading.Event()

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        if self.armed:
            self.entered.set()
            self.go.wait(WAIT_LIMIT)
        return super().delete(key, expected_version=expected_version)


def test_a_read_racing_a_logout_does_not_cache_the_deleted_entry(provider: LocalProvider, token_url: str) -> None:
    """A read that starts during a logout (after it began, before the store removed the entry) finds the
    entry still there; once the logout returns, that read's result is not served from the cache."""
    storage = SlowDeleteStorage()
    manager = _plain_manager(token_url, storage)
    try:
        put_entry(manager, provider.login())
        storage.armed = True
        logout = threading.Thread(target=manager.delete, args=(SESSION,))
        logout.start()
        assert storage.entered.wait(WAIT_LIMIT)
        assert manager.get_token(SESSION).user_id == "user-1"  # read while the delete is under way
        storage.go.set()
        logout.join()
        with pytest.raises(ReauthenticationRequired):
            manager.get_token(SESSION)
    finally:
        storage.go.set()
        manager.close()


def test_a_store_that_hangs_after_the_token_request_cannot_keep_the_interpreter_alive(
    token_url: str, provider: LocalProvider, tmp_path: Path
) -> None:
    """A custom store whose writes never return, met by a thread job after the provider rotated: the job
    gives up on each write after refresh_timeout (it fails closed as far as it can), the caller gets a typed
    error, and the process exits."""
    script = tmp_path / "hung_store.py"
    tokens, warm = expired(provider.login()), expired(provider.login())
    script.write_text(
        "import threading\n"
        "import httpx_upstream_auth as hua\n"
        "class Hung(hua.MemoryStorage):\n"
        "    hang = False\n"
        "    def put(self, key, tokens, *, expected_version):\n"
        "        if self.hang:\n"
        "            threading.Event().wait()\n"
        "        return super().put(key, tokens, expected_version=expected_version)\n"
        "    delete = lambda self, key, *, expected_version=None: threading.Event().wait()\n"
        "store = Hung()\n"
        "m = hua.TokenManager(provider_id='local', storage=store, refresh_timeout=1.5, lease_ttl=0.5,\n"
        "    wait_timeout=30,\n"
        f"    refresher=hua.OAuth2Refresher({token_url!r}, 'test-client', 'test-secret'))\n"
        f"m.store('s', hua.UpstreamTokens.from_json({tokens.to_json()!r}))\n"
        f"m.store('warm', hua.UpstreamTokens.from_json({warm.to_json()!r}))\n"
        "m.get_token('warm')\n"  # imports done and a connection open: the refresh below answers within its bound
        "store.hang = True\n"
        "try:\n"
        "    m.get_token('s')\n"
        "except hua.UpstreamAuthError as exc:\n"
        "    print(type(exc).__name__)\n"
        "m.close(timeout=1)\n"
    )
    import subprocess

    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "StorageError"
    assert provider.stats["refresh_ok"] == 2  # the warm-up's and the one whose save hung


# -- the lifecycle review's findings ----------------------------------------------------------------------


def refuse_thread_starts(provider: LocalProvider, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From the moment the provider has received a token request, this process cannot start any thread of
    the library's (as at its thread or pid limit, or in an interpreter that is exiting); returns the names of
    the threads refused."""
    refused: list[str] = []
    start = threading.Thread.start

    def guarded(thread: threading.Thread) -> None:
        if thread.name.startswith("httpx-upstream-auth") and provider.stats["token_calls"] >= 1:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", guarded)
    return refused


async def test_thread_starts_refused_after_the_token_request_lose_nothing(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the token request has reached the provider, the process cannot start threads any more: the thread
    job still saves the rotated tokens, since nothing it does after the request needs a new thread."""
    manager = make_manager(wait_timeout=WAIT_LIMIT)
    first = put_entry(manager, expired(provider.login()))
    refused = refuse_thread_starts(provider, monkeypatch)
    tokens = await driver.get_token(manager)
    monkeypatch.undo()
    assert tokens.version == first.version + 1 and stored(manager) == tokens
    assert refused == [] and provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


class StallingStorage(MemoryStorage):
    """A store over a network client without timeouts (blocking, as third-party stores are) that stops
    answering once ``stall()`` is called, until the test releases it: every call, or the first call of
    each name in ``only``."""

    blocking = True

    def __init__(self, only: set[str] | None = None) -> None:
        super().__init__()
        self.stalled = False
        self.only = only
        self.release = threading.Event()
        self.hung = 0  # calls stalled now
        self._count = threading.Lock()

    def stall(self) -> None:
        self.stalled = True

    def _maybe_stall(self, name: str) -> None:
        if not self.stalled or self.release.is_set():
            return
        if self.only is not None:
            if name not in self.only:
                return
            self.only.discard(name)
        with self._count:
            self.hung += 1
        try:
            self.release.wait(WAIT_LIMIT)
        finally:
            with self._count:
                self.hung -= 1

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        self._maybe_stall("get")
        return super().get(key)

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        self._maybe_stall("put")
        return super().put(key, tokens, expected_version=expected_version)

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        self._maybe_stall("delete")
        return super().delete(key, expected_version=expected_version)

    def acquire_lease(self, key: EntryKey, ttl: float) -> Any:
        self._maybe_stall("acquire_lease")
        return super().acquire_lease(key, ttl)

    def renew_lease(self, lease: Any) -> bool | None:
        self._maybe_stall("renew_lease")
        return super().renew_lease(lease)

    def release_lease(self, lease: Any) -> None:
        self._maybe_stall("release_lease")
        super().release_lease(lease)


class StallAfterAnswer(OAuth2Refresher):
    """An OAuth2Refresher after whose answer (or refusal) ``storage`` stops answering."""

    storage: StallingStorage

    def refresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        try:
            return super().refresh(tokens, clock)
        finally:
            self.storage.stall()

    async def arefresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        try:
            return await super().arefresh(tokens, clock)
        finally:
            self.storage.stall()


async def test_a_hung_save_when_no_thread_can_start_still_fails_closed(
    provider: LocalProvider, token_url: str, make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The save after the token request hangs (left behind on the job's store worker) and no thread can be
    started to replace that worker: the job's own thread makes the next calls, so the consumed entry is
    removed (and the caller is told so) rather than kept for another worker to present."""
    storage = StallingStorage(only={"put"})
    refresher = StallAfterAnswer(token_url, "test-client", "test-secret")
    refresher.storage = storage
    # refresh_timeout bounds the token request too: a second, as a loaded machine's loopback round trip needs
    # (0.3 s timed the request out at load 30); the hang itself is the test's gate, not a clock.
    manager = make_manager(
        storage=storage, refresher=refresher, refresh_timeout=1.0, lease_ttl=1.0, wait_timeout=WAIT_LIMIT
    )
    put_entry(manager, expired(provider.login()))
    refused = refuse_thread_starts(provider, monkeypatch)
    try:
        with pytest.raises(StorageError, match="the entry was removed"):
            await manager.aget_token(SESSION)
        assert stored(manager) is None and storage.hung == 1
        assert refused and set(refused) == {"httpx-upstream-auth-store"}
    finally:
        monkeypatch.undo()
        storage.release.set()
        await wait_until(lambda: storage.hung == 0)
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


@pytest.mark.slow  # each store call after the answer is given up only after its bound: 7 to 13 s a case
@pytest.mark.parametrize(
    ("redeem_in", "answer"), [("thread", "rotated"), ("task", "rotated"), ("thread", "invalid_grant")]
)
async def test_a_store_that_stops_answering_after_the_token_request_cannot_hold_the_job(
    provider: LocalProvider, token_url: str, make_manager: ManagerFactory, redeem_in: str, answer: str
) -> None:
    """Every storage call after the token request hangs (the save, the read after a failed save or after
    invalid_grant, the fail-closed delete, the lease renewals and release): each is given up after its
    bound, the caller gets a typed error, and the job ends while the store still hangs (a task job too,
    though the store's calls run in threads that cannot be cancelled)."""
    storage = StallingStorage()
    refresher = StallAfterAnswer(token_url, "test-client", "test-secret")
    refresher.storage = storage
    # A lease of a second: the renewal just before sending must come back within the ttl, which a 0.3-s lease
    # missed on a machine loaded twenty-fold (no request was sent at all). refresh_timeout bounds the token
    # request too: 0.3 s timed it out at load 30, so a second as well.
    manager = make_manager(
        storage=storage,
        refresher=refresher,
        refresh_timeout=1.0,
        lease_ttl=1.0,
        wait_timeout=WAIT_LIMIT,
        redeem_in=redeem_in,
    )
    login = provider.login()
    put_entry(manager, expired(login))
    if answer == "invalid_grant":
        provider.revoke_grant(provider.grant_of(login.access_token))
    try:
        with pytest.raises(UpstreamAuthError):
            await manager.aget_token(SESSION)
        assert manager.footprint().flights == 0
        assert storage.hung > 0  # the store still hangs: the job gave up on it
    finally:
        storage.release.set()
        await wait_until(lambda: storage.hung == 0)
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


class SdkRefresher(OAuth2Refresher):
    """A refresher whose async half runs its blocking half through anyio.to_thread.run_sync (not abandoned on
    cancel: the usual way to call a blocking SDK), and whose SDK blocks after the provider answered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.returned = threading.Event()

    def refresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        try:
            answer = super().refresh(tokens, clock)
            self.release.wait(WAIT_LIMIT)
            return answer
        finally:
            self.returned.set()

    async def arefresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        return await anyio.to_thread.run_sync(self.refresh, tokens, clock)


async def test_a_task_job_is_bounded_when_the_refresher_ignores_cancellation(
    provider: LocalProvider, token_url: str, make_manager: ManagerFactory
) -> None:
    """redeem_in="task" with a refresher that cannot be cancelled once the provider consumed the refresh
    token: the job stops waiting after refresh_timeout and fails closed (the entry is removed), so another
    worker finds no entry to redeem instead of presenting the consumed token once the lease lapses."""
    storage = MemoryStorage()
    refresher = SdkRefresher(token_url, "test-client", "test-secret")
    manager = make_manager(
        storage=storage, refresher=refresher, refresh_timeout=0.3, wait_timeout=WAIT_LIMIT, redeem_in="task"
    )
    put_entry(manager, expired(provider.login()))
    other = make_manager(storage=storage)
    try:
        with pytest.raises(ReauthenticationRequired):
            await manager.aget_token(SESSION)
        assert manager.footprint().flights == 0 and not refresher.returned.is_set()
        assert stored(manager) is None
        with pytest.raises(ReauthenticationRequired):
            await anyio.to_thread.run_sync(other.get_token, SESSION)
    finally:
        refresher.release.set()
        await wait_until(refresher.returned.is_set)
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


def test_default_async_storage_calls_are_abandoned_on_cancel() -> None:
    """A blocking store's async twins (the Storage defaults) return when their caller is cancelled, though the
    sync call still runs in its thread: a bounded job is not held by a hung third-party store."""
    storage = StallingStorage()
    storage.stall()

    async def cancelled_get() -> bool:
        with anyio.move_on_after(0.05) as scope:
            await storage.aget(EntryKey("local", SESSION))
        return scope.cancelled_caught

    try:
        assert anyio.run(cancelled_get)
        assert storage.hung == 1
    finally:
        storage.release.set()


async def test_closing_one_manager_leaves_a_shared_refresher_to_the_other(
    provider: LocalProvider, token_url: str, sqlite_path: Path
) -> None:
    """Two managers share one OAuth2Refresher; one is closed while the other's token request is at the
    provider: the refresher's client stays open, the other job saves the rotation."""
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret")
    closing = TokenManager(provider_id="local", storage=MemoryStorage(), refresher=refresher)
    working = TokenManager(provider_id="local", storage=SQLiteStorage(sqlite_path), refresher=refresher)
    try:
        first = await aput_entry(working, expired(provider.login()))
        caller = await _refresh_at_the_provider(working, provider, "answer_delay:0.5")
        await anyio.to_thread.run_sync(closing.close)
        await anyio.to_thread.run_sync(caller.join)
        saved = await astored(working)
        assert saved is not None and saved.version == first.version + 1
    finally:
        await anyio.to_thread.run_sync(working.close)
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


class GatedRefresher(OAuth2Refresher):
    """An OAuth2Refresher whose token request waits until the test opens the gate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def refresh(self, tokens: UpstreamTokens, clock: Any) -> UpstreamTokens:
        self.gate.wait(WAIT_LIMIT)
        return super().refresh(tokens, clock)


async def test_callers_that_stop_waiting_are_not_counted_as_waiting(
    provider: LocalProvider, token_url: str, make_manager: ManagerFactory
) -> None:
    """Callers whose wait_timeout ran out, or who were cancelled, leave the refresh's waiters:
    footprint().waiting counts only callers still waiting."""
    refresher = GatedRefresher(token_url, "test-client", "test-secret")
    manager = make_manager(refresher=refresher, wait_timeout=0.05)
    put_entry(manager, expired(provider.login()))
    try:
        for n in range(6):
            with pytest.raises(RefreshFailed):
                if n % 2:
                    await anyio.to_thread.run_sync(manager.get_token, SESSION)
                else:
                    await manager.aget_token(SESSION)
        with anyio.move_on_after(0.01):
            await manager.aget_token(SESSION)  # cancelled while waiting (well within its wait_timeout)
        footprint = manager.footprint()
        assert footprint.flights == 1 and footprint.waiting == 0
    finally:
        refresher.gate.set()
    await wait_until(lambda: manager.footprint().flights == 0)
    assert provider.stats["refresh_ok"] == 1


async def test_a_distrust_of_a_token_of_unknown_lifetime_ends(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A token with no stated lifetime refused on its replay right after its refresh is distrusted for a
    bounded time, not for ever: once that is over, the next 401 refreshes again."""
    clock = FakeClock()
    manager = make_manager(clock=clock)
    put_entry(manager, provider.login())
    provider.fail_next("expires_in:0")
    api = ScriptedAPI([401, 401, 401, 401])  # the token, the replay after its refresh, then two more refusals
    statuses = []
    async with (
        ServerThread(api) as served,
        httpx.AsyncClient(base_url=served.url, auth=manager.auth(SESSION), verify=SSL) as client,
    ):
        statuses.append((await client.get("/data")).status_code)
        statuses.append((await client.get("/data")).status_code)  # distrusted: no refresh
        assert provider.stats["token_calls"] == 1
        clock.advance(state_module.UNKNOWN_LIFETIME_DISTRUST + 1)
        statuses.append((await client.get("/data")).status_code)  # refreshed again, then accepted
    assert statuses == [401, 401, 200]
    assert provider.stats["token_calls"] == 2 and provider.stats["refresh_reuse"] == 0


@pytest.mark.parametrize("delete_works", [True, False])
async def test_a_lost_answer_says_the_entry_was_removed_only_when_it_was(
    provider: LocalProvider, token_url: str, make_manager: ManagerFactory, delete_works: bool
) -> None:
    """After a lost answer the caller is told the entry was removed only when the store confirmed it; else
    that it may still be presented by other processes."""
    storage = DeleteFailsStorage()
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret", timeout=0.2)
    manager = make_manager(storage=storage, refresher=refresher, refresh_timeout=0.3)
    put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:1")
    storage.fail_delete = not delete_works
    with pytest.raises(ReauthenticationRequired) as caught:
        await manager.aget_token(SESSION)
    assert ("the entry was removed" in str(caught.value)) is delete_works
    assert (stored(manager) is None) is delete_works
    assert provider.stats["refresh_reuse"] == 0


def test_sqlite_storages_dropped_without_close_leave_the_change_feed(
    provider: LocalProvider, token_url: str, sqlite_path: Path
) -> None:
    """Per-tenant managers over SQLite storages of one file, dropped without close(): the first change notice
    after they are collected removes their feeds from the file's change hub, which then serves the live
    storage alone, and its poller thread stops once that one is closed."""
    for n in range(40):
        _plain_manager(token_url, SQLiteStorage(sqlite_path)).store(f"tenant-{n}", provider.login())
    gc.collect()
    live = _plain_manager(token_url, SQLiteStorage(sqlite_path))
    writer = SQLiteStorage(sqlite_path)  # another process's writes
    poller = writer._poller()

    def eventually(condition: Any) -> bool:
        give_up = time.monotonic() + WAIT_LIMIT
        while not condition():
            if time.monotonic() > give_up:
                return False
            time.sleep(0.005)
        return True

    try:
        live.get_token("tenant-0")
        assert writer.delete(EntryKey("local", "tenant-1"))  # one change notice
        assert eventually(lambda: len(poller.hub._subscribers) == 1)
        assert writer.delete(EntryKey("local", "tenant-0"))
        assert eventually(lambda: live.footprint().cached == 0)  # the live one still hears
    finally:
        live.close()
        writer.close()
    assert eventually(lambda: poller._thread is None)


def test_lost_lease_claims_are_kept_for_a_lease_ttl_at_most_and_bounded(
    provider: LocalProvider, make_manager: ManagerFactory, sqlite_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease claim that never reached the store (its file write-locked by another process) leaves nothing
    behind; claims whose answer was lost after they may have committed are kept at most MAX_LOST_CLAIMS, and
    only for a lease's ttl: sessions that never refresh here again leave no entry for ever."""
    monkeypatch.setattr(shared_module, "MAX_LOST_CLAIMS", 5, raising=False)
    storage = SQLiteStorage(sqlite_path, timeout=0.01)
    manager = make_manager(storage=storage, lease_ttl=0.2, wait_timeout=WAIT_LIMIT)
    for n in range(12):
        put_entry(manager, expired(provider.login()), session=f"s-{n}")
    locker = sqlite3.connect(sqlite_path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    try:
        for n in range(6):
            with pytest.raises(UpstreamAuthError):
                manager.get_token(f"s-{n}")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert manager.footprint().lost_claims == 0

    # A claim that committed and whose answer was then lost: no public fault does that on a local file (the
    # commit and its answer are one call), so the storage's claim step is wrapped to lose the answer after it.
    real_claim = storage._claim

    def claim_then_fail(*args: Any) -> Any:
        real_claim(*args)
        raise StorageError("the answer was lost on the way back")

    monkeypatch.setattr(storage, "_claim", claim_then_fail)
    for n in range(12):
        with pytest.raises(UpstreamAuthError):
            manager.get_token(f"s-{n}")
    monkeypatch.setattr(storage, "_claim", real_claim)
    assert manager.footprint().lost_claims == 5
    time.sleep(0.3)  # the leases those claims may have taken have expired
    put_entry(manager, expired(provider.login()), session="later")
    assert (manager.get_token("later")).version > 1
    assert manager.footprint().lost_claims == 0
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0
