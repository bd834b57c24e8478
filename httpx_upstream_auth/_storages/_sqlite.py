"""SQLite storage: one file shared by every process and thread on a host.

Owns the file (0600 and this user's, or refused; WAL mode), its schema, the compare-and-set transaction,
the cross-process refresh lease, the change log that tells other processes what was saved or deleted,
and the one poller thread per process and file that reads it for every watcher and subscriber, and
what ``fork()`` does to all of these (the child gets no SQLite state of the parent's, and a feed of its
own). Written once in sync code (``blocking = True``): the async twins run it in worker threads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator

import anyio
import anyio.to_thread

from .._changes import ChangeHub
from .._exceptions import StorageError, UnreadableEntry
from .._models import EntryKey, UpstreamTokens
from .._policy import DEFAULT_RETENTION, retention_deadline
from .._synchronization import (
    AsyncWaker,
    ForkRegistry,
    SyncWaker,
    async_wait_for_change,
    sync_wait_for_change,
)
from ._base import MAX_LEASE_TTL, Lease, lease_seconds, storable, version_in_range
from ._shared import Claim, SharedStorage

__all__ = ["SQLiteStorage"]

logger = logging.getLogger("httpx_upstream_auth")

#: The layout of the file's tables (``PRAGMA user_version``); a newer file is refused, not misread.
#: 2: leases on the monotonic clock (with the boot they belong to) and the ``changes`` log.
SCHEMA_VERSION = 2

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        provider_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        data TEXT NOT NULL,
        expires_at_retention REAL NOT NULL,
        PRIMARY KEY (provider_id, session_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS entries_by_retention ON entries (expires_at_retention)",
    """CREATE TABLE IF NOT EXISTS leases (
        provider_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        owner TEXT NOT NULL,
        expires_at REAL NOT NULL,
        boot TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (provider_id, session_id)
    ) WITHOUT ROWID""",
    # One row per committed save or delete, written in the same transaction: how other processes learn
    # which entry changed. Only the digest: the session id is not repeated here.
    """CREATE TABLE IF NOT EXISTS changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        digest TEXT NOT NULL,
        origin TEXT NOT NULL
    )""",
)

_LIVE = "provider_id = ? AND session_id = ? AND expires_at_retention > ?"
_UPSERT_ENTRY = (
    "INSERT INTO entries (provider_id, session_id, version, data, expires_at_retention) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (provider_id, session_id) DO UPDATE SET "
    "version = excluded.version, data = excluded.data, expires_at_retention = excluded.expires_at_retention"
)
# A lease row is dead when its time ran out, when it belongs to another boot (the monotonic clock
# restarted), or when it ends further ahead than any lease may last (written by a clock we do not share).
_DEAD_LEASE = "(leases.expires_at <= ? OR leases.boot <> ? OR leases.expires_at > ?)"
# Insert the lease, take over a dead row, or re-take our own (an acquire whose answer we never saw);
# rowcount says whether we hold it.
_CLAIM_LEASE = (
    "INSERT INTO leases (provider_id, session_id, owner, expires_at, boot) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (provider_id, session_id) DO UPDATE SET owner = excluded.owner, "
    f"expires_at = excluded.expires_at, boot = excluded.boot WHERE leases.owner = excluded.owner OR {_DEAD_LEASE}"
)
_RENEW_LEASE = (
    f"UPDATE leases SET expires_at = ? WHERE provider_id = ? AND session_id = ? AND owner = ? AND NOT {_DEAD_LEASE}"
)

#: Idle connections kept open for reuse; more are opened on demand and closed after use.
_POOL_SIZE = 8
#: How often expired rows are swept (seconds), in batches of ``_PURGE_BATCH`` rows per transaction.
_PURGE_INTERVAL = 60.0
_PURGE_BATCH = 500
#: The change log keeps about this many rows; it is trimmed every ``_TRIM_EVERY`` writes. A poller
#: that falls further behind reports "cannot tell" (``None``) instead of the missed digests.
_KEEP_CHANGES = 10_000
_TRIM_EVERY = 500
#: The poller's interval right after a change, and the longest it backs off to while idle: with
#: watchers waiting it does not back off (they wait for a save that is on its way, and one poll for all
#: of them costs ~2.5% of a core), with only subscribers listening it backs off to 50 ms.
_POLL_FAST = 0.002
_POLL_WATCHING = 0.002
_POLL_IDLE = 0.05


def _boot_id() -> str:
    """This boot of the host (Linux), so leases on the monotonic clock die with a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:  # pragma: no cover - no /proc/sys/kernel/random/boot_id: not Linux
        return ""


_BOOT = _boot_id()


# -- the per-process, per-file poller ---------------------------------------------------------------------
class _FilePoller:
    """One thread per process and file: reads the change log when ``PRAGMA data_version`` moves, wakes
    watchers, calls subscribers, and sweeps expired rows in small batches.

    It exits while nobody listens and no sweep is due (the next listener starts it again); while
    listening it polls every 2 ms while watchers wait or after a change, and backs off to 50 ms when only
    subscribers listen, so any number of idle watchers cost one cheap poll.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self.hub = ChangeHub()
        self._connect = connect
        self._lock = threading.Lock()
        self._poke = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None  # the thread's; closed by fork() between rounds
        self._last_seq: int | None = None  # None while parked: nothing to catch up on
        self._purge_due = False
        self.next_purge = 0.0  # monotonic

    def listen(self, add: Callable[[], Callable[[], None]], log_end: Callable[[], int]) -> Callable[[], None]:
        """Register a listener (``add()`` returns its remover) and make sure the thread follows the log
        from no later than now (``log_end()``: the last sequence number written), so a change committed
        after this returns is reported."""
        while True:
            # Read the log's end before taking the lock: the poller takes its lock inside an operation
            # (see _Quiesce), so reading under it could deadlock with a fork() waiting for operations.
            end = None if self._last_seq is not None else log_end()
            with self._lock:
                if self._last_seq is None and end is None:  # pragma: no cover - a race no test can order:
                    continue  # the poller parked between our two reads of _last_seq: read the end again
                remove = add()
                try:
                    if self._last_seq is None:
                        self._last_seq = end
                    self._start()
                except BaseException:  # pragma: no cover - the thread could not start (resources exhausted)
                    remove()
                    raise
                break
        self._poke.set()
        return remove

    def request_purge(self) -> None:
        """Sweep expired rows soon, in the poller's thread (never inside an ordinary write)."""
        with self._lock:  # two writers may both find a sweep due: the second one's request is a no-op
            self.next_purge = time.monotonic() + _PURGE_INTERVAL
            self._purge_due = True
            self._start()
        self._poke.set()

    def poke(self) -> None:
        """A commit through this process: look at the log now rather than at the next poll."""
        if self._last_seq is not None:
            self._poke.set()

    def _start(self) -> None:
        """Start the thread unless it runs (call with ``_lock`` held)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="httpx-upstream-auth-sqlite-poller", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._poll()
        except BaseException:  # pragma: no cover - _poll catches every Exception: only a crash of the thread
            with self._lock:
                self._thread = None
            raise

    def _poll(self) -> None:
        data_version: int | None = None
        interval = _POLL_FAST
        while True:
            with _quiesce.operation(), self._lock:
                if not self.hub.active() and not self._purge_due:
                    # Nobody listens: end the thread (a listener starts a new one), and forget our place
                    # in the log (the next listener takes its own, so nothing old is replayed).
                    self._last_seq = None
                    self._thread = None
                    self.close_connection()
                    return
            self._poke.wait(interval)
            self._poke.clear()
            with _quiesce.operation():
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                        data_version = None
                    conn = self._conn
                    more = False
                    if self._purge_due:  # one batch per round, so watchers are served in between
                        # Not due again until it finishes: a sweep that keeps failing (a refused DELETE) waits
                        # for the next request instead of failing every round before the change log is read.
                        self._purge_due = False
                        more = self._purge_due = _purge_step(conn)
                    current = _data_version(conn)
                    changed = current != data_version and self._read_changes(conn)
                    data_version = current
                    slowest = _POLL_WATCHING if self.hub.watching() else _POLL_IDLE
                    interval = _POLL_FAST if changed or more else min(interval * 1.5, slowest)
                except Exception:  # a busy or vanished file: try again later with a new connection
                    logger.debug("the SQLite change poller failed; retrying", exc_info=True)
                    self.close_connection()
                    interval = 0.1

    def close_connection(self) -> None:
        """Close the thread's connection (between rounds: it opens a new one on the next)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _read_changes(self, conn: sqlite3.Connection) -> bool:
        changed = False
        while True:
            with self._lock:
                last = self._last_seq
            if last is None:
                return changed
            rows = conn.execute(
                "SELECT seq, digest, origin FROM changes WHERE seq > ? ORDER BY seq LIMIT 1000", (last,)
            ).fetchall()
            if not rows:
                return changed
            changed = True
            with self._lock:  # only this thread moves a _last_seq that is not None
                self._last_seq = int(rows[-1][0])
            if rows[0][0] != last + 1:  # trimmed before we read them: say we cannot tell what changed
                self.hub.publish(None, None)
            for _, digest, origin in rows:
                self.hub.publish(digest, origin)


_pollers: dict[tuple[int, int, int], _FilePoller] = {}
_pollers_lock = threading.Lock()

#: How long fork() waits for this process's SQLite operations to end before forking anyway (seconds).
_FORK_WAIT = 10.0


class _Quiesce:
    """Lets ``fork()`` wait until no SQLite operation of this process runs, then close every idle connection.

    SQLite keeps each file's lock state once per process, shared by all its connections, and a child
    inherits that memory without the locks it describes (POSIX locks are not inherited). Forked during
    a write, the child's new connections wait forever for a write lock held by nobody; forked with a
    connection open, they believe they hold a shared lock they do not, so the parent could checkpoint
    and delete the WAL under them. So fork() waits (bounded) for operations to end, new ones wait for
    the fork, and the child starts with no SQLite state for the file at all.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._busy = 0
        self._forking = False
        self._depth = threading.local()  # operations nest (a subscriber callback reading the store)

    @contextlib.contextmanager
    def operation(self) -> Iterator[None]:
        """Use SQLite connections inside this block (never fork() inside it)."""
        depth: int = getattr(self._depth, "value", 0)
        if depth == 0:
            with self._cond:
                self._cond.wait_for(lambda: not self._forking, timeout=_FORK_WAIT)
                self._busy += 1
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            if depth == 0:
                with self._cond:
                    self._busy -= 1
                    if not self._busy:
                        self._cond.notify_all()

    def before_fork(self) -> None:
        """Hold new operations, wait for running ones, and close every idle connection of the process."""
        mine = 1 if getattr(self._depth, "value", 0) else 0  # fork() called inside an operation
        with self._cond:
            self._forking = True
            if not self._cond.wait_for(lambda: self._busy <= mine, timeout=_FORK_WAIT):  # pragma: no cover
                # an operation outlived _FORK_WAIT (10 s) at a fork: a hung file system, not a test's
                logger.warning("fork() while SQLite token store operations still ran: the child may find it locked")
                return
        # No operation runs now, so no other thread uses these connections; and no lock is taken: a
        # thread may hold one while it waits for this fork (the child replaces them all).
        for poller in list(_pollers.values()):
            poller.close_connection()
        for _ in range(3):  # pragma: no branch - a storage made by another thread meanwhile: look again
            try:
                storages = _forked.live()
                break
            except RuntimeError:  # pragma: no cover - that race, which no test can order from outside
                storages = []
        for storage in storages:
            idle, storage._pool = storage._pool, []
            for conn in idle:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def after_fork_in_parent(self) -> None:
        """Let operations run again."""
        with self._cond:
            self._forking = False
            self._cond.notify_all()


_quiesce = _Quiesce()


def _before_fork() -> None:
    _quiesce.before_fork()


def _after_fork_in_parent() -> None:
    _quiesce.after_fork_in_parent()


def _after_fork_in_child() -> None:
    """Give the child pollers of its own (the parent's threads do not exist here, and a parent thread
    may have held their locks), then reset every SQLiteStorage, which re-attaches its subscribers."""
    global _pollers_lock, _quiesce
    _pollers_lock = threading.Lock()
    _quiesce = _Quiesce()
    inherited = list(_pollers.items())
    _pollers.clear()
    for (_, dev, ino), old in inherited:
        new = _FilePoller(old._connect)
        # Follow the log from where the parent's poller stood: whatever it had not read yet, the
        # subscribers' copies in this child have not heard either. No gap, no I/O here.
        new._last_seq = old._last_seq
        new.next_purge = old.next_purge
        _pollers[(os.getpid(), dev, ino)] = new
    _forked.reset_all()


if hasattr(os, "register_at_fork"):  # pragma: no branch - every platform with fork() has it
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def _poller_for(identity: tuple[int, int], connect: Callable[[], sqlite3.Connection]) -> _FilePoller:
    """The poller of this process for the file ``identity`` (st_dev, st_ino); a forked child gets its own."""
    key = (os.getpid(), *identity)
    with _pollers_lock:
        found = _pollers.get(key)
        if found is None:
            found = _pollers[key] = _FilePoller(connect)
        return found


def _purge_step(conn: sqlite3.Connection) -> bool:
    """Delete up to ``_PURGE_BATCH`` expired entries, else dead leases, in one short write transaction;
    True while more may remain."""
    now = time.monotonic()
    conn.execute("BEGIN IMMEDIATE")
    try:
        deleted = conn.execute(
            "DELETE FROM entries WHERE (provider_id, session_id) IN (SELECT provider_id, session_id FROM entries "
            f"WHERE expires_at_retention <= ? LIMIT {_PURGE_BATCH})",
            (time.time(),),
        ).rowcount
        if deleted < _PURGE_BATCH:
            deleted = conn.execute(
                "DELETE FROM leases WHERE (provider_id, session_id) IN (SELECT provider_id, session_id FROM leases "
                f"WHERE {_DEAD_LEASE} LIMIT {_PURGE_BATCH})",
                (now, _BOOT, now + MAX_LEASE_TTL),
            ).rowcount
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return bool(deleted >= _PURGE_BATCH)


class SQLiteStorage(SharedStorage):
    """Entries in one SQLite file, shared safely by many threads and processes on one host.

    The file must be a regular file owned by this user: it is created 0600, an existing one is tightened
    to 0600 (its ``-wal`` and ``-shm`` companions too), and one owned by another user is refused. It is
    switched to WAL, so readers never block the writer; a fleet opening a new file at once retries the
    switch within ``timeout``. Every write is one short ``BEGIN IMMEDIATE`` transaction; ``timeout``
    bounds how long an operation waits for another writer. Entries past their retention are invisible,
    and swept in small batches by a background thread.

    Leases live in the same file on the monotonic clock (``CLOCK_MONOTONIC`` is host-wide on Linux, and
    the file is on one host), tagged with the boot they were taken in, so a wall-clock step cannot hand
    a live lease to a second process. Every save and delete is logged (by digest) in the same
    transaction; one poller thread per process and file reads that log for every :meth:`watch` and
    :meth:`subscribe`: other processes' writes reach subscribers within a few milliseconds while
    watchers wait and within about 50 ms otherwise, and a poller that fell too far behind the change log
    calls back with ``None``. The file is not safe on network filesystems.
    """

    #: How soon after a commit by another process the poller notices it while a watcher waits (seconds).
    watch_interval: float = _POLL_FAST
    #: How often :meth:`watch` re-reads the entry anyway, in case a notification was lost (a safety net).
    recheck_interval: float = 1.0

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention: float = DEFAULT_RETENTION,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(retention=retention)
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            raise ValueError(
                f"SQLiteStorage needs a file path, not {self.path!r}: use MemoryStorage for an in-memory store"
            )
        self.timeout = timeout
        self._pool: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._pid = os.getpid()
        # Connections inherited through fork() are never used or closed by the child (SQLite forbids
        # both); they are kept here so garbage collection does not close them either.
        self._inherited: list[sqlite3.Connection] = []
        self._closed = False
        self._identity = self._secure_file()
        self._open()
        self._check_companions()
        _forked.add(self)

    def __repr__(self) -> str:
        return f"SQLiteStorage({self.path!r})"

    # -- the storage contract --------------------------------------------------------------------------
    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """Return the entry (expired access token or not), or ``None`` when absent or past retention."""
        with self._connection("read tokens") as conn:
            row = conn.execute(f"SELECT data FROM entries WHERE {_LIVE}", (*_ids(key), time.time())).fetchone()
        if row is None:
            return None
        try:
            return UpstreamTokens.from_json(row[0])
        except (ValueError, TypeError) as exc:
            raise UnreadableEntry(
                f"the SQLite token store {self.path} holds an unreadable entry for provider "
                f"{key.provider_id!r} ({type(exc).__name__}); delete it and have the user log in again"
            ) from None

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Store ``tokens`` iff the live entry's version is ``expected_version`` (``None``: no entry)."""
        tokens = storable(tokens)
        if not version_in_range(expected_version):
            return False
        data = tokens.to_json()
        with self._write("save tokens") as conn:
            now = time.time()  # after BEGIN IMMEDIATE, which may have waited for another writer
            row = conn.execute(f"SELECT version FROM entries WHERE {_LIVE}", (*_ids(key), now)).fetchone()
            if (None if row is None else row[0]) != expected_version:
                return False
            deadline = retention_deadline(tokens, now, self.retention)
            conn.execute(_UPSERT_ENTRY, (*_ids(key), tokens.version, data, deadline))
            self._log_change(conn, key)
        self._changed(key)
        return True

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Remove the live entry; with ``expected_version``, only while it still has that version."""
        if not version_in_range(expected_version):
            return False
        with self._write("delete tokens") as conn:
            cursor = conn.execute(
                f"DELETE FROM entries WHERE {_LIVE} AND (? IS NULL OR version = ?)",
                (*_ids(key), time.time(), expected_version, expected_version),
            )
            deleted = cursor.rowcount > 0
            if deleted:
                self._log_change(conn, key)
        if deleted:
            self._changed(key)
        return deleted

    def scan(self, provider_id: str | None = None) -> Iterator[EntryKey]:
        """The keys of the live entries (only ``provider_id``'s when given), in the order of their ids, a
        page of :attr:`scan_batch` keys per short read (each page resumes after the last key of the one
        before, so entries saved or deleted between pages neither repeat nor shift the listing)."""
        after: tuple[str | bytes, str | bytes] | None = None
        batch = max(1, self.scan_batch)
        while True:
            rows = self._scan_page(provider_id, after, batch)
            for provider, session in rows:
                yield EntryKey(_from_sql(provider), _from_sql(session))
            if len(rows) < batch:
                return
            after = rows[-1]

    def _scan_page(
        self, provider_id: str | None, after: tuple[str | bytes, str | bytes] | None, batch: int
    ) -> list[tuple[str | bytes, str | bytes]]:
        where = ["expires_at_retention > ?"]
        params: list[object] = [time.time()]
        if provider_id is not None:
            where.append("provider_id = ?")
            params.append(_text(provider_id))
        if after is not None:
            where.append("(provider_id, session_id) > (?, ?)")
            params.extend(after)
        query = (
            f"SELECT provider_id, session_id FROM entries WHERE {' AND '.join(where)} "
            f"ORDER BY provider_id, session_id LIMIT {batch}"
        )
        with self._connection("list tokens") as conn:
            return [(row[0], row[1]) for row in conn.execute(query, params).fetchall()]

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Claim the refresh lease for ``key`` across processes; ``None`` while another holder's is live.

        When the answer is lost (an error or a cancellation after the claim may have committed), the
        owner token is kept and the next acquire of that key re-uses it, taking the lease back; a claim
        whose transaction never reached its commit (a write lock that could not be had) leaves nothing.
        """
        ttl = lease_seconds(ttl)
        with self._orphans.owner_for(key, ttl) as claim:
            claim.may_have_landed = False
            return self._claim(key, ttl, claim)

    async def aacquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Async twin of :meth:`acquire_lease`; a cancelled call leaves the owner token for the next one."""
        ttl = lease_seconds(ttl)
        with self._orphans.owner_for(key, ttl) as claim:
            claim.may_have_landed = False
            return await anyio.to_thread.run_sync(self._claim, key, ttl, claim)

    def renew_lease(self, lease: Lease) -> bool:
        """Extend our live lease to ``lease.ttl`` from now; False when it ran out or another holder has it."""
        ttl = lease_seconds(lease.ttl)
        with self._write("renew the refresh lease") as conn:
            now = time.monotonic()
            params = (now + ttl, *_ids(lease.key), lease.owner, now, _BOOT, now + MAX_LEASE_TTL)
            return bool(conn.execute(_RENEW_LEASE, params).rowcount == 1)

    def release_lease(self, lease: Lease) -> None:
        """Give the lease back if it is still ours (an expired holder cannot drop a newer holder's lease)."""
        with self._write("release the refresh lease") as conn:
            conn.execute(
                "DELETE FROM leases WHERE provider_id = ? AND session_id = ? AND owner = ?",
                (*_ids(lease.key), lease.owner),
            )

    def watch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Return once the entry's version differs from ``version``, or after ``timeout`` seconds.

        Waits on an event, without a thread or a timer of its own: writes through this process wake it
        at once, other processes' within the poller's interval (2 ms while anyone watches).
        """
        deadline = time.monotonic() + timeout
        waker = SyncWaker()
        remove = self._listen_for(key, waker.wake)
        try:
            read = functools.partial(self._current_version, key)
            sync_wait_for_change(read, version, deadline, waker, self._recheck)
        finally:
            remove()

    async def awatch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Async twin of :meth:`watch`: waits on the event loop (no thread held while waiting); cancellable."""
        deadline = time.monotonic() + timeout
        waker = AsyncWaker()
        with anyio.CancelScope(shield=True):  # a registration that completed must be removed below
            remove = await anyio.to_thread.run_sync(self._listen_for, key, waker.wake)
        try:
            read = functools.partial(anyio.to_thread.run_sync, self._current_version, key)
            await async_wait_for_change(read, version, deadline, waker, self._recheck)
        finally:
            remove()

    def close(self) -> None:
        """Close the idle connections; connections in use close when their operation ends."""
        with self._pool_lock:
            self._closed = True
            idle, self._pool = self._pool, []
        for conn in idle:
            conn.close()

    # -- changes and leases ------------------------------------------------------------------------------
    def _poller(self) -> _FilePoller:
        return _poller_for(self._identity, functools.partial(_open_connection, self.path, self.timeout))

    def _listen_for(self, key: EntryKey, wake: Callable[[], None]) -> Callable[[], None]:
        poller = self._poller()
        return poller.listen(lambda: poller.hub.add_waiter(key.digest, wake), self._log_end)

    def _log_end(self) -> int:
        with self._connection("follow saved tokens") as conn:
            return int(conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])

    def _attach_feed(self) -> None:
        """Have the poller report other writers' changes to this object's subscribers."""
        poller, origin = self._poller(), self._origin
        self._link_feed(lambda feed: poller.listen(lambda: poller.hub.add_subscriber(feed, origin), self._log_end))

    def _recheck(self) -> float:
        return self.recheck_interval

    def _current_version(self, key: EntryKey) -> int | None:
        with self._connection("watch for saved tokens") as conn:
            row = conn.execute(f"SELECT version FROM entries WHERE {_LIVE}", (*_ids(key), time.time())).fetchone()
        return None if row is None else int(row[0])

    def _log_change(self, conn: sqlite3.Connection, key: EntryKey) -> None:
        seq = conn.execute("INSERT INTO changes (digest, origin) VALUES (?, ?)", (key.digest, self._origin)).lastrowid
        if seq is not None and seq % _TRIM_EVERY == 0:  # a batch of at most _TRIM_EVERY rows
            conn.execute("DELETE FROM changes WHERE seq <= ?", (seq - _KEEP_CHANGES,))

    def _changed(self, key: EntryKey) -> None:
        """After a committed save or delete: tell this object's subscribers and this process's watchers
        now, let the poller report it to the others, and start a sweep when one is due."""
        self.notify_change(key)
        poller = self._poller()
        poller.hub.wake(key.digest)
        poller.poke()
        if time.monotonic() >= poller.next_purge:
            poller.request_purge()

    def _claim(self, key: EntryKey, ttl: float, claim: Claim) -> Lease | None:
        with self._write("take the refresh lease", committing=claim) as conn:
            now = time.monotonic()
            params = (*_ids(key), claim.owner, now + ttl, _BOOT, now, _BOOT, now + MAX_LEASE_TTL)
            claimed = conn.execute(_CLAIM_LEASE, params).rowcount == 1
        return Lease(key, claim.owner, ttl) if claimed else None

    # -- connections and transactions ----------------------------------------------------------------
    @contextlib.contextmanager
    def _connection(self, what: str) -> Iterator[sqlite3.Connection]:
        """Lend a connection for one operation; sqlite3 errors become StorageError."""
        with _quiesce.operation():
            conn = self._checkout(what)
            healthy = False
            try:
                yield conn
                healthy = True
            except sqlite3.Error as exc:
                raise self._error(what, exc) from exc
            finally:
                self._checkin(conn, healthy)

    @contextlib.contextmanager
    def _write(self, what: str, committing: Claim | None = None) -> Iterator[sqlite3.Connection]:
        """One short write transaction: BEGIN IMMEDIATE takes the write lock up front, so the
        compare and the set cannot interleave with another writer, and no deadlock-prone lock upgrade
        happens later. Nothing slow may run inside it. ``committing`` (a lease claim) is told when the
        transaction may commit: a COMMIT that fails may still have committed."""
        with self._connection(what) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            if committing is not None:
                committing.may_have_landed = True
            conn.execute("COMMIT")

    def _checkout(self, what: str) -> sqlite3.Connection:
        with self._pool_lock:
            if self._closed:
                raise StorageError(f"this SQLiteStorage ({self.path}) is closed; create a new one to {what}")
            if self._pid != os.getpid():  # pragma: no cover - a fork by C code that skips the at-fork hooks
                self._inherited.extend(self._pool)
                self._pool, self._pid = [], os.getpid()
            if self._pool:
                return self._pool.pop()
        try:
            return _open_connection(self.path, self.timeout)
        except sqlite3.Error as exc:
            raise self._error(what, exc) from exc

    def _checkin(self, conn: sqlite3.Connection, healthy: bool) -> None:
        if healthy and conn.in_transaction:  # pragma: no cover - a COMMIT or ROLLBACK that failed (disk I/O)
            healthy = False  # left a transaction open: do not reuse the connection
        with self._pool_lock:
            if healthy and not self._closed and self._pid == os.getpid() and len(self._pool) < _POOL_SIZE:
                self._pool.append(conn)
                return
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    # -- opening the file --------------------------------------------------------------------------------
    def _open(self) -> None:
        """Switch to WAL and create the schema, retrying while another process does the same.

        SQLite does not apply the busy timeout to ``PRAGMA journal_mode``, so a fleet opening a new file
        at once would see SQLITE_BUSY within a millisecond: retry with back-off within ``timeout``.
        """
        with _quiesce.operation():
            self._open_schema()

    def _open_schema(self) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        conn = self._checkout("open the database")
        try:
            while True:
                try:
                    self._init_schema(conn)
                    break
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc) or time.monotonic() + delay > deadline:
                        raise
                    time.sleep(delay)  # _init_schema rolled back whatever it began
                    delay = min(delay * 2, 0.05)
        except sqlite3.Error as exc:
            conn.close()
            raise self._error("open the database", exc) from exc
        except BaseException:
            conn.close()
            raise
        self._checkin(conn, True)

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":  # pragma: no cover - a file system without shared memory (NFS and the like)
                raise StorageError(
                    f"could not switch the SQLite token store {self.path} to WAL mode (it is in {mode!r} "
                    "mode); put it on a local filesystem that supports shared memory"
                )
        if self._schema_is_current(conn):
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute("PRAGMA user_version").fetchone()[0]  # again, under the write lock
            if found < SCHEMA_VERSION:
                if found == 1:  # version 1 leases were on the wall clock: they only lived seconds anyway
                    conn.execute("DROP TABLE IF EXISTS leases")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _schema_is_current(self, conn: sqlite3.Connection) -> bool:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"the SQLite token store {self.path} was written by a newer httpx-upstream-auth (schema "
                f"{found}, this version reads up to {SCHEMA_VERSION}); upgrade, or use another file"
            )
        return bool(found == SCHEMA_VERSION)

    def _secure_file(self) -> tuple[int, int]:
        """Create the file 0600, or make sure an existing one is this user's and private; (st_dev, st_ino)."""
        try:
            # Create it ourselves so it is born 0600: SQLite would create it 0644 (less the umask).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StorageError(
                f"cannot create the SQLite token store {self.path} ({exc.strerror}); check that its "
                "directory exists and is writable by this user"
            ) from exc
        else:
            os.close(fd)
        found = self._make_private(self.path)
        assert found is not None  # it exists: we created it or found it
        self._check_companions()  # before SQLite opens them: a planted -wal would receive the tokens
        return found.st_dev, found.st_ino

    def _check_companions(self) -> None:
        for suffix in ("-wal", "-shm", "-journal"):
            self._make_private(self.path + suffix)

    def _make_private(self, path: str) -> os.stat_result | None:
        """Refuse a file another user owns (or that is not a regular file); tighten ours to 0600."""
        try:
            found = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(
                f"cannot inspect the SQLite token store file {path} ({exc.strerror}); check that its "
                "directory is readable by this user"
            ) from exc
        if not stat.S_ISREG(found.st_mode):
            raise StorageError(f"the SQLite token store {path} is not a regular file; choose another path")
        uid = getattr(os, "geteuid", lambda: None)()
        if uid is not None and found.st_uid != uid:
            raise StorageError(
                f"refusing the SQLite token store {path}: it belongs to user id {found.st_uid}, not to this "
                f"user ({uid}), who could then read or replace the refresh tokens in it; remove it, or keep "
                "the store in a directory only this user can write to"
            )
        if stat.S_IMODE(found.st_mode) & 0o077:
            try:
                os.chmod(path, 0o600)
            except OSError as exc:
                raise StorageError(
                    f"the SQLite token store {path} is readable by other users (mode "
                    f"{stat.S_IMODE(found.st_mode):o}) and could not be made private ({exc.strerror}); "
                    "chmod 600 it"
                ) from exc
        return found

    def _error(self, what: str, exc: sqlite3.Error) -> StorageError:
        # sqlite3 messages never contain bound parameters, so no token can leak through them.
        if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
            return StorageError(
                f"could not {what}: the SQLite token store {self.path} stayed locked by another writer for "
                f"more than {self.timeout:g}s; retry, or raise SQLiteStorage(timeout=...)"
            )
        return StorageError(
            f"could not {what} in the SQLite token store {self.path} ({type(exc).__name__}: {exc}); check "
            "that the file and its directory exist and are readable and writable by this user, then retry"
        )


def _reset_in_child(storage: SQLiteStorage) -> None:
    """In a forked child: drop the inherited connections unused, reset what every shared store resets
    (origin, lost lease answers, the feed), and re-attach the subscribers to this process's poller."""
    storage._pool_lock = threading.Lock()  # a parent thread may have held it at fork()
    storage._inherited.extend(storage._pool)
    storage._pool, storage._pid = [], os.getpid()
    storage._reset_shared_in_child()
    if not storage._closed:
        storage._attach_feed()


# Reset by _after_fork_in_child, after the pollers they re-attach to.
_forked: ForkRegistry[SQLiteStorage] = ForkRegistry(_reset_in_child, hook=False)


def _open_connection(path: str, timeout: float) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; _write() issues BEGIN IMMEDIATE itself.
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        # FULL: a committed rotation survives power loss; the old refresh token is already dead.
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # pragma: no cover - Python 3.10's sqlite3 errors carry no code (the tests run on 3.11+)
        return "locked" in str(exc).lower() or "busy" in str(exc).lower()
    return bool(code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED))


def _text(part: str) -> str | bytes:
    """An id as SQLite can bind it: text, or (for ids with lone surrogates) their bytes as a BLOB. Text
    and BLOB values never compare equal, so the mapping stays one-to-one."""
    if part.isascii():
        return part
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:
        return part.encode("utf-8", "surrogatepass")
    return part


def _from_sql(part: str | bytes) -> str:
    """An id as :func:`_text` bound it, back as text."""
    return part.decode("utf-8", "surrogatepass") if isinstance(part, bytes) else part


def _ids(key: EntryKey) -> tuple[str | bytes, str | bytes]:
    return _text(key.provider_id), _text(key.session_id)


def _data_version(conn: sqlite3.Connection) -> int:
    """A counter that moves whenever another connection commits to the file (no disk I/O in WAL mode)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])
