"""In-memory storage: the default for one process."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Iterator

import cachetools

from .._models import EntryKey, UpstreamTokens
from .._policy import DEFAULT_RETENTION, retention_deadline
from .._synchronization import ForkRegistry
from ._base import Storage, storable

__all__ = ["MemoryStorage"]


class MemoryStorage(Storage):
    """Entries in this process's memory, dropped when the refresh token's life (or ``retention``) ends.

    Fast and dependency-free, but lost on restart and not shared between processes (a forked child
    starts empty: its sessions log in again): use :class:`SQLiteStorage` or :class:`RedisStorage` for that.
    ``maxsize`` bounds the number of sessions (least recently used go first).
    """

    blocking = False

    def __init__(self, *, retention: float = DEFAULT_RETENTION, maxsize: int = 1_000_000) -> None:
        super().__init__(retention=retention)
        # (provider id, session id) -> (tokens, retention deadline); the least recently used goes first beyond
        # maxsize. An LRU cache with the deadline checked here rather than cachetools' TLRU cache, whose per-read
        # expiry bookkeeping, and EntryKey's hashing in Python on each of its lookups, made a read two to three
        # times dearer: a manager pays one read per cache miss, so with far more sessions than its cache holds,
        # on most requests.
        self._entries: cachetools.LRUCache[tuple[str, str], tuple[UpstreamTokens, float]] = cachetools.LRUCache(maxsize)
        # (deadline, key) of every write, soonest first: expired entries nobody reads are dropped by later
        # writes. A stale pair (the key was written again or deleted since) is skipped when it comes up.
        self._deadlines: list[tuple[float, tuple[str, str]]] = []
        self._lock = threading.Lock()
        _forked.add(self)

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """Return the entry, or ``None`` when absent or past its retention."""
        with self._lock:
            found = self._live((key.provider_id, key.session_id), time.time())
        return None if found is None else found[0]

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Compare-and-set on ``version``."""
        with self._lock:
            now = time.time()
            slot = (key.provider_id, key.session_id)
            found = self._live(slot, now)
            if (None if found is None else found[0].version) != expected_version:
                return False
            tokens = storable(tokens)
            deadline = retention_deadline(tokens, now, self.retention)
            self._entries[slot] = (tokens, deadline)
            heapq.heappush(self._deadlines, (deadline, slot))
            self._expire(now)
        self.notify_change(key)
        return True

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Remove the entry (only at ``expected_version`` when given)."""
        with self._lock:
            slot = (key.provider_id, key.session_id)
            found = self._live(slot, time.time())
            if found is None or (expected_version is not None and found[0].version != expected_version):
                return False
            del self._entries[slot]
        self.notify_change(key)
        return True

    def _live(self, slot: tuple[str, str], now: float) -> tuple[UpstreamTokens, float] | None:
        # Lock held. The entry (now the most recently used), unless past its retention (then it is dropped).
        found = self._entries.get(slot)
        if found is not None and found[1] <= now:
            del self._entries[slot]
            return None
        return found

    def _expire(self, now: float) -> None:
        # Lock held. Drop entries past their retention; rebuild the heap once stale pairs outnumber live ones, so
        # it stays within twice the entries.
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, slot = heapq.heappop(deadlines)
            found = self._entries.get(slot)
            if found is not None and found[1] <= now:
                del self._entries[slot]
        if len(deadlines) > 2 * len(self._entries) + 64:
            self._deadlines = [(deadline, slot) for slot, (_, deadline) in self._entries.items()]
            heapq.heapify(self._deadlines)

    def scan(self, provider_id: str | None = None) -> Iterator[EntryKey]:
        """The keys of the entries within their retention (only ``provider_id``'s when given), from a
        snapshot of the keys taken at the first step: entries saved after it are not listed, entries
        deleted after it are skipped (the snapshot holds references only: the entries are in memory anyway)."""
        with self._lock:
            self._expire(time.time())
            slots = list(self._entries)
        for slot in slots:
            if provider_id is not None and slot[0] != provider_id:
                continue
            with self._lock:
                present = self._live(slot, time.time()) is not None
            if present:
                yield EntryKey(*slot)


def _reset_in_child(storage: MemoryStorage) -> None:
    # A forked child starts with no entries: a copy would be a second store holding the same refresh
    # tokens as the parent's, and both processes would redeem them (the provider revokes the grant at the
    # second). Memory storage is one process's; its lock, which a parent thread may have held, is new too.
    storage._lock = threading.Lock()
    storage._entries.clear()
    storage._deadlines.clear()


_forked: ForkRegistry[MemoryStorage] = ForkRegistry(_reset_in_child)
