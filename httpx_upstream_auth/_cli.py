"""The ``httpx-upstream-auth`` command (also ``python -m httpx_upstream_auth``): tokens for scripts.

``token`` prints a valid access token (refreshed through a :class:`TokenManager`: one refresh per
expiry, under the store's lease, whoever else refreshes), ``import`` stores a token endpoint's answer,
``show`` / ``list`` print entries without their secrets, ``delete`` forgets one, ``refresh`` forces a
refresh, ``demo`` runs the demo. Every failure is one line on stderr and an exit status that says what
to do (see :data:`EXIT_CODES`); no traceback, and no secret but the access token ``token`` prints.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import datetime
import itertools
import json
import logging
import os
import re
import signal
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ._cli_config import (
    ENV_PREFIX,
    MAX_INPUT_BYTES,
    CliConfig,
    OneLineParser,
    UsageError,
    load_config,
    quoted_short,
    read_small,
    user_config_dir,
    user_data_dir,
)
from ._clock import Clock
from ._exceptions import (
    BindingMismatch,
    ConfigurationError,
    EntryRefused,
    ReauthenticationRequired,
    RefreshFailed,
    StorageError,
    UnreadableEntry,
    UpstreamAuthError,
)
from ._manager import TokenManager
from ._models import Binding, EntryKey, UpstreamTokens
from ._refresher import OAuth2Refresher, Refresher
from ._storages import EncryptedStorage, EncryptionKey, Storage, open_storage
from ._storages._encrypted import PREFIX as SEALED_PREFIX
from ._trace import short_hash

__all__ = ["EXIT_CODES", "main"]

PROG = "httpx-upstream-auth"
#: The library's logger (``.events``, ``.mcp`` are its children).
LOGGER = "httpx_upstream_auth"
OK = 0
#: The demo ran, and found failed requests or a reused refresh token; or an error nobody foresaw.
FAILED = 1
USAGE = 2
REAUTHENTICATE = 3
RETRY_LATER = 4
#: The session's tokens are another identity's than the caller expects (nothing printed, nothing sent).
IDENTITY = 5
EXIT_CODES = {
    OK: "success",
    FAILED: "the demo found a failure, or an unexpected error",
    USAGE: "usage or configuration error (a flag, the configuration file, the input, a missing extra, an output "
    "that cannot be written): fix it",
    REAUTHENTICATE: "re-authentication required: no entry for the session, no refresh token, or a dead grant",
    RETRY_LATER: "transient failure (the provider or the store is unreachable or overloaded): retry later",
    IDENTITY: "identity mismatch: the session's tokens are not the --expect-* identity's (or the provider's id_token "
    "names another subject): nothing printed; check the session id, or log the user in again",
    130: "interrupted: 128 + the signal (SIGINT 130, SIGTERM 143, SIGHUP 129), after a refresh in flight was saved",
}


def _epilog() -> str:
    codes = "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())
    return (
        f"exit status:\n{codes}\n\n"
        "configuration (a flag wins over the environment, which wins over the configuration file):\n"
        f"  --config    {ENV_PREFIX}CONFIG     the TOML file (default: {user_config_dir() / 'config.toml'})\n"
        f"  --store     {ENV_PREFIX}STORE      sqlite:///PATH (default: {user_data_dir() / 'tokens.db'}),\n"
        "              redis://..., rediss://..., redis+cluster://..., or a registered scheme\n"
        f"  --provider  {ENV_PREFIX}PROVIDER   a provider (default: the file's default_provider, or its only one)\n"
        f"  the client secret: {ENV_PREFIX}CLIENT_SECRET, or client_secret_env / client_secret_file; never a flag\n"
    )


def _common(parser: argparse.ArgumentParser, default: Any) -> None:
    """The options every command takes (before or after the command's name)."""
    parser.add_argument("--config", metavar="PATH", default=default, help="the TOML configuration file")
    parser.add_argument("--store", metavar="URL", default=default, help="where tokens are stored (a storage URL)")
    parser.add_argument("--provider", metavar="NAME", default=default, help="the provider (its id in the store)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="also show the library's log lines (warnings, events, debug) on stderr; they never hold a secret",
    )


def _auth_method(text: str) -> str:
    methods = ("client_secret_basic", "client_secret_post", "none")
    if text not in methods:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(methods)} (the value given is not repeated)")
    return text


def _refresh_flags(parser: argparse.ArgumentParser) -> None:
    """How to reach the provider's token endpoint, when not (only) in the configuration file."""
    group = parser.add_argument_group("provider (override the configuration file)")
    group.add_argument("--token-url", metavar="URL", help="the token endpoint")
    group.add_argument("--discovery-url", metavar="URL", help="the issuer's metadata (token_endpoint is read from it)")
    group.add_argument("--client-id", metavar="ID", help="the OAuth client id")
    group.add_argument(
        "--auth-method",
        metavar="{client_secret_basic,client_secret_post,none}",
        type=_auth_method,  # not choices=: argparse would repeat the value, which may be a secret pasted there
        help="how the client authenticates at the token endpoint (default client_secret_basic)",
    )
    group.add_argument("--client-secret-env", metavar="VAR", help="the environment variable holding the secret")
    group.add_argument("--client-secret-file", metavar="PATH", help="the file holding the secret")


def _expect_flags(parser: argparse.ArgumentParser) -> None:
    """The identity the session's entry must belong to (:class:`Binding`): checked before anything is sent or
    printed; a mismatch is status 5."""
    group = parser.add_argument_group(
        "expected identity (the entry must match each one given, else status 5 and nothing is printed)"
    )
    group.add_argument("--expect-user-id", metavar="ID", type=_nonempty("--expect-user-id"), help="its user_id")
    group.add_argument(
        "--expect-subject", metavar="SUB", type=_nonempty("--expect-subject"), help="its upstream_subject"
    )
    group.add_argument(
        "--expect-client-id", metavar="ID", type=_nonempty("--expect-client-id"), help="the client it was issued to"
    )


def _nonempty(what: str) -> Callable[[str], str]:
    """An argparse type refusing an empty value: most often an unset shell variable (``"$SESSION"``)."""

    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"{what} is empty (an unset variable?)")
        return text

    return parse


_SESSION = _nonempty("SESSION")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    from . import __version__

    parser = OneLineParser(
        prog=PROG,
        allow_abbrev=False,
        description="Upstream OAuth tokens for scripts: print, import, inspect, refresh and delete them.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _common(parser, None)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True

    def command(name: str, summary: str, description: str, refreshes: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            allow_abbrev=False,
            help=summary,
            description=textwrap.fill(description, 100),
            epilog=_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common(sub, argparse.SUPPRESS)
        if refreshes:
            _refresh_flags(sub)
        return sub

    token = command(
        "token",
        "print a valid access token (refreshed first if needed)",
        "Print the session's access token, refreshed first if it expires soon: only the token on stdout, so "
        '`curl -H "Authorization: Bearer $(httpx-upstream-auth token SESSION)"` works.',
        refreshes=True,
    )
    token.add_argument("session", metavar="SESSION", type=_SESSION)
    _expect_flags(token)
    token.add_argument("--json", action="store_true", help="print the entry (secrets hidden) plus access_token")

    imported = command(
        "import",
        "store a token endpoint's JSON answer for a session",
        "Store a token endpoint's JSON answer (after a login's code exchange) for SESSION, read from stdin or "
        "--file; expires_in becomes an absolute expiry. Prints the stored entry (secrets hidden).",
        refreshes=True,
    )
    imported.add_argument("session", metavar="SESSION", type=_SESSION)
    imported.add_argument("--file", metavar="PATH", help="read the answer from PATH (default: stdin)")
    imported.add_argument(
        "--user-id", metavar="ID", type=_nonempty("--user-id"), help="binding: your application's user id"
    )
    imported.add_argument(
        "--subject",
        metavar="SUB",
        type=_nonempty("--subject"),
        help="binding: the upstream subject (checked against an id_token's sub)",
    )
    imported.add_argument(
        "--issuer", metavar="URL", type=_nonempty("--issuer"), help="the authorization server that issued the tokens"
    )
    imported.add_argument("--json", action="store_true", help="print the stored entry as JSON")

    show = command("show", "print a session's entry (secrets hidden)", "Print SESSION's entry without its secrets.")
    show.add_argument("session", metavar="SESSION", type=_SESSION)
    show.add_argument("--json", action="store_true", help="print it as JSON")

    listing = command(
        "list",
        "list the stored sessions (secrets hidden)",
        "List the stored sessions, one per line: all providers', or --provider's only.",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    delete = command("delete", "forget a session's tokens (logout)", "Delete SESSION's entry.")
    delete.add_argument("session", metavar="SESSION", type=_SESSION)

    refresh = command(
        "refresh",
        "refresh a session's tokens now",
        "Refresh SESSION now, even when its token is still valid, through the token manager: one refresh "
        "however many callers ask at once, under the store's lease. Prints the new entry (secrets hidden).",
        refreshes=True,
    )
    refresh.add_argument("session", metavar="SESSION", type=_SESSION)
    refresh.add_argument("--json", action="store_true", help="print it as JSON")
    _expect_flags(refresh)

    commands.add_parser("demo", help="run the demo (see demo --help)", add_help=False)
    return parser


# -- entry point ------------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C's KeyboardInterrupt would be, so it takes the same path: the
    refresh in flight finishes and is saved (or fails closed) before the command exits ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


#: The signals a supervisor or a closing terminal sends (``timeout``, systemd, ``docker stop``), handled like Ctrl-C.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (see :data:`EXIT_CODES`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    previous = {signum: signal.signal(signum, _interrupt) for signum in STOP_SIGNALS}
    logger = logging.getLogger(LOGGER)
    # Quiet by default: a failure is the command's one line, not also the library's log events on stderr
    # (Python's last-resort handler would print every warning).
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False
    try:
        return _run(args)
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        if signum == signal.SIGINT:
            return _fail(128 + signum, "interrupted")
        return _fail(128 + signum, f"interrupted ({signal.Signals(signum).name})")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        # A job's thread may still log its last event after this returns: without any handler, Python's
        # last-resort one would print it, so a NullHandler stays when the logger had none.
        logger.handlers[:], logger.level, logger.propagate = saved[0] or [logging.NullHandler()], *saved[1:]


def _run(args: list[str]) -> int:
    try:
        if sys.stdout is None:  # started with stdout closed (`>&-`): print() would drop every line silently
            raise UsageError("stdout is closed: nowhere to print the output")
        demo = _demo_args(args)
        if demo is not None:  # the demo parses its own flags
            from . import _demo

            return _demo.main(demo[1:]) if demo[0] == "demo" else _demo.worker_main(demo[1:])
        flags = build_parser().parse_args(args)
        if flags.verbose:
            _verbose()
        code = _COMMANDS[flags.command](flags, load_config(flags))
        _output(sys.stdout.flush)  # here, where a reader that left or a full disk is caught, rather than at exit
        return code
    except UsageError as exc:
        return _fail(USAGE, str(exc))
    except ConfigurationError as exc:
        return _fail(USAGE, f"configuration error ({exc.setting}): {exc}")
    except ReauthenticationRequired as exc:
        return _fail(REAUTHENTICATE, f"re-authentication required: {exc}")
    except BindingMismatch as exc:
        return _fail(IDENTITY, f"identity mismatch: {exc}")
    except RefreshFailed as exc:
        if exc.retryable:
            return _fail(RETRY_LATER, f"refresh failed, retry later: {exc}")
        return _fail(USAGE, f"refresh failed: {exc}")
    except EntryRefused as exc:  # the keys do not open it: a configuration to fix, or an entry to replace
        code = USAGE if exc.reason in ("unknown_key", "plaintext") else REAUTHENTICATE
        return _fail(code, f"the encrypted store refused the entry: {exc}")
    except UnreadableEntry as exc:  # retrying will not help: its text says to delete the entry
        return _fail(USAGE, f"token store error: {exc}")
    except StorageError as exc:
        return _fail(RETRY_LATER, f"token store error, retry later: {exc}")
    except UpstreamAuthError as exc:  # pragma: no cover - every UpstreamAuthError subclass is handled above
        return _fail(FAILED, str(exc))
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        _drop_output()
        return OK
    except _OutputFailed as exc:  # a full disk (/dev/full), a device error
        _drop_output()
        return _fail(USAGE, str(exc))
    except Exception as exc:  # a bug, or a failure nobody foresaw: still one line (its text may hold a secret)
        return _fail(FAILED, f"unexpected error ({type(exc).__name__}); run again with --verbose, or report it")


_GLOBAL_VALUED = ("--config", "--store", "--provider")
_DEMO_OPTIONS = "the demo takes no --config, --store or --provider: its store is `demo --storage URL`"


def _demo_args(args: list[str]) -> list[str] | None:
    """``args`` from ``demo`` (or ``demo-worker``) on, when that is the command; ``None`` for any other one.

    ``--verbose`` may come first, as for every command; the options naming a configuration, a store or a
    provider are refused, the demo running its own provider on its own store.
    """
    at = 0
    while at < len(args) and args[at].startswith("--"):
        name = args[at].split("=", 1)[0]
        if name not in (*_GLOBAL_VALUED, "--verbose"):
            return None
        at += 2 if name in _GLOBAL_VALUED and "=" not in args[at] else 1
    if args[at : at + 1] not in (["demo"], ["demo-worker"]):
        return None
    if any(arg.split("=", 1)[0] in _GLOBAL_VALUED for arg in args[:at]):
        raise UsageError(_DEMO_OPTIONS)
    if "--verbose" in args[:at]:
        _verbose()
    return args[at:]


class _OutputFailed(Exception):
    """Writing stdout failed (not a reader that left: that is a BrokenPipeError)."""


def _output(write: Callable[[], object]) -> None:
    """``write()`` to stdout, its failure an :class:`_OutputFailed` saying so."""
    try:
        write()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise _OutputFailed(f"cannot write the output to stdout ({exc.strerror or type(exc).__name__})") from None


def _say(line: str) -> None:
    """Print one line of output on stdout."""
    _output(lambda: print(line))


def _drop_output() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not fail a second time, loudly."""
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())


def _verbose() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: log: %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)


def _fail(code: int, message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


# -- opening things -------------------------------------------------------------------------------------
def _open_store(config: CliConfig) -> Storage:
    """The configured store, wrapped in :class:`EncryptedStorage` when encryption keys are configured."""
    keys = [_key(text, config.keys_origin) for text in config.encryption_keys]
    storage = _open_url(config.store)
    if not keys:
        return storage
    try:
        return EncryptedStorage(storage, keys)
    except (ImportError, ValueError) as exc:  # no cryptography; two keys with one id (never a key in the text)
        storage.close()
        raise UsageError(f"the encryption keys in {config.keys_origin}: {exc}") from None


def _key(text: str, origin: str) -> EncryptionKey:
    key_id, _, encoded = text.rpartition(":")
    try:
        return EncryptionKey(base64.b64decode(encoded, validate=True), key_id or None)
    except (binascii.Error, ValueError):
        # The keys are secrets: say where they are, never what they are.
        raise UsageError(
            f"the encryption keys in {origin} must be [KEY_ID:]BASE64 keys of 16, 24 or 32 bytes, newest first"
        ) from None


def _open_url(url: str) -> Storage:
    if url.split(":", 1)[0].lower() == "memory":
        # One process's memory: what it stores is gone when the command exits.
        raise UsageError("memory:// lives in one process and forgets everything at exit: it is for the demo only")
    if url.split(":", 1)[0].lower() == "sqlite":
        parts = urllib.parse.urlsplit(url)
        # sqlite://rel.db would be ./rel.db (a cron job and a shell see different stores); a query or a fragment
        # would become part of the file's name.
        if parts.netloc or parts.query or parts.fragment or "?" in url or "#" in url:
            raise UsageError(
                "a sqlite store URL takes no host, query (?...) or fragment (#...): use sqlite:///ABSOLUTE/PATH"
            )
    if url == "sqlite:///" + str(user_data_dir() / "tokens.db"):  # the default: its directory is ours to make
        try:
            user_data_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise UsageError(
                f"cannot create the default store's directory {user_data_dir()} ({exc.strerror}): fix it, or choose "
                f"a store with --store or {ENV_PREFIX}STORE"
            ) from None
    try:
        return open_storage(url)
    except StorageError as exc:
        if url.lower().startswith("sqlite:"):  # a file that cannot be opened: its path needs fixing
            raise UsageError(str(exc)) from None
        raise
    except ImportError as exc:
        raise UsageError(f"{exc}") from None
    except ValueError as exc:  # the messages never repeat the URL, which may carry a password
        raise UsageError(f"bad store URL: {exc}") from None


class _NoRefresher(Refresher):
    """The refresher of a command that never refreshes (import, delete): says so if asked."""

    # TokenManager.store and .delete, all these commands call, never ask a refresher for anything.
    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:  # pragma: no cover - see above
        raise ConfigurationError("this command does not refresh tokens", setting="token_url")

    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:  # pragma: no cover - see above
        raise ConfigurationError("this command does not refresh tokens", setting="token_url")


def _refresher(config: CliConfig) -> Refresher:
    settings = config.settings
    assert settings is not None  # a provider was chosen
    if settings.client_id is None:
        raise UsageError(
            f"provider {settings.name!r} has no client_id: set it in the configuration file, with --client-id, or "
            f"{ENV_PREFIX}CLIENT_ID"
        )
    token_url = settings.resolve_token_url()
    secret = settings.client_secret(os.environ)
    try:
        return OAuth2Refresher(
            token_url,
            settings.client_id,
            secret,
            auth_method=settings.auth_method,  # type: ignore[arg-type]  # checked by load_config
            scope=settings.scope,
        )
    except ValueError as exc:
        raise UsageError(f"provider {settings.name!r}: {exc}") from None


def _manager(config: CliConfig, *, refreshes: bool) -> TokenManager:
    provider = config.require_provider()
    refresher = _refresher(config) if refreshes else _NoRefresher()
    return TokenManager(
        refresher=refresher,
        provider_id=provider,
        storage=_open_store(config),
        failure_window=0,
        refresh_timeout=REFRESH_TIMEOUT,
    )


#: The CLI's refresh_timeout: a job (the token request, then its writes) ends within twice this.
REFRESH_TIMEOUT = 15.0


def _closing(manager: TokenManager, run: Callable[[TokenManager], int]) -> int:
    try:
        code = run(manager)
    except KeyboardInterrupt:
        # A refresh may have been sent: its rotated token must be saved before the process ends, so later
        # signals (an impatient Ctrl-C, a supervisor's repeated SIGTERM) are only recorded until close()
        # returns; the command then exits for the first one, re-raised here.
        with _signals_held():
            print(
                f"{PROG}: waiting up to {2 * REFRESH_TIMEOUT:.0f} s for a refresh in flight to be saved",
                file=sys.stderr,
            )
            manager.close()
        raise
    manager.close()
    return code


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Record (ignore) SIGINT and the stop signals inside the block; restore their handlers after it."""
    held = (signal.SIGINT, *STOP_SIGNALS)
    previous = {signum: signal.signal(signum, _record) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _record(signum: int, frame: object) -> None:
    """A signal while a refresh in flight is saved: the command already exits for the first one."""


# -- output -----------------------------------------------------------------------------------------------
def redacted(key: EntryKey, tokens: UpstreamTokens, now: float | None = None) -> dict[str, Any]:
    """What may be shown of an entry: everything but its secrets (the access token as a short hash)."""
    now = time.time() if now is None else now
    return {
        "provider_id": key.provider_id,
        "session_id": key.session_id,
        "token_type": tokens.token_type,
        "scope": tokens.scope,
        "expires_at": tokens.expires_at,
        "expires_in": None if tokens.expires_at is None else round(tokens.expires_at - now),
        "refresh_expires_at": tokens.refresh_expires_at,
        "issued_at": tokens.issued_at,
        "has_refresh_token": tokens.refresh_token is not None,
        "has_id_token": tokens.id_token is not None,
        "user_id": tokens.user_id,
        "upstream_subject": tokens.upstream_subject,
        "client_id": tokens.client_id,
        "issuer": tokens.issuer,
        "version": tokens.version,
        "access_token_sha256": short_hash(tokens.access_token),
    }


def _when(epoch: float | None, now: float) -> str:
    if epoch is None:
        return "unknown"
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    delta = round(epoch - now)
    return f"{stamp} (in {delta} s)" if delta >= 0 else f"{stamp} ({-delta} s ago)"


def escaped(text: str) -> str:
    """``text`` fit for a terminal line: backslashes and every non-printable character (controls, escapes,
    line and tab characters, bidi overrides, undecodable bytes) written as Python escapes, so a stored
    session id or binding can neither forge a line nor drive the terminal."""
    return "".join("\\\\" if char == "\\" else char if char.isprintable() else repr(char)[1:-1] for char in text)


def _print_entry(entry: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _say(json.dumps(entry, sort_keys=True))
        return
    now = time.time()
    for name, value in entry.items():
        if name in ("expires_at", "refresh_expires_at", "issued_at"):
            value = _when(value, now)
        elif name == "expires_in":
            continue
        elif value is None:
            value = "-"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        _say(f"{name + ':':21} {escaped(str(value))}")


def _line(entry: dict[str, Any]) -> str:
    expires = "expiry unknown" if entry["expires_in"] is None else _relative(entry["expires_in"])
    refresh = "refresh token" if entry["has_refresh_token"] else "no refresh token"
    user = escaped(entry["user_id"] or entry["upstream_subject"] or "-")
    provider, session = escaped(entry["provider_id"]), escaped(entry["session_id"])
    return f"{provider}\t{session}\t{expires}\tv{entry['version']}\t{refresh}\tuser {user}"


def _relative(seconds: int) -> str:
    return f"expires in {seconds} s" if seconds >= 0 else f"expired {-seconds} s ago"


# -- the commands -----------------------------------------------------------------------------------------
def _expected(flags: argparse.Namespace) -> Binding | None:
    """The identity ``--expect-*`` names (``None``: no check)."""
    expect = Binding(
        user_id=flags.expect_user_id, upstream_subject=flags.expect_subject, client_id=flags.expect_client_id
    )
    return None if expect == Binding() else expect


def _token(flags: argparse.Namespace, config: CliConfig) -> int:
    def run(manager: TokenManager) -> int:
        if _read(manager.storage, EntryKey(manager.provider_id, flags.session), config) is None:
            raise _missing(manager.provider_id, flags.session)
        tokens = manager.get_token(flags.session, _expected(flags))
        if flags.json:
            entry = redacted(EntryKey(manager.provider_id, flags.session), tokens)
            entry["access_token"] = tokens.access_token
            _say(json.dumps(entry, sort_keys=True))
        else:
            _say(tokens.access_token)
        return OK

    return _closing(_manager(config, refreshes=True), run)


_PASS_ANSWER = "pass the token endpoint's JSON answer"


#: An OAuth error code fit to quote (RFC 6749 section 5.2 codes are of this shape); anything else is not repeated.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _answer_problem(error: object) -> str:
    """Why ``import`` cannot store an answer whose ``error`` member is ``error``, in import's words (the
    library's speak of a refresh)."""
    if error is None:
        return f"it has no usable access_token: {_PASS_ANSWER} of a successful login"
    code = f" ({error})" if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else ""
    return f"it is an error answer{code}, not tokens: {_PASS_ANSWER} of a successful login"


def _read_answer(flags: argparse.Namespace) -> dict[str, Any]:
    source = "stdin" if flags.file in (None, "-") else flags.file
    if source == "stdin" and sys.stdin is None:  # started with stdin closed (`<&-`)
        raise UsageError("stdin is closed: pass the token endpoint's JSON answer on stdin, or with --file PATH")
    if source == "stdin" and sys.stdin.isatty():
        print("paste the token endpoint's JSON answer, then press Ctrl-D", file=sys.stderr)
    if source == "stdin":
        stream: Any = getattr(sys.stdin, "buffer", sys.stdin)
        data = stream.read(MAX_INPUT_BYTES + 1)
        data = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        if len(data) > MAX_INPUT_BYTES:
            raise UsageError(f"the answer on stdin is larger than {MAX_INPUT_BYTES // 1024} KiB: not a token answer")
    else:
        data = read_small(Path(source), "the answer file")
    if not data.strip():
        raise UsageError(f"the answer on {source} is empty: {_PASS_ANSWER}")
    try:
        answer = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"the answer on {source} is not UTF-8 text: pass the token endpoint's JSON answer") from None
    except RecursionError:
        raise UsageError(
            f"the answer on {source} is nested too deeply: pass the token endpoint's JSON answer"
        ) from None
    except ValueError:
        # Never quote the text: it holds tokens.
        raise UsageError(f"the answer on {source} is not JSON: pass the token endpoint's JSON answer") from None
    if not isinstance(answer, dict):
        raise UsageError(f"the answer on {source} is not a JSON object: pass the token endpoint's JSON answer")
    return answer


def _import(flags: argparse.Namespace, config: CliConfig) -> int:
    answer = _read_answer(flags)
    provider = config.require_provider()
    assert config.settings is not None  # a provider was chosen
    client_id = config.settings.client_id
    error = answer.get("error")
    _check_expires_in(answer.get("expires_in"))
    try:
        tokens = UpstreamTokens.from_token_response(
            answer,
            provider_id=provider,
            user_id=flags.user_id,
            upstream_subject=flags.subject,
            client_id=client_id,
            issuer=flags.issuer,
        )
    except ReauthenticationRequired:  # invalid_grant: the login's code exchange failed; the user logs in again
        raise ReauthenticationRequired(f"the answer cannot be stored: {_answer_problem(error)}") from None
    except RefreshFailed:
        # Another error answer, or no usable access token: nothing was sent, retrying cannot help. (The library's
        # texts speak of a refresh; here it was an answer given to import.)
        raise UsageError(f"the answer cannot be stored: {_answer_problem(error)}") from None
    except BindingMismatch:
        raise BindingMismatch(
            "the answer's id_token names another subject than --subject (or could not be read); nothing was "
            "stored. Check that the answer is this user's login."
        ) from None
    finally:
        del answer

    def run(manager: TokenManager) -> int:
        if not config.encryption_keys:
            _refuse_plaintext_next_to_sealed(manager.storage, EntryKey(provider, flags.session))
        stored = manager.store(flags.session, tokens)
        _print_entry(redacted(EntryKey(provider, flags.session), stored), flags.json)
        return OK

    return _closing(_manager(config, refreshes=False), run)


#: The longest ``expires_in`` import takes (ten years): a larger one is a unit mistake, not a lifetime.
MAX_EXPIRES_IN = 10 * 365 * 86400


def _check_expires_in(value: object) -> None:
    """Refuse an ``expires_in`` that is not a positive number of seconds: kept as "unknown", ``token`` would
    then serve the access token forever (it never sees the API's 401, so it never refreshes)."""
    if value is None:
        return
    try:
        seconds = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
    except ValueError:
        seconds = None
    if seconds is None or not 0 < seconds <= MAX_EXPIRES_IN:
        raise UsageError(
            f"the answer's expires_in must be a positive number of seconds, at most {MAX_EXPIRES_IN} (the value "
            "is not repeated): check the answer, or leave expires_in out if the provider gives none"
        )


#: How many of the provider's entries ``import`` looks at for sealed ones, when no encryption key is configured.
SEALED_SAMPLE = 20


class _Unreadable(UsageError):
    """An entry the store cannot read (``list`` names it and goes on)."""


def _sealed(key: EntryKey) -> UsageError:
    return UsageError(
        f"session {quoted_short(key.session_id)} of provider {key.provider_id!r} is encrypted (EncryptedStorage): "
        f"configure the store's keys with {ENV_PREFIX}ENCRYPTION_KEYS, or encryption_keys_env / "
        "encryption_keys_file in the configuration file"
    )


def _read(storage: Storage, key: EntryKey, config: CliConfig) -> UpstreamTokens | None:
    """``key``'s entry; :class:`UsageError` naming the session for an entry that cannot be read, or that is sealed
    while no key is configured (it would read as a blob of a token, and no refresh token)."""
    try:
        tokens = storage.get(key)
    except UnreadableEntry as exc:
        raise _Unreadable(f"session {quoted_short(key.session_id)}: {exc}") from None  # its text says to delete it
    if tokens is not None and not config.encryption_keys and tokens.access_token.startswith(SEALED_PREFIX + "."):
        raise _sealed(key)
    return tokens


def _refuse_plaintext_next_to_sealed(storage: Storage, key: EntryKey) -> None:
    """Without keys, ``import`` must not write a plaintext entry into an encrypted store (the application would
    refuse it, and the refresh token would lie in clear): look at the session's entry and a few others."""
    keys = [key]
    with contextlib.suppress(NotImplementedError):  # a store that cannot list: the session's entry is all we see
        keys += itertools.islice(storage.scan(key.provider_id), SEALED_SAMPLE)
    for other in keys:
        try:
            tokens = storage.get(other)
        except UnreadableEntry:
            continue
        if tokens is not None and tokens.access_token.startswith(SEALED_PREFIX + "."):
            raise _sealed(other)


def _missing(provider: str, session: str) -> ReauthenticationRequired:
    return ReauthenticationRequired(
        f"no entry for session {quoted_short(session)} of provider {provider!r} in this store; import one or log "
        "the user in"
    )


def _show(flags: argparse.Namespace, config: CliConfig) -> int:
    key = EntryKey(config.require_provider(), flags.session)
    storage = _open_store(config)
    try:
        tokens = _read(storage, key, config)
    finally:
        storage.close()
    if tokens is None:
        raise _missing(key.provider_id, key.session_id)
    _print_entry(redacted(key, tokens), flags.json)
    return OK


def _entries(
    storage: Storage, provider: str | None, config: CliConfig, skipped: list[EntryKey]
) -> Iterator[tuple[EntryKey, UpstreamTokens]]:
    """Every listed entry; one that cannot be read is named on stderr, added to ``skipped`` and passed over
    (the rest are still listed); so is one the encrypted store refuses. A sealed entry without keys ends the
    listing: the whole store is sealed."""
    for key in storage.scan(provider):
        try:
            tokens = _read(storage, key, config)
        except _Unreadable as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            skipped.append(key)
            continue
        except EntryRefused as exc:  # one moved or tampered entry must not hide the others
            refused = f"session {quoted_short(key.session_id)}: the encrypted store refused the entry: {exc}"
            print(f"{PROG}: {refused}", file=sys.stderr)
            skipped.append(key)
            continue
        if tokens is not None:  # deleted since the scan named it
            yield key, tokens


def _list(flags: argparse.Namespace, config: CliConfig) -> int:
    storage = _open_store(config)
    provider = getattr(flags, "provider", None) or os.environ.get(ENV_PREFIX + "PROVIDER") or None
    skipped: list[EntryKey] = []
    try:
        for key, tokens in _entries(storage, provider, config, skipped):
            entry = redacted(key, tokens)
            _say(json.dumps(entry, sort_keys=True) if flags.json else _line(entry))
    except NotImplementedError as exc:
        raise UsageError(f"this store cannot list its sessions: {exc}") from None
    finally:
        storage.close()
    return USAGE if skipped else OK


def _delete(flags: argparse.Namespace, config: CliConfig) -> int:
    def run(manager: TokenManager) -> int:
        if not manager.delete(flags.session):
            raise _missing(manager.provider_id, flags.session)
        _say(f"deleted session {flags.session!r} of provider {manager.provider_id!r}")
        return OK

    return _closing(_manager(config, refreshes=False), run)


def _refresh(flags: argparse.Namespace, config: CliConfig) -> int:
    def run(manager: TokenManager) -> int:
        key = EntryKey(manager.provider_id, flags.session)
        current = _read(manager.storage, key, config)
        if current is None:
            raise _missing(key.provider_id, key.session_id)
        # The manager's single-flight refresh under the store's lease, unless another worker stored a newer
        # token meanwhile (then that one is the answer).
        tokens = manager.refresh(flags.session, _expected(flags))
        _print_entry(redacted(key, tokens), flags.json)
        return OK

    return _closing(_manager(config, refreshes=True), run)


_COMMANDS: dict[str, Callable[[argparse.Namespace, CliConfig], int]] = {
    "token": _token,
    "import": _import,
    "show": _show,
    "list": _list,
    "delete": _delete,
    "refresh": _refresh,
}
