"""Virtual time for both runtimes: an asyncio event loop that never sleeps, and trio's ``MockClock``.

The asyncio loop's ``time()`` is a number the loop itself advances: when nothing is ready, its selector
jumps the clock to the next timer instead of blocking. A loop left with nothing ready and no timer is
deadlocked; it raises :class:`SimDeadlock` rather than hang the test run.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import selectors
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import trio
import trio.testing

__all__ = ["SimDeadlock", "VirtualEventLoop", "run_asyncio", "run_asyncio_then_close", "run_trio"]


class SimDeadlock(RuntimeError):
    """The simulated world has nothing left to run and nothing scheduled: every task waits forever."""


class _VirtualSelector(selectors.BaseSelector):
    """A selector that polls the real one without blocking and advances virtual time by the timeout."""

    def __init__(self, start: float = 0.0) -> None:
        self._real = selectors.DefaultSelector()
        self.now = start

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        """Delegate to the real selector (the loop's self-pipe lives there)."""
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        """Delegate to the real selector."""
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        """Delegate to the real selector."""
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Ready file objects now; if none, jump the clock by ``timeout`` (the wait for the next timer)."""
        events = self._real.select(0)
        if events:
            return events
        if timeout is None:
            # Nothing ready and no timer: only another thread could wake us. Give it a real second.
            events = self._real.select(1.0)
            if not events:
                raise SimDeadlock("the event loop has nothing ready and no timer: every task waits forever")
            return events
        if timeout > 0:
            self.now += timeout
        return []

    def close(self) -> None:
        """Close the real selector."""
        self._real.close()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        """Delegate to the real selector."""
        return self._real.get_map()


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time: ``time()`` starts at ``start`` (0) and jumps to each timer when idle."""

    def __init__(self, start: float = 0.0) -> None:
        self._virtual = _VirtualSelector(start)
        super().__init__(self._virtual)

    def time(self) -> float:
        """Virtual seconds since the loop was made."""
        return self._virtual.now


def run_asyncio(
    main: Callable[[], Coroutine[Any, Any, None]],
    on_error: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None],
    start: float = 0.0,
) -> None:
    """Run ``main()`` to completion on a fresh :class:`VirtualEventLoop` whose clock starts at ``start``;
    leftover tasks are cancelled."""
    with asyncio.Runner(loop_factory=lambda: VirtualEventLoop(start)) as runner:
        runner.get_loop().set_exception_handler(on_error)
        runner.run(main())


def run_asyncio_then_close(
    main: Callable[[], Coroutine[Any, Any, None]],
    on_error: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None],
) -> asyncio.AbstractEventLoop:
    """Run ``main()`` on a fresh :class:`VirtualEventLoop`, then close the loop as an application may:
    without cancelling or finishing the tasks still pending (the manager's jobs among them)."""
    loop = VirtualEventLoop()
    loop.set_exception_handler(on_error)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return loop


def _deadlock_detecting_clock() -> trio.testing.MockClock:
    """``MockClock(autojump_threshold=0)`` that raises :class:`SimDeadlock` when every task is blocked and no
    deadline is left (the plain one would spin forever: nothing can ever wake the run)."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    autojump = clock._autojump

    def checked_autojump() -> None:
        if trio.lowlevel.current_statistics().seconds_to_next_deadline == math.inf:
            raise SimDeadlock("every trio task waits forever and no deadline is left")
        autojump()

    clock._autojump = checked_autojump  # type: ignore[method-assign]
    return clock


def run_trio(main: Callable[[], Coroutine[Any, Any, None]], seed: int) -> None:
    """Run ``main()`` under trio with a jumping ``MockClock`` and trio's own scheduler shuffle seeded."""
    # Trio reverses each batch of runnable tasks at random (to shake out ordering bugs); seed it so a
    # schedule replays exactly.
    scheduler_random: random.Random = trio._core._run._r
    scheduler_random.seed(seed)
    # Trio orders cancel scopes with the same deadline by id(): memory addresses, which depend on what
    # ran before in this interpreter. Order them by registration instead, so ties replay too.
    deadlines: Any = trio._core._run.Deadlines
    counter = itertools.count()

    def add(self: Any, deadline: float, cancel_scope: Any) -> None:
        heapq.heappush(self._heap, (deadline, next(counter), cancel_scope))
        self._active += 1

    original = deadlines.add
    deadlines.add = add
    try:
        trio.run(main, clock=_deadlock_detecting_clock())
    finally:
        deadlines.add = original
