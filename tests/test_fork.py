"""gunicorn --preload: the app builds its manager (and uses it) before forking workers; every worker
honours the others' logouts, logins and refreshes, and no refresh token is presented twice.

The master is its own process (tests/preload_app.py), so the fork happens in a process like an app
server's, not in the test runner's.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from redis_servers import RedisServer, require_redis_server

import httpx_upstream_auth as hua
from httpx_upstream_auth import open_storage
from httpx_upstream_auth.testing import LocalProvider, ServerThread

APP = str(Path(__file__).with_name("preload_app.py"))
SESSION = "shared"
WORKERS = 4
#: A bound against hangs (how long a change may take to reach every worker), not a timing check.
LIMIT = 20.0


@pytest.fixture(params=["sqlite", "redis"])
def storage_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A storage the workers share: a SQLite file, or a real redis-server on a free port."""
    if request.param == "sqlite":
        yield "sqlite:" + str(tmp_path / "tokens.db")
        return
    require_redis_server()
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.cleanup()


class Master:
    """The preload master process, driven line by line."""

    def __init__(self, spec: str, token_url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, APP, spec, token_url, str(WORKERS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.first = self.proc.stdout.readline().strip()

    def ask(self, worker: int, command: str) -> str:
        """One command to one worker; its answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{worker} {command}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def until_all(self, command: str, wanted: str) -> None:
        """Ask every worker until each answers ``wanted`` (bounded)."""
        deadline = time.monotonic() + LIMIT
        for worker in range(WORKERS):
            while (got := self.ask(worker, command)) != wanted:
                assert time.monotonic() < deadline, f"worker {worker} answers {got!r}, not {wanted!r}"
                time.sleep(0.01)

    def finish(self) -> str:
        """End the workers and the master; its last line."""
        out, err = self.proc.communicate("\n", timeout=60)
        assert self.proc.returncode == 0, err[-3000:]
        return out.strip().splitlines()[-1]


def _store(spec: str, tokens: hua.UpstreamTokens) -> None:
    storage = open_storage(spec)
    try:
        hua.TokenManager(
            provider_id="local",
            storage=storage,
            refresher=hua.OAuth2Refresher("http://127.0.0.1:1/token", "test-client", "test-secret"),
        ).store(SESSION, tokens)
    finally:
        storage.close()


def _b64(tokens: hua.UpstreamTokens) -> str:
    return base64.b64encode(tokens.to_json().encode()).decode()


@pytest.mark.slow
def test_preloaded_workers_honour_each_others_changes(storage_spec: str) -> None:
    """4 forked workers over SQLite or Redis. With 1-second tokens, refreshes in any worker serve the
    others (0 reuse). With hour-long tokens (so only a change notice can explain a switch), a login of
    another user in worker 1 and a logout in worker 0 reach every worker's cache."""
    provider = LocalProvider(access_ttl=1.0)
    with ServerThread(provider) as server:
        _store(storage_spec, attrs.evolve(provider.login(sub="alice", user_id="u-alice"), expires_at=time.time() - 5))
        master = Master(storage_spec, server.url + "/token")
        try:
            assert master.first == "master u-alice"
            for _ in range(30):  # about three token lifetimes: refreshes happen in whichever worker comes first
                for worker in range(WORKERS):
                    assert master.ask(worker, f"get {SESSION}") == "u-alice"
                time.sleep(0.1)
            bob = provider.login(sub="bob", user_id="u-bob", access_ttl=3600)
            assert master.ask(2, f"store {SESSION} {_b64(bob)}").isdigit()
            master.until_all(f"get {SESSION}", "u-bob")  # now cached in every worker for an hour
            carol = provider.login(sub="carol", user_id="u-carol", access_ttl=3600)
            assert master.ask(1, f"store {SESSION} {_b64(carol)}").isdigit()
            master.until_all(f"get {SESSION}", "u-carol")
            assert master.ask(0, f"delete {SESSION}") == "True"
            master.until_all(f"get {SESSION}", "reauth")
        finally:
            last = master.finish()
        stats = provider.stats
    assert last == "exited " + " ".join(["0"] * WORKERS)
    assert stats["refresh_reuse"] == 0 and stats["invalid_grant"] == 0, stats
    assert stats["refresh_ok"] >= 2, stats  # the 1-second tokens did expire and were refreshed along the way
