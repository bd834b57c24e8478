"""Helpers shared by the test modules: fake clock, storages that fail on demand, sync/async drivers."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import attrs
import httpx
import pytest

from httpx_upstream_auth import (
    Binding,
    EntryKey,
    MemoryStorage,
    ReauthenticationRequired,
    StorageError,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth._async._manager import MAX_RETRIES
from httpx_upstream_auth.testing import LocalProvider
from httpx_upstream_auth.testing._provider import Receive, Scope, Send

PROVIDER_ID = "local"
SESSION = "session-1"
CLIENT_SECRETS = {"test-client": "test-secret", "post-client": "post-secret", "public-client": None}
#: One CA bundle load for every test client (httpx loads it per client otherwise: ~40 ms each).
SSL = httpx.create_ssl_context()
AUTH_METHODS = {"test-client": "client_secret_basic", "post-client": "client_secret_post", "public-client": "none"}


class FakeClock:
    """A clock the test moves by hand (wall and monotonic move together)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self.now

    def monotonic(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class FlakyStorage(MemoryStorage):
    """A MemoryStorage whose writes fail on demand, as a store that went away would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_put = False
        self.puts = 0

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        self.puts += 1
        if self.fail_put:
            raise StorageError("the store is down")
        return super().put(key, tokens, expected_version=expected_version)


class UnnotifiedStorage(MemoryStorage):
    """A MemoryStorage that reports no changes, as another process's save does before its notification
    arrives: a manager keeps serving its cached token until the API refuses it."""

    def subscribe(self, callback: Any) -> None:
        return None


class HeldLeaseStorage(MemoryStorage):
    """A MemoryStorage whose lease is held by a fake other process while ``held`` is true."""

    def __init__(self) -> None:
        super().__init__()
        self.held = True
        self.attempts = 0

    def acquire_lease(self, key: EntryKey, ttl: float) -> Any:
        self.attempts += 1
        if self.held:
            return None
        return super().acquire_lease(key, ttl)


ManagerFactory = Callable[..., TokenManager]

#: Provider faults whose answer proves nothing was consumed: the refresh job tries them again.
TRANSIENT_FAULTS = {"500", "503", "429"}


def fail_refresh(provider: LocalProvider, fault: str) -> None:
    """Make the next refresh fail with ``fault``: on every attempt the job makes (transient faults are retried)."""
    provider.fail_next(fault, 1 + MAX_RETRIES if fault in TRANSIENT_FAULTS else 1)


def expired(tokens: UpstreamTokens, ago: float = 5.0) -> UpstreamTokens:
    """The same tokens with an access expiry in the past (the provider still accepts the token itself)."""
    now = time.time()
    return attrs.evolve(tokens, expires_at=now - ago, issued_at=now - ago - 60)


def put_entry(manager: TokenManager, tokens: UpstreamTokens, session: str = SESSION) -> UpstreamTokens:
    """Write an entry straight into the manager's storage (bypassing its cache); return it as stored."""
    key = EntryKey(manager.provider_id, session)
    current = manager.storage.get(key)
    entry = attrs.evolve(tokens, version=(0 if current is None else current.version) + 1)
    assert manager.storage.put(key, entry, expected_version=None if current is None else current.version)
    return entry


def stored(manager: TokenManager, session: str = SESSION) -> UpstreamTokens | None:
    """The entry currently in the manager's storage."""
    return manager.storage.get(EntryKey(manager.provider_id, session))


async def aput_entry(manager: TokenManager, tokens: UpstreamTokens, session: str = SESSION) -> UpstreamTokens:
    """:func:`put_entry` from async code: in a worker thread, as a storage's sync API may block on I/O."""
    entry: UpstreamTokens = await anyio.to_thread.run_sync(put_entry, manager, tokens, session)
    return entry


async def astored(manager: TokenManager, session: str = SESSION) -> UpstreamTokens | None:
    """:func:`stored` from async code: in a worker thread."""
    entry: UpstreamTokens | None = await anyio.to_thread.run_sync(stored, manager, session)
    return entry


class Driver:
    """Drives a manager through its sync API (in a worker thread) or its async API, from an async test."""

    def __init__(self, mode: str, base_url: str) -> None:
        self.mode = mode
        self.base_url = base_url

    async def _sync(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    async def get_token(
        self, manager: TokenManager, session: str = SESSION, expect: Binding | None = None
    ) -> UpstreamTokens:
        """``get_token`` or ``aget_token``."""
        if self.mode == "sync":
            result: UpstreamTokens = await self._sync(manager.get_token, session, expect)
            return result
        return await manager.aget_token(session, expect)

    async def refresh(
        self, manager: TokenManager, session: str = SESSION, expect: Binding | None = None
    ) -> UpstreamTokens:
        """``refresh`` or ``arefresh``."""
        if self.mode == "sync":
            result: UpstreamTokens = await self._sync(manager.refresh, session, expect)
            return result
        return await manager.arefresh(session, expect)

    async def store(self, manager: TokenManager, tokens: UpstreamTokens, session: str = SESSION) -> UpstreamTokens:
        """``store`` or ``astore``."""
        if self.mode == "sync":
            result: UpstreamTokens = await self._sync(manager.store, session, tokens)
            return result
        return await manager.astore(session, tokens)

    async def request(
        self,
        manager: TokenManager,
        method: str = "GET",
        path: str = "/api/me",
        *,
        session: str = SESSION,
        expect: Binding | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API request through ``manager.auth(session)`` with an httpx.Client or httpx.AsyncClient."""
        auth = manager.auth(session, expect)
        if self.mode == "sync":

            def send() -> httpx.Response:
                with httpx.Client(base_url=self.base_url, auth=auth, timeout=10, verify=SSL) as client:
                    return client.request(method, path, **kwargs)

            response: httpx.Response = await self._sync(send)
            return response
        async with httpx.AsyncClient(base_url=self.base_url, auth=auth, timeout=10, verify=SSL) as client:
            return await client.request(method, path, **kwargs)


async def assert_fails_closed(driver: Driver, manager: TokenManager, provider: LocalProvider) -> None:
    """The next refresh may have consumed the stored refresh token: the caller is told to log in again, the
    entry is removed, and the token is never presented a second time (one token call, no reuse)."""
    with pytest.raises(ReauthenticationRequired):
        await driver.get_token(manager)
    assert stored(manager) is None
    with pytest.raises(ReauthenticationRequired):
        await driver.get_token(manager)
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


#: How long a test waits for something that must happen (a bound against hangs, not a timing check).
WAIT_LIMIT = 20.0


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll until ``condition()`` holds (fails the test if it never does)."""
    with anyio.fail_after(WAIT_LIMIT):
        while not condition():
            await anyio.sleep(0.005)


class ScriptedAPI:
    """An API answering 200 or a Bearer 401 per request, from a script; it records the Authorization sent."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.seen: list[str | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization")
        self.seen.append(None if auth is None else auth.decode())
        status = self.statuses.pop(0) if self.statuses else 200
        extra = [(b"www-authenticate", b'Bearer error="invalid_token"')] if status == 401 else []
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0"), *extra]})
        await send({"type": "http.response.body", "body": b""})
