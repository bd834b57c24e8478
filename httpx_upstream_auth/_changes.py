"""Who hears of a store's changes: the hub a shared store's change feed publishes to.

A thread that learns an entry was saved or deleted (the SQLite poller, the Redis pub/sub listener)
publishes it to the store's :class:`ChangeHub`, which wakes the watchers waiting for that entry and calls
the subscribers, in that thread. :func:`feed_of` is how the many callbacks of one storage object take one
place in a hub, held weakly (and given up once the storage is gone).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

__all__ = ["ChangeCallback", "ChangeHub", "Feed", "feed_of"]

logger = logging.getLogger("httpx_upstream_auth")
_T = TypeVar("_T")

#: Called with the digest (:attr:`EntryKey.digest`) of an entry that was saved or deleted, or with
#: ``None`` when the store cannot tell which entries changed (every cached entry should be re-read).
ChangeCallback = Callable[[str | None], None]


class ChangeHub:
    """Watchers (woken when one digest changes) and subscribers (called for every change) of one store.

    ``publish`` may be called from any thread; wake functions must not block, and subscriber callbacks
    run in the publishing thread. ``origin`` names the storage object that made a change: its own
    subscribers heard of it already (``notify_change``) and are skipped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiters: dict[str, dict[int, Callable[[], None]]] = {}
        self._subscribers: dict[int, tuple[str, ChangeCallback]] = {}

    def add_waiter(self, digest: str, wake: Callable[[], None]) -> Callable[[], None]:
        """Call ``wake()`` on every change of ``digest`` (or of anything), until the returned function runs."""
        ident = next(self._ids)
        with self._lock:
            self._waiters.setdefault(digest, {})[ident] = wake

        def remove() -> None:
            with self._lock:
                found = self._waiters.get(digest)
                if found is not None:
                    found.pop(ident, None)
                    if not found:
                        del self._waiters[digest]

        return remove

    def add_subscriber(self, callback: ChangeCallback, origin: str) -> Callable[[], None]:
        """Call ``callback(digest)`` on changes made by others than ``origin``, until the returned function runs.

        ``callback`` must not raise (it runs in the feed's thread): the one subscriber a storage adds, its
        :class:`Feed`, catches and logs its own callbacks' errors.
        """
        ident = next(self._ids)
        with self._lock:
            self._subscribers[ident] = (origin, callback)

        def remove() -> None:
            with self._lock:
                self._subscribers.pop(ident, None)

        return remove

    def active(self) -> bool:
        """True while anyone listens."""
        return bool(self._waiters or self._subscribers)

    def watching(self) -> bool:
        """True while a watcher waits (someone expects a save soon)."""
        return bool(self._waiters)

    def wake(self, digest: str | None) -> None:
        """Wake the watchers of ``digest`` (``None``: every watcher)."""
        with self._lock:
            if digest is None:
                wakes = [wake for found in self._waiters.values() for wake in found.values()]
            else:
                wakes = list(self._waiters.get(digest, {}).values())
        for wake in wakes:
            wake()

    def publish(self, digest: str | None, origin: str | None) -> None:
        """A change of ``digest`` (``None``: cannot tell which) made by ``origin`` (``None``: unknown)."""
        self.wake(digest)
        with self._lock:
            callbacks = [callback for owner, callback in self._subscribers.values() if owner != origin]
        for callback in callbacks:
            callback(digest)


def feed_of(owner: _T, callbacks_of: Callable[[_T], Iterable[ChangeCallback]]) -> Feed[_T]:
    """One hub subscriber that calls every callback ``callbacks_of(owner)`` lists at the time of a change.

    ``owner`` is held weakly (a storage dropped without unsubscribing is not kept alive by its change
    feed), so ``callbacks_of`` must not hold it either: pass a plain function, not a bound method. Once
    ``owner`` is gone, the feed removes itself from the hub at the next change (set :attr:`Feed.remove` to the
    hub's remover), so the hub, and the thread that serves it, do not keep serving dropped storages. A storage
    registers one feed however many callbacks subscribe, so that after ``fork()`` the child re-attaches one
    feed under its new origin and every callback live at the fork keeps hearing.
    """
    return Feed(owner, callbacks_of)


class Feed(Generic[_T]):
    """What :func:`feed_of` returns: a change callback, with the remover of its place in a hub."""

    __slots__ = ("_callbacks_of", "_ref", "remove")

    def __init__(self, owner: _T, callbacks_of: Callable[[_T], Iterable[ChangeCallback]]) -> None:
        self._ref = weakref.ref(owner)
        self._callbacks_of = callbacks_of
        #: Removes this feed from its hub; called once the owner is gone.
        self.remove: Callable[[], None] | None = None

    def __call__(self, digest: str | None) -> None:
        found = self._ref()
        if found is None:
            remove, self.remove = self.remove, None
            if remove is not None:
                remove()
            return
        for callback in list(self._callbacks_of(found)):
            try:
                callback(digest)
            except Exception:  # one subscriber's bug must not stop the others, nor the listener thread
                logger.exception("a storage change subscriber raised")
