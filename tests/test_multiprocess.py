"""One refresh per expiry across processes, over SQLite and Redis, against the rotating local provider."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import pytest
from redis_servers import RedisServer

import httpx_upstream_auth as hua
from httpx_upstream_auth import open_storage
from httpx_upstream_auth.testing import LocalProvider, ServerThread

WORKER = str(Path(__file__).with_name("mp_worker.py"))
REPO = Path(__file__).resolve().parent.parent
SESSION = "shared"


@pytest.fixture(params=["sqlite", "redis"])
def storage_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage every process can open: a SQLite file, or a real redis-server on a free port."""
    if request.param == "sqlite":
        yield "sqlite:" + str(tmp_path / "tokens.db")
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


def seed(
    provider: LocalProvider, spec: str, *, expired: bool, dpop_key: hua.DPoPKey | None = None
) -> hua.UpstreamTokens:
    """Log alice in and store her tokens (optionally already expired, optionally DPoP-bound to ``dpop_key``,
    which the entry then carries) in the shared storage."""
    jkt = None if dpop_key is None else dpop_key.thumbprint
    tokens = provider.login(sub="alice", client_id="test-client", provider_id="local", dpop_jkt=jkt)
    if dpop_key is not None:
        tokens = attrs.evolve(tokens, dpop_key=dpop_key.to_jwk())
    if expired:
        # issued_at moves back too: an entry issued after it expired has a negative lifetime, which the workers'
        # lifetime-left share (EarlyRefreshes) would read as more than a whole lifetime left.
        now = time.time()
        tokens = attrs.evolve(tokens, expires_at=now - 5, issued_at=now - 6)
    storage = open_storage(spec)
    try:
        return hua.TokenManager(
            storage=storage,
            refresher=hua.OAuth2Refresher("http://127.0.0.1:1/token", "test-client", "test-secret"),
            provider_id="local",
        ).store(SESSION, tokens)
    finally:
        storage.close()


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a worker process, importing the package from this checkout (not whichever one is installed)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )  # fmt: skip


def result_of(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, object]:
    """Wait for a worker and parse its JSON line."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_four_processes_share_one_refresh_per_expiry(storage_spec: str) -> None:
    """4 processes x 25 tasks, 1-second tokens, 8 s: no reuse, no failure, one refresh per token lifetime."""
    provider = LocalProvider(access_ttl=1.0)
    with ServerThread(provider) as server:
        seed(provider, storage_spec, expired=True)
        # Each task pauses 250 ms between calls: the 2 cores are shared by 100 callers and the provider, and the
        # point is the refresh protocol, not how fast this machine can serve loopback HTTP.
        start = str(time.time() + 3)
        procs = [spawn("herd", storage_spec, server.url, "8", "25", "0.25", start) for _ in range(4)]
        results = [result_of(p) for p in procs]
        stats = provider.stats
    failures = [r["errors"] for r in results if r["failed"]]
    assert stats["refresh_reuse"] == 0, stats
    assert failures == [], failures
    assert all(int(r["ok"]) > 0 for r in results), results  # type: ignore[call-overload]
    # One refresh per token lifetime across the processes: a second refresh of one token would present a
    # consumed refresh token (reuse, above); and no process refreshed a token earlier than the freshness policy
    # allows, by its own clock (the provider's refresh_early would also count the time a refresh request spent
    # reaching it on a loaded machine). The run crossed expiries: the seeded expired token's and later ones.
    left = [share for r in results for share in r["lifetime_left_at_refresh"]]  # type: ignore[attr-defined]
    assert left and max(left) <= hua.FreshnessPolicy().max_latency_fraction, left
    assert stats["refresh_ok"] >= 2, stats


@pytest.mark.slow
def test_four_processes_share_one_dpop_bound_grant(storage_spec: str) -> None:
    """4 processes x 25 tasks share one DPoP-bound grant, 1-second tokens, 10 s: every process proves the key the
    entry carries (no proof refused, no wrong key), no reuse, no failure, one refresh per token lifetime."""
    provider = LocalProvider(access_ttl=1.0)
    with ServerThread(provider) as server:
        seed(provider, storage_spec, expired=True, dpop_key=hua.DPoPKey.generate())
        start = str(time.time() + 3)
        env = {"HUA_DPOP": "1"}
        procs = [spawn("herd", storage_spec, server.url, "10", "25", "0.25", start, env=env) for _ in range(4)]
        results = [result_of(p) for p in procs]
        stats = provider.stats
    failures = [r["errors"] for r in results if r["failed"]]
    assert stats["refresh_reuse"] == stats["invalid_grant"] == 0, stats
    assert stats["dpop_proofs_invalid"] == stats["dpop_wrong_key"] == stats["dpop_nonce_challenges"] == 0, stats
    # Every refresh and every API answer served was proven with the key the entry carries.
    assert stats["dpop_proofs_ok"] == stats["refresh_ok"] + stats["api_ok"], stats
    assert failures == [], (failures, stats)
    assert all(int(r["ok"]) > 0 for r in results), results  # type: ignore[call-overload]
    # One refresh per token lifetime, judged as test_four_processes_share_one_refresh_per_expiry does.
    left = [share for r in results for share in r["lifetime_left_at_refresh"]]  # type: ignore[attr-defined]
    assert left and max(left) <= hua.FreshnessPolicy().max_latency_fraction, left
    assert stats["refresh_ok"] >= 2, stats


def test_entry_written_by_one_process_is_refreshed_by_another(storage_spec: str) -> None:
    """Another process reads the parent's expired entry, refreshes it, and the parent then reads the result."""
    provider = LocalProvider()
    with ServerThread(provider) as server:
        stored = seed(provider, storage_spec, expired=True)
        child = result_of(spawn("token", storage_spec, server.url))
        storage = open_storage(storage_spec)
        try:
            mgr = hua.TokenManager(
                storage=storage,
                refresher=hua.OAuth2Refresher(server.url + "/token", "test-client", "test-secret"),
                provider_id="local",
            )
            again = mgr.get_token(SESSION)
        finally:
            storage.close()
        stats = provider.stats
    assert child["version"] == stored.version + 1
    assert child["refresh_token"] != stored.refresh_token
    assert again.to_dict() == child
    assert (again.user_id, again.upstream_subject, again.client_id) == ("user-1", "alice", "test-client")
    assert stats["refresh_ok"] == 1 and stats["refresh_reuse"] == 0


@pytest.mark.slow
def test_lease_holder_killed_mid_refresh_others_take_over(storage_spec: str) -> None:
    """SIGKILL the process holding the lease mid-refresh: another process refreshes after the lease expires."""
    provider = LocalProvider(token_delay=30.0)
    env = {"HUA_REFRESH_TIMEOUT": "2", "HUA_LEASE_TTL": "3"}
    with ServerThread(provider) as server:
        stored = seed(provider, storage_spec, expired=True)
        holder = spawn("token", storage_spec, server.url, env=env)
        deadline = time.monotonic() + 30
        while provider.stats["token_calls"] == 0:  # the holder's refresh request has reached the provider
            assert time.monotonic() < deadline and holder.poll() is None, "the holder never sent its refresh"
            time.sleep(0.02)
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=10)  # reaps it and closes its pipes
        provider.token_delay = 0.0
        survivor = result_of(spawn("token", storage_spec, server.url, env=env))
        stats = provider.stats
    assert survivor["version"] == stored.version + 1
    assert survivor["refresh_token"] != stored.refresh_token
    assert stats["refresh_reuse"] == 0 and stats["refresh_ok"] == 1, stats
    storage = open_storage(storage_spec)
    try:
        entry = storage.get(hua.EntryKey("local", SESSION))
    finally:
        storage.close()
    assert entry is not None and entry.to_dict() == survivor


def test_redis_outage_cached_tokens_keep_serving_then_recovery() -> None:
    """Redis down: cached sessions keep working, others get StorageError (no hang); after restart all recover."""
    server = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")).start()
    provider = LocalProvider()
    try:
        with ServerThread(provider) as api:
            storage = hua.RedisStorage.from_url(server.url, socket_timeout=0.5)
            mgr = hua.TokenManager(
                storage=storage,
                refresher=hua.OAuth2Refresher(api.url + "/token", "test-client", "test-secret"),
                provider_id="local",
            )
            hot = mgr.store("hot", provider.login(sub="alice", provider_id="local"))
            cold = hua.TokenManager(
                storage=hua.RedisStorage.from_url(server.url, socket_timeout=0.5),
                refresher=hua.OAuth2Refresher(api.url + "/token", "test-client", "test-secret"),
                provider_id="local",
            )
            with httpx.Client(auth=mgr.auth("hot")) as client:
                assert client.get(api.url + "/api/me").status_code == 200
                server.stop()
                assert client.get(api.url + "/api/me").status_code == 200  # from the in-process cache
                with pytest.raises(hua.StorageError) as caught:
                    cold.get_token("hot")  # a process without the token cached must reach Redis
                assert hot.access_token not in str(caught.value)
                server.start()
                assert cold.get_token("hot") == hot  # the entry survived, intact
                assert client.get(api.url + "/api/me").status_code == 200
            mgr.close()
            cold.close()
        assert provider.stats["refresh_ok"] == 0
    finally:
        server.cleanup()
