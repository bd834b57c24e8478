"""SQLite storage in production conditions: a fleet opening a new file, files made by others, big purges,
many idle watchers, leases across clock steps and lost answers, files from the previous schema."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from storage_fixtures import REPO, sqlite_opener
from test_storage_contract import tokens

from httpx_upstream_auth import EntryKey, SQLiteStorage, StorageError
from httpx_upstream_auth.testing.contract import StoreWorker

KEY = EntryKey("github", "session-sqlite")
POLLER = "httpx-upstream-auth-sqlite-poller"


def _pollers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == POLLER]


def _non_pollers() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name != POLLER)


# A member of a fleet: once started, it opens a SQLiteStorage at each path it reads and says how that went.
FLEET_MEMBER = r"""
import json, sys
from httpx_upstream_auth import SQLiteStorage

print(json.dumps({"ready": True}), flush=True)
while True:
    path = sys.stdin.readline().strip()
    if not path:
        break
    try:
        SQLiteStorage(path).close()
        print(json.dumps({"ok": True}), flush=True)
    except Exception as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
"""


def _fleet_member() -> subprocess.Popen[str]:
    command = [sys.executable, "-c", FLEET_MEMBER]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)


def _answer(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    found: dict[str, Any] = json.loads(process.stdout.readline())
    return found


def test_a_fleet_opening_a_new_file_at_once_never_fails(tmp_path: Path) -> None:
    """Six processes opening each of 25 brand-new files at the same moment: all 150 opens succeed."""
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(_fleet_member()) for _ in range(6)]
        for worker in workers:
            assert _answer(worker) == {"ready": True}
        results: list[dict[str, Any]] = []
        for round_ in range(25):
            path = str(tmp_path / f"fleet-{round_}.db")
            for worker in workers:  # every worker gets the path before any has answered
                assert worker.stdin is not None
                worker.stdin.write(path + "\n")
                worker.stdin.flush()
            results.extend(_answer(worker) for worker in workers)
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("\n")
            worker.stdin.flush()
    failures = [result["error"] for result in results if not result["ok"]]
    assert failures == [] and len(results) == 150


def test_an_existing_file_readable_by_others_is_made_private(tmp_path: Path) -> None:
    """A touched 0644/0666 file and a planted -wal/-shm end up 0600 before any token is written."""
    path = tmp_path / "tokens.db"
    path.touch()
    os.chmod(path, 0o666)
    for suffix in ("-wal", "-shm"):
        companion = tmp_path / f"tokens.db{suffix}"
        companion.touch()
        os.chmod(companion, 0o644)
    store = SQLiteStorage(path)
    store.put(KEY, tokens(1), expected_version=None)
    store.close()
    for name in ("tokens.db", "tokens.db-wal", "tokens.db-shm"):
        if (tmp_path / name).exists():
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to make another user's file")
def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A store file (or a -wal) another user created is refused with an error that says why."""
    path = tmp_path / "tokens.db"
    path.touch(mode=0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(StorageError, match="belongs to user id 65534"):
        SQLiteStorage(path)
    fine = tmp_path / "fine.db"
    (tmp_path / "fine.db-wal").touch(mode=0o600)
    os.chown(tmp_path / "fine.db-wal", 65534, 65534)
    with pytest.raises(StorageError, match=r"fine\.db-wal: it belongs to user id 65534"):
        SQLiteStorage(fine)


def test_a_directory_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    """A path that is not a regular file is refused with a StorageError that says so."""
    (tmp_path / "tokens.db").mkdir()
    with pytest.raises(StorageError, match="not a regular file"):
        SQLiteStorage(tmp_path / "tokens.db")


def _expired_rows(path: Path, count: int) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "INSERT INTO entries (provider_id, session_id, version, data, expires_at_retention) "
            "VALUES (?, ?, 1, '{}', ?)",
            [("old", f"s{n}", time.time() - 10) for n in range(count)],
        )


def test_the_purge_runs_in_small_batches_outside_ordinary_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20k expired rows are swept by the poller thread, 500 per transaction; the put that found them deletes none."""
    import httpx_upstream_auth._storages._sqlite as module

    path = tmp_path / "tokens.db"
    SQLiteStorage(path).close()
    _expired_rows(path, 20_000)
    statements: list[tuple[str, str]] = []
    real_open = module._open_connection

    def traced(*args: Any) -> sqlite3.Connection:
        conn = real_open(*args)
        conn.set_trace_callback(lambda sql: statements.append((threading.current_thread().name, sql)))
        return conn

    monkeypatch.setattr(module, "_open_connection", traced)
    monkeypatch.setattr(module, "_pollers", {})  # a poller of this test's own, on the traced connections
    store = SQLiteStorage(path)
    assert store.put(KEY, tokens(1), expected_version=None)
    deadline = time.monotonic() + 30
    with contextlib.closing(sqlite3.connect(path)) as conn:
        while conn.execute("SELECT count(*) FROM entries WHERE provider_id = 'old'").fetchone()[0]:
            assert time.monotonic() < deadline, "the expired rows were never swept"
            time.sleep(0.05)
    assert store.get(KEY) == tokens(1)
    store.close()
    sweeps = [(thread, sql) for thread, sql in statements if sql.startswith("DELETE FROM entries WHERE (provider_id")]
    assert {thread for thread, _ in sweeps} == {POLLER}
    assert len(sweeps) >= 20_000 // 500
    assert all("LIMIT 500" in sql for _, sql in sweeps)


def test_idle_watchers_share_one_poller_and_hold_no_thread(tmp_path: Path) -> None:
    """40 sync watchers share one poller, 40 async ones hold no thread; another process's save wakes only its key's."""
    others = set(_pollers())  # of earlier tests' files, still sweeping
    stores = [SQLiteStorage(tmp_path / "tokens.db") for _ in range(4)]
    keys = [EntryKey("github", f"w{n}") for n in range(40)]
    for key in keys:
        stores[0].put(key, tokens(1), expected_version=None)
    before = _non_pollers()
    woke: list[EntryKey] = []

    def watch(number: int) -> None:
        stores[number % 4].watch(keys[number], 1, 30.0)
        woke.append(keys[number])

    threads = [threading.Thread(target=watch, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()

    async def async_watchers() -> int:
        # Two worker threads at most: a watch that held a thread while waiting would need 40.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 2
        async with anyio.create_task_group() as group:
            for key in keys:
                group.start_soon(stores[1].awatch, key, 1, 0.5)
            await anyio.sleep(0.2)
            threads_meanwhile = _non_pollers()
        return threads_meanwhile

    during_async = anyio.run(async_watchers)
    assert len(set(_pollers()) - others) == 1
    assert during_async <= before + 40 + 2, "async watchers must not hold a thread each"
    with StoreWorker(sqlite_opener(str(tmp_path / "tokens.db")), keys[7], "write", "1", "0") as worker:
        assert worker.read() == {"ready": True}
        worker.go()
        worker.read()
        assert worker.stdin is not None
        worker.stdin.close()
    threads[7].join(10)
    assert woke == [keys[7]]
    for key in keys:  # release the others
        if key != keys[7]:
            stores[2].put(key, tokens(2), expected_version=1)
    for thread in threads:
        thread.join(10)
    assert sorted(woke, key=keys.index) == keys
    for store in stores:
        store.close()


def test_leases_ignore_wall_clock_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wall clock stepped two hours ahead does not let a second holder take a live lease."""
    first, second = SQLiteStorage(tmp_path / "tokens.db"), SQLiteStorage(tmp_path / "tokens.db")
    lease = first.acquire_lease(KEY, 30.0)
    assert lease is not None
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 7200)
    assert second.acquire_lease(KEY, 30.0) is None
    assert first.renew_lease(lease) is True
    first.release_lease(lease)
    assert second.acquire_lease(KEY, 30.0) is not None
    first.close()
    second.close()


def test_a_lease_from_another_boot_is_dead(tmp_path: Path) -> None:
    """A lease row written before a reboot (another boot id) can be taken at once."""
    store = SQLiteStorage(tmp_path / "tokens.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "tokens.db")) as conn, conn:
        conn.execute(
            "INSERT INTO leases (provider_id, session_id, owner, expires_at, boot) "
            "VALUES (?, ?, 'ghost', ?, 'old-boot')",
            (KEY.provider_id, KEY.session_id, time.monotonic() + 600),
        )
    assert store.acquire_lease(KEY, 5.0) is not None
    store.close()


def test_a_claim_whose_answer_was_lost_is_taken_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An acquire that raised after its claim committed leaves its owner token: the next acquire re-takes the lease."""
    path = tmp_path / "tokens.db"
    store, other = SQLiteStorage(path), SQLiteStorage(path)
    real_claim = store._claim

    def claim_then_fail(*args: Any) -> Any:
        real_claim(*args)
        raise StorageError("the answer was lost on the way back")

    monkeypatch.setattr(store, "_claim", claim_then_fail)
    with pytest.raises(StorageError, match="lost"):
        store.acquire_lease(KEY, 60.0)
    monkeypatch.setattr(store, "_claim", real_claim)
    assert other.acquire_lease(KEY, 60.0) is None, "the lost claim did commit"
    again = store.acquire_lease(KEY, 60.0)
    assert again is not None
    store.release_lease(again)
    assert other.acquire_lease(KEY, 60.0) is not None
    store.close()
    other.close()


def test_a_schema_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    """A file written by the previous version keeps its entries; its wall-clock leases are dropped."""
    path = tmp_path / "tokens.db"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "CREATE TABLE entries (provider_id TEXT NOT NULL, session_id TEXT NOT NULL, version INTEGER NOT NULL, "
            "data TEXT NOT NULL, expires_at_retention REAL NOT NULL, "
            "PRIMARY KEY (provider_id, session_id)) WITHOUT ROWID"
        )
        conn.execute(
            "CREATE TABLE leases (provider_id TEXT NOT NULL, session_id TEXT NOT NULL, owner TEXT NOT NULL, "
            "expires_at REAL NOT NULL, PRIMARY KEY (provider_id, session_id)) WITHOUT ROWID"
        )
        conn.execute(
            "INSERT INTO entries VALUES (?, ?, 1, ?, ?)",
            (KEY.provider_id, KEY.session_id, tokens(1).to_json(), time.time() + 60),
        )
        conn.execute("INSERT INTO leases VALUES (?, ?, 'old', ?)", (KEY.provider_id, KEY.session_id, time.time() + 60))
        conn.execute("PRAGMA user_version = 1")
    os.chmod(path, 0o600)
    store = SQLiteStorage(path)
    assert store.get(KEY) == tokens(1)
    assert store.acquire_lease(KEY, 5.0) is not None
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    store.close()


def test_a_subscriber_behind_the_trimmed_change_log_hears_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the log was trimmed past what the poller read, subscribers get None (re-read everything), then digests."""
    import httpx_upstream_auth._storages._sqlite as module

    monkeypatch.setattr(module, "_KEEP_CHANGES", 5)
    monkeypatch.setattr(module, "_TRIM_EVERY", 5)
    listener, writer = SQLiteStorage(tmp_path / "tokens.db"), SQLiteStorage(tmp_path / "tokens.db")
    heard: list[str | None] = []
    caught_up = threading.Event()

    def on_change(digest: str | None) -> None:
        heard.append(digest)
        if None in heard and digest is not None:
            caught_up.set()

    unsubscribe = listener.subscribe(on_change)
    assert unsubscribe is not None
    poller = listener._poller()
    poller.next_purge = float("inf")  # no sweep: the writers below never wait for the poller
    with poller._lock:  # the poller cannot read the log while 20 changes are written and trimmed
        for version in range(1, 21):
            assert writer.put(KEY, tokens(version), expected_version=None if version == 1 else version - 1)
    assert caught_up.wait(10)
    assert heard[0] is None and set(heard[1:]) == {KEY.digest}
    unsubscribe()
    listener.close()
    writer.close()


def test_a_subscriber_that_raises_does_not_silence_the_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A change callback that raises is logged; the callbacks after it still hear that change, and the feed's
    thread lives on to report the next one."""
    listener, writer = SQLiteStorage(tmp_path / "tokens.db"), SQLiteStorage(tmp_path / "tokens.db")
    heard: list[str | None] = []
    changes = threading.Semaphore(0)

    def broken(digest: str | None) -> None:
        raise RuntimeError("a subscriber's bug")

    def on_change(digest: str | None) -> None:
        heard.append(digest)
        changes.release()

    unsubscribe_broken, unsubscribe = listener.subscribe(broken), listener.subscribe(on_change)
    assert unsubscribe_broken is not None and unsubscribe is not None
    for version in (1, 2):
        assert writer.put(KEY, tokens(version), expected_version=None if version == 1 else 1)
        assert changes.acquire(timeout=10)
    assert heard == [KEY.digest, KEY.digest]
    assert caplog.text.count("a storage change subscriber raised") == 2
    unsubscribe_broken()
    unsubscribe()
    listener.close()
    writer.close()


def test_an_unreadable_row_is_a_storage_error_saying_what_to_do(tmp_path: Path) -> None:
    """A row whose data is not an entry (another program wrote it, or a disk fault): get() raises StorageError
    naming the provider and what to do, not a ValueError, and never the session id."""
    path = tmp_path / "tokens.db"
    store = SQLiteStorage(path)
    assert store.put(KEY, tokens(1), expected_version=None)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE entries SET data = '[1, 2]'")
    with pytest.raises(
        StorageError, match=r"unreadable entry for provider 'github' \(ValueError\); delete it"
    ) as caught:
        store.get(KEY)
    assert KEY.session_id not in str(caught.value)
    store.close()
