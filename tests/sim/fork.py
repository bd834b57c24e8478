"""What ``fork()`` does to a TokenManager, modelled without ``os.fork`` (the simulation is one process on
one virtual event loop, and a real fork would escape it).

A real fork copies the parent's whole address space into the child, but only the thread that called
``fork()`` runs there: the child's manager has every table the parent's had at that instant (cache,
epochs, change-notice digests, consumed tokens, back-off, distrust, *flights*), its storage object is a
copy of the parent's (same origin tag in the change feed, same local subscriber list, which now calls
the child's copy of the manager), and none of the parent's threads or tasks exist in the child: no
refresh job, no change-feed listener thread.

:func:`fork_manager` builds that child from a parent manager. This is the ONE place outside
``checker.py`` that touches the library's internals, and it does so only because today's code has no
hook for it: it shallow-copies the manager state's tables (``copy.copy``), copies each flight without
its waiters (the job that would finish it stays in the parent), and builds an ``Coordinators`` over the copy.
If the library grows a fork hook (``os.register_at_fork`` handlers that reset a child), this function
calls it after copying (any method of the manager, its state or its storage named for the child side of a
fork, see :func:`_child_hooks`), so a fixed library gets the chance to start its child clean, as it
would after a real fork. A module-level ``os.register_at_fork`` handler is not reached this way: when the
fork fix lands, call its per-manager part here.
"""

from __future__ import annotations

import copy
import itertools
import random
import threading
from typing import Any

from httpx_upstream_auth import TokenManager

__all__ = ["fork_manager"]

_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
#: Names of hooks a library may offer to reset a manager (or its state, or storage) in a forked child.
_CHILD_HOOKS = ("_after_fork_in_child", "after_fork_in_child", "_reset_after_fork", "_at_fork_child")


def _copy_flight(flight: Any) -> Any:
    """The child's copy of an in-progress flight: same epoch and outcome, no waiters, same liveness test."""
    twin = copy.copy(flight)  # __slots__ copied shallowly
    for name, value in (("_lock", threading.Lock()), ("_wakers", [])):
        if hasattr(flight, name):
            object.__setattr__(twin, name, value)
    return twin


def fork_manager(parent: TokenManager, storage: Any, refresher: Any) -> TokenManager:
    """The child's manager after a fork of the process running ``parent``.

    ``storage`` is the child's copy of the parent's storage object (the caller makes it with the
    parent's origin tag and no change feed); ``refresher`` the child's refresher.
    """
    from httpx_upstream_auth._coordinators import Coordinators

    state = copy.copy(parent._core)
    for name, value in list(vars(state).items()):
        if isinstance(value, (dict, list, set)):
            setattr(state, name, copy.copy(value))
        elif isinstance(value, _LOCK_TYPES):
            setattr(state, name, threading.RLock() if isinstance(value, _LOCK_TYPES[1]) else threading.Lock())
        elif isinstance(value, itertools.count):
            # The child's counter continues from the same value as the parent's (values stay unique per process).
            setattr(state, name, itertools.count(next(value)))
    for name in ("_flights", "_reads"):
        table = getattr(state, name, None)
        if isinstance(table, dict):
            setattr(state, name, {key: _copy_flight(flight) for key, flight in table.items()})
    state.storage = storage
    state.refresher = refresher
    # The copied storage object's subscriber list holds the copied manager's callback (its local notices).
    if getattr(parent._core, "_unsubscribe", None) is not None:
        from httpx_upstream_auth._core import _subscribe_weakly

        state._unsubscribe = _subscribe_weakly(storage, state)
    child = copy.copy(parent)
    coordinators = Coordinators(state)
    child._core = state
    child._coordinators = coordinators
    for name in ("_for_async", "_for_sync"):
        getattr(child, name)  # the manager's shortcuts to its coordinators: fail loudly if they were renamed
        setattr(child, name, getattr(coordinators, name.removeprefix("_")))
    for target in (child, state, storage):
        for hook in _child_hooks(target):
            hook()
    if isinstance(getattr(state, "jitter", None), random.Random):
        # The library reseeds a child's retry jitter from its pid: a real pid would make replays differ.
        state.jitter = random.Random(f"child:{parent._core.jitter.random()!r}")
    return child


def _child_hooks(target: Any) -> list[Any]:
    """Methods of ``target`` that reset it in a forked child: the known names, or any method whose name
    says fork and child/after (``_after_fork``, ``_reinit_after_fork``, ``_on_fork_child``...)."""
    names = [n for n in dir(type(target)) if "fork" in n.lower() and ("child" in n.lower() or "after" in n.lower())]
    found = []
    for name in dict.fromkeys([*_CHILD_HOOKS, *sorted(names)]):
        fn = getattr(target, name, None)
        if callable(fn):
            found.append(fn)
    return found
