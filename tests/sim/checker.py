"""Checks of what a manager keeps in memory once a schedule has settled.

:func:`manager_tables` is the ONLY place the simulation reads a manager's internals (besides the fork
model in ``fork.py``). When the library renames or adds a table, update it here. The tables, with the
bound each one must respect (``cache_size`` is the manager's configured one):

==================  ======================================  =============================================
table               what it holds                           bound after a schedule
==================  ======================================  =============================================
``_cache``          session -> fresh tokens                 ``cache_size``
``_epochs``         session -> login generation             ``2 * cache_size``
``_digests``        change-notice digest -> session         ``2 * cache_size``
``_distrusted``     session -> access token refused         ``cache_size``
``_retry_at``       key -> end of an early-refresh back-off ``cache_size`` (one per session, like the rest)
``_consumed``       refresh tokens presented, result unsure ``CONSUMED_MEMORY``, and never a token whose
                                                            rotation this process saved (and learned so)
``_flights``        key -> refresh in progress              empty once no job runs (an orphan never ends), but
                                                            for flights whose loop was closed (replaced when
                                                            next needed)
``_reads``          key -> shared read in progress          empty once no read runs
storage subscribers callbacks of managers                   live managers on that storage object
``_task_jobs``      (module) running task jobs              none of an event loop that was closed
==================  ======================================  =============================================
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["check_manager_tables", "manager_tables", "storage_subscribers", "task_jobs_of"]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def manager_tables(manager: Any) -> dict[str, tuple[int, int, Any]]:
    """``{table: (size, bound, the table itself)}`` for one manager (see the module docstring)."""
    state = manager._core
    size = getattr(state, "_cache_size", 10_000)
    try:
        from httpx_upstream_auth._core import CONSUMED_MEMORY
    except ImportError:  # moved: the bound is the manager's business then
        CONSUMED_MEMORY = 100_000
    found: dict[str, tuple[int, int, Any]] = {}
    for name, bound in (
        ("_cache", size),
        ("_epochs", 2 * size),
        ("_digests", 2 * size),
        ("_distrusted", size),
        ("_retry_at", size),
        ("_consumed", CONSUMED_MEMORY),
        ("_flights", 0),
        ("_reads", 0),
    ):
        table = getattr(state, name, None)
        if table is not None:
            found[name] = (len(table), bound, table)
    return found


def check_manager_tables(world: Any, pid: int, manager: Any, settled: bool) -> None:
    """Record a violation for each table over its bound (flights only when ``settled``: no job runs)."""
    for name, (size, bound, table) in manager_tables(manager).items():
        if name in ("_flights", "_reads"):
            if not settled:
                continue
            # A flight whose job's event loop was closed (``alive()`` false) is replaced by the next caller that
            # needs it; one that looks alive and never ends makes every caller wait and fail.
            stuck = [key for key, flight in table.items() if not flight.done and getattr(flight, "alive", bool)()]
            if stuck:
                forked = world.processes[pid].parent is not None
                world.violate(
                    "item3:fork:orphan-flight" if forked else "orphan-flight",
                    f"p{pid}: {len(stuck)} {name[1:-1]} in progress with no job to finish them "
                    f"({[getattr(k, 'session_id', k) for k in stuck]}): callers wait for it and fail",
                )
            continue
        if size > bound:
            world.violate(f"table-over-bound:{name}", f"p{pid}: {name} holds {size} entries, over its bound {bound}")
        if name == "_distrusted":
            # A distrust ends when the API accepts the token, and never outlives it: a token of unknown lifetime
            # is distrusted for a bounded while, never for good.
            endless = [sid for sid, (_, ends) in table.items() if ends == float("inf")]
            if endless:
                world.violate("distrust-without-end", f"p{pid}: {len(endless)} distrust(s) that never end: {endless}")
        if name == "_consumed":
            # Rotations the process learned were saved: one whose put landed while its reply was lost (and the
            # store then stayed down) is unknown to it, and it must keep the token it presented.
            saved = {
                _digest(red.rt)
                for red in world.provider.redemptions
                if red.process == pid and red.kind == "rotated" and red.saved_known
            }
            wasted = sum(1 for d in table if d in saved)
            if wasted:
                world.violate(
                    "item10:consumed-memory-holds-saved",
                    f"p{pid}: the consumed-token memory holds {wasted} refresh token(s) whose rotation was saved "
                    f"(of {size}): successful rotations push out the tokens it must never present again",
                )


def storage_subscribers(storage: Any) -> int:
    """How many callbacks a storage object calls on changes (``Storage._subscribers``)."""
    return len(getattr(storage, "_subscribers", ()))


def task_jobs_of(loop: Any) -> int:
    """How many refresh-job tasks of ``loop`` (closed) the library still references (its module-level
    ``_synchronization._task_jobs``); they are dropped from it afterwards, so one schedule's leak does not
    grow across the seeds of a run (the only write to library state, and only to undo a leak)."""
    try:
        from httpx_upstream_auth import _synchronization
    except ImportError:
        return 0
    jobs = getattr(_synchronization, "_task_jobs", None)
    if not isinstance(jobs, set):
        return 0
    # The library drops a closed loop's jobs at its next task job: ask for that now.
    sweep = getattr(_synchronization, "forget_closed_loops", None)
    if sweep is not None:
        sweep()
    mine = [task for task in jobs if getattr(task, "get_loop", lambda: None)() is loop]
    for task in mine:
        jobs.discard(task)
    return len(mine)
