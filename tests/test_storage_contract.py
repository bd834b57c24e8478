"""One contract for every storage backend: memory, SQLite, Redis and Redis Cluster behave the same."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from redis_servers import RedisCluster, RedisServer
from storage_fixtures import REPO, Backend, backend, redis_cluster, redis_server, storage

import httpx_upstream_auth._sqlite as sqlite_module
from httpx_upstream_auth._exceptions import StorageError
from httpx_upstream_auth._models import EntryKey, UpstreamTokens
from httpx_upstream_auth._redis import RedisStorage
from httpx_upstream_auth._sqlite import SQLiteStorage
from httpx_upstream_auth._storage import Lease, Storage

__all__ = ["backend", "redis_cluster", "redis_server", "storage"]  # fixtures used by the tests below

KEY = EntryKey("github", "session-1")
#: A timeout no test waits out: a watch given it returns only because of what the test did.
HOUR = 3600.0
#: Bounds on waits for something the test caused (waits, not assertions: generous for a loaded machine).
PATIENCE = 30.0
#: A Redis URL for tests that build a RedisStorage without ever connecting.
UNUSED_URL = "redis://127.0.0.1:1/0"


def tokens(version: int, **fields: Any) -> UpstreamTokens:
    """Tokens whose secrets are easy to search for in reprs and messages."""
    return UpstreamTokens(
        access_token=f"secret-access-{version}", refresh_token=f"secret-refresh-{version}", version=version, **fields
    )


def read_json(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, f"worker exited early with {process.wait()}"
    result: dict[str, Any] = json.loads(line)
    return result


def go(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()


# -- entries ----------------------------------------------------------------------------------------------
def test_get_of_missing_entry_is_none(storage: Storage) -> None:
    """A key never written reads as None."""
    assert storage.get(KEY) is None


def test_put_without_expected_version_only_creates(storage: Storage) -> None:
    """expected_version=None writes only when there is no entry."""
    assert storage.put(KEY, tokens(1), expected_version=None) is True
    assert storage.put(KEY, tokens(7), expected_version=None) is False
    assert storage.get(KEY) == tokens(1)


def test_entries_round_trip_every_field(storage: Storage) -> None:
    """What get returns equals what put stored, field for field."""
    full = UpstreamTokens(
        access_token="secret-a", refresh_token="secret-r", id_token="secret-i", token_type="DPoP", scope="a b",
        expires_at=1.5e9 + 0.25, refresh_expires_at=time.time() + 3600.5, issued_at=1.5e9, provider_id="github",
        user_id="u-1", upstream_subject="12345", client_id="my-app", version=3,
    )  # fmt: skip
    assert storage.put(KEY, full, expected_version=None)
    assert storage.get(KEY) == full


def test_compare_and_set_on_version(storage: Storage) -> None:
    """put writes only when the stored version is the expected one."""
    assert storage.put(KEY, tokens(1), expected_version=None)
    assert storage.put(KEY, tokens(2), expected_version=1) is True
    assert storage.put(KEY, tokens(3), expected_version=1) is False
    assert storage.put(KEY, tokens(3), expected_version=5) is False
    assert storage.get(KEY) == tokens(2)


def test_delete_conditional_and_unconditional(storage: Storage) -> None:
    """delete with expected_version only removes that version; without, removes any."""
    assert storage.delete(KEY) is False
    storage.put(KEY, tokens(1), expected_version=None)
    assert storage.delete(KEY, expected_version=2) is False
    assert storage.get(KEY) == tokens(1)
    assert storage.delete(KEY, expected_version=1) is True
    assert storage.get(KEY) is None
    storage.put(KEY, tokens(4), expected_version=None)
    assert storage.delete(KEY) is True
    assert storage.get(KEY) is None


def test_a_conditional_put_on_a_missing_entry_writes_nothing(storage: Storage) -> None:
    """put(expected_version=N) with no entry returns False and writes nothing (a refresh landing after a
    logout must not bring the session back); the same after the entry was deleted."""
    heard: list[str | None] = []
    unsubscribe = storage.subscribe(heard.append)
    for expected in (0, 1, 7, 2**63 - 1):
        assert storage.put(KEY, tokens(1), expected_version=expected) is False
    assert storage.get(KEY) is None
    assert storage.put(KEY, tokens(1), expected_version=None)
    assert storage.delete(KEY, expected_version=1)
    assert storage.put(KEY, tokens(2), expected_version=1) is False, "a logged-out session was resurrected"
    assert storage.get(KEY) is None
    assert storage.put(KEY, tokens(1), expected_version=None), "a new login still works"
    assert heard == [KEY.digest] * 3  # the first save, the delete, the new login: nothing for refused puts
    if unsubscribe is not None:
        unsubscribe()


def test_a_conditional_delete_of_another_version_keeps_the_entry(storage: Storage) -> None:
    """delete(expected_version=N) when the entry has another version returns False and keeps it unchanged."""
    assert storage.put(KEY, tokens(2), expected_version=None)
    heard: list[str | None] = []
    unsubscribe = storage.subscribe(heard.append)
    for expected in (0, 1, 3, 2**63 - 1):
        assert storage.delete(KEY, expected_version=expected) is False
    assert storage.get(KEY) == tokens(2)
    assert storage.delete(EntryKey("github", "never-written"), expected_version=2) is False
    assert heard == []
    if unsubscribe is not None:
        unsubscribe()


@pytest.mark.anyio  # on asyncio and trio: conftest parametrizes anyio_backend
async def test_async_conditional_writes_on_a_missing_or_other_version_write_nothing(storage: Storage) -> None:
    """aput(expected_version=N) with no entry, and adelete of another version, return False and change nothing."""
    assert await storage.aput(KEY, tokens(2), expected_version=1) is False
    assert await storage.aget(KEY) is None
    assert await storage.aput(KEY, tokens(2), expected_version=None)
    assert await storage.adelete(KEY, expected_version=1) is False
    assert await storage.aget(KEY) == tokens(2)
    assert await storage.adelete(KEY, expected_version=2)
    assert await storage.aput(KEY, tokens(3), expected_version=2) is False
    assert await storage.aget(KEY) is None


def test_keys_with_separators_do_not_collide(storage: Storage) -> None:
    """Ids containing ':', '{', '}' or '%' map to distinct entries."""
    keys = [EntryKey("a:b", "c"), EntryKey("a", "b:c"), EntryKey("{a}", "b"), EntryKey("%7Ba%7D", "b"),
            EntryKey("a", "b}c{d"), EntryKey("a%3Ab", "c")]  # fmt: skip
    for version, key in enumerate(keys, start=1):
        assert storage.put(key, tokens(version), expected_version=None)
    assert [storage.get(key) for key in keys] == [tokens(v) for v in range(1, len(keys) + 1)]


# -- retention --------------------------------------------------------------------------------------------
def test_entry_with_expired_access_token_is_still_returned(storage: Storage) -> None:
    """An access token that expired an hour ago does not hide the entry (its refresh token is needed)."""
    stale = tokens(1, expires_at=time.time() - 3600, issued_at=time.time() - 7200)
    storage.put(KEY, stale, expected_version=None)
    assert storage.get(KEY) == stale


def test_retention_follows_refresh_token_else_default(backend: Backend) -> None:
    """Entries live until refresh_expires_at when known, else `retention` after the write."""
    store = backend.make(retention=0.3)
    now = time.time()
    dying = EntryKey("github", "refresh-ends-soon")
    default = EntryKey("github", "no-refresh-expiry")
    living = EntryKey("github", "refresh-lives")
    dead_on_arrival = EntryKey("github", "refresh-already-dead")
    assert store.put(dying, tokens(1, refresh_expires_at=now + 0.3), expected_version=None)
    assert store.put(default, tokens(1, expires_at=now + 3600), expected_version=None)
    assert store.put(living, tokens(1, expires_at=now - 3600, refresh_expires_at=now + 3600), expected_version=None)
    store.put(dead_on_arrival, tokens(1, refresh_expires_at=now - 1), expected_version=None)
    assert store.get(dead_on_arrival) is None
    assert store.get(dying) is not None and store.get(default) is not None
    time.sleep(0.45)
    assert store.get(dying) is None, "an entry past refresh_expires_at must be gone"
    assert store.get(default) is None, "the default retention applies when refresh_expires_at is None"
    assert store.get(living) == tokens(1, expires_at=now - 3600, refresh_expires_at=now + 3600)
    # A vanished entry counts as absent for compare-and-set too.
    assert store.put(dying, tokens(5), expected_version=None)
    assert store.delete(default) is False


def test_absurd_refresh_lifetimes_mean_unknown(backend: Backend) -> None:
    """An infinite, NaN or absurd refresh_expires_at is saved (no OverflowError) and kept for the default retention."""
    store = backend.make(retention=0.3)
    heard: list[str | None] = []
    unsubscribe = store.subscribe(heard.append)
    odd = {"inf": float("inf"), "nan": float("nan"), "huge": 1e300, "past-pexpireat": 9.3e15, "ten-years": 4e9}
    for name, value in odd.items():
        key = EntryKey("github", f"odd-{name}")
        assert store.put(key, tokens(1, refresh_expires_at=value), expected_version=None), name
        found = store.get(key)
        assert found is not None and found.version == 1, name
        if value != value or value == float("inf"):  # NaN, inf: kept as unknown, so the entry stays readable
            assert found.refresh_expires_at is None, name
        assert store.put(key, tokens(2, refresh_expires_at=value), expected_version=1), name
    assert heard.count(EntryKey("github", "odd-inf").digest) == 2, "each save is reported"
    time.sleep(0.45)
    for name in odd:
        assert store.get(EntryKey("github", f"odd-{name}")) is None, f"{name}: the default retention applies"
    if unsubscribe is not None:
        unsubscribe()


def test_versions_compare_exactly_beyond_2_53(storage: Storage) -> None:
    """Versions near and above 2**53 (and clock-derived ones) are stored and compared exactly."""
    login = 1_800_000_000_000_000  # a login's first version: the clock in microseconds
    assert storage.put(KEY, tokens(login), expected_version=None)
    assert storage.put(KEY, tokens(login + 1), expected_version=login)
    assert storage.put(KEY, tokens(2**53 + 1), expected_version=login + 1)
    assert storage.put(KEY, tokens(2**53 + 2), expected_version=2**53) is False, "2**53 must not match 2**53 + 1"
    assert storage.delete(KEY, expected_version=2**53) is False
    assert storage.put(KEY, tokens(2**63 - 1), expected_version=2**53 + 1)
    assert storage.get(KEY) == tokens(2**63 - 1)
    assert storage.put(KEY, tokens(1), expected_version=2**63) is False
    assert storage.delete(KEY, expected_version=2**63 - 1) is True


def test_versions_outside_0_to_2_63_are_refused(backend: Backend) -> None:
    """A version no store can hold exactly raises ValueError before anything is written."""
    store = backend.make()
    for version in (2**63, -1):
        with pytest.raises(ValueError, match="2\\*\\*63"):
            store.put(KEY, tokens(version), expected_version=None)
    assert store.get(KEY) is None


def test_session_ids_with_lone_surrogates_are_distinct_entries(storage: Storage) -> None:
    """Session ids that are not valid UTF-8 text (lone surrogates) work, and do not collide with look-alikes."""
    odd, replaced = EntryKey("github", "lone-\udc00"), EntryKey("github", "lone-\ufffd")
    assert storage.put(odd, tokens(1), expected_version=None)
    assert storage.put(replaced, tokens(2), expected_version=None)
    assert storage.get(odd) == tokens(1) and storage.get(replaced) == tokens(2)
    assert storage.delete(odd, expected_version=1)
    assert storage.get(odd) is None and storage.get(replaced) == tokens(2)


# -- leases -----------------------------------------------------------------------------------------------
def test_lease_is_exclusive_and_release_is_owner_checked(storage: Storage) -> None:
    """One holder at a time per key; only the holder's release frees it."""
    first = storage.acquire_lease(KEY, 5.0)
    assert first is not None
    assert storage.acquire_lease(KEY, 5.0) is None
    other = storage.acquire_lease(EntryKey("github", "another-session"), 5.0)
    assert other is not None
    storage.release_lease(Lease(KEY, "not-the-owner", 5.0))
    assert storage.acquire_lease(KEY, 5.0) is None
    storage.release_lease(first)
    second = storage.acquire_lease(KEY, 5.0)
    assert second is not None
    storage.release_lease(second)
    storage.release_lease(other)


def test_expired_lease_can_be_taken_and_its_old_holder_cannot_release_the_new_one(storage: Storage) -> None:
    """After the ttl another worker takes the lease; the late holder's release leaves it alone."""
    stale = storage.acquire_lease(KEY, 0.2)
    assert stale is not None
    time.sleep(0.3)
    fresh = storage.acquire_lease(KEY, 5.0)
    assert fresh is not None
    storage.release_lease(stale)
    assert storage.acquire_lease(KEY, 5.0) is None
    storage.release_lease(fresh)


def test_renew_extends_only_our_live_lease(storage: Storage) -> None:
    """renew_lease keeps our lease past its first ttl; a stranger's, a released or an expired lease is not renewed."""
    lease = storage.acquire_lease(KEY, 1.0)
    assert lease is not None
    assert storage.renew_lease(Lease(KEY, "not-the-owner", 5.0)) is False
    time.sleep(0.6)
    assert storage.renew_lease(lease) is True
    time.sleep(0.6)  # past the first ttl, within the renewed one
    assert storage.acquire_lease(KEY, 5.0) is None
    storage.release_lease(lease)
    assert storage.renew_lease(lease) is False
    short = storage.acquire_lease(KEY, 0.1)
    assert short is not None
    time.sleep(0.2)
    assert storage.renew_lease(short) is False, "a lease that ran out is not brought back"
    other = storage.acquire_lease(KEY, 5.0)
    assert other is not None
    storage.release_lease(other)


@pytest.mark.anyio  # on asyncio and trio: conftest parametrizes anyio_backend
async def test_arenew_lease_follows_the_contract(storage: Storage) -> None:
    """arenew_lease renews our lease and refuses a stranger's, under asyncio and trio."""
    lease = await storage.aacquire_lease(KEY, 5.0)
    assert lease is not None
    assert await storage.arenew_lease(lease) is True
    assert await storage.arenew_lease(Lease(KEY, "not-the-owner", 5.0)) is False
    await storage.arelease_lease(lease)
    assert await storage.arenew_lease(lease) is False


def test_lease_ttl_must_be_positive_and_finite(backend: Backend) -> None:
    """A zero, negative, infinite or NaN lease ttl raises ValueError on every backend (no 1 ms lease)."""
    store = backend.make()
    for ttl in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lease ttl"):
            store.acquire_lease(KEY, ttl)
    lease = store.acquire_lease(KEY, 1e12)  # absurdly long: granted, cut to the longest allowed
    assert lease is not None
    store.release_lease(lease)


# -- watch ------------------------------------------------------------------------------------------------
def returns(call: Callable[[], Any]) -> None:
    """Run ``call`` in a thread and assert it returned (the bound only keeps a broken watch from hanging
    the suite: watches given an HOUR return only because of what the test did)."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(PATIENCE)
    assert not thread.is_alive(), "the watch did not return"


def notified_only(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make watchers of ``storage`` wake only when told of a change: their periodic re-reads of the entry
    (a safety net against lost notifications) wait an HOUR. Memory's watch polls: that is how it learns."""
    monkeypatch.setattr(sqlite_module, "_RECHECK", HOUR)
    if isinstance(storage, RedisStorage):
        monkeypatch.setattr(storage, "recheck_interval", HOUR)


def test_watch_returns_at_once_when_version_already_differs(storage: Storage) -> None:
    """No waiting when the entry already moved past the version the caller saw (nothing else can end a
    watch of an HOUR here: no write follows)."""
    storage.put(KEY, tokens(1), expected_version=None)
    returns(lambda: storage.watch(KEY, 0, HOUR))
    returns(lambda: storage.watch(KEY, None, HOUR))
    returns(lambda: storage.watch(EntryKey("github", "nobody"), 3, HOUR))


def test_watch_returns_after_timeout_without_writes(storage: Storage) -> None:
    """With no write, watch returns once its timeout has passed, never before, and the entry is unchanged."""
    storage.put(KEY, tokens(1), expected_version=None)
    started = time.monotonic()
    storage.watch(KEY, 1, 0.2)
    assert time.monotonic() - started >= 0.2  # a lower bound only: a loaded machine can only add to it
    assert storage.get(KEY) == tokens(1)


def _write_later(storage: Storage, delay: float) -> threading.Thread:
    def write() -> None:
        time.sleep(delay)
        assert storage.put(KEY, tokens(2), expected_version=1)

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def test_watch_wakes_on_write_from_another_thread(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save by another thread wakes the watcher: by a notification, not by its periodic re-read."""
    notified_only(storage, monkeypatch)
    storage.put(KEY, tokens(1), expected_version=None)
    thread = _write_later(storage, 0.1)
    returns(lambda: storage.watch(KEY, 1, HOUR))
    thread.join()
    assert storage.get(KEY) == tokens(2)


@pytest.mark.anyio  # on asyncio and trio: conftest parametrizes anyio_backend
async def test_awatch_wakes_on_write_from_another_thread(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """The async watch is woken by a save in another thread (not by a re-read), under asyncio and trio."""
    notified_only(storage, monkeypatch)
    await storage.aput(KEY, tokens(1), expected_version=None)
    thread = _write_later(storage, 0.1)
    with anyio.fail_after(PATIENCE):
        await storage.awatch(KEY, 1, HOUR)
    await anyio.to_thread.run_sync(thread.join)
    assert await storage.aget(KEY) == tokens(2)


async def _go_then_awatch(storage: Storage, worker: subprocess.Popen[str], version: int) -> None:
    await storage.aget(KEY)  # a new event loop's first call opens its connections: not part of the wait
    go(worker)
    with anyio.fail_after(PATIENCE):
        await storage.awatch(KEY, version, HOUR)


def test_watch_wakes_on_write_from_another_process(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save by another process wakes the watcher by a notification: sync, and async on asyncio and trio."""
    if not backend.shared_across_processes:
        pytest.skip("memory storage is not shared between processes")
    store = backend.make()
    notified_only(store, monkeypatch)
    store.put(KEY, tokens(1), expected_version=None)
    with backend.worker(KEY.provider_id, KEY.session_id, "write", "1", "0.15") as worker:
        assert read_json(worker) == {"ready": True}
        for version, api in enumerate(["sync", "asyncio", "trio"], start=1):
            if api == "sync":
                go(worker)  # the worker saves version + 1 in 0.15 s; we are watching long before
                returns(functools.partial(store.watch, KEY, version, HOUR))
            else:
                anyio.run(_go_then_awatch, store, worker, version, backend=api)
            read_json(worker)  # {"wrote_at": ...}
            assert store.get(KEY) == UpstreamTokens(access_token="at-new", version=version + 1)
        assert worker.stdin is not None
        worker.stdin.close()  # the worker exits at end of input
    assert worker.returncode == 0


@pytest.mark.anyio  # on asyncio and trio: conftest parametrizes anyio_backend
async def test_awatch_is_cancellable(storage: Storage) -> None:
    """Cancelling an async watch ends it (it could not have ended on its own: its timeout is an HOUR and
    nothing is written), under asyncio and trio."""
    await storage.aput(KEY, tokens(1), expected_version=None)
    with anyio.fail_after(PATIENCE), anyio.move_on_after(0.1) as scope:
        await storage.awatch(KEY, 1, HOUR)
    assert scope.cancelled_caught
    # The storage is still usable afterwards.
    assert await storage.aput(KEY, tokens(2), expected_version=1)


# -- subscribe --------------------------------------------------------------------------------------------
def test_subscribe_reports_this_objects_saves_and_deletes_until_unsubscribed(storage: Storage) -> None:
    """Each save and delete through the storage calls the subscriber once with the key's digest."""
    heard: list[str | None] = []
    unsubscribe = storage.subscribe(heard.append)
    assert unsubscribe is not None
    storage.put(KEY, tokens(1), expected_version=None)
    assert storage.put(KEY, tokens(9), expected_version=5) is False  # no write, no report
    storage.delete(KEY)
    assert heard == [KEY.digest, KEY.digest]
    unsubscribe()
    storage.put(KEY, tokens(1), expected_version=None)
    assert heard == [KEY.digest, KEY.digest]


def test_subscribe_hears_another_process_delete_once_and_in_order(backend: Backend) -> None:
    """Another process's delete reaches the callback with the digest, after our save, reported once (no echo)."""
    if not backend.shared_across_processes:
        pytest.skip("memory storage is not shared between processes")
    store = backend.make()
    heard: list[str | None] = []
    deleted = threading.Event()

    def on_change(digest: str | None) -> None:
        heard.append(digest)
        if len(heard) >= 2:
            deleted.set()

    unsubscribe = store.subscribe(on_change)
    assert unsubscribe is not None
    with backend.worker(KEY.provider_id, KEY.session_id, "delete") as worker:
        assert read_json(worker) == {"ready": True}
        assert store.put(KEY, tokens(1), expected_version=None)
        go(worker)
        assert read_json(worker) == {"deleted": True}
        assert deleted.wait(10.0), f"the other process's delete was not reported: {heard}"
    assert heard == [KEY.digest, KEY.digest]
    unsubscribe()


def test_subscribe_hears_every_save_of_other_processes(backend: Backend) -> None:
    """4 processes racing compare-and-set: the subscriber hears exactly one digest per successful save."""
    if not backend.shared_across_processes:
        pytest.skip("memory storage is not shared between processes")
    store = backend.make()
    heard: list[str | None] = []
    unsubscribe = store.subscribe(heard.append)
    assert unsubscribe is not None
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(backend.worker(KEY.provider_id, KEY.session_id, "increment", "25")) for _ in range(4)
        ]
        for worker in workers:
            assert read_json(worker) == {"ready": True}
        for worker in workers:
            go(worker)
        saves = sum(read_json(worker)["successes"] for worker in workers)
    deadline = time.monotonic() + 20
    while len(heard) < saves and time.monotonic() < deadline:
        time.sleep(0.01)
    unsubscribe()
    assert heard == [KEY.digest] * saves


@pytest.mark.anyio  # on asyncio and trio: conftest parametrizes anyio_backend
async def test_subscribe_hears_async_writes(storage: Storage) -> None:
    """Saves and deletes through the async twins are reported too, under asyncio and trio."""
    heard: list[str | None] = []
    unsubscribe = await anyio.to_thread.run_sync(storage.subscribe, heard.append)
    assert unsubscribe is not None
    await storage.aput(KEY, tokens(1), expected_version=None)
    await storage.adelete(KEY, expected_version=1)
    assert heard[:2] == [KEY.digest, KEY.digest]
    unsubscribe()


# -- async twins ------------------------------------------------------------------------------------------
async def _async_contract(storage: Storage, key: EntryKey) -> None:
    assert await storage.aget(key) is None
    assert await storage.aput(key, tokens(1), expected_version=None) is True
    assert await storage.aput(key, tokens(1), expected_version=None) is False
    assert await storage.aput(key, tokens(2), expected_version=1) is True
    assert await storage.aput(key, tokens(3), expected_version=1) is False
    assert await storage.aget(key) == tokens(2)
    assert await storage.adelete(key, expected_version=1) is False
    lease = await storage.aacquire_lease(key, 5.0)
    assert lease is not None
    assert await storage.aacquire_lease(key, 5.0) is None
    await storage.arelease_lease(Lease(key, "not-the-owner", 5.0))
    assert await storage.aacquire_lease(key, 5.0) is None
    await storage.arelease_lease(lease)
    again = await storage.aacquire_lease(key, 5.0)
    assert again is not None
    await storage.arelease_lease(again)
    with anyio.fail_after(PATIENCE):
        await storage.awatch(key, 1, HOUR)  # already at version 2: returns without waiting
    started = time.monotonic()
    await storage.awatch(key, 2, 0.15)
    assert time.monotonic() - started >= 0.15  # its timeout passed: a lower bound only
    assert await storage.adelete(key, expected_version=2) is True
    assert await storage.aget(key) is None
    assert await storage.aput(key, tokens(1), expected_version=None) is True
    assert await storage.adelete(key) is True


@pytest.mark.anyio  # on asyncio and trio: conftest parametrizes anyio_backend
async def test_async_twins_follow_the_contract(storage: Storage) -> None:
    """aget/aput/adelete/leases/awatch behave like their sync twins, under asyncio and trio."""
    await _async_contract(storage, KEY)


def test_one_storage_serves_successive_event_loops_and_threads(backend: Backend) -> None:
    """The same object works across anyio.run calls on asyncio, trio, asyncio again, and from threads."""
    store = backend.make()
    for number, library in enumerate(["asyncio", "trio", "asyncio"]):
        anyio.run(_async_contract, store, EntryKey("loops", f"run-{number}"), backend=library)
        assert store.get(EntryKey("loops", f"run-{number}")) is None
    failures: list[BaseException] = []

    def in_thread(number: int) -> None:
        try:
            anyio.run(_async_contract, store, EntryKey("threads", f"t-{number}"), backend="asyncio")
            _sync_contract(store, EntryKey("threads", f"s-{number}"))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=in_thread, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    anyio.run(_async_contract, store, EntryKey("loops", "last"), backend="asyncio")


def test_many_tasks_at_once_on_a_new_event_loop(backend: Backend) -> None:
    """Ten tasks whose first calls race on a fresh event loop all succeed (asyncio twice, then trio)."""
    store = backend.make()

    async def cycle(key: EntryKey) -> None:
        assert await store.aput(key, tokens(1), expected_version=None)
        assert await store.aget(key) == tokens(1)
        assert await store.adelete(key, expected_version=1)

    async def many(run: int) -> None:
        async with anyio.create_task_group() as group:
            for task in range(10):
                group.start_soon(cycle, EntryKey("many", f"{run}-{task}"))

    for run, library in enumerate(["asyncio", "asyncio", "trio"]):
        anyio.run(many, run, backend=library)


def _sync_contract(storage: Storage, key: EntryKey) -> None:
    assert storage.put(key, tokens(1), expected_version=None)
    assert storage.put(key, tokens(2), expected_version=1)
    assert storage.get(key) == tokens(2)
    assert storage.delete(key, expected_version=2)


# -- secrets ----------------------------------------------------------------------------------------------
def test_repr_of_storage_shows_no_secret(storage: Storage) -> None:
    """No token appears in the storage's repr or str, even after writes."""
    storage.put(KEY, tokens(1), expected_version=None)
    storage.get(KEY)
    for text in (repr(storage), str(storage)):
        assert "secret" not in text


# -- concurrency ------------------------------------------------------------------------------------------
def test_concurrent_compare_and_set_from_threads_loses_no_update(storage: Storage) -> None:
    """8 threads incrementing through compare-and-set: the final version equals the successful puts."""
    successes = [0] * 8

    def increment(slot: int) -> None:
        for _ in range(25):
            current = storage.get(KEY)
            version = 0 if current is None else current.version
            if storage.put(KEY, tokens(version + 1), expected_version=None if current is None else version):
                successes[slot] += 1

    threads = [threading.Thread(target=increment, args=(slot,)) for slot in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = storage.get(KEY)
    assert final is not None and final.version == sum(successes) > 0


def test_concurrent_compare_and_set_from_processes_loses_no_update(backend: Backend) -> None:
    """4 processes incrementing through compare-and-set: the final version equals the successful puts."""
    if not backend.shared_across_processes:
        pytest.skip("memory storage is not shared between processes")
    store = backend.make()
    with contextlib.ExitStack() as stack:
        workers = [
            stack.enter_context(backend.worker(KEY.provider_id, KEY.session_id, "increment", "40")) for _ in range(4)
        ]
        for worker in workers:
            assert read_json(worker) == {"ready": True}
        for worker in workers:  # all start together, for contention
            go(worker)
        successes = [read_json(worker)["successes"] for worker in workers]
    final = store.get(KEY)
    assert final is not None and final.version == sum(successes) >= 40


# -- SQLite specifics -------------------------------------------------------------------------------------
def test_sqlite_files_are_private(tmp_path: Path) -> None:
    """The database and its -wal/-shm files are mode 0600 even under a permissive umask."""
    previous = os.umask(0)
    try:
        store = SQLiteStorage(tmp_path / "tokens.db")
        store.put(KEY, tokens(1), expected_version=None)
        names = ["tokens.db", "tokens.db-wal", "tokens.db-shm"]
        modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in names}
        store.close()
    finally:
        os.umask(previous)
    assert modes == dict.fromkeys(names, 0o600)


def test_sqlite_failures_are_storage_errors_that_say_what_to_do(tmp_path: Path) -> None:
    """A missing directory, a file that is not a database, and a closed storage raise StorageError."""
    with pytest.raises(StorageError, match="directory exists"):
        SQLiteStorage(tmp_path / "missing" / "tokens.db")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="readable and writable"):
        SQLiteStorage(tmp_path / "junk.db")
    store = SQLiteStorage(tmp_path / "tokens.db")
    store.close()
    with pytest.raises(StorageError, match="closed"):
        store.get(KEY)
    with pytest.raises(ValueError, match="MemoryStorage"):
        SQLiteStorage(":memory:")


def test_sqlite_file_is_shared_by_storage_objects(tmp_path: Path) -> None:
    """Two storage objects on one file see each other's writes and leases."""
    first, second = SQLiteStorage(tmp_path / "t.db"), SQLiteStorage(tmp_path / "t.db")
    first.put(KEY, tokens(1), expected_version=None)
    assert second.get(KEY) == tokens(1)
    assert second.put(KEY, tokens(2), expected_version=1)
    assert first.put(KEY, tokens(2), expected_version=1) is False
    lease = first.acquire_lease(KEY, 5.0)
    assert lease is not None and second.acquire_lease(KEY, 5.0) is None
    first.close()
    second.close()


# -- Redis specifics --------------------------------------------------------------------------------------
def _all_operations(store: Storage) -> dict[str, Callable[[], Any]]:
    return {
        "get": lambda: store.get(KEY),
        "put": lambda: store.put(KEY, tokens(2), expected_version=1),
        "delete": lambda: store.delete(KEY, expected_version=1),
        "acquire_lease": lambda: store.acquire_lease(KEY, 5.0),
        "release_lease": lambda: store.release_lease(Lease(KEY, "owner", 5.0)),
        "watch": lambda: store.watch(KEY, 1, 5.0),
    }


def _all_async_operations(store: Storage) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "aget": lambda: store.aget(KEY),
        "aput": lambda: store.aput(KEY, tokens(2), expected_version=1),
        "adelete": lambda: store.adelete(KEY, expected_version=1),
        "aacquire_lease": lambda: store.aacquire_lease(KEY, 5.0),
        "arelease_lease": lambda: store.arelease_lease(Lease(KEY, "owner", 5.0)),
        "awatch": lambda: store.awatch(KEY, 1, 5.0),
    }


def _assert_every_operation_fails_typed(store: Storage, names: set[str] | None = None) -> None:
    # No duration is asserted (a loaded machine stretches any): an operation that waited for the store
    # instead of giving up at its socket timeout would hang the test until pytest's timeout fails it.
    def check(name: str, error: StorageError | None) -> None:
        assert error is not None, f"{name} did not raise StorageError"
        assert "unreachable" in str(error) and "retry" in str(error)
        chain = f"{error} {error.__cause__!r}"
        assert "secret" not in chain

    for name, operation in _all_operations(store).items():
        if names is None or name in names:
            error = None
            try:
                operation()
            except StorageError as exc:
                error = exc
            check(name, error)

    async def run_async() -> None:
        for name, operation in _all_async_operations(store).items():
            if names is None or name in names:
                error = None
                try:
                    await operation()
                except StorageError as exc:
                    error = exc
                check(name, error)

    for library in ("asyncio", "trio"):
        anyio.run(run_async, backend=library)


def test_redis_outage_raises_storage_error_fast_and_recovers() -> None:
    """With the server stopped or frozen, every operation raises StorageError at its socket
    timeout (sync, asyncio, trio); after a restart the same storage works again."""
    server = RedisServer()
    try:
        server.start()
        store = RedisStorage.from_url(server.url, socket_timeout=0.2)
        store.put(KEY, tokens(1), expected_version=None)
        anyio.run(store.aget, KEY, backend="asyncio")  # open a pooled asyncio connection first

        server.stop()
        _assert_every_operation_fails_typed(store)

        server.start()
        store.put(KEY, tokens(1), expected_version=None)
        server.pause()  # connections open but nothing answers: only the timeouts save us
        _assert_every_operation_fails_typed(
            store, names={"get", "put", "watch", "aget", "aput", "awatch", "aacquire_lease"}
        )
        server.resume()

        server.restart()
        assert store.put(KEY, tokens(1), expected_version=None)
        assert store.get(KEY) == tokens(1)
        for library in ("asyncio", "trio"):
            assert anyio.run(store.aget, KEY, backend=library) == tokens(1)
        store.close()
    finally:
        server.cleanup()


def test_redis_cluster_node_outage_raises_storage_error_fast_and_recovers(redis_cluster: RedisCluster) -> None:
    """With the node that owns the key frozen, operations raise StorageError at the socket timeout
    (no cluster-level retry series); once it answers again the same storage works."""
    store = RedisStorage.from_url(redis_cluster.url, prefix="outage", socket_timeout=0.1)
    assert isinstance(store, RedisStorage)
    store.put(KEY, tokens(1), expected_version=None)
    owner_port = store._sync.get_node_from_key(store._entry_key(KEY)).port
    owner = next(node for node in redis_cluster.nodes if node.port == owner_port)
    owner.pause()  # kept well under cluster-node-timeout, so the cluster does not fail the node
    try:
        _assert_every_operation_fails_typed(store, names={"get", "put", "watch", "aget"})
    finally:
        owner.resume()
    assert store.get(KEY) == tokens(1)
    assert anyio.run(store.aget, KEY, backend="asyncio") == tokens(1)
    store.close()


def test_redis_keys_share_one_cluster_slot_and_never_name_the_session() -> None:
    """Entry and lease of a key hash to one Cluster slot, named by the key's digest: no session id in them."""
    from redis.crc import key_slot

    store = RedisStorage.from_url(UNUSED_URL, prefix="hua")  # builds keys, never connects
    for key in (KEY, EntryKey("{x}", "}session-y{"), EntryKey("a:b", "session:c"), EntryKey("gh", "lone-\udc00")):
        names = [store._entry_key(key), store._lease_key(key)]
        assert len({key_slot(name.encode()) for name in names}) == 1
        assert all(key.session_id not in name for name in names)
    assert store._entry_key(KEY) == f"hua:{{{KEY.digest}}}:entry"
    with pytest.raises(ValueError, match="prefix"):
        RedisStorage.from_url(UNUSED_URL, prefix="a{b}")
    store.close()


def test_redis_from_url_schemes_and_repr(redis_server: RedisServer) -> None:
    """unix:// works; rediss:// builds a TLS client; the repr never shows the password."""
    store = RedisStorage.from_url(f"unix://{redis_server.socket_path}?db=0", prefix="unix-test")
    assert store.put(KEY, tokens(1), expected_version=None)
    assert anyio.run(store.aget, KEY, backend="asyncio") == tokens(1)
    assert "unix:" in repr(store)
    store.close()
    tls = RedisStorage.from_url("rediss://user:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in repr(tls) and "127.0.0.1:1" in repr(tls)
    assert tls._sync.connection_pool.connection_class.__name__ == "SSLConnection"
    tls.close()


def test_redis_accepts_existing_clients(redis_server: RedisServer) -> None:
    """Existing redis.Redis / redis.asyncio.Redis clients work (even with decode_responses) and stay open."""
    import redis
    import redis.asyncio

    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store: RedisStorage | None = None

    async def with_async_client() -> None:
        nonlocal store
        async_client = redis.asyncio.Redis.from_url(redis_server.url)
        store = RedisStorage(client, async_client=async_client, prefix="given")
        await _async_contract(store, EntryKey("given", "async"))
        await async_client.aclose()

    anyio.run(with_async_client, backend="asyncio")
    assert store is not None
    _sync_contract(store, EntryKey("given", "sync"))
    # Another loop cannot use the asyncio client bound to the first: the sync client serves it.
    anyio.run(_async_contract, store, EntryKey("given", "second-loop"), backend="asyncio")
    anyio.run(_async_contract, store, EntryKey("given", "trio"), backend="trio")
    store.close()
    assert client.ping() is True
    client.close()


def test_redis_watch_falls_back_to_polling_without_pubsub(redis_server: RedisServer) -> None:
    """When an ACL forbids SUBSCRIBE, watch still wakes on another storage object's save (by polling:
    no notification can reach it, and its re-read safety net waits an HOUR)."""
    redis_server.cli("ACL", "SETUSER", "nopubsub", "on", ">pw", "~*", "&*", "+@all", "-subscribe", "-ssubscribe")
    url = f"redis://nopubsub:pw@127.0.0.1:{redis_server.port}/0"
    store = RedisStorage.from_url(url, prefix="nopubsub")
    store.recheck_interval = HOUR
    writer = RedisStorage.from_url(redis_server.url, prefix="nopubsub")  # its writes wake only its own watchers
    store.put(KEY, tokens(1), expected_version=None)
    thread = _write_later(writer, 0.1)
    returns(lambda: store.watch(KEY, 1, HOUR))
    thread.join()
    assert store._subscriber is not None and store._subscriber.refused

    async def watch_async() -> None:
        with anyio.fail_after(PATIENCE):
            await store.awatch(KEY, 1, HOUR)  # already at version 2
        await store.awatch(KEY, 2, 0.1)

    anyio.run(watch_async, backend="asyncio")
    store.close()
    writer.close()


def test_redis_refusals_never_echo_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server error that echoes the command's arguments is trimmed and redacted, and not chained."""
    import redis.exceptions

    store = RedisStorage.from_url(UNUSED_URL, prefix="echo")

    def refuse(**_: Any) -> None:
        raise redis.exceptions.ResponseError(
            "unknown command 'EVALSHA', with args beginning with: 'x' '{\"access_token\":\"secret-access-1\"'"
        )

    monkeypatch.setitem(store._scripts, "cas", refuse)
    with pytest.raises(StorageError, match="refused") as caught:
        store.put(KEY, tokens(1), expected_version=None)
    assert "secret" not in str(caught.value) and caught.value.__cause__ is None
    store.close()


def test_redis_module_imports_without_redis_and_names_the_extra() -> None:
    """Without redis-py the module imports, and constructing RedisStorage says which extra to install."""
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from httpx_upstream_auth._redis import RedisStorage\n"
        "try:\n    RedisStorage()\nexcept ImportError as exc:\n    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "pip install 'httpx-upstream-auth[redis]'" in result.stdout


def test_retention_deadline_is_finite_and_falls_back_to_the_default() -> None:
    """Infinite, NaN and absurd lifetimes mean unknown; the default retention is clamped; the past stays past."""
    from httpx_upstream_auth._policy import retention_deadline

    now, ten_years = 1.8e9, 10 * 365 * 24 * 3600.0
    for odd in (float("inf"), float("nan"), 1e300, now + ten_years + 1, None):
        assert retention_deadline(tokens(1, refresh_expires_at=odd), now, 60.0) == now + 60.0
    assert retention_deadline(tokens(1, refresh_expires_at=now + 3600), now, 60.0) == now + 3600
    assert retention_deadline(tokens(1, refresh_expires_at=-1e300), now, 60.0) == 0.0
    assert retention_deadline(tokens(1), now, float("inf")) == now + ten_years
    assert retention_deadline(tokens(1), now, float("nan")) == now
    assert retention_deadline(tokens(1), now, -5.0) == now
