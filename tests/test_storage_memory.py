"""MemoryStorage's own rules, beyond the contract every backend passes: its size bound evicts the least
recently used entry, and entries past their retention go, read or not, without the bookkeeping growing."""

from __future__ import annotations

import time
import tracemalloc

from httpx_upstream_auth import MemoryStorage, UpstreamTokens
from httpx_upstream_auth._models import EntryKey


def key(name: str) -> EntryKey:
    return EntryKey("local", name)


def tokens(name: str, *, refresh_expires_at: float | None = None) -> UpstreamTokens:
    return UpstreamTokens(
        access_token=f"at-{name}",
        refresh_token=f"rt-{name}",
        expires_at=time.time() + 3600,
        refresh_expires_at=refresh_expires_at,
    )


def test_the_size_bound_evicts_the_least_recently_used_entry() -> None:
    storage = MemoryStorage(maxsize=3)
    for name in ("a", "b", "c"):
        assert storage.put(key(name), tokens(name), expected_version=None)
    assert storage.get(key("a")) is not None  # read: now the most recently used
    assert storage.put(key("d"), tokens("d"), expected_version=None)
    assert storage.get(key("b")) is None  # the least recently used went
    assert sorted(k.session_id for k in storage.scan()) == ["a", "c", "d"]


def test_an_entry_past_its_retention_is_gone_for_reads_writes_deletes_and_scans() -> None:
    storage = MemoryStorage()
    assert storage.put(key("old"), tokens("old", refresh_expires_at=time.time() - 1), expected_version=None)
    assert storage.get(key("old")) is None
    assert list(storage.scan()) == []
    assert not storage.delete(key("old"))
    # A write expecting no entry succeeds: the expired one does not count as present.
    assert storage.put(key("old"), tokens("old", refresh_expires_at=time.time() - 1), expected_version=None)
    assert storage.put(key("old"), tokens("new"), expected_version=None)
    found = storage.get(key("old"))
    assert found is not None and found.access_token == "at-new"


def test_expired_entries_nobody_reads_and_rewrites_of_one_key_leave_no_bookkeeping_behind() -> None:
    storage = MemoryStorage()
    for index in range(200):  # warm-up: interpreter caches, the first heap growth
        storage.put(key(f"x{index}"), tokens("x", refresh_expires_at=time.time() - 1), expected_version=None)
    past = time.time() - 1  # one instant for all: entries with the same deadline are ordered by their keys
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(5_000):
            # Born expired and never read: only later writes can drop them.
            storage.put(key(f"e{index}"), tokens("e", refresh_expires_at=past), expected_version=None)
        version = None
        for _ in range(5_000):
            current = tokens("live")
            assert storage.put(key("live"), current, expected_version=version)
            found = storage.get(key("live"))
            assert found is not None
            version = found.version
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 10,000 writes: what stays is one live entry and a bounded heap, not an entry or a pair per write (>1 MB).
    assert grown < 200_000, grown
    assert [k.session_id for k in storage.scan()] == ["live"]
