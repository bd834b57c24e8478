"""Redis / Valkey storage: JSON entries with native TTL, Lua compare-and-set, ``SET NX PX`` leases.

Owns the key layout, the Lua scripts, the pub/sub channel that wakes watchers when a save lands, the
mapping of redis-py errors to :class:`StorageError`, and which client serves a call: the sync client
(sync code, trio, other threads) or an asyncio client that belongs to the running event loop.
redis-py is imported lazily, so this module imports without the ``redis`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.parse
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._exceptions import StorageError
from ._models import EntryKey, UpstreamTokens
from ._policy import DEFAULT_RETENTION, retention_deadline
from ._storage import Lease, Storage, new_owner

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster

__all__ = ["RedisStorage"]

#: Where ``RedisStorage()`` connects when given no client.
DEFAULT_URL = "redis://localhost:6379/0"
_MISSING_EXTRA = "RedisStorage needs redis-py: pip install 'httpx-upstream-auth[redis]'"

# Compare-and-set. KEYS[1]: the entry. ARGV: expected version ('' = no entry), the JSON, the retention
# deadline (epoch ms), the channel, the publish command, the new version. The publish is a pcall so a
# server without (S)PUBLISH still saves; watchers then fall back to polling.
_CAS = """
local current = redis.call('GET', KEYS[1])
if current then
  if ARGV[1] == '' or cjson.decode(current)['version'] ~= tonumber(ARGV[1]) then return 0 end
elseif ARGV[1] ~= '' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
redis.pcall(ARGV[5], ARGV[4], ARGV[6])
return 1
"""

# Conditional delete. ARGV: expected version ('' = any), the channel, the publish command.
_DELETE = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if ARGV[1] ~= '' and cjson.decode(current)['version'] ~= tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.pcall(ARGV[3], ARGV[2], '')
return 1
"""

# Owner-checked release: a holder whose lease expired must not delete the next holder's lease.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
    return redis


def _escape(part: str) -> str:
    """Make an id safe inside ``{…}``: braces would move the Cluster hash tag, ``:`` would make keys
    ambiguous, and ``%`` is escaped so the encoding stays one-to-one."""
    return part.replace("%", "%25").replace("{", "%7B").replace("}", "%7D").replace(":", "%3A")


def _running_asyncio() -> bool:
    """True inside an asyncio task (not trio, not trio-in-guest-mode on an asyncio loop)."""
    try:
        import sniffio
    except ImportError:  # without sniffio there is no trio either
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True
    try:
        return bool(sniffio.current_async_library() == "asyncio")
    except sniffio.AsyncLibraryNotFoundError:
        return False


def _kind(message: dict[str, Any]) -> str:
    kind = message.get("type")
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def _published_version(message: dict[str, Any]) -> tuple[bool, int | None]:
    """(understood, version) from a save notification; the payload is the new version, '' = deleted."""
    data = message.get("data")
    text = data.decode() if isinstance(data, bytes) else str(data)
    if text == "":
        return True, None
    try:
        return True, int(text)
    except ValueError:
        return False, None


def _verdict(message: dict[str, Any] | None, version: int | None) -> str | None:
    """What a pub/sub message means to a watcher of ``version``: ``"changed"`` (return now), ``"recheck"``
    (a notification we could not read: look at the entry), or ``None`` (nothing for us)."""
    if message is None or _kind(message) not in ("message", "smessage"):
        return None
    understood, saved = _published_version(message)
    if not understood:
        return "recheck"
    return "changed" if saved != version else None


class _LoopClient:
    """An asyncio client, with its scripts, that belongs to one event loop."""

    def __init__(self, client: Any, *, owned: bool) -> None:
        self.client = client
        self.owned = owned
        self.cas = client.register_script(_CAS)
        self.delete = client.register_script(_DELETE)
        self.release = client.register_script(_RELEASE)
        self.keeper: AsyncGenerator[None, None] | None = None
        #: Set once the client may be used (or ``failed`` says it may not).
        self.ready = anyio.Event()
        self.failed = False


async def _close_at_loop_shutdown(storage: weakref.ref[RedisStorage], client: Any) -> AsyncGenerator[None, None]:
    # Parked at its first ``yield`` for the life of the loop: asyncio.run() / anyio.run() close every
    # open async generator (loop.shutdown_asyncgens) while the loop still runs, which is the last moment
    # an asyncio client can close its connections cleanly. Nothing else tells us a loop is ending.
    try:
        yield
    finally:
        owner = storage()
        if owner is not None:
            owner._forget_loop(asyncio.get_running_loop())
        with contextlib.suppress(Exception):
            await client.aclose()


class RedisStorage(Storage):
    """Entries in Redis or Valkey (standalone or Cluster), shared by every process and host.

    Each entry is the JSON of :meth:`UpstreamTokens.to_json` under ``{prefix}:{<provider>:<session>}:entry``
    with a native TTL at its retention deadline; the refresh lease is ``…:lease`` (``SET NX PX`` with a
    random owner). The ``{…}`` hash tag keeps an entry, its lease and its notification channel in one
    Cluster slot. ``put`` and conditional ``delete`` are one Lua script each, which also publishes the
    new version so :meth:`watch` wakes at once.

    Pass a ``redis.Redis`` / ``redis.cluster.RedisCluster`` as ``client`` (used by sync code, under trio,
    and in threads), and optionally a ``redis.asyncio`` client as ``async_client`` (used under asyncio on
    the first event loop that uses it; other loops fall back to ``client`` in a worker thread). Clients
    you pass stay yours to close. With neither, or with :meth:`from_url`, the storage makes its own
    clients (one asyncio client per event loop) with ``socket_timeout`` for connect and read, and no
    automatic retries, so an outage surfaces as :class:`StorageError` within that time.
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
    ) -> None:
        redis = _import_redis()
        super().__init__(retention=retention)
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix {prefix!r} must not contain '{{' or '}}' (they mark Cluster slots)")
        self.prefix = prefix
        self.socket_timeout = socket_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = weakref.WeakKeyDictionary()
        self._async_factory: Callable[[], Any] | None = None
        self._async_client: Any = async_client
        self._async_client_taken = False
        self._owns_sync = False
        if client is None and async_client is None:
            client, self._async_factory, self._where = _clients_from_url(DEFAULT_URL, socket_timeout, {})
            self._owns_sync = True
        else:
            self._where = _describe(client if client is not None else async_client)
        self._sync: Any = client
        self._cluster = isinstance(client, redis.cluster.RedisCluster) or isinstance(
            async_client, redis.asyncio.cluster.RedisCluster
        )
        # Sharded pub/sub keeps a notification on the slot's own node instead of broadcasting it to
        # every node of the Cluster; plain PUBLISH works on every standalone server and version.
        self._publish = "SPUBLISH" if self._cluster else "PUBLISH"
        if client is not None:
            self._cas = client.register_script(_CAS)
            self._delete = client.register_script(_DELETE)
            self._release = client.register_script(_RELEASE)
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
        self._response_error: type[BaseException] = redis.exceptions.ResponseError

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "hua",
        retention: float = DEFAULT_RETENTION,
        socket_timeout: float = 2.0,
        **redis_kwargs: Any,
    ) -> RedisStorage:
        """A storage with clients of its own for ``url``.

        Schemes: ``redis://``, ``rediss://`` (TLS), ``unix://``, and ``redis+cluster://host:port`` /
        ``rediss+cluster://host:port`` for a Cluster (any node; the others are discovered). Extra keyword
        arguments go to the redis-py clients (``password``, ``ssl_ca_certs``, ``max_connections``…).
        """
        _import_redis()
        sync, factory, where = _clients_from_url(url, socket_timeout, redis_kwargs)
        storage = cls(sync, prefix=prefix, retention=retention, socket_timeout=socket_timeout)
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
        return f"{self.prefix}:{{{_escape(key.provider_id)}:{_escape(key.session_id)}}}"

    def _entry_key(self, key: EntryKey) -> str:
        return self._slot(key) + ":entry"

    def _lease_key(self, key: EntryKey) -> str:
        return self._slot(key) + ":lease"

    def _channel(self, key: EntryKey) -> str:
        return self._slot(key) + ":saved"

    def _cas_args(self, key: EntryKey, tokens: UpstreamTokens, expected_version: int | None) -> list[Any]:
        deadline_ms = int(retention_deadline(tokens, time.time(), self.retention) * 1000)
        expected = "" if expected_version is None else str(expected_version)
        return [expected, tokens.to_json(), deadline_ms, self._channel(key), self._publish, str(tokens.version)]

    def _delete_args(self, key: EntryKey, expected_version: int | None) -> list[Any]:
        expected = "" if expected_version is None else str(expected_version)
        return [expected, self._channel(key), self._publish]

    # -- sync surface -------------------------------------------------------------------------------------
    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """Return the entry (expired access token or not), or ``None`` when absent or past retention."""
        client = self._client()
        with self._errors("read tokens"):
            raw = client.get(self._entry_key(key))
        return self._decode(key, raw)

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Store ``tokens`` iff the entry's version is ``expected_version`` (``None``: no entry), atomically."""
        self._client()
        with self._errors("save tokens", tokens):
            return bool(self._cas(keys=[self._entry_key(key)], args=self._cas_args(key, tokens, expected_version)))

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Remove the entry; with ``expected_version``, only while it still has that version."""
        self._client()
        with self._errors("delete tokens"):
            return bool(self._delete(keys=[self._entry_key(key)], args=self._delete_args(key, expected_version)))

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Claim the refresh lease for ``key`` across processes and hosts (``SET NX PX``)."""
        client = self._client()
        owner = new_owner()
        with self._errors("take the refresh lease"):
            claimed = client.set(self._lease_key(key), owner, nx=True, px=max(1, int(ttl * 1000)))
        return Lease(key, owner, ttl) if claimed else None

    def release_lease(self, lease: Lease) -> None:
        """Give the lease back if it is still ours."""
        self._client()
        with self._errors("release the refresh lease"):
            self._release(keys=[self._lease_key(lease.key)], args=[lease.owner])

    def watch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Return once the entry's version differs from ``version``, or after ``timeout`` seconds.

        Subscribes to the key's channel, which every save publishes to, then re-reads the entry (so a
        save between the two is not missed) and waits for a notification. Falls back to polling when the
        server refuses pub/sub.
        """
        self._watch(key, version, timeout, None)

    def close(self) -> None:
        """Close the clients this storage made. Clients you passed in are left open."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
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
        with self._errors("read tokens"):
            raw = await loop_client.client.get(self._entry_key(key))
        return self._decode(key, raw)

    async def aput(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """Async twin of :meth:`put`."""
        loop_client = await self._loop_client()
        if loop_client is None:
            return await super().aput(key, tokens, expected_version=expected_version)
        args = self._cas_args(key, tokens, expected_version)
        with self._errors("save tokens", tokens):
            return bool(await loop_client.cas(keys=[self._entry_key(key)], args=args))

    async def adelete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Async twin of :meth:`delete`."""
        loop_client = await self._loop_client()
        if loop_client is None:
            return await super().adelete(key, expected_version=expected_version)
        args = self._delete_args(key, expected_version)
        with self._errors("delete tokens"):
            return bool(await loop_client.delete(keys=[self._entry_key(key)], args=args))

    async def aacquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Async twin of :meth:`acquire_lease`."""
        loop_client = await self._loop_client()
        if loop_client is None:
            return await super().aacquire_lease(key, ttl)
        owner = new_owner()
        with self._errors("take the refresh lease"):
            claimed = await loop_client.client.set(self._lease_key(key), owner, nx=True, px=max(1, int(ttl * 1000)))
        return Lease(key, owner, ttl) if claimed else None

    async def arelease_lease(self, lease: Lease) -> None:
        """Async twin of :meth:`release_lease`."""
        loop_client = await self._loop_client()
        if loop_client is None:
            return await super().arelease_lease(lease)
        with self._errors("release the refresh lease"):
            await loop_client.release(keys=[self._lease_key(lease.key)], args=[lease.owner])

    async def awatch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Async twin of :meth:`watch`; cancellable."""
        loop_client = await self._loop_client()
        if loop_client is None:
            stop = threading.Event()
            try:
                # A limiter of our own: a long watch must not hold one of the shared worker-thread
                # tokens that the writer we are waiting for may need for its own put().
                await anyio.to_thread.run_sync(
                    self._watch, key, version, timeout, stop,
                    abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1),
                )  # fmt: skip
            finally:
                stop.set()  # an abandoned (cancelled) watch thread returns within one slice
            return
        await self._awatch(loop_client, key, version, time.monotonic() + timeout)

    async def aclose(self) -> None:
        """Close this event loop's asyncio client and the sync client this storage made."""
        found = None
        if _running_asyncio():
            with self._lock:
                found = self._loops.pop(asyncio.get_running_loop(), None)
        if found is not None and found.keeper is not None:
            with anyio.CancelScope(shield=True):
                await found.keeper.aclose()
        self.close()

    # -- watching -----------------------------------------------------------------------------------------
    def _watch(self, key: EntryKey, version: int | None, timeout: float, stop: threading.Event | None) -> None:
        client = self._client()
        deadline = time.monotonic() + timeout
        # When cancellable, wait in short slices so an abandoned thread notices ``stop`` soon.
        slice_ = 0.05 if stop is not None else self.recheck_interval
        with self._errors("watch for saved tokens"):
            subscription = self._subscribe(client, self._channel(key))
            try:
                if self._version(client, key) != version:
                    return
                interval = self.recheck_interval if subscription is not None else self.poll_interval
                next_check = time.monotonic() + interval
                while (now := time.monotonic()) < deadline and not (stop is not None and stop.is_set()):
                    wait = max(min(deadline, next_check, now + slice_) - now, 0.0)
                    if subscription is None:
                        time.sleep(wait)
                    else:
                        verdict = _verdict(subscription[1](wait), version)
                        if verdict == "changed":
                            return
                        if verdict == "recheck":
                            next_check = 0.0
                    if time.monotonic() >= next_check:
                        if self._version(client, key) != version:
                            return
                        next_check = time.monotonic() + interval
            finally:
                if subscription is not None:
                    with contextlib.suppress(Exception):
                        subscription[0].close()

    def _subscribe(self, client: Any, channel: str) -> tuple[Any, Callable[[float], Any]] | None:
        """Subscribe and wait for the server's confirmation; ``None`` when pub/sub is refused."""
        pubsub = client.pubsub()
        receive: Callable[[float], Any]
        try:
            if self._cluster:
                node = client.get_node_from_key(channel)
                pubsub.ssubscribe(channel)
                receive = lambda wait: pubsub.get_sharded_message(timeout=wait, target_node=node)  # noqa: E731
            else:
                pubsub.subscribe(channel)
                receive = lambda wait: pubsub.get_message(timeout=wait)  # noqa: E731
            # The confirmation proves the server registered us: only then is the re-read race-free.
            deadline = time.monotonic() + self.socket_timeout
            while True:
                message = receive(max(deadline - time.monotonic(), 0.0))
                if message is not None and _kind(message) in ("subscribe", "ssubscribe"):
                    return pubsub, receive
                if time.monotonic() >= deadline:
                    raise TimeoutError("no confirmation of SUBSCRIBE")
        except self._response_error:
            with contextlib.suppress(Exception):
                pubsub.close()
            return None
        except BaseException:
            with contextlib.suppress(Exception):
                pubsub.close()
            raise

    async def _awatch(self, loop_client: _LoopClient, key: EntryKey, version: int | None, deadline: float) -> None:
        # The timeout is enforced by bounding each wait, never by cancelling a command half-way: a
        # redis.asyncio connection cancelled mid-reply may be handed out again out of step.
        client = loop_client.client
        channel = self._channel(key)
        with self._errors("watch for saved tokens"):
            pubsub = client.pubsub()
            try:
                receive = await self._asubscribe(client, pubsub, channel)
                if self._decode_version(key, await client.get(self._entry_key(key))) != version:
                    return
                interval = self.recheck_interval if receive is not None else self.poll_interval
                next_check = time.monotonic() + interval
                while (now := time.monotonic()) < deadline:
                    wait = max(min(deadline, next_check) - now, 0.0)
                    if receive is None:
                        await anyio.sleep(wait)
                    else:
                        verdict = _verdict(await receive(wait), version)
                        if verdict == "changed":
                            return
                        if verdict == "recheck":
                            next_check = 0.0
                    if time.monotonic() >= next_check:
                        if self._decode_version(key, await client.get(self._entry_key(key))) != version:
                            return
                        next_check = time.monotonic() + interval
            finally:
                # Closing is quick and must happen even when the caller cancelled the watch.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _asubscribe(self, client: Any, pubsub: Any, channel: str) -> Callable[[float], Awaitable[Any]] | None:
        """Subscribe and wait for the server's confirmation; ``None`` when pub/sub is refused."""
        receive: Callable[[float], Awaitable[Any]]
        try:
            if self._cluster:
                node = client.get_node_from_key(channel)
                await pubsub.ssubscribe(channel)
                receive = lambda wait: pubsub.get_sharded_message(timeout=wait, target_node=node)  # noqa: E731
            else:
                await pubsub.subscribe(channel)
                receive = lambda wait: pubsub.get_message(timeout=wait)  # noqa: E731
            deadline = time.monotonic() + self.socket_timeout
            while True:
                message = await receive(max(deadline - time.monotonic(), 0.0))
                if message is not None and _kind(message) in ("subscribe", "ssubscribe"):
                    return receive
                if time.monotonic() >= deadline:
                    raise TimeoutError("no confirmation of SUBSCRIBE")
        except self._response_error:
            return None

    # -- clients ------------------------------------------------------------------------------------------
    def _client(self) -> Any:
        if self._closed:
            raise StorageError(f"this RedisStorage ({self._where}) is closed; create a new one")
        if self._sync is None:
            raise RuntimeError(
                "this RedisStorage has only an asyncio client, and it cannot serve sync code, trio, or "
                "another event loop; pass client= as well, or use RedisStorage.from_url()"
            )
        return self._sync

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
                try:
                    found = self._loops.get(loop)
                except TypeError:  # a loop that cannot be weakly referenced: serve it from a thread
                    self._client()
                    return None
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
        try:
            if found.owned:
                found.keeper = _close_at_loop_shutdown(weakref.ref(self), found.client)
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
            return _LoopClient(self._async_factory(), owned=True)
        if self._async_client is not None and not self._async_client_taken:
            # redis.asyncio connections belong to the loop that opened them: a client passed in
            # serves the first loop that uses it; other loops use the sync client in a thread.
            self._async_client_taken = True
            return _LoopClient(self._async_client, owned=False)
        return None

    def _forget_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._loops.pop(loop, None)

    # -- decoding and errors ------------------------------------------------------------------------------
    def _decode(self, key: EntryKey, raw: Any) -> UpstreamTokens | None:
        if raw is None:
            return None
        try:
            return UpstreamTokens.from_json(raw)
        except (ValueError, TypeError) as exc:
            raise StorageError(
                f"{self._server} holds an unreadable entry for provider {key.provider_id!r} "
                f"({type(exc).__name__}); delete it and have the user log in again"
            ) from None

    def _decode_version(self, key: EntryKey, raw: Any) -> int | None:
        tokens = self._decode(key, raw)
        return None if tokens is None else tokens.version

    def _version(self, client: Any, key: EntryKey) -> int | None:
        return self._decode_version(key, client.get(self._entry_key(key)))

    @contextlib.contextmanager
    def _errors(self, what: str, tokens: UpstreamTokens | None = None) -> Iterator[None]:
        """Turn redis-py failures into StorageError, with messages that never carry a token."""
        try:
            yield
        except StorageError:
            raise
        except self._unreachable as exc:
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
            raise StorageError(
                f"could not {what}: {self._server} refused ({type(exc).__name__}: {detail}); check that its "
                "ACL allows EVALSHA, GET, SET and (S)PUBLISH on these keys, and that it has memory left"
            ) from None


def _clients_from_url(url: str, socket_timeout: float, kwargs: dict[str, Any]) -> tuple[Any, Callable[[], Any], str]:
    """(sync client, asyncio client factory, printable address) for ``url``."""
    redis = _import_redis()
    scheme, sep, rest = url.partition("://")
    cluster = scheme.lower() in ("redis+cluster", "rediss+cluster")
    if cluster:
        url = scheme.split("+", 1)[0] + sep + rest
    options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
    options.update(kwargs)
    where = _describe_url(url)
    # No automatic retries: an outage should surface as StorageError within socket_timeout, not after
    # a backoff series (redis-py's default is seconds long), and a retried compare-and-set could run
    # twice. The caller retries; a Cluster client still refreshes its slot map after a failure.
    sync_options = {"retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0), **options}
    async_options = {"retry": redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0), **options}
    if cluster:
        try:
            sync = redis.cluster.RedisCluster.from_url(url, **sync_options)
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StorageError(
                f"could not open the Redis Cluster at {where}: unreachable ({type(exc).__name__}); retry when "
                "it is back"
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
