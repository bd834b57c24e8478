"""The engine of one TokenManager: its shared state and its async and sync token operations.

Adapters (``UpstreamAuth``, the transports) hold an ``Engine``, never the public ``TokenManager`` that
made them, so imports only point down: the manager hands out adapters, adapters drive the engine.
"""

from __future__ import annotations

from ._async._manager import AsyncTokenOps
from ._state import ManagerState
from ._sync._manager import SyncTokenOps

__all__ = ["Engine"]


class Engine:
    """One manager's state with the operations over it, for async callers and for blocking ones."""

    __slots__ = ("async_ops", "state", "sync_ops")

    def __init__(self, state: ManagerState) -> None:
        self.state = state
        self.async_ops = AsyncTokenOps(state)
        self.sync_ops = SyncTokenOps(state)
        state.thread_job = self.sync_ops.run_flight
