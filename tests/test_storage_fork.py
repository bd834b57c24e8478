"""Storages across a real fork() (gunicorn --preload, multiprocessing): a child hears the parent, the parent
hears the child, neither hears its own writes twice, and the child starts with fresh locks, leases and
connections."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import pytest
from storage_fixtures import redis_cluster, redis_server
from test_storage_contract import tokens

import httpx_upstream_auth._storages._sqlite as sqlite_module
from httpx_upstream_auth import EntryKey, MemoryStorage, RedisStorage, SQLiteStorage, Storage

__all__ = ["redis_cluster", "redis_server"]  # fixtures used by the tests below

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

#: Bounds on waits for the other process (waits, not assertions: generous for a loaded machine).
PATIENCE = 30.0
A, B, C = EntryKey("fork", "written-by-parent"), EntryKey("fork", "written-by-child"), EntryKey("fork", "parent-again")


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def shared_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """A storage on a store that processes share: a SQLite file, a Redis server, a Redis Cluster."""
    if request.param == "sqlite":
        store: Storage = SQLiteStorage(tmp_path / "tokens.db")
    else:
        server = request.getfixturevalue("redis_cluster" if request.param == "redis-cluster" else "redis_server")
        store = RedisStorage.from_url(server.url, prefix=f"f{uuid.uuid4().hex[:10]}")
    yield store
    store.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """A storage of each kind that holds locks and leases of its own."""
    if request.param == "memory":
        store: Storage = MemoryStorage()
    elif request.param == "sqlite":
        store = SQLiteStorage(tmp_path / "tokens.db")
    else:
        server = request.getfixturevalue("redis_server")
        store = RedisStorage.from_url(server.url, prefix=f"f{uuid.uuid4().hex[:10]}")
    yield store
    store.close()


# -- a child process, reported on and always reaped ---------------------------------------------------------
@contextlib.contextmanager
def forked(child: Callable[[Connection], None]) -> Iterator[Connection]:
    """Fork; the child runs ``child(conn)`` and exits (status 0 when it returned). Yields the parent's end
    of the pipe; on leaving, waits for the child (killing it after PATIENCE) and checks its status."""
    parent_end, child_end = multiprocessing.Pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            parent_end.close()
            signal.alarm(int(PATIENCE * 2))  # a deadlocked child dies rather than hang the suite
            child(child_end)
            status = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                child_end.send(("error", traceback.format_exc()))
        finally:
            os._exit(status)
    child_end.close()
    try:
        yield parent_end
    finally:
        status = _reap(pid)
        parent_end.close()
    assert status == 0, f"the child exited with status {status}"


def _reap(pid: int) -> int:
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def receive(conn: Connection) -> Any:
    """The child's next message; a traceback it sent fails the test."""
    assert conn.poll(PATIENCE), "the child said nothing"
    message = conn.recv()
    if isinstance(message, tuple) and message and message[0] == "error":
        pytest.fail(f"the child failed:\n{message[1]}")
    return message


def wait_until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for ``condition``; the caller asserts what it needs afterwards."""
    deadline = time.monotonic() + PATIENCE
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


# -- change feeds ---------------------------------------------------------------------------------------------
def test_subscriptions_live_at_fork_hear_the_other_process(shared_storage: Storage) -> None:
    """After fork, a subscription made before it hears the parent's writes in the child and the child's in
    the parent, and each process's own writes reach it once (never echoed back as another's)."""
    store = shared_storage
    heard: list[str | None] = []  # empty at the fork: the child's copy holds only what the child hears
    unsubscribe = store.subscribe(heard.append)
    assert unsubscribe is not None

    def child(conn: Connection) -> None:
        store.watch(EntryKey("fork", "nobody"), None, 0.0)  # Redis: returns once the listener is subscribed
        conn.send("ready")
        wait_until(lambda: A.digest in heard)
        assert store.put(B, tokens(1), expected_version=None)
        wait_until(lambda: C.digest in heard)
        conn.send(heard)

    with forked(child) as conn:
        if isinstance(store, SQLiteStorage):  # the change log has no gap: a write during the child's start counts
            assert store.put(A, tokens(1), expected_version=None)
            assert receive(conn) == "ready"
        else:  # pub/sub only delivers to a listener already subscribed
            assert receive(conn) == "ready"
            assert store.put(A, tokens(1), expected_version=None)
        wait_until(lambda: B.digest in heard)
        assert store.put(C, tokens(1), expected_version=None)
        child_heard = receive(conn)
    # Redis: the child's new listener first says None (it cannot know what was published before it
    # subscribed), which asks for a re-read of everything. Then each digest once: the child's own save
    # is reported as its put returns, so the parent's next one (C) may overtake it; an echo of B from
    # the feed would have come before C on it, so counting when C arrived proves there was none.
    digests = [digest for digest in child_heard if digest is not None]
    assert digests[0] == A.digest and sorted(digests[1:]) == sorted([B.digest, C.digest])
    # The parent's own save of A is reported as its put returns, which the child's B (written once the child
    # heard A on the feed) may overtake; C comes after both. Each once: an echo would make it longer.
    assert len(heard) == 3 and set(heard[:2]) == {A.digest, B.digest} and heard[2] == C.digest
    # The parent's connections were not disturbed by the child.
    assert store.get(B) == tokens(1)
    assert store.delete(A, expected_version=1)
    assert heard[-1] == A.digest
    unsubscribe()


def test_sibling_children_hear_each_other(shared_storage: Storage) -> None:
    """Two workers forked from one parent (gunicorn's workers): one's save reaches the other's subscription
    made before the fork, and the parent's, once each."""
    store = shared_storage
    heard: list[str | None] = []
    unsubscribe = store.subscribe(heard.append)
    assert unsubscribe is not None

    def writer(conn: Connection) -> None:
        store.watch(EntryKey("fork", "nobody"), None, 0.0)
        conn.send("ready")
        assert conn.poll(PATIENCE) and conn.recv() == "go"
        assert store.put(B, tokens(1), expected_version=None)
        conn.send("wrote")

    def listener(conn: Connection) -> None:
        store.watch(EntryKey("fork", "nobody"), None, 0.0)  # Redis: returns once the listener is subscribed
        conn.send("ready")
        wait_until(lambda: B.digest in heard)
        conn.send([digest for digest in heard if digest is not None])

    with forked(writer) as to_writer, forked(listener) as to_listener:
        assert receive(to_writer) == "ready" and receive(to_listener) == "ready"
        to_writer.send("go")
        assert receive(to_writer) == "wrote"
        assert receive(to_listener) == [B.digest]
    wait_until(lambda: B.digest in heard)
    assert heard == [B.digest]
    unsubscribe()


def test_a_child_forked_before_anyone_subscribed_subscribes_on_its_own(shared_storage: Storage) -> None:
    """A storage with no subscriber at fork gets a change feed of its own when the child subscribes."""
    store = shared_storage
    assert store.put(A, tokens(1), expected_version=None)

    def child(conn: Connection) -> None:
        heard: list[str | None] = []
        store.subscribe(heard.append)
        conn.send("subscribed")
        wait_until(lambda: A.digest in heard)
        conn.send([digest for digest in heard if digest is not None])

    with forked(child) as conn:
        assert receive(conn) == "subscribed"
        assert store.put(A, tokens(2), expected_version=1)
        assert receive(conn) == [A.digest]


# -- locks, leases, connections ---------------------------------------------------------------------------
def _locks_of(store: Storage) -> list[Any]:
    locks: list[Any] = [store._tables_lock]
    if isinstance(store, MemoryStorage):
        locks.append(store._lock)
    if isinstance(store, SQLiteStorage):
        locks += [store._pool_lock, store._feed_lock, sqlite_module._pollers_lock]
    if isinstance(store, RedisStorage):
        locks += [store._lock, store._feed_lock]
    return locks


@contextlib.contextmanager
def _held_by_another_thread(locks: list[Any]) -> Iterator[None]:
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            taken.set()
            done.wait(PATIENCE * 3)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(PATIENCE)
        yield
    finally:
        done.set()
        thread.join()


def test_a_child_does_not_inherit_held_locks_leases_or_lost_lease_answers(any_storage: Storage) -> None:
    """Forked while another thread holds the storage's locks (and, for Redis, every connection slot) and
    the parent holds leases: the child's operations do not hang, the in-process lease table starts
    empty, and a lease answer the parent lost is not re-taken by the child (two holders)."""
    store = any_storage
    assert store.put(A, tokens(1), expected_version=None)
    parent_lease = store.acquire_lease(A, 60.0)
    assert parent_lease is not None
    lost = store.acquire_lease(B, 60.0)
    assert lost is not None
    if isinstance(store, (SQLiteStorage, RedisStorage)):
        store._orphans.keep(B, lost.owner, 60.0)  # as if the answer to that acquire had been lost
    slots: list[Callable[[], None]] = []  # how to give back each connection slot taken here
    if isinstance(store, RedisStorage):  # every connection slot taken by in-flight commands
        while store._gate.acquire(timeout=0):
            slots.append(store._gate.release)

    def child(conn: Connection) -> None:
        heard: list[str | None] = []
        store.subscribe(heard.append)
        if isinstance(store, MemoryStorage):
            # A memory store is the parent's own: the child starts empty (a copy would redeem the parent's
            # refresh tokens a second time).
            assert store.get(A) is None
            assert store.put(A, tokens(1), expected_version=None)
            heard.clear()
        assert store.get(A) == tokens(1)
        assert store.put(A, tokens(2), expected_version=1)
        assert heard == [A.digest]
        store.watch(A, 1, 5.0)  # already moved on
        shared = not isinstance(store, MemoryStorage)
        lease = store.acquire_lease(A, 60.0)
        # A shared store still has the parent's lease; the in-process table's copy was stale memory.
        assert (lease is None) is shared
        if shared:
            assert store.acquire_lease(B, 60.0) is None, "the parent's lost answer was re-taken: two holders"
        assert anyio.run(store.aget, A, backend="asyncio") == tokens(2)
        conn.send("ok")

    with _held_by_another_thread(_locks_of(store)), forked(child) as conn:
        assert receive(conn) == "ok"
    for release in slots:
        release()
    store.release_lease(parent_lease)
    store.release_lease(lost)
    # The child's save is in the shared store; a memory store is the parent's own.
    assert store.get(A) == tokens(1 if isinstance(store, MemoryStorage) else 2)


def test_a_redis_child_drops_the_parents_event_loop_clients(redis_server: Any) -> None:
    """The asyncio clients of the parent's event loops are not used (nor closed) by a child: it makes its own."""
    store = RedisStorage.from_url(redis_server.url, prefix=f"f{uuid.uuid4().hex[:10]}")
    assert store.put(A, tokens(1), expected_version=None)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    try:
        assert asyncio.run_coroutine_threadsafe(store.aget(A), loop).result(PATIENCE) == tokens(1)
        assert len(store._loops) == 1

        def child(conn: Connection) -> None:
            assert store._loops == {}
            for library in ("asyncio", "trio"):
                assert anyio.run(store.aget, A, backend=library) == tokens(1)
            conn.send("ok")

        with forked(child) as conn:
            assert receive(conn) == "ok"
        # The parent's loop client still works: the child neither used nor closed its connections.
        assert asyncio.run_coroutine_threadsafe(store.aget(A), loop).result(PATIENCE) == tokens(1)
    finally:
        asyncio.run_coroutine_threadsafe(store.aclose(), loop).result(PATIENCE)  # closes that loop's client too
        loop.call_soon_threadsafe(loop.stop)
        runner.join()
        loop.close()
