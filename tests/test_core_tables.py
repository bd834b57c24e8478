"""The sans-I/O core's memory of refresh tokens whose answer was lost, at its bound: driven directly (it is pure
bookkeeping), since reaching the bound through real refreshes takes a hundred thousand lost answers."""

from __future__ import annotations

import logging

import pytest
from support import FakeClock

from httpx_upstream_auth import MemoryStorage, OAuth2Refresher, UpstreamTokens
from httpx_upstream_auth._core import CONSUMED_MEMORY, ManagerCore
from httpx_upstream_auth._models import EntryKey
from httpx_upstream_auth._policy import FreshnessPolicy


def make_core(clock: FakeClock) -> ManagerCore:
    return ManagerCore(
        provider_id="local",
        storage=MemoryStorage(),
        refresher=OAuth2Refresher("http://127.0.0.1:9/token", "test-client", "test-secret"),
        clock=clock,
        policy=FreshnessPolicy(),
        refresh_timeout=1.0,
        lease_ttl=1.0,
        lease_wait=3.0,
        wait_timeout=4.0,
        retry_interval=1.0,
        cache_size=10,
        redeem_in="thread",
    )


def lost(core: ManagerCore, index: int, until: float) -> UpstreamTokens:
    tokens = UpstreamTokens(access_token=f"at-{index}", refresh_token=f"rt-{index}", refresh_expires_at=until)
    core.lose_consumed(tokens)
    return tokens


def test_lost_answers_beyond_the_memory_forget_first_what_no_store_holds_then_what_ends_soonest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    core = make_core(clock)
    key = EntryKey("local", "s")
    ended = [lost(core, index, clock.now + 10) for index in range(5)]  # no store holds these after 10 s
    soonest = lost(core, 5, clock.now + 100)
    latest = [lost(core, index, clock.now + 10_000) for index in range(6, CONSUMED_MEMORY)]
    assert all(core.is_consumed(key, t.refresh_token or "") for t in [*ended, soonest, *latest])
    clock.advance(20)
    with caplog.at_level(logging.WARNING, logger="httpx_upstream_auth"):
        lost(core, CONSUMED_MEMORY, clock.now + 10_000)  # one past the memory: the ended ones go, nothing else
    assert not any(core.is_consumed(key, t.refresh_token or "") for t in ended)
    assert core.is_consumed(key, soonest.refresh_token or "") and core.footprint().consumed == CONSUMED_MEMORY - 4
    assert not caplog.records
    for index in range(CONSUMED_MEMORY + 1, CONSUMED_MEMORY + 6):
        lost(core, index, clock.now + 10_000)
    # Over the memory with nothing expired: down to nine tenths, the soonest to end first.
    assert core.footprint().consumed == CONSUMED_MEMORY * 9 // 10
    assert not core.is_consumed(key, soonest.refresh_token or "")
    assert core.is_consumed(key, f"rt-{CONSUMED_MEMORY + 5}")
    assert [r.getMessage() for r in caplog.records] == [
        f"forgot {CONSUMED_MEMORY // 10 + 1} refresh tokens whose refresh answer was lost (memory full)"
    ]
