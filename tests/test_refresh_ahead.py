"""Refresh ahead of expiry (issue 15): a request that finds its token nearly due is served the still-valid
token at once and starts the session's refresh job in the background; only a token inside its leeway waits.

Over real HTTP on 127.0.0.1 against the LocalProvider. Where a test must know that a request did not wait,
the refresher holds its token request at a gate the test opens: a request that returns while the gate is
shut did not wait for the refresh. Every assertion is a count or a state; waits are bounded, never timed.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import httpx
import pytest
from support import SSL, Driver, FakeClock, ManagerFactory, stored, wait_until

from httpx_upstream_auth import OAuth2Refresher, TraceEvent, UpstreamTokens
from httpx_upstream_auth._async._manager import MAX_AHEAD_FLIGHTS
from httpx_upstream_auth._clock import Clock
from httpx_upstream_auth.testing import LocalProvider, ServerThread

pytestmark = pytest.mark.anyio

#: A fixed start, so the jitter (seeded from the manager's clock) draws the same windows on every run.
EPOCH = 1_800_000_000.0
LIFETIME = 100.0  # leeway: min(30, 10% of it) = 10 s; refresh_ahead=20 gives a window of 10..20 s before that


class GatedRefresher(OAuth2Refresher):
    """An OAuth2Refresher whose token requests wait until the test opens ``gate`` (counted in ``entered``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()  # thread jobs enter at once

    def _enter(self) -> None:
        with self._lock:
            self.entered += 1

    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        self._enter()
        assert self.gate.wait(20), "the test never opened the gate"
        return super().refresh(tokens, clock)

    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        self._enter()
        with anyio.fail_after(20):
            while not self.gate.is_set():
                await anyio.sleep(0.005)
        return await super().arefresh(tokens, clock)


class WaitCounter:
    """An ``on_event`` hook counting the refreshes that ended and the callers that waited on them (the
    ``waiters`` of each refresh.succeeded or refresh.failed event)."""

    def __init__(self) -> None:
        self.ended = 0
        self.waits = 0
        self._lock = threading.Lock()

    def __call__(self, event: TraceEvent) -> None:
        if event.name in ("refresh.succeeded", "refresh.failed"):
            with self._lock:
                self.ended += 1
                self.waits += event.fields["waiters"]


@pytest.fixture
def clock() -> FakeClock:
    """The clock of the provider and the manager, moved by hand."""
    return FakeClock(EPOCH)


@pytest.fixture
def timed(clock: FakeClock) -> Any:
    """A provider on the test's clock, served on 127.0.0.1: (provider, server)."""
    provider = LocalProvider(clock=clock, access_ttl=LIFETIME)
    with ServerThread(provider) as server:
        yield provider, server


def gated(server: ServerThread) -> GatedRefresher:
    """A gated refresher for the test client."""
    return GatedRefresher(server.url + "/token", "test-client", "test-secret")


@pytest.mark.parametrize("redeem_in", ["thread", "task"])
async def test_request_in_window_is_served_at_once_and_refreshes_once(
    driver: Driver, timed: Any, clock: FakeClock, make_manager: ManagerFactory, redeem_in: str
) -> None:
    """Inside the window, every request is sent with the still-valid token while one background refresh is
    held at the gate; once it lands, requests use the new token. One token call, no reuse."""
    provider, server = timed
    refresher = gated(server)
    waits = WaitCounter()
    manager = make_manager(refresher=refresher, clock=clock, refresh_ahead=20, redeem_in=redeem_in, on_event=waits)
    local = Driver(driver.mode, server.url)
    first = await local.store(manager, provider.login())
    assert (await local.request(manager)).status_code == 200
    clock.advance(LIFETIME - 10.5)  # past every draw of the window's start, before the leeway
    for _ in range(5):
        assert (await local.get_token(manager)).access_token == first.access_token
        assert (await local.request(manager)).status_code == 200
    await wait_until(lambda: refresher.entered == 1)
    assert provider.stats["token_calls"] == 0  # the refresh is held at the gate: nobody waited for it
    assert manager.footprint().flights == 1
    refresher.gate.set()
    await wait_until(lambda: (stored(manager) or first).version > first.version)
    await wait_until(lambda: manager.footprint().flights == 0)
    renewed = await local.get_token(manager)
    assert renewed.access_token != first.access_token
    assert (await local.request(manager)).status_code == 200
    assert refresher.entered == 1
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0
    assert provider.stats["api_ok"] == 7 and provider.stats["api_401"] == 0
    await wait_until(lambda: waits.ended == 1)
    assert waits.waits == 0


async def test_token_inside_leeway_waits_for_the_refresh(
    driver: Driver, timed: Any, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A token inside its leeway is not served: the request waits for the refresh, even with refresh-ahead on
    (no request came during the window)."""
    provider, server = timed
    refresher = gated(server)
    waits = WaitCounter()
    manager = make_manager(refresher=refresher, clock=clock, refresh_ahead=20, on_event=waits)
    local = Driver(driver.mode, server.url)
    first = await local.store(manager, provider.login())
    assert (await local.get_token(manager)).access_token == first.access_token
    clock.advance(LIFETIME - 5)  # inside the 10-second leeway
    got: list[UpstreamTokens] = []

    async def ask() -> None:
        got.append(await local.get_token(manager))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(ask)
        await wait_until(lambda: refresher.entered == 1)
        assert got == []  # held at the gate with the refresh
        refresher.gate.set()
    assert got[0].access_token != first.access_token
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0
    await wait_until(lambda: waits.ended == 1)
    assert waits.waits == 1


async def test_off_by_default(driver: Driver, timed: Any, clock: FakeClock, make_manager: ManagerFactory) -> None:
    """Without refresh_ahead a token is refreshed only once inside its leeway: requests before it start nothing."""
    provider, server = timed
    refresher = gated(server)
    refresher.gate.set()
    manager = make_manager(refresher=refresher, clock=clock)
    local = Driver(driver.mode, server.url)
    first = await local.store(manager, provider.login())
    clock.advance(LIFETIME - 10.5)
    for _ in range(3):
        assert (await local.get_token(manager)).access_token == first.access_token
    assert refresher.entered == 0 and manager.footprint().flights == 0
    clock.advance(1)  # inside the leeway
    assert (await local.get_token(manager)).access_token != first.access_token
    assert provider.stats["refresh_ok"] == 1


async def test_idle_sessions_cost_nothing(
    driver: Driver, timed: Any, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """Cached sessions whose window opens with no request start no refresh: no timers, no jobs."""
    provider, server = timed
    refresher = gated(server)
    refresher.gate.set()
    manager = make_manager(refresher=refresher, clock=clock, refresh_ahead=20)
    local = Driver(driver.mode, server.url)
    for n in range(10):
        await local.store(manager, provider.login(), session=f"s{n}")
        await local.get_token(manager, session=f"s{n}")
    clock.advance(LIFETIME - 10.5)
    await anyio.sleep(0.05)  # a timer, had there been one, would have had its chance
    assert refresher.entered == 0 and manager.footprint().flights == 0
    await local.get_token(manager, session="s3")
    await wait_until(lambda: provider.stats["refresh_ok"] == 1)
    assert refresher.entered == 1


async def test_windows_are_jittered_across_sessions(
    driver: Driver, timed: Any, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """Sessions whose tokens have the same age start their refreshes at different moments within the window's
    last half (10..20 s before the leeway), one refresh each: a fleet does not refresh in step."""
    provider, server = timed
    refresher = gated(server)
    refresher.gate.set()
    manager = make_manager(refresher=refresher, clock=clock, refresh_ahead=20)
    local = Driver(driver.mode, server.url)
    sessions = [f"s{n}" for n in range(12)]
    for session in sessions:
        await local.store(manager, provider.login(), session=session)
        await local.get_token(manager, session=session)
    clock.advance(LIFETIME - 31)  # 1 s before the earliest possible start
    started_at: list[int] = []
    for step in range(12):
        before = refresher.entered
        for session in sessions:
            await local.get_token(manager, session=session)
        await wait_until(lambda: manager.footprint().flights == 0)
        started_at += [step] * (refresher.entered - before)
        clock.advance(1)
    assert len(started_at) == len(sessions)  # one refresh each
    assert 0 not in started_at and max(started_at) <= 11  # none before the window, all within it
    assert len(set(started_at)) >= 4  # spread over the window, not in one step
    assert provider.stats["refresh_ok"] == len(sessions) and provider.stats["refresh_reuse"] == 0


def test_refresh_ahead_is_checked(make_manager: ManagerFactory) -> None:
    """refresh_ahead must be a finite number of seconds, 0 or more."""
    for wrong in (-1, float("inf"), float("nan"), "60", True):
        with pytest.raises(ValueError, match="refresh_ahead"):
            make_manager(refresh_ahead=wrong)


# -- a fleet of workers on 2-second tokens, in real time --------------------------------------------------


FLEET = 20
RUN_FOR = 7.0  # seconds: three and a half lifetimes of a 2-second token


@pytest.mark.slow  # a soak run: 20 workers through several token lifetimes, per mode
@pytest.mark.parametrize("redeem_in", ["thread", "task"])
async def test_fleet_never_waits(driver: Driver, make_manager: ManagerFactory, redeem_in: str) -> None:
    """20 workers share one session with 2-second tokens for several lifetimes: no request waits on a refresh,
    every refresh presents a different refresh token (0 reuse, one per lifetime), and every request succeeds."""
    if redeem_in == "task" and driver.mode == "sync":
        pytest.skip("a blocking caller's job always runs in a thread; the thread case covers it")
    provider = LocalProvider(access_ttl=2)
    async with ServerThread(provider) as server:
        refresher = OAuth2Refresher(server.url + "/token", "test-client", "test-secret")
        waits = WaitCounter()
        manager = make_manager(refresher=refresher, refresh_ahead=1.0, redeem_in=redeem_in, on_event=waits)
        local = Driver(driver.mode, server.url)
        first = await local.store(manager, provider.login())
        statuses: list[int] = []
        auth = manager.auth("session-1")
        end = time.monotonic() + RUN_FOR

        def sync_worker() -> None:
            with httpx.Client(base_url=server.url, auth=auth, timeout=10, verify=SSL) as client:
                while time.monotonic() < end:
                    statuses.append(client.get("/api/me").status_code)
                    time.sleep(0.01)

        async def async_worker() -> None:
            async with httpx.AsyncClient(base_url=server.url, auth=auth, timeout=10, verify=SSL) as client:
                while time.monotonic() < end:
                    statuses.append((await client.get("/api/me")).status_code)
                    await anyio.sleep(0.01)

        async with anyio.create_task_group() as tasks:
            for _ in range(FLEET):
                if driver.mode == "sync":
                    tasks.start_soon(anyio.to_thread.run_sync, sync_worker)
                else:
                    tasks.start_soon(async_worker)
        await wait_until(lambda: manager.footprint().flights == 0)
        last = stored(manager)
        assert last is not None
        stats = provider.stats
        assert waits.waits == 0
        assert set(statuses) == {200} and stats["api_401"] == 0
        assert stats["refresh_reuse"] == 0 and stats["token_calls"] == stats["refresh_ok"]
        assert stats["refresh_ok"] == last.version - first.version  # each refresh saved once, none lost
        assert stats["refresh_ok"] >= RUN_FOR / 2  # at least one refresh per lifetime happened


async def test_a_background_refresh_refused_with_retry_after_waits_that_long(
    driver: Driver, timed: Any, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """A refresh ahead of expiry meets a 429 asking for 30 s: the still-valid token is served meanwhile, and no
    request makes another token request within those 30 s (retry_interval alone is 1 s)."""
    provider, server = timed
    waits = WaitCounter()
    refresher = OAuth2Refresher(server.url + "/token", "test-client", "test-secret")
    # A refresh_timeout too short to wait the Retry-After out inside the job: it gives up at once.
    manager = make_manager(
        refresher=refresher, clock=clock, refresh_ahead=20, retry_interval=1.0, refresh_timeout=1.5, on_event=waits
    )
    local = Driver(driver.mode, server.url)
    first = await local.store(manager, provider.login())
    clock.advance(LIFETIME - 10.5)  # inside the window, before the leeway
    provider.fail_next("429:30")
    assert (await local.get_token(manager)).access_token == first.access_token
    await wait_until(lambda: waits.ended == 1)
    assert provider.stats["token_calls"] == 1
    for _ in range(5):
        clock.advance(2.0)  # past retry_interval each time, never past the Retry-After
        assert (await local.get_token(manager)).access_token == first.access_token
    assert provider.stats["token_calls"] == 1


async def test_refreshes_ahead_are_bounded_per_manager(
    driver: Driver, timed: Any, clock: FakeClock, make_manager: ManagerFactory
) -> None:
    """Forty sessions inside their windows at once: sixteen refreshes start in the background, held at the
    gate, and every request is still served its valid token without starting more. Once they land, later
    requests start the rest; each session is refreshed once, none reused."""
    provider, server = timed
    refresher = gated(server)
    manager = make_manager(refresher=refresher, clock=clock, refresh_ahead=20)
    local = Driver(driver.mode, server.url)
    sessions = [f"s{i}" for i in range(40)]
    logins = {session: await local.store(manager, provider.login(), session) for session in sessions}
    clock.advance(LIFETIME - 10.5)  # inside every window, before the leeway
    for session in sessions:
        assert (await local.get_token(manager, session)).access_token == logins[session].access_token
    await wait_until(lambda: refresher.entered == MAX_AHEAD_FLIGHTS)
    assert manager.footprint().flights == MAX_AHEAD_FLIGHTS
    refresher.gate.set()
    await wait_until(lambda: manager.footprint().flights == 0)
    for _ in range(3):
        for session in sessions:
            await local.get_token(manager, session)
        await wait_until(lambda: manager.footprint().flights == 0)
    assert refresher.entered == len(sessions)
    assert provider.stats["refresh_ok"] == len(sessions) and provider.stats["refresh_reuse"] == 0
