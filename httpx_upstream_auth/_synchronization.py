"""Hand-written twin primitives, so the generated sync code reads like the async source.

``Flight`` is one in-progress operation for one key (a refresh job, or a shared storage read): it
publishes an outcome once, and waiters wait for it from threads (``outcome``) or from any event loop,
asyncio or trio (``aoutcome``). Waking crosses threads and loops, so a refresh job running in a worker
thread releases async waiters, and a job running as a task releases sync waiters in other threads.

``start_async_job`` / ``start_sync_job`` start a refresh job where no caller's cancellation reaches it;
``AsyncLeaseKeeper`` / ``SyncLeaseKeeper`` renew the job's storage lease while it runs;
``AsyncDeadline`` / ``SyncDeadline`` bound (and may shield) a part of a task job;
``async_call_bounded`` / ``sync_call_bounded`` wait at most so long for a call (the refresher's), by
waiting rather than cancelling (a call may ignore cancellation);
``AsyncStoreCalls`` / ``SyncStoreCalls`` bound a job's storage calls, with what they need acquired before
the token request;
``async_sleep`` / ``sync_sleep`` pause a job;
``AsyncWaker`` / ``SyncWaker`` wake one waiter from any thread, and ``async_wait_for_change`` /
``sync_wait_for_change`` wait on one until a value read from a store moves.

``ForkRegistry`` is how a module finds its live objects again in a forked child, to reset them.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import enum
import functools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from ._exceptions import RefreshFailed
from ._models import UpstreamTokens

__all__ = [
    "AsyncCall",
    "AsyncDeadline",
    "AsyncLeaseKeeper",
    "AsyncStoreCalls",
    "AsyncWaker",
    "Flight",
    "ForkRegistry",
    "Outcome",
    "SameThreadWait",
    "SyncCall",
    "SyncDeadline",
    "SyncLeaseKeeper",
    "SyncStoreCalls",
    "SyncWaker",
    "TimedOut",
    "async_call_bounded",
    "async_lead",
    "async_sleep",
    "async_wait_for_change",
    "copy_error",
    "running_async_library",
    "start_async_job",
    "start_sync_job",
    "sync_call_bounded",
    "sync_lead",
    "sync_sleep",
    "sync_wait_for_change",
]

logger = logging.getLogger("httpx_upstream_auth")
T = TypeVar("T")
_E = TypeVar("_E", bound=Exception)
#: A call with its arguments bound, as the bounded calls take it (the sync twin: :data:`SyncCall`).
AsyncCall = Callable[[], Awaitable[T]]
SyncCall = Callable[[], T]


def running_async_library() -> str | None:
    """``"asyncio"`` or ``"trio"`` when called from a task of that library, else ``None``.

    Answered without sniffio (no longer a dependency of anyio or httpx). Trio is asked first: in trio's
    guest mode an asyncio loop runs on the same thread, but the caller is a trio task.
    """
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return "trio"
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    return "asyncio"


class SameThreadWait(RuntimeError):
    """A blocking call would wait for a refresh running as a task on its own (now blocked) event loop."""


@attrs.frozen
class Outcome:
    """How a flight ended: with tokens, with an error, or abandoned (its job stopped before finishing)."""

    tokens: UpstreamTokens | None = None
    error: Exception | None = None
    #: True when the tokens come from the provider in this flight: waiters take them even when the
    #: provider made them short-lived enough to count as stale, or the flights would loop.
    refreshed: bool = False
    #: True when the tokens are not fresh but still valid, served because an early refresh failed
    #: without consuming anything (the provider had a blip): better than failing the request.
    fallback: bool = False

    @property
    def abandoned(self) -> bool:
        """True when the job left before finishing: a waiter should start another."""
        return self.tokens is None and self.error is None

    def unwrap(self) -> UpstreamTokens:
        """Return the tokens, or raise a copy of the job's error (each waiter gets its own)."""
        if self.error is not None:
            raise copy_error(self.error)
        assert self.tokens is not None
        return self.tokens


def copy_error(error: _E) -> _E | RefreshFailed:
    """A copy of ``error`` without its traceback, to raise or to keep (one error object raised by many callers
    would pile up their tracebacks, and a kept traceback holds the frames that raised it)."""
    try:
        fresh = copy.copy(error)
    except Exception:
        fresh = None
    if not isinstance(fresh, type(error)):
        # A custom exception that cannot be rebuilt: say what it was, without its text (which a custom
        # refresher may have filled with a token).
        return RefreshFailed(f"the refresh failed with {type(error).__name__}; retry the request", retryable=False)
    return fresh.with_traceback(None)


class Flight:
    """One operation in progress for one key."""

    __slots__ = ("_lock", "_outcome", "_wakers", "alive", "epoch", "runs_on")

    def __init__(self, epoch: int = 0) -> None:
        #: The session's login generation when the work began: its result is stale once that changes.
        self.epoch = epoch
        self._lock = threading.Lock()
        self._outcome: Outcome | None = None
        self._wakers: list[Callable[[], None]] = []
        #: The thread whose event loop runs this flight's work, when a task there does it (a blocking
        #: wait on that thread would stop the work it waits for).
        self.runs_on: int | None = None
        #: False once the work can no longer finish (its event loop was closed without running it).
        self.alive: Callable[[], bool] = _always

    @property
    def done(self) -> bool:
        """True once the outcome is published."""
        return self._outcome is not None

    @property
    def waiting(self) -> int:
        """How many callers wait for the outcome."""
        return len(self._wakers)

    def finish(self, outcome: Outcome) -> None:
        """Publish the outcome and wake every waiter. Only the first call counts."""
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            # RuntimeError: the waiter's event loop has closed, so nobody is waiting there.
            with contextlib.suppress(RuntimeError):
                wake()

    def outcome(self, timeout: float) -> Outcome | None:
        """Block this thread until the flight ends; ``None`` after ``timeout`` seconds."""
        if self.runs_on == threading.get_ident() and not self.done and self.alive():
            raise SameThreadWait(
                "a blocking call (get_token, a sync httpx client) would wait for a refresh that this very thread "
                "runs: a task on this thread's event loop, which the call blocks (use the async API, aget_token "
                "or httpx.AsyncClient, inside async code, or TokenManager(redeem_in='thread')), or the refresh "
                "job itself, calling an event hook that calls the manager back for the same session (a hook "
                "must not wait for the refresh it reports)"
            )
        event = threading.Event()
        wake = event.set
        with self._lock:
            if self._outcome is not None:
                return self._outcome
            self._wakers.append(wake)
        try:
            event.wait(timeout)
        finally:
            self._leave(wake)
        return self._outcome

    async def aoutcome(self, timeout: float) -> Outcome | None:
        """Wait in the current event loop (asyncio or trio) until the flight ends; ``None`` after ``timeout``."""
        event = anyio.Event()
        wake = _call_soon_threadsafe(event.set)
        with self._lock:
            registered = self._outcome is None
            if registered:
                self._wakers.append(wake)
        if registered:
            try:
                with anyio.move_on_after(timeout):
                    await event.wait()
            finally:
                self._leave(wake)
        else:
            await anyio.lowlevel.checkpoint()
        return self._outcome

    def _leave(self, wake: Callable[[], None]) -> None:
        # A waiter that timed out or was cancelled is no longer waiting (``waiting`` must not count it).
        with self._lock:
            if self._outcome is None:
                with contextlib.suppress(ValueError):
                    self._wakers.remove(wake)


def _always() -> bool:
    return True


def async_lead(flight: Flight) -> None:
    """Mark ``flight`` as run by the current task: a blocking wait on this thread would stop it, and once its
    asyncio event loop is closed without running it to the end (``loop.close()``, no shutdown) it can never
    finish, so later callers start another instead of waiting on it. (Trio cancels a run's tasks when it
    ends, and their clean-up ends the flight.)"""
    flight.runs_on = threading.get_ident()
    if running_async_library() == "asyncio":
        import asyncio

        loop = asyncio.get_running_loop()
        flight.alive = lambda: not loop.is_closed()


def sync_lead(flight: Flight) -> None:
    """Mark ``flight`` as run by the current thread (a thread runs its work to the end)."""
    flight.runs_on = threading.get_ident()


def _call_soon_threadsafe(fn: Callable[[], None]) -> Callable[[], None]:
    """A callable that runs ``fn`` in the current event loop's thread, callable from any thread."""
    native: Any = anyio.lowlevel.current_token().native_token
    if hasattr(native, "call_soon_threadsafe"):  # asyncio: the token is the loop
        return lambda: native.call_soon_threadsafe(fn)
    return lambda: native.run_sync_soon(fn)  # trio: the token is a TrioToken


# -- starting a job that no caller can cancel ---------------------------------------------------------

#: Strong references to running task jobs: asyncio keeps only weak ones to tasks.
_task_jobs: set[Any] = set()


def start_async_job(
    flight: Flight, thread_job: Callable[[], None], task_job: Callable[[], Coroutine[Any, Any, None]], *, in_task: bool
) -> None:
    """Start the work of ``flight`` for an async caller.

    By default the job runs in a worker thread of its own (``thread_job``): no cancellation of any
    caller reaches it, nor the end of the caller's event loop, and the interpreter waits for it at exit.
    With ``in_task``, it runs as a task of the current event loop that no caller awaits (an asyncio
    task, or a trio system task): no threads, but it ends with its loop.
    """
    if not in_task:
        start_sync_job(flight, thread_job, task_job, in_task=False)
        return
    if running_async_library() == "trio":
        import trio

        # Trio cancels system tasks when its run ends, and the job's own clean-up then ends the flight.
        trio.lowlevel.spawn_system_task(task_job)
    else:
        import asyncio

        loop = asyncio.get_running_loop()
        task = loop.create_task(task_job())
        forget_closed_loops()
        _task_jobs.add(task)
        task.add_done_callback(_task_jobs.discard)
        # loop.close() without running the task to its end leaves it pending forever: later callers
        # must not wait on it.
        flight.alive = lambda: not loop.is_closed()
    flight.runs_on = threading.get_ident()


def forget_closed_loops() -> None:
    """Drop the task jobs of event loops that were closed without running them to the end (their done
    callbacks never run): the table then holds only work that can still run. Called at every task job."""
    for stale in [job for job in _task_jobs if job.get_loop().is_closed()]:
        _task_jobs.discard(stale)


def start_sync_job(
    flight: Flight, thread_job: Callable[[], None], task_job: Callable[[], Any], *, in_task: bool
) -> None:
    """Start the work of ``flight`` for a sync caller: always in a worker thread of its own."""

    def run() -> None:
        # A wait for this flight from this thread (an event hook called by the job that calls the manager back
        # for the same session) would wait for itself: it fails at once instead (SameThreadWait).
        flight.runs_on = threading.get_ident()
        thread_job()

    # Not a daemon: a refresh whose request may have reached the provider must save its result, so the
    # interpreter waits for it at exit (it is bounded by the refresher's timeouts).
    threading.Thread(target=run, name="httpx-upstream-auth-refresh", daemon=False).start()


class _Timeout(enum.Enum):
    TIMED_OUT = "timed out"


#: What a bounded call returns when its time ran out.
TimedOut: Literal[_Timeout.TIMED_OUT] = _Timeout.TIMED_OUT


async def async_call_bounded(
    seconds: float, fn: Callable[..., Awaitable[T]], *args: Any
) -> T | Literal[_Timeout.TIMED_OUT]:
    """``await fn(*args)`` for at most ``seconds``: then :data:`TimedOut`.

    Bounded by waiting, not only by cancelling: the call runs in a task of its own that this one waits for,
    so a call that ignores cancellation (blocking code run through ``anyio.to_thread.run_sync``, which is not
    abandoned on cancel by default) is cancelled and left behind, and cannot hold the caller past its bound.
    Its late result is dropped. Cancelling the caller cancels the call.
    """
    done = anyio.Event()
    result: list[T] = []
    failure: list[Exception] = []

    async def call() -> None:
        try:
            result.append(await fn(*args))
        except Exception as exc:  # handed to the waiting task, which raises it
            failure.append(exc)
        finally:
            done.set()

    cancel = _detach(call)
    try:
        with anyio.move_on_after(seconds):
            await done.wait()
    finally:
        if not done.is_set():
            cancel()
    if failure:
        raise failure.pop()
    # No result: the time ran out, or the call was cancelled from outside (its event loop is ending).
    return result[0] if result else TimedOut


def _detach(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], object]:
    """Run ``fn()`` in a new task of the current event loop that nothing awaits; return what cancels it.

    On trio, a system task under a shielded scope of its own: the run's end does not cancel it (a job's
    fail-closed delete at the end of ``trio.run`` still runs, bounded by its caller), only its caller does.
    On asyncio, a task held by a strong reference until it is done, with the caller's context.
    """
    if running_async_library() == "trio":
        import trio

        scope = trio.CancelScope(shield=True)

        async def shielded() -> None:
            with scope:
                await fn()

        trio.lowlevel.spawn_system_task(shielded, context=contextvars.copy_context())
        return scope.cancel
    import asyncio

    task = asyncio.get_running_loop().create_task(fn())
    _task_jobs.add(task)
    task.add_done_callback(_task_jobs.discard)
    return task.cancel


def sync_call_bounded(seconds: float, fn: Callable[..., T], *args: Any) -> T | Literal[_Timeout.TIMED_OUT]:
    """``fn(*args)`` in a daemon thread of its own, waited for at most ``seconds``: then :data:`TimedOut`.

    A thread cannot be interrupted: a call that hangs (a custom refresher without timeouts) is left
    behind in its daemon thread, which cannot keep the interpreter from exiting, and its result is
    dropped. The caller goes on as after a lost answer.
    """
    try:
        worker = _Worker("httpx-upstream-auth-refresher")
    except RuntimeError as exc:  # no thread can start (interpreter shutdown, resource limits): nothing was sent
        raise RefreshFailed(
            f"could not start the refresh ({exc}); nothing was sent. Retry the request.", retryable=True
        ) from None
    try:
        return worker.run(seconds, functools.partial(fn, *args))
    finally:
        worker.stop()


class _Worker:
    """A daemon thread that runs the calls handed to it, one at a time; started at construction (RuntimeError
    when no thread can start)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        #: True while a call that timed out still runs: later calls would wait behind it.
        self.stuck = False
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            call()

    def run(self, seconds: float, fn: Callable[[], T]) -> T | Literal[_Timeout.TIMED_OUT]:
        """``fn()`` on this thread (with the caller's context), waited for at most ``seconds``."""
        done = threading.Event()
        result: list[T] = []
        failure: list[BaseException] = []
        context = contextvars.copy_context()

        def call() -> None:
            try:
                result.append(context.run(fn))
            except BaseException as exc:  # handed to the waiting thread, which raises it
                failure.append(exc)
            finally:
                done.set()

        self._calls.put(call)
        if not done.wait(seconds):
            self.stuck = True
            return TimedOut
        if failure:
            raise failure.pop()
        return result[0]

    def stop(self) -> None:
        """End the thread once its current call (if any) returns."""
        self._calls.put(None)


class AsyncStoreCalls:
    """The storage calls of one refresh job, each waited for at most ``seconds`` (then :data:`TimedOut`).

    After the token request may have left, the job's writes must not depend on anything the process may then
    fail to provide. A task job needs nothing: each call is bounded by waiting (:func:`async_call_bounded`).
    The sync twin is :class:`SyncStoreCalls`.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def prepare(self) -> None:
        """Acquire, before the token request, what the calls after it need (a task job needs nothing)."""

    async def call(self, fn: AsyncCall[T]) -> T | Literal[_Timeout.TIMED_OUT]:
        """``await fn()``, bounded."""
        return await async_call_bounded(self._seconds, fn)

    def close(self) -> None:
        """Release what :meth:`prepare` acquired."""


class SyncStoreCalls:
    """The sync twin of :class:`AsyncStoreCalls`: the calls run on a daemon worker thread, which
    :meth:`prepare` starts before the token request (when none can start, nothing is sent).

    So a process that cannot start threads once the request has left (at its thread or pid limit, or an
    interpreter that is exiting: CPython 3.12.0 to 3.12.2 refuse new threads then) still saves the answer or
    removes the entry. A call that hangs is left behind on its worker, which a later call replaces; when no
    replacement can start either, the job's own thread makes the call itself (unbounded: losing the answer
    would cost the grant).
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._worker: _Worker | None = None

    def prepare(self) -> None:
        """Start the worker thread; :class:`RefreshFailed` (nothing was sent) when it cannot start."""
        if self._worker is None:
            try:
                self._worker = _Worker("httpx-upstream-auth-store")
            except RuntimeError as exc:
                raise RefreshFailed(
                    f"could not start the refresh ({exc}); nothing was sent. Retry the request.", retryable=True
                ) from None

    def call(self, fn: SyncCall[T]) -> T | Literal[_Timeout.TIMED_OUT]:
        """``fn()`` on the worker, bounded; on the calling thread when no worker can serve it."""
        worker = self._worker
        if worker is None or worker.stuck:
            try:
                replacement = _Worker("httpx-upstream-auth-store")
            except RuntimeError:
                return fn()
            if worker is not None:
                worker.stop()
            worker = self._worker = replacement
        return worker.run(self._seconds, fn)

    def close(self) -> None:
        """Let the worker thread end."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


async def async_sleep(seconds: float) -> None:
    """Pause the current job."""
    await anyio.sleep(seconds)


def sync_sleep(seconds: float) -> None:
    """Pause the current job."""
    time.sleep(seconds)


# -- keeping a lease alive while a job runs -----------------------------------------------------------


class AsyncLeaseKeeper:
    """Renew a storage lease every third of its ttl for as long as a block runs.

    A slow provider then never lets a second process take the lease and redeem the same refresh token,
    while a dead process's lease still runs out (its renewals stop with it). The block's own exceptions
    pass through unchanged (never wrapped in an exception group).
    """

    def __init__(self, renew: Callable[[], Coroutine[Any, Any, bool | None]], ttl: float, hold: float) -> None:
        self._renew = renew
        self._interval = max(ttl / 3, 0.001)
        self._hold = hold
        self._group: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> AsyncLeaseKeeper:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._run)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._group is not None
        self._group.cancel_scope.cancel()
        if exc_type is GeneratorExit:
            return  # the job's coroutine is being collected with its closed loop: nothing can be awaited
        # The renewals are all the group holds: close it as if the block had ended normally, and let the
        # block's exception (if any) propagate as it is.
        await self._group.__aexit__(None, None, None)

    async def _run(self) -> None:
        # Renewals stop after ``hold`` seconds, so a job stuck past its own bounds lets the lease lapse.
        with anyio.move_on_after(self._hold):
            await self._renew_until_refused()

    async def _renew_until_refused(self) -> None:
        while True:
            await anyio.sleep(self._interval)
            try:
                # Bounded by waiting: a renewal that ignores cancellation must not keep the job from ending.
                renewed = await async_call_bounded(3 * self._interval, self._renew)
            except Exception:  # the store blipped: the next round tries again before the lease runs out
                continue
            if renewed is TimedOut:
                continue
            if not renewed:  # taken by someone else (False), or the store cannot renew (None): stop
                return


class SyncLeaseKeeper:
    """The sync twin of :class:`AsyncLeaseKeeper`: renews from a thread of its own."""

    def __init__(self, renew: Callable[[], bool | None], ttl: float, hold: float) -> None:
        self._renew = renew
        self._interval = max(ttl / 3, 0.001)
        self._hold = hold
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="httpx-upstream-auth-lease", daemon=True)

    def __enter__(self) -> SyncLeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        # Waited for at most a ttl: a renewal that hangs is left behind in the daemon thread (landing late, it
        # extends the lease once, by one ttl, and only if the lease is still ours).
        self._thread.join(3 * self._interval)

    def _run(self) -> None:
        give_up = time.monotonic() + self._hold
        while not self._stop.wait(self._interval) and time.monotonic() < give_up:
            try:
                renewed = self._renew()
            except Exception:
                continue
            if not renewed:
                return


class AsyncDeadline:
    """Stop a block after ``seconds``: a task job bounds its fail-closed delete this way when it is stopped.

    With ``shield``, outside cancellation cannot stop the block either (anyio and trio scopes; asyncio's
    own ``Task.cancel`` was already delivered by the time a job needs this, and an ending loop does not
    repeat it), while the deadline still keeps an ending event loop from waiting on a store that hangs.
    """

    def __init__(self, seconds: float, *, shield: bool = False) -> None:
        self._scope = anyio.CancelScope(shield=shield, deadline=anyio.current_time() + seconds)

    def __enter__(self) -> AsyncDeadline:
        self._scope.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        return bool(self._scope.__exit__(exc_type, exc, tb))


class SyncDeadline:
    """The sync twin of :class:`AsyncDeadline`: a thread can be neither interrupted nor cancelled, so the
    block runs to its end, bounded by the refresher's own timeouts and its own retries."""

    def __init__(self, seconds: float, *, shield: bool = False) -> None:
        del seconds, shield

    def __enter__(self) -> SyncDeadline:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


# -- waking one waiter from any thread ---------------------------------------------------------------


class AsyncWaker:
    """Wakes one async task from any thread without blocking that thread (asyncio or trio)."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._schedule = _call_soon_threadsafe(self._set)

    def wake(self) -> None:
        """Make the current or next :meth:`wait` return; safe from any thread."""
        with contextlib.suppress(RuntimeError):  # the loop closed (trio: its run ended): nobody waits any more
            self._schedule()

    def _set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        """Wait until woken or ``timeout`` seconds passed."""
        with anyio.move_on_after(timeout):
            await self._event.wait()
        self._event = anyio.Event()


class SyncWaker:
    """The sync twin of :class:`AsyncWaker`: wakes one waiting thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def wake(self) -> None:
        """Make the current or next :meth:`wait` return; safe from any thread."""
        self._event.set()

    def wait(self, timeout: float) -> None:
        """Wait until woken or ``timeout`` seconds passed."""
        self._event.wait(timeout)
        self._event.clear()


async def async_wait_for_change(
    read: AsyncCall[Any], seen: Any, deadline: float, waker: AsyncWaker, recheck: Callable[[], float]
) -> None:
    """Return once ``await read()`` differs from ``seen``, or at ``deadline`` (``time.monotonic``).

    Between reads it waits on ``waker`` (woken by whoever learns of a change), and at most ``recheck()``
    seconds: a wake-up that was lost costs that long, not the whole wait.
    """
    while await read() == seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        await waker.wait(min(remaining, recheck()))


def sync_wait_for_change(
    read: SyncCall[Any], seen: Any, deadline: float, waker: SyncWaker, recheck: Callable[[], float]
) -> None:
    """The sync twin of :func:`async_wait_for_change`."""
    while read() == seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        waker.wait(min(remaining, recheck()))


# -- what a forked child resets ------------------------------------------------------------------------


class ForkRegistry(Generic[T]):
    """The live objects of one kind, each reset by ``reset(obj)`` in a child process after ``fork()``.

    gunicorn ``--preload`` and multiprocessing fork a process whose storages and refreshers already hold
    connections, locks (perhaps held by a thread that does not exist in the child), change-feed threads
    and subscriptions. Objects are held weakly. ``os.register_at_fork`` runs the resets unless
    ``hook=False``: then the owner calls :meth:`reset_all` from a hook of its own (to order it after
    other module state). A reset that raises is logged; the others still run.
    """

    def __init__(self, reset: Callable[[T], None], *, hook: bool = True) -> None:
        self._reset = reset
        # No lock (a parent thread could hold it at fork): add is atomic under the GIL, and a reader
        # that races an add gets RuntimeError from live() and asks again.
        self._live: weakref.WeakSet[Any] = weakref.WeakSet()
        if hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.reset_all)

    def add(self, obj: T) -> None:
        """Reset ``obj`` in every child forked while it lives."""
        self._live.add(obj)

    def live(self) -> list[T]:
        """The objects alive now (RuntimeError if another thread adds one meanwhile: ask again)."""
        return list(self._live)

    def reset_all(self) -> None:
        """Reset every live object (called in the child, where only the forking thread exists)."""
        for obj in list(self._live):
            try:
                self._reset(obj)
            except Exception:  # an at-fork hook must not raise; the child then runs without this object's feed
                logger.exception("could not reset %r after fork()", obj)
