"""Edges of the manager's core and coordinators: table bounds, memories that end, races between callers and
jobs, and callers that give up on a flight, each driven deterministically (gates the test opens, the injected
clock) over real HTTP against the local provider."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import attrs
import httpx
import pytest
from support import (
    SESSION,
    SSL,
    WAIT_LIMIT,
    FakeClock,
    HeldLeaseStorage,
    ManagerFactory,
    ScriptedAPI,
    UnnotifiedStorage,
    aput_entry,
    astored,
    expired,
    put_entry,
    stored,
    wait_until,
)

from httpx_upstream_auth import (
    Clock,
    ConfigurationError,
    EntryKey,
    Lease,
    MemoryStorage,
    OAuth2Refresher,
    ReauthenticationRequired,
    RefreshFailed,
    StorageError,
    TraceEvent,
    UpstreamAuthError,
    UpstreamTokens,
)
from httpx_upstream_auth.testing import LocalProvider, ServerThread

pytestmark = pytest.mark.anyio


# -- tables stay within cache_size -------------------------------------------------------------------------


async def test_dead_refresh_tokens_are_remembered_for_cache_size_sessions(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """Refresh tokens the provider called dead (invalid_grant) are remembered for at most cache_size sessions:
    the oldest is forgotten first."""
    manager = make_manager(cache_size=1)
    for session in ("a", "b"):
        await aput_entry(manager, attrs.evolve(expired(provider.login()), refresh_token=f"dead-{session}"), session)
        with pytest.raises(ReauthenticationRequired):
            await manager.aget_token(session)
    assert provider.stats["invalid_grant"] == 2
    assert manager.footprint().consumed == 1


async def test_distrusted_tokens_are_kept_for_cache_size_sessions(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """Tokens the API refused right after their refresh are distrusted for at most cache_size sessions: the
    oldest distrust goes first."""
    manager = make_manager(cache_size=1)
    api = ScriptedAPI([401, 401] * 2)  # each session: its token refused, then the refreshed one too
    async with ServerThread(api) as served:
        for session in ("a", "b"):
            await aput_entry(manager, provider.login(), session)
            async with httpx.AsyncClient(base_url=served.url, auth=manager.auth(session), verify=SSL) as client:
                assert (await client.get("/data")).status_code == 401
            assert manager.footprint().distrusted == 1
    assert provider.stats["refresh_ok"] == 2


async def test_a_distrust_that_ended_goes_before_the_oldest(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """Beyond cache_size, a distrust whose token expired goes first: an older distrust of a token still valid
    is kept, and that token's next refusal costs no refresh."""
    clock = FakeClock()
    manager = make_manager(cache_size=2, clock=clock)
    api = ScriptedAPI([401, 401] * 3 + [401])
    async with ServerThread(api) as served:
        for session, lifetime in (("a", 600), ("b", 30), ("c", 600)):
            await aput_entry(manager, provider.login(), session)
            provider.fail_next(f"expires_in:{lifetime}")  # the refreshed token's lifetime: its distrust's
            async with httpx.AsyncClient(base_url=served.url, auth=manager.auth(session), verify=SSL) as client:
                assert (await client.get("/data")).status_code == 401
            if session == "b":
                clock.advance(40)  # b's refreshed token, and its distrust, are over; a's are not
        assert manager.footprint().distrusted == 2 and provider.stats["refresh_ok"] == 3
        async with httpx.AsyncClient(base_url=served.url, auth=manager.auth("a"), verify=SSL) as client:
            assert (await client.get("/data")).status_code == 401  # still distrusted: no refresh
    assert provider.stats["token_calls"] == 3


async def test_failures_are_remembered_for_cache_size_sessions_expired_ones_first(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """When more sessions fail than cache_size, a remembered failure whose window ended goes first, not the
    oldest one: a session the provider asked to wait (Retry-After) still gets its failure without a request."""
    clock = FakeClock()
    manager = make_manager(cache_size=2, clock=clock, failure_window=5)
    for session, fault in (("a", "429:60"), ("b", "invalid_scope"), ("c", "invalid_scope")):
        await aput_entry(manager, expired(provider.login()), session)
        provider.fail_next(fault)
        with pytest.raises(RefreshFailed):
            await manager.aget_token(session)
        if session == "b":
            clock.advance(6)  # b's window ends, a's (60 s) goes on
    assert manager.footprint().failing == 2
    with pytest.raises(RefreshFailed) as caught:
        await manager.aget_token("a")
    assert caught.value.retry_after is not None and caught.value.retry_after <= 54
    assert provider.stats["token_calls"] == 3


async def test_sessions_with_work_in_progress_keep_their_epochs_beyond_the_bound(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """Sessions whose refreshes run are never trimmed from the epoch and digest tables, even beyond twice
    cache_size (a notice about them must not be missed); the tables shrink back once the work ended."""
    storage = GatedLeaseStorage()
    manager = make_manager(storage=storage, cache_size=1)
    sessions = ["a", "b", "c"]
    for session in sessions:
        await aput_entry(manager, expired(provider.login()), session)
    got: dict[str, UpstreamTokens] = {}

    async def get(session: str) -> None:
        got[session] = await manager.aget_token(session)

    try:
        async with anyio.create_task_group() as group:
            for session in sessions:
                group.start_soon(get, session)
            await wait_until(lambda: storage.waiting == 3)
            footprint = manager.footprint()
            assert footprint.flights == 3 and footprint.epochs == 3 and footprint.digests == 3
            storage.gate.set()
    finally:
        storage.gate.set()
    assert sorted(got) == sessions and provider.stats["refresh_ok"] == 3
    await aput_entry(manager, expired(provider.login()), "d")
    with pytest.raises(ReauthenticationRequired):
        await manager.aget_token("nobody")  # a session not in use: the tables are trimmed again
    assert manager.footprint().epochs == 2


class GatedLeaseStorage(MemoryStorage):
    """A MemoryStorage whose lease claims wait (in the refresh jobs' threads) until the test opens ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = 0
        self._count = threading.Lock()

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        with self._count:
            self.waiting += 1
        assert self.gate.wait(WAIT_LIMIT)
        return super().acquire_lease(key, ttl)


# -- memories that end --------------------------------------------------------------------------------


async def test_an_early_refresh_is_tried_again_once_its_pause_ends(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A still-valid token whose early refresh failed harmlessly is served without a token request during
    retry_interval, and refreshed by the first request after it."""
    clock = FakeClock()
    manager = make_manager(clock=clock, retry_interval=1.0, failure_window=0)
    login = provider.login(access_ttl=20)
    assert login.expires_at is not None
    early = await aput_entry(manager, attrs.evolve(login, issued_at=login.expires_at - 600))  # inside its leeway
    provider.fail_next("503")
    assert (await manager.aget_token(SESSION)).access_token == early.access_token
    assert (await manager.aget_token(SESSION)).access_token == early.access_token  # backing off: no request
    assert provider.stats["token_calls"] == 1
    clock.advance(1.5)
    assert (await manager.aget_token(SESSION)).version == early.version + 1
    assert provider.stats["token_calls"] == 2 and provider.stats["refresh_ok"] == 1


@pytest.mark.parametrize("fault", ["invalid_client", "invalid_scope"])
async def test_a_remembered_failure_ends_with_its_window(
    provider: LocalProvider, make_manager: ManagerFactory, fault: str
) -> None:
    """A remembered failure, the manager's (a wrong client secret) or the session's (a refused scope), answers
    callers without a token request during failure_window; the first call after it asks the provider again."""
    clock = FakeClock()
    manager = make_manager(clock=clock, failure_window=5)
    await aput_entry(manager, expired(provider.login()))
    provider.fail_next(fault)
    for _ in range(2):
        with pytest.raises(ConfigurationError):
            await manager.aget_token(SESSION)
    assert provider.stats["token_calls"] == 1 and manager.footprint().failing == 1
    clock.advance(6)
    assert (await manager.aget_token(SESSION)).access_token is not None
    assert provider.stats["token_calls"] == 2 and manager.footprint().failing == 0


# -- races between callers and jobs -------------------------------------------------------------------------


class GatedReadStorage(UnnotifiedStorage):
    """An UnnotifiedStorage (another process's writes arrive unannounced) whose read number ``hold_at`` waits
    until the test opens ``gate``: before reading, or after it (``after``)."""

    blocking = True  # the async reads run in worker threads: a held read does not hold the event loop

    def __init__(self, *, after: bool = False) -> None:
        super().__init__()
        self.hold_at = 0
        self.after = after
        self.gate = threading.Event()
        self.reads = 0
        self.held = threading.Event()
        self._count = threading.Lock()

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        with self._count:
            self.reads += 1
            hold = self.reads == self.hold_at
        if hold and not self.after:
            self.held.set()
            assert self.gate.wait(WAIT_LIMIT)
        found = super().get(key)
        if hold and self.after:
            self.held.set()
            assert self.gate.wait(WAIT_LIMIT)
        return found


async def test_a_forced_refresh_joining_a_flight_that_ends_with_its_token_starts_another(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A forced refresh joins the refresh already under way; when that one ends with the very token the forced
    one replaces (another worker stored it meanwhile), the caller waits for a refresh of its own."""
    storage = GatedReadStorage()
    manager = make_manager(storage=storage)
    await aput_entry(manager, expired(provider.login()))
    storage.reads, storage.hold_at = 0, 2  # read 1: the caller's; read 2: its refresh job's
    got: dict[str, UpstreamTokens] = {}

    async def expiry() -> None:
        got["expiry"] = await manager.aget_token(SESSION)

    async def forced() -> None:
        got["forced"] = await manager.arefresh(SESSION)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(expiry)
            await anyio.to_thread.run_sync(storage.held.wait, WAIT_LIMIT)
            theirs = await aput_entry(manager, provider.login())  # another worker's refresh, unannounced
            group.start_soon(forced)
            await wait_until(lambda: manager.footprint().waiting == 2)
            storage.gate.set()
    finally:
        storage.gate.set()
    assert got["expiry"].access_token == theirs.access_token
    assert got["forced"].version == theirs.version + 1
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_a_caller_tired_of_waiting_for_a_shared_read_reads_itself_and_keeps_the_newest(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A caller that waited wait_timeout for another caller's slow read reads the entry itself and caches it;
    the slow read, ending later with an older version, does not replace it in the cache."""
    storage = GatedReadStorage(after=True)
    manager = make_manager(storage=storage, wait_timeout=0.2)
    first = await aput_entry(manager, provider.login())
    storage.reads, storage.hold_at = 0, 1
    got: dict[str, UpstreamTokens] = {}

    async def slow() -> None:
        got["slow"] = await manager.aget_token(SESSION)

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(slow)
            await anyio.to_thread.run_sync(storage.held.wait, WAIT_LIMIT)
            newer = await aput_entry(manager, provider.login())  # another worker's login, unannounced
            got["tired"] = await manager.aget_token(SESSION)
            storage.gate.set()
    finally:
        storage.gate.set()
    assert got["slow"].version == first.version and got["tired"].version == newer.version
    reads = storage.reads
    assert (await manager.aget_token(SESSION)).version == newer.version
    assert storage.reads == reads  # served from the cache, which kept the newer entry


class ChangingStorage(MemoryStorage):
    """A MemoryStorage where another worker writes the entry again right after every read (``on_read``) or
    every lease attempt, holding the lease (``on_lease``)."""

    def __init__(self, *, on_read: bool = False, on_lease: bool = False) -> None:
        super().__init__()
        self.on_read = on_read
        self.on_lease = on_lease
        self.reads = 0
        self.lease_attempts = 0

    def _write_again(self, key: EntryKey) -> None:
        current = super().get(key)
        assert current is not None
        assert self.put(key, attrs.evolve(current, version=current.version + 1), expected_version=current.version)

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        found = super().get(key)
        self.reads += 1
        if self.on_read and found is not None:
            self._write_again(key)
        return found

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        self.lease_attempts += 1
        if self.on_lease:
            self._write_again(key)
            return None
        return super().acquire_lease(key, ttl)


async def test_an_entry_that_changes_at_every_read_gives_up_after_a_bounded_number(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """An entry that another worker rewrites after every read is read a bounded number of times (each read is
    older than the change notice that follows it), then the caller gets a StorageError telling it to retry."""
    storage = ChangingStorage()
    manager = make_manager(storage=storage)
    await aput_entry(manager, provider.login())
    storage.on_read, storage.reads = True, 0
    with pytest.raises(StorageError, match="kept changing while reading"):
        await manager.aget_token(SESSION)
    assert storage.reads == 8


async def test_an_entry_that_changes_during_every_refresh_gives_up_after_a_bounded_number(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """While another worker holds the lease and rewrites the entry during every refresh this process starts, the
    caller joins a bounded number of refreshes (each ended for a version it no longer wants), then gets a
    retryable RefreshFailed; no token request is sent."""
    storage = ChangingStorage()
    manager = make_manager(storage=storage, lease_wait=0)
    await aput_entry(manager, expired(provider.login()))
    storage.on_lease = True
    with pytest.raises(RefreshFailed, match="kept changing during the refresh") as caught:
        await manager.aget_token(SESSION)
    assert caught.value.retryable
    assert storage.lease_attempts == 8 and provider.stats["token_calls"] == 0


class RotatedMeanwhileRefresher(OAuth2Refresher):
    """An OAuth2Refresher during whose token request another worker saves a new entry (``theirs``) for the
    session: the provider then refuses the token this one presents (it never issued it)."""

    def __init__(self, token_url: str, storage: MemoryStorage) -> None:
        super().__init__(token_url, "test-client", "test-secret")
        self.storage = storage
        self.theirs: UpstreamTokens | None = None

    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        assert self.theirs is not None
        key = EntryKey("local", SESSION)
        await anyio.to_thread.run_sync(
            lambda: self.storage.put(key, self.theirs, expected_version=tokens.version)  # type: ignore[arg-type]
        )
        return await super().arefresh(tokens, clock)


async def test_invalid_grant_after_another_worker_rotated_serves_its_tokens_in_a_task_job(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """A task job whose refresh token is refused as dead while another worker saved a new entry meanwhile
    serves that entry: nothing is removed, and the refused token is not remembered as this session's."""
    storage = MemoryStorage()
    refresher = RotatedMeanwhileRefresher(token_url, storage)
    manager = make_manager(storage=storage, refresher=refresher, redeem_in="task")
    mine = await aput_entry(manager, attrs.evolve(expired(provider.login()), refresh_token="already-rotated"))
    refresher.theirs = attrs.evolve(provider.login(), version=mine.version + 1)
    assert (await manager.aget_token(SESSION)).access_token == refresher.theirs.access_token
    assert provider.stats["invalid_grant"] == 1 and provider.stats["refresh_ok"] == 0
    assert (await astored(manager)) == refresher.theirs
    assert manager.footprint().consumed == 0


class ExitingRefresher(OAuth2Refresher):
    """An OAuth2Refresher that sends the request, then calls sys.exit() in the refresh job's thread."""

    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        super().refresh(tokens, clock)
        raise SystemExit(3)


# The refresher's SystemExit goes on to end the job's thread, as Python's default thread hook does quietly; pytest's
# hook reports every exception that ends a thread.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_refresher_that_exits_its_thread_after_sending_fails_closed(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """A refresher that ends the job's thread (SystemExit) after its request may have been redeemed: the job
    removes the entry before the thread ends, so the consumed token is never presented again."""
    # Events are reported from the job's thread: the test joins it, so its exit is reported while the test runs.
    jobs: list[threading.Thread] = []

    def on_event(event: TraceEvent) -> None:
        if event.name == "refresh.started":
            jobs.append(threading.current_thread())

    refresher = ExitingRefresher(token_url, "test-client", "test-secret")
    manager = make_manager(refresher=refresher, on_event=on_event)
    put_entry(manager, expired(provider.login()))
    with pytest.raises(ReauthenticationRequired):
        manager.get_token(SESSION)
    assert len(jobs) == 1
    jobs[0].join(WAIT_LIMIT)
    assert stored(manager) is None
    assert provider.stats["refresh_ok"] == 1 and provider.stats["token_calls"] == 1
    assert manager.footprint().consumed == 0


# -- task jobs: the async source of the job ---------------------------------------------------------------


async def test_a_task_job_retries_a_refusal_after_its_retry_after(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A task job refused with 429 and a Retry-After (here 0 s) while no valid token could be served instead
    tries again, not sooner than asked, and reports the retry."""
    events: list[TraceEvent] = []
    manager = make_manager(redeem_in="task", on_event=events.append)
    first = await aput_entry(manager, expired(provider.login()))
    provider.fail_next("429:0")
    assert (await manager.aget_token(SESSION)).version == first.version + 1
    assert provider.stats["token_calls"] == 2 and provider.stats["refresh_ok"] == 1
    succeeded = [event for event in events if event.name == "refresh.succeeded"]
    assert len(succeeded) == 1 and succeeded[0].fields["retries"] == 1


async def test_a_task_job_serves_a_valid_token_another_worker_stored_without_a_refresh_token(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """After the API refused the cached token, a task job that finds another worker's token in the store, still
    valid though inside its leeway and without a refresh token, sends the request with it: nothing to redeem."""
    storage = UnnotifiedStorage()
    manager = make_manager(storage=storage, redeem_in="task")
    await aput_entry(manager, provider.login())
    await manager.aget_token(SESSION)  # cached
    login = provider.login(access_ttl=20)
    assert login.expires_at is not None
    theirs = await aput_entry(manager, attrs.evolve(login, issued_at=login.expires_at - 600, refresh_token=None))
    api = ScriptedAPI([401])
    async with (
        ServerThread(api) as served,
        httpx.AsyncClient(base_url=served.url, auth=manager.auth(SESSION), verify=SSL) as client,
    ):
        assert (await client.get("/data")).status_code == 200
    assert api.seen[-1] == f"Bearer {theirs.access_token}"
    assert provider.stats["token_calls"] == 0


class PreparingRefresher(OAuth2Refresher):
    """An OAuth2Refresher whose preparation (before the lease and the token request) does what ``outcome`` says:
    nothing, hang, or raise."""

    def __init__(self, token_url: str, outcome: str) -> None:
        super().__init__(token_url, "test-client", "test-secret")
        self.outcome = outcome
        self.prepared = 0

    async def aprepare(self, tokens: UpstreamTokens) -> None:
        self.prepared += 1
        if self.outcome == "hangs":
            await anyio.sleep_forever()
        failures: dict[str, Exception] = {
            "refused": RefreshFailed("discovery refused", retryable=True),
            "misconfigured": ConfigurationError("no such issuer", setting="issuer"),
            "store_down": StorageError("the store is down"),
            "bug": ValueError("a bug"),
        }
        if self.outcome in failures:
            raise failures[self.outcome]


@pytest.mark.parametrize(
    ("outcome", "raised", "message"),
    [
        ("hangs", RefreshFailed, "did not finish in time"),
        ("refused", RefreshFailed, "discovery refused"),
        ("misconfigured", ConfigurationError, "no such issuer"),
        ("store_down", StorageError, "the store is down"),
        ("bug", RefreshFailed, r"preparation failed \(ValueError\)"),
    ],
)
async def test_a_task_jobs_preparation_that_fails_sends_nothing(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str, outcome: str, raised: type, message: str
) -> None:
    """A task job whose refresher's preparation fails, hangs (bounded by refresh_timeout) or raises a bug sends
    no token request and keeps the entry; the caller gets a typed error, remembered like a refusal (a
    configuration error for every session)."""
    refresher = PreparingRefresher(token_url, outcome)
    manager = make_manager(refresher=refresher, redeem_in="task", refresh_timeout=0.2, failure_window=5)
    first = await aput_entry(manager, expired(provider.login()))
    with pytest.raises(raised, match=message):
        await manager.aget_token(SESSION)
    assert (await astored(manager)) == first and provider.stats["token_calls"] == 0
    await aput_entry(manager, expired(provider.login()), "other")
    with pytest.raises(UpstreamAuthError):
        await manager.aget_token("other")
    # A configuration error is the manager's: the other session gets it without preparing again.
    assert refresher.prepared == (1 if outcome == "misconfigured" else 2)


@pytest.mark.parametrize("outcome", ["nothing", "refused", "misconfigured"])
async def test_a_task_jobs_preparation_before_an_early_refresh(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str, outcome: str
) -> None:
    """A task job prepares, then refreshes; when the preparation of an early refresh fails, the still-valid
    token is served and the refresh is tried again only after retry_interval. A configuration error is
    remembered for the manager all the same: another session's refresh gets it without preparing."""
    refresher = PreparingRefresher(token_url, outcome)
    manager = make_manager(refresher=refresher, redeem_in="task", retry_interval=60)
    login = provider.login(access_ttl=20)
    assert login.expires_at is not None
    early = await aput_entry(manager, attrs.evolve(login, issued_at=login.expires_at - 600))  # inside its leeway
    for _ in range(2):
        got = await manager.aget_token(SESSION)
    if outcome == "nothing":
        assert got.version == early.version + 1 and provider.stats["refresh_ok"] == 1
        return
    assert got == early and provider.stats["token_calls"] == 0 and refresher.prepared == 1
    if outcome == "misconfigured":
        await aput_entry(manager, expired(provider.login()), "other")
        with pytest.raises(ConfigurationError):
            await manager.aget_token("other")
        assert refresher.prepared == 1


class BuggyLeaseStorage(MemoryStorage):
    """A custom storage whose lease claim has a bug (raises an exception that is not a StorageError)."""

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        raise KeyError("a bug in the storage")


async def test_a_storage_bug_in_a_task_job_is_a_typed_retryable_failure(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A custom storage that raises an unexpected exception during a task job: the caller gets a retryable
    RefreshFailed naming the exception's type only, a store.error event reports it, and nothing is sent."""
    events: list[TraceEvent] = []
    manager = make_manager(storage=BuggyLeaseStorage(), redeem_in="task", on_event=events.append)
    await aput_entry(manager, expired(provider.login()))
    with pytest.raises(RefreshFailed, match="KeyError from the storage") as caught:
        await manager.aget_token(SESSION)
    assert caught.value.retryable and "a bug" not in str(caught.value)
    errors = [event.fields for event in events if event.name == "store.error"]
    assert errors == [{"operation": "refresh", "error": "KeyError"}]
    assert provider.stats["token_calls"] == 0


class LeaseHooksStorage(MemoryStorage):
    """A MemoryStorage that runs ``on_lease`` once its lease is taken, and whose renewals report the lease lost
    while ``renewals_lost`` is set (another worker took it over)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_lease: Callable[[], object] | None = None
        self.renewals_lost = False

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        lease = super().acquire_lease(key, ttl)
        if self.on_lease is not None:
            self.on_lease()
        return lease

    def renew_lease(self, lease: Lease) -> bool | None:
        return False if self.renewals_lost else super().renew_lease(lease)


async def test_a_task_job_whose_manager_closes_under_its_lease_sends_nothing(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A manager closed while its task job takes the lease: the job stops before the token request."""
    storage = LeaseHooksStorage()
    manager = make_manager(storage=storage, redeem_in="task")
    await aput_entry(manager, expired(provider.login()))
    storage.on_lease = manager.close
    with pytest.raises(RefreshFailed, match="closed before the refresh was sent"):
        await manager.aget_token(SESSION)
    assert provider.stats["token_calls"] == 0


async def test_a_task_job_whose_lease_keeps_running_out_gives_up_before_sending(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A task job that cannot confirm its lease before sending (the store says it was lost) starts over until
    lease_wait is spent, then gives up with a retryable error, having sent nothing."""
    storage = LeaseHooksStorage()
    storage.renewals_lost = True
    manager = make_manager(storage=storage, redeem_in="task", lease_wait=0)
    await aput_entry(manager, expired(provider.login()))
    with pytest.raises(RefreshFailed, match="kept running out") as caught:
        await manager.aget_token(SESSION)
    assert caught.value.retryable and provider.stats["token_calls"] == 0


async def test_a_task_job_waiting_for_another_workers_lease_serves_the_valid_token(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A task job that finds another worker's lease and gives up waiting (lease_wait) serves the stored token
    while it is still valid, though inside its leeway."""
    storage = HeldLeaseStorage()
    manager = make_manager(storage=storage, redeem_in="task", lease_wait=0)
    login = provider.login(access_ttl=20)
    assert login.expires_at is not None
    early = await aput_entry(manager, attrs.evolve(login, issued_at=login.expires_at - 600))  # inside its leeway
    assert (await manager.aget_token(SESSION)) == early
    assert storage.attempts == 1 and provider.stats["token_calls"] == 0


async def test_a_task_job_without_a_refresh_token_asks_for_a_login(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """An expired entry with no refresh token: the task job sends nothing and the caller is told to log in."""
    manager = make_manager(redeem_in="task")
    await aput_entry(manager, attrs.evolve(expired(provider.login()), refresh_token=None))
    with pytest.raises(ReauthenticationRequired, match="no refresh token is stored"):
        await manager.aget_token(SESSION)
    assert provider.stats["token_calls"] == 0


async def test_a_task_jobs_retry_within_the_grace_refused_fails_closed(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """A task job whose answer was lost presents the token once more within reuse_grace; when that retry is
    refused (even by a refusal that consumes nothing), the first request may have rotated it: the job fails
    closed and never presents it a third time."""
    provider.reuse_grace = 30
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret", timeout=0.3)
    manager = make_manager(refresher=refresher, reuse_grace=30, redeem_in="task")
    await aput_entry(manager, expired(provider.login()))
    provider.fail_next("redeem_then:502")
    provider.fail_next("503")
    with pytest.raises(ReauthenticationRequired, match="retry within reuse_grace was refused"):
        await manager.aget_token(SESSION)
    assert (await astored(manager)) is None
    with pytest.raises(ReauthenticationRequired):
        await manager.aget_token(SESSION)
    assert provider.stats["token_calls"] == 2 and provider.stats["refresh_reuse"] == 0
