"""A Redis storage's asyncio clients: one per event loop, each closed with its loop.

redis.asyncio connections belong to the loop that opened them, and one storage serves many loops
(successive ``asyncio.run`` calls, threads with loops of their own). Each loop's client is closed when
the loop shuts down (``asyncio.run``, ``anyio.run``), when a later loop finds it closed without that
(``run_until_complete`` + ``close``), or when the storage closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio

from ._async import AsyncCommands

__all__ = ["LoopClient", "abandon", "close_at_loop_shutdown"]


class LoopClient:
    """An event loop's asyncio client, as the commands that use it, and whether the storage made it."""

    def __init__(self, commands: AsyncCommands, *, owned: bool) -> None:
        self.commands = commands
        self.owned = owned
        #: The generator parked for the loop's life that closes the client (see :func:`close_at_loop_shutdown`).
        self.keeper: AsyncGenerator[None, None] | None = None
        #: Set once the client may be used (or ``failed`` says it may not).
        self.ready = anyio.Event()
        self.failed = False


async def close_at_loop_shutdown(
    forget: weakref.WeakMethod[Callable[[asyncio.AbstractEventLoop], None]],
    loop: asyncio.AbstractEventLoop,
    client: Any,
) -> AsyncGenerator[None, None]:
    """Park at the first ``yield`` for the life of ``loop``; then ``forget(loop)`` and close ``client``."""
    # asyncio.run() / anyio.run() close every open async generator (loop.shutdown_asyncgens) while the
    # loop still runs, which is the last moment an asyncio client can close its connections cleanly. A
    # loop closed without that is found later by the storage's sweep, and one stopped but not closed by the
    # storage's close(): both finalize this generator off the loop, with nothing to await (they close the
    # sockets themselves). ``forget`` is held weakly: the loop must not keep the storage.
    pid = os.getpid()
    try:
        yield
    finally:
        # A forked child's copy does nothing: the client and its sockets are the parent's.
        if os.getpid() == pid:  # pragma: no branch - else a child forked inside the loop ends it: no test forks there
            method = forget()
            if method is not None:
                method(loop)
            if loop.is_running():  # a stopped loop would leave the client's close half done, never awaited
                with contextlib.suppress(Exception):
                    await client.aclose()


def abandon(loop: asyncio.AbstractEventLoop, found: LoopClient) -> None:
    """Close an event loop's client from outside that loop: on the loop if it still runs, else by
    closing its sockets directly (a closed loop can no longer run the client's own close)."""
    if not found.owned:
        return
    client = found.commands.client
    if loop.is_running() and not loop.is_closed():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: loop.create_task(_aclose_quietly(client)))
            return
    # Finalize the parked generator now, so the loop's GC hook never runs it. It is None only while the loop's
    # first command prepares the client, when close() races it.
    if found.keeper is not None:  # pragma: no branch
        closing = found.keeper.aclose()
        with contextlib.suppress(BaseException):
            closing.send(None)
        closing.close()
    for connection in _connections_of(client):
        writer = getattr(connection, "_writer", None)
        transport = getattr(writer, "transport", None)
        sock = getattr(transport, "_sock", None)
        if transport is None or sock is None:
            continue
        with contextlib.suppress(Exception):
            if not loop.is_closed():
                loop._remove_reader(sock.fileno())  # type: ignore[attr-defined]
            sock.close()
            # The transport's finalizer would warn about (and re-close) a socket it still holds.
            transport._sock = None
            transport._closing = True
        with contextlib.suppress(Exception):
            connection._parser.on_disconnect()
        connection._reader = connection._writer = None  # or its finalizer warns "unclosed Connection"
    if hasattr(client, "_initialize"):  # a Cluster client: what its aclose() marks, so it does not warn
        client._initialize = True  # redis-py before 8
        client.nodes_manager.default_node = None  # redis-py 8 (its default node is its topology)


async def _aclose_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


def _connections_of(client: Any) -> list[Any]:
    """Every connection a redis.asyncio client (standalone or Cluster) holds."""
    found: list[Any] = []
    with contextlib.suppress(Exception):
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            found.extend(getattr(pool, "_available_connections", []))
            found.extend(getattr(pool, "_in_use_connections", []))
        manager = getattr(client, "nodes_manager", None)
        if manager is not None:
            nodes = {id(node): node for node in [*manager.nodes_cache.values(), *manager.startup_nodes.values()]}
            for node in nodes.values():
                found.extend(getattr(node, "_connections", []))
    return found
