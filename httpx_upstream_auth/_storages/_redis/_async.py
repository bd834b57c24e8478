"""The Redis storage's commands, written once: ``_sync.py`` is generated from this file by
``tests/unasync_twins.py``.

:class:`AsyncCommands` sends them over one event loop's redis.asyncio client; its twin ``SyncCommands``
over the sync client (sync code, trio, worker threads). Each command holds a connection slot while it
runs, and turns redis-py's failures into :class:`StorageError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ..._models import EntryKey, UpstreamTokens
from .._base import Lease, lease_seconds, version_in_range
from ._clients import AsyncSlots
from ._errors import ErrorMap
from ._keys import SCRIPTS, KeyLayout, entry_key_of, ms

__all__ = ["AsyncCommands"]


class AsyncCommands:
    """A storage's commands over ``client``, which registers the storage's Lua scripts."""

    def __init__(self, client: Any, keys: KeyLayout, errors: ErrorMap, slots: AsyncSlots) -> None:
        self.client = client
        self.scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}
        self.keys = keys
        self.errors = errors
        self.slots = slots

    @contextlib.asynccontextmanager
    async def command(self, what: str, tokens: UpstreamTokens | None = None) -> AsyncIterator[None]:
        """Hold a connection slot for one command, and map its failures to StorageError (``what`` says
        what failed; ``tokens`` are hidden from the message)."""
        async with self.slots.slot(what):
            with self.errors.mapped(what, tokens):
                yield

    async def get(self, key: EntryKey) -> UpstreamTokens | None:
        """The entry, or ``None``."""
        async with self.command("read tokens"):
            raw = await self.client.hget(self.keys.entry(key), "d")
        return self.errors.decode(key, raw)

    async def put(
        self, key: EntryKey, tokens: UpstreamTokens, expected_version: int | None, *, retention: float, origin: str
    ) -> bool:
        """Compare-and-set: save ``tokens`` iff the entry's version is ``expected_version``; publish it."""
        if not version_in_range(expected_version):
            return False
        args = self.keys.cas_args(key, tokens, expected_version, retention, origin)
        async with self.command("save tokens", tokens):
            return bool(await self.scripts["cas"](keys=[self.keys.entry(key)], args=args))

    async def delete(self, key: EntryKey, expected_version: int | None, *, origin: str) -> bool:
        """Remove the entry (only at ``expected_version`` when given); publish it."""
        if not version_in_range(expected_version):
            return False
        args = self.keys.delete_args(key, expected_version, origin)
        async with self.command("delete tokens"):
            return bool(await self.scripts["delete"](keys=[self.keys.entry(key)], args=args))

    async def claim(self, key: EntryKey, ttl: float, owner: str, *, retake: bool) -> bool:
        """Take ``key``'s lease for ``owner``; with ``retake``, also when ``owner`` holds it already."""
        async with self.command("take the refresh lease"):
            if not retake:  # a new owner token cannot match: plain SET NX PX
                return bool(await self.client.set(self.keys.lease(key), owner, nx=True, px=ms(ttl)))
            return bool(await self.scripts["acquire"](keys=[self.keys.lease(key)], args=[owner, ms(ttl)]))

    async def renew(self, lease: Lease) -> bool:
        """Extend our lease to its ttl from now; False when it is no longer ours."""
        ttl = lease_seconds(lease.ttl)
        async with self.command("renew the refresh lease"):
            return bool(await self.scripts["renew"](keys=[self.keys.lease(lease.key)], args=[lease.owner, ms(ttl)]))

    async def release(self, lease: Lease) -> None:
        """Give the lease back if it is still ours."""
        async with self.command("release the refresh lease"):
            await self.scripts["release"](keys=[self.keys.lease(lease.key)], args=[lease.owner])

    async def version(self, key: EntryKey) -> int | None:
        """The entry's version, or ``None``: what a watcher compares."""
        async with self.command("watch for saved tokens"):
            raw = await self.client.hget(self.keys.entry(key), "v")
        return None if raw is None else int(raw)

    async def scan(self, provider_id: str | None, batch: int) -> AsyncIterator[EntryKey]:
        """The keys of the live entries under the prefix (only ``provider_id``'s when given): ``SCAN`` with
        ``MATCH`` over the entry names, on every primary of a Cluster, then each page's entries read back
        for the ids inside them (key names hold only digests). No connection is held between pages."""
        nodes = self.client.get_primaries() if self.errors.cluster else [None]
        for node in nodes:
            cursor = 0
            while True:
                cursor, keys = await self.scan_page(node, cursor, batch)
                for key in keys:
                    if provider_id is None or key.provider_id == provider_id:
                        yield key
                if cursor == 0:
                    break

    async def scan_page(self, node: Any, cursor: int, batch: int) -> tuple[int, list[EntryKey]]:
        """One ``SCAN`` step on ``node`` (``None``: the standalone server): the next cursor (0 at the end),
        and the keys of the entries it named that still exist."""
        pattern = self.keys.entry_pattern()
        async with self.command("list tokens"):
            if node is None:
                cursor, names = await self.client.scan(cursor, match=pattern, count=batch)
            else:
                cursors, names = await self.client.scan(cursor, match=pattern, count=batch, target_nodes=node)
                cursor = cursors[node.name]
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hget(name, "d")
            raws: list[Any] = await pipe.execute() if names else []  # a page may match nothing
        return int(cursor), [key for raw in raws if (key := entry_key_of(raw)) is not None]
