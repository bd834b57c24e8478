"""The command line against the adversarial review's findings (issue 17): signals during a refresh, encrypted
stores, log lines, hostile session ids, discovery documents, the demo's store password, hostile inputs and
``serve``'s files. Each test fails on the code before its fix. The subprocess checks are grouped (one
interpreter per case costs seconds on a loaded machine)."""

from __future__ import annotations

import base64
import importlib.abc
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_servers import RedisServer
from storage_fixtures import redis_server
from test_cli import (
    BIN,
    CLOSED_URL,
    OK,
    REAUTHENTICATE,
    RETRY_LATER,
    USAGE,
    _user_dirs,
    api_status,
    environment,
    grant,
    odd_server,
    one_line,
    run,
    write_config,
)

from httpx_upstream_auth import (
    ConfigurationError,
    EncryptedStorage,
    EncryptionKey,
    EntryKey,
    MemoryStorage,
    RefreshFailed,
    SQLiteStorage,
    UpstreamTokens,
    register_storage,
)
from httpx_upstream_auth._cli_config import ProviderSettings, discovery_issuer
from httpx_upstream_auth.testing import LocalProvider, ServerThread

__all__ = ["_user_dirs", "odd_server", "redis_server"]


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
        version = _stored(tmp_path, key).version
        process = _refresh_held_at_the_provider(local, config, env)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        name = signal.Signals(signum).name
        assert process.returncode == 128 + signum, (name, process.returncode, err)
        assert err.splitlines() == [WAITING, f"httpx-upstream-auth: interrupted ({name})"]
        saved = _stored(tmp_path, key)
        assert saved.version == version + 1, name
        assert api_status(url, saved.access_token) == 200
    assert run(capsys, "--config", config, "refresh", "alice")[0] == OK
    assert local.stats["refresh_reuse"] == 0 and local.stats["refresh_ok"] == 3


WAITING = "httpx-upstream-auth: waiting up to 30 s for a refresh in flight to be saved"


def _stored(tmp_path: Path, key: EntryKey) -> UpstreamTokens:
    """The entry the commands' SQLite store holds for ``key`` (there must be one)."""
    store = SQLiteStorage(tmp_path / "tokens.db")
    try:
        found = store.get(key)
    finally:
        store.close()
    assert found is not None
    return found


def _refresh_held_at_the_provider(local: LocalProvider, config: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """`refresh alice` in a child process, returned once the provider redeemed its refresh token and holds the
    answer for 2 s: from then on the rotated token exists only in that answer."""
    calls = local.stats["token_calls"]
    local.fail_next("answer_delay:2")
    command = [str(BIN / "httpx-upstream-auth"), "--config", config, "refresh", "alice"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: local.stats["token_calls"] > calls)
    return process


def test_repeated_signals_during_a_refresh_do_not_lose_the_rotated_token(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """Three Ctrl-C (or three SIGTERM) while the provider holds a redeemed answer: the later signals are only
    recorded until the answer is saved, the command exits for the first one, the stored entry is the rotated
    one, and the next refresh presents no consumed token (adv-cli F1)."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    assert run(capsys, "--config", config, "import", "alice", stdin=grant(local, sub="alice"))[0] == OK
    env = environment(tmp_path)
    key = EntryKey("local", "alice")
    pause = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        version = _stored(tmp_path, key).version
        process = _refresh_held_at_the_provider(local, config, env)
        process.send_signal(signum)
        assert process.stderr is not None
        assert process.stderr.readline().rstrip("\n") == WAITING  # now in close(), waiting for the job
        for _ in range(2):
            process.send_signal(signum)
            pause.wait(0.1)
        rest = process.communicate(timeout=60)[1]
        name = signal.Signals(signum).name
        assert process.returncode == 128 + signum, (name, process.returncode, rest)
        assert rest.splitlines() == [
            "httpx-upstream-auth: interrupted" + ("" if signum == signal.SIGINT else f" ({name})")
        ]
        saved = _stored(tmp_path, key)
        assert saved.version == version + 1, name
    assert run(capsys, "--config", config, "refresh", "alice")[0] == OK
    assert local.stats["refresh_reuse"] == 0 and local.stats["refresh_ok"] == 3


def test_a_sigterm_in_this_process_is_one_line_and_status_143_and_the_handler_is_put_back(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while import waits for its input (main run here): status 143, one line; afterwards this
    process's own SIGTERM and SIGHUP handlers are the ones it had."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)

    class Terminated(io.StringIO):
        def read(self, size: int | None = -1) -> str:
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(30)  # the handler raises here
            raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(sys, "stdin", Terminated())
    code, _, err = run(capsys, "--provider", "p", "--store", f"sqlite:///{tmp_path}/t.db", "import", "s1")
    assert code == 143 and one_line(err) == "httpx-upstream-auth: interrupted (SIGTERM)"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


# -- F2: the demo's store password ------------------------------------------------------------------------
def test_an_interrupted_demo_ends_its_workers_and_prints_one_line(tmp_path: Path) -> None:
    """SIGTERM to the demo's own pid (`kill PID`), then Ctrl-C to its whole group (a terminal): the demo has
    ended and reaped its workers when it exits 128 + signum, and stderr is one line (adv-cli F2, F7)."""
    command = [str(BIN / "httpx-upstream-auth"), "demo", "--processes", "2", "--tasks", "1", "--seconds", "120"]
    for signum, group in ((signal.SIGTERM, False), (signal.SIGINT, True)):
        demo = subprocess.Popen(
            command, env=environment(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        assert demo.stdout is not None
        for line in demo.stdout:  # the workers are calling: their own signal handling is in place
            if re.match(r" *[1-9]\d* requests ", line):
                break
        workers = [int(pid) for pid in Path(f"/proc/{demo.pid}/task/{demo.pid}/children").read_text().split()]
        assert len(workers) == 2
        if group:
            os.killpg(demo.pid, signum)
        else:
            demo.send_signal(signum)
        _, err = demo.communicate(timeout=60)
        name = signal.Signals(signum).name
        assert demo.returncode == 128 + signum, (name, demo.returncode, err)
        assert one_line(err) == "httpx-upstream-auth: interrupted" + ("" if group else f" ({name})")
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], name


def test_the_demo_never_prints_the_store_password_nor_puts_it_on_a_workers_argv(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    """demo --storage redis://default:PW@... with worker processes: the password is neither on stdout nor on
    any worker's command line (it reaches them through their environment), and the workers run to the end."""
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
    # A worker that could not read the store URL from its environment would exit 1 before the summary; how
    # many requests it made depends on how long its imports took on this machine, so the result is not asserted.
    assert code in (OK, 1) and "| reused refresh tokens | 0 " in out, out + err
    assert len(started) == 2 and not any(password in arg for args in started for arg in args)
    assert password not in out + err and f"default:***@{url.rpartition('@')[2]}" in out
    from httpx_upstream_auth._demo import masked

    assert masked("sqlite:/tmp/x.db") == "sqlite:/tmp/x.db" and masked("redis://:pw@h:1/0") == "redis://:***@h:1/0"


# -- F13: encrypted stores ------------------------------------------------------------------------------
def _raw(path: Path, session: str) -> UpstreamTokens | None:
    """The entry as the SQLite file holds it (sealed or not)."""
    store = SQLiteStorage(path)
    try:
        return store.get(EntryKey("local", session))
    finally:
        store.close()


def test_the_cli_reads_and_writes_an_encrypted_store_with_its_keys_and_refuses_it_without(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: tuple[LocalProvider, str],
) -> None:
    """An application's EncryptedStorage store: without keys every command that reads a sealed entry is one
    line, status 2, naming the keys' settings (no blob printed as a token, no plaintext import); with the keys
    (environment, encryption_keys_env or encryption_keys_file) token/show/list/import/refresh/delete work
    and what import writes is sealed; bad, wrong or duplicate keys are one line that never quotes a key."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    key = EncryptionKey.generate("k1")
    text = "k1:" + base64.b64encode(key.secret).decode()
    app = EncryptedStorage(SQLiteStorage(tmp_path / "tokens.db"), [key])
    alice = local.login(sub="alice")
    assert app.put(EntryKey("local", "alice"), alice, expected_version=None)
    app.close()

    for command in (["token", "alice"], ["show", "alice"], ["refresh", "alice"], ["list"], ["import", "bob"]):
        code, out, err = run(capsys, "--config", config, *command, stdin=grant(local, sub="bob"))
        assert code == USAGE and out == "", (command, out)
        assert "is encrypted (EncryptedStorage)" in one_line(err) and "ENCRYPTION_KEYS" in err, command
    assert _raw(tmp_path / "tokens.db", "bob") is None, "no plaintext written next to sealed entries"
    assert local.stats["token_calls"] == 0

    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_ENCRYPTION_KEYS", text)
    code, out, err = run(capsys, "--config", config, "token", "alice")
    assert code == OK and out == alice.access_token + "\n", err
    code, out, _ = run(capsys, "--config", config, "show", "alice", "--json")
    assert code == OK and json.loads(out)["has_refresh_token"] is True
    code, out, err = run(capsys, "--config", config, "refresh", "alice")
    assert code == OK and local.stats["refresh_ok"] == 1, err
    code, _, err = run(capsys, "--config", config, "import", "bob", stdin=grant(local, sub="bob"))
    assert code == OK, err
    sealed = _raw(tmp_path / "tokens.db", "bob")
    assert sealed is not None and sealed.access_token.startswith("hua-aesgcm-1.k1.") and sealed.refresh_token is None
    code, out, _ = run(capsys, "--config", config, "list")
    assert code == OK and len(out.splitlines()) == 2
    app = EncryptedStorage(SQLiteStorage(tmp_path / "tokens.db"), [key])
    opened = app.get(EntryKey("local", "alice"))
    app.close()
    assert opened is not None and api_status(url, opened.access_token) == 200, "the app reads the CLI's refresh"
    assert run(capsys, "--config", config, "delete", "bob")[0] == OK
    monkeypatch.delenv("HTTPX_UPSTREAM_AUTH_ENCRYPTION_KEYS")

    def configured(extra: str) -> str:
        path = tmp_path / "keyed.toml"
        path.write_text(extra + "\n" + Path(config).read_text())
        return str(path)

    (tmp_path / "keys").write_text(text + "\n")
    monkeypatch.setenv("MY_TOKEN_KEYS", text)
    for extra in ('encryption_keys_file = "keys"', 'encryption_keys_env = "MY_TOKEN_KEYS"'):
        code, out, err = run(capsys, "--config", configured(extra), "show", "alice")
        assert code == OK and "has_refresh_token:    yes" in out, (extra, err)

    other = "k2:" + base64.b64encode(EncryptionKey.generate().secret).decode()
    for extra, environ, expected in (
        ("", "not base64!", "must be [KEY_ID:]BASE64 keys of 16, 24 or 32 bytes"),
        ("", "k1:" + base64.b64encode(b"short").decode(), "must be [KEY_ID:]BASE64 keys"),
        ("", f"{text},{text}", "two keys have the same key_id"),
        ("", other, "which is not configured"),
        ('encryption_keys_env = "UNSET_VARIABLE"', "", "encryption_keys_env names is not set"),
        ('encryption_keys_env = "not a name"', "", "must name an environment variable"),
        ('encryption_keys_file = "empty-keys"', "", "is empty"),
    ):
        (tmp_path / "empty-keys").write_text("\n")
        if environ:
            monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_ENCRYPTION_KEYS", environ)
        code, _, err = run(capsys, "--config", configured(extra), "show", "alice")
        monkeypatch.delenv("HTTPX_UPSTREAM_AUTH_ENCRYPTION_KEYS", raising=False)
        assert code == USAGE and expected in one_line(err), (extra, environ, err)
        assert base64.b64encode(key.secret).decode() not in err

    plain = SQLiteStorage(tmp_path / "tokens.db")
    assert plain.put(EntryKey("local", "carol"), local.login(sub="carol"), expected_version=None)
    plain.close()
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_ENCRYPTION_KEYS", text)
    code, _, err = run(capsys, "--config", config, "show", "carol")
    assert code == USAGE and "refused the entry" in one_line(err) and "unencrypted" in err


# -- F14: an unreadable entry ------------------------------------------------------------------------------
def test_an_unreadable_entry_is_named_and_skipped_by_list_and_is_status_2_for_show_and_token(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """Three entries, the middle one's JSON torn: list prints the other two, names the torn one's session
    on stderr and exits 2; show and token of it exit 2 saying to delete it; import next to it and delete work."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    for session in ("a-good", "b-bad", "c-good"):
        assert run(capsys, "--config", config, "import", session, stdin=grant(local))[0] == OK
    with sqlite3.connect(tmp_path / "tokens.db") as db:
        db.execute("UPDATE entries SET data = '{\"access_token\": 5' WHERE session_id = 'b-bad'")
    db.close()
    code, out, err = run(capsys, "--config", config, "list")
    assert code == USAGE and sorted(line.split("\t")[1] for line in out.splitlines()) == ["a-good", "c-good"]
    assert "session 'b-bad'" in one_line(err) and "unreadable entry" in err
    for command in ("show", "token"):
        code, out, err = run(capsys, "--config", config, command, "b-bad")
        assert code == USAGE and out == "" and "session 'b-bad'" in one_line(err) and "delete" in err, command
    assert run(capsys, "--config", config, "import", "d-new", stdin=grant(local))[0] == OK
    code, _, err = run(capsys, "--config", config, "import", "b-bad", stdin=grant(local))
    assert code == USAGE and "unreadable entry" in one_line(err) and "retry" not in err  # adv-cli F5
    assert run(capsys, "--config", config, "delete", "b-bad")[0] == OK
    assert run(capsys, "--config", config, "list") == (OK, ANY_TEXT, "")


def test_list_names_and_skips_an_entry_the_encrypted_store_refuses(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: tuple[LocalProvider, str],
) -> None:
    """An encrypted store whose middle entry holds another session's ciphertext (moved): list prints the
    other two, names the moved one's session on stderr, and exits 2 (adv-sec F5)."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    key = EncryptionKey.generate("k1")
    app = EncryptedStorage(SQLiteStorage(tmp_path / "tokens.db"), [key])
    for session in ("a-good", "b-moved", "c-good"):
        assert app.put(EntryKey("local", session), local.login(sub=session), expected_version=None)
    app.close()
    with sqlite3.connect(tmp_path / "tokens.db") as db:
        db.execute(
            "UPDATE entries SET data = (SELECT data FROM entries WHERE session_id = 'a-good') "
            "WHERE session_id = 'b-moved'"
        )
    db.close()
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_ENCRYPTION_KEYS", "k1:" + base64.b64encode(key.secret).decode())
    code, out, err = run(capsys, "--config", config, "list")
    assert code == USAGE and sorted(line.split("\t")[1] for line in out.splitlines()) == ["a-good", "c-good"]
    assert "session 'b-moved'" in one_line(err) and "refused the entry" in err


class _AnyText(str):
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str)

    __hash__ = str.__hash__


ANY_TEXT = _AnyText()


# -- F5: stored text is printed escaped --------------------------------------------------------------------
def test_session_ids_and_bindings_are_printed_escaped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """A session id holding a newline, tabs and terminal escapes, and a user id holding a bidi override:
    list prints one line per session with no control character, show and import too; JSON keeps the exact
    values."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    evil = "x\nlocal\tadmin\texpires in 999 s\x1b]0;pwned\x07\x1b[2J\\"
    code, out, _ = run(capsys, "--config", config, "import", evil, "--user-id", "u\u202eroot", stdin=grant(local))
    assert code == OK and "\x1b" not in out and "\u202e" not in out
    assert "session_id:           x\\nlocal\\tadmin\\texpires in 999 s\\x1b]0;pwned\\x07\\x1b[2J\\\\\n" in out
    assert run(capsys, "--config", config, "import", "plain", stdin=grant(local))[0] == OK
    code, out, _ = run(capsys, "--config", config, "list")
    lines = out.splitlines()
    assert code == OK and len(lines) == 2 and all(line.count("\t") == 5 for line in lines)
    assert not any(char in out for char in "\x1b\x07\u202e")
    code, out, _ = run(capsys, "--config", config, "show", evil)
    assert code == OK and len(out.splitlines()) == 15 and "user_id:              u\\u202eroot" in out
    code, out, _ = run(capsys, "--config", config, "list", "--json")
    assert {json.loads(line)["session_id"] for line in out.splitlines()} == {evil, "plain"}
    code, out, _ = run(capsys, "--config", config, "delete", evil)
    assert code == OK and len(out.splitlines()) == 1


# -- F3: one line, --verbose for the library's log ---------------------------------------------------------
def test_a_failure_is_one_line_and_verbose_shows_the_librarys_log(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """A refresh the provider refuses (invalid_client), and one it answers with garbage, as a user runs them:
    exactly one stderr line each (the library's events are not printed); with --verbose its events are there
    too, and no token."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    env = environment(tmp_path)
    answer = grant(local)

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        command = [str(BIN / "httpx-upstream-auth"), "--config", config, *args]
        return subprocess.run(command, input=stdin, env=env, capture_output=True, text=True, timeout=60)

    assert cli("import", "s1", stdin=answer).returncode == OK
    code, _, err = run(capsys, "--config", config, "--verbose", "refresh", "s1", "--token-url", CLOSED_URL + "/token")
    assert code == RETRY_LATER and "log: WARNING httpx_upstream_auth.events: refresh.failed" in err
    local.fail_next("invalid_client")
    verbose = cli("refresh", "s1", "--verbose")
    assert verbose.returncode == USAGE and "refresh.failed" in verbose.stderr
    for fault, status in (("invalid_client", USAGE), ("malformed", REAUTHENTICATE)):
        local.fail_next(fault)
        done = cli("refresh", "s1")
        assert done.returncode == status and one_line(done.stderr), (fault, done.stderr)
    assert len(verbose.stderr.splitlines()) > 1 and json.loads(answer)["refresh_token"] not in verbose.stderr


# -- F4, F15: the discovery fetch ----------------------------------------------------------------------------
async def _discovery_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """/trickle: a 200 whose body comes a byte at a time, forever; /flood: an endless fast body; any other
    path: a document naming another issuer, with a token_endpoint at the local provider (query ``?to=URL``)."""
    path = scope["path"].split("/.well-known/", 1)[0]
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    if path in ("/trickle", "/flood"):
        chunk, pause = (b" ", 0.05) if path == "/trickle" else (b" " * 65536, 0.0)
        for _ in range(100_000):  # bounded, in case the client never leaves
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await anyio.sleep(pause)
        return
    target = scope["query_string"].decode().partition("=")[2]
    document = {"issuer": "https://other.example", "token_endpoint": target + "/token"}
    await send({"type": "http.response.body", "body": json.dumps(document).encode()})


def test_the_discovery_fetch_is_bounded_and_its_issuer_checked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """A discovery document that trickles is dropped at the deadline (retry later), one that floods past the
    cap is a configuration error; one that names another issuer than its URL's is refused (status 2, the
    issuers named) and nothing is sent to its token_endpoint; RFC 8414's well-known form works."""
    local, url = provider
    well_known = "/.well-known/openid-configuration"
    with ServerThread(_discovery_app) as odd:
        trickle = ProviderSettings(name="p", discovery_url=odd.url + "/trickle" + well_known)
        with pytest.raises(RefreshFailed, match=r"not complete within 0\.5 s") as slow:
            trickle.resolve_token_url(timeout=0.5)
        assert slow.value.retryable
        flood = ProviderSettings(name="p", discovery_url=odd.url + "/flood" + well_known)
        with pytest.raises(ConfigurationError, match="larger than 64 KiB"):
            flood.resolve_token_url()
        config = str(write_config(tmp_path, url, token_url="", discovery_url=odd.url + well_known + "?to=" + url))
        assert run(capsys, "--config", config, "import", "s1", stdin=grant(local))[0] == OK
        code, _, err = run(capsys, "--config", config, "refresh", "s1")
    assert code == USAGE and local.stats["token_calls"] == 0
    assert f"names the issuer 'https://other.example', not '{odd.url}'" in one_line(err)
    code, _, err = run(
        capsys, "--config", config, "refresh", "s1", "--discovery-url", url + "/.well-known/oauth-authorization-server"
    )
    assert code == OK and local.stats["refresh_ok"] == 1, err
    assert discovery_issuer("https://a.example/.well-known/oauth-authorization-server/t/1") == "https://a.example/t/1"
    assert discovery_issuer("https://a.example/t/.well-known/openid-configuration") == "https://a.example/t"
    assert discovery_issuer("https://a.example/metadata") is None


# -- F6, F9, F10: hostile inputs are one line and status 2 ---------------------------------------------------
def test_hostile_inputs_are_one_line_and_status_2_and_never_echo_a_secret(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: tuple[LocalProvider, str],
    odd_server: str,
) -> None:
    """Deeply nested JSON, /dev/zero, FIFOs and directories (for --config, --file, the secret file), more than
    1 MiB on stdin, non-UTF-8 bytes, a secret pasted as client_secret_env or auth_method, a Redis URL option
    redis-py does not take: one line each, status 2, no secret repeated; the package's own import
    interrupted by Ctrl-C: 130, one line; an error nobody foresaw: status 1, one line."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    secret = "SUPERSECRET_0123456789"
    for args, stdin, expected in (
        (["import", "s1"], "[" * 100_000, "nested too deeply"),
        (["import", "s1"], " " * (1024 * 1024 + 1), "larger than 1024 KiB"),
        (["import", "s1", "--file", "/dev/zero"], None, "/dev/zero is not a regular file"),
        (["import", "s1", "--file", str(fifo)], None, "is not a regular file"),
        (["import", "s1", "--file", str(tmp_path / "nope")], None, "cannot read the answer file"),
        (["--config", "/dev/zero", "list"], None, "is not a regular file"),
        (["--config", str(fifo), "list"], None, "is not a regular file"),
        (["--config", str(tmp_path), "list"], None, "is not a regular file"),
        (["token", "s1", "--client-secret-file", str(fifo)], None, "is not a regular file"),
        (["token", "s1", "--client-secret-env", secret + " x"], None, "not hold the secret itself"),
        (["token", "s1", "--client-secret-env", secret], None, "client_secret_env of provider 'local' names is not"),
    ):
        code, _, err = run(capsys, "--config", config, *args, stdin=stdin)
        assert code == USAGE and expected in one_line(err) and secret not in err, (args[:3], err)
    (tmp_path / "bad.toml").write_bytes(b'store = "\xff"\n')
    (tmp_path / "deep.toml").write_text("a = " + "[" * 100_000)
    (tmp_path / "method.toml").write_text(Path(config).read_text() + f'auth_method = "{secret}"\n')
    (tmp_path / "big.toml").write_text("# " + "x" * 1024 * 1024)
    for name, expected in (
        ("bad", "is not UTF-8 text"),
        ("deep", "nested too deeply"),
        ("method", "must be one"),
        ("big", "larger than 1024 KiB"),
    ):
        code, _, err = run(capsys, "--config", str(tmp_path / f"{name}.toml"), "list")
        assert code == USAGE and expected in one_line(err) and secret not in err, (name, err)

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"access_token": "a\xff", "expires_in": 60}')))
    code, _, err = run(capsys, "--config", config, "import", "s1")
    assert code == USAGE and "is not UTF-8 text" in one_line(err)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(grant(local).encode())))
    assert run(capsys, "--config", config, "import", "s1")[0] == OK, "a real answer on a byte stdin"
    code, _, err = run(capsys, "--config", config, "import", "s2", stdin='{"error": "temporarily_unavailable"}')
    assert code == USAGE and "cannot be stored" in one_line(err)
    code, _, err = run(capsys, "--config", config, "refresh", "s1", "--token-url", odd_server + "/status/400")
    assert code == USAGE and "refresh failed: the token endpoint answered HTTP 400" in one_line(err)

    pytest.importorskip("redis")
    for query in ("unknown_option=1", f"ssl_cert_reqs={secret}"):
        store = f"rediss://:{secret}@127.0.0.1:9/0?{query}"
        code, _, err = run(capsys, "--store", store, "--provider", "p", "list")
        assert code == USAGE and "has an option the Redis client does not take" in one_line(err), query
        assert secret not in err

    class Broken(MemoryStorage):
        def scan(self, provider_id: str | None = None) -> Iterator[EntryKey]:
            raise RuntimeError(secret)

    register_storage("broken-test", lambda url: Broken())
    code, _, err = run(capsys, "--store", "broken-test:", "list")
    assert code == 1 and one_line(err) == (
        "httpx-upstream-auth: unexpected error (RuntimeError); run again with --verbose, or report it"
    )

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target: Any = None) -> None:
            if name == "httpx_upstream_auth._cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "httpx_upstream_auth._cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    code, _, err = run(capsys, "list")
    assert code == 130 and one_line(err) == "httpx-upstream-auth: interrupted"


# -- F7, F8: serve ------------------------------------------------------------------------------------------
def test_serve_checks_its_flags_and_writes_private_files_without_following_links(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Out-of-range ports and non-positive or non-finite TTLs are refused (status 2); --write-to an existing
    file is one line, status 2; pre-existing 0644 files are replaced by 0600 ones, and a planted symlink is
    replaced, its target left untouched."""
    from httpx_upstream_auth.testing.__main__ import main as testing_main

    for flags in (
        ["--port", "99999"],
        ["--port", "-1"],
        ["--port", "x"],
        ["--access-ttl", "-5"],
        ["--access-ttl", "nan"],
        ["--access-ttl", "x"],
    ):
        with pytest.raises(SystemExit) as exit:
            testing_main(["serve", *flags])
        assert exit.value.code == USAGE, flags
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and f"argument {flags[0]}: must be" in err, err
    (tmp_path / "a-file").write_text("")

    def serve(*args: str) -> tuple[int, str, str]:
        stdout: Any = sys.stdout

        def interrupt_when_ready() -> None:
            while "ready" not in stdout.getvalue():
                threading.Event().wait(0.05)
            os.kill(os.getpid(), signal.SIGINT)

        thread = threading.Thread(target=interrupt_when_ready, daemon=True)
        thread.start()
        code = testing_main(["serve", *args])
        out, err = capsys.readouterr()
        return code, out, err

    assert testing_main(["serve", "--write-to", str(tmp_path / "a-file")]) == USAGE
    assert "cannot write to" in capsys.readouterr().err
    blocked = tmp_path / "blocked"
    (blocked / "client-secret").mkdir(parents=True)
    (blocked / "client-secret" / "x").write_text("")
    assert testing_main(["serve", "--port", "0", "--write-to", str(blocked)]) == USAGE
    assert "cannot write to" in capsys.readouterr().err
    assert sorted(path.name for path in blocked.iterdir()) == ["client-secret", "config.toml"], "no temporary left"
    target = tmp_path / "shared"
    target.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("victim\n")
    (target / "grant.json").symlink_to(victim)
    (target / "client-secret").write_text("old\n")
    (target / "client-secret").chmod(0o644)
    code, out, _ = serve("--write-to", str(target))
    assert code == OK and "ready" in out
    assert victim.read_text() == "victim\n" and not (target / "grant.json").is_symlink()
    for name in ("client-secret", "grant.json", "config.toml"):
        assert (target / name).stat().st_mode & 0o777 == 0o600, name
    assert json.loads((target / "grant.json").read_text())["refresh_token"]
    assert sorted(path.name for path in target.iterdir()) == ["client-secret", "config.toml", "grant.json"]


def test_global_options_before_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    """`--verbose demo ...` runs the demo with its flags; `--store`, `--config` or `--provider` before it (in
    either spelling) is one line naming the demo's own `--storage`, status 2 (adv-cli F4)."""
    for args in (["--store", "sqlite:////tmp/x.db"], ["--config=c.toml"], ["--verbose", "--provider", "p"]):
        code, out, err = run(capsys, *args, "demo")
        assert code == USAGE and out == "", args
        assert "`demo --storage URL`" in one_line(err), args
    code, out, err = run(capsys, "--verbose", "demo", "--processes", "1", "--tasks", "1", "--seconds", "0.5")
    assert code == OK and "| result " in out, err


def test_an_unknown_provider_and_a_long_session_id_are_one_short_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """A provider the configuration file does not list is status 2 naming the known ones (not "log in again",
    nor a missing client_id); a 100,000-character session id is cut in the message (adv-cli F11, F16)."""
    config = str(write_config(tmp_path, provider[1]))
    for command in (["show", "alice"], ["token", "alice"]):
        code, out, err = run(capsys, "--config", config, "--provider", "locl", *command)
        assert code == USAGE and out == "", command
        assert one_line(err).startswith("httpx-upstream-auth: unknown provider 'locl' (known: local)"), err
    code, _, err = run(capsys, "--config", config, "show", "s" * 100_000)
    assert code == REAUTHENTICATE and "(100000 characters)" in one_line(err) and len(err) < 400, err[:300]


def test_a_bad_auth_method_flag_is_not_repeated(capsys: pytest.CaptureFixture[str]) -> None:
    """`--auth-method 'my-s3cr3t!'`: status 2 naming the valid methods, never the value (adv-cli F12)."""
    code, out, err = run(capsys, "token", "alice", "--auth-method", "my-s3cr3t!")
    assert code == USAGE and out == "" and "my-s3cr3t" not in err
    assert "client_secret_basic, client_secret_post, none" in one_line(err)


def test_import_refuses_an_unusable_expires_in(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """expires_in 0, negative, non-numeric, infinite (1e400), absurdly large or a boolean: status 2, one line,
    nothing stored; "3600" as a string and a missing expires_in are still taken (adv-cli F9)."""
    config = str(write_config(tmp_path, provider[1]))
    for bad in ("0", "-5", '"abc"', "1e400", "1e20", "true", '"nan"'):
        answer = '{"access_token": "SECRETAT", "refresh_token": "RT1", "expires_in": ' + bad + "}"
        code, out, err = run(capsys, "--config", config, "import", "s", stdin=answer)
        assert code == USAGE and out == "" and "expires_in must be a positive number" in one_line(err), bad
        assert run(capsys, "--config", config, "show", "s")[0] == REAUTHENTICATE, bad
    for good in (', "expires_in": "3600"', ""):
        answer = '{"access_token": "SECRETAT", "refresh_token": "RT1"' + good + "}"
        assert run(capsys, "--config", config, "import", "s", stdin=answer)[0] == OK, good


def test_a_sqlite_url_with_a_host_query_or_fragment_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sqlite://rel.db` (a path relative to wherever the command runs), `?mode=ro` or `#x` (which would end up
    in the file's name): status 2, one line saying sqlite:///ABSOLUTE/PATH; no file made (adv-cli F13)."""
    monkeypatch.chdir(tmp_path)
    for url in ("sqlite://rel.db", f"sqlite:///{tmp_path}/q.db?mode=ro", f"sqlite:///{tmp_path}/f.db#x"):
        code, out, err = run(capsys, "--store", url, "list")
        assert code == USAGE and out == "" and "sqlite:///ABSOLUTE/PATH" in one_line(err), url
    assert list(tmp_path.iterdir()) == []
