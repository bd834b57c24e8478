"""The redis-py clients of a Redis storage and their connection slots.

redis-py is imported here, lazily (the module imports without the ``redis`` extra). A storage made from
a URL gets a sync client and a factory of asyncio clients with a socket timeout and no automatic
retries. Commands wait for one of ``max_connections`` slots instead of failing when all are busy:
first come, first served, in threads (:class:`SyncSlots`) and in each event loop (:class:`AsyncSlots`).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio

from ..._exceptions import StorageError
from ..._synchronization import running_async_library
from ._errors import describe_url

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_URL",
    "AsyncSlots",
    "FifoGate",
    "SyncSlots",
    "clients_from_url",
    "import_redis",
    "running_asyncio",
]

#: Where ``RedisStorage()`` connects when given no client.
DEFAULT_URL = "redis://localhost:6379/0"
_MISSING_EXTRA = "RedisStorage needs redis-py: pip install 'httpx-upstream-auth[redis]'"
#: Commands in flight at once per storage (and per event loop); more wait for a free connection.
DEFAULT_MAX_CONNECTIONS = 64


def import_redis() -> Any:
    """The ``redis`` package, with the submodules the storage uses; ImportError naming the extra."""
    try:
        import redis
        import redis.asyncio
        import redis.asyncio.cluster
        import redis.asyncio.retry
        import redis.backoff
        import redis.cluster
        import redis.exceptions
        import redis.retry
    except ImportError as exc:
        raise ImportError(_MISSING_EXTRA) from exc
    # redis-py (5.3 and later) reads its own version from the installed package's metadata, on disk, when
    # it makes its first connection: read it now, in a sync constructor, not on an event loop (it is cached).
    get_lib_version = getattr(redis.utils, "get_lib_version", None)
    if get_lib_version is not None:  # pragma: no branch - redis-py before 5.3 has none (the tests run a newer one)
        get_lib_version()
    return redis


def running_asyncio() -> bool:
    """True inside an asyncio task (not trio, not trio-in-guest-mode on an asyncio loop)."""
    return running_async_library() == "asyncio"


def clients_from_url(
    url: str, socket_timeout: float, kwargs: dict[str, Any], max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> tuple[Any, Callable[[], Any], str]:
    """(sync client, asyncio client factory, printable address) for ``url``."""
    redis = import_redis()
    scheme, sep, rest = url.partition("://")
    cluster = scheme.lower() in ("redis+cluster", "rediss+cluster")
    if cluster:
        url = scheme.split("+", 1)[0] + sep + rest
    options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    options.update(kwargs)
    # Room for every gated command plus the pub/sub connection and a Cluster's slot-map refresh.
    options.setdefault("max_connections", max_connections + 4)
    where = describe_url(url)
    # No automatic retries: an outage should surface as StorageError within socket_timeout, not after
    # a backoff series (redis-py's default is seconds long), and a retried compare-and-set could run
    # twice. The caller retries; a Cluster client still refreshes its slot map after a failure.
    sync_options = {"retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0), **options}
    async_options = {"retry": redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0), **options}
    if cluster:
        try:
            sync = redis.cluster.RedisCluster.from_url(url, **sync_options)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
            raise StorageError(
                f"could not open the Redis Cluster at {where}: unreachable ({type(exc).__name__}); retry when "
                "it is back, and check that the URL names one of its nodes"
            ) from exc
        return sync, lambda: redis.asyncio.cluster.RedisCluster.from_url(url, **async_options), where
    sync = redis.Redis.from_url(url, **sync_options)
    pool = sync.connection_pool
    try:
        # A connection object is made (not connected) as the pool would make it, so that an option of the URL
        # redis-py does not take fails here, once, rather than at every command. Its text is not repeated: it
        # may quote the URL's values.
        pool.connection_class(**pool.connection_kwargs)
    except (TypeError, ValueError, redis.exceptions.RedisError):
        sync.close()
        raise ValueError(f"the Redis URL for {where} has an option the Redis client does not take") from None
    return sync, lambda: redis.asyncio.Redis.from_url(url, **async_options), where


class FifoGate:
    """At most ``size`` holders at once; waiters are served in the order they arrived.

    ``threading.Semaphore`` is not fair: a release wakes the oldest waiter, but a thread arriving
    before that one runs takes the slot, and the woken waiter queues again behind it. With hundreds of
    threads on a few connections some then wait past their timeout while later arrivals pass. Here a
    release hands the slot straight to the oldest waiter; a newcomer finds none free.
    """

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self._free = size
        self._waiters: collections.deque[threading.Event] = collections.deque()

    @property
    def waiting(self) -> int:
        """How many threads wait for a slot."""
        return len(self._waiters)

    def acquire(self, timeout: float) -> bool:
        """Take a slot, waiting up to ``timeout`` seconds behind earlier waiters; False when none came."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            granted = threading.Event()
            self._waiters.append(granted)
        if granted.wait(timeout):
            return True
        with self._lock:
            if not granted.is_set():
                self._waiters.remove(granted)
                return False
        # A release handed us the slot between the timeout and the lock: it is ours now. Keeping it
        # loses no slot (passing it on would fail this caller for nothing).
        return True

    def release(self) -> None:
        """Give the slot to the oldest waiter, or back to the pool when nobody waits."""
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1


class SyncSlots:
    """The sync client's connection slots: a :class:`FifoGate`, waited on up to ``timeout`` seconds."""

    def __init__(self, gate: FifoGate, timeout: float, busy: Callable[[str], StorageError]) -> None:
        self.gate = gate
        self._timeout = timeout
        self._busy = busy

    @contextlib.contextmanager
    def slot(self, what: str) -> Iterator[None]:
        """Hold one slot for a command (``busy(what)`` is raised when none came in time)."""
        if not self.gate.acquire(timeout=self._timeout):
            raise self._busy(what)
        try:
            yield
        finally:
            self.gate.release()


class AsyncSlots:
    """The async twin of :class:`SyncSlots`, for one event loop's client.

    anyio's asyncio semaphore is first-come first-served already: a release hands the slot to the oldest
    waiter, and a waiter cancelled after that passes it on.
    """

    def __init__(self, size: int, timeout: float, busy: Callable[[str], StorageError]) -> None:
        self._semaphore = anyio.Semaphore(size)
        self._timeout = timeout
        self._busy = busy

    @contextlib.asynccontextmanager
    async def slot(self, what: str) -> AsyncIterator[None]:
        """Hold one slot for a command (``busy(what)`` is raised when none came in time)."""
        acquired = False
        with anyio.move_on_after(self._timeout):
            await self._semaphore.acquire()
            acquired = True
        if not acquired:
            raise self._busy(what)
        try:
            yield
        finally:
            self._semaphore.release()
