"""Command line: ``httpx-upstream-auth`` / ``python -m httpx_upstream_auth`` (see ``--help``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command line (``_cli.py``); returns the exit status."""
    from ._cli import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
