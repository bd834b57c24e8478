"""The command line against the adversarial review's findings (issue 17): signals during a refresh, encrypted
stores, log lines, hostile session ids, discovery documents, the demo's store password, hostile inputs and
``serve``'s files. Each test fails on the code before its fix. The subprocess checks are grouped (one
interpreter per case costs seconds on a loaded machine)."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_servers import RedisServer
from storage_fixtures import redis_server
from test_cli import (
    BIN,
    OK,
    _user_dirs,
    api_status,
    environment,
    grant,
    one_line,
    run,
    write_config,
)

from httpx_upstream_auth import EntryKey, SQLiteStorage
from httpx_upstream_auth.testing import LocalProvider, ServerThread

__all__ = ["_user_dirs", "redis_server"]


@pytest.fixture
def provider() -> Iterator[tuple[LocalProvider, str]]:
    """A local provider of this test's own (its counts start at 0), served on loopback, and its URL."""
    local = LocalProvider(access_ttl=60)
    with ServerThread(local) as server:
        yield local, server.url


def _wait_for(condition: Any) -> None:
    """Wait (on an event, not a clock) until ``condition()`` holds."""
    pause = threading.Event()
    while not condition():
        pause.wait(0.02)


# -- F1: SIGTERM and SIGHUP behave like Ctrl-C ------------------------------------------------------------
def test_sigterm_and_sighup_during_a_refresh_save_the_answer_and_exit_128_plus_the_signal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """`refresh` is signalled while the provider holds a redeemed answer: the command still saves it, then
    exits 128 + signum with one line; the stored token works and the next refresh presents no consumed token."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    assert run(capsys, "--config", config, "import", "alice", stdin=grant(local, sub="alice"))[0] == OK
    env = environment(tmp_path)
    key = EntryKey("local", "alice")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        before = SQLiteStorage(tmp_path / "tokens.db")
        version = before.get(key).version  # type: ignore[union-attr]
        before.close()
        calls = local.stats["token_calls"]
        local.fail_next("answer_delay:2")
        command = [str(BIN / "httpx-upstream-auth"), "--config", config, "refresh", "alice"]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda calls=calls: local.stats["token_calls"] > calls)  # redeemed: the answer is on its way
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        name = signal.Signals(signum).name
        assert process.returncode == 128 + signum, (name, process.returncode, err)
        assert one_line(err) == f"httpx-upstream-auth: interrupted ({name})"
        store = SQLiteStorage(tmp_path / "tokens.db")
        saved = store.get(key)
        store.close()
        assert saved is not None and saved.version == version + 1, name
        assert api_status(url, saved.access_token) == 200
    assert run(capsys, "--config", config, "refresh", "alice")[0] == OK
    assert local.stats["refresh_reuse"] == 0 and local.stats["refresh_ok"] == 3


# -- F2: the demo's store password ------------------------------------------------------------------------
def test_the_demo_never_prints_the_store_password_nor_puts_it_on_a_workers_argv(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    """demo --storage redis://default:PW@... with worker processes: the password is neither on stdout nor on
    any worker's command line (it reaches them through their environment), and the demo succeeds."""
    password = "s3cret-store-pw"
    url = redis_server.url.replace("redis://", f"redis://default:{password}@", 1)
    started: list[list[str]] = []
    real = subprocess.Popen

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, args: list[str], **kwargs: Any) -> None:
            started.append(list(args))
            super().__init__(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Recording)
    code, out, err = run(capsys, "demo", "--processes", "2", "--seconds", "0.5", "--tasks", "2", "--storage", url)
    assert code == OK, out + err
    assert len(started) == 2 and not any(password in arg for args in started for arg in args)
    assert password not in out + err and f"default:***@{url.rpartition('@')[2]}" in out
    from httpx_upstream_auth._demo import masked

    assert masked("sqlite:/tmp/x.db") == "sqlite:/tmp/x.db" and masked("redis://:pw@h:1/0") == "redis://:***@h:1/0"
