"""The tracing seam (issue 15): structured events to stdlib logging and to ``on_event``, and ``on_refresh`` for
apps that mirror tokens, over real HTTP against the LocalProvider.

Every assertion is a count, an order or a state; waits are bounded, never timed.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from typing import Any

import anyio
import httpx
import pytest
from support import (
    SESSION,
    SSL,
    Driver,
    FakeClock,
    ManagerFactory,
    ScriptedAPI,
    aput_entry,
    astored,
    expired,
    fail_refresh,
    put_entry,
    stored,
    wait_until,
)

from httpx_upstream_auth import (
    MemoryStorage,
    RefreshFailed,
    TokenManager,
    TraceEvent,
    UpstreamAuthError,
    UpstreamTokens,
)
from httpx_upstream_auth._async._manager import MAX_RETRIES
from httpx_upstream_auth.testing import LocalProvider, ServerThread

pytestmark = pytest.mark.anyio


class Recorder:
    """Collects events and on_refresh calls from whatever thread or task the manager calls them in."""

    def __init__(self) -> None:
        self.events: list[TraceEvent] = []
        self.refreshed: list[tuple[str, UpstreamTokens]] = []
        self._lock = threading.Lock()

    def on_event(self, event: TraceEvent) -> None:
        with self._lock:
            self.events.append(event)

    def on_refresh(self, session_id: str, tokens: UpstreamTokens) -> None:
        with self._lock:
            self.refreshed.append((session_id, tokens))

    def names(self) -> list[str]:
        """The event names so far, in order."""
        with self._lock:
            return [event.name for event in self.events]

    def named(self, name: str) -> list[TraceEvent]:
        """The events called ``name``."""
        with self._lock:
            return [event for event in self.events if event.name == name]


def hooked(make_manager: ManagerFactory, recorder: Recorder, **kwargs: Any) -> TokenManager:
    """A manager reporting to ``recorder``."""
    return make_manager(on_event=recorder.on_event, on_refresh=recorder.on_refresh, **kwargs)


async def test_refresh_reports_start_success_and_mirrors_tokens(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An expired token's refresh: refresh.started (reason expired), then refresh.succeeded with no retries;
    on_refresh gets the session id and the tokens as saved; the log names tokens only by a short hash."""
    recorder = Recorder()
    manager = hooked(make_manager, recorder)
    entry = put_entry(manager, expired(provider.login()))
    with caplog.at_level(logging.DEBUG, logger="httpx_upstream_auth.events"):
        assert (await driver.request(manager)).status_code == 200
        await wait_until(lambda: "refresh.succeeded" in recorder.names())
    assert recorder.names() == ["refresh.started", "refresh.succeeded"]
    started, succeeded = recorder.events
    assert started.fields["reason"] == "expired" and started.fields["version"] == entry.version
    assert started.session_id == SESSION and started.session is not None and SESSION not in repr(started)
    assert succeeded.fields["retries"] == 0 and succeeded.fields["version"] == entry.version + 1
    assert recorder.refreshed == [(SESSION, stored(manager))]
    new = stored(manager)
    assert new is not None and new.refresh_token is not None
    logged = caplog.text
    assert "refresh.started" in logged and "refresh.succeeded" in logged
    for secret in (entry.access_token, entry.refresh_token, new.access_token, new.refresh_token):
        assert secret is not None and secret not in logged
    token_hash = succeeded.fields["access_token_hash"]
    assert isinstance(token_hash, str) and token_hash in logged
    assert provider.stats["refresh_ok"] == 1


async def test_failure_reports_retries_and_is_remembered(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A provider answering 503 to every attempt: refresh.failed with the job's retries, then
    failure.remembered; on_refresh is not called; a second caller is answered from memory with no new events
    of a refresh."""
    recorder = Recorder()
    manager = hooked(make_manager, recorder)
    put_entry(manager, expired(provider.login()))
    fail_refresh(provider, "503")
    with pytest.raises(RefreshFailed):
        await driver.get_token(manager)
    await wait_until(lambda: "refresh.failed" in recorder.names())
    assert recorder.names() == ["refresh.started", "failure.remembered", "refresh.failed"]
    failed = recorder.named("refresh.failed")[0]
    assert failed.fields["retries"] == MAX_RETRIES and failed.fields["error"] == "RefreshFailed"
    assert failed.fields["served_stale"] is False
    with pytest.raises(RefreshFailed):
        await driver.get_token(manager)
    assert len(recorder.named("refresh.started")) == 1 and recorder.refreshed == []
    assert provider.stats["token_calls"] == 1 + MAX_RETRIES


async def test_replay_after_401_is_reported(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A token the API revoked: the 401 is followed by a refresh (reason rejected) and a reported replay."""
    recorder = Recorder()
    manager = hooked(make_manager, recorder)
    first = await driver.store(manager, provider.login())
    provider.revoke_access(first.access_token)
    assert (await driver.request(manager)).status_code == 200
    await wait_until(lambda: "refresh.succeeded" in recorder.names())
    # The job reports after publishing its outcome, so the caller's replay may be reported before it.
    assert recorder.names()[0] == "refresh.started"
    assert sorted(recorder.names()[1:]) == ["refresh.succeeded", "replayed"]
    assert recorder.named("refresh.started")[0].fields["reason"] == "rejected"
    assert provider.stats["api_401"] == 1 and provider.stats["api_ok"] == 1


async def test_refresh_ahead_is_reported(driver: Driver, make_manager: ManagerFactory) -> None:
    """A request inside the refresh-ahead window: refresh_ahead.started, then a refresh whose reason is ahead."""
    clock = FakeClock(1_800_000_000.0)
    provider = LocalProvider(clock=clock, access_ttl=100)
    from httpx_upstream_auth import OAuth2Refresher
    from httpx_upstream_auth.testing import ServerThread

    async with ServerThread(provider) as server:
        recorder = Recorder()
        refresher = OAuth2Refresher(server.url + "/token", "test-client", "test-secret")
        manager = hooked(make_manager, recorder, refresher=refresher, clock=clock, refresh_ahead=20)
        local = Driver(driver.mode, server.url)
        await local.store(manager, provider.login())
        await local.get_token(manager)
        clock.advance(100 - 10.5)
        await local.get_token(manager)
        await wait_until(lambda: "refresh.succeeded" in recorder.names())
    assert recorder.names()[0] == "refresh_ahead.started" or recorder.names()[:2] == [
        "refresh.started",
        "refresh_ahead.started",
    ]  # the job may start before the caller reports it
    assert recorder.named("refresh.started")[0].fields["reason"] == "ahead"
    assert len(recorder.refreshed) == 1


async def test_change_notice_is_reported(driver: Driver, provider: LocalProvider, make_manager: ManagerFactory) -> None:
    """Another manager on the same storage refreshes a session this one has cached: a change notice naming it."""
    recorder = Recorder()
    manager = hooked(make_manager, recorder)
    other = make_manager(storage=manager.storage)
    await driver.store(manager, provider.login())
    await driver.get_token(manager)
    recorder.events.clear()
    await driver.store(other, provider.login())
    await wait_until(lambda: "change.notice" in recorder.names())
    notice = recorder.named("change.notice")[0]
    assert notice.session_id == SESSION and notice.fields["sessions"] == 1


async def test_hooks_that_raise_break_nothing(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Hooks that raise are logged at ERROR and ignored: the refresh is saved, the request succeeds."""

    def broken(*args: object) -> None:
        raise RuntimeError("hook bug")

    manager = make_manager(on_event=broken, on_refresh=broken)
    put_entry(manager, expired(provider.login()))
    with caplog.at_level(logging.ERROR, logger="httpx_upstream_auth.events"):
        assert (await driver.request(manager)).status_code == 200
        await wait_until(lambda: caplog.text.count("hook") >= 3)  # started, succeeded, on_refresh
    assert "hook bug" in caplog.text
    assert provider.stats["refresh_ok"] == 1 and (stored(manager) or expired(provider.login())).version == 2


async def test_hooks_run_outside_the_managers_locks(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A hook may call back into the manager (footprint, a cached get_token) without deadlocking: no lock of
    the manager is held while it runs, and the refresh it reports has been published."""
    seen: list[str] = []
    holder: list[TokenManager] = []

    def on_refresh(session_id: str, tokens: UpstreamTokens) -> None:
        manager = holder[0]
        assert manager.footprint().flights == 0  # published before the hook runs
        seen.append(manager.get_token(session_id).access_token)

    manager = make_manager(on_refresh=on_refresh)
    holder.append(manager)
    put_entry(manager, expired(provider.login()))
    token = await driver.get_token(manager)
    await wait_until(lambda: len(seen) == 1)
    assert seen == [token.access_token]


def test_no_listener_no_event_objects(
    provider: LocalProvider, make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no hook, the events logger above WARNING and no OpenTelemetry, no event object is ever built."""
    monkeypatch.setattr("httpx_upstream_auth._otel.AVAILABLE", False)
    built: list[object] = []
    original = TraceEvent.__init__

    def counting(self: TraceEvent, *args: Any, **kwargs: Any) -> None:
        built.append(args)
        original(self, *args, **kwargs)

    monkeypatch.setattr(TraceEvent, "__init__", counting)
    logging.getLogger("httpx_upstream_auth.events").setLevel(logging.ERROR)
    try:
        manager = make_manager()
        put_entry(manager, expired(provider.login()))
        manager.get_token(SESSION)
        fail_refresh(provider, "503")
        put_entry(manager, expired(provider.login()))
        with pytest.raises(RefreshFailed):
            manager.get_token(SESSION)
    finally:
        logging.getLogger("httpx_upstream_auth.events").setLevel(logging.NOTSET)
    assert built == []
    assert provider.stats["refresh_ok"] == 1


async def test_a_distrust_is_reported_with_the_tokens_hash_only(
    provider: LocalProvider, make_manager: ManagerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The API refuses the token, then refuses the refreshed one on its replay: replayed, then distrusted (at
    WARNING on the events logger), each naming the refreshed token by its short hash, never by the token."""
    recorder = Recorder()
    manager = hooked(make_manager, recorder)
    first = await aput_entry(manager, provider.login())
    api = ScriptedAPI([401, 401])
    with caplog.at_level(logging.WARNING, logger="httpx_upstream_auth.events"):
        async with (
            ServerThread(api) as served,
            httpx.AsyncClient(base_url=served.url, auth=manager.auth(SESSION), verify=SSL) as client,
        ):
            assert (await client.get("/data")).status_code == 401
    fresh = await astored(manager)
    assert fresh is not None and fresh.version == first.version + 1
    await wait_until(lambda: "refresh.succeeded" in recorder.names())
    assert [name for name in recorder.names() if name in ("replayed", "distrusted")] == ["replayed", "distrusted"]
    distrusted = recorder.named("distrusted")[0]
    assert distrusted.fields == {"access_token_hash": recorder.named("replayed")[0].fields["access_token_hash"]}
    assert distrusted.session_id == SESSION
    assert api.seen == [first.authorization, fresh.authorization]
    warned = [r for r in caplog.records if r.name == "httpx_upstream_auth.events" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "distrusted" in warned[0].getMessage()
    for secret in (first.access_token, fresh.access_token, fresh.refresh_token):
        assert secret is not None and secret not in caplog.text and secret not in repr(distrusted)
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


def test_a_hook_that_blocks_the_job_past_its_lease_never_leads_to_a_second_presentation(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A task job's refresh.started hook blocks its event loop longer than lease_ttl, so the lease keeper cannot
    renew and the lease lapses; another manager on the same store takes it and refreshes. The blocked job then
    finds the lease gone at its last check and sends nothing: one refresh, no refresh token presented twice.
    (A sync test: the hook blocks its loop on purpose.)"""
    storage = MemoryStorage()
    started = threading.Event()

    def blocking_hook(event: TraceEvent) -> None:
        if event.name == "refresh.started" and not started.is_set():
            started.set()
            time.sleep(1.5)  # a blocking call in a hook: mirroring state over sync HTTP, say

    first = make_manager(storage=storage, redeem_in="task", refresh_timeout=5.0, lease_ttl=0.5, on_event=blocking_hook)
    second = make_manager(storage=storage, refresh_timeout=5.0, lease_ttl=0.5, lease_wait=30, wait_timeout=40)
    first.store(SESSION, expired(provider.login()))
    results: dict[str, object] = {}

    def other_worker() -> None:
        started.wait(10)
        results["second"] = second.get_token(SESSION)

    worker = threading.Thread(target=other_worker)
    worker.start()

    async def blocked_job() -> None:
        try:
            results["first"] = await first.aget_token(SESSION)
        except UpstreamAuthError as exc:
            results["first"] = exc

    anyio.run(blocked_job)
    worker.join(60)
    assert isinstance(results["second"], UpstreamTokens)
    assert provider.stats["refresh_reuse"] == 0 and provider.stats["refresh_ok"] == 1


def test_a_hook_that_calls_the_manager_back_for_the_same_session_fails_at_once(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """An on_event hook, called by the refresh job's thread, asks the manager for the token of the session
    being refreshed: that would wait for the very job that calls it, so it fails at once (no wait of
    wait_timeout with the lease held), and the refresh goes on."""
    seen: list[BaseException] = []
    manager: TokenManager

    def calling_back(event: TraceEvent) -> None:
        if event.name == "refresh.started" and not seen:
            try:
                manager.get_token(SESSION)
            except BaseException as exc:  # what the hook met is the test's evidence
                seen.append(exc)

    manager = make_manager(on_event=calling_back, wait_timeout=30)
    put_entry(manager, expired(provider.login()))
    fresh = manager.get_token(SESSION)
    assert len(seen) == 1 and isinstance(seen[0], RuntimeError) and "hook" in str(seen[0])
    assert stored(manager) == fresh
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


def test_nothing_reaches_stderr_until_the_application_configures_logging() -> None:
    """A refresh failure (a WARNING event) in a program that never configured logging prints nothing: the
    package's logger has a NullHandler, so Python's last-resort handler stays silent."""
    program = """
import attrs
import httpx_upstream_auth as hua
from httpx_upstream_auth.testing import LocalProvider, ServerThread
provider = LocalProvider()
with ServerThread(provider) as server:
    manager = hua.TokenManager(provider_id="local", storage=hua.MemoryStorage(),
        refresher=hua.OAuth2Refresher(server.url + "/token", "test-client", "test-secret"))
    tokens = provider.login()
    manager.store("s", attrs.evolve(tokens, expires_at=1_000_000_000.0, issued_at=999_999_000.0))
    provider.fail_next("invalid_client")
    try:
        manager.get_token("s")
    except hua.ConfigurationError:
        print("failed as expected")
    manager.close()
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "failed as expected" and done.stderr == ""
