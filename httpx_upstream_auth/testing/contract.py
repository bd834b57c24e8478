"""The storage contract as a test suite, for any backend: what the token manager relies on a store to do.

It needs pytest, and anyio's pytest plugin (installed with anyio) for its async tests. Subclass
:class:`StorageContract` in a test module and say how to make your storage; pytest then runs every test
of the suite against it::

    from httpx_upstream_auth.testing.contract import StorageContract

    class TestMyStorage(StorageContract):
        def make_storage(self, **options):
            return MyStorage(DSN, **options)  # options: Storage's keyword arguments (retention=...)

Storage objects made without options during one test must share their entries (an in-process store may
return one object); the suite closes every object it made after the test. A store shared between
processes returns from :meth:`StorageContract.opener` the Python source that opens it in another
process, and the cross-process tests run; a suite that does not override it declares a store of one
process, and those tests are not collected for it (there is no other process to test against). The async
tests run on the
``anyio_backend`` fixture of your tests (anyio's default is asyncio alone: parametrize it to add trio);
the tests that start event loops of their own use :attr:`StorageContract.event_loops`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

from .._models import EntryKey, UpstreamTokens, is_plausible_time
from .._storages import Lease, Storage

__all__ = [
    "CROSS_PROCESS_TESTS",
    "StorageContract",
    "StoreWorker",
    "check_async_contract",
    "check_sync_contract",
    "sample_tokens",
]

KEY = EntryKey("github", "session-1")
#: A timeout no test waits out: a watch given it returns only because of what the test did.
HOUR = 3600.0
#: Bounds on waits for something the test caused (waits, not assertions: generous for a loaded machine).
PATIENCE = 30.0


def sample_tokens(version: int, **fields: Any) -> UpstreamTokens:
    """Tokens at ``version`` whose secrets are easy to search for in reprs and messages (``secret-…``).

    Times that :class:`UpstreamTokens` refuses (infinite, absurd) are set around its checks: a store must
    survive entries built any way, as rows written by older versions are."""
    odd = {name: fields.pop(name) for name, value in list(fields.items()) if name.endswith("_at") and value is not None}
    fields.update({name: odd.pop(name) for name, value in list(odd.items()) if is_plausible_time(value)})
    entry = UpstreamTokens(
        access_token=f"secret-access-{version}", refresh_token=f"secret-refresh-{version}", version=version, **fields
    )
    for name, value in odd.items():
        object.__setattr__(entry, name, value)
    return entry


# The program a worker process runs: open the store (argv[1] binds ``storage``), then obey one command.
_WORKER = r"""
import json, sys, time
from httpx_upstream_auth import EntryKey, UpstreamTokens

opener, provider, session, command, *args = sys.argv[1:]
namespace = {}
exec(opener, namespace)
storage = namespace["storage"]
key = EntryKey(provider, session)

def say(**fields):
    print(json.dumps(fields), flush=True)

say(ready=True)
sys.stdin.readline()  # "go"
if command == "increment":
    successes = 0
    for _ in range(int(args[0])):
        current = storage.get(key)
        version = 0 if current is None else current.version
        new = UpstreamTokens(access_token=f"at-{version + 1}", refresh_token="rt", version=version + 1)
        if storage.put(key, new, expected_version=None if current is None else version):
            successes += 1
    say(successes=successes)
elif command == "delete":  # delete the entry (any version), then say whether it was there
    say(deleted=storage.delete(key))
elif command == "write":  # after each "go": sleep, then save version + 1; until stdin closes
    version, delay = int(args[0]), float(args[1])
    while True:
        time.sleep(delay)
        wrote_at = time.time()
        storage.put(key, UpstreamTokens(access_token="at-new", version=version + 1), expected_version=version)
        say(wrote_at=wrote_at)
        version += 1
        if not sys.stdin.readline():
            break
storage.close()
"""


class StoreWorker(subprocess.Popen[str]):
    """Another process with a storage object open on the same store, obeying one command about ``key``.

    ``opener`` is Python source that binds ``storage`` (see :meth:`StorageContract.opener`). The worker
    prints ``{"ready": true}``, then runs ``command`` once :meth:`go` is called, printing its results as
    JSON lines (:meth:`read`). ``increment N``: N compare-and-set increments, then ``{"successes": k}``.
    ``write V DELAY``: after each go, wait DELAY seconds, save version V+1 (then V+2…) and print
    ``{"wrote_at": epoch}``, until its input is closed. ``delete``: delete the entry, then print
    ``{"deleted": bool}``. It imports what this process can (the same ``sys.path``).
    """

    def __init__(self, opener: str, key: EntryKey, command: str, *args: str) -> None:
        path = os.pathsep.join(filter(None, [*sys.path, os.environ.get("PYTHONPATH")]))
        super().__init__(
            [sys.executable, "-c", _WORKER, opener, key.provider_id, key.session_id, command, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": path},
        )  # fmt: skip

    def read(self) -> dict[str, Any]:
        """The worker's next JSON line."""
        assert self.stdout is not None
        line = self.stdout.readline()
        assert line, f"the worker exited early with {self.wait()}"
        result: dict[str, Any] = json.loads(line)
        return result

    def go(self) -> None:
        """Let the worker run its command (again)."""
        assert self.stdin is not None
        self.stdin.write("go\n")
        self.stdin.flush()


def check_sync_contract(storage: Storage, key: EntryKey) -> None:
    """The contract's core through the sync methods, on ``key`` (absent at the start and at the end):
    for a storage object made in a way the suite's fixtures do not cover."""
    assert storage.put(key, sample_tokens(1), expected_version=None)
    assert storage.put(key, sample_tokens(2), expected_version=1)
    assert storage.get(key) == sample_tokens(2)
    assert storage.delete(key, expected_version=2)


async def check_async_contract(storage: Storage, key: EntryKey) -> None:
    """The contract's core through the async twins, leases and a watch included, on ``key`` (absent at
    the start and at the end)."""
    assert await storage.aget(key) is None
    assert await storage.aput(key, sample_tokens(1), expected_version=None) is True
    assert await storage.aput(key, sample_tokens(1), expected_version=None) is False
    assert await storage.aput(key, sample_tokens(2), expected_version=1) is True
    assert await storage.aput(key, sample_tokens(3), expected_version=1) is False
    assert await storage.aget(key) == sample_tokens(2)
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
    assert await storage.aput(key, sample_tokens(1), expected_version=None) is True
    assert await storage.adelete(key) is True


def _returns(call: Callable[[], Any]) -> None:
    """Run ``call`` in a thread and assert it returned (the bound only keeps a broken watch from hanging
    the suite: watches given an HOUR return only because of what the test did)."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(PATIENCE)
    assert not thread.is_alive(), "the watch did not return"


def _write_later(storage: Storage, delay: float) -> threading.Thread:
    def write() -> None:
        time.sleep(delay)
        assert storage.put(KEY, sample_tokens(2), expected_version=1)

    thread = threading.Thread(target=write)
    thread.start()
    return thread


async def _go_then_awatch(storage: Storage, worker: StoreWorker, version: int) -> None:
    await storage.aget(KEY)  # a new event loop's first call opens its connections: not part of the wait
    worker.go()
    with anyio.fail_after(PATIENCE):
        await storage.awatch(KEY, version, HOUR)


#: The tests that open the store in other processes: collected only for a suite that overrides
#: :meth:`StorageContract.opener` (a store shared between processes).
CROSS_PROCESS_TESTS = (
    "test_watch_wakes_on_write_from_another_process",
    "test_subscribe_hears_another_process_delete_once_and_in_order",
    "test_subscribe_hears_every_save_of_other_processes",
    "test_concurrent_compare_and_set_from_processes_loses_no_update",
)


class StorageContract:
    """The suite. Subclass it (with a name pytest collects, ``Test…``) and implement :meth:`make_storage`."""

    #: The event loops of the tests that start their own (``anyio.run``): trio too when it is installed.
    event_loops: tuple[str, ...] = ("asyncio", "trio") if importlib.util.find_spec("trio") else ("asyncio",)

    def make_storage(self, **options: Any) -> Storage:
        """A new storage object on this test's store; ``options`` are Storage's keyword arguments."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_storage()")

    def opener(self) -> str | None:
        """Python source that, run in a fresh interpreter, binds ``storage`` to a new storage object on
        this test's store. Not overriding it declares a store that lives in one process: the tests named in
        :data:`CROSS_PROCESS_TESTS` are then not collected (there is no other process to test against)."""
        return None

    def disable_rechecks(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make ``storage``'s watchers wake only when told of a change: turn off the periodic re-read of
        the entry that a store which pushes changes keeps as a safety net. The default does nothing (a
        store that polls learns of changes by polling)."""

    def new_storage(self, **options: Any) -> Storage:
        """:meth:`make_storage`, closed after the test."""
        storage = self.make_storage(**options)
        self._made.append(storage)
        return storage

    @pytest.fixture(autouse=True)
    def _close_storages(self) -> Iterator[None]:
        self._made: list[Storage] = []
        yield
        for storage in self._made:
            storage.close()

    @pytest.fixture
    def storage(self) -> Storage:
        """A storage object on the test's store."""
        return self.new_storage()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        shared = cls.opener is not StorageContract.opener
        for name in CROSS_PROCESS_TESTS:
            if not shared:
                # Selected out, not skipped: pytest collects no test from a name bound to None.
                setattr(cls, name, None)
            elif getattr(cls, name) is None:  # a suite of one process's store, subclassed to add an opener
                setattr(cls, name, getattr(StorageContract, name))

    def _shared_opener(self) -> str:
        opener = self.opener()
        # Only collected when opener() is overridden: the suite declared a store shared between processes.
        assert opener is not None, f"{type(self).__name__}.opener() returned None: return the source that opens it"
        return opener

    # -- entries -----------------------------------------------------------------------------------------
    def test_get_of_missing_entry_is_none(self, storage: Storage) -> None:
        """A key never written reads as None."""
        assert storage.get(KEY) is None

    def test_put_without_expected_version_only_creates(self, storage: Storage) -> None:
        """expected_version=None writes only when there is no entry."""
        assert storage.put(KEY, sample_tokens(1), expected_version=None) is True
        assert storage.put(KEY, sample_tokens(7), expected_version=None) is False
        assert storage.get(KEY) == sample_tokens(1)

    def test_entries_round_trip_every_field(self, storage: Storage) -> None:
        """What get returns equals what put stored, field for field."""
        full = UpstreamTokens(
            access_token="secret-a", refresh_token="secret-r", id_token="secret-i", token_type="DPoP", scope="a b",
            expires_at=1.5e9 + 0.25, refresh_expires_at=time.time() + 3600.5, issued_at=1.5e9, provider_id="github",
            user_id="u-1", upstream_subject="12345", client_id="my-app", version=3,
        )  # fmt: skip
        assert storage.put(KEY, full, expected_version=None)
        assert storage.get(KEY) == full

    def test_compare_and_set_on_version(self, storage: Storage) -> None:
        """put writes only when the stored version is the expected one."""
        assert storage.put(KEY, sample_tokens(1), expected_version=None)
        assert storage.put(KEY, sample_tokens(2), expected_version=1) is True
        assert storage.put(KEY, sample_tokens(3), expected_version=1) is False
        assert storage.put(KEY, sample_tokens(3), expected_version=5) is False
        assert storage.get(KEY) == sample_tokens(2)

    def test_delete_conditional_and_unconditional(self, storage: Storage) -> None:
        """delete with expected_version only removes that version; without, removes any."""
        assert storage.delete(KEY) is False
        storage.put(KEY, sample_tokens(1), expected_version=None)
        assert storage.delete(KEY, expected_version=2) is False
        assert storage.get(KEY) == sample_tokens(1)
        assert storage.delete(KEY, expected_version=1) is True
        assert storage.get(KEY) is None
        storage.put(KEY, sample_tokens(4), expected_version=None)
        assert storage.delete(KEY) is True
        assert storage.get(KEY) is None

    def test_a_conditional_put_on_a_missing_entry_writes_nothing(self, storage: Storage) -> None:
        """put(expected_version=N) with no entry returns False and writes nothing (a refresh landing after a
        logout must not bring the session back); the same after the entry was deleted."""
        heard: list[str | None] = []
        unsubscribe = storage.subscribe(heard.append)
        for expected in (0, 1, 7, 2**63 - 1):
            assert storage.put(KEY, sample_tokens(1), expected_version=expected) is False
        assert storage.get(KEY) is None
        assert storage.put(KEY, sample_tokens(1), expected_version=None)
        assert storage.delete(KEY, expected_version=1)
        assert storage.put(KEY, sample_tokens(2), expected_version=1) is False, "a logged-out session was resurrected"
        assert storage.get(KEY) is None
        assert storage.put(KEY, sample_tokens(1), expected_version=None), "a new login still works"
        assert heard == [KEY.digest] * 3  # the first save, the delete, the new login: nothing for refused puts
        if unsubscribe is not None:
            unsubscribe()

    def test_a_conditional_delete_of_another_version_keeps_the_entry(self, storage: Storage) -> None:
        """delete(expected_version=N) when the entry has another version returns False and keeps it unchanged."""
        assert storage.put(KEY, sample_tokens(2), expected_version=None)
        heard: list[str | None] = []
        unsubscribe = storage.subscribe(heard.append)
        for expected in (0, 1, 3, 2**63 - 1):
            assert storage.delete(KEY, expected_version=expected) is False
        assert storage.get(KEY) == sample_tokens(2)
        assert storage.delete(EntryKey("github", "never-written"), expected_version=2) is False
        assert heard == []
        if unsubscribe is not None:
            unsubscribe()

    @pytest.mark.anyio
    async def test_async_conditional_writes_on_a_missing_or_other_version_write_nothing(self, storage: Storage) -> None:
        """aput(expected_version=N) with no entry, and adelete of another version (or of one no store can hold),
        return False and change nothing."""
        assert await storage.aput(KEY, sample_tokens(2), expected_version=1) is False
        assert await storage.aget(KEY) is None
        assert await storage.aput(KEY, sample_tokens(2), expected_version=None)
        assert await storage.adelete(KEY, expected_version=1) is False
        assert await storage.aget(KEY) == sample_tokens(2)
        assert await storage.adelete(KEY, expected_version=2)
        assert await storage.aput(KEY, sample_tokens(3), expected_version=2) is False
        assert await storage.aget(KEY) is None
        # an expected version no store can hold (outside 0..2**63-1) matches nothing
        assert await storage.aput(KEY, sample_tokens(3), expected_version=None)
        for version in (2**63, -1):
            assert await storage.aput(KEY, sample_tokens(4), expected_version=version) is False
            assert await storage.adelete(KEY, expected_version=version) is False
        assert await storage.aget(KEY) == sample_tokens(3)

    def test_keys_with_separators_do_not_collide(self, storage: Storage) -> None:
        """Ids containing ':', '{', '}' or '%' map to distinct entries."""
        keys = [EntryKey("a:b", "c"), EntryKey("a", "b:c"), EntryKey("{a}", "b"), EntryKey("%7Ba%7D", "b"),
                EntryKey("a", "b}c{d"), EntryKey("a%3Ab", "c")]  # fmt: skip
        for version, key in enumerate(keys, start=1):
            assert storage.put(key, sample_tokens(version), expected_version=None)
        assert [storage.get(key) for key in keys] == [sample_tokens(v) for v in range(1, len(keys) + 1)]

    # -- retention ---------------------------------------------------------------------------------------
    def test_entry_with_expired_access_token_is_still_returned(self, storage: Storage) -> None:
        """An access token that expired an hour ago does not hide the entry (its refresh token is needed)."""
        stale = sample_tokens(1, expires_at=time.time() - 3600, issued_at=time.time() - 7200)
        storage.put(KEY, stale, expected_version=None)
        assert storage.get(KEY) == stale

    def test_retention_follows_refresh_token_else_default(self) -> None:
        """Entries live until refresh_expires_at when known, else `retention` after the write."""
        store = self.new_storage(retention=0.3)
        now = time.time()
        dying = EntryKey("github", "refresh-ends-soon")
        default = EntryKey("github", "no-refresh-expiry")
        living = EntryKey("github", "refresh-lives")
        dead_on_arrival = EntryKey("github", "refresh-already-dead")
        assert store.put(dying, sample_tokens(1, refresh_expires_at=now + 0.3), expected_version=None)
        assert store.put(default, sample_tokens(1, expires_at=now + 3600), expected_version=None)
        assert store.put(
            living, sample_tokens(1, expires_at=now - 3600, refresh_expires_at=now + 3600), expected_version=None
        )
        store.put(dead_on_arrival, sample_tokens(1, refresh_expires_at=now - 1), expected_version=None)
        assert store.get(dead_on_arrival) is None
        assert store.get(dying) is not None and store.get(default) is not None
        time.sleep(0.45)
        assert store.get(dying) is None, "an entry past refresh_expires_at must be gone"
        assert store.get(default) is None, "the default retention applies when refresh_expires_at is None"
        assert store.get(living) == sample_tokens(1, expires_at=now - 3600, refresh_expires_at=now + 3600)
        # A vanished entry counts as absent for compare-and-set too.
        assert store.put(dying, sample_tokens(5), expected_version=None)
        assert store.delete(default) is False

    def test_absurd_refresh_lifetimes_mean_unknown(self) -> None:
        """An infinite, NaN or absurd refresh_expires_at is saved (no OverflowError) and kept for the default
        retention."""
        store = self.new_storage(retention=0.3)
        heard: list[str | None] = []
        unsubscribe = store.subscribe(heard.append)
        odd = {"inf": float("inf"), "nan": float("nan"), "huge": 1e300, "past-pexpireat": 9.3e15, "ten-years": 4e9}
        for name, value in odd.items():
            key = EntryKey("github", f"odd-{name}")
            assert store.put(key, sample_tokens(1, refresh_expires_at=value), expected_version=None), name
            found = store.get(key)
            assert found is not None and found.version == 1, name
            if value != value or value == float("inf"):  # NaN, inf: kept as unknown, so the entry stays readable
                assert found.refresh_expires_at is None, name
            assert store.put(key, sample_tokens(2, refresh_expires_at=value), expected_version=1), name
        assert heard.count(EntryKey("github", "odd-inf").digest) == 2, "each save is reported"
        time.sleep(0.45)
        for name in odd:
            assert store.get(EntryKey("github", f"odd-{name}")) is None, f"{name}: the default retention applies"
        if unsubscribe is not None:
            unsubscribe()

    def test_versions_compare_exactly_beyond_2_53(self, storage: Storage) -> None:
        """Versions near and above 2**53 (and clock-derived ones) are stored and compared exactly."""
        login = 1_800_000_000_000_000  # a login's first version: the clock in microseconds
        assert storage.put(KEY, sample_tokens(login), expected_version=None)
        assert storage.put(KEY, sample_tokens(login + 1), expected_version=login)
        assert storage.put(KEY, sample_tokens(2**53 + 1), expected_version=login + 1)
        assert storage.put(KEY, sample_tokens(2**53 + 2), expected_version=2**53) is False, (
            "2**53 must not match 2**53 + 1"
        )
        assert storage.delete(KEY, expected_version=2**53) is False
        assert storage.put(KEY, sample_tokens(2**63 - 1), expected_version=2**53 + 1)
        assert storage.get(KEY) == sample_tokens(2**63 - 1)
        assert storage.put(KEY, sample_tokens(1), expected_version=2**63) is False
        assert storage.delete(KEY, expected_version=2**63 - 1) is True

    def test_versions_outside_0_to_2_63_are_refused(self) -> None:
        """A version no store can hold exactly raises ValueError before anything is written."""
        store = self.new_storage()
        for version in (2**63, -1):
            with pytest.raises(ValueError, match="2\\*\\*63"):
                store.put(KEY, sample_tokens(version), expected_version=None)
        assert store.get(KEY) is None

    def test_session_ids_with_lone_surrogates_are_distinct_entries(self, storage: Storage) -> None:
        """Session ids that are not valid UTF-8 text (lone surrogates) work, and do not collide with look-alikes."""
        odd, replaced = EntryKey("github", "lone-\udc00"), EntryKey("github", "lone-\ufffd")
        assert storage.put(odd, sample_tokens(1), expected_version=None)
        assert storage.put(replaced, sample_tokens(2), expected_version=None)
        assert storage.get(odd) == sample_tokens(1) and storage.get(replaced) == sample_tokens(2)
        assert storage.delete(odd, expected_version=1)
        assert storage.get(odd) is None and storage.get(replaced) == sample_tokens(2)

    # -- listing -----------------------------------------------------------------------------------------
    def test_scan_lists_every_entry_once_across_pages_and_filters_by_provider(self, storage: Storage) -> None:
        """scan() lists each stored key once, over several pages (scan_batch=2), ids with separators and lone
        surrogates included; scan(provider_id) lists only that provider's; a deleted entry is not listed."""
        assert list(storage.scan()) == []
        github = [EntryKey("github", f"session-{n}") for n in range(5)] + [EntryKey("github", "lone-\udc00")]
        others = [EntryKey("gitlab", "session-0"), EntryKey("a:b", "c"), EntryKey("{a}", "b}c{d")]
        for version, key in enumerate(github + others, start=1):
            assert storage.put(key, sample_tokens(version), expected_version=None)
        storage.scan_batch = 2
        listed = list(storage.scan())
        assert sorted(map(repr, listed)) == sorted(map(repr, github + others))  # once each
        assert set(listed) == set(github + others)
        mine = list(storage.scan("github"))
        assert len(mine) == len(github) and set(mine) == set(github)
        assert list(storage.scan("nobody")) == []
        assert storage.delete(github[0])
        assert set(storage.scan()) == set(github[1:] + others)

    def test_scan_lists_expired_access_tokens_but_not_entries_past_retention(self) -> None:
        """scan() lists what get() returns: an entry whose access token expired (its refresh token still
        serves) is listed; an entry past its retention is not."""
        store = self.new_storage(retention=0.3)
        now = time.time()
        stale = EntryKey("github", "access-token-expired")
        going = EntryKey("github", "retention-ends")
        assert store.put(
            stale, sample_tokens(1, expires_at=now - 3600, refresh_expires_at=now + 3600), expected_version=None
        )
        assert store.put(going, sample_tokens(1), expected_version=None)
        assert set(store.scan()) == {stale, going}
        time.sleep(0.45)
        assert list(store.scan()) == [stale]
        assert list(store.scan("github")) == [stale]

    @pytest.mark.anyio
    async def test_ascan_lists_the_entries_like_scan(self, storage: Storage) -> None:
        """ascan() lists each stored key once over several pages, and filters by provider like scan()."""
        keys = [EntryKey("github", f"session-{n}") for n in range(5)] + [EntryKey("gitlab", "session-0")]
        for version, key in enumerate(keys, start=1):
            assert await storage.aput(key, sample_tokens(version), expected_version=None)
        storage.scan_batch = 2
        listed = [key async for key in storage.ascan()]
        assert len(listed) == len(keys) and set(listed) == set(keys)
        assert [key async for key in storage.ascan("gitlab")] == [keys[-1]]

    # -- leases ------------------------------------------------------------------------------------------
    def test_lease_is_exclusive_and_release_is_owner_checked(self, storage: Storage) -> None:
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

    def test_expired_lease_can_be_taken_and_its_old_holder_cannot_release_the_new_one(self, storage: Storage) -> None:
        """After the ttl another worker takes the lease; the late holder's release leaves it alone."""
        stale = storage.acquire_lease(KEY, 0.2)
        assert stale is not None
        time.sleep(0.3)
        fresh = storage.acquire_lease(KEY, 5.0)
        assert fresh is not None
        storage.release_lease(stale)
        assert storage.acquire_lease(KEY, 5.0) is None
        storage.release_lease(fresh)

    def test_renew_extends_only_our_live_lease(self, storage: Storage) -> None:
        """renew_lease keeps our lease past its first ttl; a stranger's, a released or an expired lease is not
        renewed."""
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

    @pytest.mark.anyio
    async def test_arenew_lease_follows_the_contract(self, storage: Storage) -> None:
        """arenew_lease renews our lease and refuses a stranger's."""
        lease = await storage.aacquire_lease(KEY, 5.0)
        assert lease is not None
        assert await storage.arenew_lease(lease) is True
        assert await storage.arenew_lease(Lease(KEY, "not-the-owner", 5.0)) is False
        await storage.arelease_lease(lease)
        assert await storage.arenew_lease(lease) is False

    def test_lease_ttl_must_be_positive_and_finite(self) -> None:
        """A zero, negative, infinite or NaN lease ttl raises ValueError on every backend (no 1 ms lease)."""
        store = self.new_storage()
        for ttl in (0.0, -1.0, float("inf"), float("nan")):
            with pytest.raises(ValueError, match="lease ttl"):
                store.acquire_lease(KEY, ttl)
        lease = store.acquire_lease(KEY, 1e12)  # absurdly long: granted, cut to the longest allowed
        assert lease is not None
        store.release_lease(lease)

    # -- watch -------------------------------------------------------------------------------------------
    def test_watch_returns_at_once_when_version_already_differs(self, storage: Storage) -> None:
        """No waiting when the entry already moved past the version the caller saw (nothing else can end a
        watch of an HOUR here: no write follows)."""
        storage.put(KEY, sample_tokens(1), expected_version=None)
        _returns(lambda: storage.watch(KEY, 0, HOUR))
        _returns(lambda: storage.watch(KEY, None, HOUR))
        _returns(lambda: storage.watch(EntryKey("github", "nobody"), 3, HOUR))

    def test_watch_returns_after_timeout_without_writes(self, storage: Storage) -> None:
        """With no write, watch returns once its timeout has passed, never before, and the entry is unchanged."""
        storage.put(KEY, sample_tokens(1), expected_version=None)
        started = time.monotonic()
        storage.watch(KEY, 1, 0.2)
        assert time.monotonic() - started >= 0.2  # a lower bound only: a loaded machine can only add to it
        assert storage.get(KEY) == sample_tokens(1)

    def test_watch_wakes_on_write_from_another_thread(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        """A save by another thread wakes the watcher: by a notification, not by its periodic re-read."""
        self.disable_rechecks(storage, monkeypatch)
        storage.put(KEY, sample_tokens(1), expected_version=None)
        thread = _write_later(storage, 0.1)
        _returns(lambda: storage.watch(KEY, 1, HOUR))
        thread.join()
        assert storage.get(KEY) == sample_tokens(2)

    @pytest.mark.anyio
    async def test_awatch_wakes_on_write_from_another_thread(
        self, storage: Storage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The async watch is woken by a save in another thread (not by a re-read)."""
        self.disable_rechecks(storage, monkeypatch)
        await storage.aput(KEY, sample_tokens(1), expected_version=None)
        thread = _write_later(storage, 0.1)
        with anyio.fail_after(PATIENCE):
            await storage.awatch(KEY, 1, HOUR)
        await anyio.to_thread.run_sync(thread.join)
        assert await storage.aget(KEY) == sample_tokens(2)

    def test_watch_wakes_on_write_from_another_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A save by another process wakes the watcher by a notification: sync, and async on each event loop."""
        opener = self._shared_opener()
        store = self.new_storage()
        self.disable_rechecks(store, monkeypatch)
        store.put(KEY, sample_tokens(1), expected_version=None)
        with StoreWorker(opener, KEY, "write", "1", "0.15") as worker:
            assert worker.read() == {"ready": True}
            for version, api in enumerate(["sync", *self.event_loops], start=1):
                if api == "sync":
                    worker.go()  # the worker saves version + 1 in 0.15 s; we are watching long before
                    _returns(functools.partial(store.watch, KEY, version, HOUR))
                else:
                    anyio.run(_go_then_awatch, store, worker, version, backend=api)
                worker.read()  # {"wrote_at": ...}
                assert store.get(KEY) == UpstreamTokens(access_token="at-new", version=version + 1)
            assert worker.stdin is not None
            worker.stdin.close()  # the worker exits at end of input
        assert worker.returncode == 0

    @pytest.mark.anyio
    async def test_awatch_is_cancellable(self, storage: Storage) -> None:
        """Cancelling an async watch ends it (it could not have ended on its own: its timeout is an HOUR and
        nothing is written)."""
        await storage.aput(KEY, sample_tokens(1), expected_version=None)
        with anyio.fail_after(PATIENCE), anyio.move_on_after(0.1) as scope:
            await storage.awatch(KEY, 1, HOUR)
        assert scope.cancelled_caught
        # The storage is still usable afterwards.
        assert await storage.aput(KEY, sample_tokens(2), expected_version=1)

    # -- subscribe ---------------------------------------------------------------------------------------
    def test_subscribe_reports_this_objects_saves_and_deletes_until_unsubscribed(self, storage: Storage) -> None:
        """Each save and delete through the storage calls the subscriber once with the key's digest."""
        heard: list[str | None] = []
        unsubscribe = storage.subscribe(heard.append)
        assert unsubscribe is not None
        storage.put(KEY, sample_tokens(1), expected_version=None)
        assert storage.put(KEY, sample_tokens(9), expected_version=5) is False  # no write, no report
        storage.delete(KEY)
        assert heard == [KEY.digest, KEY.digest]
        unsubscribe()
        storage.put(KEY, sample_tokens(1), expected_version=None)
        assert heard == [KEY.digest, KEY.digest]

    def test_subscribe_hears_another_process_delete_once_and_in_order(self) -> None:
        """Another process's delete reaches the callback with the digest, after our save, reported once (no echo)."""
        opener = self._shared_opener()
        store = self.new_storage()
        heard: list[str | None] = []
        deleted = threading.Event()

        def on_change(digest: str | None) -> None:
            heard.append(digest)
            if len(heard) >= 2:
                deleted.set()

        unsubscribe = store.subscribe(on_change)
        assert unsubscribe is not None
        with StoreWorker(opener, KEY, "delete") as worker:
            assert worker.read() == {"ready": True}
            assert store.put(KEY, sample_tokens(1), expected_version=None)
            worker.go()
            assert worker.read() == {"deleted": True}
            assert deleted.wait(10.0), f"the other process's delete was not reported: {heard}"
        assert heard == [KEY.digest, KEY.digest]
        unsubscribe()

    def test_subscribe_hears_every_save_of_other_processes(self) -> None:
        """4 processes racing compare-and-set: the subscriber hears exactly one digest per successful save."""
        opener = self._shared_opener()
        store = self.new_storage()
        heard: list[str | None] = []
        unsubscribe = store.subscribe(heard.append)
        assert unsubscribe is not None
        with contextlib.ExitStack() as stack:
            workers = [stack.enter_context(StoreWorker(opener, KEY, "increment", "25")) for _ in range(4)]
            for worker in workers:
                assert worker.read() == {"ready": True}
            for worker in workers:
                worker.go()
            saves = sum(worker.read()["successes"] for worker in workers)
        deadline = time.monotonic() + 20
        while len(heard) < saves and time.monotonic() < deadline:
            time.sleep(0.01)
        unsubscribe()
        assert heard == [KEY.digest] * saves

    @pytest.mark.anyio
    async def test_subscribe_hears_async_writes(self, storage: Storage) -> None:
        """Saves and deletes through the async twins are reported too."""
        heard: list[str | None] = []
        # subscribe is sync (it may open the store's change feed): from a worker thread, off the event loop
        unsubscribe = await anyio.to_thread.run_sync(storage.subscribe, heard.append)
        assert unsubscribe is not None
        await storage.aput(KEY, sample_tokens(1), expected_version=None)
        await storage.adelete(KEY, expected_version=1)
        assert heard[:2] == [KEY.digest, KEY.digest]
        unsubscribe()

    # -- async twins -------------------------------------------------------------------------------------
    @pytest.mark.anyio
    async def test_async_twins_follow_the_contract(self, storage: Storage) -> None:
        """aget/aput/adelete/leases/awatch behave like their sync twins."""
        await check_async_contract(storage, KEY)

    def test_one_storage_serves_successive_event_loops_and_threads(self) -> None:
        """The same object works across successive anyio.run calls (each event loop, then the first again)
        and from threads."""
        store = self.new_storage()
        for number, library in enumerate([*self.event_loops, self.event_loops[0]]):
            anyio.run(check_async_contract, store, EntryKey("loops", f"run-{number}"), backend=library)
            assert store.get(EntryKey("loops", f"run-{number}")) is None
        failures: list[BaseException] = []

        def in_thread(number: int) -> None:
            try:
                anyio.run(check_async_contract, store, EntryKey("threads", f"t-{number}"), backend=self.event_loops[0])
                check_sync_contract(store, EntryKey("threads", f"s-{number}"))
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=in_thread, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        anyio.run(check_async_contract, store, EntryKey("loops", "last"), backend=self.event_loops[0])

    def test_many_tasks_at_once_on_a_new_event_loop(self) -> None:
        """Ten tasks whose first calls race on a fresh event loop all succeed (the first event loop twice,
        then the others)."""
        store = self.new_storage()

        async def cycle(key: EntryKey) -> None:
            assert await store.aput(key, sample_tokens(1), expected_version=None)
            assert await store.aget(key) == sample_tokens(1)
            assert await store.adelete(key, expected_version=1)

        async def many(run: int) -> None:
            async with anyio.create_task_group() as group:
                for task in range(10):
                    group.start_soon(cycle, EntryKey("many", f"{run}-{task}"))

        for run, library in enumerate([self.event_loops[0], *self.event_loops]):
            anyio.run(many, run, backend=library)

    # -- secrets -----------------------------------------------------------------------------------------
    def test_repr_of_storage_shows_no_secret(self, storage: Storage) -> None:
        """No token appears in the storage's repr or str, even after writes."""
        storage.put(KEY, sample_tokens(1), expected_version=None)
        storage.get(KEY)
        for text in (repr(storage), str(storage)):
            assert "secret" not in text

    # -- concurrency -------------------------------------------------------------------------------------
    def test_concurrent_compare_and_set_from_threads_loses_no_update(self, storage: Storage) -> None:
        """8 threads incrementing through compare-and-set: the final version equals the successful puts."""
        successes = [0] * 8

        def increment(slot: int) -> None:
            for _ in range(25):
                current = storage.get(KEY)
                version = 0 if current is None else current.version
                if storage.put(KEY, sample_tokens(version + 1), expected_version=None if current is None else version):
                    successes[slot] += 1

        threads = [threading.Thread(target=increment, args=(slot,)) for slot in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        final = storage.get(KEY)
        assert final is not None and final.version == sum(successes) > 0

    def test_concurrent_compare_and_set_from_processes_loses_no_update(self) -> None:
        """4 processes incrementing through compare-and-set: the final version equals the successful puts."""
        opener = self._shared_opener()
        store = self.new_storage()
        with contextlib.ExitStack() as stack:
            workers = [stack.enter_context(StoreWorker(opener, KEY, "increment", "40")) for _ in range(4)]
            for worker in workers:
                assert worker.read() == {"ready": True}
            for worker in workers:  # all start together, for contention
                worker.go()
            successes = [worker.read()["successes"] for worker in workers]
        final = store.get(KEY)
        assert final is not None and final.version == sum(successes) >= 40
