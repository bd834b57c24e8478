"""The storage contract: a small ABC every backend implements, with sync and async twins.

Abstract: ``get``, ``put`` (compare-and-set on ``version``) and ``delete``. Optional capabilities have
working defaults, so a third-party store keeps working when new ones appear: ``acquire_lease`` /
``release_lease`` (default: an in-process table, enough for one process) and ``watch`` (default:
polling ``get``). ``scan`` (listing the entries) has no default a store could rely on: one that does not
implement it raises ``NotImplementedError`` saying so, rather than list nothing. Async twins default to
running the sync method in a worker thread, abandoned when the awaiting task is cancelled (a refresh job
bounds its calls, and a hung store must not hold it), or calling it directly when the backend never blocks
(``blocking = False``).

It also holds the helpers every backend uses to keep the contract's promises on what it stores: lease
ttls, versions and times that a store can hold exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import attrs

from .._changes import ChangeCallback
from .._models import EntryKey, UpstreamTokens, is_plausible_time
from .._policy import DEFAULT_RETENTION
from .._synchronization import ForkRegistry

__all__ = ["ChangeCallback", "Lease", "Storage"]


@attrs.frozen
class Lease:
    """Proof that one worker may refresh ``key`` until the lease's ttl runs out.

    ``owner`` is a random token: only the holder can release it, and a holder whose lease expired
    cannot release a newer holder's lease.
    """

    key: EntryKey
    owner: str = attrs.field(repr=False)
    ttl: float


def new_owner() -> str:
    """A random lease owner token."""
    return secrets.token_hex(16)


#: The longest lease granted (seconds); longer ttls are cut to it.
MAX_LEASE_TTL = 3600.0
_INT64 = 2**63


def lease_seconds(ttl: float) -> float:
    """A lease ttl that is safe to store: positive and finite (else ValueError), at most MAX_LEASE_TTL."""
    if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"a lease ttl must be a positive, finite number of seconds, not {ttl!r}")
    return min(float(ttl), MAX_LEASE_TTL)


def storable(tokens: UpstreamTokens) -> UpstreamTokens:
    """``tokens`` as a store may keep them: a version from 0 to 2**63 - 1 (else ValueError, before anything
    is written), and every time finite and plausible. ``UpstreamTokens`` refuses other times, but an
    entry built around its checks may still arrive: such a time means "unknown" and is kept as ``None``,
    since an entry that could not be read back would lose a rotated refresh token."""
    if not 0 <= tokens.version < _INT64:
        raise ValueError(f"an entry version must be an integer from 0 to 2**63 - 1, not {tokens.version}")
    odd: dict[str, Any] = {
        name: None
        for name in ("expires_at", "refresh_expires_at", "issued_at")
        if (value := getattr(tokens, name)) is not None and not is_plausible_time(value)
    }
    return attrs.evolve(tokens, **odd) if odd else tokens


def version_in_range(version: int | None) -> bool:
    """False for an expected version that no stored entry can have."""
    return version is None or 0 <= version < _INT64


class Storage(ABC):
    """Where token entries live, keyed by :class:`EntryKey` (provider id, session id).

    ``get`` returns expired entries too: an entry whose access token expired is exactly the one that
    needs its refresh token. ``put`` writes only when the stored version equals ``expected_version``
    (``None``: only when there is no entry) and returns whether it wrote. Entries are kept until the
    refresh token's ``refresh_expires_at``, else ``retention`` seconds after their last write.
    Backends raise :class:`~httpx_upstream_auth.StorageError` when the store itself fails.
    """

    #: False when every sync method returns without I/O, so async twins may call it directly.
    blocking: bool = True
    #: How often the default ``watch`` polls ``get``.
    poll_interval: float = 0.01
    #: How many keys :meth:`scan` reads from the store per round trip (its memory bound).
    scan_batch: int = 500

    def __init__(self, *, retention: float = DEFAULT_RETENTION) -> None:
        self.retention = retention
        self._leases: dict[EntryKey, tuple[str, float]] = {}
        self._tables_lock = threading.Lock()  # the in-process leases and subscribers
        self._subscribers: list[ChangeCallback] = []
        _forked_storages.add(self)

    # -- the abstract surface -------------------------------------------------------------------
    @abstractmethod
    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """Return the entry for ``key`` (expired or not), or ``None``."""

    @abstractmethod
    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Store ``tokens`` iff the current version is ``expected_version`` (``None``: absent)."""

    @abstractmethod
    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Remove the entry; with ``expected_version``, only if it still has that version."""

    # -- optional capabilities with defaults -----------------------------------------------------
    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Try to become the one worker that refreshes ``key``; ``None`` when someone else holds it.

        The default serializes workers of this process only; shared backends override it.
        """
        ttl = lease_seconds(ttl)
        now = time.monotonic()
        with self._tables_lock:
            held = self._leases.get(key)
            if held is not None and held[1] > now:
                return None
            lease = Lease(key, new_owner(), ttl)
            self._leases[key] = (lease.owner, now + ttl)
            return lease

    def release_lease(self, lease: Lease) -> None:
        """Give the lease back, if it is still ours."""
        with self._tables_lock:
            held = self._leases.get(lease.key)
            if held is not None and held[0] == lease.owner:
                del self._leases[lease.key]

    def renew_lease(self, lease: Lease) -> bool | None:
        """Extend a lease we hold to ``lease.ttl`` from now; False when it is no longer ours, ``None`` when
        this backend cannot renew leases (a third-party store that implements only acquire and release:
        its leases then live their ttl, so give them one longer than a refresh can take).

        The manager renews its lease every third of its ttl while a refresh runs, so a slow provider
        never lets a second process in, while a dead process's lease still runs out.
        """
        if type(self).acquire_lease is not Storage.acquire_lease:
            return None  # the lease lives in the backend, which did not say how to extend it
        now = time.monotonic()
        with self._tables_lock:
            held = self._leases.get(lease.key)
            if held is None or held[0] != lease.owner or held[1] <= now:
                return False
            self._leases[lease.key] = (lease.owner, now + lease.ttl)
            return True

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None] | None:
        """Call ``callback`` after every save or delete of any entry, until the returned function is called.

        Lets a manager drop a cached token that another worker replaced or deleted (a logout). The
        default reports writes made through this storage object, which is every write for a store
        that lives in this process; shared backends override it to report other processes' writes
        too. Returns ``None`` when the backend cannot report changes at all.
        """
        with self._tables_lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._tables_lock, contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def notify_change(self, key: EntryKey | None) -> None:
        """Tell this process's subscribers that ``key`` was saved or deleted (backends call it after writes)."""
        digest = None if key is None else key.digest
        for callback in list(self._subscribers):
            callback(digest)

    def watch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Return once the entry's version differs from ``version``, or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _version(self.get(key)) != version:
                return
            time.sleep(min(self.poll_interval, max(deadline - time.monotonic(), 0)))

    def scan(self, provider_id: str | None = None) -> Iterator[EntryKey]:
        """Iterate over the keys of the stored entries (only ``provider_id``'s when given), in pages of
        :attr:`scan_batch` keys: memory stays bounded however many sessions the store holds.

        It lists what :meth:`get` would return: entries whose access token expired are listed (their
        refresh token may still serve), entries past their retention are not. An entry that exists for
        the whole scan is listed; one saved or deleted meanwhile may or may not be. The order is the
        backend's. Each page is read on its own, so a slow consumer holds no connection or transaction.

        The default raises ``NotImplementedError``: a store that cannot list its entries says so (an
        empty listing would read as "no sessions"). Backends override it; :meth:`ascan` follows.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot list its entries: it does not implement Storage.scan()"
        )

    async def ascan(self, provider_id: str | None = None) -> AsyncIterator[EntryKey]:
        """Async twin of :meth:`scan`. The default runs the sync scan a page at a time in a worker thread
        (or directly when the backend never blocks). A consumer that may stop early should close it
        (``contextlib.aclosing``), as with any async generator."""
        found = self.scan(provider_id)  # NotImplementedError here, before anything runs in a thread
        try:
            if not self.blocking:
                for key in found:
                    yield key
                return
            batch = max(1, self.scan_batch)
            while True:
                page = await anyio.to_thread.run_sync(lambda: list(itertools.islice(found, batch)))
                for key in page:
                    yield key
                if len(page) < batch:
                    return
        finally:
            close = getattr(found, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        """Release connections and files. The default has nothing to release."""

    # -- async twins ---------------------------------------------------------------------------------
    async def aget(self, key: EntryKey) -> UpstreamTokens | None:
        """Async twin of :meth:`get`."""
        if not self.blocking:
            return self.get(key)
        return await anyio.to_thread.run_sync(self.get, key, abandon_on_cancel=True)

    async def aput(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Async twin of :meth:`put`."""
        if not self.blocking:
            return self.put(key, tokens, expected_version=expected_version)
        return await anyio.to_thread.run_sync(
            lambda: self.put(key, tokens, expected_version=expected_version), abandon_on_cancel=True
        )

    async def adelete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Async twin of :meth:`delete`."""
        if not self.blocking:
            return self.delete(key, expected_version=expected_version)
        return await anyio.to_thread.run_sync(
            lambda: self.delete(key, expected_version=expected_version), abandon_on_cancel=True
        )

    async def aacquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Async twin of :meth:`acquire_lease`."""
        if not self.blocking or type(self).acquire_lease is Storage.acquire_lease:
            return self.acquire_lease(key, ttl)
        return await anyio.to_thread.run_sync(self.acquire_lease, key, ttl, abandon_on_cancel=True)

    async def arelease_lease(self, lease: Lease) -> None:
        """Async twin of :meth:`release_lease`."""
        if not self.blocking or type(self).release_lease is Storage.release_lease:
            return self.release_lease(lease)
        await anyio.to_thread.run_sync(self.release_lease, lease, abandon_on_cancel=True)

    async def arenew_lease(self, lease: Lease) -> bool | None:
        """Async twin of :meth:`renew_lease`."""
        if not self.blocking or type(self).renew_lease is Storage.renew_lease:
            return self.renew_lease(lease)
        return await anyio.to_thread.run_sync(self.renew_lease, lease, abandon_on_cancel=True)

    async def awatch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Async twin of :meth:`watch`; the default polls :meth:`aget` without holding a thread."""
        with anyio.move_on_after(timeout):
            while _version(await self.aget(key)) == version:
                await anyio.sleep(self.poll_interval)

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        self.close()


def _version(tokens: UpstreamTokens | None) -> int | None:
    return None if tokens is None else tokens.version


def _reset_storage_in_child(storage: Storage) -> None:
    # The leases in the in-process table belong to the parent's refreshes, which go on in the parent:
    # in the child they are stale memory that would only keep its own workers waiting.
    storage._leases = {}
    storage._tables_lock = threading.Lock()  # a parent thread may have held it at fork()
    # The subscribers stay: the child's own writes are reported to them as before.


_forked_storages: ForkRegistry[Storage] = ForkRegistry(_reset_storage_in_child)
