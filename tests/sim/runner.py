"""Plans and runs one seeded schedule against the real ``TokenManager``, then checks the invariants.

``run_schedule(seed)`` draws everything from ``random.Random(seed)``: the runtime (asyncio or trio), the
storage kind, the processes, their callers and how each call may be cancelled, the provider's and the
store's latencies and faults, logouts, re-logins, crashes and clock jumps. It runs them on virtual time
and returns a :class:`Result` with the violations (each classified) and the trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import math
import os
import random
import sys
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import attrs
import httpx
import trio

from httpx_upstream_auth import (
    EntryKey,
    RefreshFailed,
    SQLiteStorage,
    TokenManager,
    UpstreamAuthError,
    UpstreamTokens,
)

from .checker import check_manager_tables, storage_subscribers, task_jobs_of
from .fork import fork_manager
from .vtime import run_asyncio, run_asyncio_then_close, run_trio
from .world import (
    APP_OP,
    NATIVE_KINDS,
    Caller,
    Knobs,
    Process,
    Redemption,
    SimClock,
    SimRefresher,
    SimStorage,
    Violation,
    World,
    current_task_getter,
)

__all__ = ["Plan", "Result", "classify", "make_plan", "run_many", "run_schedule"]

_TEMPDIR: list[str] = []


def _tempdir() -> str:
    """One temporary directory per interpreter for the real SQLite files (one file per schedule)."""
    if not _TEMPDIR:
        # In memory where there is a tmpfs: the store syncs every commit, which a disk makes slow.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _TEMPDIR.append(tempfile.mkdtemp(prefix="hua-sim-", dir=shm))
    return _TEMPDIR[0]


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
    "refresh-storm": "issue 12 item 11: an answer with expires_in 0 makes one call redeem again and again",
    "refresh-on-foreign-401": "issue 12 item 9: a 401 from another origin after a redirect triggers refresh+replay",
    "distrust-outlived-acceptance": "issue 12 item 8: a token refused once on its replay is distrusted for good",
    "subscriber-leak": "issue 12 item 12: managers dropped without close() stay subscribed (and alive)",
    "manager-leak": "issue 12 item 12: managers dropped without close() are never freed",
    "table-over-bound:_retry_at": "issue 12 item 12: the back-off table never shrinks",
    "task-job-leak": "issue 12 item 12: task jobs whose loop closed stay referenced",
    "item10:consumed-memory-holds-saved": "issue 12 item 10: consumed-token memory filled by successful rotations",
    "item4:closed-under-job": "issue 12 item 4: aclose() under a running job; the consumed token is presented again",
    "item4:no-fail-closed-attempt": "issue 12 item 4: aclose() under a running job; it can neither save nor delete",
    "item3:fork:orphan-flight": "issue 12 item 3: a child forked during a job inherits its flight, never finished",
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
    #: Virtual time before the first gap (a forked child's callers start after the fork).
    after: float = 0.0
    #: The session of each call, when they differ (the crowd caller walks many sessions).
    walk: list[str] | None = None
    #: Send a request through ``httpx.AsyncClient(auth=manager.auth(session))`` instead of ``aget_token``.
    via_auth: bool = False
    #: Chance that a request goes to a URL that redirects to another origin.
    p_redirect: float = 0.0
    #: Chance that a request goes to a URL the API refuses (401) whatever the token (not the token's fault).
    p_refuses: float = 0.0


@dataclass
class Ext:
    """The events of a deployment's life (issue 12), each in a fraction of the schedules.

    Drawn from a second stream (``random.Random(f"ext:{seed}")``), so the schedules of the original
    generator are unchanged where no extension is drawn.
    """

    cache_size: int = 10_000
    #: Sessions logged in up front (beyond cache_size) that the crowd caller walks:
    #: (session, subject, life, issued_ago).
    crowd: list[tuple[str, str, float, float]] = field(default_factory=list)
    #: Forked children: child pid -> (fork time, parent pid, during_job).
    forks: dict[int, tuple[float, int, bool]] = field(default_factory=dict)
    #: Managers made and dropped without close (item 12).
    churn: int = 0
    real_sqlite: bool = False
    auth: bool = False
    #: The application closes its asyncio loop after this long (then once a job runs), jobs pending.
    loop_end: float | None = None
    #: The managers' retry_interval (how long a failed early refresh backs off).
    retry_interval: float = 1.0
    #: After closing its loop, the application runs a new one with the same managers (``restart``): these
    #: callers (their ``after`` counts from the restart). ``hold_dead``: the closed loop's pending tasks are
    #: still referenced then (collected only later), else they were collected before the new loop started.
    restart: list[CallerPlan] = field(default_factory=list)
    hold_dead: bool = False
    #: lease_ttl was drawn below refresh_timeout (a healthy store fast enough for the keeper's renewals).
    short_lease: bool = False

    def describe(self) -> str:
        """One line for the plan's header."""
        parts = [f"cache_size={self.cache_size}"]
        if self.crowd:
            parts.append(f"crowd of {len(self.crowd)} sessions")
        if self.forks:
            parts.append(
                "forks "
                + ", ".join(
                    f"p{c}<-p{p} at {t:.2f}{' during a job' if j else ''}" for c, (t, p, j) in self.forks.items()
                )
            )
        if self.churn:
            parts.append(f"{self.churn} managers dropped without close")
        if self.real_sqlite:
            parts.append("real SQLiteStorage")
        if self.auth:
            parts.append("auth flow through httpx")
        if self.loop_end is not None:
            parts.append(f"loop closed after {self.loop_end:.1f}s")
        if self.restart:
            held = "pending tasks still referenced" if self.hold_dead else "pending tasks collected"
            parts.append(
                f"then a new loop ({held}): "
                + "; ".join(f"p{c.process} {c.session} gaps {[round(g, 3) for g in c.gaps]}" for c in self.restart)
            )
        if self.retry_interval != 1.0:
            parts.append(f"retry_interval={self.retry_interval}")
        if self.short_lease:
            parts.append("lease_ttl below refresh_timeout")
        return "  ext: " + ", ".join(parts)


@dataclass
class EventPlan:
    """One world event at virtual time ``at``."""

    at: float
    kind: str  # logout | login | relogin | crash | jump | ... (see ``_Run._event``)
    process: int = 0
    session: str = "s0"
    subject: str = "alice"
    amount: float = 0.0
    #: For ``close``: ``aclose``, ``close`` (the sync close, from the loop's thread) or ``aclose+exit`` (the
    #: process exits once aclose returns); ``then``: (process, delay) of calls other processes make after.
    mode: str = ""
    then: list[tuple[int, float]] = field(default_factory=list)


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
    ext: Ext = field(default_factory=Ext)

    def describe(self) -> str:
        """A one-paragraph summary for the trace header."""
        k = self.knobs
        lines = [
            f"seed {self.seed}: {self.backend}, {k.storage} store, {self.processes} process(es), sessions "
            f"{self.sessions}, refresh_timeout={self.refresh_timeout} lease_ttl={self.lease_ttl} "
            f"lease_wait={self.lease_wait} leeway={self.leeway} redeem_in_task={REDEEM_IN_TASK}",
            f"  provider: connect<{k.connect} latency<{k.latency} slow {k.slow:.2f}<{k.slow_latency} neterr "
            f"{k.p_neterr:.2f} 503 {k.p_503:.2f} mismatch {k.p_mismatch:.2f} lost {k.p_lost:.2f} rotate {k.p_rotate}",
            f"  store: delay<{k.store_delay} errors {k.store_error:.2f} outages "
            f"{[(round(a, 2), round(b, 2)) for a, b in k.outages]} stalls "
            f"{[(round(a, 2), round(b, 2)) for a, b in k.stalls]}; gateway-after-redeem {k.p_gateway:.2f} "
            f"expires_in=0 {k.p_zero_life:.2f} api-401 {k.p_api_401:.2f} partial-rotation {k.p_partial_rotation:.1f}"
            + ("" if k.notices else "; the store reports no changes")
            + (
                ""
                if k.read_hang is None
                else f"; a {'lease release' if k.hang_op == 'release' else 'read under a lease'} hangs "
                f"{k.read_hang[1]:.1f}s after {k.read_hang[0]:.2f}"
            )
            + (
                f"; provider down {[(round(a, 2), round(b, 2)) for a, b in k.provider_outages]}"
                * bool(k.provider_outages)
            ),
            self.ext.describe(),
        ]
        for s, (subject, life) in self.initial.items():
            lines.append(f"  {s}: login {subject}, access token life {life:.2f}s")
        for i, c in enumerate(self.callers):
            lines.append(
                f"  c{i}: p{c.process} {c.session} {c.kind} gaps {[round(g, 3) for g in c.gaps]}"
                + (f" after {c.after:.3f}" if c.after else "")
                + (f" walk {c.walk}" if c.walk else "")
                + (f" via auth (redirects {c.p_redirect:.2f})" if c.via_auth else "")
            )
        for e in self.events:
            lines.append(
                f"  event at {e.at:.3f}: {e.kind} p{e.process} {e.session} {e.subject} {e.amount:.1f}"
                + (f" {e.mode}" if e.mode else "")
                + (f" then {[(p, round(d, 2)) for p, d in e.then]}" if e.then else "")
            )
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
    ext = Ext()
    knobs_ext(knobs, refresh_timeout, lease_ttl, rng_ext := random.Random(f"ext:{seed}"))
    leeway = rng.choice((30.0, 5.0))
    processes = extend_plan(
        ext, rng_ext, backend, knobs, processes, sessions, initial, callers, events, kinds, refresh_timeout, leeway
    )
    lease_ttl, lease_wait = extend_plan_more(
        ext,
        random.Random(f"ext2:{seed}"),
        knobs,
        processes,
        sessions,
        callers,
        events,
        refresh_timeout,
        lease_ttl,
        lease_wait,
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
        leeway,
        callers,
        events,
        rng,
        ext,
    )


def knobs_ext(knobs: Knobs, refresh_timeout: float, lease_ttl: float, xr: random.Random) -> None:
    """Faults of a deployment's life: correlated store outages longer than refresh_timeout, gateway answers
    after the provider redeemed, answers born expired, the API's transient 401s."""
    if knobs.storage != "memory" and xr.random() < 0.12:
        outages = []
        for _ in range(xr.choice((1, 1, 2))):
            start = xr.uniform(0.0, 25.0)
            outages.append((start, start + refresh_timeout * xr.uniform(1.5, 4.0)))
        knobs.outages = tuple(outages)
    if knobs.storage != "memory" and xr.random() < 0.1:
        start = xr.uniform(0.0, 25.0)
        knobs.stalls = ((start, start + lease_ttl * xr.uniform(1.0, 3.0)),)
        knobs.stall_delay = lease_ttl * xr.choice((0.4, 0.8))
    # A job holds its lease while it redeems (refresh_timeout), saves (retries for refresh_timeout) and
    # fails closed (another refresh_timeout), plus a few store operations past each bound, plus the ttl.
    op = knobs.store_delay * (2 if knobs.storage == "redis" else 1)
    knobs.lease_hold_bound = 3 * refresh_timeout + lease_ttl + 10 * op
    if xr.random() < 0.15:
        knobs.p_gateway = xr.choice((0.1, 0.3))
    if xr.random() < 0.1:
        knobs.p_zero_life = xr.choice((0.2, 0.6))
    if xr.random() < 0.1:
        knobs.p_partial_rotation = xr.choice((0.3, 0.7))
    if xr.random() < 0.25:
        knobs.p_api_401 = xr.choice((0.0, 0.15, 0.3))


def extend_plan(
    ext: Ext,
    xr: random.Random,
    backend: str,
    knobs: Knobs,
    processes: int,
    sessions: list[str],
    initial: dict[str, tuple[str, float]],
    callers: list[CallerPlan],
    events: list[EventPlan],
    kinds: tuple[str, ...],
    refresh_timeout: float,
    leeway: float,
) -> int:
    """Add the events of issue 12 to a plan (in place); return the number of processes (forks add some)."""
    shared = knobs.storage != "memory"
    if xr.random() < 0.15:
        # Many sessions beyond a small cache, and a logout/re-login of an early one from another process.
        ext.cache_size = xr.choice((4, 8, 16))
        knobs.p_503 = max(knobs.p_503, xr.choice((0.2, 0.5)))
        n = 2 * ext.cache_size + xr.randint(2, ext.cache_size + 4)
        every = max(2, ext.cache_size // xr.choice((1, 2, 3)))
        walk = ["e0"]
        for i in range(1, n + 1):
            walk.append(f"k{i}")
            if i % every == 0:
                walk.append("e0")
        walk += ["e0"] * xr.randint(2, 5)
        gaps = [xr.uniform(0.0, 2.0)] + [xr.uniform(0.02, 0.6) for _ in walk[1:]]
        visit: dict[str, float] = {}
        elapsed = 0.0
        for session, gap in zip(walk, gaps, strict=False):
            elapsed += gap
            visit.setdefault(session, elapsed)
        ext.crowd = [("e0", xr.choice(SUBJECTS), xr.uniform(300.0, 900.0), 1.0)]
        for i in range(1, n + 1):
            if xr.random() < 0.6:
                # Inside its leeway (but valid) when the walk reaches it: refreshed early, and a 503 then
                # leaves a back-off entry behind.
                life = visit[f"k{i}"] + xr.uniform(0.3, 0.9) * leeway
                ext.crowd.append((f"k{i}", xr.choice(SUBJECTS), life, 1000.0))
            else:
                ext.crowd.append((f"k{i}", xr.choice(SUBJECTS), xr.uniform(300.0, 900.0), 1.0))
        callers.append(CallerPlan(0, "e0", "plain", gaps, walk=walk))
        processes = max(processes, 2)
        span = sum(gaps)
        for _ in range(xr.choice((1, 1, 2))):
            events.append(
                EventPlan(
                    xr.uniform(span * 0.3, span),
                    "relogin",
                    xr.randrange(1, processes),
                    "e0",
                    xr.choice(SUBJECTS),
                    xr.uniform(0.0, 0.5),
                )
            )
        callers.append(CallerPlan(1, "e0", "plain", [xr.uniform(0.0, span) for _ in range(3)]))
    if backend == "asyncio" and xr.random() < 0.25:
        ext.auth = True
        knobs.p_api_401 = xr.choice((0.1, 0.3))
        p_redirect = xr.choice((0.0, 0.2))
        p_refuses = xr.choice((0.0, 0.0, 0.3))
        for c in callers:
            if xr.random() < 0.6 and c.walk is None:
                c.via_auth, c.p_redirect, c.p_refuses = True, p_redirect, p_refuses
        for _ in range(xr.choice((2, 3, 5))):
            events.append(EventPlan(xr.uniform(0.0, 40.0), "api-revoke", 0, xr.choice(sessions)))
    if shared and xr.random() < 0.1:
        # The store goes down once a refresh answer is in flight, for longer than refresh_timeout.
        events.append(EventPlan(xr.uniform(0.0, 20.0), "outage", amount=refresh_timeout * xr.uniform(1.5, 4.0)))
    if xr.random() < 0.1:
        # A burst of logouts and logins of one session by a process whose callers read it meanwhile.
        pid, session, at = xr.randrange(processes), xr.choice(sessions), xr.uniform(0.0, 20.0)
        for _ in range(xr.randint(3, 6)):
            at += xr.uniform(0.05, 2.0)
            events.append(
                EventPlan(
                    at,
                    xr.choice(("relogin", "login", "logout")),
                    pid,
                    session,
                    xr.choice(SUBJECTS),
                    xr.uniform(0.0, 0.3),
                )
            )
        callers.append(
            CallerPlan(
                pid,
                session,
                "plain",
                [max(0.0, at - 3.0 + xr.uniform(0.0, 1.0))] + [xr.uniform(0.05, 0.8) for _ in range(xr.randint(3, 8))],
            )
        )
    if processes >= 2 and xr.random() < 0.1:
        # The application shuts a process's manager down while its refresh job may run (item 4).
        events.append(EventPlan(xr.uniform(0.0, 20.0), "close", xr.randrange(processes)))
    if shared and xr.random() < 0.12:
        # fork() of a process with a manager: a new process with the parent's in-memory state (items 2, 3).
        for _ in range(xr.choice((1, 1, 2))):
            child, parent = processes, xr.randrange(processes)
            processes += 1
            during = xr.random() < 0.5
            at = xr.uniform(0.0, 15.0)
            ext.forks[child] = (at, parent, during)
            session = xr.choice(sessions)
            for _ in range(xr.randint(1, 2)):
                gaps = [xr.uniform(0.0, 10.0)] + [xr.expovariate(1 / 8.0) for _ in range(xr.randint(1, 3))]
                callers.append(CallerPlan(child, session, xr.choice(kinds), gaps, after=at + 1e-3))
            # A login change by someone after the fork: the child must hear of it, and the others of its own.
            who = xr.choice((child, parent, *range(processes - 1)))
            events.append(
                EventPlan(
                    at + xr.uniform(0.5, 15.0),
                    xr.choice(("relogin", "logout")),
                    who,
                    session,
                    xr.choice(SUBJECTS),
                    xr.uniform(0.0, 0.5),
                )
            )
            if who == child or xr.random() < 0.5:
                callers.append(CallerPlan(parent, session, "plain", [at + xr.uniform(1.0, 30.0), xr.uniform(1, 10)]))
    if xr.random() < 0.05:
        ext.churn = xr.randint(3, 8)
        for _ in range(ext.churn):
            events.append(EventPlan(xr.uniform(0.0, 20.0), "churn", xr.randrange(processes), xr.choice(sessions)))
    if knobs.storage == "sqlite" and xr.random() < 0.4:
        ext.real_sqlite = True
    if backend == "asyncio" and xr.random() < 0.05:
        ext.loop_end = xr.uniform(3.0, 30.0)
    return processes


def extend_plan_more(
    ext: Ext,
    xr: random.Random,
    knobs: Knobs,
    processes: int,
    sessions: list[str],
    callers: list[CallerPlan],
    events: list[EventPlan],
    refresh_timeout: float,
    lease_ttl: float,
    lease_wait: float | None,
) -> tuple[float, float | None]:
    """More of a deployment's life (issue 12, brief H1), from a third stream (``ext2:``, so a plan without them
    is drawn as before): a provider outage, grants revoked at the provider, a login handed to the wrong
    provider's manager, the ways an application closes a manager (sync close, exit after aclose), a store
    that reports no changes, a store stall once a job runs, a lease shorter than the token request, and a new
    event loop after the first was closed. Returns the (possibly redrawn) lease_ttl and lease_wait."""
    shared = knobs.storage != "memory"
    if ext.crowd:
        # Back-off pauses long enough to overlap across the whole walk, and (half the time) a provider that is
        # down meanwhile, so every early refresh of the crowd backs off.
        ext.retry_interval = xr.choice((1.0, 30.0, 120.0))
        if xr.random() < 0.5:
            walker = next(c for c in callers if c.walk)
            span = sum(walker.gaps)
            start = xr.uniform(0.0, span * 0.3)
            knobs.provider_outages += ((start, start + span),)
    if xr.random() < 0.06:
        start = xr.uniform(0.0, 25.0)
        knobs.provider_outages += ((start, start + xr.uniform(2.0, 20.0)),)
    if xr.random() < 0.08:
        for _ in range(xr.choice((1, 2))):
            events.append(EventPlan(xr.uniform(0.0, 25.0), "grant-revoke", session=xr.choice(sessions)))
    if xr.random() < 0.04:
        events.append(EventPlan(xr.uniform(0.0, 20.0), "foreign-login", xr.randrange(processes), xr.choice(sessions)))
    for ev in events:
        if ev.kind == "close":
            ev.mode = xr.choice(("aclose", "close", "aclose+exit", "aclose+exit"))
            if ev.mode == "aclose+exit":
                ev.then = [
                    (p, xr.uniform(0.0, 3.0 * lease_ttl)) for p in range(processes) if p != ev.process for _ in (0, 1)
                ]
    if shared and xr.random() < 0.12:
        # A third-party store that never calls notify_change: no manager hears of any write (its own
        # included); a process that logs a session out while reading it races its own reads.
        knobs.notices = False
        if xr.random() < 0.6:
            pid, session, at = xr.randrange(processes), xr.choice(sessions), xr.uniform(0.0, 20.0)
            for _ in range(xr.randint(3, 6)):
                at += xr.uniform(0.05, 2.0)
                kind = xr.choice(("relogin", "login", "logout"))
                events.append(EventPlan(at, kind, pid, session, xr.choice(SUBJECTS), xr.uniform(0.0, 0.3)))
            gaps = [max(0.0, at - 6.0)] + [xr.uniform(0.02, 0.5) for _ in range(xr.randint(6, 14))]
            callers.append(CallerPlan(pid, session, "plain", gaps))
    if shared and xr.random() < 0.06:
        # One read a job makes under its lease hangs (a connection black-holed) for longer than the job's
        # bounds, then fails: the lease keeper must stop renewing, so the lease lapses for the others.
        knobs.read_hang = (xr.uniform(0.0, 20.0), (2 * refresh_timeout + lease_ttl) * xr.uniform(1.5, 3.0))
    if shared and xr.random() < 0.08:
        # The store stalls once a refresh answer is in flight: each leg of an operation takes a large part of
        # the lease's ttl, for one to three ttls (the lease keeper's renewals and the job's writes meet it).
        events.append(EventPlan(xr.uniform(0.0, 20.0), "stall", amount=lease_ttl * xr.uniform(1.0, 3.0)))
        if not knobs.stall_delay:
            knobs.stall_delay = lease_ttl * xr.choice((0.4, 0.8))
    legs = {"memory": 0, "sqlite": 1, "redis": 2}[knobs.storage]
    healthy = (
        knobs.store_error == 0.0
        and not knobs.outages
        and not knobs.stalls
        and not any(e.kind in ("outage", "stall") for e in events)
        and not knobs.read_hang
    )
    if healthy and xr.random() < 0.3:
        # A lease shorter than the token request: the job's lease keeper must renew it while the provider
        # answers (TokenManager documents the ttl as what a crash costs; tests run with 0.3s). Drawn only where
        # a renewal's round trip fits in the third of the ttl the keeper waits between renewals.
        ttl = refresh_timeout * xr.uniform(0.25, 0.6)
        if legs * knobs.store_delay <= ttl / 3:
            ext.short_lease = True
            if lease_wait == lease_ttl:
                lease_wait = ttl
            lease_ttl = ttl
            knobs.lease_hold_bound = 3 * refresh_timeout + lease_ttl + 10 * knobs.store_delay * max(legs, 1)
    if ext.loop_end is not None and xr.random() < 0.6:
        ext.hold_dead = xr.random() < 0.5
        for p in range(processes):
            for _ in range(xr.choice((1, 2))):
                gaps = [xr.uniform(0.0, 2.0 * lease_ttl)] + [xr.expovariate(1 / 5.0) for _ in range(xr.randint(1, 3))]
                ext.restart.append(CallerPlan(p, xr.choice(sessions), "plain", gaps))
    if knobs.read_hang is not None and xr.random() < 0.5:
        # Drawn last, so no other part of a plan changes: the call that hangs is the job's lease release (it
        # runs in the job's finally, before the flight's outcome is published) instead of a read.
        knobs.hang_op = "release"
    if knobs.p_api_401 > 0 and xr.random() < 0.3:
        # Drawn last too: answers without "expires_in" (a lifetime the client cannot know), so a token the API
        # refuses on its replay is distrusted without an expiry to end that distrust.
        knobs.p_no_life = xr.choice((0.3, 0.7))
    return lease_ttl, lease_wait


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
        w.lease_ttl = plan.lease_ttl
        w.cache_size = plan.ext.cache_size
        # TokenManager's defaults: a caller waits lease_wait (rt + 2 ttl) plus refresh_timeout for a job.
        lease_wait = plan.refresh_timeout + 2 * plan.lease_ttl if plan.lease_wait is None else plan.lease_wait
        self.wait_timeout = lease_wait + plan.refresh_timeout
        #: The closed loop's pending tasks, while the application still references them (``Ext.hold_dead``).
        self.held: list[Any] = []
        w.current_task = current_task_getter(plan.backend)
        self.clock = SimClock(w)
        self.managers: list[TokenManager | None] = []
        self.storages: list[SimStorage | None] = []
        self.refreshers: list[SimRefresher | None] = []
        #: Managers made and dropped without close (weak references: they must be freed).
        self.dropped: list[weakref.ref[TokenManager]] = []
        #: Short-lived managers per process that the application has made and not yet dropped.
        self.in_use: Counter[int] = Counter()
        self.clients: dict[int, httpx.AsyncClient] = {}
        self.requests = 0
        #: API bookkeeping for the auth flow: (process, access token) -> last time the API accepted it from
        #: that process (a distrust is per process, and only that process's answers can end it).
        self.api_accepted: dict[tuple[int, str], float] = {}
        #: (process, access token) -> last time the token was refused on a replay there (the flow distrusts it
        #: in that process)
        self.api_replay_refused: dict[tuple[int, str], float] = {}
        self.api_accepted_at: dict[str, list[float]] = {}
        self.real_path: str | None = None
        if plan.ext.real_sqlite:
            self.real_path = os.path.join(_tempdir(), f"sim-{plan.seed}.db")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.real_path + suffix)
            w.store.real = SQLiteStorage(self.real_path)
        for pid in range(plan.processes):
            proc = Process(pid)
            w.processes.append(proc)
            if pid in plan.ext.forks:
                proc.parent = plan.ext.forks[pid][1]
                self.managers.append(None)  # made by its fork
                self.storages.append(None)
                self.refreshers.append(None)
                continue
            storage, refresher = SimStorage(w, proc), SimRefresher(w, proc)
            self.storages.append(storage)
            self.refreshers.append(refresher)
            self.managers.append(self._manager(storage, refresher))
        self._init_rest()

    def _manager(self, storage: SimStorage, refresher: SimRefresher) -> TokenManager:
        plan = self.plan
        extra: dict[str, Any] = {"redeem_in": "task"} if REDEEM_IN_TASK else {}
        return TokenManager(
            refresher=refresher,
            provider_id=PROVIDER_ID,
            storage=storage,
            clock=self.clock,
            leeway=plan.leeway,
            refresh_timeout=plan.refresh_timeout,
            lease_ttl=plan.lease_ttl,
            lease_wait=plan.lease_wait,
            cache_size=plan.ext.cache_size,
            retry_interval=plan.ext.retry_interval,
            **extra,
        )

    def _init_rest(self) -> None:
        plan = self.plan
        self.pending = 0
        self.all_done: anyio.Event | None = None
        self.own: dict[Any, Caller] = {}
        self.outcomes: dict[str, int] = {}
        self.hang_after = 20 * (plan.lease_wait or 2 * plan.lease_ttl) + 10 * plan.refresh_timeout + 120.0
        self.spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], None] = lambda fn: None
        self.api_calls: dict[str, tuple[Caller, str, float, list[tuple[str, str | None, int, str]]]] = {}
        self.forked: dict[int, anyio.Event] = {}
        self.call_started = 0.0
        self.settled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.final: Callable[[], float] = lambda: 0.0

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
        w = self.world
        if cp.after:
            await anyio.sleep(cp.after)
        if cp.process in self.forked:
            await self.forked[cp.process].wait()
        for i, gap in enumerate(cp.gaps):
            await anyio.sleep(gap)
            manager = self.managers[cp.process]
            if manager is None:
                return  # its fork never happened (the parent had crashed or closed)
            session = cp.walk[i] if cp.walk else cp.session
            first = len(w.provider.redemptions)
            if cp.via_auth:
                outcome = await self._call(
                    caller,
                    session,
                    lambda m=manager, s=session: self._request(caller, m, s, cp),  # type: ignore[misc]
                )
            else:
                outcome = await self._call(caller, session, lambda m=manager, s=session: m.aget_token(s))  # type: ignore[misc]
            self._check_storm(caller, session, first)
            caller.cancel_at = math.inf
            self._outcome(outcome)
            if outcome in ("cancelled", "timed-out", "hang"):
                return

    def _check_storm(self, caller: Caller, session: str, first: int) -> None:
        """One call may not make its process redeem the session's refresh token over and over."""
        w = self.world
        mine = [
            r
            for r in w.provider.redemptions[first:]
            if r.process == caller.process and r.session == session and r.kind in ("rotated", "renewed")
        ]
        # The bound: a wait takes at most two flights whose tokens were minted already expired (the second
        # may be the answer to the first's rotated-but-unusable one), and a request waits twice at most (its
        # token, then a replay's after a 401): four redemptions. Item 11's storm was eight per wait.
        if len(mine) > 4:
            w.violate(
                "refresh-storm",
                f"{caller.name} ({session}): one call made p{caller.process} redeem {len(mine)} times "
                f"({[r.rid for r in mine]})",
            )

    async def _call(self, caller: Caller, session: str, call: Callable[[], Coroutine[Any, Any, Any]]) -> str:
        """One ``aget_token`` (or request) under the caller's kind of cancellation; checks what it returns."""
        w = self.world
        started = w.now()
        kind = caller.kind
        delay = w.rng.choice((w.rng.uniform(0.0, 0.3), w.rng.uniform(0.0, 4.0), w.rng.uniform(0.0, 15.0)))
        caller.cancel_at = started + delay if kind != "plain" else math.inf
        w.log(f"{caller.name}: aget_token({session}) [{kind}{'' if kind == 'plain' else f' after {delay:.3f}'}]")
        self.call_started = started
        try:
            with anyio.move_on_after(self.hang_after) as hang:
                tokens = await self._wrapped(kind, delay, call)
            if hang.cancelled_caught:
                w.violate("hang", f"{caller.name}: aget_token did not return within {self.hang_after:.0f}s")
                return "hang"
        except UpstreamAuthError as exc:
            w.log(f"{caller.name}: -> {type(exc).__name__}: {exc}")
            if "ExceptionGroup" in str(exc):
                # The manager meant to raise something else, and an exception group hid its type.
                w.violate("error-type-lost", f"{caller.name}: {type(exc).__name__}: {exc}")
            if (
                isinstance(exc, RefreshFailed)
                and w.now() - started >= self.wait_timeout - EPSILON
                and not w.busy(caller.process, session, started, w.now())
            ):
                # A live job reads, waits for a lease, sends or renews at least every few seconds; this call
                # waited its whole wait_timeout for a refresh its process was not doing at all.
                w.violate(
                    "wedged-session",
                    f"{caller.name} ({session}) waited {w.now() - started:.2f}s for a refresh and failed, while no "
                    f"task of p{caller.process} worked on the session: it waited for a job that does not exist",
                )
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
        if isinstance(tokens, httpx.Response):
            return f"http-{tokens.status_code}"
        w.log(f"{caller.name}: -> {tokens.access_token} v{tokens.version}")
        w.check_use(caller, session, started, tokens)
        return "ok"

    # -- the auth flow against the simulated API -------------------------------------------------------
    def _client(self, pid: int) -> httpx.AsyncClient:
        client = self.clients.get(pid)
        if client is None:
            client = self.clients[pid] = httpx.AsyncClient(
                transport=httpx.MockTransport(self._api), follow_redirects=True
            )
        return client

    async def _request(self, caller: Caller, manager: TokenManager, session: str, cp: CallerPlan) -> httpx.Response:
        """One GET through ``httpx.AsyncClient(auth=manager.auth(session))``; judges the exchange after."""
        w = self.world
        self.requests += 1
        rid = f"q{self.requests}"
        roll = w.rng.random()
        path = "/redirect" if roll < cp.p_redirect else "/refuses" if roll < cp.p_redirect + cp.p_refuses else "/data"
        log: list[tuple[str, str | None, int, str]] = []
        self.api_calls[rid] = (caller, session, w.now(), log)
        w.log(f"{caller.name}: {rid} GET {path} as {session} through auth=")
        response = await self._client(cp.process).get(
            f"https://api.sim{path}", auth=manager.auth(session), headers={"x-sim-req": rid}
        )
        w.log(f"{caller.name}: {rid} -> HTTP {response.status_code}")
        self._judge(caller, rid, response, log)
        return response

    async def _api(self, request: httpx.Request) -> httpx.Response:
        """The upstream API: accepts the access tokens the provider issued, unless revoked there; a
        transient 401 now and then; ``/redirect`` sends the client to another origin (which answers 401
        to a request without a token: httpx strips it on the way)."""
        w = self.world
        rid = request.headers.get("x-sim-req", "?")
        caller, session, started, log = self.api_calls[rid]
        host, path = request.url.host, request.url.path
        auth = request.headers.get("authorization")
        token = auth.removeprefix("Bearer ") if auth else None
        if host == "api.sim" and token is not None:
            w.check_sent(caller, session, started, token, None)  # as it leaves the client
        await anyio.sleep(w.rng.uniform(0.0001, 0.02))
        challenge = {"www-authenticate": 'Bearer error="invalid_token"'}
        if host != "api.sim":
            status, why = (401, "no token") if token is None else (200, "ok")
            log.append((host, token, status, why))
            w.log(f"api: {rid} {host}{path} {'no token' if token is None else token} -> {status}")
            return httpx.Response(status, headers=challenge if status == 401 else {})
        replay = any(entry[0] == "api.sim" for entry in log)
        if path == "/redirect":
            log.append((host, token, 302, "redirect"))
            return httpx.Response(302, headers={"location": "https://other.sim/data"})
        gid = w.provider.access.get(token or "")
        if token is None or gid is None:
            status, why = 401, "unknown token"
        elif w.provider.grants[gid].revoked is not None:
            status, why = 401, "grant revoked"
        elif token in w.store.api_revoked:
            status, why = 401, "token revoked"
        elif path == "/refuses":
            status, why = 401, "refused (not the token)"
        elif w.rng.random() < w.knobs.p_api_401 * (2 if replay else 1):
            status, why = 401, "transient"
        else:
            status, why = 200, "ok"
        if token is not None:
            if status == 200:
                self.api_accepted[(caller.process, token)] = w.now()
                self.api_accepted_at.setdefault(token, []).append(w.now())
            elif replay:
                self.api_replay_refused[(caller.process, token)] = w.now()
        log.append((host, token, status, why))
        w.log(f"api: {rid} {path} {token}{' (replay)' if replay else ''} -> {status} {why}")
        return httpx.Response(status, headers=challenge if status == 401 else {})

    def _judge(
        self, caller: Caller, rid: str, response: httpx.Response, log: list[tuple[str, str | None, int, str]]
    ) -> None:
        w = self.world
        foreign = [i for i, entry in enumerate(log) if entry[0] != "api.sim" and entry[2] == 401]
        if foreign and any(entry[0] == "api.sim" for entry in log[foreign[0] + 1 :]):
            w.violate(
                "refresh-on-foreign-401",
                f"{caller.name} {rid}: a 401 from another origin (after a redirect, without our token) made the "
                f"flow refresh and replay: {log}",
            )
        sends = [entry for entry in log if entry[0] == "api.sim"]
        started = self.api_calls[rid][2]
        if len(sends) >= 2 and sends[0][1] and sends[1][1] and sends[1][1] != sends[0][1]:
            first, retry = sends[0][1], sends[1][1]
            refused = self.api_replay_refused.get((caller.process, first))
            minted = w.provider.access_redemption.get(retry)
            accepted_since = refused is not None and any(t > refused for t in self.api_accepted_at.get(first, ()))
            if (
                refused is not None
                and refused < started
                and not accepted_since
                and minted is not None
                and w.provider.redemptions[minted].at >= started
            ):
                w.violate(
                    "refresh-despite-distrust",
                    f"{caller.name} {rid}: {first} was refused on its replay at {refused:.3f} "
                    "(and not accepted since), "
                    f"yet its 401 made the flow redeem again ({retry}): a client the API refuses for another reason "
                    "would rotate its tokens on every request",
                )
        if response.status_code == 401 and len(sends) == 1 and sends[0][3] == "token revoked":
            token = sends[0][1] or ""
            refused = self.api_replay_refused.get((caller.process, token))
            accepted = self.api_accepted.get((caller.process, token))
            if refused is not None and accepted is not None and accepted > refused:
                w.violate(
                    "distrust-outlived-acceptance",
                    f"{caller.name} {rid}: {token} was refused for good and not refreshed: it is distrusted since a "
                    f"401 on its replay at {refused:.3f}, though the API accepted it at {accepted:.3f}",
                )

    def _interrupted(self, caller: Caller, outcome: str) -> str:
        w = self.world
        if w.now() < caller.cancel_at - EPSILON:
            w.violate("spurious-cancel", f"{caller.name}: {outcome} before its injected cancellation fired")
        w.log(f"{caller.name}: -> {outcome} by {caller.kind}")
        return outcome

    async def _wrapped(self, kind: str, delay: float, call: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``call()`` inside the cancellation of ``kind``; ``None`` when a scope swallowed it."""
        if kind == "plain":
            return await call()
        if kind == "task_cancel":
            task = asyncio.current_task()
            assert task is not None
            handle = asyncio.get_running_loop().call_later(delay, task.cancel)
            try:
                return await call()
            finally:
                handle.cancel()
        if kind == "wait_for":
            inner = asyncio.ensure_future(call())
            caller = self.world.caller()
            assert caller is not None
            self.world.task_callers[inner] = caller
            try:
                return await asyncio.wait_for(inner, delay)
            finally:
                self.world.task_callers.pop(inner, None)
        if kind == "asyncio_timeout":
            async with asyncio.timeout(delay):
                return await call()
        if kind == "anyio_scope_cancel":
            with anyio.CancelScope() as scope:
                handle = asyncio.get_running_loop().call_later(delay, scope.cancel)
                try:
                    return await call()
                finally:
                    handle.cancel()
            return None
        if kind == "anyio_move_on_after":
            with anyio.move_on_after(delay):
                return await call()
            return None
        if kind == "anyio_fail_after":
            with anyio.fail_after(delay):
                return await call()
        if kind == "trio_move_on_after":
            with trio.move_on_after(delay):
                return await call()
            return None
        if kind == "trio_fail_after":
            with trio.fail_after(delay):
                return await call()
        raise AssertionError(kind)

    # -- world events -------------------------------------------------------------------------------
    async def _login(self, caller: Caller, session: str, subject: str) -> None:
        w = self.world
        gid, tokens = w.provider.login(subject, self.plan.initial.get(session, (subject, 10.0))[1] + 20.0)
        w.log(f"{caller.name}: login {session} as {subject} (g{gid})")
        manager = self.managers[caller.process]
        if manager is None:
            return
        epoch = w.begin_session_change(session, gid, caller.process)
        token = APP_OP.set("login")
        try:
            await manager.astore(session, tokens)
        except UpstreamAuthError as exc:
            w.log(f"{caller.name}: login failed: {type(exc).__name__}")
            w.end_session_change(session, epoch, applied=False)
            return
        finally:
            with contextlib.suppress(ValueError):  # a pending task finalized after its loop closed
                APP_OP.reset(token)
        w.end_session_change(session, epoch)
        w.log(f"{caller.name}: login {session} done")

    async def _logout(self, caller: Caller, session: str) -> None:
        w = self.world
        manager = self.managers[caller.process]
        if manager is None:
            return
        w.log(f"{caller.name}: logout {session}")
        epoch = w.begin_session_change(session, None, caller.process)
        token = APP_OP.set("logout")
        try:
            await manager.adelete(session)
        except UpstreamAuthError as exc:
            w.log(f"{caller.name}: logout failed: {type(exc).__name__}")
            w.end_session_change(session, epoch, applied=False)
            return
        finally:
            with contextlib.suppress(ValueError):  # a pending task finalized after its loop closed
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
        elif ev.kind == "outage":
            await self._until_a_redemption_is_pending()
            start = w.now() + w.rng.uniform(0.0, 0.5) * self.plan.refresh_timeout
            w.outages.append((start, start + ev.amount))
            w.log(f"world: the store will be down from {start:.3f} to {start + ev.amount:.3f}")
        elif ev.kind == "stall":
            await self._until_a_redemption_is_pending()
            start = w.now() + w.rng.uniform(0.0, 0.5) * self.plan.lease_ttl
            w.stalls.append((start, start + ev.amount))
            w.log(f"world: the store will stall from {start:.3f} to {start + ev.amount:.3f}")
        elif ev.kind == "grant-revoke":
            entry = w.store.entries.get(EntryKey(PROVIDER_ID, ev.session))
            gid = None if entry is None else w.provider.rt_grant.get(entry.refresh_token or "")
            if gid is not None:
                w.provider.revoke(gid, "the user withdrew consent")
        elif ev.kind == "foreign-login":
            await self._foreign_login(caller, ev.session)
        elif ev.kind == "close":
            await self._close(ev)
        elif ev.kind == "churn":
            await self._churn(caller, ev.process, ev.session)
        elif ev.kind == "api-revoke":
            entry = w.store.entries.get(EntryKey(PROVIDER_ID, ev.session))
            if entry is not None:
                w.store.api_revoked.add(entry.access_token)
                w.log(f"world: the API revokes {entry.access_token} ({ev.session}); its refresh token stays valid")
        elif ev.kind == "jump":
            w.wall_offset += ev.amount
            w.log(f"world: wall clock jumps {ev.amount:+.0f}s")
        elif ev.kind == "crash":
            proc = w.processes[ev.process]
            if proc.crashed:
                return
            w.log(f"world: process p{proc.pid} CRASHES")
            self._kill(proc)

    def _kill(self, proc: Process) -> None:
        """The process ends at once: its tasks stop, and nothing it does reaches the world any more."""
        w = self.world
        proc.crashed_at = w.now()
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

    async def _close(self, ev: EventPlan) -> None:
        """The application shuts the process's manager down, once one of its refresh answers is in flight if
        that happens within 30 s: ``aclose()``, or the sync ``close()`` called on the loop's thread (it cannot
        wait for a task job of that loop), or ``aclose()`` and then the process exits (a shutdown hook)."""
        w, pid = self.world, ev.process
        mode = ev.mode or "aclose"
        for _ in range(120):
            if any(r.process == pid and r.fate == "pending" for r in w.provider.redemptions):
                break
            await anyio.sleep(0.25)
        proc, manager = w.processes[pid], self.managers[pid]
        if manager is None or proc.crashed or proc.closed_at is not None:
            return
        running = [r for r in w.provider.redemptions if r.process == pid and r.fate == "pending"]
        w.log(f"world: the app closes p{pid}'s manager ({mode}); answers in flight: {[r.rid for r in running]}")
        proc.closed_at = w.now()
        if running:
            w.count("close-with-answer-in-flight")
        try:
            if mode == "close":
                manager.close()
            else:
                await manager.aclose()
        except Exception as exc:
            w.violate("untyped-error", f"p{pid}: {mode} raised {type(exc).__name__}: {exc}")
        w.log(f"world: p{pid}'s manager closed")
        if mode != "aclose+exit" or proc.crashed:
            return
        # aclose() waits (up to 2 x refresh_timeout) for jobs that may have sent a request: once it returns
        # earlier, the process may end without losing anything.
        proc.exited = True
        proc.close_timed_out = w.now() >= proc.closed_at + 2 * self.plan.refresh_timeout - EPSILON
        w.log(f"world: process p{pid} EXITS after its close{' (which timed out)' if proc.close_timed_out else ''}")
        self._kill(proc)
        session = running[0].session if running and running[0].session else ev.session
        for other, delay in ev.then:
            if not w.processes[other].crashed and self.managers[other] is not None:
                follower = Caller(f"f{len(w.processes[other].callers)}/p{other}", other, "plain")
                plan = CallerPlan(other, session, "plain", [delay])
                self._start(follower, lambda c=follower, cp=plan: self._caller(c, cp))  # type: ignore[misc]

    async def _foreign_login(self, caller: Caller, session: str) -> None:
        """The application hands this manager a login it got from another provider (a multi-provider app
        wiring the wrong manager): the manager must refuse it (``BindingMismatch``), storing nothing."""
        w = self.world
        manager = self.managers[caller.process]
        if manager is None:
            return
        wall = w.store.wall()
        n = len(w.trace)
        tokens = UpstreamTokens(
            access_token=f"xat{n}",
            refresh_token=f"xrt{n}",
            expires_at=wall + 600.0,
            issued_at=wall,
            provider_id="other",
            user_id="mallory",
            upstream_subject="mallory",
            client_id="other-client",
        )
        w.log(f"{caller.name}: stores a login of provider 'other' for {session} through p{caller.process}'s manager")
        try:
            await manager.astore(session, tokens)
        except UpstreamAuthError as exc:
            w.log(f"{caller.name}: -> {type(exc).__name__}")
            return
        w.violate("foreign-entry-stored", f"p{caller.process} stored another provider's tokens under {session}")

    async def _churn(self, caller: Caller, pid: int, session: str) -> None:
        """A manager made for a while on the process's storage, then dropped without close (item 12)."""
        w = self.world
        storage, refresher = self.storages[pid], self.refreshers[pid]
        if storage is None or refresher is None or w.processes[pid].crashed or storage.closed:
            return
        own = SimRefresher(w, w.processes[pid])  # the same provider client, as far as the world can tell
        own.worker = f"p{pid}-m{len(self.dropped) + 1}"
        manager = self._manager(storage, own)
        self.dropped.append(weakref.ref(manager))
        self.in_use[pid] += 1
        w.log(f"{caller.name}: a short-lived manager on p{pid} reads {session}")
        started = w.now()
        try:
            tokens = await manager.aget_token(session)
        except UpstreamAuthError as exc:
            w.log(f"{caller.name}: -> {type(exc).__name__}")
        else:
            w.check_use(caller, session, started, tokens, sibling=True)
        finally:
            self.in_use[pid] -= 1
        del manager  # dropped without close()

    async def _fork(self, child: int, at: float, parent: int, during: bool) -> None:
        """fork() of process ``parent`` at ``at`` (``during``: once a refresh answer of its is in flight)."""
        w = self.world
        try:
            await anyio.sleep(at)
            if during:
                for _ in range(120):
                    if any(r.process == parent and r.fate == "pending" for r in w.provider.redemptions):
                        break
                    await anyio.sleep(0.25)
            proc, manager = w.processes[parent], self.managers[parent]
            storage = self.storages[parent]
            if manager is None or storage is None or proc.crashed or proc.closed_at is not None:
                w.log(f"world: p{parent} cannot fork p{child} (gone)")
                return
            kid = w.processes[child]
            copy_storage = SimStorage(w, kid)
            copy_storage.origin, copy_storage.listens = storage.origin, False
            refresher = SimRefresher(w, kid)
            self.storages[child], self.refreshers[child] = copy_storage, refresher
            self.managers[child] = fork_manager(manager, copy_storage, refresher)
            running = [r.rid for r in w.provider.redemptions if r.process == parent and r.fate == "pending"]
            if running:
                w.count("fork-during-job")
            w.log(f"world: p{parent} FORKS p{child} (its answers in flight: {running})")
        finally:
            self.forked[child].set()

    # -- the schedule -----------------------------------------------------------------------------------
    async def main(self) -> None:
        """Initial logins, then every caller and event, then settle and check what is left behind."""
        w, plan = self.world, self.plan
        self.all_done = anyio.Event()
        app = Caller("app", 0, "plain")
        self._register(app)
        # Every session p0 knew before its crowd walk can have its change-notice digest pushed out.
        w.crowd_early = {"e0", *plan.sessions} if plan.ext.crowd else set()
        for session, subject, life, ago in plan.ext.crowd:
            gid, tokens = w.provider.login(subject, life, ago)
            epoch = w.begin_session_change(session, gid)
            w.store.seed_entry(
                EntryKey(PROVIDER_ID, session),
                attrs.evolve(tokens, provider_id=PROVIDER_ID, version=int(self.clock.time() * 1_000_000)),
            )
            w.end_session_change(session, epoch)
        for child in plan.ext.forks:
            self.forked[child] = anyio.Event()
        for session, (subject, life) in plan.initial.items():
            for _ in range(10):
                gid, tokens = w.provider.login(subject, life)
                epoch = w.begin_session_change(session, gid)
                token = APP_OP.set("login")
                try:
                    # The first process exists from the start (a local would keep its manager alive).
                    await cast(TokenManager, self.managers[0]).astore(session, tokens)
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
            pid = ev.process if ev.kind in ("logout", "login", "relogin", "churn", "foreign-login") else -1
            caller = Caller(f"e{i}/{ev.kind}", max(pid, 0), "plain")
            if pid < 0:
                self.pending += 1
                self.spawn(lambda caller=caller, ev=ev: self._world_event(caller, ev))  # type: ignore[misc]
            else:
                self._start(caller, lambda caller=caller, ev=ev: self._event(caller, ev))  # type: ignore[misc]
        for child, (at, parent, during) in plan.ext.forks.items():
            self.pending += 1
            self.spawn(
                lambda child=child, at=at, parent=parent, during=during: self._fork_task(  # type: ignore[misc]
                    child, at, parent, during
                )
            )
        if plan.ext.loop_end is not None:
            # The application closes its event loop at some moment, with no regard for the manager's jobs.
            with anyio.move_on_after(plan.ext.loop_end):
                await self.all_done.wait()
            for _ in range(80):
                if any(r.fate == "pending" for r in w.provider.redemptions):
                    break
                await anyio.sleep(0.25)
            running = [r.rid for r in w.provider.redemptions if r.fate == "pending"]
            w.log(f"world: the application closes its event loop (answers in flight: {running})")
            w.tearing_down = True
            end = w.now()
            self.final = lambda: end
            return
        if self.pending:
            with anyio.move_on_after(self.hang_after * 4):
                await self.all_done.wait()
        stuck = [c.name for p in w.processes for c in p.callers if not c.done]
        if stuck:
            w.violate("hang", f"callers never finished: {stuck}")
        await self._settle()
        w.tearing_down = True
        end = w.now()
        self.final = lambda: end

    async def _fork_task(self, child: int, at: float, parent: int, during: bool) -> None:
        try:
            await self._fork(child, at, parent, during)
        finally:
            self.pending -= 1
            if self.pending == 0 and self.all_done is not None:
                self.all_done.set()

    async def _world_event(self, caller: Caller, ev: EventPlan) -> None:
        self._register(caller)
        try:
            await self._event(caller, ev)
        finally:
            self._finish(caller)

    async def _until_a_redemption_is_pending(self) -> None:
        """Wait (at most 30 s of virtual time) until a refresh answer is in flight: a store fault then meets it."""
        for _ in range(120):
            if any(r.fate == "pending" for r in self.world.provider.redemptions):
                return
            await anyio.sleep(0.25)

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
        self.settled = not left
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

    # -- after the run -----------------------------------------------------------------------------------
    def after(self) -> None:
        """Checks of what the run left behind: fail-closed attempts, tables within bounds, no leaks."""
        w = self.world
        w.set_now(self.final)  # the runtime has ended: its clock cannot be read any more
        try:
            for red in w.provider.redemptions:
                self._check_fail_closed(red)
            for pid, manager in enumerate(self.managers):
                if manager is not None and not w.processes[pid].crashed:
                    check_manager_tables(w, pid, manager, self.settled)
            if self.loop is not None:
                leaked = task_jobs_of(self.loop)
                if leaked:
                    w.violate(
                        "task-job-leak",
                        f"{leaked} refresh job task(s) of an event loop that was closed stay referenced for good",
                    )
                self.held = []
                self._finalize_pending()
            if self.dropped and self.loop is None:  # a closed loop's pending tasks (ours too) hold their frames
                gc.collect()
                leaked = sum(ref() is not None for ref in self.dropped)
                if leaked:
                    w.violate(
                        "manager-leak", f"{leaked} of {len(self.dropped)} managers dropped without close() live on"
                    )
            for pid, storage in enumerate(self.storages):
                if storage is None or w.processes[pid].crashed:
                    continue  # a dead process's frozen jobs hold their managers: nothing runs there any more
                if storage.closed:
                    continue  # a closed storage object calls nobody any more
                manager = self.managers[pid]
                # The process's manager, and short-lived ones the application still holds (their call was cut
                # short when the event loop closed: its frame keeps them).
                live = int(manager is not None and w.processes[pid].closed_at is None) + self.in_use[pid]
                # A dropped manager's subscription removes itself at the next change notice (the library's
                # rule; docs/design.md): send one, then count what is left.
                storage.notify_change(None)
                held = storage_subscribers(storage)
                if held > live:
                    w.violate(
                        "subscriber-leak",
                        f"p{pid}'s storage still calls {held} subscribers for {live} live manager(s): managers dropped "
                        "without close() stay referenced (and keep their tables)",
                    )
        finally:
            if w.store.real is not None:
                w.store.real.close()
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(OSError):
                        os.unlink(f"{self.real_path}{suffix}")

    def _finalize_pending(self) -> None:
        """Collect the coroutines the closed loop left pending, now, with their finalizers' errors counted
        (a ``ContextVar.reset`` in a ``finally`` fails outside the task's context), not printed later in
        another schedule (or turned into a test failure by pytest's unraisable-exception check)."""
        w = self.world
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            w.count(f"finalizer-error:{type(unraisable.exc_value).__name__}")

        sys.unraisablehook = hook
        try:
            gc.collect()
        finally:
            sys.unraisablehook = previous

    def _check_fail_closed(self, red: Redemption) -> None:
        """A rotated answer that reached a live process was saved, lost its compare-and-set to someone else's
        write, or the entry it came from was (attempted to be) removed on an open store."""
        w = self.world
        if red.kind != "rotated" or w.processes[red.process].crashed or red.fate in ("pending", "lost-crash"):
            return
        if "applied" in red.saves or "cas-lost" in red.saves or red.delete_attempts or red.rt in w.store.replaced:
            return  # saved, or someone else's write replaced the entry, or the fail-closed delete was tried
        closed = w.processes[red.process].closed_at is not None
        w.violate(
            "item4:no-fail-closed-attempt"
            if closed
            else "gateway-answer-after-redeem:no-fail-closed-attempt"
            if red.fate.startswith("gateway-")
            else "no-fail-closed-attempt",
            f"r{red.rid} of p{red.process} ({red.rt} of {red.session} v{red.version}, fate {red.fate}): the rotated "
            f"tokens were not saved and no fail-closed delete reached an open store (saves {red.saves}, "
            f"deletes {red.deletes})",
        )

    # -- runtimes ---------------------------------------------------------------------------------------
    def run(self) -> None:
        """Run the schedule on its runtime."""
        if self.plan.backend == "trio":
            self.world.set_now(trio.current_time)
            run_trio(self._trio_main, self.plan.seed)
        elif self.plan.ext.loop_end is not None:
            self.loop = run_asyncio_then_close(self._asyncio_main, self._asyncio_error)
            if self.plan.ext.restart:
                self._restart(self.loop)
        else:
            run_asyncio(self._asyncio_main, self._asyncio_error)

    def _restart(self, closed: asyncio.AbstractEventLoop) -> None:
        """The application runs a new event loop with the same managers (a second ``asyncio.run``, a worker
        that restarts its loop). What the closed loop left pending never runs again: its operations end now,
        its leases can only expire, and its tasks are either still referenced by the application (collected
        later) or collected before the new loop starts (their clean-up code runs then)."""
        w = self.world
        end = self.final()
        w.set_now(lambda: end)
        for spans in w.activity.values():
            for span in spans:
                span[1] = min(span[1], end)
        w.store.orphans.extend(owner for owner, _, _ in w.store.leases.values())
        w.loop_closed_at = end
        pending = [t for t in asyncio.all_tasks(closed) if not t.done()]
        if self.plan.ext.hold_dead:
            self.held = pending
        else:
            task_jobs_of(closed)  # the library forgets the closed loop's jobs (it does at its next job)
            del pending
            self._finalize_pending()
        w.log(f"world: the application starts a new event loop at {end:.3f}")
        w.tearing_down = False
        run_asyncio(self._restart_main, self._asyncio_error, start=end)

    async def _restart_main(self) -> None:
        loop = asyncio.get_running_loop()
        w, plan = self.world, self.plan
        w.set_now(loop.time)
        tasks: list[asyncio.Task[None]] = []
        self.spawn = lambda fn: tasks.append(loop.create_task(fn()))
        self.all_done = anyio.Event()
        self.pending = 0
        callers = []
        for i, cp in enumerate(plan.ext.restart):
            proc = w.processes[cp.process]
            if self.managers[cp.process] is None or proc.crashed or proc.closed_at is not None:
                continue
            caller = Caller(f"n{i}/p{cp.process}", cp.process, cp.kind)
            callers.append(caller)
            self._start(caller, lambda caller=caller, cp=cp: self._caller(caller, cp))  # type: ignore[misc]
        if self.pending:
            with anyio.move_on_after(self.hang_after * 4):
                await self.all_done.wait()
        stuck = [c.name for c in callers if not c.done]
        if stuck:
            w.violate("hang", f"callers never finished: {stuck}")
        await self._settle()
        w.tearing_down = True
        end = w.now()
        self.final = lambda: end
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                w.violate("sim-task-error", f"{type(exc).__name__}: {exc}")

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
    # A crash excuses a reuse only if it cut the job short: one that had already given its lease back had
    # finished with the answer (saved, failed closed, or kept the entry) before the process died.
    finished = world.store.release_tried_at.get(first.lease_owner, math.inf) if first.lease_owner else math.inf
    cut_short = sender.crashed_at is not None and first.at <= sender.crashed_at <= second.at
    if cut_short and sender.crashed_at is not None and sender.crashed_at < finished and not saved:
        if sender.exited and not sender.close_timed_out:
            # aclose() returned before its timeout, so the application took the manager for done and the
            # process exited: a job that may have sent its request was still running.
            return "item4:exit-after-close-under-job"
        return "excused:exit-after-close-timed-out" if sender.exited else "excused:crash-after-send"
    closed_at = world.loop_closed_at
    if closed_at is not None and first.fate == "pending" and first.at <= closed_at < second.at:
        if second.worker == first.worker:
            # The same manager presented again the token its job had sent before the loop closed under it.
            return "presented-again-after-its-loop-closed"
        # Task jobs end with their event loop (the documented trade-off of redeem_in="task"), and nothing
        # tells another process that this one had sent the token.
        return "excused:loop-closed-after-send"
    fate = second.first_fate_then
    if (
        sender.closed_at is not None
        and not saved
        and (fate == "lost-closed" or "closed" in first.saves or "closed" in first.deletes)
    ):
        # The job met a closed store or client. (A job that outlived close() but failed for an outage of
        # the store is judged as any other job below.)
        return "item4:closed-under-job"
    deletes = second.first_deletes_then
    lost = fate in ("may-have-rotated", "binding-mismatch", "lost-cancel:internal") or fate.startswith("gateway-")
    if lost and deletes and all(d.startswith("error") for d in deletes) and second.worker != first.worker:
        # A lost or unusable answer, and the store refused every fail-closed delete (an outage longer than
        # refresh_timeout): the same limit as a refused save below.
        return "excused:store-down-after-rotation"
    if fate.startswith("gateway-"):
        return f"gateway-answer-after-redeem:{fate}"
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
        # The store refused the save, and the job went on to the fail-closed delete: the outage outlived the
        # job's lease (its renewals failed too), so another worker could read the entry before the delete
        # landed, if it landed at all. The limit any design without a marker written before sending has.
        if second.worker != first.worker and (first.deletes or "applied" not in second.first_deletes_then):
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
        run.after()
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
