"""Redis / Valkey storage: hash entries with native TTL, Lua compare-and-set, owner-token leases.

Owns the key layout (named by a digest of provider and session, never the session id), the Lua scripts,
the one pub/sub connection per storage that hears every save and delete, the mapping of redis-py errors
to :class:`StorageError`, and which client serves a call: the sync client (sync code, trio, other
threads) or an asyncio client that belongs to the running event loop. redis-py is imported lazily, so
this module imports without the ``redis`` extra.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import ssl
import threading
import time
import urllib.parse
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._exceptions import StorageError
from ._models import EntryKey, UpstreamTokens
from ._policy import DEFAULT_RETENTION, retention_deadline
from ._sqlite import AsyncWaker, ChangeHub, feed_of
from ._storage import (
    ChangeCallback,
    ForkRegistry,
    Lease,
    Storage,
    lease_seconds,
    new_owner,
    storable,
    version_in_range,
)
from ._synchronization import running_async_library

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster

__all__ = ["RedisStorage"]

logger = logging.getLogger("httpx_upstream_auth")

#: Where ``RedisStorage()`` connects when given no client.
DEFAULT_URL = "redis://localhost:6379/0"
_MISSING_EXTRA = "RedisStorage needs redis-py: pip install 'httpx-upstream-auth[redis]'"
#: Commands in flight at once per storage (and per event loop); more wait for a free connection.
DEFAULT_MAX_CONNECTIONS = 64
#: Seconds of silence after which the pub/sub connection is pinged, to find a half-open connection.
_HEALTH_CHECK = 5.0
#: SLOWLOG keeps the first 128 bytes of each argument: the entry's JSON starts with that much blank.
_SLOWLOG_ARGUMENT = 128

# Compare-and-set. KEYS[1]: the entry, a hash of 'v' (the version, a decimal string compared as a
# string: exact at any size, and the JSON is never decoded) and 'd' (the JSON). ARGV: expected version
# ('' = no entry), new version, retention deadline (epoch ms), publish command, channel, message, and
# the JSON last. The publish is a pcall so a server without PUBLISH rights still saves.
_CAS = """
local current = redis.call('HGET', KEYS[1], 'v')
if current then
  if current ~= ARGV[1] then return 0 end
elseif ARGV[1] ~= '' then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[7])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
redis.pcall(ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# Conditional delete. ARGV: expected version ('' = any), publish command, channel, message.
_DELETE = """
local current = redis.call('HGET', KEYS[1], 'v')
if not current then return 0 end
if ARGV[1] ~= '' and current ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.pcall(ARGV[2], ARGV[3], ARGV[4])
return 1
"""

# Take the lease, or re-take our own: an owner token whose acquire failed on the way back (a timeout,
# a cancellation) is re-used by the next acquire, so the lease it may have set is not orphaned.
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# Owner-checked renewal and release: a holder whose lease expired must not touch the next holder's.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_SCRIPTS = {"cas": _CAS, "delete": _DELETE, "acquire": _ACQUIRE, "renew": _RENEW, "release": _RELEASE}


def _import_redis() -> Any:
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
    if get_lib_version is not None:
        get_lib_version()
    return redis


def _running_asyncio() -> bool:
    """True inside an asyncio task (not trio, not trio-in-guest-mode on an asyncio loop)."""
    return running_async_library() == "asyncio"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _kind(message: dict[str, Any]) -> str:
    return _text(message.get("type"))


class _FifoGate:
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


class _LoopClient:
    """An asyncio client, with its scripts and its connection gate, that belongs to one event loop."""

    def __init__(self, client: Any, *, owned: bool, max_connections: int) -> None:
        self.client = client
        self.owned = owned
        self.scripts = {name: client.register_script(source) for name, source in _SCRIPTS.items()}
        self.keeper: AsyncGenerator[None, None] | None = None
        #: Set once the client may be used (or ``failed`` says it may not).
        self.ready = anyio.Event()
        self.failed = False
        # Commands wait here for one of the pool's connections rather than fail when all are busy.
        # anyio's asyncio semaphore is first-come first-served already: a release hands the slot to the
        # oldest waiter, and a waiter cancelled after that passes it on.
        self.gate = anyio.Semaphore(max_connections)


async def _close_at_loop_shutdown(
    storage: weakref.ref[RedisStorage], loop: asyncio.AbstractEventLoop, client: Any
) -> AsyncGenerator[None, None]:
    # Parked at its first ``yield`` for the life of the loop: asyncio.run() / anyio.run() close every
    # open async generator (loop.shutdown_asyncgens) while the loop still runs, which is the last moment
    # an asyncio client can close its connections cleanly. A loop closed without that is found later
    # by _sweep_closed_loops, which finalizes this generator with the loop closed (nothing to await).
    pid = os.getpid()
    try:
        yield
    finally:
        # A forked child's copy does nothing: the client and its sockets are the parent's.
        if os.getpid() == pid:
            owner = storage()
            if owner is not None:
                owner._forget_loop(loop)
            if not loop.is_closed():
                with contextlib.suppress(Exception):
                    await client.aclose()


class _Subscriber:
    """One pub/sub connection per storage, on the prefix's change channel, for every watcher and subscriber.

    A thread reads it and publishes each ``<digest> <origin>`` message to the hub. After a lost
    connection it reconnects with back-off and reports ``None`` (anything may have changed meanwhile);
    while it is down, or when the server refuses pub/sub, watchers fall back to polling.
    """

    def __init__(self, storage: RedisStorage, *, missed: bool = False) -> None:
        self.hub = ChangeHub()
        # True in a forked child: its subscribers heard the parent's listener until the fork, and
        # whatever was published before this one subscribes is lost, so its first subscription says None.
        self._missed = missed
        self._storage = weakref.ref(storage)
        self._client = storage._sync
        self._channel = storage._changes_channel
        self._timeout = storage.socket_timeout
        self._errors: tuple[type[BaseException], ...] = (storage._response_error,)
        self._state = "starting"  # then "live", "down" (reconnecting) or "refused" (no pub/sub)
        self.pid = os.getpid()  # a forked child has no thread: it needs a listener of its own
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def live(self) -> bool:
        """True while messages arrive (watchers may then rely on them)."""
        return self._state == "live"

    @property
    def refused(self) -> bool:
        """True when the server refused pub/sub (an ACL): changes cannot be pushed."""
        return self._state == "refused"

    def ensure(self) -> None:
        """Start the thread if needed and wait (within the socket timeout) for its first subscription."""
        with self._changed:
            self._start()
            self._changed.wait_for(lambda: self._state != "starting", timeout=self._timeout + 0.5)

    def start(self) -> None:
        """Start the thread if needed, without waiting for it."""
        with self._changed:
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="httpx-upstream-auth-redis-changes", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close its connection (within a fraction of a second)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)

    def _set_state(self, state: str) -> None:
        with self._changed:
            self._state = state
            self._changed.notify_all()

    def _run(self) -> None:
        announce = self._missed  # after the first connection, a (re)connection may have missed messages
        backoff = 0.05
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub()
                pubsub.subscribe(self._channel)
                deadline = time.monotonic() + self._timeout
                while True:
                    message = pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.0))
                    if message is not None and _kind(message) == "subscribe":
                        break
                    if time.monotonic() >= deadline:
                        raise TimeoutError("no confirmation of SUBSCRIBE")
                self._set_state("live")
                if announce:
                    self.hub.publish(None, None)
                announce, backoff = True, 0.05
                heard, pinged = time.monotonic(), 0.0
                while not self._stop.is_set() and self._storage() is not None:
                    message = pubsub.get_message(timeout=0.2)
                    now = time.monotonic()
                    if message is not None:
                        heard, pinged = now, 0.0
                        if _kind(message) == "message":
                            digest, _, origin = _text(message.get("data")).partition(" ")
                            self.hub.publish(digest or None, origin or None)
                    elif not pinged and now - heard > _HEALTH_CHECK:
                        # A silent connection may be half-open (the host vanished without a FIN): it
                        # would look live forever while every message is lost. Ask, and expect a pong.
                        pubsub.ping()
                        pinged = now
                    elif pinged and now - pinged > self._timeout:
                        raise TimeoutError("no answer to PING on the pub/sub connection")
            except self._errors:
                self._set_state("refused")
                self.hub.wake(None)
                return
            except Exception:
                if self._stop.is_set():
                    return
                self._set_state("down")
                self.hub.wake(None)  # watchers switch to polling
                announce = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
            if self._storage() is None:
                return


class RedisStorage(Storage):
    """Entries in Redis or Valkey (standalone or Cluster), shared by every process and host.

    Each entry is a hash under ``{prefix}:{<digest>}:entry`` (``<digest>`` is :attr:`EntryKey.digest`, so
    no session id shows in ``SCAN`` or ``PUBSUB``; the ids live inside the entry): ``v`` holds the
    version as a decimal string (compared exactly, without decoding the JSON) and ``d`` the JSON of
    :meth:`UpstreamTokens.to_json`, with a native TTL at its retention deadline. The refresh lease is
    ``…:lease`` with a random owner token. The ``{…}`` hash tag keeps an entry and its lease in one
    Cluster slot. ``put`` and conditional ``delete`` are one Lua script each, which also publishes
    ``<digest> <origin>`` on ``{prefix}:changes``; one pub/sub connection per storage hears it for every
    :meth:`watch` and :meth:`subscribe` (on a Cluster the message is broadcast to every node).

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
        redis = _import_redis()
        super().__init__(retention=retention)
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix {prefix!r} must not contain '{{' or '}}' (they mark Cluster slots)")
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
        self._loops: dict[asyncio.AbstractEventLoop, _LoopClient] = {}
        self._async_factory: Callable[[], Any] | None = None
        self._async_client: Any = async_client
        self._async_client_taken = False
        self._owns_sync = False
        if client is None and async_client is None:
            client, self._async_factory, self._where = _clients_from_url(
                DEFAULT_URL, socket_timeout, {}, max_connections
            )
            self._owns_sync = True
        else:
            self._where = _describe(client if client is not None else async_client)
        self._sync: Any = client
        self._cluster = isinstance(client, redis.cluster.RedisCluster) or isinstance(
            async_client, redis.asyncio.cluster.RedisCluster
        )
        self._changes_channel = f"{prefix}:changes"
        self._origin = new_owner()[:16]
        self._gate = _FifoGate(max_connections)
        self._orphans: dict[EntryKey, str] = {}
        if client is not None:
            self._scripts = {name: client.register_script(source) for name, source in _SCRIPTS.items()}
        self._subscriber: _Subscriber | None = None
        # The remover of this object's one feed from the subscriber's hub, while anyone subscribes.
        self._feed_remove: Callable[[], None] | None = None
        self._feed_lock = threading.Lock()
        self._unreachable: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ClusterDownError,
            redis.exceptions.TryAgainError,
            redis.exceptions.RedisClusterException,
            TimeoutError,
            OSError,
        )
        self._refused: type[BaseException] = redis.exceptions.RedisError
        # Both are ConnectionErrors in redis-py, but neither means "unreachable": say what to fix instead.
        self._bad_credentials: tuple[type[BaseException], ...] = tuple(
            getattr(redis.exceptions, name) for name in ("AuthenticationError", "AuthorizationError")
            if hasattr(redis.exceptions, name)
        )  # fmt: skip
        self._pool_full: tuple[type[BaseException], ...] = tuple(
            getattr(redis.exceptions, name) for name in ("MaxConnectionsError",) if hasattr(redis.exceptions, name)
        )
        self._response_error: type[BaseException] = redis.exceptions.ResponseError
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
        _import_redis()
        sync, factory, where = _clients_from_url(url, socket_timeout, redis_kwargs, max_connections)
        storage = cls(
            sync, prefix=prefix, retention=retention, socket_timeout=socket_timeout, max_connections=max_connections,
            wait_replicas=wait_replicas, wait_timeout=wait_timeout,
        )  # fmt: skip
        storage._async_factory = factory
        storage._owns_sync = True
        storage._where = where
        return storage

    @property
    def _server(self) -> str:
        """How error messages name the server: kind and address, never credentials."""
        return f"Redis Cluster at {self._where}" if self._cluster else f"Redis at {self._where}"

    def __repr__(self) -> str:
        kind = "cluster " if self._cluster else ""
        return f"RedisStorage({kind}{self._where}, prefix={self.prefix!r})"

    # -- keys ---------------------------------------------------------------------------------------------
    def _slot(self, key: EntryKey) -> str:
        return f"{self.prefix}:{{{key.digest}}}"

    def _entry_key(self, key: EntryKey) -> str:
        return self._slot(key) + ":entry"

    def _lease_key(self, key: EntryKey) -> str:
        return self._slot(key) + ":lease"

    def _message(self, key: EntryKey) -> str:
        return f"{key.digest} {self._origin}"

    def _cas_args(self, key: EntryKey, tokens: UpstreamTokens, expected_version: int | None) -> list[Any]:
        tokens = storable(tokens)
        deadline_ms = int(retention_deadline(tokens, time.time(), self.retention) * 1000)
        expected = "" if expected_version is None else str(expected_version)
        return [
            expected, str(tokens.version), deadline_ms, "PUBLISH", self._changes_channel, self._message(key),
            _blob(key, tokens),
        ]  # fmt: skip

    def _delete_args(self, key: EntryKey, expected_version: int | None) -> list[Any]:
        expected = "" if expected_version is None else str(expected_version)
        return [expected, "PUBLISH", self._changes_channel, self._message(key)]

    # -- sync surface -------------------------------------------------------------------------------------
    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """Return the entry (expired access token or not), or ``None`` when absent or past retention."""
        client = self._client()
        with self._errors("read tokens"), self._slot_sync("read tokens"):
            raw = client.hget(self._entry_key(key), "d")
        return self._decode(key, raw)

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Store ``tokens`` iff the entry's version is ``expected_version`` (``None``: no entry), atomically."""
        self._client()
        if not version_in_range(expected_version):
            return False
        args = self._cas_args(key, tokens, expected_version)
        with self._errors("save tokens", tokens), self._slot_sync("save tokens"):
            if self.wait_replicas:
                saved = self._cas_and_wait(key, args)
            else:
                saved = bool(self._scripts["cas"](keys=[self._entry_key(key)], args=args))
        if saved:
            self._changed(key)
        return saved

    def _cas_and_wait(self, key: EntryKey, args: list[Any]) -> bool:
        """The compare-and-set, then WAIT on the same connection (WAIT covers that connection's writes)."""
        entry = self._entry_key(key)
        client = self._client()
        if self._cluster:  # the primary of the entry's slot, as a plain client: one connection for both
            client = client.get_node_from_key(entry).redis_connection
        with client.pipeline(transaction=False) as pipe:
            self._scripts["cas"](keys=[entry], args=args, client=pipe)
            pipe.execute_command("WAIT", self.wait_replicas, _ms(self.wait_timeout))
            saved, acknowledged = pipe.execute()
        if saved and int(acknowledged) < self.wait_replicas:
            logger.warning(
                "a save reached %s of %s replicas of %s within %gs; a failover now could lose it",
                acknowledged, self.wait_replicas, self._server, self.wait_timeout,
            )  # fmt: skip
        return bool(saved)

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Remove the entry; with ``expected_version``, only while it still has that version."""
        self._client()
        if not version_in_range(expected_version):
            return False
        args = self._delete_args(key, expected_version)
        with self._errors("delete tokens"), self._slot_sync("delete tokens"):
            deleted = bool(self._scripts["delete"](keys=[self._entry_key(key)], args=args))
        if deleted:
            self._changed(key)
        return deleted

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Claim the refresh lease for ``key`` across processes and hosts.

        When the answer is lost (a timeout after the server may have set the lease, or a cancellation),
        the owner token is kept and the next acquire of that key re-uses it, taking the lease back.
        """
        self._client()
        ttl = lease_seconds(ttl)
        orphan = self._orphans.pop(key, None)
        owner = orphan or new_owner()
        answered = False
        try:
            claimed = self._acquire_as(key, ttl, owner, retake=orphan is not None)
            answered = True
        finally:
            if not answered:
                self._orphans[key] = owner
        return Lease(key, owner, ttl) if claimed else None

    def renew_lease(self, lease: Lease) -> bool:
        """Extend our lease to ``lease.ttl`` from now; False when it ran out or another holder has it."""
        self._client()
        ttl = lease_seconds(lease.ttl)
        with self._errors("renew the refresh lease"), self._slot_sync("renew the refresh lease"):
            return bool(self._scripts["renew"](keys=[self._lease_key(lease.key)], args=[lease.owner, _ms(ttl)]))

    def release_lease(self, lease: Lease) -> None:
        """Give the lease back if it is still ours."""
        self._client()
        with self._errors("release the refresh lease"), self._slot_sync("release the refresh lease"):
            self._scripts["release"](keys=[self._lease_key(lease.key)], args=[lease.owner])

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None] | None:
        """Call ``callback(digest)`` after every save or delete under this prefix, by any process or host.

        Writes through this object are reported at once, in the writing thread; others from this
        storage's pub/sub thread as the server pushes them (after a lost connection: ``None``, re-read
        everything). When the server refuses pub/sub, only this object's writes can be reported.
        Callbacks run in the pub/sub thread, which also wakes every watcher: keep them short.
        """
        local = super().subscribe(callback)
        assert local is not None  # the base class always reports this object's own writes
        try:
            subscriber = self._attach_feed()
            if subscriber is not None:
                subscriber.ensure()
        except BaseException:
            local()
            self._detach_feed()
            raise

        def unsubscribe() -> None:
            local()
            self._detach_feed()

        return unsubscribe

    def watch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Return once the entry's version differs from ``version``, or after ``timeout`` seconds.

        Registers with the storage's one pub/sub connection (every save publishes its digest), then
        re-reads the version (so a save between the two is not missed) and waits on an event: no
        connection is held while waiting. Falls back to polling when pub/sub is refused or down.
        """
        client = self._client()
        deadline = time.monotonic() + timeout
        woken = threading.Event()
        subscriber = self._changes()
        if subscriber is not None:
            subscriber.ensure()
        remove = subscriber.hub.add_waiter(key.digest, woken.set) if subscriber is not None else None
        try:
            if self._version(client, key) != version:
                return
            while (remaining := deadline - time.monotonic()) > 0:
                woken.wait(min(remaining, self._wait_slice(subscriber)))
                woken.clear()
                if self._version(client, key) != version:
                    return
        finally:
            if remove is not None:
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
            _abandon(loop, found)
        if self._owns_sync and self._sync is not None:
            with contextlib.suppress(Exception):
                nodes = self._sync.get_nodes() if self._cluster else []
                self._sync.close()
                for node in nodes:  # RedisCluster.close() leaves each node's pool connected
                    if node.redis_connection is not None:
                        node.redis_connection.connection_pool.disconnect()

    # -- async surface: redis.asyncio under asyncio, the sync client in a worker thread otherwise -------
    async def aget(self, key: EntryKey) -> UpstreamTokens | None:
        """Async twin of :meth:`get`."""
        loop_client = await self._loop_client()
        if loop_client is None:
            return await super().aget(key)
        async with self._slot_async(loop_client, "read tokens"):
            with self._errors("read tokens"):
                raw = await loop_client.client.hget(self._entry_key(key), "d")
        return self._decode(key, raw)

    async def aput(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Async twin of :meth:`put`."""
        loop_client = await self._loop_client()
        if loop_client is None or self.wait_replicas:  # WAIT runs on the sync client, in a worker thread
            return await super().aput(key, tokens, expected_version=expected_version)
        if not version_in_range(expected_version):
            return False
        args = self._cas_args(key, tokens, expected_version)
        async with self._slot_async(loop_client, "save tokens"):
            with self._errors("save tokens", tokens):
                saved = bool(await loop_client.scripts["cas"](keys=[self._entry_key(key)], args=args))
        if saved:
            self._changed(key)
        return saved

    async def adelete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Async twin of :meth:`delete`."""
        loop_client = await self._loop_client()
        if loop_client is None:
            return await super().adelete(key, expected_version=expected_version)
        if not version_in_range(expected_version):
            return False
        args = self._delete_args(key, expected_version)
        async with self._slot_async(loop_client, "delete tokens"):
            with self._errors("delete tokens"):
                deleted = bool(await loop_client.scripts["delete"](keys=[self._entry_key(key)], args=args))
        if deleted:
            self._changed(key)
        return deleted

    async def aacquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Async twin of :meth:`acquire_lease` (a cancelled call leaves its owner token to the next one)."""
        loop_client = await self._loop_client()
        ttl = lease_seconds(ttl)
        orphan = self._orphans.pop(key, None)
        owner = orphan or new_owner()
        answered = False
        try:
            if loop_client is None:
                claimed = await anyio.to_thread.run_sync(
                    functools.partial(self._acquire_as, key, ttl, owner, retake=orphan is not None)
                )
            else:
                async with self._slot_async(loop_client, "take the refresh lease"):
                    with self._errors("take the refresh lease"):
                        if orphan is None:  # a new owner token cannot match: plain SET NX PX
                            claimed = await loop_client.client.set(self._lease_key(key), owner, nx=True, px=_ms(ttl))
                        else:
                            script = loop_client.scripts["acquire"]
                            claimed = await script(keys=[self._lease_key(key)], args=[owner, _ms(ttl)])
            answered = True
        finally:
            if not answered:
                self._orphans[key] = owner
        return Lease(key, owner, ttl) if claimed else None

    async def arenew_lease(self, lease: Lease) -> bool | None:
        """Async twin of :meth:`renew_lease`."""
        loop_client = await self._loop_client()
        if loop_client is None:
            return await super().arenew_lease(lease)
        ttl = lease_seconds(lease.ttl)
        async with self._slot_async(loop_client, "renew the refresh lease"):
            with self._errors("renew the refresh lease"):
                renewed = await loop_client.scripts["renew"](
                    keys=[self._lease_key(lease.key)], args=[lease.owner, _ms(ttl)]
                )
        return bool(renewed)

    async def arelease_lease(self, lease: Lease) -> None:
        """Async twin of :meth:`release_lease`."""
        loop_client = await self._loop_client()
        if loop_client is None:
            return await super().arelease_lease(lease)
        async with self._slot_async(loop_client, "release the refresh lease"):
            with self._errors("release the refresh lease"):
                await loop_client.scripts["release"](keys=[self._lease_key(lease.key)], args=[lease.owner])

    async def awatch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Async twin of :meth:`watch`: waits on the event loop, holding no thread and no connection;
        cancellable."""
        loop_client = await self._loop_client()
        deadline = time.monotonic() + timeout
        subscriber = self._changes()
        if subscriber is not None and not (subscriber.live or subscriber.refused):
            with anyio.CancelScope(shield=True):  # bounded by the socket timeout
                await anyio.to_thread.run_sync(subscriber.ensure)
        waker = AsyncWaker()
        remove = subscriber.hub.add_waiter(key.digest, waker.wake) if subscriber is not None else None
        try:
            while await self._aversion(loop_client, key) == version:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                await waker.wait(min(remaining, self._wait_slice(subscriber)))
        finally:
            if remove is not None:
                remove()

    async def aclose(self) -> None:
        """Close this event loop's asyncio client, then everything :meth:`close` closes."""
        found = None
        if _running_asyncio():
            with self._lock:
                found = self._loops.pop(asyncio.get_running_loop(), None)
        if found is not None and found.keeper is not None:
            with anyio.CancelScope(shield=True):
                await found.keeper.aclose()
        self.close()

    # -- changes ------------------------------------------------------------------------------------------
    def _changes(self) -> _Subscriber | None:
        """This storage's pub/sub listener (made on first use); ``None`` without a sync client."""
        if self._sync is None:
            return None
        with self._lock:
            if (self._subscriber is None or self._subscriber.pid != os.getpid()) and not self._closed:
                self._subscriber = _Subscriber(self)
            return self._subscriber

    def _attach_feed(self) -> _Subscriber | None:
        """Have the pub/sub listener report other writers' changes to this object's subscribers (one hub
        entry for all of them); the listener, or ``None`` when changes cannot be pushed (no sync client)."""
        with self._feed_lock:
            subscriber = self._changes()
            if subscriber is not None and self._feed_remove is None and self._subscribers:
                self._feed_remove = subscriber.hub.add_subscriber(feed_of(self), self._origin)
            return subscriber

    def _detach_feed(self) -> None:
        """Leave the listener's hub once the last subscriber left."""
        with self._feed_lock:
            if self._feed_remove is not None and not self._subscribers:
                remove, self._feed_remove = self._feed_remove, None
                remove()

    def _changed(self, key: EntryKey) -> None:
        """After a save or delete through this object: tell its subscribers, and wake this process's
        watchers at once (the server's message follows)."""
        self.notify_change(key)
        subscriber = self._subscriber
        if subscriber is not None:
            subscriber.hub.wake(key.digest)

    def _wait_slice(self, subscriber: _Subscriber | None) -> float:
        return self.recheck_interval if subscriber is not None and subscriber.live else self.poll_interval

    def _version(self, client: Any, key: EntryKey) -> int | None:
        with self._errors("watch for saved tokens"), self._slot_sync("watch for saved tokens"):
            raw = client.hget(self._entry_key(key), "v")
        return None if raw is None else int(raw)

    async def _aversion(self, loop_client: _LoopClient | None, key: EntryKey) -> int | None:
        if loop_client is None:
            return await anyio.to_thread.run_sync(self._version, self._client(), key)
        async with self._slot_async(loop_client, "watch for saved tokens"):
            with self._errors("watch for saved tokens"):
                raw = await loop_client.client.hget(self._entry_key(key), "v")
        return None if raw is None else int(raw)

    def _acquire_as(self, key: EntryKey, ttl: float, owner: str, *, retake: bool) -> Any:
        client = self._client()
        with self._errors("take the refresh lease"), self._slot_sync("take the refresh lease"):
            if not retake:  # a new owner token cannot match: plain SET NX PX
                return client.set(self._lease_key(key), owner, nx=True, px=_ms(ttl))
            return self._scripts["acquire"](keys=[self._lease_key(key)], args=[owner, _ms(ttl)])

    # -- clients and connection slots -------------------------------------------------------------------
    def _client(self) -> Any:
        if self._closed:
            raise StorageError(f"this RedisStorage ({self._where}) is closed; create a new one")
        if self._sync is None:
            raise RuntimeError(
                "this RedisStorage has only an asyncio client, and it cannot serve sync code, trio, or "
                "another event loop; pass client= as well, or use RedisStorage.from_url()"
            )
        return self._sync

    @contextlib.contextmanager
    def _slot_sync(self, what: str) -> Iterator[None]:
        """Hold one of ``max_connections`` slots for a command, waiting up to the socket timeout."""
        if not self._gate.acquire(timeout=self.socket_timeout):
            raise self._busy(what)
        try:
            yield
        finally:
            self._gate.release()

    @contextlib.asynccontextmanager
    async def _slot_async(self, loop_client: _LoopClient, what: str) -> AsyncIterator[None]:
        acquired = False
        with anyio.move_on_after(self.socket_timeout):
            await loop_client.gate.acquire()
            acquired = True
        if not acquired:
            raise self._busy(what)
        try:
            yield
        finally:
            loop_client.gate.release()

    def _busy(self, what: str) -> StorageError:
        return StorageError(
            f"could not {what}: all {self.max_connections} connections to {self._server} stayed busy for "
            f"{self.socket_timeout:g}s; raise RedisStorage(max_connections=...), or look for slow commands"
        )

    async def _loop_client(self) -> _LoopClient | None:
        """The asyncio client for the running loop, or ``None``: use the sync client in a thread."""
        if not _running_asyncio():
            self._client()
            return None
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._closed:
                    raise StorageError(f"this RedisStorage ({self._where}) is closed; create a new one")
                found = self._loops.get(loop)
                if found is None:
                    found = self._new_loop_client()
                    if found is None:
                        self._client()
                        return None
                    self._loops[loop] = found
                    break  # this task prepares it; others of this loop wait below
            await found.ready.wait()
            if not found.failed:
                return found
            # Its creator failed (and reported why); try again, as the creator this time.
        self._sweep_closed_loops()
        try:
            if found.owned:
                found.keeper = _close_at_loop_shutdown(weakref.ref(self), loop, found.client)
                await found.keeper.__anext__()
            if self._cluster:
                # Connect and learn the slot map once, before any other task of this loop uses the
                # client: redis-py's lazy initialize is not safe against concurrent first commands.
                with self._errors("connect to the Cluster"):
                    await found.client.initialize()
        except BaseException:
            found.failed = True
            self._forget_loop(loop)
            raise
        finally:
            found.ready.set()
        return found

    def _new_loop_client(self) -> _LoopClient | None:
        if self._async_factory is not None:
            return _LoopClient(self._async_factory(), owned=True, max_connections=self.max_connections)
        if self._async_client is not None and not self._async_client_taken:
            # redis.asyncio connections belong to the loop that opened them: a client passed in
            # serves the first loop that uses it; other loops use the sync client in a thread.
            self._async_client_taken = True
            return _LoopClient(self._async_client, owned=False, max_connections=self.max_connections)
        return None

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
            _abandon(loop, found)

    # -- decoding and errors ------------------------------------------------------------------------------
    def _decode(self, key: EntryKey, raw: Any) -> UpstreamTokens | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("token entry is not a JSON object")
            ids = data.pop("entry_key", None)
            if ids is not None and ids != [key.provider_id, key.session_id]:
                # Two (provider, session) pairs with one 128-bit digest: never hand out another's tokens.
                return None
            return UpstreamTokens.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise StorageError(
                f"{self._server} holds an unreadable entry for provider {key.provider_id!r} "
                f"({type(exc).__name__}); delete it and have the user log in again"
            ) from None

    @contextlib.contextmanager
    def _errors(self, what: str, tokens: UpstreamTokens | None = None) -> Iterator[None]:
        """Turn redis-py failures into StorageError, with messages that say what to fix and never carry a token."""
        try:
            yield
        except StorageError:
            raise
        except self._bad_credentials as exc:
            raise StorageError(
                f"could not {what}: {self._server} refused the credentials ({type(exc).__name__}); check the "
                "username and password in the URL or client"
            ) from exc
        except self._pool_full as exc:
            raise self._busy(what) from exc
        except self._unreachable as exc:
            if _is_tls_failure(exc):
                raise StorageError(
                    f"could not {what}: the TLS handshake with {self._server} failed ({type(exc).__name__}); "
                    "check ssl_ca_certs (the CA that signed the server's certificate) and the host name"
                ) from exc
            raise StorageError(
                f"could not {what}: {self._server} unreachable ({type(exc).__name__}); retry when it is back"
            ) from exc
        except self._refused as exc:
            # A server may echo arguments ("unknown command …, with args beginning with: …"), and the
            # arguments hold the tokens: keep only the head of the message, and drop the cause.
            detail = str(exc).split(", with args", 1)[0][:200]
            secrets = [] if tokens is None else [tokens.access_token, tokens.refresh_token, tokens.id_token]
            for secret in secrets:
                if secret:
                    detail = detail.replace(secret, "<hidden>")
            if "db index is out of range" in detail.lower() or "invalid db index" in detail.lower():
                hint = "the database number in the URL (/N) does not exist on the server: use one below its "
                hint += "'databases' setting (16 by default), or /0 on a Cluster"
            else:
                hint = "check that its ACL allows EVALSHA, HGET, GET and PUBLISH on these keys and channels, "
                hint += "and that it has memory left"
            raise StorageError(
                f"could not {what}: {self._server} refused ({type(exc).__name__}: {detail}); {hint}"
            ) from None


def _reset_in_child(storage: RedisStorage) -> None:
    """In a forked child: new locks and connection gate (parent threads may have held them), no
    per-loop clients (their sockets are the parent's; redis-py's sync pools notice the new pid
    themselves), a new origin (the parent's writes are now another writer's), no lease answers the
    parent lost (re-taking one here would make two holders), and a pub/sub listener of its own for the
    subscribers live at the fork."""
    storage._lock = threading.Lock()
    storage._feed_lock = threading.Lock()
    storage._gate = _FifoGate(storage.max_connections)
    storage._loops = {}
    storage._origin = new_owner()[:16]
    storage._orphans = {}
    storage._subscriber = None  # its thread was the parent's
    storage._feed_remove = None
    if storage._closed or storage._sync is None or not storage._subscribers:
        return  # a listener is made on first use
    subscriber = storage._subscriber = _Subscriber(storage, missed=True)
    storage._feed_remove = subscriber.hub.add_subscriber(feed_of(storage), storage._origin)
    subscriber.start()  # not ensure(): a fork must not wait for the server


_forked: ForkRegistry[RedisStorage] = ForkRegistry(_reset_in_child)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _blob(key: EntryKey, tokens: UpstreamTokens) -> str:
    """The entry's JSON, with its ids inside, starting with blanks so SLOWLOG's copy of the argument
    (its first 128 bytes) holds no token."""
    data = tokens.to_dict()
    data["entry_key"] = [key.provider_id, key.session_id]
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    return "{" + " " * _SLOWLOG_ARGUMENT + text[1:]


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(seen) or "SSL" in str(seen)[:40]:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _abandon(loop: asyncio.AbstractEventLoop, found: _LoopClient) -> None:
    """Close an event loop's client from outside that loop: on the loop if it still runs, else by
    closing its sockets directly (a closed loop can no longer run the client's own close)."""
    if not found.owned:
        return
    if loop.is_running() and not loop.is_closed():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: loop.create_task(_aclose_quietly(found.client)))
            return
    if found.keeper is not None:  # finalize the parked generator now, so the loop's GC hook never runs it
        closing = found.keeper.aclose()
        with contextlib.suppress(BaseException):
            closing.send(None)
        closing.close()
    for connection in _connections_of(found.client):
        writer = getattr(connection, "_writer", None)
        transport = getattr(writer, "transport", None)
        sock = getattr(transport, "_sock", None)
        if transport is None or sock is None:
            continue
        with contextlib.suppress(Exception):
            if not loop.is_closed():
                loop._remove_reader(sock.fileno())  # type: ignore[attr-defined]
            sock.close()
            # The transport's finalizer would warn about (and re-close) a socket it still holds.
            transport._sock = None
            transport._closing = True
        with contextlib.suppress(Exception):
            connection._parser.on_disconnect()
        connection._reader = connection._writer = None  # or its finalizer warns "unclosed Connection"
    if hasattr(found.client, "_initialize"):  # a Cluster client: what its aclose() marks, so it does not warn
        found.client._initialize = True


async def _aclose_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


def _connections_of(client: Any) -> list[Any]:
    """Every connection a redis.asyncio client (standalone or Cluster) holds."""
    found: list[Any] = []
    with contextlib.suppress(Exception):
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            found.extend(getattr(pool, "_available_connections", []))
            found.extend(getattr(pool, "_in_use_connections", []))
        manager = getattr(client, "nodes_manager", None)
        if manager is not None:
            nodes = {id(node): node for node in [*manager.nodes_cache.values(), *manager.startup_nodes.values()]}
            for node in nodes.values():
                found.extend(getattr(node, "_connections", []))
    return found


def _clients_from_url(
    url: str, socket_timeout: float, kwargs: dict[str, Any], max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> tuple[Any, Callable[[], Any], str]:
    """(sync client, asyncio client factory, printable address) for ``url``."""
    redis = _import_redis()
    scheme, sep, rest = url.partition("://")
    cluster = scheme.lower() in ("redis+cluster", "rediss+cluster")
    if cluster:
        url = scheme.split("+", 1)[0] + sep + rest
    options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    options.update(kwargs)
    # Room for every gated command plus the pub/sub connection and a Cluster's slot-map refresh.
    options.setdefault("max_connections", max_connections + 4)
    where = _describe_url(url)
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
    return sync, lambda: redis.asyncio.Redis.from_url(url, **async_options), where


def _describe_url(url: str) -> str:
    """host:port (or the socket path) of ``url``, never its credentials."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    host = parts.hostname or "localhost"
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    return f"{host}:{port}"


def _describe(client: Any) -> str:
    """host:port of a client passed in, never its credentials."""
    with contextlib.suppress(Exception):
        startup = getattr(getattr(client, "nodes_manager", None), "startup_nodes", None)
        if startup:
            return ", ".join(sorted(startup))
        options = client.connection_pool.connection_kwargs
        if options.get("path"):
            return f"unix:{options['path']}"
        return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"
    return "(unknown address)"
