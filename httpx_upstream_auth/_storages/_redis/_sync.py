# Generated from _async.py by tests/unasync_twins.py: do not edit.
"""The Redis storage's commands, blocking: generated from ``_async.py`` (the source) by
``tests/unasync_twins.py``.

:class:`SyncCommands` sends them over the blocking redis client (sync code, trio, worker threads); its
source ``AsyncCommands`` over one event loop's redis.asyncio client. Each command holds a connection slot while it
runs, and turns redis-py's failures into :class:`StorageError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..._models import EntryKey, UpstreamTokens
from .._base import Lease, lease_seconds, version_in_range
from ._clients import SyncSlots
from ._errors import ErrorMap
from ._keys import SCRIPTS, KeyLayout, entry_key_of, ms

__all__ = ["SyncCommands"]


class SyncCommands:
    """A storage's commands over ``client``, which registers the storage's Lua scripts."""

    def __init__(self, client: Any, keys: KeyLayout, errors: ErrorMap, slots: SyncSlots) -> None:
        self.client = client
        self.scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}
        self.keys = keys
        self.errors = errors
        self.slots = slots

    @contextlib.contextmanager
    def command(self, what: str, tokens: UpstreamTokens | None = None) -> Iterator[None]:
        """Hold a connection slot for one command, and map its failures to StorageError (``what`` says
        what failed; ``tokens`` are hidden from the message)."""
        with self.slots.slot(what):
            with self.errors.mapped(what, tokens):
                yield

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """The entry, or ``None``."""
        with self.command("read tokens"):
            raw = self.client.hget(self.keys.entry(key), "d")
        return self.errors.decode(key, raw)

    def put(
        self, key: EntryKey, tokens: UpstreamTokens, expected_version: int | None, *, retention: float, origin: str
    ) -> bool:
        """Compare-and-set: save ``tokens`` iff the entry's version is ``expected_version``; publish it."""
        if not version_in_range(expected_version):
            return False
        args = self.keys.cas_args(key, tokens, expected_version, retention, origin)
        with self.command("save tokens", tokens):
            return bool(self.scripts["cas"](keys=[self.keys.entry(key)], args=args))

    def delete(self, key: EntryKey, expected_version: int | None, *, origin: str) -> bool:
        """Remove the entry (only at ``expected_version`` when given); publish it."""
        if not version_in_range(expected_version):
            return False
        args = self.keys.delete_args(key, expected_version, origin)
        with self.command("delete tokens"):
            return bool(self.scripts["delete"](keys=[self.keys.entry(key)], args=args))

    def claim(self, key: EntryKey, ttl: float, owner: str, *, retake: bool) -> bool:
        """Take ``key``'s lease for ``owner``; with ``retake``, also when ``owner`` holds it already."""
        with self.command("take the refresh lease"):
            if not retake:  # a new owner token cannot match: plain SET NX PX
                return bool(self.client.set(self.keys.lease(key), owner, nx=True, px=ms(ttl)))
            return bool(self.scripts["acquire"](keys=[self.keys.lease(key)], args=[owner, ms(ttl)]))

    def renew(self, lease: Lease) -> bool:
        """Extend our lease to its ttl from now; False when it is no longer ours."""
        ttl = lease_seconds(lease.ttl)
        with self.command("renew the refresh lease"):
            return bool(self.scripts["renew"](keys=[self.keys.lease(lease.key)], args=[lease.owner, ms(ttl)]))

    def release(self, lease: Lease) -> None:
        """Give the lease back if it is still ours."""
        with self.command("release the refresh lease"):
            self.scripts["release"](keys=[self.keys.lease(lease.key)], args=[lease.owner])

    def version(self, key: EntryKey) -> int | None:
        """The entry's version, or ``None``: what a watcher compares."""
        with self.command("watch for saved tokens"):
            raw = self.client.hget(self.keys.entry(key), "v")
        return None if raw is None else int(raw)

    def scan(self, provider_id: str | None, batch: int) -> Iterator[EntryKey]:
        """The keys of the live entries under the prefix (only ``provider_id``'s when given): ``SCAN`` with
        ``MATCH`` over the entry names, on every primary of a Cluster, then each page's entries read back
        for the ids inside them (key names hold only digests). No connection is held between pages."""
        nodes = self.client.get_primaries() if self.errors.cluster else [None]
        for node in nodes:
            cursor = 0
            while True:
                cursor, keys = self.scan_page(node, cursor, batch)
                for key in keys:
                    if provider_id is None or key.provider_id == provider_id:
                        yield key
                if cursor == 0:
                    break

    def scan_page(self, node: Any, cursor: int, batch: int) -> tuple[int, list[EntryKey]]:
        """One ``SCAN`` step on ``node`` (``None``: the standalone server): the next cursor (0 at the end),
        and the keys of the entries it named that still exist."""
        pattern = self.keys.entry_pattern()
        with self.command("list tokens"):
            if node is None:
                cursor, names = self.client.scan(cursor, match=pattern, count=batch)
            else:
                cursors, names = self.client.scan(cursor, match=pattern, count=batch, target_nodes=node)
                cursor = cursors[node.name]
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hget(name, "d")
            raws: list[Any] = pipe.execute() if names else []  # a page may match nothing
        return int(cursor), [key for raw in raws if (key := entry_key_of(raw)) is not None]
