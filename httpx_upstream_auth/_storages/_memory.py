"""In-memory storage: the default for one process, on a cachetools TLRU cache."""

from __future__ import annotations

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
        self._entries: cachetools.TLRUCache[EntryKey, tuple[UpstreamTokens, float]] = cachetools.TLRUCache(
            maxsize=maxsize, ttu=lambda _key, value, _now: value[1], timer=time.time
        )
        self._lock = threading.Lock()
        _forked.add(self)

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """Return the entry, or ``None`` when absent or past its retention."""
        with self._lock:
            found = self._entries.get(key)
        return None if found is None else found[0]

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Compare-and-set on ``version``."""
        with self._lock:
            found = self._entries.get(key)
            if (None if found is None else found[0].version) != expected_version:
                return False
            tokens = storable(tokens)
            self._entries[key] = (tokens, retention_deadline(tokens, time.time(), self.retention))
        self.notify_change(key)
        return True

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Remove the entry (only at ``expected_version`` when given)."""
        with self._lock:
            found = self._entries.get(key)
            if found is None or (expected_version is not None and found[0].version != expected_version):
                return False
            del self._entries[key]
        self.notify_change(key)
        return True

    def scan(self, provider_id: str | None = None) -> Iterator[EntryKey]:
        """The keys of the entries within their retention (only ``provider_id``'s when given), from a
        snapshot of the keys taken at the first step: entries saved after it are not listed, entries
        deleted after it are skipped (the snapshot holds references only: the entries are in memory anyway)."""
        with self._lock:
            self._entries.expire()
            keys = list(self._entries)
        for key in keys:
            if provider_id is not None and key.provider_id != provider_id:
                continue
            with self._lock:
                present = key in self._entries
            if present:
                yield key


def _reset_in_child(storage: MemoryStorage) -> None:
    # A forked child starts with no entries: a copy would be a second store holding the same refresh
    # tokens as the parent's, and both processes would redeem them (the provider revokes the grant at the
    # second). Memory storage is one process's; its lock, which a parent thread may have held, is new too.
    storage._lock = threading.Lock()
    storage._entries.clear()


_forked: ForkRegistry[MemoryStorage] = ForkRegistry(_reset_in_child)
