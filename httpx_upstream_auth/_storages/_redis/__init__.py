"""The Redis / Valkey storage, by concern: ``_storage.py`` (``RedisStorage``: which client serves a call),
``_async.py`` (the commands, written once; ``_sync.py`` is generated from it), ``_keys.py`` (key layout and
Lua), ``_clients.py`` (clients and connection slots), ``_loops.py`` (one asyncio client per event loop),
``_feed.py`` (the pub/sub listener) and ``_errors.py`` (error messages and server addresses)."""

from ._storage import RedisStorage

__all__ = ["RedisStorage"]
