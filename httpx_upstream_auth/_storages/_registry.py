"""Storages by URL: ``open_storage("sqlite:///var/lib/app/tokens.db")``, and the one registry of schemes.

A third-party backend registers its scheme once with :func:`register_storage`; the CLI, the demo and
user configuration then open it like the built-in ones.
"""

from __future__ import annotations

import threading
import urllib.parse
from collections.abc import Callable

from ._base import Storage
from ._memory import MemoryStorage

__all__ = ["open_storage", "register_storage"]

StorageFactory = Callable[[str], Storage]

_lock = threading.Lock()


def _memory(url: str) -> Storage:
    return MemoryStorage()


def _sqlite(url: str) -> Storage:
    from ._sqlite import SQLiteStorage

    # sqlite:///relative/or/absolute?  sqlite:///tmp/x.db is /tmp/x.db; sqlite:tokens.db is a relative path.
    rest = url.split(":", 1)[1]
    path = urllib.parse.unquote(rest[2:] if rest.startswith("//") else rest)
    if not path:
        raise ValueError("a sqlite storage URL needs a path: sqlite:///path/to/tokens.db")
    return SQLiteStorage(path)


def _redis(url: str) -> Storage:
    from ._redis import RedisStorage

    return RedisStorage.from_url(url)


_SCHEMES: dict[str, StorageFactory] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "rediss": _redis,
    "redis+cluster": _redis,
    "rediss+cluster": _redis,
    "unix": _redis,
}


def register_storage(scheme: str, factory: StorageFactory) -> None:
    """Make :func:`open_storage` open ``scheme:...`` URLs with ``factory(url)``."""
    with _lock:
        _SCHEMES[scheme.lower()] = factory


def open_storage(url: str) -> Storage:
    """The storage a URL names: ``memory``, ``sqlite:///path/to/tokens.db`` (or ``sqlite:relative.db``),
    ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://``, or a registered scheme.

    Raises ``ValueError`` for a URL of no known scheme (the message lists them; it never repeats the URL,
    which may carry a password).
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else url.lower()
    with _lock:
        factory = _SCHEMES.get(scheme)
        known = ", ".join(sorted(_SCHEMES))
    if factory is None:
        raise ValueError(f"no storage is registered for the scheme {scheme!r}; known: {known}")
    return factory(url)
