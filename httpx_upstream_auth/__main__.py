"""Command line: ``httpx-upstream-auth`` / ``python -m httpx_upstream_auth`` (see ``--help``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command line (``_cli.py``); returns the exit status."""
    try:
        from ._cli import main as run
    except KeyboardInterrupt:  # Ctrl-C while the command is still loading: the same line and status as later
        print("httpx-upstream-auth: interrupted", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":  # pragma: no cover - runs only as `python -m` (the tests call main())
    sys.exit(main())
