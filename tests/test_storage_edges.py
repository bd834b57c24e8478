"""The storages' rare paths, each on a real store: files another program holds or made, writes the database
refuses midway, subscribers that read or close their store from a callback, clients of one kind only, and the
change hub's removers called twice."""

from __future__ import annotations

import gc
import logging
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_servers import RedisCluster, RedisServer
from storage_fixtures import redis_cluster, redis_server
from test_storage_contract import tokens

from httpx_upstream_auth import EntryKey, RedisStorage, SQLiteStorage, StorageError
from httpx_upstream_auth._changes import ChangeHub, feed_of

__all__ = ["redis_cluster", "redis_server"]  # fixtures used below

KEY = EntryKey("github", "session-edges")
#: Bounds on waits for something the test caused (waits, not assertions).
PATIENCE = 30.0
#: A timeout no test waits out.
HOUR = 3600.0
#: A Redis URL for stores that never connect.
UNUSED_URL = "redis://127.0.0.1:1/0"


def _raw(path: Path) -> sqlite3.Connection:
    """A plain sqlite3 connection to the file: another program using it."""
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


# -- SQLite: opening files others hold or made --------------------------------------------------------------
def test_opening_a_file_another_writer_holds_retries_within_the_timeout_then_says_so(tmp_path: Path) -> None:
    """While another program holds the write lock of a file still in rollback mode, the switch to WAL is retried
    until the timeout, then refused with a StorageError saying to retry; released meanwhile, the open succeeds."""
    path = tmp_path / "tokens.db"
    other = _raw(path)
    other.execute("CREATE TABLE theirs (x)")
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StorageError, match=r"stayed locked by another writer for more than 0\.2s; retry"):
        SQLiteStorage(path, timeout=0.2)
    releases = threading.Timer(0.1, other.execute, args=("ROLLBACK",))
    releases.start()
    store = SQLiteStorage(path, timeout=PATIENCE)  # busy at first: it retried until the lock was released
    releases.join()
    assert store.put(KEY, tokens(1), expected_version=None)
    store.close()
    other.close()


def test_a_file_of_a_newer_schema_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    """A file a newer version wrote (a higher user_version) is refused, saying to upgrade, and not touched."""
    path = tmp_path / "tokens.db"
    other = _raw(path)
    other.execute("PRAGMA user_version = 99")
    with pytest.raises(StorageError, match=r"written by a newer httpx-upstream-auth \(schema 99.*upgrade"):
        SQLiteStorage(path)
    assert other.execute("PRAGMA user_version").fetchone()[0] == 99
    assert other.execute("SELECT name FROM sqlite_master").fetchall() == []
    other.close()


def test_a_file_holding_another_programs_entries_table_is_refused_unchanged(tmp_path: Path) -> None:
    """A file whose 'entries' table is another program's fails the schema creation midway: StorageError, and
    none of our tables is left behind (the half-made schema is rolled back)."""
    path = tmp_path / "tokens.db"
    other = _raw(path)
    other.execute("CREATE TABLE entries (theirs TEXT)")
    with pytest.raises(StorageError, match="could not open the database in the SQLite token store"):
        SQLiteStorage(path)
    assert other.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall() == [("entries",)]
    assert other.execute("PRAGMA user_version").fetchone()[0] == 0
    other.close()


def test_a_store_whose_companion_files_cannot_be_inspected_is_refused(tmp_path: Path) -> None:
    """A name so long that its -journal companion's name is too long for the file system: StorageError saying
    what to check, before SQLite writes anything."""
    path = tmp_path / ("t" * 250)  # "-journal" takes its name past 255 bytes
    with pytest.raises(StorageError, match=r"cannot inspect the SQLite token store file .*-journal"):
        SQLiteStorage(path)


def test_a_readable_file_that_cannot_be_made_private_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An existing file readable by others whose chmod fails is refused, saying to chmod 600 it."""
    path = tmp_path / "tokens.db"
    path.touch(mode=0o644)
    path.chmod(0o644)

    def refuse(*_: Any, **__: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    with pytest.raises(StorageError, match=r"readable by other users .*could not be made private.*chmod 600 it"):
        SQLiteStorage(path)


# -- SQLite: writes refused midway, subscribers that use the store ------------------------------------------
def test_a_write_the_database_refuses_midway_raises_storage_error_and_writes_nothing(tmp_path: Path) -> None:
    """A save whose change-log row the database refuses (a trigger of another program here), after the entry
    was written in the same transaction: StorageError, no entry, nothing reported, and the store stays
    writable (the transaction was rolled back, its write lock released)."""
    path = tmp_path / "tokens.db"
    store, reader = SQLiteStorage(path, timeout=1.0), SQLiteStorage(path, timeout=1.0)
    heard: list[str | None] = []
    unsubscribe = store.subscribe(heard.append)
    assert unsubscribe is not None
    other = _raw(path)
    other.execute("CREATE TRIGGER refuse AFTER INSERT ON changes BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(StorageError, match=r"could not save tokens .*IntegrityError: refused"):
        store.put(KEY, tokens(1), expected_version=None)
    assert reader.get(KEY) is None and heard == []
    other.execute("DROP TRIGGER refuse")
    assert reader.put(KEY, tokens(1), expected_version=None)  # within its 1 s timeout: no lock left held
    assert store.put(KEY, tokens(2), expected_version=1)
    unsubscribe()
    for closing in (store, reader, other):
        closing.close()


def test_a_subscriber_may_read_the_store_from_its_callback(tmp_path: Path) -> None:
    """A callback told of another object's save reads the store from the change feed's thread (an operation
    inside the feed's own) and finds the new entry."""
    path = tmp_path / "tokens.db"
    store, writer = SQLiteStorage(path), SQLiteStorage(path)
    read: list[Any] = []
    done = threading.Event()

    def on_change(digest: str | None) -> None:
        read.append(store.get(KEY))
        done.set()

    unsubscribe = store.subscribe(on_change)
    assert unsubscribe is not None
    assert writer.put(KEY, tokens(1), expected_version=None)
    assert done.wait(PATIENCE)
    assert read == [tokens(1)]
    unsubscribe()
    store.close()
    writer.close()


def test_subscribing_to_a_closed_store_raises_and_keeps_no_subscriber(tmp_path: Path) -> None:
    """subscribe() on a closed SQLiteStorage raises StorageError, and the callback it refused is not kept: a
    change reported afterwards does not reach it."""
    store = SQLiteStorage(tmp_path / "tokens.db")
    store.close()
    heard: list[str | None] = []
    with pytest.raises(StorageError, match="closed"):
        store.subscribe(heard.append)
    store.notify_change(KEY)
    assert heard == []


def test_a_sweep_the_database_refuses_does_not_keep_other_writers_saves_from_subscribers(tmp_path: Path) -> None:
    """When the background sweep of expired entries fails (a trigger of another program refuses it), the poller
    still reports other writers' saves (the failed sweep waits for the next one due, rather than failing again
    at every round before the change log is read), and the refused delete left the row."""
    path = tmp_path / "tokens.db"
    store, writer = SQLiteStorage(path), SQLiteStorage(path)
    other = _raw(path)
    # A row long past its retention, as an older writer left it; the sweep may not delete it for now.
    other.execute("INSERT INTO entries VALUES ('github', 'expired', 1, '{}', 0)")
    other.execute("CREATE TRIGGER refuse BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'refused'); END")
    heard: list[str | None] = []
    unsubscribe = store.subscribe(heard.append)
    assert unsubscribe is not None
    keys = [EntryKey("github", f"after-{n}") for n in range(3)]
    for key in keys:  # the first save starts the sweep, which fails
        assert writer.put(key, tokens(1), expected_version=None)
    deadline = time.monotonic() + PATIENCE
    while len(heard) < len(keys) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert heard == [key.digest for key in keys]
    assert other.execute("SELECT count(*) FROM entries WHERE session_id = 'expired'").fetchone() == (1,)
    unsubscribe()
    for closing in (store, writer, other):
        closing.close()


# -- the change hub ------------------------------------------------------------------------------------------
def test_a_waiters_remover_called_twice_leaves_the_other_waiters() -> None:
    """Removing a waiter twice is harmless, and the other waiters of that digest still wake."""
    hub = ChangeHub()
    woken: list[str] = []
    first = hub.add_waiter("d", lambda: woken.append("first"))
    hub.add_waiter("d", lambda: woken.append("second"))
    first()
    first()
    hub.publish("d", None)
    assert woken == ["second"]
    lone = hub.add_waiter("e", lambda: woken.append("lone"))
    lone()
    lone()  # its digest has no waiter left at all now
    hub.publish("e", None)
    assert woken == ["second"]


def test_a_feed_whose_owner_is_gone_calls_nothing_and_leaves_its_hub_once(caplog: pytest.LogCaptureFixture) -> None:
    """A feed outliving its owner calls no callback; it removes itself from the hub at the first change after,
    once, and without a remover it just does nothing."""

    class Owner:
        def __init__(self) -> None:
            self.callbacks = [lambda digest: called.append(digest)]

    called: list[str | None] = []
    removed: list[bool] = []
    owner = Owner()
    with_remover, without = feed_of(owner, lambda o: o.callbacks), feed_of(owner, lambda o: o.callbacks)
    with_remover.remove = lambda: removed.append(True)
    with_remover("d")
    assert called == ["d"]
    del owner
    gc.collect()
    for _ in range(2):
        with_remover("d")
        without("d")
    assert called == ["d"] and removed == [True]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_the_poller_reports_a_burst_of_writes_in_order(tmp_path: Path) -> None:
    """Many saves by another object reach a subscriber each once, in order (the poller's place in the log only
    moves forward)."""
    path = tmp_path / "tokens.db"
    store, writer = SQLiteStorage(path), SQLiteStorage(path)
    heard: list[str | None] = []
    unsubscribe = store.subscribe(heard.append)
    assert unsubscribe is not None
    keys = [EntryKey("github", f"burst-{n}") for n in range(30)]
    for key in keys:
        assert writer.put(key, tokens(1), expected_version=None)
    deadline = time.monotonic() + PATIENCE
    while len(heard) < len(keys) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert heard == [key.digest for key in keys]
    unsubscribe()
    store.close()
    writer.close()


# -- Redis: constructors, clients of one kind, the change feed ------------------------------------------------
def test_redis_constructor_checks_and_defaults() -> None:
    """Bad replica waits raise ValueError; with no client the store targets localhost:6379 (without connecting);
    close() twice is harmless."""
    for options in ({"wait_replicas": -1}, {"wait_replicas": 1, "wait_timeout": 2.0, "socket_timeout": 2.0}):
        with pytest.raises(ValueError, match="wait_timeout a positive number of seconds below socket_timeout"):
            RedisStorage.from_url(UNUSED_URL, **options)
    default = RedisStorage()
    assert "localhost:6379" in repr(default)
    default.close()
    default.close()
    with pytest.raises(StorageError, match="closed"):
        default.get(KEY)


def test_redis_with_only_an_asyncio_client_serves_its_loop_and_says_what_else_it_needs(
    redis_server: RedisServer,
) -> None:
    """A store given only a redis.asyncio client serves asyncio on that loop (watches poll: no pub/sub without a
    sync client; subscribers hear its own writes), and says to pass client= when sync code or trio calls it."""
    import redis.asyncio

    prefix = f"async-only-{uuid.uuid4().hex[:8]}"
    heard: list[str | None] = []

    async def on_asyncio() -> RedisStorage:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        store = RedisStorage(async_client=client, prefix=prefix)
        unsubscribe = store.subscribe(heard.append)
        assert unsubscribe is not None
        assert await store.aput(KEY, tokens(1), expected_version=None)
        with anyio.fail_after(PATIENCE):
            await store.awatch(KEY, None, HOUR)  # at version 1 already
        await store.awatch(KEY, 1, 0.05)  # its timeout: nothing writes
        assert await store.aput(KEY, tokens(2), expected_version=1)
        assert await store.aget(KEY) == tokens(2)
        with pytest.raises(RuntimeError, match="pass client= as well"):
            store.get(KEY)
        unsubscribe()
        await client.aclose()
        return store

    store = anyio.run(on_asyncio, backend="asyncio")
    assert heard == [KEY.digest, KEY.digest]
    with pytest.raises(RuntimeError, match="pass client= as well"):
        anyio.run(store.aget, KEY, backend="trio")
    store.close()


def test_redis_replica_waits_refuse_impossible_versions_and_warn_on_a_cluster(
    redis_server: RedisServer, redis_cluster: RedisCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """With wait_replicas, a put expecting a version no entry can have writes nothing; on a Cluster (no replicas
    here) the save lands on the primary of its slot and warns that no replica has it."""
    prefix = f"wait-{uuid.uuid4().hex[:8]}"
    alone = RedisStorage.from_url(redis_server.url, prefix=prefix, wait_replicas=1, wait_timeout=0.05)
    for impossible in (-1, 2**63):
        assert alone.put(KEY, tokens(1), expected_version=impossible) is False
    assert alone.get(KEY) is None
    alone.close()
    cluster = RedisStorage.from_url(redis_cluster.url, prefix=prefix, wait_replicas=1, wait_timeout=0.05)
    with caplog.at_level(logging.WARNING, logger="httpx_upstream_auth"):
        assert cluster.put(KEY, tokens(1), expected_version=None)
    assert cluster.get(KEY) == tokens(1)
    assert [record.getMessage() for record in caplog.records if "replicas" in record.getMessage()] == [
        f"a save reached 0 of 1 replicas of Redis Cluster at {redis_cluster.url.split('://')[1].split('/')[0]} "
        "within 0.05s; a failover now could lose it"
    ]
    assert cluster.delete(KEY)
    cluster.close()


def test_a_subscriber_may_close_its_redis_storage_from_its_callback(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A callback told of another writer's save, in the change feed's thread, may close its own storage: the
    feed stops without waiting for itself, and nothing is logged as a subscriber error."""
    prefix = f"closing-{uuid.uuid4().hex[:8]}"
    store, writer = (RedisStorage.from_url(redis_server.url, prefix=prefix) for _ in range(2))
    closed = threading.Event()

    def on_change(digest: str | None) -> None:
        store.close()
        closed.set()

    assert store.subscribe(on_change) is not None
    assert writer.put(KEY, tokens(1), expected_version=None)
    assert closed.wait(PATIENCE)
    with pytest.raises(StorageError, match="closed"):
        store.get(KEY)
    assert not [record for record in caplog.records if "subscriber raised" in record.getMessage()]
    writer.close()


def test_a_feed_whose_subscription_is_not_confirmed_reconnects_and_says_it_may_have_missed_changes(
    redis_server: RedisServer,
) -> None:
    """With the server frozen, the pub/sub listener gives up on an unconfirmed SUBSCRIBE at the socket timeout;
    once the server answers it subscribes again and tells subscribers it cannot tell what changed meanwhile
    (None), then reports saves as before."""
    prefix = f"unconfirmed-{uuid.uuid4().hex[:8]}"
    # No handshake to answer (RESP2: no HELLO; driver_info=None: no CLIENT SETINFO): the connection opens at
    # once, and only the SUBSCRIBE goes unanswered.
    store = RedisStorage.from_url(redis_server.url, prefix=prefix, socket_timeout=0.2, protocol=2, driver_info=None)
    writer = RedisStorage.from_url(redis_server.url, prefix=prefix)
    heard: list[str | None] = []
    redis_server.pause()
    try:
        unsubscribe = store.subscribe(heard.append)  # returns after the socket timeout, the listener down
    finally:
        redis_server.resume()
    assert unsubscribe is not None
    deadline = time.monotonic() + PATIENCE
    while not heard and time.monotonic() < deadline:
        time.sleep(0.01)
    assert heard == [None]
    assert writer.put(KEY, tokens(1), expected_version=None)
    while len(heard) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert heard == [None, KEY.digest]
    unsubscribe()
    store.close()
    writer.close()


def test_a_cluster_loop_client_that_cannot_connect_fails_every_task_then_recovers(
    redis_cluster: RedisCluster,
) -> None:
    """On a new event loop with the Cluster's node of the URL frozen, the task preparing the loop's client fails with
    StorageError, and the task that waited for it tries again itself (and fails the same); once the nodes
    answer, the same store serves a new loop."""
    store = RedisStorage.from_url(redis_cluster.url, prefix=f"loops-{uuid.uuid4().hex[:8]}", socket_timeout=0.2)
    assert store.put(KEY, tokens(1), expected_version=None)
    failures: list[BaseException] = []

    async def read() -> None:
        try:
            await store.aget(KEY)
        except StorageError as exc:
            failures.append(exc)

    async def two_tasks() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(read)
            group.start_soon(read)

    # The node the URL names: a new client learns the Cluster from it alone. Frozen well under
    # cluster-node-timeout, so the Cluster does not fail it.
    redis_cluster.nodes[0].pause()
    try:
        anyio.run(two_tasks, backend="asyncio")
    finally:
        redis_cluster.nodes[0].resume()
    assert len(failures) == 2 and all("unreachable" in str(exc) for exc in failures), failures
    assert anyio.run(store.aget, KEY, backend="asyncio") == tokens(1)
    assert store.delete(KEY)
    store.close()


# -- Redis: the event loops' clients, closed from outside their loop -------------------------------------------
def _named(url: str, name: str) -> int:
    """How many connections named ``name`` the server at ``url`` holds."""
    import redis

    with redis.Redis.from_url(url) as raw:
        return sum(1 for client in raw.client_list() if client["name"] == name)


def _until_none_named(urls: list[str], name: str) -> int:
    """Wait (bounded) until no server in ``urls`` holds a connection named ``name``; how many are left."""
    deadline = time.monotonic() + PATIENCE
    while (left := sum(_named(url, name) for url in urls)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def test_closing_a_redis_store_from_another_thread_has_a_running_loop_close_its_connections(
    redis_server: RedisServer,
) -> None:
    """close() from another thread while an event loop that used the store still runs closes that loop's
    connections on the loop, at once (not when the loop ends)."""
    name = f"running-{uuid.uuid4().hex[:8]}"
    store = RedisStorage.from_url(redis_server.url, prefix=name, client_name=name)
    opened, closed = threading.Event(), threading.Event()
    left: list[int] = []

    async def main() -> None:
        await store.aget(KEY)  # opens this loop's connection
        opened.set()
        await anyio.to_thread.run_sync(closed.wait)
        left.append(await anyio.to_thread.run_sync(_until_none_named, [redis_server.url], name))

    thread = threading.Thread(target=anyio.run, args=(main,), kwargs={"backend": "asyncio"})
    thread.start()
    assert opened.wait(PATIENCE)
    assert _named(redis_server.url, name) == 1
    store.close()
    closed.set()
    thread.join(PATIENCE)
    assert left == [0]


def test_closing_a_redis_store_after_its_loop_stopped_closes_the_loops_sockets(redis_server: RedisServer) -> None:
    """A loop that ran the store and stopped without being closed (run_until_complete): close() closes its
    connections directly, the live one and the one a timeout already disconnected alike."""
    import asyncio

    name = f"stopped-{uuid.uuid4().hex[:8]}"
    store = RedisStorage.from_url(redis_server.url, prefix=name, client_name=name, socket_timeout=0.2)
    loop = asyncio.new_event_loop()
    try:

        async def two_reads() -> None:
            await asyncio.gather(store.aget(KEY), store.aget(KEY))

        loop.run_until_complete(two_reads())  # two connections
        assert _named(redis_server.url, name) == 2
        redis_server.pause()
        try:
            with pytest.raises(StorageError, match="unreachable"):
                loop.run_until_complete(store.aget(KEY))  # one of them times out and is disconnected
        finally:
            redis_server.resume()
        store.close()
        assert _until_none_named([redis_server.url], name) == 0
    finally:
        loop.close()


def test_closing_a_cluster_store_after_its_loop_was_closed_closes_the_loops_sockets(
    redis_cluster: RedisCluster,
) -> None:
    """A loop that used a Cluster store and was closed without shutting its async generators down: close()
    closes that loop's connections to every node directly."""
    import asyncio

    name = f"closed-{uuid.uuid4().hex[:8]}"
    store = RedisStorage.from_url(redis_cluster.url, prefix=name, client_name=name)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(store.aget(KEY))
    finally:
        loop.close()
    urls = [node.url for node in redis_cluster.nodes]
    assert sum(_named(url, name) for url in urls) >= 1
    store.close()
    assert _until_none_named(urls, name) == 0


def test_a_redis_store_dropped_while_its_loop_runs_still_has_the_loops_connection_closed(
    redis_server: RedisServer,
) -> None:
    """A store dropped without close() while an event loop that used it runs: that loop's connection is closed
    all the same, on the loop (the loop's client does not keep the store alive, nor need it to close)."""
    name = f"dropped-{uuid.uuid4().hex[:8]}"
    left: list[int] = []

    async def main() -> None:
        store = RedisStorage.from_url(redis_server.url, prefix=name, client_name=name)
        await store.aget(KEY)
        assert await anyio.to_thread.run_sync(_named, redis_server.url, name) == 1
        del store
        gc.collect()
        left.append(await anyio.to_thread.run_sync(_until_none_named, [redis_server.url], name))

    anyio.run(main, backend="asyncio")
    assert left == [0]
