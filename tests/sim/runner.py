"""Plans and runs one seeded schedule against the real ``TokenManager``, then checks the invariants.

``run_schedule(seed)`` draws everything from ``random.Random(seed)``: the runtime (asyncio or trio), the
storage kind, the processes, their callers and how each call may be cancelled, the provider's and the
store's latencies and faults, logouts, re-logins, crashes and clock jumps. It runs them on virtual time
and returns a :class:`Result` with the violations (each classified) and the trace.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import trio

from httpx_upstream_auth import TokenManager, UpstreamAuthError

from .vtime import run_asyncio, run_trio
from .world import (
    APP_OP,
    NATIVE_KINDS,
    Caller,
    Knobs,
    Process,
    SimClock,
    SimRefresher,
    SimStorage,
    Violation,
    World,
    current_task_getter,
)

__all__ = ["Plan", "Result", "classify", "make_plan", "run_many", "run_schedule"]

PROVIDER_ID = "sim"
#: Slack for comparing virtual times (the loop reaches a timer's time within float rounding).
EPSILON = 1e-6
SUBJECTS = ("alice", "bob", "carol")
ASYNCIO_KINDS = (
    "plain",
    "plain",
    "task_cancel",
    "wait_for",
    "asyncio_timeout",
    "anyio_move_on_after",
    "anyio_fail_after",
    "anyio_scope_cancel",
)
TRIO_KINDS = ("plain", "plain", "trio_move_on_after", "trio_fail_after", "anyio_move_on_after", "anyio_fail_after")
#: Whether the manager under test can run its refresh job as a task on the caller's loop (the new design).
REDEEM_IN_TASK = "redeem_in" in inspect.signature(TokenManager).parameters

#: Categories of violations that are known bugs of the code before the refresh-protocol fixes (issue 6).
KNOWN_BUGS = {
    "bug1:native-cancel": "1: asyncio native cancellation loses the rotated tokens",
    "bug2:cross-lineage-write": "2: a refresh result saved over a new login (versions restart after delete)",
    "bug5:timeout-during-save": "5: the refresh_timeout deadline covers the save",
    "bug6:binding-mismatch": "6: an id_token naming another subject keeps the consumed entry",
}


@dataclass
class CallerPlan:
    """One caller task: its process, session, how its calls may be cancelled, when it calls."""

    process: int
    session: str
    kind: str
    gaps: list[float]


@dataclass
class EventPlan:
    """One world event at virtual time ``at``."""

    at: float
    kind: str  # logout | login | relogin | crash | jump
    process: int = 0
    session: str = "s0"
    subject: str = "alice"
    amount: float = 0.0


@dataclass
class Plan:
    """Everything a schedule decides up front (the rest is drawn as it runs)."""

    seed: int
    backend: str
    knobs: Knobs
    processes: int
    sessions: list[str]
    initial: dict[str, tuple[str, float]]
    refresh_timeout: float
    lease_ttl: float
    lease_wait: float | None
    leeway: float
    callers: list[CallerPlan]
    events: list[EventPlan]
    #: The seed's random stream, positioned after the draws that made this plan.
    rng: random.Random

    def describe(self) -> str:
        """A one-paragraph summary for the trace header."""
        k = self.knobs
        lines = [
            f"seed {self.seed}: {self.backend}, {k.storage} store, {self.processes} process(es), sessions "
            f"{self.sessions}, refresh_timeout={self.refresh_timeout} lease_ttl={self.lease_ttl} "
            f"lease_wait={self.lease_wait} leeway={self.leeway} redeem_in_task={REDEEM_IN_TASK}",
            f"  provider: connect<{k.connect} latency<{k.latency} slow {k.slow:.2f}<{k.slow_latency} neterr "
            f"{k.p_neterr:.2f} 503 {k.p_503:.2f} mismatch {k.p_mismatch:.2f} lost {k.p_lost:.2f} rotate {k.p_rotate}",
            f"  store: delay<{k.store_delay} errors {k.store_error:.2f}",
        ]
        for s, (subject, life) in self.initial.items():
            lines.append(f"  {s}: login {subject}, access token life {life:.2f}s")
        for i, c in enumerate(self.callers):
            lines.append(f"  c{i}: p{c.process} {c.session} {c.kind} gaps {[round(g, 3) for g in c.gaps]}")
        for e in self.events:
            lines.append(f"  event at {e.at:.3f}: {e.kind} p{e.process} {e.session} {e.subject} {e.amount:.1f}")
        return "\n".join(lines)


def make_plan(seed: int) -> Plan:
    """Draw a small schedule from ``seed``: 1-3 processes, a few callers, a few events."""
    rng = random.Random(seed)
    backend = "trio" if rng.random() < 0.35 else "asyncio"
    refresh_timeout = rng.choice((1.0, 3.0, 10.0))
    lease_ttl = refresh_timeout + rng.choice((1.0, 5.0))
    lease_wait = rng.choice((None, lease_ttl, 2.0))
    # Latencies are drawn relative to refresh_timeout, so answers land before, around and after it.
    knobs = Knobs(
        storage=rng.choice(("memory", "sqlite", "redis", "redis")),
        store_delay=refresh_timeout * rng.choice((0.002, 0.05, 0.4)),
        store_error=rng.choice((0.0, 0.0, 0.03, 0.15)),
        connect=rng.choice((0.001, 0.05)),
        latency=refresh_timeout * rng.choice((0.05, 0.5, 1.1)),
        slow=rng.choice((0.0, 0.1, 0.4)),
        slow_latency=refresh_timeout * rng.choice((1.2, 4.0)),
        p_neterr=rng.choice((0.0, 0.1)),
        p_503=rng.choice((0.0, 0.1)),
        p_mismatch=rng.choice((0.0, 0.0, 0.1)),
        p_lost=rng.choice((0.0, 0.0, 0.1)),
        p_rotate=rng.choice((1.0, 1.0, 0.7)),
        life=rng.choice(((5.0, 30.0), (20.0, 90.0))),
    )
    processes = rng.choice((1, 2, 2, 3))
    sessions = ["s0"] if rng.random() < 0.7 else ["s0", "s1"]
    initial = {s: (rng.choice(SUBJECTS), rng.uniform(-5.0, 12.0)) for s in sessions}
    kinds = TRIO_KINDS if backend == "trio" else ASYNCIO_KINDS
    callers = []
    for p in range(processes):
        for _ in range(rng.randint(1, 3)):
            gaps = [rng.uniform(0.0, 15.0)] + [rng.expovariate(1 / 8.0) for _ in range(rng.randint(0, 3))]
            callers.append(CallerPlan(p, rng.choice(sessions), rng.choice(kinds), gaps))
    events = []
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        kind = rng.choice(("relogin", "relogin", "login", "logout", "crash", "jump"))
        events.append(
            EventPlan(
                at=rng.uniform(0.0, 20.0),
                kind=kind,
                process=rng.randrange(processes),
                session=rng.choice(sessions),
                subject=rng.choice(SUBJECTS),
                amount=rng.choice((-30.0, 40.0, 400.0)) if kind == "jump" else rng.uniform(0.0, 1.0),
            )
        )
    events.sort(key=lambda e: e.at)
    return Plan(
        seed,
        backend,
        knobs,
        processes,
        sessions,
        initial,
        refresh_timeout,
        lease_ttl,
        lease_wait,
        rng.choice((30.0, 5.0)),
        callers,
        events,
        rng,
    )


@dataclass
class Result:
    """What one schedule did: violations (classified), statistics, the trace and the plan."""

    seed: int
    plan: Plan
    violations: list[Violation]
    stats: dict[str, int]
    trace: str
    error: str | None = None
    wall: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)

    @property
    def categories(self) -> list[str]:
        """The category of each violation (``kind`` when it has none)."""
        return [v.category or v.kind for v in self.violations] + (["sim-error"] if self.error else [])

    def report(self) -> str:
        """Plan, trace and violations, for a human replaying the seed."""
        parts = [self.plan.describe(), "", self.trace, ""]
        if self.error:
            parts.append(f"SIMULATION ERROR: {self.error}")
        for v in self.violations:
            parts.append(f"VIOLATION [{v.category or v.kind}] at {v.at:.4f}: {v.detail}")
        if not self.violations and not self.error:
            parts.append("all invariants held")
        parts.append(f"outcomes {self.outcomes}  stats {self.stats}")
        return "\n".join(parts)


class _Run:
    """One schedule in progress: builds the world and drives its tasks on the chosen runtime."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.world = w = World(plan.seed, plan.knobs)
        w.rng = plan.rng  # the stream continues after the draws that made the plan
        w.refresh_timeout = plan.refresh_timeout
        w.current_task = current_task_getter(plan.backend)
        self.clock = SimClock(w)
        self.managers: list[TokenManager] = []
        extra: dict[str, Any] = {"redeem_in": "task"} if REDEEM_IN_TASK else {}
        for pid in range(plan.processes):
            proc = Process(pid)
            w.processes.append(proc)
            self.managers.append(
                TokenManager(
                    refresher=SimRefresher(w, proc),
                    provider_id=PROVIDER_ID,
                    storage=SimStorage(w, proc),
                    clock=self.clock,
                    leeway=plan.leeway,
                    refresh_timeout=plan.refresh_timeout,
                    lease_ttl=plan.lease_ttl,
                    lease_wait=plan.lease_wait,
                    **extra,
                )
            )
        self.pending = 0
        self.all_done: anyio.Event | None = None
        self.own: dict[Any, Caller] = {}
        self.outcomes: dict[str, int] = {}
        self.hang_after = 20 * (plan.lease_wait or 2 * plan.lease_ttl) + 10 * plan.refresh_timeout + 120.0
        self.spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], None] = lambda fn: None

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _outcome(self, name: str) -> None:
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def _finish(self, caller: Caller) -> None:
        if not caller.done:
            caller.done = True
            self.pending -= 1
            if self.pending == 0 and self.all_done is not None:
                self.all_done.set()

    def _register(self, caller: Caller) -> None:
        task = self.world.current_task()
        self.world.task_callers[task] = caller
        self.own[task] = caller

    def _start(self, caller: Caller, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Spawn ``body`` as the task of ``caller``, cancellable by its process's crash."""
        self.pending += 1
        proc = self.world.processes[caller.process]
        proc.callers.append(caller)

        async def asyncio_task() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._register(caller)

            def cancel() -> None:
                task.cancel()

            proc.cancellers.append(cancel)
            try:
                await body()
            except BaseException:
                if not caller.crashed:
                    raise
            finally:
                self._finish(caller)

        async def trio_task() -> None:
            self._register(caller)
            with trio.CancelScope() as scope:
                proc.cancellers.append(scope.cancel)
                try:
                    await body()
                except BaseException:
                    if not caller.crashed:
                        raise
            self._finish(caller)

        self.spawn(trio_task if self.plan.backend == "trio" else asyncio_task)

    # -- callers --------------------------------------------------------------------------------------
    async def _caller(self, caller: Caller, cp: CallerPlan) -> None:
        manager = self.managers[cp.process]
        for gap in cp.gaps:
            await anyio.sleep(gap)
            outcome = await self._call(caller, manager, cp.session)
            caller.cancel_at = math.inf
            self._outcome(outcome)
            if outcome in ("cancelled", "timed-out", "hang"):
                return

    async def _call(self, caller: Caller, manager: TokenManager, session: str) -> str:
        """One ``aget_token`` under the caller's kind of cancellation; checks what it returns."""
        w = self.world
        started = w.now()
        kind = caller.kind
        delay = w.rng.choice((w.rng.uniform(0.0, 0.3), w.rng.uniform(0.0, 4.0), w.rng.uniform(0.0, 15.0)))
        caller.cancel_at = started + delay if kind != "plain" else math.inf
        w.log(f"{caller.name}: aget_token({session}) [{kind}{'' if kind == 'plain' else f' after {delay:.3f}'}]")
        try:
            with anyio.move_on_after(self.hang_after) as hang:
                tokens = await self._wrapped(kind, delay, manager, session)
            if hang.cancelled_caught:
                w.violate("hang", f"{caller.name}: aget_token did not return within {self.hang_after:.0f}s")
                return "hang"
        except UpstreamAuthError as exc:
            w.log(f"{caller.name}: -> {type(exc).__name__}: {exc}")
            if "ExceptionGroup" in str(exc):
                # The manager meant to raise something else, and an exception group hid its type.
                w.violate("error-type-lost", f"{caller.name}: {type(exc).__name__}: {exc}")
            return f"error:{type(exc).__name__}"
        except (TimeoutError, trio.TooSlowError):
            return self._interrupted(caller, "timed-out")
        except asyncio.CancelledError:
            if kind != "task_cancel" or caller.crashed:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return self._interrupted(caller, "cancelled")
        except Exception as exc:
            w.violate("untyped-error", f"{caller.name}: aget_token raised {type(exc).__name__}: {exc}")
            return "untyped-error"
        if tokens is None:
            return self._interrupted(caller, "cancelled")
        w.log(f"{caller.name}: -> {tokens.access_token} v{tokens.version}")
        w.check_use(caller, session, started, tokens)
        return "ok"

    def _interrupted(self, caller: Caller, outcome: str) -> str:
        w = self.world
        if w.now() < caller.cancel_at - EPSILON:
            w.violate("spurious-cancel", f"{caller.name}: {outcome} before its injected cancellation fired")
        w.log(f"{caller.name}: -> {outcome} by {caller.kind}")
        return outcome

    async def _wrapped(self, kind: str, delay: float, manager: TokenManager, session: str) -> Any:
        """Call ``aget_token`` inside the cancellation of ``kind``; ``None`` when a scope swallowed it."""
        if kind == "plain":
            return await manager.aget_token(session)
        if kind == "task_cancel":
            task = asyncio.current_task()
            assert task is not None
            handle = asyncio.get_running_loop().call_later(delay, task.cancel)
            try:
                return await manager.aget_token(session)
            finally:
                handle.cancel()
        if kind == "wait_for":
            inner = asyncio.ensure_future(manager.aget_token(session))
            caller = self.world.caller()
            assert caller is not None
            self.world.task_callers[inner] = caller
            try:
                return await asyncio.wait_for(inner, delay)
            finally:
                self.world.task_callers.pop(inner, None)
        if kind == "asyncio_timeout":
            async with asyncio.timeout(delay):
                return await manager.aget_token(session)
        if kind == "anyio_scope_cancel":
            with anyio.CancelScope() as scope:
                handle = asyncio.get_running_loop().call_later(delay, scope.cancel)
                try:
                    return await manager.aget_token(session)
                finally:
                    handle.cancel()
            return None
        if kind == "anyio_move_on_after":
            with anyio.move_on_after(delay):
                return await manager.aget_token(session)
            return None
        if kind == "anyio_fail_after":
            with anyio.fail_after(delay):
                return await manager.aget_token(session)
        if kind == "trio_move_on_after":
            with trio.move_on_after(delay):
                return await manager.aget_token(session)
            return None
        if kind == "trio_fail_after":
            with trio.fail_after(delay):
                return await manager.aget_token(session)
        raise AssertionError(kind)

    # -- world events -------------------------------------------------------------------------------
    async def _login(self, caller: Caller, session: str, subject: str) -> None:
        w = self.world
        gid, tokens = w.provider.login(subject, self.plan.initial.get(session, (subject, 10.0))[1] + 20.0)
        w.log(f"{caller.name}: login {session} as {subject} (g{gid})")
        epoch = w.begin_session_change(session, gid, caller.process)
        token = APP_OP.set("login")
        try:
            await self.managers[caller.process].astore(session, tokens)
        except UpstreamAuthError as exc:
            w.log(f"{caller.name}: login failed: {type(exc).__name__}")
            w.end_session_change(session, epoch, applied=False)
            return
        finally:
            APP_OP.reset(token)
        w.end_session_change(session, epoch)
        w.log(f"{caller.name}: login {session} done")

    async def _logout(self, caller: Caller, session: str) -> None:
        w = self.world
        w.log(f"{caller.name}: logout {session}")
        epoch = w.begin_session_change(session, None, caller.process)
        token = APP_OP.set("logout")
        try:
            await self.managers[caller.process].adelete(session)
        except UpstreamAuthError as exc:
            w.log(f"{caller.name}: logout failed: {type(exc).__name__}")
            w.end_session_change(session, epoch, applied=False)
            return
        finally:
            APP_OP.reset(token)
        w.end_session_change(session, epoch)
        w.log(f"{caller.name}: logout {session} done")

    async def _event(self, caller: Caller, ev: EventPlan) -> None:
        w = self.world
        await anyio.sleep(ev.at)
        if ev.kind == "logout":
            await self._logout(caller, ev.session)
        elif ev.kind == "login":
            await self._login(caller, ev.session, ev.subject)
        elif ev.kind == "relogin":
            await self._logout(caller, ev.session)
            await anyio.sleep(ev.amount)
            await self._login(caller, ev.session, ev.subject)
        elif ev.kind == "jump":
            w.wall_offset += ev.amount
            w.log(f"world: wall clock jumps {ev.amount:+.0f}s")
        elif ev.kind == "crash":
            proc = w.processes[ev.process]
            if proc.crashed:
                return
            proc.crashed_at = w.now()
            w.log(f"world: process p{proc.pid} CRASHES")
            # Where the crash landed (stats show every step gets crashed in, over many seeds).
            if any(pid == proc.pid for _, _, pid in w.store.leases.values()):
                w.count("crash-holding-lease")
            if any(r.process == proc.pid and r.fate == "pending" for r in w.provider.redemptions):
                w.count("crash-with-answer-in-flight")
            elif any(
                r.process == proc.pid and r.kind == "rotated" and r.fate == "delivered" and not r.saves
                for r in w.provider.redemptions
            ):
                w.count("crash-between-answer-and-save")
            for c in proc.callers:
                if not c.done:
                    c.crashed = True
                    self._finish(c)
            for cancel in proc.cancellers:
                cancel()

    # -- the schedule -----------------------------------------------------------------------------------
    async def main(self) -> None:
        """Initial logins, then every caller and event, then settle and check what is left behind."""
        w, plan = self.world, self.plan
        self.all_done = anyio.Event()
        app = Caller("app", 0, "plain")
        self._register(app)
        for session, (subject, life) in plan.initial.items():
            for _ in range(10):
                gid, tokens = w.provider.login(subject, life)
                epoch = w.begin_session_change(session, gid)
                token = APP_OP.set("login")
                try:
                    await self.managers[0].astore(session, tokens)
                except UpstreamAuthError:
                    w.end_session_change(session, epoch, applied=False)
                    continue
                finally:
                    APP_OP.reset(token)
                w.end_session_change(session, epoch)
                w.log(f"app: initial login {session} as {subject} (g{gid}, expires in {life:.2f}s)")
                break
        for i, cp in enumerate(plan.callers):
            caller = Caller(f"c{i}/p{cp.process}", cp.process, cp.kind)
            self._start(caller, lambda caller=caller, cp=cp: self._caller(caller, cp))  # type: ignore[misc]
        for i, ev in enumerate(plan.events):
            pid = ev.process if ev.kind in ("logout", "login", "relogin") else -1
            caller = Caller(f"e{i}/{ev.kind}", max(pid, 0), "plain")
            if pid < 0:
                self.pending += 1
                self.spawn(lambda caller=caller, ev=ev: self._world_event(caller, ev))  # type: ignore[misc]
            else:
                self._start(caller, lambda caller=caller, ev=ev: self._event(caller, ev))  # type: ignore[misc]
        if self.pending:
            with anyio.move_on_after(self.hang_after * 4):
                await self.all_done.wait()
        stuck = [c.name for p in w.processes for c in p.callers if not c.done]
        if stuck:
            w.violate("hang", f"callers never finished: {stuck}")
        await self._settle()
        w.tearing_down = True

    async def _world_event(self, caller: Caller, ev: EventPlan) -> None:
        self._register(caller)
        try:
            await self._event(caller, ev)
        finally:
            self._finish(caller)

    async def _settle(self) -> None:
        """Wait for the managers' own tasks to end, then check no task or lease is left behind."""
        w, plan = self.world, self.plan
        limit = 4 * (plan.lease_wait or 2 * plan.lease_ttl) + 8 * plan.refresh_timeout + 60.0
        left: list[str] = []
        waited = 0.0
        while True:
            left = self._leftover_tasks()
            if not left or waited > limit:
                break
            await anyio.sleep(1.0)
            waited += 1.0
        if left:
            w.violate("tasks-left", f"{len(left)} task(s) still running {limit:.0f}s after the last caller: {left}")
        now = w.store.lease_clock()
        for key, (owner, expires, pid) in w.store.leases.items():
            if owner in w.store.orphans or owner in w.store.release_tried:
                w.count("lease-left-to-expire")
            elif not w.processes[pid].crashed and expires > now:
                w.violate("lease-left", f"live process p{pid} still holds lease {owner} on {key}")

    def _leftover_tasks(self) -> list[str]:
        w = self.world
        me = w.current_task()
        if self.plan.backend == "trio":
            tasks: list[Any] = []

            def walk(task: Any) -> None:
                for nursery in task.child_nurseries:
                    for child in nursery.child_tasks:
                        tasks.append(child)
                        walk(child)

            walk(trio.lowlevel.current_root_task())
            names = [
                t.name
                for t in tasks
                if t is not me and t not in self.own and t not in w.frozen and not t.name.startswith("<")
            ]
        else:
            names = [
                getattr(t.get_coro(), "__qualname__", "?")
                for t in asyncio.all_tasks()
                if t is not me and t not in self.own and t not in w.frozen and t not in w.task_callers
            ]
        return sorted(str(n) for n in names)

    # -- runtimes ---------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the schedule on its runtime."""
        if self.plan.backend == "trio":
            self.world.set_now(trio.current_time)
            run_trio(self._trio_main, self.plan.seed)
        else:
            run_asyncio(self._asyncio_main, self._asyncio_error)

    async def _asyncio_main(self) -> None:
        loop = asyncio.get_running_loop()
        self.world.set_now(loop.time)
        tasks: list[asyncio.Task[None]] = []
        self.spawn = lambda fn: tasks.append(loop.create_task(fn()))
        await self.main()
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        for t in failed:
            exc = t.exception()
            self.world.violate("sim-task-error", f"{type(exc).__name__}: {exc}")

    async def _trio_main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.spawn = lambda fn: nursery.start_soon(fn)
            await self.main()
            nursery.cancel_scope.cancel()

    def _asyncio_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if self.world.tearing_down:
            return
        exc = context.get("exception")
        self.world.violate("background-error", f"{context.get('message')}: {type(exc).__name__}: {exc}")


def classify(world: World) -> None:
    """Name the cause of each violation; drop the reuses any design must allow (crash, store down)."""
    provider = world.provider
    kept: list[Violation] = []
    for v in world.violations:
        if v.kind == "cross-lineage-write":
            v.category = "bug2:cross-lineage-write"
        elif v.kind == "reuse" and v.rid is not None:
            v.category = _classify_reuse(world, v.rid)
            if v.category.startswith("excused:"):
                world.count(v.category)
                continue
            first = provider.redemptions[provider.redemptions[v.rid].first or 0]
            v.detail += f" [first r{first.rid}: fate {first.fate}, saves {first.saves}, deletes {first.deletes}]"
        kept.append(v)
    world.violations = kept


def _classify_reuse(world: World, rid: int) -> str:
    second = world.provider.redemptions[rid]
    first = world.provider.redemptions[second.first or 0]
    sender = world.processes[first.process]
    saved = "applied" in first.saves
    if sender.crashed_at is not None and sender.crashed_at >= first.at and not saved:
        return "excused:crash-after-send"
    fate = second.first_fate_then
    if fate == "pending":
        slow = second.first_age_then > world.refresh_timeout
        return "concurrent-redemption" + (":first-still-at-provider-after-refresh_timeout" if slow else "")
    if fate.startswith("lost-cancel:"):
        cause = fate.split(":", 1)[1]
        if cause in NATIVE_KINDS:
            return "bug1:native-cancel"
        if cause == "internal":
            return "timeout-while-at-provider"
        return "scope-cancel-lost-answer"
    if fate == "binding-mismatch":
        return "bug6:binding-mismatch"
    if fate == "may-have-rotated":
        return "lost-answer-kept-entry"
    if saved:
        # Saved later than the reuse: the second redemption overlapped the first's save.
        return "reuse-after-save" if second.first_saved_then else "concurrent-redemption"
    for save in first.saves:
        if ":" in save:
            cause = save.split(":", 1)[1]
            if cause in NATIVE_KINDS:
                return "bug1:native-cancel"
            if cause == "internal":
                return "bug5:timeout-during-save"
            return "scope-cancel-during-save"
    if any(s.startswith("error") for s in first.saves):
        if "applied" not in first.deletes and second.process != first.process:
            return "excused:store-down-after-rotation"
        return "save-error-kept-entry"
    return "delivered-never-saved"


def run_schedule(seed: int, mutant: str = "") -> Result:
    """Plan, run and check one schedule (``mutant``: a deliberate store defect, see :class:`Knobs`)."""
    plan = make_plan(seed)
    plan.knobs.mutant = mutant
    started = time.perf_counter()
    run = _Run(plan)
    error = None
    try:
        run.run()
    except BaseException as exc:  # the simulation itself failed: report it with the seed
        if isinstance(exc, KeyboardInterrupt):
            raise
        cause = exc.__cause__ or exc.__context__
        error = f"{type(exc).__name__}: {exc}" + (f" (from {type(cause).__name__}: {cause})" if cause else "")
    classify(run.world)
    return Result(
        seed,
        plan,
        run.world.violations,
        run.world.stats,
        run.world.format_trace(),
        error,
        time.perf_counter() - started,
        run.outcomes,
    )


def run_many(seeds: range, on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Run every seed; return the results that broke an invariant (or errored)."""
    bad = []
    for seed in seeds:
        result = run_schedule(seed)
        if on_result is not None:
            on_result(result)
        if result.violations or result.error:
            bad.append(result)
    return bad
