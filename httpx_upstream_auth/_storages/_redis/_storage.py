"""``RedisStorage``: which client serves each call.

Sync code, trio and worker threads use the sync client; asyncio tasks use their event loop's asyncio
client (``_loops.py``), or the sync client in a worker thread when there is none. Both send the same
commands, written once (``_async.py``; ``_sync.py`` is generated from it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ..._exceptions import StorageError
from ..._models import EntryKey, UpstreamTokens
from ..._policy import DEFAULT_RETENTION
from ..._synchronization import (
    AsyncCall,
    AsyncWaker,
    ForkRegistry,
    SyncWaker,
    async_wait_for_change,
    sync_wait_for_change,
)
from .._base import Lease, lease_seconds, version_in_range
from .._shared import SharedStorage
from ._async import AsyncCommands
from ._clients import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_URL,
    AsyncSlots,
    FifoGate,
    SyncSlots,
    clients_from_url,
    import_redis,
    running_asyncio,
)
from ._errors import ErrorMap, describe_client
from ._feed import Subscriber
from ._keys import KeyLayout, ms
from ._loops import LoopClient, abandon, close_at_loop_shutdown
from ._sync import SyncCommands

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster

__all__ = ["RedisStorage"]

logger = logging.getLogger("httpx_upstream_auth")


class RedisStorage(SharedStorage):
    """Entries in Redis or Valkey (standalone or Cluster), shared by every process and host.

    Each entry is a hash under ``{prefix}:{<digest>}:entry`` (``<digest>`` is :attr:`EntryKey.digest`, so
    no session id shows in ``SCAN`` or ``PUBSUB``; the ids live inside the entry): ``v`` holds the
    version as a decimal string (compared exactly, without decoding the JSON) and ``d`` the JSON of
    :meth:`UpstreamTokens.to_json`, with a native TTL at its retention deadline. The refresh lease is
    ``…:lease`` with a random owner token. The ``{…}`` hash tag keeps an entry and its lease in one
    Cluster slot. ``put`` and conditional ``delete`` are one Lua script each, which also publishes
    ``<digest> <origin>`` on ``{prefix}:changes``; one pub/sub connection per storage hears it for every
    :meth:`watch` and :meth:`subscribe` (on a Cluster the message is broadcast to every node). After a lost
    connection subscribers hear ``None`` (re-read everything); when the server refuses pub/sub, only this
    object's writes can be reported.

    Pass a ``redis.Redis`` / ``redis.cluster.RedisCluster`` as ``client`` (used by sync code, under trio,
    and in threads), and optionally a ``redis.asyncio`` client as ``async_client`` (used under asyncio on
    the first event loop that uses it; other loops fall back to ``client`` in a worker thread). Clients
    you pass stay yours to close. With neither, or with :meth:`from_url`, the storage makes its own
    clients (one asyncio client per event loop, closed with the loop or the storage) with
    ``socket_timeout`` for connect and read, and no automatic retries, so an outage surfaces as
    :class:`StorageError` within that time. At most ``max_connections`` commands are in flight at once
    per client; more wait (up to ``socket_timeout``) for a free connection instead of failing.

    Replication is asynchronous: a save acknowledged by a primary that fails over before its replicas
    have it is lost, and the next refresh presents a refresh token the provider already consumed. With
    ``wait_replicas=N``, every save is followed by ``WAIT N`` on the same connection (up to
    ``wait_timeout`` seconds, added to each save while a replica lags): that narrows the window, it does
    not close it (``WAIT`` is not a consensus). A save that reached fewer replicas still counts as saved
    (the primary has it) and logs a warning.
    """

    #: How often :meth:`watch` re-reads the entry anyway, in case a notification was lost.
    recheck_interval: float = 0.5

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster | None = None,
        *,
        async_client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster | None = None,
        prefix: str = "hua",
        retention: float = DEFAULT_RETENTION,
        socket_timeout: float = 2.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        wait_replicas: int = 0,
        wait_timeout: float = 0.5,
    ) -> None:
        redis = import_redis()
        super().__init__(retention=retention)
        self._keys = KeyLayout(prefix)
        self.prefix = prefix
        self.socket_timeout = socket_timeout
        self.max_connections = max_connections
        if wait_replicas < 0 or (wait_replicas and not 0 < wait_timeout < socket_timeout):
            raise ValueError(
                "wait_replicas must be >= 0, and wait_timeout a positive number of seconds below socket_timeout "
                "(WAIT blocks the connection that long)"
            )
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._loops: dict[asyncio.AbstractEventLoop, LoopClient] = {}
        self._async_factory: Callable[[], Any] | None = None
        self._async_client: Any = async_client
        self._async_client_taken = False
        self._owns_sync = False
        if client is None and async_client is None:
            client, self._async_factory, where = clients_from_url(DEFAULT_URL, socket_timeout, {}, max_connections)
            self._owns_sync = True
        else:
            where = describe_client(client if client is not None else async_client)
        self._sync: Any = client
        self._cluster = isinstance(client, redis.cluster.RedisCluster) or isinstance(
            async_client, redis.asyncio.cluster.RedisCluster
        )
        self._errors = ErrorMap(
            redis, where, cluster=self._cluster, max_connections=max_connections, socket_timeout=socket_timeout
        )
        self._gate = FifoGate(max_connections)
        self._sync_commands = self._new_sync_commands()
        self._subscriber: Subscriber | None = None
        _forked.add(self)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "hua",
        retention: float = DEFAULT_RETENTION,
        socket_timeout: float = 2.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        wait_replicas: int = 0,
        wait_timeout: float = 0.5,
        **redis_kwargs: Any,
    ) -> RedisStorage:
        """A storage with clients of its own for ``url``.

        Schemes: ``redis://``, ``rediss://`` (TLS), ``unix://``, and ``redis+cluster://host:port`` /
        ``rediss+cluster://host:port`` for a Cluster (any node; the others are discovered). Extra keyword
        arguments go to the redis-py clients (``password``, ``ssl_ca_certs``…). ``max_connections`` bounds
        the commands in flight at once (per process, and per event loop); more wait for a connection.
        ``wait_replicas``: see the class docstring.
        """
        import_redis()
        sync, factory, where = clients_from_url(url, socket_timeout, redis_kwargs, max_connections)
        storage = cls(
            sync, prefix=prefix, retention=retention, socket_timeout=socket_timeout, max_connections=max_connections,
            wait_replicas=wait_replicas, wait_timeout=wait_timeout,
        )  # fmt: skip
        storage._async_factory = factory
        storage._owns_sync = True
        storage._errors.where = where
        return storage

    def __repr__(self) -> str:
        kind = "cluster " if self._cluster else ""
        return f"RedisStorage({kind}{self._errors.where}, prefix={self.prefix!r})"

    # -- sync surface: the sync client --------------------------------------------------------------------
    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """Return the entry (expired access token or not), or ``None`` when absent or past retention."""
        return self._commands().get(key)

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Store ``tokens`` iff the entry's version is ``expected_version`` (``None``: no entry), atomically."""
        commands = self._commands()
        if self.wait_replicas:
            saved = self._put_and_wait(commands, key, tokens, expected_version)
        else:
            saved = commands.put(key, tokens, expected_version, retention=self.retention, origin=self._origin)
        if saved:
            self._changed(key)
        return saved

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Remove the entry; with ``expected_version``, only while it still has that version."""
        deleted = self._commands().delete(key, expected_version, origin=self._origin)
        if deleted:
            self._changed(key)
        return deleted

    def scan(self, provider_id: str | None = None) -> Iterator[EntryKey]:
        """The keys of the live entries under this prefix (only ``provider_id``'s when given): ``SCAN``
        ``MATCH {prefix}:{…}:entry`` (never ``KEYS``) on the server, or on every primary of a Cluster, a
        page of about :attr:`scan_batch` names per round trip, each page's entries then read back for the
        ids inside them. As with any ``SCAN``, a key may be listed twice when the server resizes its table
        during the scan."""
        return self._commands().scan(provider_id, max(1, self.scan_batch))

    async def ascan(self, provider_id: str | None = None) -> AsyncIterator[EntryKey]:
        """Async twin of :meth:`scan` (this event loop's asyncio client, else the sync one in a thread)."""
        commands = await self._loop_commands()
        if commands is None:
            async for key in super().ascan(provider_id):
                yield key
            return
        async for key in commands.scan(provider_id, max(1, self.scan_batch)):
            yield key

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Claim the refresh lease for ``key`` across processes and hosts.

        When the answer is lost (a timeout after the server may have set the lease, or a cancellation),
        the owner token is kept and the next acquire of that key re-uses it, taking the lease back.
        """
        commands = self._commands()
        ttl = lease_seconds(ttl)
        with self._orphans.owner_for(key, ttl) as claim:
            claimed = commands.claim(key, ttl, claim.owner, retake=claim.retake)
        return Lease(key, claim.owner, ttl) if claimed else None

    def renew_lease(self, lease: Lease) -> bool:
        """Extend our lease to ``lease.ttl`` from now; False when it ran out or another holder has it."""
        return self._commands().renew(lease)

    def release_lease(self, lease: Lease) -> None:
        """Give the lease back if it is still ours."""
        self._commands().release(lease)

    def watch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Return once the entry's version differs from ``version``, or after ``timeout`` seconds.

        Registers with the storage's one pub/sub connection (every save publishes its digest), then
        re-reads the version (so a save between the two is not missed) and waits on an event: no
        connection is held while waiting. Falls back to polling when pub/sub is refused or down.
        """
        commands = self._commands()
        deadline = time.monotonic() + timeout
        subscriber = self._changes()  # None only when close() races this watch: it then polls
        if subscriber is not None:  # pragma: no branch - that race
            subscriber.ensure()
        waker = SyncWaker()
        remove = subscriber.hub.add_waiter(key.digest, waker.wake) if subscriber is not None else None
        try:
            read = functools.partial(commands.version, key)
            sync_wait_for_change(read, version, deadline, waker, functools.partial(self._wait_slice, subscriber))
        finally:
            if remove is not None:  # pragma: no branch - that race
                remove()

    def close(self) -> None:
        """Close the clients this storage made (every event loop's too). Clients you passed in stay open."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subscriber, self._subscriber = self._subscriber, None
            loops, self._loops = self._loops, {}
        if subscriber is not None:
            subscriber.stop()
        for loop, found in loops.items():
            abandon(loop, found)
        if self._owns_sync and self._sync is not None:
            with contextlib.suppress(Exception):
                nodes = self._sync.get_nodes() if self._cluster else []
                self._sync.close()
                for node in nodes:  # RedisCluster.close() leaves each node's pool connected
                    if node.redis_connection is not None:  # pragma: no branch - redis-py gives every node one
                        node.redis_connection.connection_pool.disconnect()

    # -- async surface: the running loop's asyncio client, else the sync client in a worker thread --------
    async def aget(self, key: EntryKey) -> UpstreamTokens | None:
        """Async twin of :meth:`get`."""
        commands = await self._loop_commands()
        if commands is None:
            return await super().aget(key)
        return await commands.get(key)

    async def aput(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Async twin of :meth:`put`."""
        commands = await self._loop_commands()
        if commands is None or self.wait_replicas:  # WAIT runs on the sync client, in a worker thread
            return await super().aput(key, tokens, expected_version=expected_version)
        saved = await commands.put(key, tokens, expected_version, retention=self.retention, origin=self._origin)
        if saved:
            self._changed(key)
        return saved

    async def adelete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Async twin of :meth:`delete`."""
        commands = await self._loop_commands()
        if commands is None:
            return await super().adelete(key, expected_version=expected_version)
        deleted = await commands.delete(key, expected_version, origin=self._origin)
        if deleted:
            self._changed(key)
        return deleted

    async def aacquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Async twin of :meth:`acquire_lease` (a cancelled call leaves its owner token to the next one)."""
        commands = await self._loop_commands()
        ttl = lease_seconds(ttl)
        with self._orphans.owner_for(key, ttl) as claim:
            if commands is None:
                call = functools.partial(self._commands().claim, key, ttl, claim.owner, retake=claim.retake)
                claimed = await anyio.to_thread.run_sync(call)
            else:
                claimed = await commands.claim(key, ttl, claim.owner, retake=claim.retake)
        return Lease(key, claim.owner, ttl) if claimed else None

    async def arenew_lease(self, lease: Lease) -> bool | None:
        """Async twin of :meth:`renew_lease`."""
        commands = await self._loop_commands()
        if commands is None:
            return await super().arenew_lease(lease)
        return await commands.renew(lease)

    async def arelease_lease(self, lease: Lease) -> None:
        """Async twin of :meth:`release_lease`."""
        commands = await self._loop_commands()
        if commands is None:
            return await super().arelease_lease(lease)
        await commands.release(lease)

    async def awatch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Async twin of :meth:`watch`: waits on the event loop, holding no thread and no connection;
        cancellable."""
        commands = await self._loop_commands()
        deadline = time.monotonic() + timeout
        subscriber = self._changes()
        if subscriber is not None and not (subscriber.live or subscriber.refused):
            with anyio.CancelScope(shield=True):  # bounded by the socket timeout
                await anyio.to_thread.run_sync(subscriber.ensure)
        read: AsyncCall[int | None]
        if commands is None:
            read = functools.partial(anyio.to_thread.run_sync, self._read_version, key)
        else:
            read = functools.partial(commands.version, key)
        waker = AsyncWaker()
        remove = subscriber.hub.add_waiter(key.digest, waker.wake) if subscriber is not None else None
        try:
            await async_wait_for_change(read, version, deadline, waker, functools.partial(self._wait_slice, subscriber))
        finally:
            if remove is not None:
                remove()

    async def aclose(self) -> None:
        """Close this event loop's asyncio client, then everything :meth:`close` closes."""
        found = None
        if running_asyncio():
            with self._lock:
                found = self._loops.pop(asyncio.get_running_loop(), None)
        if found is not None and found.keeper is not None:
            with anyio.CancelScope(shield=True):
                await found.keeper.aclose()
        self.close()

    # -- the sync client ------------------------------------------------------------------------------------
    def _commands(self) -> SyncCommands:
        """The sync client's commands; StorageError once closed, RuntimeError without a sync client."""
        if self._closed:
            raise StorageError(f"this RedisStorage ({self._errors.where}) is closed; create a new one")
        if self._sync_commands is None:
            raise RuntimeError(
                "this RedisStorage has only an asyncio client, and it cannot serve sync code, trio, or "
                "another event loop; pass client= as well, or use RedisStorage.from_url()"
            )
        return self._sync_commands

    def _new_sync_commands(self) -> SyncCommands | None:
        if self._sync is None:
            return None
        slots = SyncSlots(self._gate, self.socket_timeout, self._errors.busy)
        return SyncCommands(self._sync, self._keys, self._errors, slots)

    def _put_and_wait(
        self, commands: SyncCommands, key: EntryKey, tokens: UpstreamTokens, expected_version: int | None
    ) -> bool:
        """The compare-and-set, then WAIT on the same connection (WAIT covers that connection's writes).

        Sync only: it pipelines on one node's plain client, which redis.asyncio's Cluster does not expose.
        """
        if not version_in_range(expected_version):
            return False
        args = self._keys.cas_args(key, tokens, expected_version, self.retention, self._origin)
        entry = self._keys.entry(key)
        with commands.command("save tokens", tokens):
            client = commands.client
            if self._cluster:  # the primary of the entry's slot, as a plain client: one connection for both
                client = client.get_node_from_key(entry).redis_connection
            with client.pipeline(transaction=False) as pipe:
                commands.scripts["cas"](keys=[entry], args=args, client=pipe)
                pipe.execute_command("WAIT", self.wait_replicas, ms(self.wait_timeout))
                saved, acknowledged = pipe.execute()
        if saved and int(acknowledged) < self.wait_replicas:
            logger.warning(
                "a save reached %s of %s replicas of %s within %gs; a failover now could lose it",
                acknowledged, self.wait_replicas, self._errors.server, self.wait_timeout,
            )  # fmt: skip
        return bool(saved)

    def _read_version(self, key: EntryKey) -> int | None:
        return self._commands().version(key)

    # -- the event loops' clients -----------------------------------------------------------------------------
    async def _loop_commands(self) -> AsyncCommands | None:
        """The running event loop's asyncio commands, or ``None``: use the sync client in a thread."""
        if not running_asyncio():
            self._commands()
            return None
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._closed:
                    raise StorageError(f"this RedisStorage ({self._errors.where}) is closed; create a new one")
                found = self._loops.get(loop)
                if found is None:
                    found = self._new_loop_client()
                    if found is None:
                        self._commands()
                        return None
                    self._loops[loop] = found
                    break  # this task prepares it; others of this loop wait below
            await found.ready.wait()
            if not found.failed:
                return found.commands
            # Its creator failed (and reported why); try again, as the creator this time.
        self._sweep_closed_loops()
        try:
            if found.owned:
                found.keeper = close_at_loop_shutdown(
                    weakref.WeakMethod(self._forget_loop), loop, found.commands.client
                )
                await found.keeper.__anext__()
            if self._cluster:
                # Connect and learn the slot map once, before any other task of this loop uses the
                # client: redis-py's lazy initialize is not safe against concurrent first commands.
                with self._errors.mapped("connect to the Cluster"):
                    await found.commands.client.initialize()
        except BaseException:
            found.failed = True
            self._forget_loop(loop)
            raise
        finally:
            found.ready.set()
        return found.commands

    def _new_loop_client(self) -> LoopClient | None:
        if self._async_factory is not None:
            return self._loop_client(self._async_factory(), owned=True)
        if self._async_client is not None and not self._async_client_taken:
            # redis.asyncio connections belong to the loop that opened them: a client passed in
            # serves the first loop that uses it; other loops use the sync client in a thread.
            self._async_client_taken = True
            return self._loop_client(self._async_client, owned=False)
        return None

    def _loop_client(self, client: Any, *, owned: bool) -> LoopClient:
        slots = AsyncSlots(self.max_connections, self.socket_timeout, self._errors.busy)
        return LoopClient(AsyncCommands(client, self._keys, self._errors, slots), owned=owned)

    def _forget_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loops.pop(loop, None)

    def _sweep_closed_loops(self) -> None:
        """Close the clients of event loops that were closed without ``shutdown_asyncgens`` (the
        ``run_until_complete`` + ``close`` pattern): nothing else tells us such a loop ended."""
        with self._lock:
            dead = [(loop, found) for loop, found in self._loops.items() if loop.is_closed()]
            for loop, _ in dead:
                del self._loops[loop]
        for loop, found in dead:
            abandon(loop, found)

    # -- changes ------------------------------------------------------------------------------------------
    def _changes(self) -> Subscriber | None:
        """This storage's pub/sub listener (made on first use); ``None`` without a sync client."""
        if self._sync is None:
            return None
        with self._lock:
            if (self._subscriber is None or self._subscriber.pid != os.getpid()) and not self._closed:
                self._subscriber = self._new_subscriber()
            return self._subscriber

    def _new_subscriber(self, *, missed: bool = False) -> Subscriber:
        refusal = self._errors.response_error
        return Subscriber(
            weakref.ref(self),
            self._sync,
            self._keys.channel,
            timeout=self.socket_timeout,
            refusal=refusal,
            missed=missed,
        )

    def _attach_feed(self) -> None:
        """Have the pub/sub listener report other writers' changes to this object's subscribers, and wait
        for its first subscription (without a sync client, changes cannot be pushed)."""
        subscriber = self._changes()
        if subscriber is not None:
            self._link_feed(lambda feed: subscriber.hub.add_subscriber(feed, self._origin))
            subscriber.ensure()

    def _changed(self, key: EntryKey) -> None:
        """After a save or delete through this object: tell its subscribers, and wake this process's
        watchers at once (the server's message follows)."""
        self.notify_change(key)
        subscriber = self._subscriber
        if subscriber is not None:
            subscriber.hub.wake(key.digest)

    def _wait_slice(self, subscriber: Subscriber | None) -> float:
        return self.recheck_interval if subscriber is not None and subscriber.live else self.poll_interval


def _reset_in_child(storage: RedisStorage) -> None:
    """In a forked child: new locks and connection gate (parent threads may have held them), no
    per-loop clients (their sockets are the parent's; redis-py's sync pools notice the new pid
    themselves), what every shared store resets (origin, lost lease answers, the feed), and a pub/sub
    listener of its own for the subscribers live at the fork."""
    storage._lock = threading.Lock()
    storage._gate = FifoGate(storage.max_connections)
    storage._sync_commands = storage._new_sync_commands()
    storage._loops = {}
    storage._reset_shared_in_child()
    storage._subscriber = None  # its thread was the parent's
    if storage._closed or storage._sync is None or not storage._subscribers:
        return  # a listener is made on first use
    subscriber = storage._subscriber = storage._new_subscriber(missed=True)
    storage._link_feed(lambda feed: subscriber.hub.add_subscriber(feed, storage._origin))
    subscriber.start()  # not ensure(): a fork must not wait for the server


_forked: ForkRegistry[RedisStorage] = ForkRegistry(_reset_in_child)
