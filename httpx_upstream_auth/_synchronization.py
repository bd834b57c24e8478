"""Hand-written twin primitives, so the generated sync code reads like the async source.

``Flight`` is one in-progress refresh for one key: its leader publishes an outcome once, and followers
wait for it from threads (``outcome``) or from any event loop, asyncio or trio (``aoutcome``). Waking
crosses threads and loops, so a sync leader can release async followers and the other way round.
``AsyncShield`` / ``SyncShield`` protect the part of a refresh that must finish once started.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.lowlevel
import attrs

from ._models import UpstreamTokens

__all__ = ["AsyncShield", "Flight", "Outcome", "SyncShield"]


@attrs.frozen
class Outcome:
    """How a flight ended: with tokens, with an error, or abandoned (its leader was cancelled first)."""

    tokens: UpstreamTokens | None = None
    error: Exception | None = None
    #: True when the tokens come from the provider in this flight (not from storage): followers take them
    #: even when the provider made them short-lived enough to count as stale, or the flights would loop.
    refreshed: bool = False

    @property
    def abandoned(self) -> bool:
        """True when the leader left before finishing: a follower should take over."""
        return self.tokens is None and self.error is None

    def unwrap(self) -> UpstreamTokens:
        """Return the tokens, or raise a copy of the leader's error (each follower gets its own)."""
        if self.error is not None:
            raise copy.copy(self.error).with_traceback(None)
        assert self.tokens is not None
        return self.tokens


class Flight:
    """One refresh in progress for one key."""

    __slots__ = ("_lock", "_outcome", "_wakers")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcome: Outcome | None = None
        self._wakers: list[Callable[[], None]] = []

    def finish(self, outcome: Outcome) -> None:
        """Publish the outcome and wake every follower. Only the first call counts."""
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            # RuntimeError: the follower's event loop has closed, so nobody is waiting there.
            with contextlib.suppress(RuntimeError):
                wake()

    def outcome(self) -> Outcome:
        """Block this thread until the flight ends."""
        event = threading.Event()
        with self._lock:
            if self._outcome is None:
                self._wakers.append(event.set)
        event.wait()
        assert self._outcome is not None
        return self._outcome

    async def aoutcome(self) -> Outcome:
        """Wait in the current event loop (asyncio or trio) until the flight ends."""
        event = anyio.Event()
        wake = _call_soon_threadsafe(event.set)
        with self._lock:
            registered = self._outcome is None
            if registered:
                self._wakers.append(wake)
        if registered:
            await event.wait()
        else:
            await anyio.lowlevel.checkpoint()
        assert self._outcome is not None
        return self._outcome


def _call_soon_threadsafe(fn: Callable[[], None]) -> Callable[[], None]:
    """A callable that runs ``fn`` in the current event loop's thread, callable from any thread."""
    native: Any = anyio.lowlevel.current_token().native_token
    if hasattr(native, "call_soon_threadsafe"):  # asyncio: the token is the loop
        return lambda: native.call_soon_threadsafe(fn)
    return lambda: native.run_sync_soon(fn)  # trio: the token is a TrioToken


class AsyncShield:
    """Shield a block from outside cancellation, bounded by its own ``timeout``.

    Used once a refresh request may have reached the provider: the old refresh token is consumed
    whatever the caller does, so the result must be saved before anyone may give up on it.
    """

    def __init__(self, timeout: float) -> None:
        self._scope = anyio.CancelScope(shield=True, deadline=anyio.current_time() + timeout)

    def __enter__(self) -> AsyncShield:
        self._scope.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        return bool(self._scope.__exit__(exc_type, exc, tb))

    @property
    def timed_out(self) -> bool:
        """True when the block was stopped by its own timeout."""
        return self._scope.cancelled_caught


class SyncShield:
    """The sync twin of :class:`AsyncShield`: threads are not cancelled, so it only keeps the shape."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def __enter__(self) -> SyncShield:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        return False

    @property
    def timed_out(self) -> bool:
        """Always false: the sync refresh is bounded by its HTTP client's timeouts."""
        return False
