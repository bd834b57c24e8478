"""Time, injected: wall time for expiries shared between processes, a monotonic clock for timeouts."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "SystemClock"]


class Clock(Protocol):
    """Where the library reads the time. Replace it in tests to drive expiries without sleeping."""

    def time(self) -> float:
        """Wall-clock epoch seconds: comparable with ``expires_at`` written by other processes."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: used for timeouts and waits."""
        ...


class SystemClock:
    """The real clock: ``time.time`` and ``time.monotonic``."""

    def time(self) -> float:
        """Return ``time.time()``."""
        return time.time()

    def monotonic(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()
