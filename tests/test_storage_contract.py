"""One contract for every storage backend: memory, SQLite, Redis and Redis Cluster behave the same.

The suite ships with the package (``httpx_upstream_auth.testing.contract``, so a third-party backend runs
it too); here it runs against each of ours, followed by what is specific to SQLite and to Redis.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_servers import RedisCluster, RedisServer
from storage_fixtures import REPO, redis_cluster, redis_opener, redis_server, sqlite_opener

from httpx_upstream_auth import EntryKey, Lease, MemoryStorage, RedisStorage, SQLiteStorage, Storage, StorageError
from httpx_upstream_auth.testing.contract import (
    CROSS_PROCESS_TESTS,
    StorageContract,
    check_async_contract,
    check_sync_contract,
)
from httpx_upstream_auth.testing.contract import sample_tokens as tokens

__all__ = ["redis_cluster", "redis_server", "tokens"]  # fixtures used below; tokens for the other storage tests

KEY = EntryKey("github", "session-1")
#: A timeout no test waits out: a watch given it returns only because of what the test did.
HOUR = 3600.0
#: Bounds on waits for something the test caused (waits, not assertions: generous for a loaded machine).
PATIENCE = 30.0
#: A Redis URL for tests that build a RedisStorage without ever connecting.
UNUSED_URL = "redis://127.0.0.1:1/0"


# -- the contract, on each backend ---------------------------------------------------------------------------
class TestMemoryStorage(StorageContract):
    """The contract on MemoryStorage (one process: no opener, so the cross-process tests are not collected)."""

    def make_storage(self, **options: Any) -> Storage:
        # Memory entries live in one object: a second storage would be a second store.
        if options:
            return MemoryStorage(**options)
        if not hasattr(self, "shared"):
            self.shared = MemoryStorage()
        return self.shared


class TestSQLiteStorage(StorageContract):
    """The contract on a SQLite file of the test's own."""

    @pytest.fixture(autouse=True)
    def _file(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "tokens.db")

    def make_storage(self, **options: Any) -> Storage:
        return SQLiteStorage(self.path, **options)

    def opener(self) -> str:
        return sqlite_opener(self.path)

    def disable_rechecks(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(storage, "recheck_interval", HOUR)


class TestRedisStorage(StorageContract):
    """The contract on a real redis-server, under a key prefix of the test's own."""

    server = "redis_server"

    @pytest.fixture(autouse=True)
    def _prefix(self, request: pytest.FixtureRequest) -> None:
        self.url = request.getfixturevalue(self.server).url
        self.prefix = f"t{uuid.uuid4().hex[:10]}"

    def make_storage(self, **options: Any) -> Storage:
        return RedisStorage.from_url(self.url, prefix=self.prefix, **options)

    def opener(self) -> str:
        return redis_opener(self.url, self.prefix)

    def disable_rechecks(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(storage, "recheck_interval", HOUR)


class TestRedisCluster(TestRedisStorage):
    """The contract on a real three-primary Redis Cluster."""

    server = "redis_cluster"


# -- the suite outside this repository's tests ------------------------------------------------------------
#: The third-party backend docs/storage.md's example tests: SQLite behind a DSN, in a module of its own.
THEIR_PACKAGE = """
from httpx_upstream_auth import SQLiteStorage


class MyStorage(SQLiteStorage):
    def __init__(self, dsn, **options):
        super().__init__(dsn.removeprefix("sqlite:///"), **options)
"""


def test_the_documented_way_runs_the_shipped_suite_in_a_test_tree_of_its_own(tmp_path: Path) -> None:
    """docs/storage.md's example, as written, in a folder of its own (no conftest, none of our helpers
    importable), runs the whole shipped suite with plain pytest and anyio's plugin, cross-process tests
    included: every test passes, none is skipped."""
    section = (REPO / "docs" / "storage.md").read_text().split("## Writing your own", 1)[1]
    (tmp_path / "test_my_storage.py").write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    (tmp_path / "my_package.py").write_text(THEIR_PACKAGE)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    tests = [name for name in dir(StorageContract) if name.startswith("test_")]
    counted = re.search(r"\b(\d+) passed in", result.stdout)
    assert counted is not None and int(counted.group(1)) >= len(tests), result.stdout
    assert "skipped" not in result.stdout, result.stdout


def test_a_suite_without_opener_holds_no_cross_process_test_and_one_with_it_holds_them_all() -> None:
    """A suite that does not override opener() declares a store of one process: the cross-process tests are not
    collectable from it (not skipped: not there); overriding opener(), even below such a suite, brings them back."""

    class OneProcess(StorageContract):
        pass

    class Shared(OneProcess):
        def opener(self) -> str:
            return "storage = None"

    assert CROSS_PROCESS_TESTS and all(name in dir(StorageContract) for name in CROSS_PROCESS_TESTS)
    one_process: list[type[StorageContract]] = [OneProcess, TestMemoryStorage]
    shared: list[type[StorageContract]] = [Shared, TestSQLiteStorage, TestRedisCluster]
    for suite in one_process:
        assert [getattr(suite, name) for name in CROSS_PROCESS_TESTS] == [None] * len(CROSS_PROCESS_TESTS)
    for suite in shared:
        assert all(getattr(suite, name) is getattr(StorageContract, name) for name in CROSS_PROCESS_TESTS)
    # the in-process tests stay in every suite; a suite says what it must implement
    assert callable(OneProcess.test_concurrent_compare_and_set_from_threads_loses_no_update)
    assert OneProcess().opener() is None
    with pytest.raises(NotImplementedError, match="OneProcess must implement make_storage"):
        OneProcess().make_storage()


class _MinimalStorage(Storage):
    """A third-party backend that implements only the abstract surface (no scan)."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[EntryKey, Any] = {}

    def get(self, key: EntryKey) -> Any:
        return self.entries.get(key)

    def put(self, key: EntryKey, tokens: Any, *, expected_version: int | None) -> bool:
        self.entries[key] = tokens
        return True

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        return self.entries.pop(key, None) is not None


@pytest.mark.anyio
async def test_a_backend_without_scan_says_it_cannot_list_rather_than_list_nothing() -> None:
    """scan() and ascan() of a backend that does not implement them raise NotImplementedError naming the
    backend, even when it holds entries (an empty listing would read as "no sessions")."""
    storage = _MinimalStorage()
    storage.put(KEY, tokens(1), expected_version=None)
    with pytest.raises(NotImplementedError, match="_MinimalStorage cannot list its entries"):
        storage.scan()
    with pytest.raises(NotImplementedError, match="_MinimalStorage cannot list its entries"):
        [key async for key in storage.ascan()]


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
    owner_port = store._sync.get_node_from_key(store._keys.entry(KEY)).port
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
        names = [store._keys.entry(key), store._keys.lease(key)]
        assert len({key_slot(name.encode()) for name in names}) == 1
        assert all(key.session_id not in name for name in names)
    assert store._keys.entry(KEY) == f"hua:{{{KEY.digest}}}:entry"
    with pytest.raises(ValueError, match="prefix"):
        RedisStorage.from_url(UNUSED_URL, prefix="a{b}")
    store.close()


def test_redis_scan_lists_only_readable_entries_of_its_own_prefix(redis_server: RedisServer) -> None:
    """scan and ascan list this prefix's entries only, a page of one name at a time among 60 other keys (so some
    pages find nothing): not another prefix's (one the unescaped glob of ours would match), nor a lease, nor
    keys that only look like entries (no JSON, unreadable JSON, JSON without the ids)."""
    import redis

    ours, theirs = (
        RedisStorage.from_url(redis_server.url, prefix="p*"),
        RedisStorage.from_url(redis_server.url, prefix="pX"),
    )
    raw = redis.Redis.from_url(redis_server.url)
    try:
        mine = [EntryKey("github", "a"), EntryKey("gitlab", "b")]
        for key in mine:
            assert ours.put(key, tokens(1), expected_version=None)
        assert theirs.put(EntryKey("github", "theirs"), tokens(1), expected_version=None)
        lease = ours.acquire_lease(mine[0], 30.0)
        assert lease is not None
        raw.mset({f"p*:junk:{n}": "x" for n in range(60)})
        odd = {"0": None, "1": "not json", "2": '["x"]', "3": '{"access_token": "x"}', "4": '{"entry_key": [1, 2]}'}
        for digit, data in odd.items():
            raw.hset(f"p*:{{{digit * 32}}}:entry", "v", "1")
            if data is not None:
                raw.hset(f"p*:{{{digit * 32}}}:entry", "d", data)
        ours.scan_batch = 1
        listed = list(ours.scan())
        assert len(listed) == 2 and set(listed) == set(mine)
        assert list(ours.scan("gitlab")) == [mine[1]]

        async def alist() -> list[EntryKey]:
            return [key async for key in ours.ascan()]

        found = anyio.run(alist, backend="asyncio")
        assert len(found) == 2 and set(found) == set(mine)
        ours.release_lease(lease)
    finally:
        ours.close()
        theirs.close()
        raw.close()


def test_memory_scan_skips_an_entry_deleted_after_it_began() -> None:
    """MemoryStorage.scan lists from a snapshot of the keys, and leaves out an entry deleted meanwhile."""
    store = MemoryStorage()
    first, second = EntryKey("github", "a"), EntryKey("github", "b")
    store.put(first, tokens(1), expected_version=None)
    store.put(second, tokens(1), expected_version=None)
    listing = store.scan()
    assert next(listing) == first
    assert store.delete(second)
    assert list(listing) == []


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
        await check_async_contract(store, EntryKey("given", "async"))
        await async_client.aclose()

    anyio.run(with_async_client, backend="asyncio")
    assert store is not None
    check_sync_contract(store, EntryKey("given", "sync"))
    # Another loop cannot use the asyncio client bound to the first: the sync client serves it.
    anyio.run(check_async_contract, store, EntryKey("given", "second-loop"), backend="asyncio")
    anyio.run(check_async_contract, store, EntryKey("given", "trio"), backend="trio")
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
    writes = threading.Timer(0.1, writer.put, args=(KEY, tokens(2)), kwargs={"expected_version": 1})
    writes.start()
    watching = threading.Thread(target=store.watch, args=(KEY, 1, HOUR), daemon=True)
    watching.start()
    watching.join(PATIENCE)
    assert not watching.is_alive(), "the watch did not return"
    writes.join()
    assert store.get(KEY) == tokens(2)
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

    monkeypatch.setitem(store._commands().scripts, "cas", refuse)
    with pytest.raises(StorageError, match="refused") as caught:
        store.put(KEY, tokens(1), expected_version=None)
    assert "secret" not in str(caught.value) and caught.value.__cause__ is None
    store.close()


def test_redis_module_imports_without_redis_and_names_the_extra() -> None:
    """Without redis-py the package imports, and constructing RedisStorage says which extra to install."""
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from httpx_upstream_auth import RedisStorage\n"
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
