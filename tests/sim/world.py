"""The simulated world: one provider, one shared store, a clock, and the processes that share them.

Everything here runs inside one event loop on virtual time. All nondeterminism comes from
``World.rng`` (one ``random.Random(seed)``): every simulated I/O draws its delays and faults from it in
the order the scheduler reaches it, so a seed replays the same interleaving exactly.

Each simulated process has its own :class:`SimStorage` and :class:`SimRefresher` (proxies on the shared
:class:`SharedStore` and :class:`Provider`). A crashed process's proxies freeze: nothing it does after
the crash reaches the store or the provider, and the leases it held only expire.

Every remote operation has three phases: a *pre* delay (cancelling it means nothing happened), the
*apply* step (atomic, at the server), and a *post* delay (the reply travelling back: cancelling it loses
the reply, the effect stays). The provider redeems a refresh token in its apply step, so a caller that
gives up while the answer travels back loses the rotated tokens: the bug class this simulation hunts.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import attrs
import httpx
import trio

from httpx_upstream_auth import (
    BindingMismatch,
    Clock,
    EntryKey,
    OAuth2Refresher,
    ReauthenticationRequired,
    Refresher,
    RefreshFailed,
    Storage,
    StorageError,
    UpstreamTokens,
)
from httpx_upstream_auth._storages import Lease

__all__ = [
    "APP_OP",
    "NATIVE_KINDS",
    "Caller",
    "Grant",
    "Process",
    "Provider",
    "Redemption",
    "SharedStore",
    "SimClock",
    "SimRefresher",
    "SimStorage",
    "Violation",
    "World",
]

#: Wall-clock epoch of virtual time 0 (wall time = this + virtual time + clock jumps).
WALL_EPOCH = 1_800_000_000.0
#: Monotonic reading at virtual time 0.
MONOTONIC_EPOCH = 1_000.0
#: How long a crashed process's operations stay frozen (virtual seconds): past the end of any schedule.
FREEZE = 1e7
#: Cancellation kinds that are asyncio's own (not anyio/trio scopes): the shield must not let them lose tokens.
NATIVE_KINDS = frozenset({"task_cancel", "wait_for", "asyncio_timeout"})

#: Set by the simulated application around a login (``astore``) or logout (``adelete``) it performs.
APP_OP: contextvars.ContextVar[str | None] = contextvars.ContextVar("APP_OP", default=None)
#: The lease a refresh job took last, set in the job's own context when it takes it: the tasks the job starts
#: for its bounded calls (the token request, its writes) copy that context, so they are known as the job's.
JOB: contextvars.ContextVar[str] = contextvars.ContextVar("JOB", default="")


@dataclass
class Violation:
    """One broken invariant: ``kind`` names it, ``detail`` says what happened."""

    kind: str
    detail: str
    at: float
    #: For a reuse: the redemption that presented the consumed token.
    rid: int | None = None
    #: What caused it, filled in when the schedule ends (see ``runner.classify``).
    category: str = ""


@dataclass
class Grant:
    """One login at the provider: a subject and its current refresh token."""

    gid: int
    subject: str
    rotates: bool
    current_rt: str
    generation: int = 0
    revoked: str | None = None


@dataclass
class Redemption:
    """One refresh request that reached the provider, and what became of its answer."""

    rid: int
    rt: str
    gid: int | None
    process: int
    at: float
    kind: str  # rotated | renewed | reuse | dead
    new_at: str | None = None
    successor: str | None = None
    #: pending | delivered | binding-mismatch | may-have-rotated | lost-cancel:<cause> | lost-crash
    fate: str = "pending"
    saves: list[str] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    #: For a reuse: the consumed token's first redemption and its fate at the moment of the reuse.
    first: int | None = None
    first_fate_then: str = ""
    #: For a reuse: whether the first redemption's rotated tokens were saved by then.
    first_saved_then: bool = False
    #: For a reuse: how long ago the first redemption was sent.
    first_age_then: float = 0.0
    #: For a reuse: what became of the first redemption's fail-closed deletes by then.
    first_deletes_then: list[str] = field(default_factory=list)
    #: The manager that redeemed it (``p<pid>``, or a second manager of that process).
    worker: str = ""
    #: The session and the entry version the refresh token was redeemed from.
    session: str = ""
    version: int = -1
    #: Fail-closed deletes of that entry (expected_version == version) that reached an open store.
    delete_attempts: int = 0
    #: When the answer reached the job (delivered), and how many times the job tried to save it.
    answered_at: float = float("inf")
    put_attempts: int = 0
    #: The job learned that its rotated tokens are in the store (its put returned True, or it read them back).
    saved_known: bool = False
    #: The lease the job held when the token left (its release marks the end of the job).
    lease_owner: str = ""


@dataclass
class Caller:
    """One simulated caller task (or an application task doing a login/logout)."""

    name: str
    process: int
    kind: str = "plain"
    #: Virtual time at which the injected cancellation of the current call fires (``inf``: none).
    cancel_at: float = float("inf")
    crashed: bool = False
    done: bool = False


@dataclass
class Process:
    """One simulated process: a TokenManager with its own storage and provider proxies."""

    pid: int
    crashed_at: float | None = None
    #: When the application closed the process's manager (``aclose``), if it did.
    closed_at: float | None = None
    #: The process exited right after its close()/aclose() returned (its jobs, if any were left, die with it);
    #: ``close_timed_out``: the close had waited its whole timeout for them.
    exited: bool = False
    close_timed_out: bool = False
    #: For a forked child: its parent's pid and the fork time.
    parent: int | None = None
    callers: list[Caller] = field(default_factory=list)
    #: Native handles of the process's running tasks, cancelled when it crashes.
    cancellers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def crashed(self) -> bool:
        """True once the process has crashed."""
        return self.crashed_at is not None


@dataclass
class Epoch:
    """A stretch of time during which ``gid`` (``None``: logged out) may be the session's grant."""

    gid: int | None
    start: float
    end: float = float("inf")
    #: When the operation that began it returned (``inf`` while it runs).
    done: float = float("inf")
    #: The process that made the change.
    pid: int = 0
    #: Later changes that completed (each ends this state): (the process that made it, when it completed).
    enders: list[tuple[int, float]] = field(default_factory=list)

    def end_for(self, server: int | None, notices: bool) -> float:
        """When this state stops being acceptable for what process ``server``'s manager serves (``None``: another
        manager, which makes no changes): once a later change completed, or, on a store that reports no
        changes, once a later change by that manager itself did (it hears nothing of the others' changes)."""
        if notices:
            return self.end
        return min((t for pid, t in self.enders if pid == server), default=float("inf"))


@dataclass
class Knobs:
    """Fault and latency settings of one schedule."""

    storage: str = "redis"  # memory | sqlite | redis
    store_delay: float = 0.01
    store_error: float = 0.0
    connect: float = 0.01
    latency: float = 0.2
    slow: float = 0.0
    slow_latency: float = 5.0
    p_neterr: float = 0.0
    p_503: float = 0.0
    p_mismatch: float = 0.0
    p_lost: float = 0.0
    p_rotate: float = 1.0
    life: tuple[float, float] = (10.0, 60.0)
    #: Store outages: (start, end) in virtual seconds; every operation fails before applying meanwhile.
    outages: tuple[tuple[float, float], ...] = ()
    #: Store stalls: (start, end) windows during which each delay of an operation is ``stall_delay`` x U(0.5, 1.5).
    stalls: tuple[tuple[float, float], ...] = ()
    #: False for a store that reports no changes (a third-party backend that never calls ``notify_change``):
    #: no manager hears of any write, its own included.
    notices: bool = True
    #: Provider outages: (start, end) windows during which every token request is answered 503 (not redeemed).
    provider_outages: tuple[tuple[float, float], ...] = ()
    #: (after, duration): the first read a job makes under its lease from ``after`` on hangs ``duration``, then
    #: fails before applying (a connection black-holed until the client's socket timeout).
    read_hang: tuple[float, float] | None = None
    #: Which call ``read_hang`` makes hang: a job's read under its lease ("get") or its lease release.
    hang_op: str = "get"
    stall_delay: float = 0.0
    #: The longest a job may legitimately hold a lease (seconds; 0: not checked), see ``SharedStore.renew``.
    lease_hold_bound: float = 0.0
    #: A gateway answer (502/504/HTML) after the provider redeemed (read by the real answer parser).
    p_gateway: float = 0.0
    #: An answer with "expires_in": 0 (a token born expired).
    p_zero_life: float = 0.0
    #: An answer without "expires_in" (expires_at unknown).
    p_no_life: float = 0.0
    #: Partial rotation: each redemption rotates with this chance (0: per grant, as ``p_rotate`` says).
    p_partial_rotation: float = 0.0
    #: The API's transient 401 (a valid token refused once).
    p_api_401: float = 0.0
    #: A deliberate defect of the simulated store, to show the checks catch what it breaks:
    #: ``cas-ignores-version`` (every put succeeds) or ``lease-always-free`` (every acquire succeeds).
    mutant: str = ""


class World:
    """Shared state of one schedule: rng, trace, provider, store, processes, and the invariant checks."""

    def __init__(self, seed: int, knobs: Knobs, now: Callable[[], float] | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.knobs = knobs
        self._now = now or (lambda: 0.0)
        self.wall_offset = 0.0
        self.trace: list[tuple[float, str]] = []
        self.violations: list[Violation] = []
        self.provider = Provider(self)
        self.store = SharedStore(self)
        self.processes: list[Process] = []
        self.task_callers: dict[Any, Caller] = {}
        self.current_task: Callable[[], Any] = lambda: None
        self.epochs: dict[str, list[Epoch]] = {}
        self.frozen: dict[Any, int] = {}
        self.tearing_down = False
        self.stats: dict[str, int] = {}
        #: Store outages: the planned ones, and those that world events start while the schedule runs.
        self.outages: list[tuple[float, float]] = list(knobs.outages)
        #: Store stalls: the planned ones, and those that world events start while the schedule runs.
        self.stalls: list[tuple[float, float]] = list(knobs.stalls)
        #: The managers' lease_ttl and cache_size (for the checks of the lease keeper and of refused tokens).
        self.lease_ttl = float("inf")
        self.cache_size = 10_000
        #: Work of the managers' own tasks (jobs, lease keepers) per (pid, session): [start, end] of each store
        #: operation and token request (``end`` is ``inf`` while it runs). A caller waiting for a refresh
        #: while its process does none of this is waiting for a job that does not exist.
        self.activity: dict[tuple[int, str], list[list[float]]] = {}
        #: Early sessions of a crowd beyond cache_size (violations on them are named item 1).
        self.crowd_early: set[str] = set()
        #: The managers' refresh_timeout (used to name the cause of a concurrent redemption).
        self.refresh_timeout = float("inf")
        #: When the application closed its event loop with work pending, if it went on with a new one.
        self.loop_closed_at: float | None = None

    # -- time and trace ----------------------------------------------------------------------------
    def now(self) -> float:
        """Virtual seconds since the schedule began."""
        return self._now()

    def set_now(self, now: Callable[[], float]) -> None:
        """Read virtual time from the running event loop's clock."""
        self._now = now

    def log(self, message: str) -> None:
        """Append one line to the trace."""
        self.trace.append((self.now(), message))

    def violate(self, kind: str, detail: str, rid: int | None = None) -> None:
        """Record a broken invariant (and trace it)."""
        self.violations.append(Violation(kind, detail, self.now(), rid))
        self.log(f"!! VIOLATION {kind}: {detail}")

    def count(self, name: str) -> None:
        """Bump a statistics counter."""
        self.stats[name] = self.stats.get(name, 0) + 1

    def format_trace(self) -> str:
        """The trace as text, one event a line."""
        return "\n".join(f"{t:10.4f}  {line}" for t, line in self.trace)

    # -- who is running --------------------------------------------------------------------------------
    def caller(self) -> Caller | None:
        """The simulated caller whose task is running, if any (a manager's own job task is none)."""
        return self.task_callers.get(self.current_task())

    def cancel_cause(self) -> str:
        """Why the running task is being cancelled: the caller's injected kind, ``crash`` or ``internal``."""
        caller = self.caller()
        if caller is None:
            return "internal"
        if caller.crashed:
            return "crash"
        if abs(self.now() - caller.cancel_at) <= 1e-6:
            return caller.kind
        # Later than the injection fired: the caller's cancellation was held off (a shield) and this one
        # comes from the manager's own deadline.
        return "internal"

    @contextlib.contextmanager
    def working(self, pid: int, session: str) -> Iterator[None]:
        """Record a store operation or token request of a manager's own task (not a caller's) as work in
        progress on ``session`` in process ``pid`` (see ``activity``)."""
        if not session or self.caller() is not None:
            yield
            return
        span = [self.now(), float("inf")]
        self.activity.setdefault((pid, session), []).append(span)
        try:
            yield
        finally:
            span[1] = self.now()

    def busy(self, pid: int, session: str, start: float, end: float) -> bool:
        """True when a manager's own task of process ``pid`` worked on ``session`` at some moment of [start, end]."""
        return any(a <= end and b >= start for a, b in self.activity.get((pid, session), ()))

    def where(self) -> str:
        """A short name of the running task for the trace."""
        caller = self.caller()
        return caller.name if caller is not None else "job"

    async def freeze(self, process: Process) -> None:
        """Block forever (virtually): the process is dead, nothing it does may reach the world."""
        task = self.current_task()
        self.frozen[task] = self.frozen.get(task, 0) + 1
        try:
            await anyio.sleep(FREEZE)
        finally:
            self.frozen[task] -= 1
            if not self.frozen[task]:
                del self.frozen[task]
        raise StorageError(f"process p{process.pid} is dead")

    # -- sessions as the application sees them ----------------------------------------------------------
    def begin_session_change(self, session: str, gid: int | None, pid: int = 0) -> Epoch:
        """A login (``gid``) or logout (``None``) by process ``pid`` starts: from now on its state may be seen."""
        epoch = Epoch(gid, self.now(), pid=pid)
        self.epochs.setdefault(session, []).append(epoch)
        return epoch

    def end_session_change(self, session: str, epoch: Epoch, applied: bool = True) -> None:
        """The login/logout returned (``applied``) or failed (its effect unknown: it stays possible).

        A state stops being acceptable once an operation that started after it completed has completed
        (linearizability: operations that overlap may take effect in either order, so both stay possible).
        """
        epoch.done = self.now()
        if not applied:
            return
        for other in self.epochs[session]:
            if other is not epoch and other.done < epoch.start:
                other.enders.append((epoch.pid, self.now()))
                if other.end == float("inf"):
                    other.end = self.now()

    def use_category(self, server: int, changers: list[int], session: str, kind: str, gid: int | None = None) -> str:
        """Name what led to serving an older generation: a forked process on either side (items 2 and 3),
        an early session of a crowd beyond cache_size (item 1), or nothing the extensions model.
        ``changers`` are the processes whose changes the server should have heard (with ``gid``, also those
        of every change of the session since the served grant was last set)."""
        if gid is not None:
            epochs = self.epochs.get(session, [])
            last = max((i for i, e in enumerate(epochs) if e.gid == gid), default=-1)
            changers = [*changers, *(e.pid for e in epochs[last + 1 :])]
        if self.processes[server].closed_at is not None:
            # The application kept using a manager it had closed: its cache no longer hears change notices.
            return f"used-after-close:{kind}"
        if any(self.processes[p].parent is not None for p in (server, *changers)):
            return f"item2:fork:{kind}"
        if session in self.crowd_early and server == 0:  # the crowd walker runs in p0
            return f"item1:crowd:{kind}"
        return kind

    def check_use(
        self, caller: Caller, session: str, started: float, tokens: UpstreamTokens, sibling: bool = False
    ) -> None:
        """The caller sends ``tokens`` to the API now: they must be the session's grant at some moment of
        the call, name its subject, and be a token the provider issued (``sibling``: they come from a second
        manager of the process, which makes no logins or logouts of its own)."""
        self.check_sent(caller, session, started, tokens.access_token, tokens.upstream_subject, sibling)

    def check_sent(
        self,
        caller: Caller,
        session: str,
        started: float,
        access_token: str,
        subject: str | None,
        sibling: bool = False,
    ) -> None:
        """An access token for ``session`` reaches the API now (``subject``: the label it came with)."""
        minted = self.provider.access.get(access_token)
        if minted is None:
            self.violate("unknown-token", f"{caller.name} got an access token the provider never issued")
            return
        gid = minted
        grant = self.provider.grants[gid]
        if subject is not None and subject != grant.subject:
            self.violate(
                "wrong-identity-served",
                f"{caller.name} got a token of grant g{gid} ({grant.subject}) labelled {subject}",
            )
        ended = self.now()
        server: int | None = None if sibling else caller.process
        notices = self.knobs.notices
        ok = [e for e in self.epochs.get(session, []) if e.start <= ended and e.end_for(server, notices) >= started]
        if any(e.gid == gid for e in ok):
            if not any(e.gid == gid and e.end_for(server, notices) >= ended - 1e-9 for e in ok):
                # Its grant was the session's at some moment of the call, but a logout or login that began
                # after it had completed (and its change notice was delivered: notices are synchronous in
                # the simulation) before the call returned: the caller got an older login generation.
                later = [e for e in ok if e.gid != gid and e.done <= ended and (notices or e.pid == server)]
                self.violate(
                    self.use_category(caller.process, [e.pid for e in later], session, "stale-generation-served", gid),
                    f"{caller.name} ({session}) got g{gid} ({grant.subject}) at {ended:.4f}, after "
                    f"{['-' if e.gid is None else f'g{e.gid}' for e in later]} (set by "
                    f"{sorted({f'p{e.pid}' for e in later})}) had completed",
                )
                return
            self.count("uses-ok")
            return
        current = [e.gid for e in ok]
        subjects = {self.provider.grants[g].subject for g in current if g is not None}
        if subjects and grant.subject not in subjects:
            kind = "wrong-identity-served"
        elif None in current:
            kind = "deleted-session-served"
        else:
            kind = "replaced-session-served"
        changers = sorted({f"p{e.pid}" for e in ok if e.gid != gid})
        self.violate(
            self.use_category(caller.process, [e.pid for e in ok if e.gid != gid], session, kind, gid),
            f"{caller.name} ({session}) was served grant g{gid} ({grant.subject}) during [{started:.4f}, "
            f"{ended:.4f}] while the session's grant was {['-' if g is None else f'g{g}' for g in current]} "
            f"(set by {', '.join(changers)})",
        )


class Provider:
    """The simulated authorization server: grants, rotation, and reuse detection (reuse revokes)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.grants: dict[int, Grant] = {}
        self.rt_grant: dict[str, int] = {}
        #: consumed refresh token -> the redemption that consumed it
        self.consumed: dict[str, int] = {}
        #: access token -> grant
        self.access: dict[str, int] = {}
        #: access token -> the redemption that minted it (refresh results only)
        self.access_redemption: dict[str, int] = {}
        #: rotated refresh token -> the redemption that minted it
        self.minted_by: dict[str, int] = {}
        self.redemptions: list[Redemption] = []
        #: How many refresh requests each (process, refresh token) started, whether or not they arrived.
        self.attempts: Counter[tuple[int, str]] = Counter()
        #: (worker, refresh token) -> (when, session): the provider told that worker the token is dead
        #: (invalid_grant), and the answer reached it.
        self.refused_to: dict[tuple[str, str], tuple[float, str]] = {}

    def revoke(self, gid: int, why: str) -> None:
        """The grant ends at the provider (the user withdrew consent, an administrator revoked it): its refresh
        token is answered invalid_grant from now on, its access tokens refused by the API."""
        grant = self.grants[gid]
        if grant.revoked is None:
            grant.revoked = why
            self.world.log(f"provider: g{gid} REVOKED ({why})")

    def check_presented_again(self, worker: str, pid: int, rt: str, session: str) -> None:
        """A worker the provider told ``rt`` is dead must not present it again while the entry is kept for
        inspection (``ManagerCore.refuse``): unless a logout or login of the session in its process came
        since (that forgets the refusal), or it was told so of cache_size other sessions since (the oldest
        refusals are forgotten beyond that)."""
        told = self.refused_to.get((worker, rt))
        if told is None:
            return
        w = self.world
        since = told[0]
        if any(e.pid == pid and e.start >= since for e in w.epochs.get(session, [])):
            return
        others = {s for (who, _), (t, s) in self.refused_to.items() if who == worker and t > since and s != session}
        if len(others) >= w.cache_size:
            return
        w.violate(
            "dead-token-presented-again",
            f"{worker} presented {rt} ({session}) again though the provider told it at {since:.3f} that the token is "
            "dead (invalid_grant), and the entry still holds it",
        )

    def login(self, subject: str, life: float, issued_ago: float = 1.0) -> tuple[int, UpstreamTokens]:
        """A new grant for ``subject`` and its first tokens (what the login flow hands the app)."""
        gid = len(self.grants) + 1
        rotates = self.world.rng.random() < self.world.knobs.p_rotate
        grant = Grant(gid, subject, rotates, f"rt{gid}.0")
        self.grants[gid] = grant
        self.rt_grant[grant.current_rt] = gid
        access = f"at{gid}.0"
        self.access[access] = gid
        wall = self.world.store.wall()
        tokens = UpstreamTokens(
            access_token=access,
            refresh_token=grant.current_rt,
            expires_at=wall + life,
            issued_at=wall - issued_ago,
            user_id=subject,
            upstream_subject=subject,
            client_id="sim-client",
        )
        return gid, tokens

    def redeem(self, rt: str | None, process: int) -> Redemption:
        """A refresh request arrives: rotate, renew, or detect reuse (which revokes the grant)."""
        w = self.world
        rid = len(self.redemptions)
        gid = None if rt is None else self.rt_grant.get(rt)
        red = Redemption(rid, rt or "-", gid, process, w.now(), "dead")
        self.redemptions.append(red)
        if rt is None or gid is None:
            w.log(f"provider: p{process} presented an unknown refresh token -> invalid_grant")
            return red
        grant = self.grants[gid]
        if rt in self.consumed:
            first = self.redemptions[self.consumed[rt]]
            red.kind, red.first, red.first_fate_then = "reuse", first.rid, first.fate
            red.first_saved_then = "applied" in first.saves
            red.first_age_then = w.now() - first.at
            red.first_deletes_then = list(first.deletes)
            w.log(f"provider: p{process} presented CONSUMED {rt} (r{first.rid}, fate {first.fate}) -> revoke g{gid}")
            w.violate(
                "reuse",
                f"refresh token {rt} presented twice (r{first.rid} by p{first.process}, r{rid} by p{process})",
                rid,
            )
            grant.revoked = f"reuse of {rt}"
            return red
        if grant.revoked is not None or rt != grant.current_rt:
            w.log(f"provider: p{process} presented dead {rt} -> invalid_grant")
            return red
        grant.generation += 1
        red.new_at = f"at{gid}.{grant.generation}"
        self.access[red.new_at] = gid
        self.access_redemption[red.new_at] = rid
        partial = self.world.knobs.p_partial_rotation
        if grant.rotates if not partial else self.world.rng.random() < partial:
            red.kind, red.successor = "rotated", f"rt{gid}.{grant.generation}"
            self.consumed[rt] = rid
            self.rt_grant[red.successor] = gid
            self.minted_by[red.successor] = rid
            grant.current_rt = red.successor
            w.log(f"provider: r{rid} p{process} {rt} -> {red.new_at} {red.successor}")
        else:
            red.kind = "renewed"
            w.log(f"provider: r{rid} p{process} {rt} -> {red.new_at} (no rotation)")
        return red


class SimClock(Clock):
    """The manager's clock: wall time (with injected jumps) and monotonic time, both virtual."""

    def __init__(self, world: World) -> None:
        self._world = world

    def time(self) -> float:
        """Wall seconds: virtual time plus the epoch plus every clock jump so far."""
        return WALL_EPOCH + self._world.now() + self._world.wall_offset

    def monotonic(self) -> float:
        """Monotonic seconds: virtual time."""
        return MONOTONIC_EPOCH + self._world.now()


@dataclass
class _Watcher:
    key: EntryKey
    version: int | None
    event: anyio.Event


class SharedStore:
    """The one store every process talks to: entries with CAS on version, leases, change notification."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.entries: dict[EntryKey, UpstreamTokens] = {}
        #: key -> (owner, expiry on the lease clock, holder pid)
        self.leases: dict[EntryKey, tuple[str, float, int]] = {}
        self.watchers: list[_Watcher] = []
        self.proxies: list[SimStorage] = []
        #: Leases whose holder never learned it got them (the reply was lost): they can only expire.
        self.orphans: list[str] = []
        #: Leases whose holder tried to give them back (a release that failed leaves them to expire), and when
        #: it first tried (its job had finished).
        self.release_tried: list[str] = []
        self.release_tried_at: dict[str, float] = {}
        self._owners = 0
        #: lease owner -> when it was taken (lease clock); owners already reported as held too long
        self.taken_at: dict[str, float] = {}
        self.overheld: set[str] = set()
        #: lease owner -> (when the job's acquire returned, the job's task); owners whose keeper renewed past
        #: its bound (reported once)
        self.acquired: dict[str, tuple[float, Any]] = {}
        #: The process each lease was taken in (a task job makes its bounded calls in tasks of their own, so the
        #: task that sends is not the one that took the lease: the job is the same process's single flight).
        self.acquired_in: dict[str, int] = {}
        #: The lease whose job's read hung (``Knobs.read_hang``), once it happened.
        self.hung = ""
        self.keeper_overran: set[str] = set()
        #: job (``JOB``) -> the redemption whose save it tried and lost to another write; job -> the redemption
        #: whose job then read that other write
        self.cas_lost: dict[str, int] = {}
        self.saw_theirs: dict[str, int] = {}
        #: A real storage (SQLiteStorage on a temp file) that decides every entry operation; the model
        #: above mirrors it and checks what it did. Leases and change notices stay simulated.
        self.real: Storage | None = None
        #: Every delete the managers asked for: (pid, session, expected_version, at, what became of it).
        self.delete_log: list[tuple[int, str, int | None, float, str]] = []
        #: Access tokens the API stopped accepting (revoked at the API, the refresh token still valid).
        self.api_revoked: set[str] = set()
        #: Refresh tokens an entry held and lost (overwritten or deleted, by anyone).
        self.replaced: set[str] = set()
        #: refresh token -> the session whose entry held it
        self.rt_session: dict[str, str] = {}

    def wall(self) -> float:
        """The store's wall clock (the same as the processes')."""
        return WALL_EPOCH + self.world.now() + self.world.wall_offset

    def lease_clock(self) -> float:
        """Leases expire on time that never jumps (Redis's server clock, SQLite's host-wide monotonic clock)."""
        return self.world.now()

    # -- apply steps (atomic) ---------------------------------------------------------------------------
    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """Read an entry (from the real storage when there is one; the model must agree)."""
        if self.real is not None:
            found = self.real.get(key)
            model = self.entries.get(key)
            if (None if found is None else (found.version, found.refresh_token)) != (
                None if model is None else (model.version, model.refresh_token)
            ):
                self.world.violate("store-diverged", f"real store holds {found} where the model has {model}")
            return found
        return self.entries.get(key)

    def seed_entry(self, key: EntryKey, tokens: UpstreamTokens) -> None:
        """An application login written straight into the store (no manager involved)."""
        self.entries[key] = tokens
        self.rt_session[tokens.refresh_token or ""] = key.session_id
        if self.real is not None:
            self.real.put(key, tokens, expected_version=None)

    def put(
        self, pid: int, key: EntryKey, tokens: UpstreamTokens, expected: int | None, writer: SimStorage | None = None
    ) -> bool:
        """Compare-and-set on version; checks that a refresh result replaces exactly what it redeemed."""
        w = self.world
        current = self.entries.get(key)
        if self.real is not None:
            refused = not self.real.put(key, tokens, expected_version=expected)
        else:
            refused = (None if current is None else current.version) != expected
        if refused and w.knobs.mutant != "cas-ignores-version":
            self._note_save(tokens, "cas-lost")
            lost = w.provider.access_redemption.get(tokens.access_token)
            if current is not None and current.version != expected and lost is not None and JOB.get():
                self.cas_lost[JOB.get()] = lost
            w.log(f"store: p{pid} put {tokens.refresh_token} v{tokens.version} over v{expected}: CAS LOST")
            return False
        op = APP_OP.get()
        rid = w.provider.access_redemption.get(tokens.access_token)
        if op != "login" and rid is not None:
            red = w.provider.redemptions[rid]
            if current is None:
                w.violate("resurrected-session", f"p{pid} wrote refresh result r{rid} into an empty (logged out) entry")
            elif current.access_token != tokens.access_token and current.refresh_token != red.rt:
                cur_gid = w.provider.rt_grant.get(current.refresh_token or "")
                if cur_gid != red.gid:
                    w.violate(
                        "cross-lineage-write",
                        f"p{pid} saved refresh result r{rid} of g{red.gid} over {current.refresh_token} of g{cur_gid} "
                        f"(v{current.version}): the session now serves the old grant",
                    )
                else:
                    w.violate(
                        "regression-write",
                        f"p{pid} saved refresh result r{rid} (from {red.rt}) over {current.refresh_token}: a newer "
                        "rotated token is lost",
                    )
        if (
            op != "login"
            and current is not None
            and self._is_live_rotated(current)
            and current.refresh_token != (tokens.refresh_token)
            and rid is None
        ):
            w.violate("live-token-discarded", f"p{pid} overwrote live {current.refresh_token} without a login")
        if current is not None and current.refresh_token != tokens.refresh_token:
            self.replaced.add(current.refresh_token or "")
        self.entries[key] = tokens
        self.rt_session[tokens.refresh_token or ""] = key.session_id
        self._note_save(tokens, "applied")
        w.log(f"store: p{pid} put {tokens.refresh_token} ({tokens.access_token}) v{tokens.version} ok [{op or 'mgr'}]")
        self._changed(key, tokens.version, writer)
        return True

    def delete(self, pid: int, key: EntryKey, expected: int | None, writer: SimStorage | None = None) -> bool:
        """Delete (conditionally on version when ``expected`` is given)."""
        w = self.world
        current = self.entries.get(key)
        if self.real is not None:
            refused = not self.real.delete(key, expected_version=expected)
        else:
            refused = current is None or (expected is not None and current.version != expected)
        if refused:
            w.log(f"store: p{pid} delete v{expected}: nothing to delete")
            return False
        if current is None:
            w.violate("store-diverged", f"p{pid}: the real store deleted an entry the model does not have")
            return True
        op = APP_OP.get()
        consumed_by = w.provider.consumed.get(current.refresh_token or "")
        if consumed_by is not None:
            w.provider.redemptions[consumed_by].deletes.append("applied")
        # Failing closed is the rule once an answer was lost or unusable: the manager cannot know the provider
        # did not rotate, so removing the entry it redeemed from is right even if the token still works.
        # An attempt whose request never arrived counts too: a deadline cannot tell whether it left.
        attempted = w.provider.attempts[(pid, current.refresh_token or "")]
        delivered = sum(
            red.rt == current.refresh_token and red.process == pid and red.fate == "delivered"
            for red in w.provider.redemptions
        )
        failed_closed = attempted > delivered
        if op != "logout" and self._is_live(current) and not failed_closed:
            w.violate(
                "live-token-discarded",
                f"p{pid} deleted the entry holding {current.refresh_token}, a refresh token the provider still honours",
            )
        del self.entries[key]
        self.replaced.add(current.refresh_token or "")
        w.log(f"store: p{pid} delete {current.refresh_token} v{current.version} ok [{op or 'mgr'}]")
        self._changed(key, None, writer)
        return True

    def acquire(self, pid: int, key: EntryKey, ttl: float) -> Lease | None:
        """Take the lease unless a live one is held."""
        now = self.lease_clock()
        held = self.leases.get(key)
        if held is not None and held[1] > now and self.world.knobs.mutant != "lease-always-free":
            self.world.log(f"store: p{pid} lease busy (p{held[2]})")
            return None
        self._owners += 1
        lease = Lease(key, f"p{pid}-l{self._owners}", ttl)
        self.leases[key] = (lease.owner, now + ttl, pid)
        self.taken_at[lease.owner] = now
        self.world.log(f"store: p{pid} lease {lease.owner} taken for {ttl}s")
        return lease

    def release(self, pid: int, lease: Lease) -> None:
        """Drop the lease if it is still this owner's."""
        held = self.leases.get(lease.key)
        if held is not None and held[0] == lease.owner:
            del self.leases[lease.key]
            self.world.log(f"store: p{pid} lease {lease.owner} released")

    def renew(self, pid: int, lease: Lease) -> bool:
        """Extend the lease if it is still this owner's and live."""
        now = self.lease_clock()
        held = self.leases.get(lease.key)
        if held is None or held[0] != lease.owner or held[1] <= now:
            self.world.log(f"store: p{pid} lease {lease.owner} renew refused")
            return False
        self.leases[lease.key] = (lease.owner, now + lease.ttl, pid)
        self.world.log(f"store: p{pid} lease {lease.owner} renewed for {lease.ttl}s")
        k, taken = self.world.knobs, self.taken_at.get(lease.owner, now)
        if (
            k.lease_hold_bound
            and now + lease.ttl - taken > k.lease_hold_bound
            and lease.owner not in self.overheld
            and not any(start < now and end > taken for start, end in self.world.stalls)
            and lease.owner != self.hung
        ):
            self.overheld.add(lease.owner)
            self.world.violate(
                "lease-held-too-long",
                f"p{pid} renewed lease {lease.owner} to {now + lease.ttl - taken:.2f}s after taking it: a job may hold "
                f"its lease for refresh_timeout (the request) and two more for saving or failing closed, "
                f"{k.lease_hold_bound:.2f}s with store latencies and the ttl",
            )
        return True

    def version(self, key: EntryKey) -> int | None:
        """The entry's version, or ``None``."""
        entry = self.entries.get(key)
        return None if entry is None else entry.version

    # -- helpers --------------------------------------------------------------------------------------
    def _is_live(self, tokens: UpstreamTokens) -> bool:
        """The entry holds its grant's current refresh token (a login's or a rotated one) and the grant lives."""
        gid = self.world.provider.rt_grant.get(tokens.refresh_token or "")
        if gid is None:
            return False
        grant = self.world.provider.grants[gid]
        return grant.revoked is None and grant.current_rt == tokens.refresh_token

    def _is_live_rotated(self, tokens: UpstreamTokens) -> bool:
        gid = self.world.provider.rt_grant.get(tokens.refresh_token or "")
        if gid is None:
            return False
        grant = self.world.provider.grants[gid]
        return grant.revoked is None and grant.current_rt == tokens.refresh_token and grant.generation > 0

    def _note_save(self, tokens: UpstreamTokens, result: str) -> None:
        rid = self.world.provider.minted_by.get(tokens.refresh_token or "")
        if rid is not None:
            self.world.provider.redemptions[rid].saves.append(result)

    def _changed(self, key: EntryKey, version: int | None, writer: SimStorage | None = None) -> None:
        for watcher in self.watchers:
            if watcher.key == key and watcher.version != version:
                watcher.event.set()
        if not self.world.knobs.notices:
            return  # a store that reports no changes: no manager hears of any write
        # The writing storage object tells its own subscribers; the others hear it through the change feed,
        # unless they do not listen (a forked child's feed did not survive the fork) or carry the writer's
        # origin tag (the feed skips changes made by "themselves").
        for proxy in list(self.proxies):
            if proxy.process.crashed:
                continue
            if proxy is writer or (proxy.listens and (writer is None or proxy.origin != writer.origin)):
                proxy.notify_change(key)


class SimStorage(Storage):
    """One process's connection to the shared store, with the delays and faults of its backend kind.

    ``memory``: atomic, no await, never fails. ``sqlite``: applied at once (a worker thread runs it to the
    end), the reply comes after a delay that anyio scopes cannot cancel (native asyncio cancellation can).
    ``redis``: a cancellable delay before the command leaves (cancelling it: nothing happened), then the
    server applies it, then a cancellable reply delay (cancelling it: applied, reply lost); errors before
    (not applied) or after (applied, as a timeout after the server ran it).
    """

    blocking = False

    def __init__(self, world: World, process: Process) -> None:
        super().__init__()
        self.world = world
        self.process = process
        #: The tag the change feed skips (a real backend's ``_origin``): a forked child keeps its parent's.
        self.origin = f"p{process.pid}"
        #: False when this object's change feed is gone (a forked child: the parent's listener thread did
        #: not survive the fork); it still tells its own subscribers of its own writes.
        self.listens = True
        #: Set by ``close``/``aclose``: every later operation fails (and is recorded as "closed").
        self.closed = False
        world.store.proxies.append(self)

    def after_fork_in_child(self) -> None:
        """What the real backends do in a forked child (tests/test_storage_fork.py proves it with real
        forks): their own origin tag, and their own change feed carrying the subscriptions made before."""
        self.origin = f"p{self.process.pid}"
        self.listens = True

    def close(self) -> None:
        """The application closed this storage (through ``TokenManager.close``)."""
        if not self.closed:
            self.closed = True
            self.world.log(f"store: p{self.process.pid} storage CLOSED ({self.world.where()})")

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        self.close()

    # -- sync methods: same state, no delay (the simulation drives the async API) --------------------------
    def _sync_guard(self) -> None:
        if self.process.crashed:
            raise StorageError(f"process p{self.process.pid} is dead")

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        """Read at once."""
        self._sync_guard()
        return self.world.store.get(key)

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """CAS at once."""
        self._sync_guard()
        return self.world.store.put(self.process.pid, key, tokens, expected_version, self)

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Delete at once."""
        self._sync_guard()
        return self.world.store.delete(self.process.pid, key, expected_version, self)

    def acquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Take the shared lease at once."""
        self._sync_guard()
        return self.world.store.acquire(self.process.pid, key, ttl)

    def release_lease(self, lease: Lease) -> None:
        """Release at once."""
        self._sync_guard()
        self.world.store.release(self.process.pid, lease)

    def renew_lease(self, lease: Lease) -> bool:
        """Renew at once."""
        self._sync_guard()
        return self.world.store.renew(self.process.pid, lease)

    # -- the simulated I/O ----------------------------------------------------------------------------
    async def _op(
        self, name: str, apply: Callable[[], Any], on_lost: Callable[[str], None] | None = None, session: str = ""
    ) -> Any:
        with self.world.working(self.process.pid, session):
            return await self._op_unrecorded(name, apply, on_lost)

    async def _op_unrecorded(self, name: str, apply: Callable[[], Any], on_lost: Callable[[str], None] | None) -> Any:
        w, proc, kind = self.world, self.process, self.world.knobs.storage
        if proc.crashed:
            await w.freeze(proc)
        if self.closed:
            w.log(f"store: p{proc.pid} {name} on a CLOSED storage ({w.where()})")
            if on_lost is not None:
                on_lost("closed")
            raise StorageError(f"the {kind} storage of p{proc.pid} is closed")
        if kind == "memory":
            return apply()
        rng = w.rng
        fault = rng.random() < w.knobs.store_error
        before = fault and rng.random() < 0.5
        if any(start <= w.now() < end for start, end in w.outages):
            fault = before = True
        if kind == "redis":
            try:
                await anyio.sleep(self._delay(rng))
            except BaseException:
                if on_lost is not None:
                    on_lost(f"cancel-pre:{w.cancel_cause()}")
                raise
            if proc.crashed:
                await w.freeze(proc)
        if before:
            w.log(f"store: p{proc.pid} {name} fails before applying ({w.where()})")
            if on_lost is not None:
                on_lost("error-before")
            raise StorageError(f"simulated {kind} failure before {name}")
        result = apply()
        try:
            delay = self._delay(rng)
            if kind == "sqlite":
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(delay)
            else:
                await anyio.sleep(delay)
        except BaseException:
            w.log(f"store: p{proc.pid} {name} reply lost to cancellation ({w.where()}, {w.cancel_cause()})")
            if on_lost is not None:
                on_lost(f"reply-lost:{w.cancel_cause()}")
            raise
        if proc.crashed:
            await w.freeze(proc)
        if fault:
            w.log(f"store: p{proc.pid} {name} applied, then the reply failed ({w.where()})")
            if on_lost is not None:
                on_lost("error-after")
            raise StorageError(f"simulated {kind} timeout after {name} ran")
        return result

    def _delay(self, rng: random.Random) -> float:
        """One leg of an operation: up to ``store_delay``, or much longer while the store stalls."""
        k, now = self.world.knobs, self.world.now()
        if any(start <= now < end for start, end in self.world.stalls):
            return k.stall_delay * rng.uniform(0.5, 1.5)
        return rng.uniform(0.0001, k.store_delay)

    async def aget(self, key: EntryKey) -> UpstreamTokens | None:
        """Read, with the backend's delays and faults."""
        store, job = self.world.store, JOB.get()
        await self._maybe_hang(key)
        result: UpstreamTokens | None = await self._op("get", lambda: self.world.store.get(key), session=key.session_id)
        rid = store.cas_lost.get(job) if job else None
        if rid is not None and result is not None and result.version != self.world.provider.redemptions[rid].version:
            store.saw_theirs[job] = rid  # the job read the write its compare-and-set lost to
        mine = None if result is None else self.world.provider.access_redemption.get(result.access_token)
        if mine is not None and self.world.caller() is None:
            self.world.provider.redemptions[mine].saved_known = True  # a job read back what was saved
        return result

    async def aput(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        """CAS, with the backend's delays and faults."""
        store, w = self.world.store, self.world
        rid = w.provider.access_redemption.get(tokens.access_token)  # the answer these tokens came in
        if rid is not None and w.caller() is None:
            self._check_save_retry(rid)

        def lost(why: str) -> None:
            store._note_save(tokens, why)

        result: bool = await self._op(
            "put", lambda: store.put(self.process.pid, key, tokens, expected_version, self), lost, key.session_id
        )
        if result and rid is not None:
            w.provider.redemptions[rid].saved_known = True
        return result

    async def _maybe_hang(self, key: EntryKey, op: str = "get", owner: str = "") -> None:
        """The call that ``Knobs.read_hang`` makes hang: a job's read under the lease it holds, or (``op``
        "release") its release of lease ``owner``."""
        w, store = self.world, self.world.store
        hang = w.knobs.read_hang
        if hang is None or w.knobs.hang_op != op or w.now() < hang[0] or store.hung or w.caller() is not None:
            return
        if op == "get":
            held = store.leases.get(key)
            if held is None or store.acquired.get(held[0], (0.0, None))[1] is not w.current_task():
                return
            owner = held[0]
        elif JOB.get() != owner:
            return  # only the job's own release (a bounded call runs in a task that copied the job's context)
        store.hung = owner
        w.log(f"store: p{self.process.pid} {op} HANGS for {hang[1]:.1f}s ({w.where()})")
        with w.working(self.process.pid, key.session_id):
            await anyio.sleep(hang[1])
        w.log(f"store: p{self.process.pid} {op} timed out ({w.where()})")
        if op == "release" and w.current_task() is store.acquired.get(owner, (0.0, None))[1]:
            # The job's own task waited out the hang: a call after the token request is waited for at most
            # 2 x refresh_timeout + lease_ttl (docs/design.md, "A job is bounded"), then the job ends and
            # publishes its outcome; until then every caller of the session waits on its flight.
            w.violate(
                "job-held-by-a-hung-call",
                f"p{self.process.pid}: the job of lease {owner} waited {hang[1]:.1f}s for its lease release, past "
                f"its bound of {2 * w.refresh_timeout + w.lease_ttl:.1f}s",
            )
        raise StorageError("simulated: the connection timed out")

    def _check_save_retry(self, rid: int) -> None:
        """A job saving a refresh result: it gets refresh_timeout of retries from the answer (docs/design.md,
        "A job is bounded"), and stops once it has seen that someone else wrote the entry (theirs wins)."""
        w, store = self.world, self.world.store
        red, job = w.provider.redemptions[rid], JOB.get()
        red.put_attempts += 1
        if job and store.saw_theirs.get(job) == rid:
            w.violate(
                "save-retried-over-another-write",
                f"r{rid}: its compare-and-set lost to another write, its read showed that write, and the job tries "
                "to write its result again (a lost compare-and-set means theirs wins)",
            )
        if red.put_attempts > 1 and w.now() > red.answered_at + w.refresh_timeout + 1e-6:
            w.violate(
                "save-retried-past-its-bound",
                f"r{rid}: a save retried {w.now() - red.answered_at:.2f}s after the answer, past refresh_timeout "
                f"({w.refresh_timeout}): the lease stops being renewed, yet the job goes on writing",
            )

    async def adelete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        """Delete, with the backend's delays and faults."""
        store = self.world.store
        current = store.get(key)
        consumed_by = None if current is None else self.world.provider.consumed.get(current.refresh_token or "")

        pid, w = self.process.pid, self.world
        outcome = ["applied-or-refused"]

        def lost(why: str) -> None:
            outcome[0] = why
            if consumed_by is not None:
                self.world.provider.redemptions[consumed_by].deletes.append(why)

        if expected_version is not None and not self.closed and not self.process.crashed:
            # A fail-closed delete reached an open store: count it for each redemption of that entry.
            for red in w.provider.redemptions:
                if red.process == pid and red.session == key.session_id and red.version == expected_version:
                    red.delete_attempts += 1
        try:
            result: bool = await self._op(
                "delete", lambda: store.delete(self.process.pid, key, expected_version, self), lost, key.session_id
            )
        finally:
            store.delete_log.append((pid, key.session_id, expected_version, w.now(), outcome[0]))
        return result

    async def aacquire_lease(self, key: EntryKey, ttl: float) -> Lease | None:
        """Take the lease, with the backend's delays (a lease taken whose reply is lost stays until it expires)."""
        store = self.world.store
        taken: list[Lease | None] = []

        def acquire() -> Lease | None:
            taken.append(store.acquire(self.process.pid, key, ttl))
            return taken[0]

        def lost(why: str) -> None:
            if taken and taken[0] is not None:
                store.orphans.append(taken[0].owner)

        result: Lease | None = await self._op("lease", acquire, lost, key.session_id)
        if result is not None:
            # The job holds it from now on; its lease keeper starts now (see ``arenew_lease``).
            store.acquired[result.owner] = (self.world.now(), self.world.current_task())
            JOB.set(result.owner)  # in the job's own context (this coroutine runs in its task)
            store.acquired_in[result.owner] = self.process.pid
        return result

    async def arelease_lease(self, lease: Lease) -> None:
        """Release the lease, with the backend's delays."""
        self.world.store.release_tried.append(lease.owner)
        self.world.store.release_tried_at.setdefault(lease.owner, self.world.now())
        await self._maybe_hang(lease.key, "release", lease.owner)
        await self._op("release", lambda: self.world.store.release(self.process.pid, lease), None, lease.key.session_id)

    async def arenew_lease(self, lease: Lease) -> bool:
        """Renew the lease, with the backend's delays.

        A renewal from another task than the one that took the lease is the job's lease keeper's: the keeper
        stops renewing 2 x refresh_timeout + lease_ttl after it started (when the lease was taken), whatever
        the job does (docs/design.md, "A job is bounded"), so a job stuck past its bounds lets the lease lapse.
        """
        w = self.world
        taken = w.store.acquired.get(lease.owner)
        hold = 2 * w.refresh_timeout + w.lease_ttl
        keeper = taken is not None and taken[1] is not w.current_task()
        if (
            keeper
            and taken is not None
            and w.now() > taken[0] + hold + 1e-6
            and lease.owner not in w.store.keeper_overran
        ):
            w.store.keeper_overran.add(lease.owner)
            w.violate(
                "lease-renewed-past-the-keeper-bound",
                f"p{self.process.pid}'s lease keeper renews {lease.owner} {w.now() - taken[0]:.2f}s after taking "
                f"it, past 2 x refresh_timeout + lease_ttl ({hold:.2f}s)",
            )
        result: bool = await self._op(
            "renew", lambda: self.world.store.renew(self.process.pid, lease), None, lease.key.session_id
        )
        return result

    async def awatch(self, key: EntryKey, version: int | None, timeout: float) -> None:
        """Return once the entry's version differs from ``version`` (woken by saves), or after ``timeout``."""
        w, proc = self.world, self.process
        if proc.crashed:
            await w.freeze(proc)
        with w.working(proc.pid, key.session_id), anyio.move_on_after(timeout):
            if w.knobs.storage != "memory":
                await anyio.sleep(w.rng.uniform(0.0001, w.knobs.store_delay))
            if w.store.version(key) != version:
                return
            watcher = _Watcher(key, version, anyio.Event())
            w.store.watchers.append(watcher)
            try:
                await watcher.event.wait()
            finally:
                w.store.watchers.remove(watcher)
            if w.knobs.storage != "memory":
                await anyio.sleep(w.rng.uniform(0.0001, w.knobs.store_delay))
        if proc.crashed:
            await w.freeze(proc)


class SimRefresher(Refresher):
    """One process's client of the simulated provider.

    Connecting may fail or be cancelled (nothing sent). Once sent, the provider redeems at once; the
    answer travels back for a while, and a caller cancelled meanwhile loses it. Odd answers: an id_token
    for another subject (``BindingMismatch`` after rotating, as the real parser raises) and an answer that
    could not be read (``RefreshFailed(may_have_rotated=True)`` after rotating).
    """

    def __init__(self, world: World, process: Process) -> None:
        self.world = world
        self.process = process
        #: Set by ``close()`` (``TokenManager.close``/``aclose``): its client is closed, nothing can be sent.
        self.closed = False
        #: Which manager redeems through it (a process may run several: each remembers its own consumed tokens).
        self.worker = f"p{process.pid}"

    def close(self) -> None:
        """The manager closed the refresher's client: requests fail, and answers on the way are lost."""
        self.closed = True
        self.world.log(f"refresher: p{self.process.pid} client CLOSED ({self.world.where()})")

    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """The simulation drives async callers only."""
        raise RefreshFailed("the simulation has no sync refresher", retryable=False)

    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        """Redeem ``tokens.refresh_token`` at the simulated provider."""
        w, proc = self.world, self.process
        if proc.crashed:
            await w.freeze(proc)
        who = w.where()
        if self.closed:
            # httpx: "Cannot send a request, as the client has been closed." (a RuntimeError)
            w.log(f"refresher: p{proc.pid} {who} cannot send: the client is closed")
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        w.log(f"refresher: p{proc.pid} {who} connecting to redeem {tokens.refresh_token} (v{tokens.version})")
        w.provider.attempts[(proc.pid, tokens.refresh_token or "")] += 1
        session = w.store.rt_session.get(tokens.refresh_token or "", "")
        owner = self._check_lease(tokens, session)  # the refresh token leaves now
        with w.working(proc.pid, session):
            return await self._arefresh(tokens, clock, owner)

    async def _arefresh(self, tokens: UpstreamTokens, clock: Clock, owner: str) -> UpstreamTokens:
        w, proc, k = self.world, self.process, self.world.knobs
        rng, who = w.rng, w.where()
        try:
            await anyio.sleep(rng.uniform(0.0001, k.connect))
        except BaseException:
            w.log(f"refresher: p{proc.pid} {who} cancelled before sending ({w.cancel_cause()})")
            raise
        if proc.crashed:
            await w.freeze(proc)
        roll = rng.random()
        latency = rng.uniform(0.0001, k.slow_latency if rng.random() < k.slow else k.latency)
        if roll < k.p_neterr:
            w.log(f"refresher: p{proc.pid} {who} network error before sending")
            raise RefreshFailed("simulated network error before sending", retryable=True)
        if roll < k.p_neterr + k.p_503 or any(a <= w.now() < b for a, b in k.provider_outages):
            await anyio.sleep(latency)
            w.log(f"refresher: p{proc.pid} {who} got 503")
            raise RefreshFailed("simulated 503", retryable=True, status_code=503)
        sent_at = clock.time()
        session = w.store.rt_session.get(tokens.refresh_token or "", "")
        w.provider.check_presented_again(self.worker, proc.pid, tokens.refresh_token or "", session)
        red = w.provider.redeem(tokens.refresh_token, proc.pid)
        red.version = tokens.version
        red.worker = self.worker
        red.session = session
        red.lease_owner = owner
        try:
            await anyio.sleep(latency)
        except BaseException:
            red.fate = f"lost-cancel:{w.cancel_cause()}"
            w.log(f"refresher: p{proc.pid} {who} r{red.rid} answer LOST to cancellation ({red.fate})")
            raise
        if proc.crashed:
            red.fate = "lost-crash"
            await w.freeze(proc)
        if self.closed:
            # The client was closed under the request: the answer is lost (httpx raises a transport error).
            red.fate = "lost-closed"
            w.log(f"refresher: p{proc.pid} {who} r{red.rid} answer LOST: the client was closed meanwhile")
            raise RefreshFailed(
                "simulated: client closed while reading the answer", retryable=True, may_have_rotated=True
            )
        if red.kind in ("rotated", "renewed") and rng.random() < k.p_gateway:
            # A gateway in front of the token endpoint answers after the provider redeemed: the real parser
            # decides what that means (today: a 5xx is "nothing was consumed").
            status, body = rng.choice(
                (
                    (502, b"<html><body>502 Bad Gateway</body></html>"),
                    (504, b"upstream timed out"),
                    (503, b"<html>Service Unavailable</html>"),
                    (200, b"<html>maintenance</html>"),
                )
            )
            red.fate = f"gateway-{status}"
            w.log(f"refresher: p{proc.pid} {who} r{red.rid} redeemed, but the gateway answers HTTP {status}")
            raise await gateway_error(tokens, status, body, clock)
        if red.kind in ("reuse", "dead"):
            red.fate = "delivered"
            w.provider.refused_to[(self.worker, red.rt)] = (w.now(), session)
            raise ReauthenticationRequired("simulated invalid_grant: the refresh token is dead")
        odd = rng.random()
        if red.kind == "rotated" and odd < k.p_mismatch:
            red.fate = "binding-mismatch"
            w.log(f"refresher: p{proc.pid} {who} r{red.rid} id_token names another subject -> BindingMismatch")
            raise BindingMismatch("simulated: the refreshed id_token names another subject")
        if red.kind == "rotated" and odd < k.p_mismatch + k.p_lost:
            red.fate = "may-have-rotated"
            w.log(f"refresher: p{proc.pid} {who} r{red.rid} answer unreadable -> RefreshFailed(may_have_rotated)")
            raise RefreshFailed("simulated unreadable answer", retryable=True, may_have_rotated=True)
        red.fate = "delivered"
        red.answered_at = w.now()
        assert red.new_at is not None
        life = 0.0 if rng.random() < k.p_zero_life else rng.uniform(*k.life)
        unknown = bool(k.p_no_life) and rng.random() < k.p_no_life
        w.log(
            f"refresher: p{proc.pid} {who} r{red.rid} answer delivered "
            + ("(no expires_in)" if unknown else f"(expires_in {life:.0f})")
        )
        return attrs.evolve(
            tokens,
            access_token=red.new_at,
            refresh_token=red.successor or tokens.refresh_token,
            expires_at=None if unknown else sent_at + life,
            issued_at=sent_at,
            refresh_expires_at=None if red.successor else tokens.refresh_expires_at,
            version=tokens.version + 1,
        )

    def _check_lease(self, tokens: UpstreamTokens, session: str) -> str:
        """The refresh token leaves only while the job holds the session's lease, live: the lease it took (in
        this task) is the store's current one and has not run out. Returns that lease's owner ("" if none)."""
        w = self.world
        if w.caller() is not None or not session or tokens.provider_id is None:
            return ""  # the simulation's own requests (a caller's task does not redeem)
        key = EntryKey(tokens.provider_id, session)
        held = w.store.leases.get(key)
        task = w.current_task()
        mine = held is not None and (
            w.store.acquired.get(held[0], (0.0, None))[1] is task
            or w.store.acquired_in.get(held[0]) == self.process.pid
        )
        if not mine or held is None or held[1] <= w.store.lease_clock():
            state = "no lease" if held is None else "another worker's lease" if not mine else "an expired lease"
            w.violate(
                "sent-without-the-lease",
                f"p{self.process.pid} sends {tokens.refresh_token} ({session}) holding {state}: another worker may "
                "redeem the same token meanwhile",
            )
        return held[0] if mine and held is not None else ""


async def gateway_error(tokens: UpstreamTokens, status: int, body: bytes, clock: Clock) -> Exception:
    """What the library's own ``OAuth2Refresher`` raises for a gateway's answer (sent through a mock
    transport on the simulated loop): the public parser decides whether it may follow a redemption."""
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(status, content=body)))
    refresher = OAuth2Refresher("https://token.sim/token", "sim-client", "sim-secret", async_client=client)
    try:
        await refresher.arefresh(tokens, clock)
    except Exception as exc:
        return exc
    finally:
        await client.aclose()
    return RefreshFailed(f"simulated HTTP {status} parsed as tokens", retryable=True, may_have_rotated=True)


def current_task_getter(backend: str) -> Callable[[], Any]:
    """How to name the running task on ``backend``."""
    if backend == "trio":
        return trio.lowlevel.current_task

    def asyncio_task() -> Any:
        try:
            return asyncio.current_task()
        except RuntimeError:
            return None

    return asyncio_task
