"""Fixtures for the storage contract suite: every backend behind one ``backend`` / ``storage`` fixture.

Redis backends run against real servers (session-scoped, started on first use). A :class:`Backend`
can also start worker processes that open the same store, for cross-process tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_servers import RedisCluster, RedisServer

from httpx_upstream_auth._memory import MemoryStorage
from httpx_upstream_auth._redis import RedisStorage
from httpx_upstream_auth._sqlite import SQLiteStorage
from httpx_upstream_auth._storage import Storage

__all__ = ["BACKENDS", "Backend", "backend", "redis_cluster", "redis_server", "storage"]

BACKENDS = ["memory", "sqlite", "redis", "redis-cluster"]
REPO = Path(__file__).resolve().parent.parent

# The program a worker process runs: open the same store, then obey one command (see Backend.worker).
WORKER = r"""
import json, sys, time
from httpx_upstream_auth._models import EntryKey, UpstreamTokens

kind, location, prefix, provider, session, command, *args = sys.argv[1:]
from httpx_upstream_auth._sqlite import SQLiteStorage
if kind == "sqlite":
    storage = SQLiteStorage(location)
else:
    from httpx_upstream_auth._redis import RedisStorage
    storage = RedisStorage.from_url(location, prefix=prefix)
key = EntryKey(provider, session)

def say(**fields):
    print(json.dumps(fields), flush=True)

say(ready=True)
sys.stdin.readline()  # "go"
if command == "increment":
    successes = 0
    for _ in range(int(args[0])):
        current = storage.get(key)
        version = 0 if current is None else current.version
        new = UpstreamTokens(access_token=f"at-{version + 1}", refresh_token="rt", version=version + 1)
        if storage.put(key, new, expected_version=None if current is None else version):
            successes += 1
    say(successes=successes)
elif command == "delete":  # delete the entry (any version), then say whether it was there
    say(deleted=storage.delete(key))
elif command == "open":  # after "go": for each path on stdin, open a store there and say whether it worked
    while True:
        path = sys.stdin.readline().strip()
        if not path:
            break
        try:
            SQLiteStorage(path).close()
            say(ok=True)
        except Exception as exc:
            say(ok=False, error=f"{type(exc).__name__}: {exc}")
elif command == "write":  # after each "go": sleep, then save version + 1; until stdin closes
    version, delay = int(args[0]), float(args[1])
    while True:
        time.sleep(delay)
        wrote_at = time.time()
        storage.put(key, UpstreamTokens(access_token="at-new", version=version + 1), expected_version=version)
        say(wrote_at=wrote_at)
        version += 1
        if not sys.stdin.readline():
            break
storage.close()
"""


class Backend:
    """One backend under test: makes storages on a shared store and workers that open it too."""

    def __init__(self, name: str, factory: Callable[..., Storage], location: str = "", prefix: str = "") -> None:
        self.name = name
        self.factory = factory
        self.location = location
        self.prefix = prefix
        self.made: list[Storage] = []

    @property
    def shared_across_processes(self) -> bool:
        """False for memory, whose entries live in one process."""
        return self.name != "memory"

    def make(self, **kwargs: Any) -> Storage:
        """A new storage object on this backend's store (``retention=``, ``socket_timeout=``…)."""
        storage = self.factory(**kwargs)
        self.made.append(storage)
        return storage

    def worker(self, provider: str, session: str, command: str, *args: str) -> subprocess.Popen[str]:
        """Start a process that opens the same store, prints ``{"ready": true}``, and runs ``command``
        once it reads a line on stdin; it prints its results as JSON lines.

        ``increment N``: N compare-and-set increments, then ``{"successes": k}``. ``write V DELAY``: after
        each line on stdin, wait DELAY, save version V+1 (then V+2…), print ``{"wrote_at": epoch}``.
        ``delete``: delete the entry, print ``{"deleted": bool}``. ``open``: for each further line (a path),
        open a SQLiteStorage there and print ``{"ok": bool, "error": ...}``; an empty line ends it.
        """
        kind = "sqlite" if self.name == "sqlite" else "redis"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, kind, self.location, self.prefix, provider, session, command, *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
        )  # fmt: skip

    def close(self) -> None:
        """Close every storage this backend made."""
        for storage in self.made:
            storage.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real standalone redis-server for the whole session."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A real three-primary Redis Cluster for the whole session."""
    cluster = RedisCluster()
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn; Redis ones get a fresh key prefix so tests do not see each other's keys."""
    name: str = request.param
    found: Backend
    if name == "memory":
        shared = MemoryStorage()

        def memory(**kwargs: Any) -> Storage:
            # Memory entries live in one object: a second storage would be a second store.
            return MemoryStorage(**kwargs) if kwargs else shared

        found = Backend(name, memory)
    elif name == "sqlite":
        path = str(tmp_path / "tokens.db")
        found = Backend(name, lambda **kwargs: SQLiteStorage(path, **kwargs), location=path)
    else:
        server = request.getfixturevalue("redis_cluster" if name == "redis-cluster" else "redis_server")
        prefix = f"t{uuid.uuid4().hex[:10]}"
        url = server.url

        def redis(**kwargs: Any) -> Storage:
            return RedisStorage.from_url(url, prefix=prefix, **kwargs)

        found = Backend(name, redis, location=url, prefix=prefix)
    yield found
    found.close()


@pytest.fixture
def storage(backend: Backend) -> Storage:
    """A storage object of each backend in turn."""
    return backend.make()
