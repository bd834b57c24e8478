"""A gunicorn-style preload master for tests/test_fork.py: it builds the app's manager, uses it, then forks
workers that inherit it, as ``gunicorn --preload`` does.

    python tests/preload_app.py STORAGE TOKEN_URL WORKERS

Then it relays commands read from stdin, one per line, ``<worker> <command> [args]``, to that worker, and
prints the worker's one-line answer. Worker commands: ``get SESSION`` (prints the entry's user id, or
``reauth``, or ``error:<type>``), ``delete SESSION``, ``store SESSION <tokens JSON, base64>``. An empty
line ends every worker; the master prints ``exited <codes>`` and exits.
"""

from __future__ import annotations

import base64
import os
import sys
from typing import TextIO

import httpx_upstream_auth as hua
from httpx_upstream_auth import open_storage


def answer(manager: hua.TokenManager, line: str) -> str:
    """One worker command's answer."""
    command, session, *rest = line.split()
    try:
        if command == "get":
            return str(manager.get_token(session).user_id)
        if command == "delete":
            return str(manager.delete(session))
        if command == "store":
            tokens = hua.UpstreamTokens.from_json(base64.b64decode(rest[0]).decode())
            return str(manager.store(session, tokens).version)
    except hua.ReauthenticationRequired:
        return "reauth"
    except hua.UpstreamAuthError as exc:
        return f"error:{type(exc).__name__}"
    return "error:unknown command"


def serve(manager: hua.TokenManager, commands: int, answers: int) -> None:
    """A worker: answer commands from its pipe until it closes."""
    with os.fdopen(commands, "r") as inbox, os.fdopen(answers, "w") as outbox:
        for line in inbox:
            outbox.write(answer(manager, line) + "\n")
            outbox.flush()
    manager.close()


def main() -> None:
    """Build, use, fork, relay."""
    spec, token_url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    manager = hua.TokenManager(
        provider_id="local",
        storage=open_storage(spec),
        refresher=hua.OAuth2Refresher(token_url, "test-client", "test-secret"),
    )
    print("master", answer(manager, "get shared"), flush=True)  # cache, change feed and connections are live
    workers: list[tuple[int, TextIO, TextIO]] = []  # (pid, its command pipe, its answer pipe)
    for _ in range(count):
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(down_w)
            os.close(up_r)
            for _, inbox, outbox in workers:  # the siblings' pipes: their ends must close when the master's do
                inbox.close()
                outbox.close()
            code = 0
            try:
                serve(manager, down_r, up_w)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(down_r)
        os.close(up_w)
        workers.append((pid, os.fdopen(down_w, "w"), os.fdopen(up_r, "r")))
    for line in sys.stdin:
        if not line.strip():
            break
        index, command = line.split(" ", 1)
        _, inbox, outbox = workers[int(index)]
        inbox.write(command)
        inbox.flush()
        print(outbox.readline().strip(), flush=True)
    codes = []
    for pid, inbox, outbox in workers:
        inbox.close()
        outbox.close()
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    manager.close()
    print("exited", *codes, flush=True)


if __name__ == "__main__":
    main()
