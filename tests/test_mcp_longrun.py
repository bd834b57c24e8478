"""Long MCP sessions through expiries and revocations, and many sessions on one grant across threads.

Durations are measured and printed (run with ``-s`` to see them), never asserted: the assertions are counts.
"""

from __future__ import annotations

import math
import threading
import time

import anyio
import pytest

pytest.importorskip("mcp.server.mcpserver", reason="the MCP SDK 2.x is not installed")

import mcp_fixtures

from httpx_upstream_auth import TokenManager
from httpx_upstream_auth.mcp import connect
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider

pytestmark = pytest.mark.slow  # soak runs: seconds of real calls through many token lifetimes

# The shared fixtures, served for this module's own ``provider``.
manager = mcp_fixtures.manager
mcp_server = mcp_fixtures.mcp_server
provider_server = mcp_fixtures.provider_server

ISSUER_PATH = "/idp"
SESSION = "long-session"
TTL = 2.0


@pytest.fixture
def provider() -> LocalProvider:
    """A provider with 2-second access tokens and rotation (reusing a refresh token revokes the grant)."""
    return LocalProvider(access_ttl=TTL, rotate=True, issuer_path=ISSUER_PATH)


def p99(samples: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


async def call_every(
    client: object, seconds: float, interval: float, on_tick: object = None
) -> tuple[list[float], int]:
    """Call ``echo`` every ``interval`` for ``seconds``; return the call durations and the number of failures."""
    durations: list[float] = []
    failures = 0
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < seconds:
        if callable(on_tick):
            await on_tick(tick)
        began = time.monotonic()
        try:
            result = await client.call_tool("echo", {"text": str(tick)})  # type: ignore[attr-defined]
            if result.is_error or result.content[0].text != str(tick):
                failures += 1
        except Exception:
            failures += 1
        durations.append(time.monotonic() - began)
        tick += 1
        await anyio.sleep(max(0.0, start + tick * interval - time.monotonic()))
    return durations, failures


@pytest.mark.anyio
async def test_legacy_session_lives_through_expiries_and_revocations(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """One legacy session (GET stream open) calls a tool every 100 ms for 20 s across ~10 expiries and two
    revocations: 0 failed calls, 0 logins, refreshes = expiries + revocations, the stream never reopens."""
    # The control: the same kind of session with a 1-hour token.
    await manager.astore("control", provider.login(access_ttl=3600))
    async with connect(mcp_server.url, manager, "control", mode="legacy") as client:
        control, control_failures = await call_every(client, 5.0, 0.1)
    assert control_failures == 0
    provider.reset_stats()
    streams_before = mcp_server.streams_opened

    await manager.astore(SESSION, provider.login())
    revoked: list[float] = []

    async def revoke(tick: int) -> None:
        if tick in (65, 135):  # 6.5 s and 13.5 s in
            provider.revoke_access((await manager.aget_token(SESSION)).access_token)
            revoked.append(time.monotonic())

    started = time.monotonic()
    async with connect(mcp_server.url, manager, SESSION, mode="legacy") as client:
        durations, failures = await call_every(client, 20.0, 0.1, revoke)
        elapsed = time.monotonic() - started
        assert mcp_server.open_streams == 1
    stats = provider.stats
    refreshes = stats["refresh_ok"]
    expiries = refreshes - len(revoked)
    print(
        f"\nlong legacy session: {len(durations)} calls in {elapsed:.1f} s, {refreshes} refreshes "
        f"({expiries} expiries + {len(revoked)} revocations), tool-call p99 {p99(durations) * 1000:.1f} ms "
        f"(1-hour token control: {p99(control) * 1000:.1f} ms), max {max(durations) * 1000:.1f} ms"
    )
    assert failures == 0 and len(durations) >= 190
    assert provider.flow_stats["code_exchanges"] == 0 and provider.flow_stats["authorizations"] == 0  # no login
    assert stats["refresh_reuse"] == 0 and stats["invalid_grant"] == 0 and stats["token_calls"] == refreshes
    assert len(revoked) == 2 and expiries >= 1
    # One refresh per expiry: none before half a token's life, but those a revocation made necessary.
    assert stats["refresh_early"] <= len(revoked)
    assert mcp_server.streams_opened - streams_before == 1  # the GET stream opened once and stayed open
    assert mcp_server.verifier.rejected == len(revoked)  # only the revoked tokens were ever refused


def test_ten_sessions_on_one_grant_in_two_threads(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """Ten concurrent MCP sessions (legacy and auto) on one grant, in two threads each with its own event loop
    (asyncio and trio): one refresh per expiry, no refresh token reused, no failed call."""
    manager.store(SESSION, provider.login())
    failures: list[int] = []
    calls: list[int] = []
    errors: list[BaseException] = []
    seconds = 7.0

    async def sessions(first: int) -> None:
        async def one(index: int) -> None:
            mode = "legacy" if index % 2 else "auto"
            async with connect(mcp_server.url, manager, SESSION, mode=mode) as client:
                durations, failed = await call_every(client, seconds, 0.1)
            calls.append(len(durations))
            failures.append(failed)

        async with anyio.create_task_group() as tg:
            for index in range(first, first + 5):
                tg.start_soon(one, index)

    def thread(backend: str, first: int) -> None:
        try:
            anyio.run(sessions, first, backend=backend)
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=thread, args=(b, i)) for b, i in (("asyncio", 0), ("trio", 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - started
    stats = provider.stats
    print(f"\nten sessions, two threads: {sum(calls)} calls in {elapsed:.1f} s, {stats['refresh_ok']} refreshes")
    assert errors == [] and len(calls) == 10 and failures == [0] * 10
    assert stats["refresh_reuse"] == 0 and stats["invalid_grant"] == 0
    assert stats["token_calls"] == stats["refresh_ok"] >= 1
    assert stats["refresh_early"] == 0  # each refresh due: none in the first half of a token's life
