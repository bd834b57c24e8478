"""``python -m httpx_upstream_auth.testing serve``: the local provider on a loopback port, until stopped.

It prints its token URL and the test clients' credentials, and with ``--write-to DIR`` writes what the
command line needs to use it: ``config.toml`` (provider ``local``: token URL, ``test-client``, the secret
in ``client-secret``) and ``grant.json``, a first login's token endpoint answer for ``httpx-upstream-auth
import``. Needs the ``testing`` extra (uvicorn).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from ._provider import LocalProvider

#: The client the written configuration uses (one of :attr:`LocalProvider.clients`' defaults).
CLIENT_ID = "test-client"
PROVIDER = "local"


def _write_private(path: Path, text: str) -> None:
    """Write ``path`` readable by its owner only, whatever was there: a new file (never one planted with looser
    modes, never through a symlink), then renamed over the old name (rename replaces a symlink, not its target)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def first_grant(provider: LocalProvider, sub: str = "alice") -> dict[str, Any]:
    """A login of ``sub`` through ``test-client``, as the token endpoint's JSON answer would carry it."""
    tokens = provider.login(sub=sub, client_id=CLIENT_ID)
    assert tokens.expires_at is not None and tokens.issued_at is not None
    answer: dict[str, Any] = {
        "access_token": tokens.access_token,
        "token_type": "Bearer",
        "expires_in": round(tokens.expires_at - tokens.issued_at),
        "refresh_token": tokens.refresh_token,
        "scope": tokens.scope,
    }
    return answer


def write_files(directory: Path, url: str, provider: LocalProvider) -> list[Path]:
    """``config.toml``, ``client-secret`` and ``grant.json`` for the provider served at ``url``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = provider.clients[CLIENT_ID][0]
    assert secret is not None
    config = directory / "config.toml"
    _write_private(
        config,
        "# The local test provider (python -m httpx_upstream_auth.testing serve): test credentials, loopback only.\n"
        f'default_provider = "{PROVIDER}"\n\n'
        f"[providers.{PROVIDER}]\n"
        f'token_url = "{url}/token"\n'
        f'client_id = "{CLIENT_ID}"\n'
        'auth_method = "client_secret_basic"\n'
        'client_secret_file = "client-secret"  # relative to this file\n',
    )
    _write_private(directory / "client-secret", secret + "\n")
    _write_private(directory / "grant.json", json.dumps(first_grant(provider)) + "\n")
    return [config, directory / "client-secret", directory / "grant.json"]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number, not {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, not {port}")
    return port


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return seconds


DESCRIPTION = """\
Serve the local OAuth provider (rotation on every refresh, a reused refresh token revokes the grant) on a
loopback port until Ctrl-C. It prints its token URL and the test clients' credentials; with --write-to DIR
it writes config.toml (provider "local": its token URL, test-client, the secret in client-secret) and
grant.json (a first login's token endpoint answer), for `httpx-upstream-auth --config DIR/config.toml import
alice --file DIR/grant.json`. Needs the testing extra (uvicorn). Exit status 0 when stopped, 2 for a bad
flag, a missing extra, a port in use or a directory it cannot write."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad flag as one line on stderr (status 2), not the usage and a second line."""

    def error(self, message: str) -> NoReturn:
        """Print the one line and exit 2."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Serve the local provider until interrupted; 2 for a bad flag or a missing extra."""
    formatting = argparse.RawDescriptionHelpFormatter
    parser = _OneLineParser(
        prog="python -m httpx_upstream_auth.testing", description=DESCRIPTION, formatter_class=formatting
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_OneLineParser)
    serve = commands.add_parser(
        "serve", help="serve the local provider", description=DESCRIPTION, formatter_class=formatting
    )
    serve.add_argument("--port", type=_port, default=0, help="the loopback port (default 0: a free one)")
    serve.add_argument("--host", metavar="ADDRESS", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    serve.add_argument(
        "--access-ttl", metavar="S", type=_seconds, default=60.0, help="access token lifetime, seconds (default 60)"
    )
    serve.add_argument("--write-to", metavar="DIR", help="write config.toml, client-secret and grant.json there")
    args = parser.parse_args(argv)
    try:
        from ._server import ServerThread

        provider = LocalProvider(access_ttl=args.access_ttl)
        server = ServerThread(provider, host=args.host, port=args.port).start()
    except (ImportError, ValueError, OSError) as exc:
        print(f"python -m httpx_upstream_auth.testing: {exc}", file=sys.stderr)
        return 2
    clients = "; ".join(
        f"{client_id} / {secret or '(no secret)'} ({method})"
        for client_id, (secret, method) in provider.clients.items()
    )
    print(f"local provider: {server.url}  (Ctrl-C stops it)")
    print(f"token URL:      {server.url}/token")
    print(f"clients:        {clients}")
    try:
        if args.write_to:
            try:
                written = write_files(Path(args.write_to), server.url, provider)
            except OSError as exc:
                print(
                    f"python -m httpx_upstream_auth.testing: cannot write to {args.write_to}: {exc.strerror}",
                    file=sys.stderr,
                )
                return 2
            print(f"wrote:          {', '.join(map(str, written))}")
        print("ready", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover - runs only as a script (the tests call main())
    sys.exit(main())
