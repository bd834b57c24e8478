"""SQLite storage: one file shared by every process and thread on a host.

Owns the file (created 0600, WAL mode), its schema, the compare-and-set transaction, the cross-process
refresh lease, and the watch that wakes a follower when another connection saves. Written once in
sync code (``blocking = True``): the async twins run it in worker threads.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator

import anyio
import anyio.to_thread

from ._exceptions import StorageError
from ._models import EntryKey, UpstreamTokens
from ._policy import DEFAULT_RETENTION, retention_deadline
from ._storage import Lease, Storage, new_owner

__all__ = ["SQLiteStorage"]

#: The layout of the file's tables (``PRAGMA user_version``); a newer file is refused, not misread.
SCHEMA_VERSION = 1

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
        PRIMARY KEY (provider_id, session_id)
    ) WITHOUT ROWID""",
)

_LIVE = "provider_id = ? AND session_id = ? AND expires_at_retention > ?"
_UPSERT_ENTRY = (
    "INSERT INTO entries (provider_id, session_id, version, data, expires_at_retention) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (provider_id, session_id) DO UPDATE SET "
    "version = excluded.version, data = excluded.data, expires_at_retention = excluded.expires_at_retention"
)
# Insert the lease, or take over a row whose holder's lease has run out; rowcount says which happened.
_CLAIM_LEASE = (
    "INSERT INTO leases (provider_id, session_id, owner, expires_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (provider_id, session_id) DO UPDATE SET owner = excluded.owner, "
    "expires_at = excluded.expires_at WHERE leases.expires_at <= ?"
)

#: Idle connections kept open for reuse; more are opened on demand and closed after use.
_POOL_SIZE = 8
#: How often expired rows are swept (seconds); reads never see them either way.
_PURGE_INTERVAL = 60.0


class SQLiteStorage(Storage):
    """Entries in one SQLite file, shared safely by many threads and processes on one host.

    The file is created with mode 0600 (its ``-wal`` and ``-shm`` companions get the same mode) and
    switched to WAL, so readers never block the writer. Every write is one short ``BEGIN IMMEDIATE``
    transaction; ``timeout`` bounds how long an operation waits for another writer. Entries past their
    retention are invisible and swept from time to time. Leases live in the same file, on wall-clock
    time, so they serialize refreshes across processes. The file is not safe on network filesystems.
    """

    #: How often :meth:`watch` checks whether another connection has committed (seconds).
    watch_interval: float = 0.002

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
        self._next_purge = 0.0
        # Bumped after each local commit, so watchers in this process wake at once rather than at
        # their next poll; writes by other processes are seen through PRAGMA data_version.
        self._saved = threading.Condition()
        self._generation = 0
        self._create_file()
        with self._connection("open the database") as conn:
            self._init_schema(conn)
        self._tighten_companions()

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
            raise StorageError(
                f"the SQLite token store {self.path} holds an unreadable entry for provider "
                f"{key.provider_id!r} ({type(exc).__name__}); delete it and have the user log in again"
            ) from None

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Store ``tokens`` iff the live entry's version is ``expected_version`` (``None``: no entry)."""
        data = tokens.to_json()
        with self._write("save tokens") as conn:
            now = time.time()  # after BEGIN IMMEDIATE, which may have waited for another writer
            row = conn.execute(f"SELECT version FROM entries WHERE {_LIVE}", (*_ids(key), now)).fetchone()
            if (None if row is None else row[0]) != expected_version:
                return False
            deadline = retention_deadline(tokens, now, self.retention)
            conn.execute(_UPSERT_ENTRY, (*_ids(key), tokens.version, data, deadline))
            self._purge_if_due(conn, now)
        self._notify_local()
        return True

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Remove the live entry; with ``expected_version``, only while it still has that version."""
        with self._write("delete tokens") as conn:
            cursor = conn.execute(
                f"DELETE FROM entries WHERE {_LIVE} AND (? IS NULL OR version = ?)",
                (*_ids(key), time.time(), expected_version, expected_version),
            )
            deleted = cursor.rowcount > 0
        if deleted:
            self._notify_local()
        return deleted

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Claim the refresh lease for ``key`` across processes; ``None`` while another holder's is live."""
        owner = new_owner()
        with self._write("take the refresh lease") as conn:
            now = time.time()
            claimed = conn.execute(_CLAIM_LEASE, (*_ids(key), owner, now + ttl, now)).rowcount == 1
        return Lease(key, owner, ttl) if claimed else None

    def release_lease(self, lease: Lease) -> None:
        """Give the lease back if it is still ours (an expired holder cannot drop a newer holder's lease)."""
        with self._write("release the refresh lease") as conn:
            conn.execute(
                "DELETE FROM leases WHERE provider_id = ? AND session_id = ? AND owner = ?",
                (*_ids(lease.key), lease.owner),
            )

    def watch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Return once the entry's version differs from ``version``, or after ``timeout`` seconds.

        Wakes at once for writes through this storage object, and within ``watch_interval`` for writes
        by other connections and processes (it polls ``PRAGMA data_version``, which costs no disk I/O,
        and re-reads the entry only when the database changed).
        """
        self._watch(key, version, timeout, None)

    async def awatch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Async twin of :meth:`watch`: waits in a worker thread of its own, and is cancellable."""
        stop = threading.Event()
        try:
            # A limiter of our own: a long watch must not hold one of the shared worker-thread tokens
            # that the writer we are waiting for may need for its own put().
            await anyio.to_thread.run_sync(
                self._watch, key, version, timeout, stop, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1)
            )
        finally:
            stop.set()  # an abandoned (cancelled) watch thread returns at its next poll

    def close(self) -> None:
        """Close the idle connections; connections in use close when their operation ends."""
        with self._pool_lock:
            self._closed = True
            idle, self._pool = self._pool, []
        for conn in idle:
            conn.close()

    # -- watching ----------------------------------------------------------------------------------------
    def _watch(self, key: EntryKey, version: int | None, timeout: float, stop: threading.Event | None) -> None:
        deadline = time.monotonic() + timeout
        with self._connection("watch for saved tokens") as conn:
            # Take both change markers before reading the row: any commit after this point moves one.
            generation = self._generation
            data_version = _data_version(conn)
            if self._live_version(conn, key) != version:
                return
            while (remaining := deadline - time.monotonic()) > 0 and not (stop is not None and stop.is_set()):
                with self._saved:
                    if self._generation == generation:
                        self._saved.wait(min(self.watch_interval, remaining))
                    now_generation = self._generation
                now_data_version = _data_version(conn)
                if now_generation != generation or now_data_version != data_version:
                    generation, data_version = now_generation, now_data_version
                    if self._live_version(conn, key) != version:
                        return

    def _live_version(self, conn: sqlite3.Connection, key: EntryKey) -> int | None:
        row = conn.execute(f"SELECT version FROM entries WHERE {_LIVE}", (*_ids(key), time.time())).fetchone()
        return None if row is None else int(row[0])

    def _notify_local(self) -> None:
        with self._saved:
            self._generation += 1
            self._saved.notify_all()

    # -- connections and transactions ----------------------------------------------------------------
    @contextlib.contextmanager
    def _connection(self, what: str) -> Iterator[sqlite3.Connection]:
        """Lend a connection for one operation; sqlite3 errors become StorageError."""
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
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One short write transaction: BEGIN IMMEDIATE takes the write lock up front, so the
        compare and the set cannot interleave with another writer, and no deadlock-prone lock upgrade
        happens later. Nothing slow may run inside it."""
        with self._connection(what) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _checkout(self, what: str) -> sqlite3.Connection:
        with self._pool_lock:
            if self._closed:
                raise StorageError(f"this SQLiteStorage ({self.path}) is closed; create a new one to {what}")
            if self._pid != os.getpid():
                self._inherited.extend(self._pool)
                self._pool, self._pid = [], os.getpid()
            if self._pool:
                return self._pool.pop()
        try:
            return self._connect()
        except sqlite3.Error as exc:
            raise self._error(what, exc) from exc

    def _checkin(self, conn: sqlite3.Connection, healthy: bool) -> None:
        if healthy and conn.in_transaction:  # a failed COMMIT/ROLLBACK left one open: do not reuse
            healthy = False
        with self._pool_lock:
            if healthy and not self._closed and self._pid == os.getpid() and len(self._pool) < _POOL_SIZE:
                self._pool.append(conn)
                return
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; _write() issues BEGIN IMMEDIATE itself.
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            # FULL: a committed rotation survives power loss; the old refresh token is already dead.
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StorageError(
                    f"could not switch the SQLite token store {self.path} to WAL mode (it is in {mode!r} "
                    "mode); put it on a local filesystem that supports shared memory"
                )
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StorageError(
                f"the SQLite token store {self.path} was written by a newer httpx-upstream-auth (schema "
                f"{found}, this version reads up to {SCHEMA_VERSION}); upgrade, or use another file"
            )
        if found == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _create_file(self) -> None:
        # Create the file ourselves so it is born 0600: SQLite would create it 0644 (less the umask).
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise StorageError(
                f"cannot create the SQLite token store {self.path} ({exc.strerror}); check that its "
                "directory exists and is writable by this user"
            ) from exc
        os.close(fd)

    def _tighten_companions(self) -> None:
        # SQLite gives -wal and -shm the main file's mode; this also covers files made by older code.
        try:
            allowed = stat.S_IMODE(os.stat(self.path).st_mode)
            for suffix in ("-wal", "-shm"):
                companion = self.path + suffix
                with contextlib.suppress(FileNotFoundError):
                    mode = stat.S_IMODE(os.stat(companion).st_mode)
                    if mode & ~allowed:
                        os.chmod(companion, mode & allowed)
        except OSError:
            pass  # not ours to change (another user's file): SQLite's own mode handling stands

    def _purge_if_due(self, conn: sqlite3.Connection, now: float) -> None:
        if now < self._next_purge:
            return
        self._next_purge = now + _PURGE_INTERVAL
        conn.execute("DELETE FROM entries WHERE expires_at_retention <= ?", (now,))
        conn.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))

    def _error(self, what: str, exc: sqlite3.Error) -> StorageError:
        # sqlite3 messages never contain bound parameters, so no token can leak through them.
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower():
            return StorageError(
                f"could not {what}: the SQLite token store {self.path} stayed locked by another writer for "
                f"more than {self.timeout:g}s; retry, or raise SQLiteStorage(timeout=...)"
            )
        return StorageError(
            f"could not {what} in the SQLite token store {self.path} ({type(exc).__name__}: {exc}); check "
            "that the file and its directory exist and are readable and writable by this user, then retry"
        )


def _ids(key: EntryKey) -> tuple[str, str]:
    return key.provider_id, key.session_id


def _data_version(conn: sqlite3.Connection) -> int:
    """A counter that moves whenever another connection commits to the file (no disk I/O in WAL mode)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])
