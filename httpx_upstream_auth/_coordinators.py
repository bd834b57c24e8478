"""What adapters hold: one TokenManager's sans-I/O core with its two coordinators, async and blocking.

Adapters (``UpstreamAuth``, the transports) hold ``Coordinators``, never the public ``TokenManager`` that made
them, so imports only point down: the manager hands out adapters, adapters call the coordinators.
"""

from __future__ import annotations

from ._async._manager import AsyncCoordinator
from ._core import ManagerCore
from ._sync._manager import SyncCoordinator

__all__ = ["Coordinators"]


class Coordinators:
    """One manager's core (settings, tables, decisions) with the coordinators that do its I/O: one for async
    callers, one for blocking ones. The blocking one also runs refresh jobs in worker threads."""

    __slots__ = ("core", "for_async", "for_sync")

    def __init__(self, core: ManagerCore) -> None:
        self.core = core
        self.for_async = AsyncCoordinator(core)
        self.for_sync = SyncCoordinator(core)
        core.thread_job = self.for_sync.run_flight
