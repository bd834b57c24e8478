"""The command line as a user drives it: ``httpx-upstream-auth`` against the local provider over loopback, on
a real SQLite file (and Redis for ``list``). The user-facing runs go through subprocesses (the console script
and ``python -m``); the error matrix calls the same ``main`` in this process, which is the same code with
the same output and exit status, without paying for an interpreter per case."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_servers import RedisServer
from storage_fixtures import REPO, redis_server

from httpx_upstream_auth import (
    EntryKey,
    MemoryStorage,
    SQLiteStorage,
    Storage,
    UpstreamTokens,
    __version__,
    register_storage,
)
from httpx_upstream_auth.__main__ import main
from httpx_upstream_auth.testing import LocalProvider, ServerThread

__all__ = ["redis_server"]

BIN = Path(sys.executable).parent
OK, FAILED, USAGE, REAUTHENTICATE, RETRY_LATER, IDENTITY = 0, 1, 2, 3, 4, 5
#: A loopback port nothing listens on.
CLOSED_URL = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def provider() -> Iterator[tuple[LocalProvider, str]]:
    """The local provider (rotation, reuse revokes the grant) served on loopback, and its URL."""
    local = LocalProvider(access_ttl=60)
    with ServerThread(local) as server:
        yield local, server.url


async def _odd_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that answers what the local provider never does: GET /status/N answers HTTP N, /not-json
    a 200 that is not JSON, /huge 100 kB, /endpoint-not-a-string a token_endpoint that is a number."""
    path = scope["path"].removesuffix("/.well-known/openid-configuration")
    status, body = 200, b'{"token_endpoint": 7}'
    if path.startswith("/status/"):
        status, body = int(path.rsplit("/", 1)[1]), b"{}"
    elif path == "/not-json":
        body = b"<html>"
    elif path == "/huge":
        body = b'{"token_endpoint": "http://127.0.0.1/token", "pad": "' + b"x" * 100_000 + b'"}'
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def odd_server() -> Iterator[str]:
    """The URL of :func:`_odd_app`, served on loopback."""
    with ServerThread(_odd_app) as server:
        yield server.url


@pytest.fixture(autouse=True)
def _user_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test has data and config directories of its own, and no HTTPX_UPSTREAM_AUTH_* variable."""
    for name in list(os.environ):
        if name.startswith("HTTPX_UPSTREAM_AUTH_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def write_config(tmp_path: Path, url: str, **provider: str) -> Path:
    """A configuration file naming provider ``local`` at ``url`` (``test-client``, secret in a file)."""
    (tmp_path / "secret").write_text("test-secret\n")
    table = {"token_url": url + "/token", "client_id": "test-client", "client_secret_file": "secret", **provider}
    lines = [f'store = "sqlite:///{tmp_path}/tokens.db"', 'default_provider = "local"', "[providers.local]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in table.items() if value]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def grant(local: LocalProvider, **login: Any) -> str:
    """A fresh login as the token endpoint's JSON answer."""
    tokens = local.login(**login)
    assert tokens.expires_at is not None and tokens.issued_at is not None
    expires_in = round(tokens.expires_at - tokens.issued_at)
    answer = {"access_token": tokens.access_token, "refresh_token": tokens.refresh_token, "expires_in": expires_in}
    return json.dumps({**answer, "token_type": "Bearer", "scope": "api"})


def run(capsys: pytest.CaptureFixture[str], *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """``main(args)`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    before = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse's --help and --version
        code = int(exit.code or 0)
    finally:
        sys.stdin = before
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The single line a failure prints on stderr (never a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("httpx-upstream-auth: "), err
    return lines[0]


def api_status(url: str, token: str) -> int:
    """What the provider's API answers to ``token``."""
    return httpx.get(url + "/api/me", headers={"Authorization": f"Bearer {token}"}).status_code


def environment(tmp_path: Path) -> dict[str, str]:
    """A user's environment for subprocesses: this venv's commands first, this worktree's package, own dirs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HTTPX_UPSTREAM_AUTH_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO))
    env.update(XDG_DATA_HOME=str(tmp_path / "data"), XDG_CONFIG_HOME=str(tmp_path / "config"))
    return env


# -- as a user runs it: subprocesses -------------------------------------------------------------------------
def docs_commands() -> list[str]:
    """The three commands of docs/cli.md's "Try it against the local provider" section."""
    section = (REPO / "docs" / "cli.md").read_text().split("## Try it against the local provider", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_three_commands_of_the_docs_print_a_token_the_local_provider_accepts(tmp_path: Path) -> None:
    """docs/cli.md's three commands, run as written (console script and all) in a fresh directory: the local
    provider serves, the grant it wrote is imported into the default store, and `token` prints an access
    token the provider's API accepts; the provider's credentials are printed."""
    serve, imported, token = docs_commands()
    env = environment(tmp_path)
    server = subprocess.Popen(shlex.split(serve), cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        banner = [server.stdout.readline() for _ in range(5)]
        assert banner[-1] == "ready\n", banner
        assert "test-client / test-secret (client_secret_basic)" in banner[2]
        url = banner[0].split()[2]
        done = subprocess.run(imported, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == OK, done.stderr
        assert "has_refresh_token:    yes" in done.stdout and "refresh-" not in done.stdout
        printed = subprocess.run(token, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert printed.returncode == OK, printed.stderr
        access_token = printed.stdout.strip()
        assert printed.stdout == access_token + "\n" and api_status(url, access_token) == 200
        assert (tmp_path / "data" / "httpx-upstream-auth" / "tokens.db").is_file(), "the default store"
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    assert server.returncode == 0, "Ctrl-C stops the provider cleanly"


def test_every_command_through_the_console_script(tmp_path: Path, provider: tuple[LocalProvider, str]) -> None:
    """import (stdin), show, token, refresh, list and delete through the installed console script, and
    --version through python -m: outputs, exit codes, and one refresh at the provider for the forced one."""
    local, url = provider
    config = write_config(tmp_path, url)
    env = environment(tmp_path)

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        command = [str(BIN / "httpx-upstream-auth"), "--config", str(config), *args]
        return subprocess.run(command, input=stdin, env=env, capture_output=True, text=True, timeout=60)

    before = local.stats["refresh_ok"]
    answer = grant(local, sub="bob")
    imported = cli("import", "s1", "--subject", "bob", "--user-id", "u-7", "--json", stdin=answer)
    assert imported.returncode == OK, imported.stderr
    entry = json.loads(imported.stdout)
    assert entry["upstream_subject"] == "bob" and entry["user_id"] == "u-7" and entry["has_refresh_token"] is True
    assert 55 <= entry["expires_in"] <= 60 and entry["client_id"] == "test-client"
    assert json.loads(answer)["refresh_token"] not in imported.stdout + imported.stderr

    shown = cli("show", "s1")
    assert shown.returncode == OK and "upstream_subject:     bob" in shown.stdout
    assert json.loads(answer)["access_token"] not in shown.stdout

    token = cli("token", "s1")
    assert token.returncode == OK and token.stdout.strip() == json.loads(answer)["access_token"]
    assert local.stats["refresh_ok"] == before, "a valid token is printed without a refresh"

    refreshed = cli("refresh", "s1", "--json")
    assert refreshed.returncode == OK, refreshed.stderr
    assert local.stats["refresh_ok"] == before + 1
    new = json.loads(refreshed.stdout)
    assert new["version"] > entry["version"] and new["access_token_sha256"] != entry["access_token_sha256"]
    fresh = cli("token", "s1").stdout.strip()
    assert fresh != token.stdout.strip() and api_status(url, fresh) == 200

    listed = cli("list")
    assert listed.returncode == OK and re.fullmatch(
        r"local\ts1\texpires in \d+ s\tv\d+\trefresh token\tuser u-7\n", listed.stdout
    )
    deleted = cli("delete", "s1")
    assert deleted.returncode == OK and "deleted session 's1'" in deleted.stdout
    version = subprocess.run(
        [sys.executable, "-m", "httpx_upstream_auth", "--version"], env=env, capture_output=True, text=True
    )
    assert version.stdout == f"httpx-upstream-auth {__version__}\n"


# -- the same main, in this process: every command's output and every error class -------------------------
def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """--help works on the command and on every subcommand (exit 0), and lists the exit codes."""
    code, out, _ = run(capsys, "--help")
    assert code == OK and "exit status:" in out and "re-authentication required" in out
    for command in ("token", "import", "show", "list", "delete", "refresh", "demo"):
        code, out, _ = run(capsys, command, "--help")
        assert code == OK and out.startswith("usage:"), command


def test_usage_errors_are_one_line_and_status_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A missing argument, an unknown command or flag, and a flag the demo refuses: one line, status 2."""
    for args in (["token"], ["frobnicate"], ["list", "--bogus"], [], ["demo", "--processes", "0"]):
        code, _, err = run(capsys, *args)
        assert code == USAGE, args
        one_line(err)


def test_configuration_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """No provider, a missing or broken configuration file, unknown keys, a bad auth method, no client id,
    no token URL: one line each, status 2."""
    assert "no provider chosen" in one_line(run(capsys, "show", "s1")[2])
    cases: dict[str, str] = {
        "cannot read the configuration file": "",
        "not valid TOML": "store = ",
        "unknown keys colour": 'colour = "blue"',
        "must hold one table per provider": "providers = 3",
        "store must be a string": "store = 3",
        "auth_method of provider 'p' must be one of": '[providers.p]\nauth_method = "magic"',
        # A key-based method needs a ClientAssertion, which a configuration file cannot hold.
        "must be one of client_secret_basic, client_secret_post, none, not 'private_key_jwt'": (
            '[providers.p]\nauth_method = "private_key_jwt"'
        ),
        "unknown keys tokenurl": '[providers.p]\ntokenurl = "x"',
    }
    for expected, text in cases.items():
        path = tmp_path / "c.toml"
        path.unlink(missing_ok=True)
        if text:
            path.write_text(text + "\n")
        code, _, err = run(capsys, "--config", str(path), "--provider", "p", "list")
        assert code == USAGE and expected in one_line(err), (expected, err)
    code, _, err = run(capsys, "token", "s1", "--provider", "p", "--client-id", "c")
    assert code == USAGE and "no token_url or discovery_url" in one_line(err)
    code, _, err = run(capsys, "token", "s1", "--provider", "p", "--token-url", "http://example.com/token")
    assert code == USAGE and "no client_id" in one_line(err)
    secret = ["--client-id", "c", "--auth-method", "none"]
    code, _, err = run(capsys, "token", "s1", "--provider", "p", "--token-url", "http://example.com/token", *secret)
    assert code == USAGE and "token_url must be an https:// URL" in one_line(err)


def test_missing_secrets_are_named_never_taken_from_the_command_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret variable not set, a secret file missing or empty, no secret at all: one line saying where the
    secret should be (never repeating a variable's name, which may be a secret pasted in the wrong place),
    status 2; there is no flag that takes a secret."""
    flags = ["token", "s1", "--provider", "p", "--token-url", "https://example.com/token", "--client-id", "c"]
    code, _, err = run(capsys, *flags, "--client-secret-env", "MY_SECRET")
    assert code == USAGE and "client_secret_env of provider 'p' names is not set" in one_line(err)
    assert "MY_SECRET" not in err
    code, _, err = run(capsys, *flags, "--client-secret-file", str(tmp_path / "nope"))
    assert code == USAGE and "cannot read" in one_line(err)
    (tmp_path / "empty").write_text("\n")
    code, _, err = run(capsys, *flags, "--client-secret-file", str(tmp_path / "empty"))
    assert code == USAGE and "is empty" in one_line(err)
    code, _, err = run(capsys, *flags)
    assert code == USAGE and "HTTPX_UPSTREAM_AUTH_CLIENT_SECRET" in one_line(err)
    code, _, err = run(capsys, *flags, "--client-secret", "s3cret")
    assert code == USAGE and "unrecognized arguments" in one_line(err)


def test_stores_bad_unreachable_missing_extra_or_for_the_demo_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL of no known scheme or without a path, memory://, a SQLite file that cannot be made: status 2; an
    unreachable Redis: status 4; redis-py missing: status 2 with the pip install that fixes it."""
    for url, expected in (
        ("nosuch://x", "no storage is registered for the scheme 'nosuch'"),
        ("sqlite://", "needs a path"),
        ("memory://", "demo only"),
        (f"sqlite:///{tmp_path}/missing/dir/tokens.db", "check that its directory exists"),
    ):
        code, _, err = run(capsys, "--store", url, "list")
        assert code == USAGE and expected in one_line(err), (url, err)
    code, _, err = run(capsys, "--store", "redis://:pw@127.0.0.1:1/0", "list")
    assert code == RETRY_LATER and "retry later" in one_line(err) and ":pw@" not in err
    code, _, err = run(capsys, "--store", "redis://127.0.0.1:1/0", "--provider", "p", "show", "s1")
    assert code == RETRY_LATER, err
    code, _, err = run(capsys, "--store", "redis+cluster://127.0.0.1:1", "list")
    assert code == RETRY_LATER and "could not open the Redis Cluster" in one_line(err)
    code, _, err = run(capsys, "demo", "--storage", "redis://127.0.0.1:1/0", "--seconds", "1")
    assert code == RETRY_LATER and "retry later" in one_line(err)
    monkeypatch.setitem(sys.modules, "redis", None)
    code, _, err = run(capsys, "--store", "redis://127.0.0.1:1/0", "list")
    assert code == USAGE and "pip install 'httpx-upstream-auth[redis]'" in one_line(err)
    code, _, err = run(capsys, "demo", "--storage", "redis://127.0.0.1:1/0")
    assert code == USAGE and "pip install 'httpx-upstream-auth[redis]'" in one_line(err)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    code, _, err = run(capsys, "demo")
    assert code == USAGE and "pip install httpx-upstream-auth[testing]" in one_line(err)


def test_a_store_that_cannot_list_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """list on a registered third-party store without scan: status 2, one line saying it cannot list."""

    class NoScan(MemoryStorage):
        scan = Storage.scan

    register_storage("noscan-test", lambda url: NoScan())
    code, _, err = run(capsys, "--store", "noscan-test:", "list")
    assert code == USAGE and "cannot list its sessions" in one_line(err)


def test_list_skips_an_entry_deleted_while_it_lists(capsys: pytest.CaptureFixture[str]) -> None:
    """An entry the scan named but that is gone when list reads it is left out, not an error."""
    present = EntryKey("local", "present")

    class Racing(MemoryStorage):
        def scan(self, provider_id: str | None = None) -> Iterator[EntryKey]:
            yield EntryKey("local", "deleted-meanwhile")
            yield from super().scan(provider_id)

    store = Racing()
    store.put(present, UpstreamTokens(access_token="at", expires_at=4e9), expected_version=None)
    register_storage("racing-test", lambda url: store)
    code, out, _ = run(capsys, "--store", "racing-test:", "list")
    assert code == OK and [line.split("\t")[:2] for line in out.splitlines()] == [["local", "present"]]


def test_import_refuses_bad_input_without_quoting_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """Malformed JSON, a JSON array, an answer without an access token, an unreadable file: status 2; an
    error answer (invalid_grant): status 3; an id_token for another subject: status 5. Nothing is quoted. On a
    terminal, import says what to paste; --file reads a file."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    for text, status, expected in (
        ('{"access_token": "at-secret", ', USAGE, "is not JSON"),
        ('["at-secret"]', USAGE, "not a JSON object"),
        ('{"token_type": "Bearer", "refresh_token": "rt-secret"}', USAGE, "no usable access_token"),
        ('{"error": "invalid_grant"}', REAUTHENTICATE, "re-authentication required: the answer cannot be stored"),
    ):
        code, out, err = run(capsys, "--config", config, "import", "s1", stdin=text)
        assert code == status and expected in one_line(err) and "secret" not in err, (text, err)
        assert out == ""
    code, _, err = run(capsys, "--config", config, "import", "s1", "--file", str(tmp_path / "absent.json"))
    assert code == USAGE and "cannot read" in one_line(err)
    local.issue_id_token = True
    try:
        tokens = local.login(sub="carol")
    finally:
        local.issue_id_token = False
    answer = json.dumps({"access_token": tokens.access_token, "id_token": tokens.id_token, "expires_in": 60})
    code, _, err = run(capsys, "--config", config, "import", "s1", "--subject", "mallory", stdin=answer)
    assert code == IDENTITY and "another subject than --subject" in one_line(err)

    class Typed(io.StringIO):
        def isatty(self) -> bool:
            return True

    before, sys.stdin = sys.stdin, Typed(grant(local))
    try:
        code, out, err = run(capsys, "--config", config, "import", "typed")
    finally:
        sys.stdin = before
    assert code == OK and err == "paste the token endpoint's JSON answer, then press Ctrl-D\n"
    (tmp_path / "answer.json").write_text(grant(local))
    code, out, _ = run(capsys, "--config", config, "import", "s1", "--file", str(tmp_path / "answer.json"))
    assert code == OK and "session_id:           s1" in out


def test_unknown_sessions_ask_for_a_login(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """token, show, refresh and delete of a session the store does not hold: one line, status 3."""
    config = str(write_config(tmp_path, provider[1]))
    for command in ("token", "show", "refresh", "delete"):
        code, out, err = run(capsys, "--config", config, command, "nobody")
        assert code == REAUTHENTICATE and "re-authentication required" in one_line(err), command
        assert out == "", command


def test_token_refreshes_an_expired_token_once_and_maps_provider_failures(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """An expired token is refreshed once by `token`; a wrong client secret is status 2 (configuration), a
    provider that does not answer status 4 (retry later), a revoked grant status 3."""
    local, url = provider
    config = str(write_config(tmp_path, url))
    store = SQLiteStorage(tmp_path / "tokens.db")
    tokens = local.login(access_ttl=60)
    expired = UpstreamTokens(
        access_token=tokens.access_token, refresh_token=tokens.refresh_token, expires_at=1.7e9, issued_at=1.7e9 - 60,
        provider_id="local", client_id="test-client",
    )  # fmt: skip
    store.put(EntryKey("local", "s1"), expired, expected_version=None)
    store.close()
    before = local.stats["refresh_ok"]
    code, out, _ = run(capsys, "--config", config, "token", "s1")
    assert code == OK and api_status(url, out.strip()) == 200 and local.stats["refresh_ok"] == before + 1
    code, out, _ = run(capsys, "--config", config, "token", "s1", "--json")
    assert code == OK and local.stats["refresh_ok"] == before + 1, "the refreshed token is reused"
    printed = json.loads(out)
    code, out, _ = run(capsys, "--config", config, "show", "s1", "--json")
    shown = json.loads(out)
    assert code == OK and shown == {k: v for k, v in printed.items() if k != "access_token"} | {
        "expires_in": shown["expires_in"]
    }
    assert shown["access_token_sha256"] != expired.access_token and printed["access_token"] not in json.dumps(shown)

    (tmp_path / "wrong").write_text("not-the-secret")
    code, _, err = run(capsys, "--config", config, "refresh", "s1", "--client-secret-file", str(tmp_path / "wrong"))
    assert code == USAGE and "configuration error (client)" in one_line(err)
    code, _, err = run(capsys, "--config", config, "refresh", "s1", "--token-url", CLOSED_URL + "/token")
    assert code == RETRY_LATER and "retry later" in one_line(err)
    code, out, _ = run(capsys, "--config", config, "token", "s1")
    local.revoke_grant(local.grant_of(out.strip()))
    code, _, err = run(capsys, "--config", config, "refresh", "s1")
    assert code == REAUTHENTICATE and "re-authentication required" in one_line(err)


def test_discovery_url_finds_the_token_endpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str], odd_server: str
) -> None:
    """A provider configured by discovery URL refreshes at the token_endpoint its metadata names; a URL that
    serves none is status 2, one that does not answer status 4, plain http off loopback status 2."""
    local, url = provider
    config = str(write_config(tmp_path, url, token_url="", discovery_url=url + "/.well-known/openid-configuration"))
    run(capsys, "--config", config, "import", "s1", stdin=grant(local))
    before = local.stats["refresh_ok"]
    code, _, err = run(capsys, "--config", config, "refresh", "s1")
    assert code == OK and local.stats["refresh_ok"] == before + 1, err
    well_known = "/.well-known/openid-configuration"
    for discovery, status, expected in (
        (url + "/nothing-here" + well_known, USAGE, "without a token_endpoint"),
        (url + "/api/me", USAGE, "must be the issuer's /.well-known/openid-configuration or"),
        (CLOSED_URL + well_known, RETRY_LATER, "could not fetch the discovery document"),
        (odd_server + "/status/503" + well_known, RETRY_LATER, "answered HTTP 503; retry later"),
        (odd_server + "/status/429" + well_known, RETRY_LATER, "answered HTTP 429; retry later"),
        (odd_server + "/not-json" + well_known, USAGE, "answered HTTP 200 without a token_endpoint"),
        (odd_server + "/huge" + well_known, USAGE, "could not be read (larger than 64 KiB"),
        (odd_server + "/endpoint-not-a-string" + well_known, USAGE, "answered HTTP 200 without a token_endpoint"),
        ("http://example.com/.well-known/openid-configuration", USAGE, "discovery_url must be an https:// URL"),
    ):
        code, _, err = run(capsys, "--config", config, "refresh", "s1", "--discovery-url", discovery)
        assert code == status and expected in one_line(err), (discovery, err)


def test_list_on_redis_and_by_provider(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_server: RedisServer, provider: tuple[LocalProvider, str]
) -> None:
    """Sessions imported into Redis are listed (JSON lines too), all providers' or one's."""
    local = provider[0]
    store = ["--store", redis_server.url]
    for provider_id, session in (("local", "a"), ("local", "b"), ("other", "c")):
        code, _, err = run(capsys, *store, "--provider", provider_id, "import", session, stdin=grant(local))
        assert code == OK, err
    code, out, _ = run(capsys, *store, "list", "--json")
    found = {(entry["provider_id"], entry["session_id"]) for entry in map(json.loads, out.splitlines())}
    assert code == OK and {("local", "a"), ("local", "b"), ("other", "c")} <= found
    code, out, _ = run(capsys, *store, "--provider", "other", "list")
    assert code == OK and [line.split("\t")[:2] for line in out.splitlines()] == [["other", "c"]]
    for provider_id, session in (("local", "a"), ("local", "b"), ("other", "c")):
        assert run(capsys, *store, "--provider", provider_id, "delete", session)[0] == OK


def test_environment_variables_configure_the_command(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: tuple[LocalProvider, str],
) -> None:
    """HTTPX_UPSTREAM_AUTH_* variables stand in for the flags and the file (secret included); a flag wins."""
    local, url = provider
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_STORE", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_PROVIDER", "local")
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_TOKEN_URL", url + "/token")
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_CLIENT_ID", "test-client")
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_CLIENT_SECRET", "test-secret")
    assert run(capsys, "import", "s1", stdin=grant(local))[0] == OK
    code, out, err = run(capsys, "refresh", "s1")
    assert code == OK and "provider_id:          local" in out, err
    assert (tmp_path / "env.db").is_file()
    code, out, _ = run(capsys, "--store", f"sqlite:///{tmp_path}/flag.db", "list")
    assert code == OK and out == ""
    monkeypatch.delenv("HTTPX_UPSTREAM_AUTH_CLIENT_SECRET")
    monkeypatch.setenv("LOCAL_SECRET", "test-secret")
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_CLIENT_SECRET_ENV", "LOCAL_SECRET")
    code, _, err = run(capsys, "refresh", "s1")
    assert code == OK, err


def test_the_only_provider_of_the_file_is_the_default(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """A configuration file with one provider and no default_provider: that provider is used."""
    config = write_config(tmp_path, provider[1])
    config.write_text(config.read_text().replace('default_provider = "local"\n', ""))
    code, out, err = run(capsys, "--config", str(config), "import", "s1", stdin=grant(provider[0]))
    assert code == OK and "provider_id:          local" in out, err


def test_the_default_store_is_in_the_user_data_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: tuple[LocalProvider, str]
) -> None:
    """Without a store setting, entries go to tokens.db in $XDG_DATA_HOME/httpx-upstream-auth (made 0700)."""
    assert run(capsys, "--provider", "local", "import", "s1", stdin=grant(provider[0]))[0] == OK
    folder = tmp_path / "data" / "httpx-upstream-auth"
    assert (folder / "tokens.db").is_file() and folder.stat().st_mode & 0o777 == 0o700


def test_platform_directories() -> None:
    """The user data and config directories follow each platform's convention."""
    from httpx_upstream_auth._cli_config import user_config_dir, user_data_dir

    home = Path.home()
    assert user_data_dir("linux", {"XDG_DATA_HOME": "/x"}) == Path("/x/httpx-upstream-auth")
    assert user_data_dir("linux", {"XDG_DATA_HOME": "relative"}) == home / ".local/share/httpx-upstream-auth"
    assert user_data_dir("darwin", {}) == home / "Library/Application Support/httpx-upstream-auth"
    assert user_data_dir("win32", {"LOCALAPPDATA": "C:/L"}) == Path("C:/L/httpx-upstream-auth")
    assert user_data_dir("win32", {}) == home / "AppData/Local/httpx-upstream-auth"
    assert user_config_dir("linux", {}) == home / ".config/httpx-upstream-auth"
    assert user_config_dir("linux", {"XDG_CONFIG_HOME": "/c"}) == Path("/c/httpx-upstream-auth")
    assert user_config_dir("darwin", {}) == home / "Library/Application Support/httpx-upstream-auth"
    assert user_config_dir("win32", {"APPDATA": "C:/R"}) == Path("C:/R/httpx-upstream-auth")
    assert user_config_dir("win32", {}) == home / "AppData/Roaming/httpx-upstream-auth"


def test_a_reader_that_leaves_and_ctrl_c_end_quietly(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: tuple[LocalProvider, str],
) -> None:
    """`list | head`: the reader closing the pipe ends the command with status 0 and no traceback; Ctrl-C
    while import reads stdin: status 130, one line."""
    config = str(write_config(tmp_path, provider[1]))
    assert run(capsys, "--config", config, "import", "s1", stdin=grant(provider[0]))[0] == OK
    read, write = os.pipe()
    os.close(read)
    pipe = open(write, "w")  # noqa: SIM115 - main() redirects its descriptor to /dev/null
    monkeypatch.setattr(sys, "stdout", pipe)
    assert main(["--config", config, "list"]) == OK
    monkeypatch.undo()
    pipe.close()

    class Interrupted(io.StringIO):
        def read(self, size: int | None = -1) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", Interrupted())
    capsys.readouterr()
    assert main(["--config", config, "import", "s2"]) == 130
    assert one_line(capsys.readouterr().err) == "httpx-upstream-auth: interrupted"


# -- the demo and the local provider's command, in this process -------------------------------------------
class Terminal(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def summary(text: str) -> dict[str, str]:
    """The demo's summary table, by row."""
    rows = re.findall(r"^\| (.+?) +\| (.+?) +\|$", text, re.MULTILINE)
    return dict(rows)


def test_the_demo_in_one_process_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """demo --storage memory on a terminal: the live line is rewritten in place, the summary counts every
    request as ok, no reused refresh token, and at most one refresh per token lifetime; exit 0."""
    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["demo", "--storage", "memory", "--seconds", "1.5", "--tasks", "3", "--token-ttl", "0.5"])
    text = out.getvalue()
    assert code == OK, text
    assert "\r\x1b[K" in text and re.search(r"requests +\d+/s +refreshes +\d+ +reused 0 +failed 0", text)
    table = summary(text)
    assert re.fullmatch(r"\d+ \(\d+ ok, 0 failed\), \d+/s", table["requests"]) and table["reused refresh tokens"] == "0"
    refreshes, lifetimes = map(int, re.findall(r"\d+", table["refreshes"]))
    assert 1 <= refreshes <= lifetimes + 2  # one per lifetime; the lifetimes are counted from wall time
    assert table["result"] == "OK: the callers never saw an expiry"


def test_the_demo_with_worker_processes_prints_plain_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """demo with 2 worker processes on its SQLite store, stdout not a terminal: plain progress lines (no
    escape codes), then the table; 0 failed, 0 reused."""
    code, out, err = run(capsys, "demo", "--processes", "2", "--seconds", "1", "--tasks", "3", "--token-ttl", "0.5")
    assert code == OK, out + err
    assert "\x1b" not in out and re.search(r"^ +\d+ requests ", out, re.MULTILINE)
    table = summary(out)
    assert table["reused refresh tokens"] == "0" and ", 0 failed)" in table["requests"]


def test_a_demo_worker_reports_progress_then_its_result(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: tuple[LocalProvider, str],
) -> None:
    """The demo's worker process (run here): JSON progress lines while it calls, then its result, all ok."""
    local, url = provider
    store = SQLiteStorage(tmp_path / "w.db")
    store.put(EntryKey("local", "demo-session"), local.login(), expected_version=None)
    store.close()
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_DEMO_STORAGE", f"sqlite:{tmp_path}/w.db")
    code, out, _ = run(capsys, "demo-worker", url, "1", "2", "0")
    messages = [json.loads(line) for line in out.splitlines()]
    assert code == OK and all("progress" in message for message in messages[:-1]) and len(messages) >= 2
    result = messages[-1]["result"]
    assert result["ok"] > 0 and result["failed"] == 0 and result["errors"] == {}


def test_the_demo_refuses_bad_flags_and_stores(capsys: pytest.CaptureFixture[str]) -> None:
    """Out-of-range or non-numeric flags and a store it cannot open: one line, status 2, nothing run."""
    for args, expected in (
        (["--processes", "0"], "argument --processes: must be from 1 to 16, not 0"),
        (["--seconds", "600"], "argument --seconds: must be from 0.5 to 120, not 600"),
        (["--tasks", "many"], "argument --tasks: must be a whole number, not 'many'"),
        (["--seconds", "soon"], "argument --seconds: must be a number, not 'soon'"),
        (["--storage", "nosuch://x"], "--storage: no storage is registered for the scheme 'nosuch'"),
    ):
        code, _, err = run(capsys, "demo", *args)
        assert code == USAGE and expected in one_line(err), (args, err)


def test_serve_prints_credentials_writes_the_files_and_stops_on_ctrl_c(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """python -m httpx_upstream_auth.testing serve (run here): prints the token URL and every client's
    credentials, writes config.toml, a private client-secret and grant.json, and stops on Ctrl-C (status 0);
    a non-loopback host is refused (status 2)."""
    from httpx_upstream_auth.testing.__main__ import main as testing_main

    assert testing_main(["serve", "--host", "192.0.2.1"]) == USAGE
    assert "only listens on loopback" in capsys.readouterr().err
    target = tmp_path / "local"

    def serve(*args: str) -> str:
        """Run serve here; press Ctrl-C once it printed "ready"."""
        stdout: Any = sys.stdout  # pytest's capture, which keeps what was written

        def interrupt_when_ready() -> None:
            while "ready" not in stdout.getvalue():
                threading.Event().wait(0.05)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt_when_ready, daemon=True).start()
        assert testing_main(["serve", *args]) == OK
        return capsys.readouterr().out

    assert "wrote:" not in serve()
    out = serve("--write-to", str(target), "--access-ttl", "30")
    assert "test-client / test-secret (client_secret_basic)" in out and "public-client / (no secret) (none)" in out
    assert out.endswith("ready\n") and re.search(r"token URL: +http://127\.0\.0\.1:\d+/token", out)
    assert (target / "client-secret").read_text() == "test-secret\n"
    assert (target / "client-secret").stat().st_mode & 0o777 == 0o600
    answer = json.loads((target / "grant.json").read_text())
    assert answer["expires_in"] == 30 and answer["token_type"] == "Bearer" and answer["refresh_token"]
    assert 'client_id = "test-client"' in (target / "config.toml").read_text()


def test_a_demo_worker_counts_and_names_failed_requests(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    provider: tuple[LocalProvider, str],
    odd_server: str,
) -> None:
    """Requests the API refuses (HTTP 503) and requests that cannot be sent (no tokens stored: the auth raises)
    are counted as failed and named; the summary then says FAILED and returns 1."""
    store = SQLiteStorage(tmp_path / "w.db")
    store.put(EntryKey("local", "demo-session"), provider[0].login(), expected_version=None)
    store.close()
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_DEMO_STORAGE", f"sqlite:{tmp_path}/w.db")
    code, out, _ = run(capsys, "demo-worker", odd_server + "/status/503?", "0.5", "1", "0")
    refused = json.loads(out.splitlines()[-1])["result"]
    assert code == OK and refused["ok"] == 0 and refused["failed"] > 0 and list(refused["errors"]) == ["HTTP 503"]
    monkeypatch.setenv("HTTPX_UPSTREAM_AUTH_DEMO_STORAGE", f"sqlite:{tmp_path}/empty.db")
    code, out, _ = run(capsys, "demo-worker", provider[1], "0.5", "1", "0")
    unsent = json.loads(out.splitlines()[-1])["result"]
    assert unsent["failed"] > 0 and list(unsent["errors"]) == ["ReauthenticationRequired"]

    from httpx_upstream_auth._demo import print_summary

    stats = dict.fromkeys(("refresh_ok", "refresh_reuse", "invalid_grant", "api_401"), 0)
    assert print_summary([refused, unsent], stats, 2.0) == FAILED
    table = summary(capsys.readouterr().out)
    assert table["result"] == "FAILED" and table["errors"] == (
        f"HTTP 503: {refused['failed']}, ReauthenticationRequired: {unsent['failed']}"
    )
