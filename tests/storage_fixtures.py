"""Fixtures for our storage tests: real Redis servers (session-scoped, started on first use), and how a
worker process opens each shared store (the contract suite's :class:`StoreWorker` runs that source)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_servers import RedisCluster, RedisServer

__all__ = ["REPO", "redis_cluster", "redis_opener", "redis_server", "sqlite_opener"]

REPO = Path(__file__).resolve().parent.parent


def sqlite_opener(path: str) -> str:
    """Python source that opens the SQLite store at ``path`` as ``storage``."""
    return f"from httpx_upstream_auth import SQLiteStorage\nstorage = SQLiteStorage({path!r})\n"


def redis_opener(url: str, prefix: str) -> str:
    """Python source that opens the Redis store at ``url`` under ``prefix`` as ``storage``."""
    opened = f"RedisStorage.from_url({url!r}, prefix={prefix!r})"
    return f"from httpx_upstream_auth import RedisStorage\nstorage = {opened}\n"


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
