"""The same UpstreamAuth object drives httpx2 clients (the MCP SDK 2.x stack), sync and async."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio.to_thread
import httpx
import pytest
from support import SESSION, SSL, expired, put_entry

from httpx_upstream_auth import TokenManager
from httpx_upstream_auth.testing import LocalProvider, ServerThread

httpx2 = pytest.importorskip("httpx2", reason="httpx2 is not installed")

pytestmark = pytest.mark.anyio


def test_auth_is_an_httpx2_auth(manager: TokenManager) -> None:
    """UpstreamAuth is accepted by httpx2 as an httpx2.Auth."""
    assert isinstance(manager.auth(SESSION), httpx2.Auth)


def sync_get(server: ServerThread, manager: TokenManager, path: str = "/api/me") -> int:
    with httpx2.Client(base_url=server.url, auth=manager.auth(SESSION), timeout=10, verify=SSL) as client:
        return int(client.get(path).status_code)


async def async_get(server: ServerThread, manager: TokenManager, path: str = "/api/me") -> int:
    async with httpx2.AsyncClient(base_url=server.url, auth=manager.auth(SESSION), timeout=10, verify=SSL) as client:
        return int((await client.get(path)).status_code)


def test_sync_valid_token(provider: LocalProvider, manager: TokenManager, server: ServerThread) -> None:
    """httpx2.Client sends a valid stored token without refreshing."""
    manager.store(SESSION, provider.login())
    assert sync_get(server, manager) == 200
    assert provider.stats["token_calls"] == 0 and provider.stats["api_ok"] == 1


def test_sync_expired_token_refreshes(provider: LocalProvider, manager: TokenManager, server: ServerThread) -> None:
    """httpx2.Client on an expired entry refreshes once, then sends the new token."""
    put_entry(manager, expired(provider.login()))
    assert sync_get(server, manager) == 200
    assert sync_get(server, manager) == 200
    assert provider.stats["refresh_ok"] == 1 and provider.stats["api_401"] == 0


def test_sync_401_replays(provider: LocalProvider, manager: TokenManager, server: ServerThread) -> None:
    """httpx2.Client: a 401 for a revoked token is refreshed and replayed once, to 200."""
    tokens = manager.store(SESSION, provider.login())
    provider.revoke_access(tokens.access_token)
    assert sync_get(server, manager) == 200
    assert provider.stats["refresh_ok"] == 1 and provider.stats["api_401"] == 1
    assert provider.api_calls["/api/me"] == 2


def test_sync_one_shot_body_not_replayed(provider: LocalProvider, manager: TokenManager, server: ServerThread) -> None:
    """httpx2.Client: a generator body is not sent twice after a 401."""
    tokens = manager.store(SESSION, provider.login())
    provider.revoke_access(tokens.access_token)

    def chunks() -> Iterator[bytes]:
        yield b"abc"

    with httpx2.Client(base_url=server.url, auth=manager.auth(SESSION), timeout=10, verify=SSL) as client:
        assert client.post("/api/upload", content=chunks()).status_code == 401
        assert client.post("/api/upload", content=b"abc").status_code == 200
    assert provider.api_calls["/api/upload"] == 2 and provider.stats["token_calls"] == 1


async def test_async_valid_token(provider: LocalProvider, manager: TokenManager, server: ServerThread) -> None:
    """httpx2.AsyncClient sends a valid stored token without refreshing."""
    await manager.astore(SESSION, provider.login())
    assert await async_get(server, manager) == 200
    assert provider.stats["token_calls"] == 0 and provider.stats["api_ok"] == 1


async def test_async_expired_token_refreshes(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """httpx2.AsyncClient on an expired entry refreshes once, then sends the new token."""
    put_entry(manager, expired(provider.login()))
    assert await async_get(server, manager) == 200
    assert await async_get(server, manager) == 200
    assert provider.stats["refresh_ok"] == 1 and provider.stats["api_401"] == 0


async def test_async_401_replays(provider: LocalProvider, manager: TokenManager, server: ServerThread) -> None:
    """httpx2.AsyncClient: a 401 for a revoked token is refreshed and replayed once, to 200."""
    tokens = await manager.astore(SESSION, provider.login())
    provider.revoke_access(tokens.access_token)
    assert await async_get(server, manager) == 200
    assert provider.stats["refresh_ok"] == 1 and provider.stats["api_401"] == 1
    assert provider.api_calls["/api/me"] == 2


async def test_async_one_shot_body_not_replayed(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """httpx2.AsyncClient: an async generator body is not sent twice after a 401."""
    tokens = await manager.astore(SESSION, provider.login())
    provider.revoke_access(tokens.access_token)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"abc"

    async with httpx2.AsyncClient(base_url=server.url, auth=manager.auth(SESSION), timeout=10, verify=SSL) as client:
        assert (await client.post("/api/upload", content=chunks())).status_code == 401
        assert (await client.post("/api/upload", content=b"abc")).status_code == 200
    assert provider.api_calls["/api/upload"] == 2 and provider.stats["token_calls"] == 1


async def test_httpx_and_httpx2_share_one_refresh(
    provider: LocalProvider, manager: TokenManager, server: ServerThread
) -> None:
    """An httpx client in a thread and httpx2 async tasks on one expired key share a single refresh."""
    put_entry(manager, expired(provider.login()))
    provider.token_delay = 0.2
    statuses: list[int] = []

    async def one() -> None:
        statuses.append(await async_get(server, manager))

    def httpx_get() -> int:
        with httpx.Client(base_url=server.url, auth=manager.auth(SESSION), timeout=10, verify=SSL) as client:
            return client.get("/api/me").status_code

    async def in_thread() -> None:
        statuses.append(await anyio.to_thread.run_sync(httpx_get))

    async with anyio.create_task_group() as tg:
        tg.start_soon(in_thread)
        for _ in range(5):
            tg.start_soon(one)
    assert statuses == [200] * 6
    assert provider.stats["token_calls"] == 1
