"""Refresh against a real provider over HTTP, through the sync and the async API (the seed's cases and more)."""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

import anyio
import attrs
import httpx
import pytest
from support import (
    SESSION,
    Driver,
    FakeClock,
    FlakyStorage,
    ManagerFactory,
    assert_fails_closed,
    astored,
    expired,
    put_entry,
    stored,
)

from httpx_upstream_auth import (
    Binding,
    BindingMismatch,
    Clock,
    ConfigurationError,
    EntryKey,
    MemoryStorage,
    OAuth2Refresher,
    ReauthenticationRequired,
    RefreshFailed,
    StorageError,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth._async._manager import MAX_FLIGHTS, MAX_RETRIES
from httpx_upstream_auth.testing import LocalProvider, ServerThread

pytestmark = pytest.mark.anyio


def refresh_directly(token_url: str, refresh_token: str) -> httpx.Response:
    """Present a refresh token to the provider by hand, as a second worker would."""
    return httpx.post(
        token_url,
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=("test-client", "test-secret"),
    )


async def test_expired_entry_is_refreshed_with_rotation(
    driver: Driver, provider: LocalProvider, manager: TokenManager, token_url: str
) -> None:
    """An expired entry is refreshed once: the rotated refresh token is stored, the old one is consumed."""
    old = put_entry(manager, expired(provider.login()))
    fresh = await driver.get_token(manager)
    assert fresh.access_token != old.access_token
    assert fresh.refresh_token not in (None, old.refresh_token)
    assert fresh.version == old.version + 1
    assert stored(manager) == fresh
    assert provider.stats["refresh_ok"] == 1 and provider.stats["token_calls"] == 1
    response = await driver.request(manager)
    assert response.status_code == 200
    assert provider.stats["token_calls"] == 1
    # The old refresh token was consumed: presenting it again is reuse.
    reused = await anyio.to_thread.run_sync(refresh_directly, token_url, old.refresh_token or "")
    assert reused.json() == {"error": "invalid_grant"}
    assert provider.stats["refresh_reuse"] == 1


async def test_refreshed_expiry_counts_from_send_time(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """The refreshed entry's expires_at is issued_at (the send time) plus the provider's expires_in."""
    put_entry(manager, expired(provider.login()))
    fresh = await driver.get_token(manager)
    assert fresh.issued_at is not None and fresh.expires_at is not None
    assert fresh.expires_at == pytest.approx(fresh.issued_at + provider.access_ttl)


async def test_no_rotation_keeps_refresh_token(
    driver: Driver, provider: LocalProvider, manager: TokenManager, make_manager: ManagerFactory
) -> None:
    """When the provider returns no refresh token, the old one is kept and works for the next refresh."""
    provider.rotate = False
    old = put_entry(manager, expired(provider.login()))
    first = await driver.get_token(manager)
    assert first.refresh_token == old.refresh_token
    assert stored(manager) == first
    put_entry(manager, expired(first))  # the new access token expires too; a later process finds it so
    later = make_manager(storage=manager.storage)
    second = await driver.get_token(later)
    assert second.refresh_token == old.refresh_token
    assert second.access_token not in (old.access_token, first.access_token)
    assert provider.stats["refresh_ok"] == 2 and provider.stats["invalid_grant"] == 0


async def test_no_refresh_token_requires_reauthentication(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """An expired entry without a refresh token raises ReauthenticationRequired and calls no endpoint."""
    entry = put_entry(manager, expired(attrs.evolve(provider.login(), refresh_token=None)))
    with pytest.raises(ReauthenticationRequired):
        await driver.get_token(manager)
    with pytest.raises(ReauthenticationRequired):
        await driver.request(manager)
    assert provider.stats["token_calls"] == 0
    assert provider.api_calls == {}
    assert stored(manager) == entry


async def test_no_entry_requires_reauthentication(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """A session without an entry raises ReauthenticationRequired and sends nothing."""
    with pytest.raises(ReauthenticationRequired):
        await driver.request(manager)
    assert provider.stats["token_calls"] == 0 and provider.api_calls == {}


FAULTS = [
    ("500", True),
    ("503", True),
    ("429", True),
    ("invalid_client", False),
]
#: 200 answers the client cannot use: the provider may have rotated the refresh token all the same.
UNUSABLE_200 = ["malformed", "no_access_token", "huge"]


@pytest.mark.parametrize(("fault", "retryable"), FAULTS, ids=[f for f, _ in FAULTS])
async def test_provider_error_stores_nothing(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, fault: str, retryable: bool
) -> None:
    """Each error answer raises RefreshFailed (retryable as it should be) and leaves the entry as it was; a
    retryable one is first tried again inside the job (MAX_RETRIES times), with the same refresh token. The
    failure is remembered: within failure_window the next call gets it again without a token request."""
    manager = make_manager()
    entry = put_entry(manager, expired(provider.login()))
    attempts = 1 + MAX_RETRIES if retryable else 1
    provider.fail_next(fault, attempts)
    with pytest.raises(RefreshFailed) as caught:
        await driver.get_token(manager)
    assert caught.value.retryable is retryable
    assert isinstance(caught.value, ConfigurationError) is (fault == "invalid_client")
    assert caught.value.may_have_rotated is False
    assert caught.value.retry_after == (1.0 if fault == "429" else None)
    assert stored(manager) == entry
    assert provider.stats["token_calls"] == attempts and provider.stats["refresh_reuse"] == 0
    with pytest.raises(RefreshFailed) as again:
        await driver.get_token(manager)
    assert (type(again.value), str(again.value)) == (type(caught.value), str(caught.value))
    assert again.value is not caught.value
    assert provider.stats["token_calls"] == attempts
    # The fault is gone; the untouched entry still refreshes (in another process, which remembers nothing).
    fresh = await driver.get_token(make_manager(storage=manager.storage))
    assert fresh.version == entry.version + 1


@pytest.mark.parametrize("fault", ["503", "429", "500"])
async def test_two_transient_failures_then_success_is_one_successful_call(
    driver: Driver, provider: LocalProvider, manager: TokenManager, fault: str
) -> None:
    """The provider refuses twice (its own error answer, 429 with Retry-After included), then answers: the
    caller gets fresh tokens from one get_token; the same refresh token was presented three times, which
    the provider allows since it consumed nothing."""
    entry = put_entry(manager, expired(provider.login()))
    provider.fail_next(fault, 2)
    fresh = await driver.get_token(manager)
    assert fresh.version == entry.version + 1
    assert provider.stats["token_calls"] == 3 and provider.stats["refresh_ok"] == 1
    assert provider.stats["refresh_reuse"] == 0


@pytest.mark.parametrize("fault", UNUSABLE_200)
async def test_unusable_200_answer_fails_closed(
    driver: Driver, provider: LocalProvider, manager: TokenManager, fault: str
) -> None:
    """A 200 answer that cannot be read may have rotated the refresh token: the entry is removed, the caller is
    told to log the user in again, and the old refresh token is never presented a second time."""
    put_entry(manager, expired(provider.login()))
    provider.fail_next(fault)
    with pytest.raises(ReauthenticationRequired):
        await driver.get_token(manager)
    assert stored(manager) is None
    with pytest.raises(ReauthenticationRequired):
        await driver.get_token(manager)
    assert provider.stats["token_calls"] == 1


async def test_unreachable_provider_is_retryable(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A token endpoint that refuses connections gives a retryable RefreshFailed; nothing stored."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    manager = make_manager(refresher=OAuth2Refresher(f"http://127.0.0.1:{port}/token", "test-client", "test-secret"))
    entry = put_entry(manager, expired(provider.login()))
    with pytest.raises(RefreshFailed) as caught:
        await driver.get_token(manager)
    assert caught.value.retryable is True
    assert stored(manager) == entry


async def test_timeout_after_sending_fails_closed(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """A token endpoint slower than the refresher's timeout may have consumed the refresh token before the
    answer was lost: the entry is removed and the old refresh token is never presented again."""
    manager = make_manager(refresher=OAuth2Refresher(token_url, "test-client", "test-secret", timeout=0.2))
    put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:1")
    await assert_fails_closed(driver, manager, provider)


async def test_store_failure_after_rotation_fails_closed(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """If the rotated refresh token cannot be saved before the lease stops being renewed, the entry is removed
    and StorageError raised."""
    storage = FlakyStorage()
    manager = make_manager(storage=storage, refresh_timeout=1.0)
    entry = put_entry(manager, expired(provider.login()))
    storage.fail_put = True
    with pytest.raises(StorageError) as caught:
        await driver.get_token(manager)
    assert entry.refresh_token is not None and entry.refresh_token not in str(caught.value)
    assert stored(manager) is None
    assert provider.stats["refresh_ok"] == 1
    # Nothing is served from memory either: the next call needs a new login, with no token request.
    storage.fail_put = False
    with pytest.raises(ReauthenticationRequired):
        await driver.get_token(manager)
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_store_that_comes_back_in_time_loses_nothing(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A store that fails the save of a rotated token and comes back while the job still holds its (renewed)
    lease: the job keeps retrying, saves, and the caller gets the new tokens."""
    storage = FlakyStorage()
    manager = make_manager(storage=storage)
    entry = put_entry(manager, expired(provider.login()))
    storage.fail_put = True
    puts = storage.puts

    async def recover() -> None:
        while storage.puts < puts + 3:  # three failed attempts, then the store is back
            await anyio.sleep(0.01)
        storage.fail_put = False

    async with anyio.create_task_group() as tg:
        tg.start_soon(recover)
        tokens = await driver.get_token(manager)
    assert tokens.version == entry.version + 1 and stored(manager) == tokens
    assert provider.stats["token_calls"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_store_failure_without_rotation_returns_tokens(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """If the provider did not rotate, a failed save still returns the new tokens and keeps the entry."""
    provider.rotate = False
    storage = FlakyStorage()
    manager = make_manager(storage=storage)
    entry = put_entry(manager, expired(provider.login()))
    storage.fail_put = True
    fresh = await driver.get_token(manager)
    assert fresh.access_token != entry.access_token
    assert stored(manager) == entry
    response = await driver.request(manager)
    assert response.status_code == 200
    # Once the store is back, the kept refresh token still works.
    storage.fail_put = False
    again = await driver.get_token(manager)
    assert again.refresh_token == entry.refresh_token
    assert provider.stats["invalid_grant"] == 0


async def test_expired_entry_without_expired_signal_refreshes(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """An entry whose expires_at merely lies in the past (no error seen) is refreshed, not dropped."""
    tokens = provider.login()
    put_entry(manager, attrs.evolve(tokens, expires_at=(tokens.issued_at or 0.0) - 1.0))
    response = await driver.request(manager)
    assert response.status_code == 200
    assert provider.stats["refresh_ok"] == 1
    assert provider.api_calls["/api/me"] == 1


async def test_id_token_kept_when_omitted(driver: Driver, provider: LocalProvider, manager: TokenManager) -> None:
    """An id_token stored at login is kept when the refresh answer has none."""
    provider.issue_id_token = True
    entry = put_entry(manager, expired(provider.login()))
    provider.issue_id_token = False
    fresh = await driver.get_token(manager)
    assert entry.id_token is not None
    assert fresh.id_token == entry.id_token
    assert fresh.access_token != entry.access_token


async def test_id_token_same_subject_replaces_stored(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """A refreshed id_token for the same subject replaces the stored one."""
    provider.issue_id_token = True
    login = provider.login()
    entry = put_entry(manager, expired(attrs.evolve(login, id_token=f"{login.id_token}stale")))
    fresh = await driver.get_token(manager)
    assert fresh.id_token is not None and fresh.id_token != entry.id_token
    payload = fresh.id_token.split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"] == "alice"


async def test_revoked_grant_requires_reauthentication(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """invalid_grant raises ReauthenticationRequired, keeps the entry for inspection and sends nothing; the
    dead refresh token is not presented again by later calls."""
    tokens = provider.login()
    entry = put_entry(manager, expired(tokens))
    provider.revoke_grant(provider.grant_of(tokens.access_token))
    for _ in range(3):
        with pytest.raises(ReauthenticationRequired):
            await driver.request(manager)
    assert stored(manager) == entry
    assert provider.api_calls == {}
    assert provider.stats["invalid_grant"] == 1


class RacingRefresher(OAuth2Refresher):
    """Runs ``before`` (another worker's write) just before redeeming, once."""

    before: Any = None

    def _race(self) -> None:
        before, self.before = self.before, None
        if before is not None:
            before()

    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        self._race()
        return super().refresh(tokens, clock)

    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        self._race()
        return await super().arefresh(tokens, clock)


async def test_invalid_grant_after_other_worker_rotated_uses_its_tokens(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """invalid_grant after another worker saved newer tokens meanwhile: the newer stored tokens are used."""
    refresher = RacingRefresher(token_url, "test-client", "test-secret")
    manager = make_manager(refresher=refresher)
    other = make_manager(storage=manager.storage)
    # The entry's refresh token is one the provider does not know (another worker already rotated it away).
    old = put_entry(manager, expired(attrs.evolve(provider.login(), refresh_token="rt-already-rotated")))
    newer = provider.login()

    def other_worker_saves() -> None:
        assert other.storage.put(
            EntryKey(other.provider_id, SESSION),
            attrs.evolve(newer, version=old.version + 1),
            expected_version=old.version,
        )

    refresher.before = other_worker_saves
    got = await driver.get_token(manager)
    assert got.access_token == newer.access_token and got.version == old.version + 1
    assert provider.stats["invalid_grant"] == 1 and provider.stats["refresh_ok"] == 0
    response = await driver.request(manager)
    assert response.status_code == 200
    assert provider.stats["token_calls"] == 1


async def test_two_managers_one_storage_refresh_once(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A second manager over the same storage uses the first one's refreshed entry instead of refreshing."""
    first = make_manager()
    second = make_manager(storage=first.storage)
    put_entry(first, expired(provider.login()))
    a = await driver.get_token(first)
    b = await driver.get_token(second)
    assert a == b
    assert provider.stats["token_calls"] == 1


async def test_id_token_other_subject_is_binding_mismatch(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """A refreshed id_token for another subject raises BindingMismatch, and since the provider consumed the
    refresh token the entry is removed: the next call asks for a login instead of presenting it again."""
    put_entry(manager, expired(provider.login(sub="alice")))
    provider.fail_next("id_token_other_sub")
    with pytest.raises(BindingMismatch):
        await driver.request(manager)
    assert stored(manager) is None
    with pytest.raises(ReauthenticationRequired):
        await driver.request(manager)
    assert provider.api_calls == {}
    assert provider.stats["token_calls"] == 1
    assert provider.stats["refresh_reuse"] == 0


@pytest.mark.parametrize("client_id", ["public-client", "post-client", "test-client"])
async def test_client_auth_methods_work(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, client_id: str
) -> None:
    """Public ('none'), client_secret_post and client_secret_basic clients all refresh."""
    manager = make_manager(client_id=client_id)
    put_entry(manager, expired(provider.login(client_id=client_id)))
    response = await driver.request(manager)
    assert response.status_code == 200
    assert provider.stats["refresh_ok"] == 1 and provider.stats["invalid_client"] == 0
    expected = {"public-client": "none", "post-client": "client_secret_post", "test-client": "client_secret_basic"}
    assert provider.requests[-1]["auth_method"] == expected[client_id]


async def test_one_second_token_not_refreshed_on_every_request(driver: Driver, make_manager: ManagerFactory) -> None:
    """A 1-second token is sent as is for most of its life and refreshed once near its end, not per request."""
    clock = FakeClock()
    provider = LocalProvider(clock=clock)
    async with ServerThread(provider) as server:
        refresher = OAuth2Refresher(server.url + "/token", "test-client", "test-secret")
        manager = make_manager(refresher=refresher, clock=clock)
        local_driver = Driver(driver.mode, server.url)
        await local_driver.store(manager, provider.login(access_ttl=1))
        for _ in range(9):  # 0.0 .. 0.8 s into its life
            assert (await local_driver.request(manager)).status_code == 200
            clock.advance(0.1)
        assert provider.stats["token_calls"] == 0
        clock.advance(0.15)  # 0.95 s: inside the (capped) leeway
        for _ in range(9):
            assert (await local_driver.request(manager)).status_code == 200
            clock.advance(0.05)
        assert provider.stats["token_calls"] == 1
        assert provider.stats["api_ok"] == 18


async def test_fresh_token_is_served_from_cache(driver: Driver, provider: LocalProvider, manager: TokenManager) -> None:
    """A fresh stored token is sent without any token request."""
    await driver.store(manager, provider.login())
    for _ in range(5):
        assert (await driver.request(manager)).status_code == 200
    assert provider.stats["token_calls"] == 0 and provider.stats["api_ok"] == 5


async def test_rejected_token_is_refreshed_and_replayed(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """A 401 for a token revoked server-side is refreshed once and the request replayed to 200."""
    tokens = await driver.store(manager, provider.login())
    provider.revoke_access(tokens.access_token)
    response = await driver.request(manager)
    assert response.status_code == 200
    assert provider.stats["refresh_ok"] == 1 and provider.stats["api_401"] == 1
    assert provider.api_calls["/api/me"] == 2


async def test_store_returns_versioned_entry(driver: Driver, provider: LocalProvider, manager: TokenManager) -> None:
    """store() returns the entry as stored, above any version already there, with the provider filled in."""
    tokens = attrs.evolve(provider.login(), provider_id=None)
    first = await driver.store(manager, tokens)
    assert first.version > 1 and first.provider_id == manager.provider_id
    second = await driver.store(manager, provider.login())
    assert second.version > first.version
    assert stored(manager) == second


class LosingStorage(MemoryStorage):
    """A MemoryStorage where another writer wins every compare-and-set (its writes never land)."""

    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        self.puts += 1
        return False


async def test_a_store_that_loses_every_race_is_a_storage_error(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """store() tries again while others' writes win, a bounded number of times, then says so: a StorageError
    asking to retry, and nothing stored."""
    storage = LosingStorage()
    manager = make_manager(storage=storage)
    with pytest.raises(StorageError, match="kept changing while storing it"):
        await driver.store(manager, provider.login())
    assert storage.puts == MAX_FLIGHTS and stored(manager) is None


async def test_store_without_issued_at_counts_the_lifetime_from_now(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """An entry stored without issued_at gets now (or its expiry, if that passed already): the lifetime counted
    from then is a lower bound, so the leeway capped by it stays small enough."""
    clock = FakeClock()
    manager = make_manager(clock=clock)
    entry = await driver.store(manager, attrs.evolve(provider.login(), issued_at=None, expires_at=clock.now + 600))
    assert entry.issued_at == clock.now and entry == stored(manager)
    past = await driver.store(manager, attrs.evolve(provider.login(), issued_at=None, expires_at=clock.now - 10))
    assert past.issued_at == clock.now - 10


async def test_versions_never_repeat_across_logout_and_login(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """A login after a logout starts above every version the session had, so a refresh redeemed from the old
    login can never compare-and-set over the new one."""
    first = await driver.store(manager, provider.login())
    refreshed = put_entry(manager, attrs.evolve(first, version=first.version + 5))
    assert manager.delete(SESSION)
    again = await driver.store(manager, provider.login(sub="bob"))
    assert again.version > refreshed.version


async def test_store_for_other_provider_is_refused(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """Storing tokens bound to another provider raises BindingMismatch."""
    with pytest.raises(BindingMismatch):
        await driver.store(manager, attrs.evolve(provider.login(), provider_id="other"))
    assert stored(manager) is None


async def test_delete_forgets_the_session(driver: Driver, provider: LocalProvider, manager: TokenManager) -> None:
    """After delete (logout) the session has no tokens: ReauthenticationRequired, nothing sent."""
    await driver.store(manager, provider.login())
    assert (await driver.request(manager)).status_code == 200
    if driver.mode == "sync":
        assert manager.delete(SESSION) is True
        assert manager.delete(SESSION) is False
    else:
        assert await manager.adelete(SESSION) is True
        assert await manager.adelete(SESSION) is False
    with pytest.raises(ReauthenticationRequired):
        await driver.request(manager)
    assert provider.api_calls["/api/me"] == 1


def test_manager_settings_are_checked(make_manager: ManagerFactory) -> None:
    """A lease without a lifetime, or an unknown place to run refreshes, is refused at construction."""
    with pytest.raises(ValueError, match="lease_ttl"):
        make_manager(lease_ttl=0.0)
    with pytest.raises(ValueError, match="redeem_in"):
        make_manager(redeem_in="process")


def test_observed_latency_follows_rfc_6298(provider: LocalProvider, make_manager: ManagerFactory) -> None:
    """The manager estimates how long a request may take as TCP does its retransmission timer: the first
    round trip r gives r + 4 * r/2; later ones move the smoothed mean by 1/8 and the variation by 1/4, so one
    stall raises the estimate for a while but does not dominate it. Seen from outside: with no leeway, a token
    is sent only while it outlives the estimate (requests timed on the manager's clock)."""
    clock = FakeClock()
    manager = make_manager(clock=clock, leeway=0.0)

    def stored_for(remaining: float) -> None:
        manager.store(
            SESSION, attrs.evolve(provider.login(), issued_at=clock.now - 1000, expires_at=clock.now + remaining)
        )

    def request_taking(seconds: float) -> None:
        stored_for(1000.0)
        flow = manager.auth(SESSION).sync_auth_flow(httpx.Request("GET", "https://api.example/me"))
        request = next(flow)
        clock.advance(seconds)
        with pytest.raises(StopIteration):
            flow.send(httpx.Response(200, request=request))

    def sent_as_it_is(remaining: float) -> bool:
        stored_for(remaining)
        before = provider.stats["token_calls"]
        manager.get_token(SESSION)
        return provider.stats["token_calls"] == before

    def estimate_between(low: float, high: float) -> None:
        assert sent_as_it_is(high) and not sent_as_it_is(low)

    request_taking(0.1)
    estimate_between(0.29, 0.31)  # 0.1 + 4 * 0.05
    request_taking(0.9)  # one stall
    estimate = 0.2 + 4 * (0.75 * 0.05 + 0.25 * 0.8)
    estimate_between(estimate - 0.01, estimate + 0.01)
    for _ in range(60):
        request_taking(0.1)
    estimate_between(0.09, 0.11)


async def test_a_refresh_keeps_the_issuer_of_the_grant(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """The issuer recorded with an entry stays with it across refreshes (the refresh token goes back only
    to the issuer that issued it; MCP discovery relies on it)."""
    entry = put_entry(manager, attrs.evolve(expired(provider.login()), issuer="https://as.example"))
    fresh = await driver.get_token(manager)
    assert fresh.version == entry.version + 1 and fresh.issuer == "https://as.example"


# -- a refresh on demand -------------------------------------------------------------------------------


async def test_a_refresh_on_demand_replaces_a_valid_token_once(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """refresh()/arefresh() on a still-valid token: one rotation, saved and then served from the cache."""
    first = await driver.store(manager, provider.login())
    fresh = await driver.refresh(manager)
    assert fresh.version == first.version + 1 and fresh.refresh_token != first.refresh_token
    assert await astored(manager) == fresh
    assert await driver.get_token(manager) == fresh
    assert (await driver.request(manager)).status_code == 200
    stats = provider.stats
    assert (stats["token_calls"], stats["refresh_ok"], stats["refresh_reuse"]) == (1, 1, 0)


async def test_a_refresh_on_demand_checks_the_binding_before_sending(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """An expected identity the entry does not have: BindingMismatch, and no token request."""
    await driver.store(manager, provider.login(user_id="user-1"))
    with pytest.raises(BindingMismatch):
        await driver.refresh(manager, expect=Binding(user_id="someone-else"))
    assert provider.stats["token_calls"] == 0


async def test_a_refresh_on_demand_without_an_entry_asks_for_a_login(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    with pytest.raises(ReauthenticationRequired):
        await driver.refresh(manager)
    assert provider.stats["token_calls"] == 0
