"""Redis storage in production conditions: odd lifetimes, lost lease answers, event-loop lifecycles, a
full pool, errors that say what to fix, and what the server's introspection shows (no session id, no token)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from redis_servers import RedisCluster, RedisServer, free_port
from storage_fixtures import REPO, redis_cluster, redis_server
from test_storage_contract import tokens

from httpx_upstream_auth import EntryKey, RedisStorage, StorageError

__all__ = ["redis_cluster", "redis_server"]  # fixtures used by the tests below

KEY = EntryKey("github", "session-redis-secret-id")


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, for counting connections or pausing it."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


def _clients(server: RedisServer) -> int:
    """Connected clients, not counting the redis-cli that asks."""
    info = server.cli("INFO", "clients")
    return int(next(line for line in info.splitlines() if line.startswith("connected_clients:")).split(":")[1]) - 1


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def test_infinite_and_absurd_refresh_lifetimes_get_a_finite_ttl(redis_server: RedisServer) -> None:
    """refresh_expires_in of 1e400 (inf) or ~9.3e15 s saves, publishes, and gets a TTL of the default retention."""
    store = RedisStorage.from_url(redis_server.url, prefix=_prefix(), retention=600)
    for number, value in enumerate([float("inf"), 9.3e15, 1e300]):
        key = EntryKey("github", f"odd-{number}")
        assert store.put(key, tokens(1, refresh_expires_at=value), expected_version=None)
        ttl_ms = int(redis_server.cli("PTTL", store._keys.entry(key)).strip())
        assert 0 < ttl_ms <= 600_000
        store.delete(key)
    store.close()


def test_a_lease_set_after_its_acquire_timed_out_is_taken_back(own_server: RedisServer) -> None:
    """A lease the paused server set after the client timed out is re-taken by that storage's next acquire."""
    store = RedisStorage.from_url(own_server.url, prefix="lost", socket_timeout=0.2)
    other = RedisStorage.from_url(own_server.url, prefix="lost")
    warm = store.acquire_lease(KEY, 60.0)  # loads the script, so the paused call is one EVALSHA
    assert warm is not None
    store.release_lease(warm)
    own_server.pause()
    try:
        with pytest.raises(StorageError, match="unreachable"):
            store.acquire_lease(KEY, 60.0)
    finally:
        own_server.resume()
    deadline = time.monotonic() + 10
    while own_server.cli("EXISTS", store._keys.lease(KEY)).strip() != "1":  # the late SET lands
        assert time.monotonic() < deadline, "the paused acquire never reached the server"
        time.sleep(0.01)
    assert other.acquire_lease(KEY, 60.0) is None
    again = store.acquire_lease(KEY, 60.0)
    assert again is not None, "the lease set by the lost call was orphaned"
    store.release_lease(again)
    assert other.acquire_lease(KEY, 60.0) is not None
    store.close()
    other.close()


def test_a_lease_set_by_a_cancelled_acquire_is_taken_back(own_server: RedisServer) -> None:
    """A lease set by an aacquire_lease cancelled while the server was paused is re-taken by the next acquire."""
    store = RedisStorage.from_url(own_server.url, prefix="cancel", socket_timeout=5.0)

    async def cancelled() -> None:
        warm = await store.aacquire_lease(KEY, 60.0)
        assert warm is not None
        await store.arelease_lease(warm)
        own_server.pause()
        try:
            with anyio.move_on_after(0.2):
                await store.aacquire_lease(KEY, 60.0)
                pytest.fail("the acquire should have been cancelled")
        finally:
            own_server.resume()

    anyio.run(cancelled, backend="asyncio")
    deadline = time.monotonic() + 10
    while own_server.cli("EXISTS", store._keys.lease(KEY)).strip() != "1":
        assert time.monotonic() < deadline, "the cancelled acquire never reached the server"
        time.sleep(0.01)
    again = store.acquire_lease(KEY, 60.0)
    assert again is not None
    store.release_lease(again)
    store.close()


LOOPS = r"""
import asyncio, gc, sys
from httpx_upstream_auth import EntryKey, RedisStorage
store = RedisStorage.from_url(sys.argv[1], prefix="loops")
for _ in range(30):  # run_until_complete + close: no shutdown_asyncgens, nothing tells the storage
    loop = asyncio.new_event_loop()
    loop.run_until_complete(store.aget(EntryKey("p", "s")))
    loop.close()
print(sys.argv[2], flush=True)
sys.stdin.readline()
store.close()
gc.collect()
print("closed", flush=True)
sys.stdin.readline()
"""


def test_event_loops_closed_without_shutdown_leave_no_client(own_server: RedisServer) -> None:
    """30 run_until_complete + close loops: one loop's client lingers at most, none after close, no ResourceWarning."""
    process = subprocess.Popen(
        [sys.executable, "-X", "dev", "-c", LOOPS, own_server.url, "looped"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    assert process.stdout.readline().strip() == "looped"
    lingering = _clients(own_server)
    process.stdin.write("\n")
    process.stdin.flush()
    assert process.stdout.readline().strip() == "closed"
    after_close = _clients(own_server)
    _, stderr = process.communicate("\n", timeout=30)
    assert process.returncode == 0, stderr
    assert lingering <= 2, "one client per closed loop leaked"
    assert after_close == 0
    assert "ResourceWarning" not in stderr and "unclosed" not in stderr, stderr


def test_many_threads_wait_for_a_connection_instead_of_failing(own_server: RedisServer) -> None:
    """200 threads on 8 connections all succeed within 8 + 1 connections; 90 waiting watchers hold none."""
    store = RedisStorage.from_url(own_server.url, prefix="pool", max_connections=8)
    failures: list[BaseException] = []
    peak = [0]

    def work(number: int) -> None:
        key = EntryKey("pool", f"s{number}")
        try:
            for version in range(1, 6):
                assert store.put(key, tokens(version), expected_version=None if version == 1 else version - 1)
                assert store.get(key) == tokens(version)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    peak[0] = _clients(own_server)
    assert peak[0] <= 8 + 1

    watched = [EntryKey("pool", f"w{n}") for n in range(90)]
    for key in watched:
        store.put(key, tokens(1), expected_version=None)
    woke: list[EntryKey] = []

    def watch(key: EntryKey) -> None:
        store.watch(key, 1, 30.0)
        woke.append(key)

    watchers = [threading.Thread(target=watch, args=(key,)) for key in watched]
    for thread in watchers:
        thread.start()
    time.sleep(0.3)  # let them all register and wait
    assert _clients(own_server) <= 8 + 1, "a waiting watcher must not hold a connection"
    for key in watched:
        assert store.put(key, tokens(2), expected_version=1)
    for thread in watchers:
        thread.join(10)
    assert sorted(woke, key=watched.index) == watched
    store.close()


def test_many_tasks_wait_for_a_connection_instead_of_failing(own_server: RedisServer) -> None:
    """200 asyncio tasks on a storage of 8 connections all succeed (the pool waits, it does not raise)."""
    store = RedisStorage.from_url(own_server.url, prefix="apool", max_connections=8)

    async def work(number: int) -> None:
        key = EntryKey("apool", f"s{number}")
        assert await store.aput(key, tokens(1), expected_version=None)
        assert await store.aget(key) == tokens(1)
        assert await store.adelete(key, expected_version=1)

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for number in range(200):
                group.start_soon(work, number)
        await store.aclose()

    anyio.run(main, backend="asyncio")


def test_a_cluster_that_is_down_raises_storage_error_at_from_url() -> None:
    """redis+cluster:// to nodes that do not answer raises StorageError, not RedisClusterException."""
    with pytest.raises(StorageError, match="could not open the Redis Cluster"):
        RedisStorage.from_url(f"redis+cluster://127.0.0.1:{free_port()}", socket_timeout=0.2)


def test_errors_say_what_to_fix(redis_server: RedisServer) -> None:
    """A wrong password names the credentials, a missing database number names the URL; not 'unreachable'."""
    redis_server.cli("ACL", "SETUSER", "pwuser", "on", ">right", "~*", "&*", "+@all")
    wrong = RedisStorage.from_url(f"redis://pwuser:wrong@127.0.0.1:{redis_server.port}/0")
    with pytest.raises(StorageError, match="refused the credentials") as caught:
        wrong.get(KEY)
    assert "wrong" not in str(caught.value) and "unreachable" not in str(caught.value)
    wrong.close()
    missing_db = RedisStorage.from_url(f"redis://127.0.0.1:{redis_server.port}/99")
    with pytest.raises(StorageError, match="database number") as caught:
        missing_db.get(KEY)
    assert "ACL" not in str(caught.value)
    missing_db.close()
    redis_server.cli("ACL", "DELUSER", "pwuser")


def test_introspection_shows_no_session_id_and_no_token(own_server: RedisServer) -> None:
    """SCAN, PUBSUB CHANNELS and SLOWLOG (logging every command) never show the session id or a token."""
    own_server.cli("CONFIG", "SET", "slowlog-log-slower-than", "0")
    store = RedisStorage.from_url(own_server.url, prefix="private")
    secret_key = EntryKey("github", "gateway-cookie-0123456789")
    done = threading.Event()
    store.put(secret_key, tokens(1), expected_version=None)

    def watch() -> None:
        store.watch(secret_key, 1, 10.0)
        done.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    store.put(secret_key, tokens(2), expected_version=1)
    watcher.join(10)
    assert done.is_set()
    store.acquire_lease(secret_key, 5.0)
    seen = " ".join(
        own_server.cli(*command)
        for command in (("--scan",), ("PUBSUB", "CHANNELS"), ("SLOWLOG", "GET", "128"))
    )  # fmt: skip
    assert "private:" in seen  # the keys are there, under their digests
    assert "gateway-cookie" not in seen
    assert "secret-access" not in seen and "secret-refresh" not in seen
    store.close()


def test_the_cas_never_decodes_the_entry(redis_server: RedisServer) -> None:
    """A 1 MB entry is compared by its version field alone: no cjson in the scripts, and it round-trips."""
    from httpx_upstream_auth._storages._redis._keys import SCRIPTS

    assert all("cjson" not in source for source in SCRIPTS.values())
    store = RedisStorage.from_url(redis_server.url, prefix=_prefix())
    big = tokens(1, scope="x" * 1_000_000)
    assert store.put(KEY, big, expected_version=None)
    assert store.put(KEY, tokens(2), expected_version=1)
    assert store.get(KEY) == tokens(2)
    store.close()


def test_cluster_subscribers_hear_saves_on_every_node(redis_cluster: RedisCluster) -> None:
    """A subscriber of one storage hears saves of keys in every slot (one connection for the whole Cluster)."""
    prefix = _prefix()
    listener = RedisStorage.from_url(redis_cluster.url, prefix=prefix)
    writer = RedisStorage.from_url(redis_cluster.url, prefix=prefix)
    keys = [EntryKey("github", f"node-spread-{n}") for n in range(12)]
    heard: list[str | None] = []
    all_heard = threading.Event()

    def on_change(digest: str | None) -> None:
        heard.append(digest)
        if len(heard) >= len(keys):
            all_heard.set()

    unsubscribe = listener.subscribe(on_change)
    assert unsubscribe is not None
    slots = {writer._sync.keyslot(writer._keys.entry(key)) for key in keys}
    assert len({writer._sync.nodes_manager.slots_cache[slot][0].name for slot in slots}) > 1
    for key in keys:
        assert writer.put(key, tokens(1), expected_version=None)
    assert all_heard.wait(10)
    assert sorted(h for h in heard if h is not None) == sorted(key.digest for key in keys)
    unsubscribe()
    listener.close()
    writer.close()


def _asyncio_only_loop_count(store: RedisStorage) -> int:
    return len(store._loops)


def test_asyncio_run_closes_its_client(own_server: RedisServer) -> None:
    """Each asyncio.run's client is closed when that run ends (shutdown_asyncgens), leaving no connection."""
    store = RedisStorage.from_url(own_server.url, prefix="runs")
    for _ in range(5):
        asyncio.run(_touch(store))
    assert _asyncio_only_loop_count(store) == 0
    store.close()
    assert _clients(own_server) == 0


async def _touch(store: RedisStorage) -> Any:
    return await store.aget(KEY)


def test_a_failed_tls_certificate_check_says_so(tmp_path: Path) -> None:
    """rediss:// to a server whose certificate no trusted CA signed: the error names TLS, not an outage."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    tls_port = free_port()
    server = RedisServer(
        extra_args=("--tls-port", str(tls_port), "--tls-cert-file", str(tmp_path / "cert.pem"),
                    "--tls-key-file", str(tmp_path / "key.pem"), "--tls-auth-clients", "no"),
    )  # fmt: skip
    try:
        server.start()
        store = RedisStorage.from_url(f"rediss://127.0.0.1:{tls_port}/0", socket_timeout=2.0)
        with pytest.raises(StorageError, match="TLS handshake") as caught:
            store.get(KEY)
        assert "unreachable" not in str(caught.value)
        store.close()
    finally:
        server.cleanup()


def test_wait_replicas_saves_reach_the_replica_before_put_returns(
    own_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With wait_replicas=1 a save is on the replica when put returns; with no replica it still saves, and warns."""
    lonely = RedisStorage.from_url(own_server.url, prefix="wait", wait_replicas=1, wait_timeout=0.05)
    with caplog.at_level("WARNING", logger="httpx_upstream_auth"):
        assert lonely.put(KEY, tokens(1), expected_version=None)
    assert "reached 0 of 1 replicas" in caplog.text
    lonely.close()
    replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(own_server.port)))
    try:
        replica.start()
        deadline = time.monotonic() + 20
        while "master_link_status:up" not in replica.cli("INFO", "replication"):
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
        store = RedisStorage.from_url(own_server.url, prefix="wait", wait_replicas=1, wait_timeout=1.5)
        for version in range(2, 12):
            assert store.put(KEY, tokens(version), expected_version=version - 1)
            assert replica.cli("HGET", store._keys.entry(KEY), "v").strip() == str(version)
        assert anyio.run(lambda: store.aput(KEY, tokens(12), expected_version=11), backend="asyncio")
        assert replica.cli("HGET", store._keys.entry(KEY), "v").strip() == "12"
        store.close()
    finally:
        replica.cleanup()


def test_subscribers_hear_none_after_a_lost_connection_then_changes_again(own_server: RedisServer) -> None:
    """A server restart makes the subscriber call back None (re-read everything), then it hears saves again."""
    listener = RedisStorage.from_url(own_server.url, prefix="restart", socket_timeout=0.5)
    heard: list[str | None] = []
    lost, again = threading.Event(), threading.Event()

    def on_change(digest: str | None) -> None:
        heard.append(digest)
        if digest is None:
            lost.set()
        elif lost.is_set():
            again.set()

    unsubscribe = listener.subscribe(on_change)
    assert unsubscribe is not None
    own_server.restart()
    assert lost.wait(20), "no None after the connection was lost"
    writer = RedisStorage.from_url(own_server.url, prefix="restart")
    deadline = time.monotonic() + 20
    version = 0
    while not again.wait(0.1):  # saves published before the listener is back are missed: keep saving
        assert time.monotonic() < deadline, "saves after the restart were never heard"
        version += 1
        writer.put(KEY, tokens(version), expected_version=None if version == 1 else version - 1)
    assert heard[-1] == KEY.digest
    unsubscribe()
    listener.close()
    writer.close()


def test_a_silent_pubsub_connection_is_pinged_and_replaced(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pub/sub connection that stops answering (frozen server) is found by its PING and replaced; None follows."""
    from httpx_upstream_auth._storages._redis import _feed

    monkeypatch.setattr(_feed, "_HEALTH_CHECK", 0.3)
    listener = RedisStorage.from_url(own_server.url, prefix="silent", socket_timeout=0.3)
    heard: list[str | None] = []
    back = threading.Event()

    def hear(digest: str | None) -> None:
        heard.append(digest)
        back.set()

    unsubscribe = listener.subscribe(hear)
    assert unsubscribe is not None
    subscriber = listener._subscriber
    assert subscriber is not None and subscriber.live
    own_server.pause()
    try:
        deadline = time.monotonic() + 20
        while subscriber.live:
            assert time.monotonic() < deadline, "the frozen connection still looks live"
            time.sleep(0.05)
    finally:
        own_server.resume()
    assert back.wait(20), "no None once the server answered again"
    assert heard[0] is None
    unsubscribe()
    listener.close()


# -- connection slots: first come, first served ---------------------------------------------------------------
def _queue_up(gate: Any, count: int, order: list[int]) -> list[threading.Thread]:
    """Start ``count`` threads one after another, each queued on ``gate`` before the next starts."""

    def wait_then_pass(number: int) -> None:
        assert gate.acquire(timeout=60.0)
        order.append(number)
        gate.release()

    threads = []
    for number in range(count):
        thread = threading.Thread(target=wait_then_pass, args=(number,))
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 30
        while gate.waiting < number + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert gate.waiting == number + 1
    return threads


def test_the_connection_gate_serves_waiters_in_arrival_order() -> None:
    """Released slots go to the oldest waiter; a newcomer cannot take one while others wait."""
    from httpx_upstream_auth._storages._redis._clients import FifoGate

    gate = FifoGate(1)
    assert gate.acquire(timeout=0)
    order: list[int] = []
    threads = _queue_up(gate, 20, order)
    gate.release()  # handed to waiter 0 directly, before it even runs
    assert gate.acquire(timeout=0) is False, "a newcomer took the slot from the queue"
    for thread in threads:
        thread.join()
    assert order == list(range(20))
    assert gate.waiting == 0
    assert gate.acquire(timeout=0) and gate.acquire(timeout=0) is False  # exactly one slot, not lost, not doubled


def test_a_gate_waiter_that_times_out_leaves_the_queue_and_the_slot_count_intact() -> None:
    """A timed-out waiter removes itself; the slots stay exactly as many as the gate's size."""
    from httpx_upstream_auth._storages._redis._clients import FifoGate

    gate = FifoGate(2)
    assert gate.acquire(timeout=0) and gate.acquire(timeout=0)
    assert gate.acquire(timeout=0.01) is False
    assert gate.waiting == 0
    gate.release()
    gate.release()
    assert [gate.acquire(timeout=0) for _ in range(3)] == [True, True, False]


def test_a_slot_handed_to_a_waiter_that_just_timed_out_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-off race: a release lands between a waiter's timeout and its clean-up; that waiter keeps
    the slot (it was granted), and when it releases it the next waiter gets it: no slot is lost."""
    from httpx_upstream_auth._storages._redis import _clients

    gate = _clients.FifoGate(1)
    assert gate.acquire(timeout=0)
    real_event = threading.Event

    class TimesOutAsTheSlotArrives(real_event):  # type: ignore[misc,valid-type]
        def wait(self, timeout: float | None = None) -> bool:
            gate.release()  # the holder releases: the slot is handed to this waiter...
            return False  # ...whose wait has just timed out

    monkeypatch.setattr(threading, "Event", TimesOutAsTheSlotArrives)
    assert gate.acquire(timeout=0.01) is True, "the slot handed over must not be dropped"
    monkeypatch.setattr(threading, "Event", real_event)
    assert gate.waiting == 0
    assert gate.acquire(timeout=0) is False  # still held, by the waiter that got it
    gate.release()
    assert [gate.acquire(timeout=0) for _ in range(2)] == [True, False]


def test_anyio_semaphore_on_asyncio_is_first_come_first_served() -> None:
    """The per-loop gate (anyio.Semaphore under asyncio) hands a released slot to the oldest waiter, and a
    waiter cancelled after the hand-off passes the slot on."""

    async def main() -> None:
        gate = anyio.Semaphore(1)
        await gate.acquire()
        order: list[int] = []

        async def wait_then_pass(number: int) -> None:
            await gate.acquire()
            order.append(number)
            gate.release()

        async with anyio.create_task_group() as group:
            for number in range(20):
                group.start_soon(wait_then_pass, number)
                while gate.statistics().tasks_waiting < number + 1:
                    await anyio.lowlevel.checkpoint()
            gate.release()
        assert order == list(range(20))

        await gate.acquire()
        got: list[str] = []

        async def second() -> None:
            await gate.acquire()
            got.append("second")
            gate.release()

        loop = asyncio.get_running_loop()
        first = loop.create_task(gate.acquire())
        while gate.statistics().tasks_waiting < 1:
            await anyio.lowlevel.checkpoint()
        later = loop.create_task(second())
        while gate.statistics().tasks_waiting < 2:
            await anyio.lowlevel.checkpoint()
        gate.release()  # handed to the first waiter...
        first.cancel()  # ...which is cancelled before it runs: it must pass the slot on
        with anyio.fail_after(30):
            await later
        assert first.cancelled()
        assert got == ["second"]
        assert gate.value == 1

    anyio.run(main, backend="asyncio")


def test_200_threads_doing_get_and_compare_and_set_on_8_connections_never_fail(own_server: RedisServer) -> None:
    """200 threads doing 10 get + compare-and-set on one storage with 8 connection slots: no StorageError,
    and the final version counts every successful save."""
    store = RedisStorage.from_url(own_server.url, prefix="fair", max_connections=8)
    shared = [EntryKey("fair", f"s{n}") for n in range(4)]
    successes = [0] * 200
    failures: list[BaseException] = []
    start = threading.Barrier(200)

    def work(number: int) -> None:
        key = shared[number % len(shared)]
        try:
            start.wait()
            for _ in range(10):
                current = store.get(key)
                version = 0 if current is None else current.version
                expected = None if current is None else version
                if store.put(key, tokens(version + 1), expected_version=expected):
                    successes[number] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    for index, key in enumerate(shared):
        found = store.get(key)
        assert found is not None and found.version == sum(successes[index :: len(shared)])
    store.close()


# -- what errors and addresses say (no server needed) ----------------------------------------------------


def test_errors_say_what_to_do_and_never_the_credentials() -> None:
    """A StorageError raised inside passes as it is; a full pool says which setting to raise; a connection
    failure whose causes never mention TLS (however deep the chain) is "unreachable", not a TLS failure; an
    entry that cannot be read says to delete it."""
    import redis

    from httpx_upstream_auth._storages._redis._errors import ErrorMap

    errors = ErrorMap(redis, "10.0.0.7:6380", cluster=False, max_connections=4, socket_timeout=2.0)
    typed = StorageError("typed already")
    with pytest.raises(StorageError) as caught, errors.mapped("save the entry"):
        raise typed
    assert caught.value is typed
    busy = r"all 4 connections to Redis at 10\.0\.0\.7:6380 stayed busy for 2s"
    with pytest.raises(StorageError, match=busy), errors.mapped("save the entry"):
        raise redis.exceptions.MaxConnectionsError("pool exhausted")
    deep: BaseException = OSError("connection reset")
    for n in range(6):
        outer = redis.exceptions.ConnectionError(f"layer {n}")
        outer.__cause__ = deep
        deep = outer
    with pytest.raises(StorageError, match=r"unreachable \(ConnectionError\); retry"), errors.mapped("read it"):
        raise deep
    with pytest.raises(StorageError, match=r"holds an unreadable entry for provider 'github' \(ValueError\)"):
        errors.decode(KEY, b"[1, 2]")
    # an entry written for another (provider, session) with the same digest is never handed out
    other = tokens(1).to_dict() | {"entry_key": ["github", "another-session"]}
    assert errors.decode(KEY, json.dumps(other)) is None
    assert errors.decode(KEY, json.dumps(other | {"entry_key": [KEY.provider_id, KEY.session_id]})) == tokens(1)


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("redis://user:s3cret@cache.internal:6380/0", "cache.internal:6380"),
        ("rediss://:s3cret@cache.internal/2", "cache.internal:6379"),
        ("redis://cache.internal:port/0", "cache.internal:6379"),  # a port that is no number: the default
        ("redis:///0", "localhost:6379"),
        ("unix:///run/redis.sock?db=1", "unix:/run/redis.sock"),
    ],
)
def test_a_url_is_described_by_its_address_only(url: str, where: str) -> None:
    """Messages name a server by host:port (or socket path), never by its credentials."""
    from httpx_upstream_auth._storages._redis._errors import describe_url

    assert describe_url(url) == where


def test_a_client_is_described_by_its_address_only() -> None:
    """A client passed in is named by its address, a socket path, or "(unknown address)" when it has none."""
    import redis

    from httpx_upstream_auth._storages._redis._errors import describe_client

    assert describe_client(redis.Redis(host="cache.internal", port=6380, password="s3cret")) == "cache.internal:6380"
    assert describe_client(redis.Redis(unix_socket_path="/run/redis.sock")) == "unix:/run/redis.sock"
    assert describe_client(object()) == "(unknown address)"


@pytest.mark.anyio
async def test_connection_slots_say_busy_when_none_comes_in_time() -> None:
    """With every connection slot held, a command waits the socket timeout for one, then fails as busy (the
    sync gate and the async semaphore alike); once the holder lets go, the next command gets its slot."""
    from httpx_upstream_auth._storages._redis._clients import AsyncSlots, FifoGate, SyncSlots

    def busy(what: str) -> StorageError:
        return StorageError(f"busy: {what}")

    def sync_side() -> None:
        slots = SyncSlots(FifoGate(1), 0.01, busy)
        with slots.slot("hold"), pytest.raises(StorageError, match="busy: save"), slots.slot("save"):
            pass
        with slots.slot("save"):
            pass

    await anyio.to_thread.run_sync(sync_side)
    slots = AsyncSlots(1, 0.01, busy)
    async with slots.slot("hold"):
        with pytest.raises(StorageError, match="busy: save"):
            async with slots.slot("save"):
                pass
    async with slots.slot("save"):
        pass


@pytest.mark.anyio
async def test_a_closed_storage_says_so(redis_server: RedisServer) -> None:
    """Every call on a closed RedisStorage, sync or async, is a StorageError asking for a new one (not a
    connection error from a client it closed)."""
    prefix = _prefix()
    store = await anyio.to_thread.run_sync(lambda: RedisStorage.from_url(redis_server.url, prefix=prefix))
    assert await store.aput(KEY, tokens(1), expected_version=None)
    await store.aclose()
    with pytest.raises(StorageError, match="is closed; create a new one"):
        await anyio.to_thread.run_sync(store.get, KEY)
    with pytest.raises(StorageError, match="is closed; create a new one"):
        await store.aget(KEY)
