"""Command line: ``python -m httpx_upstream_auth demo`` (see ``--help``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``demo`` (and the internal ``demo-worker``)."""
    args = sys.argv[1:] if argv is None else argv
    from . import _demo

    if args[:1] == ["demo"]:
        return _demo.main(args[1:])
    if args[:1] == ["demo-worker"]:
        return _demo.worker_main(args[1:])
    print("usage: python -m httpx_upstream_auth demo [--storage sqlite|memory|sqlite:PATH|redis://…] [--help]")
    return 2


if __name__ == "__main__":
    sys.exit(main())
