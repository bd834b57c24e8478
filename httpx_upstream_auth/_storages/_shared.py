"""What the stores shared between processes (SQLite, Redis) do alike, on top of the storage contract.

Other writers' saves and deletes reach a storage object's subscribers through one feed in the store's
change hub, attached while anyone subscribes; an origin tag names the object's own writes (its
subscribers heard of them already); and a lease claim whose answer was lost is re-taken, not orphaned.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator

import attrs

from .._changes import ChangeCallback, feed_of
from .._models import EntryKey
from .._policy import DEFAULT_RETENTION
from ._base import Storage, new_owner

__all__ = ["Claim", "LostClaims", "SharedStorage"]


#: Lost lease claims a storage object keeps at most; beyond, the oldest are forgotten.
MAX_LOST_CLAIMS = 10_000


@attrs.define
class Claim:
    """One lease acquire's owner token, and what became of it."""

    owner: str
    #: True when a lost claim used this owner token before (the store may hold the lease under it).
    retake: bool
    #: False while the claim certainly has not reached the store (a backend that can tell clears it until
    #: then): a failure before that point leaves nothing to take back.
    may_have_landed: bool = True


class LostClaims:
    """Owner tokens of lease acquires whose answer never reached the caller, by key.

    After an error or a cancellation the store may have granted the lease all the same: the next acquire
    of that key claims with the same owner token and so takes it back, instead of leaving it held by
    nobody until its ttl runs out. A lost claim is kept only while the lease it may have taken can still
    be live (its ttl; expired ones are dropped at every acquire), and at most MAX_LOST_CLAIMS of them
    (forgetting one costs that session a wait for the lease to expire, never a second holder): sessions
    that never refresh here again leave nothing behind for longer than a lease's ttl.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> (owner token, monotonic time after which the lease it may have taken has expired)
        self._lost: OrderedDict[EntryKey, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lost)

    @contextlib.contextmanager
    def owner_for(self, key: EntryKey, ttl: float) -> Iterator[Claim]:
        """The claim to take ``key``'s lease with (for ``ttl`` seconds); kept for the next acquire when the
        block raises (or is cancelled) after the claim may have reached the store."""
        now = time.monotonic()
        with self._lock:
            lost = self._lost.pop(key, None)
            self._trim(now)
        orphan = lost[0] if lost is not None and now < lost[1] else None
        claim = Claim(orphan or new_owner(), retake=orphan is not None)
        try:
            yield claim
        except BaseException:
            if claim.may_have_landed:
                self.keep(key, claim.owner, ttl)
            raise

    def keep(self, key: EntryKey, owner: str, ttl: float) -> None:
        """Remember that a claim of ``key`` with ``owner`` (for ``ttl`` seconds) got no answer."""
        now = time.monotonic()
        with self._lock:
            self._lost.pop(key, None)
            self._lost[key] = (owner, now + ttl)
            self._trim(now)

    def _trim(self, now: float) -> None:
        # Lock held. Oldest first: each lives one ttl, so the expired ones are at the front (a manager's
        # claims all have its lease_ttl), and the scan stops at the first live one.
        while self._lost:
            first_key, (_, until) = next(iter(self._lost.items()))
            if until > now and len(self._lost) <= MAX_LOST_CLAIMS:
                return
            del self._lost[first_key]


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
                feed = feed_of(self, _subscribers_of)
                self._feed_remove = feed.remove = add(feed)

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
