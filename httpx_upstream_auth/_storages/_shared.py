"""What the stores shared between processes (SQLite, Redis) do alike, on top of the storage contract.

Other writers' saves and deletes reach a storage object's subscribers through one feed in the store's
change hub, attached while anyone subscribes; an origin tag names the object's own writes (its
subscribers heard of them already); and a lease claim whose answer was lost is re-taken, not orphaned.
"""

from __future__ import annotations

import contextlib
import threading
from abc import abstractmethod
from collections.abc import Callable, Iterator

from .._changes import ChangeCallback, feed_of
from .._models import EntryKey
from .._policy import DEFAULT_RETENTION
from ._base import Storage, new_owner

__all__ = ["LostClaims", "SharedStorage"]


class LostClaims(dict[EntryKey, str]):
    """Owner tokens of lease acquires whose answer never reached the caller, by key.

    After an error or a cancellation the store may have granted the lease all the same: the next acquire
    of that key claims with the same owner token and so takes it back, instead of leaving it held by
    nobody until its ttl runs out.
    """

    @contextlib.contextmanager
    def owner_for(self, key: EntryKey) -> Iterator[tuple[str, bool]]:
        """The owner token to claim ``key``'s lease with, and whether a lost claim used it before; kept
        for the next acquire when the block raises (or is cancelled)."""
        orphan = self.pop(key, None)
        owner = orphan or new_owner()
        try:
            yield owner, orphan is not None
        except BaseException:
            self[key] = owner
            raise


def _subscribers_of(storage: Storage) -> list[ChangeCallback]:
    return storage._subscribers


class SharedStorage(Storage):
    """A store that several processes use at once: one change feed per object, and lost claims kept."""

    def __init__(self, *, retention: float = DEFAULT_RETENTION) -> None:
        super().__init__(retention=retention)
        #: Names this object's writes in the store's change feed, so its own subscribers are not told twice.
        self._origin = new_owner()[:16]
        self._orphans = LostClaims()
        # The remover of this object's one feed from the store's hub, while anyone subscribes.
        self._feed_remove: Callable[[], None] | None = None
        self._feed_lock = threading.Lock()

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None] | None:
        """Call ``callback(digest)`` after every save or delete of the store, by any process (or host).

        Writes through this object are reported at once, in the writing thread; others from the store's
        change-feed thread as it learns of them (``None``: it cannot tell what changed, re-read
        everything). Callbacks run in that thread, which also wakes every watcher: keep them short.
        """
        local = super().subscribe(callback)
        assert local is not None  # the base class always reports this object's own writes
        try:
            self._attach_feed()
        except BaseException:
            local()
            self._detach_feed()
            raise

        def unsubscribe() -> None:
            local()
            self._detach_feed()

        return unsubscribe

    @abstractmethod
    def _attach_feed(self) -> None:
        """Have the store's change feed report other writers' changes to this object's subscribers
        (through :meth:`_link_feed`)."""

    def _link_feed(self, add: Callable[[ChangeCallback], Callable[[], None]]) -> None:
        """Give this object's subscribers one place in a change hub (``add(feed)`` returns its remover),
        unless they have one or nobody subscribes."""
        with self._feed_lock:
            if self._feed_remove is None and self._subscribers:
                self._feed_remove = add(feed_of(self, _subscribers_of))

    def _detach_feed(self) -> None:
        """Leave the hub once the last subscriber left (the store's feed may then stop)."""
        with self._feed_lock:
            if self._feed_remove is not None and not self._subscribers:
                remove, self._feed_remove = self._feed_remove, None
                remove()

    def _reset_shared_in_child(self) -> None:
        """In a forked child: a new feed lock (a parent thread may have held it), a new origin (the
        parent's writes are now another writer's), no lease answers the parent lost (re-taking one here
        would make two holders), and no place in the parent's hub."""
        self._feed_lock = threading.Lock()
        self._origin = new_owner()[:16]
        self._orphans = LostClaims()
        self._feed_remove = None
