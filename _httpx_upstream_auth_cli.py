"""The ``httpx-upstream-auth`` console script's entry point, outside the package on purpose.

Importing anything inside ``httpx_upstream_auth`` first runs the package's ``__init__`` (httpx, anyio, the
storages: most of the command's start-up time), before any handler of the command exists. Ctrl-C in that
time would print the interpreter's traceback; here it ends as every later Ctrl-C does: one line on stderr
and status 130. Nothing else belongs in this module: it must import nothing but the standard library's
``sys`` before its ``try``.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Import and run the command line; Ctrl-C at any point of it is one line and status 130."""
    try:
        from httpx_upstream_auth.__main__ import main as run

        return run()
    except KeyboardInterrupt:  # raised before (or after) the command's own handling of it
        print("httpx-upstream-auth: interrupted", file=sys.stderr)
        return 130
