"""The command line against the second review (issue 17): the expected-identity flags of ``token`` and
``refresh`` (F11), Ctrl-C while the package itself is still importing, and what a hostile user tries (empty
ids from unset variables, closed or full stdout, closed or empty stdin, error answers given to ``import``,
every ``--help``, the demo's memory store and its callers' deadline). Each test fails on the code before its
fix. In-process ``main`` except where the behaviour is about a process (the console script's start)."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from test_cli import (
    BIN,
    IDENTITY,
    OK,
    REAUTHENTICATE,
    USAGE,
    _user_dirs,
    environment,
    grant,
    one_line,
    provider,
    run,
    summary,
    write_config,
)

from httpx_upstream_auth import EntryKey, register_storage
from httpx_upstream_auth.testing import LocalProvider

__all__ = ["_user_dirs", "provider"]


def _imported(capsys: pytest.CaptureFixture[str], config: str, local: LocalProvider, session: str) -> None:
    """``session`` imported as bob's login, with user id u-1, through test-client."""
    answer = grant(local, sub="bob")
    code, _, err = run(
        capsys, "--config", config, "import", session, "--user-id", "u-1", "--subject", "bob", stdin=answer
    )
    assert code == OK, err


# -- F11: token and refresh check the identity they are asked for --------------------------------------------
def test_token_and_refresh_print_only_the_expected_identitys_tokens(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """--expect-user-id, --expect-subject and --expect-client-id: a match prints the token (and refreshes);
    any field that differs is status 5, one line naming the field, nothing on stdout and nothing sent to the
    provider; an empty expectation (an unset variable) is a usage error."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    _imported(capsys, config, local, "s1")
    calls = local.stats["token_calls"]
    match = ["--expect-user-id", "u-1", "--expect-subject", "bob", "--expect-client-id", "test-client"]
    code, out, err = run(capsys, "--config", config, "token", "s1", *match)
    token = out.strip()
    assert code == OK and token and out == token + "\n", err
    for command, flags, field in (
        ("token", ["--expect-user-id", "u-2"], "user_id"),
        ("token", ["--expect-subject", "mallory", "--expect-user-id", "u-1"], "upstream_subject"),
        ("token", ["--expect-client-id", "other-client"], "client_id"),
        ("refresh", ["--expect-user-id", "u-2"], "user_id"),
        ("refresh", ["--expect-subject", "mallory"], "upstream_subject"),
    ):
        code, out, err = run(capsys, "--config", config, command, "s1", *flags)
        assert code == IDENTITY and out == "", (command, flags, out)
        line = one_line(err)
        assert line.startswith("httpx-upstream-auth: identity mismatch:") and f"({field} differ)" in line, line
        assert token not in err
    assert local.stats["token_calls"] == calls, "nothing was sent for a mismatch"
    code, out, err = run(capsys, "--config", config, "refresh", "s1", "--json", *match)
    assert code == OK and json.loads(out)["user_id"] == "u-1" and local.stats["token_calls"] == calls + 1, err
    code, _, err = run(capsys, "--config", config, "token", "s1", "--expect-user-id", "")
    assert code == USAGE and "--expect-user-id is empty (an unset variable?)" in one_line(err)


def test_an_id_token_for_another_subject_at_refresh_is_the_identity_status(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """The provider's refreshed id_token names another subject: status 5 (the identity mismatch), one line;
    the entry is gone, so the next command asks for a login (status 3)."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    _imported(capsys, config, local, "s2")
    local.fail_next("id_token_other_sub")
    code, out, err = run(capsys, "--config", config, "refresh", "s2")
    assert code == IDENTITY and out == "" and "another subject" in one_line(err), err
    assert run(capsys, "--config", config, "token", "s2")[0] == REAUTHENTICATE


# -- Ctrl-C while the package imports --------------------------------------------------------------------------
def test_ctrl_c_while_the_package_imports_is_one_line_and_status_130(tmp_path: Path) -> None:
    """The console script interrupted while ``httpx_upstream_auth`` itself is importing (a stand-in httpx,
    first on the path, sends SIGINT to its own process as the package imports it): one line, status 130, no
    traceback."""
    (tmp_path / "httpx.py").write_text(
        "import os, signal, threading\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "threading.Event().wait(30)  # the KeyboardInterrupt is raised here at the latest\n"
    )
    env = environment(tmp_path)
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    done = subprocess.run(
        [str(BIN / "httpx-upstream-auth"), "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        128 + signal.SIGINT,
        "",
        "httpx-upstream-auth: interrupted\n",
    )


def test_the_console_scripts_launcher_turns_a_late_ctrl_c_into_the_same_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt that escapes the command (outside its own handler) ends the same way: status 130."""
    import _httpx_upstream_auth_cli
    import httpx_upstream_auth.__main__

    def interrupted(argv: list[str] | None = None) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(httpx_upstream_auth.__main__, "main", interrupted)
    try:
        code = _httpx_upstream_auth_cli.main()
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt escaped the launcher")
    assert code == 130
    assert one_line(capsys.readouterr().err) == "httpx-upstream-auth: interrupted"


# -- F12: what a hostile user tries -------------------------------------------------------------------------
def test_empty_ids_and_paths_from_unset_variables_are_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """An empty session id, provider, --config, or import binding (`"$VAR"` with VAR unset): status 2, one
    line saying it is empty; nothing is stored (an empty id would be a session or provider of its own)."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    for command in ("token", "import", "show", "delete", "refresh"):
        code, _, err = run(capsys, "--config", config, command, "", stdin=grant(local))
        assert code == USAGE and "SESSION is empty (an unset variable?)" in one_line(err), command
    for flag in ("--user-id", "--subject", "--issuer"):
        code, _, err = run(capsys, "--config", config, "import", "s1", flag, "", stdin=grant(local))
        assert code == USAGE and f"{flag} is empty" in one_line(err), flag
    code, _, err = run(capsys, "--config", config, "--provider", "", "import", "s1", stdin=grant(local))
    assert code == USAGE and "the provider is empty" in one_line(err)
    (tmp_path / "empty-default.toml").write_text('default_provider = ""\n')
    code, _, err = run(capsys, "--config", str(tmp_path / "empty-default.toml"), "list")
    assert code == USAGE and "the provider is empty" in one_line(err)
    code, _, err = run(capsys, "--config", "", "list")
    assert code == USAGE and "--config is empty" in one_line(err)
    assert run(capsys, "--config", config, "list") == (OK, "", ""), "nothing was stored"


class _Closed(io.StringIO):
    def read(self, size: int | None = -1) -> str:
        raise AssertionError("not read")


def test_a_closed_or_full_stdout_and_a_closed_or_empty_stdin_are_one_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: tuple[LocalProvider, str],
) -> None:
    """stdout closed (`>&-`) or full (/dev/full): status 2, "cannot write the output" (not an unexpected error,
    and no second complaint at exit); stdin closed (`<&-`) or empty for import: status 2, what to pass."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    _imported(capsys, config, local, "s1")
    monkeypatch.setattr(sys, "stdout", None)
    code, _, err = run(capsys, "--config", config, "token", "s1")
    assert code == USAGE and "stdout is closed" in one_line(err)
    for command in (["token", "s1"], ["list"], ["show", "s1"]):
        with open("/dev/full", "w") as full:
            monkeypatch.setattr(sys, "stdout", full)
            code, _, err = run(capsys, "--config", config, *command)
            monkeypatch.undo()
        assert code == USAGE and one_line(err) == (
            "httpx-upstream-auth: cannot write the output to stdout (No space left on device)"
        ), command
    monkeypatch.setattr(sys, "stdin", None)
    code, _, err = run(capsys, "--config", config, "import", "s2")
    assert code == USAGE and "stdin is closed" in one_line(err) and "--file" in err
    monkeypatch.undo()
    code, _, err = run(capsys, "--config", config, "import", "s2", stdin=" \n")
    assert code == USAGE and "the answer on stdin is empty" in one_line(err)


def test_import_of_an_error_answer_says_so_in_imports_words(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """An error answer is named by its error code (quoted only when it looks like one), never as a failed
    refresh: invalid_grant is status 3, another error or no access token status 2."""
    config = str(write_config(tmp_path, provider[1]))
    for answer, status, expected in (
        ({"error": "invalid_grant"}, REAUTHENTICATE, "is an error answer (invalid_grant), not tokens"),
        ({"error": "access_denied"}, USAGE, "is an error answer (access_denied), not tokens"),
        ({"error": "\x1b[2J secret"}, USAGE, "is an error answer, not tokens"),
        ({"token_type": "Bearer"}, USAGE, "has no usable access_token"),
    ):
        code, out, err = run(capsys, "--config", config, "import", "s1", stdin=json.dumps(answer))
        line = one_line(err)
        assert code == status and out == "" and expected in line, (answer, line)
        assert "refresh" not in line and "secret" not in line and "\x1b" not in line


def test_every_help_is_plain_text_and_names_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    """--help of the program, of every command, of the demo and of `python -m httpx_upstream_auth.testing
    serve`: no reStructuredText markup, every option explained, and the exit statuses listed (5 included)."""
    from httpx_upstream_auth.testing.__main__ import main as testing_main

    helps = {}
    for command in ([], ["token"], ["import"], ["show"], ["list"], ["delete"], ["refresh"], ["demo"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == OK, command
        helps[" ".join(command)] = out
    for argv in (["--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit) as exit:
            testing_main(argv)
        assert exit.value.code == OK
        helps["testing " + argv[0]] = capsys.readouterr().out
    for name, text in helps.items():
        assert "``" not in text and "exit status" in text.lower(), name
    for name in ("token", "refresh"):
        assert "5  identity mismatch" in helps[name] and "--expect-user-id ID" in helps[name], name
    assert "--auth-method" in helps["token"] and "how the client authenticates" in helps["token"]
    assert "--tasks N" in helps["demo"] and "(default 25)" in helps["demo"]


def test_the_demo_on_a_memory_url_runs_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    """demo --storage memory: (the URL form) with --processes 2: one process (worker processes would each
    see an empty store of their own and fail every request); all ok."""
    flags = ["--storage", "memory:", "--processes", "2", "--seconds", "0.5", "--tasks", "2", "--token-ttl", "0.5"]
    code, out, err = run(capsys, "demo", *flags)
    assert code == OK and "demo: 1 process(es) x 2 tasks" in out, out + err
    assert summary(out)["result"] == "OK: the callers never saw an expiry"


def test_a_demo_callers_time_starts_once_its_client_is_made(
    monkeypatch: pytest.MonkeyPatch, provider: tuple[LocalProvider, str]
) -> None:
    """Making the HTTP client takes longer than the callers' whole run (a TLS context on a busy machine): they
    still call for their time, rather than stop before the first request."""
    from httpx_upstream_auth import _demo

    local, url = provider
    seconds = 0.2

    class SlowClient(httpx.AsyncClient):
        def __init__(self, **kwargs: Any) -> None:
            time.sleep(seconds * 1.5)  # the slow part of a real client's making
            super().__init__(**kwargs)

    monkeypatch.setattr(httpx, "AsyncClient", SlowClient)
    manager = _demo.make_manager("memory", url)
    manager.storage.put(EntryKey("local", "demo-session"), local.login(), expected_version=None)
    try:
        result = anyio.run(_demo.run_worker, manager, url, seconds, 1)
    finally:
        manager.close()
    assert result["ok"] >= 1 and result["failed"] == 0 and result["ended"] - result["started"] >= seconds


def test_directories_that_cannot_be_used_and_the_demos_own_failures_are_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A default store directory that cannot be made, a default configuration path that cannot be looked at:
    status 2 naming the path (not "cannot write the output"); the demo's worker entry run by hand: status 2
    saying to run the demo; a demo whose store fails in a way nobody foresaw: status 1, one line."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "a-file"))
    code, _, err = run(capsys, "--provider", "p", "show", "s1")
    assert code == USAGE and "cannot create the default store's directory" in one_line(err) and "--store" in err
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ("x" * 300)))
    code, _, err = run(capsys, "list")
    assert code == USAGE and "cannot read the configuration file" in one_line(err) and "too long" in err
    for argv in (["demo-worker"], ["demo-worker", "http://127.0.0.1:9", "x", "1", "0"]):
        monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_DEMO_STORAGE", "memory")
        if len(argv) == 1:
            monkeypatch.delenv("HTTPX_UPSTREAM_AUTH_DEMO_STORAGE")
        code, _, err = run(capsys, *argv)
        assert code == USAGE and "run `httpx-upstream-auth demo`" in one_line(err), argv

    def broken(url: str) -> Any:
        raise RuntimeError("secret detail")

    register_storage("broken-demo-test", broken)
    code, _, err = run(capsys, "demo", "--storage", "broken-demo-test:", "--seconds", "0.5")
    assert code == 1 and one_line(err) == (
        "httpx-upstream-auth: unexpected error (RuntimeError); run again with --verbose, or report it"
    )
