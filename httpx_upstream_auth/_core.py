"""The sans-I/O core of one TokenManager, shared by its async and blocking coordinators: settings, the cache,
the flights, what this process knows about refresh tokens it has redeemed, and the decisions over them
(is a token fresh, may a waiter take a flight's answer, is a session backing off). No I/O happens here.

Every lock here guards dict operations only; nothing slow (I/O, waiting) ever happens under them.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import logging
import os
import random
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Literal

import attrs

from ._clock import Clock
from ._exceptions import BindingMismatch, ConfigurationError, RefreshFailed
from ._models import Binding, EntryKey, UpstreamTokens
from ._policy import DEFAULT_RETENTION, FreshnessBounds, FreshnessPolicy
from ._refresher import Refresher
from ._storages import EncryptedStorage, Storage
from ._storages._shared import SharedStorage
from ._synchronization import Flight, Outcome, copy_error
from ._trace import TraceEvent, Tracer

logger = logging.getLogger("httpx_upstream_auth")

#: The round-trip estimator of TCP's retransmission timer (RFC 6298): gains for the smoothed round trip
#: and its variation, and how many variations above the mean a request may still take.
RTT_ALPHA, RTT_BETA, RTT_K = 1 / 8, 1 / 4, 4
#: Refresh tokens this process remembers having presented without recording the result (see ``_consumed``).
CONSUMED_MEMORY = 100_000
#: How long a distrust of an access token of unknown lifetime lasts (seconds): an API that keeps refusing such a
#: token costs one refresh per this long, and one revoked for real is refreshed again after at most this long.
UNKNOWN_LIFETIME_DISTRUST = 60.0

RedeemIn = Literal["thread", "task"]
#: A refresh-ahead window starts at a random point of its last half (drawn per cached entry, from a generator
#: seeded per process): processes and sessions holding tokens of the same age do not refresh in step.
AHEAD_JITTER = 0.5

#: (manager state, entry digest) this task or thread is writing: that manager's own change notice is not news
#: to it (other managers sharing the storage object, or the task, still hear of it).
_writing: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar(
    "httpx_upstream_auth_writing", default=None
)


@attrs.frozen
class Requirement:
    """What a caller needs from the key's entry: a fresh token, and not the one the API just refused."""

    rejected: str | None = attrs.field(default=None, repr=False)
    #: A refresh ahead of expiry: the entry of this version, though still fresh, is what it replaces.
    ahead_of: int | None = None

    def satisfied_by(self, tokens: UpstreamTokens, state: ManagerCore) -> bool:
        """True when ``tokens`` can be sent as they are."""
        if self.ahead_of is not None and tokens.version <= self.ahead_of:
            return False
        return tokens.access_token != self.rejected and state.is_fresh(tokens)

    def accepts(self, outcome: Outcome, state: ManagerCore) -> bool:
        """True when a waiter with this need may take the flight's tokens."""
        tokens = outcome.tokens
        if tokens is None or tokens.access_token == self.rejected:
            return False
        if outcome.refreshed:
            # Even a token too short-lived to count as fresh, but not one born expired (an answer that
            # rotated the refresh token without a usable access token): the next flight redeems the new one.
            return tokens.expires_at is None or state.clock.time() < tokens.expires_at
        return outcome.fallback or state.is_fresh(tokens)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


@attrs.frozen
class Footprint:
    """How many entries each per-session table of one manager holds: for monitoring, and to check bounds.

    ``cached``, ``epochs`` and ``digests`` stay within ``cache_size`` plus the sessions with work in
    progress; ``flights`` and ``reads`` count that work, ``waiting`` the callers waiting on refreshes;
    ``consumed`` the refresh tokens presented whose
    outcome is not recorded yet (or could not be); ``distrusted`` and ``backing_off`` are within
    ``cache_size`` and empty out as their tokens and pauses expire; ``failing`` counts the remembered
    refresh failures (one per session within ``cache_size``, plus one for a configuration error);
    ``lost_claims`` the lease claims whose answer the storage object lost (SQLite, Redis), each kept for one
    lease ttl, at most 10,000.
    """

    cached: int
    epochs: int
    digests: int
    flights: int
    reads: int
    waiting: int
    consumed: int
    distrusted: int
    backing_off: int
    failing: int
    lost_claims: int


class Lookups:
    """How often one manager's in-process cache answered (``hits``: a fresh token, no store read) and did not
    (``misses``). Plain counters on the hot path, lock-free on purpose: under heavy contention between threads an
    increment may be lost, which a ratio shrugs off."""

    __slots__ = ("hits", "misses")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0


@attrs.define
class _Presented:
    #: False while the job that presented the token runs; True once its answer was lost and the
    #: fail-closed delete could not be confirmed.
    lost: bool
    #: Wall time after which no store can still hold the token (its refresh expiry, else the retention).
    until: float


#: Every live manager state, so a forked child can start each one clean.
_live: weakref.WeakSet[ManagerCore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for state in list(_live):
        state.after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch (absent on Windows, where nothing forks)
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit() -> None:
    # Before the interpreter waits for non-daemon threads (our refresh jobs): no job starts any more, and a
    # job waiting for another process's lease stops, while one that sent its request saves or fails closed.
    for state in list(_live):
        state.closing = True


# threading's own exit hook runs before non-daemon threads are joined (atexit runs after, too late).
_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:  # pragma: no branch (CPython has it; other interpreters go without)
    _register_atexit(_at_exit)


class ManagerCore:
    """The sans-I/O core of one TokenManager: its settings, its per-session tables and the decisions over them.

    Every per-session table has a bound and a rule for when an entry dies (docs/design.md, "Tables"):
    the cache holds at most ``cache_size`` sessions; epochs and change-notice digests are kept for cached
    sessions and sessions with work in progress, and trimmed beyond twice ``cache_size`` among the others;
    flights live while their work runs; presented refresh tokens until their answer is recorded (or, if
    it was lost, until no store can hold them); distrust and back-off until their token or pause expires
    (a distrust of a token of unknown lifetime after UNKNOWN_LIFETIME_DISTRUST seconds); remembered failures
    (within ``cache_size``, plus one configuration error) until their window ends.
    """

    #: The refresh job as a blocking call, for worker threads (set by ``Coordinators``, which every manager makes).
    thread_job: Callable[[EntryKey, Requirement, Flight], None]

    def __init__(
        self,
        *,
        provider_id: str,
        storage: Storage,
        refresher: Refresher,
        clock: Clock,
        policy: FreshnessPolicy,
        refresh_timeout: float,
        lease_ttl: float,
        lease_wait: float,
        wait_timeout: float,
        retry_interval: float,
        cache_size: int,
        redeem_in: RedeemIn,
        failure_window: float = 0.0,
        reuse_grace: float = 0.0,
        on_event: Callable[[TraceEvent], None] | None = None,
        on_refresh: Callable[[str, UpstreamTokens], None] | None = None,
    ) -> None:
        self.provider_id = provider_id
        self.storage = storage
        self.refresher = refresher
        self.clock = clock
        self.policy = policy
        self.refresh_timeout = refresh_timeout
        self.lease_ttl = lease_ttl
        self.lease_wait = lease_wait
        self.wait_timeout = wait_timeout
        self.retry_interval = retry_interval
        self.failure_window = failure_window
        self.reuse_grace = reuse_grace
        self.redeem_in: RedeemIn = redeem_in
        #: Where events go (logging, the user's hooks); see _trace.py.
        self.tracer = Tracer(provider_id, on_event, on_refresh)
        #: The cache's hits and misses (exported as an OpenTelemetry counter when the [otel] extra is installed).
        self.lookups = Lookups()
        if self.tracer.otel is not None:
            self.tracer.otel.count_lookups(self, provider_id, self.lookups)
        # session id -> (tokens, their freshness bounds, the instant until which they are fresh and not due for
        # a refresh ahead whatever the latency, the length of their refresh-ahead window, the instant before
        # which it never opens), computed once per entry: the hot path is a dict read and one comparison.
        # Reads take no lock (a dict read is atomic); writes do, and evict the oldest entries beyond cache_size.
        # An OrderedDict, not a dict: evicting the oldest of a plain dict (``pop(next(iter(d)))``) walks the holes
        # left by earlier evictions, which made a cache miss cost O(cache_size) once sessions outnumber the cache.
        self._cache: OrderedDict[str, tuple[UpstreamTokens, FreshnessBounds, float, float, float]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # Bumped by every logout or login of a session: a job or a read that started before cannot
        # put its (older) result in the cache or hand it to a caller after that.
        # Epochs come from one counter, so a value is never reused. A session in use (cached, or with
        # work in progress) keeps its entry; others are trimmed beyond twice cache_size and then read
        # as the highest value trimmed, which refuses older work, never newer.
        self._epochs: OrderedDict[str, int] = OrderedDict()
        self._epoch_counter = itertools.count(1)
        self._epoch_floor = 0
        # storage digest -> session id, so a change notice names the session: kept for every session in
        # use (a notice about any other one has nothing here to invalidate), trimmed like the epochs.
        self._digests: OrderedDict[str, str] = OrderedDict()
        self._flights: dict[EntryKey, Flight] = {}
        self._reads: dict[EntryKey, Flight] = {}
        # Digests of refresh tokens presented to the provider whose answer is not recorded: while a job
        # runs, and after an answer was lost until the fail-closed delete is confirmed or no store can
        # hold the token any more. Never presented again from here, whatever the store says (it may be
        # down, or lag behind). A token whose answer was saved needs no memory: the store moved past it.
        self._consumed: dict[bytes, _Presented] = {}
        # session id -> digest of its refresh token the provider called dead (invalid_grant): not presented
        # again while the entry is kept for inspection. Forgetting one costs one more refused call, so the
        # oldest go beyond cache_size; a logout or login of the session ends it.
        self._refused: OrderedDict[str, bytes] = OrderedDict()
        # session id -> (access token the API refused right after a refresh, until when: wall time): refreshing
        # again on its account would not help. Ends when the API accepts it, or it expires (a token of unknown
        # lifetime: UNKNOWN_LIFETIME_DISTRUST after the refusal).
        self._distrusted: dict[str, tuple[str, float]] = {}
        # Keys whose early refresh failed without consuming anything: until this monotonic time, the
        # still-valid token is served instead of trying again on every request.
        self._retry_at: dict[EntryKey, float] = {}
        # session id -> (a refresh failure that consumed nothing and reached the callers, until when: monotonic):
        # meanwhile its callers get it without a token request. One failure a setting causes is the manager's:
        # every session would meet it.
        self._failures: OrderedDict[str, tuple[RefreshFailed, float]] = OrderedDict()
        self._config_failure: tuple[ConfigurationError, float] | None = None
        # How long a request may take, as TCP estimates its retransmission timeout: smoothed round trip
        # plus four times its variation (RFC 6298). A running maximum would let one stall (a GC pause, a
        # busy event loop) refresh every token early for seconds. Updated without a lock: a lost update
        # between racing threads only delays the estimate by one request.
        self.latency = 0.0
        self._srtt: float | None = None
        self._rttvar = 0.0
        #: Set by close(): no new refresh job starts, and one that has not sent its request stops.
        self.closing = False
        #: Jitter of retry pauses. Seeded from the clock and the process (so a forked fleet does not retry in
        #: step), deterministically under a simulated clock.
        self.jitter = _jitter(provider_id, clock, 0)
        # Run once the last job ends, when close() could not wait for it (closes the storage then).
        self._when_idle: list[Callable[[], None]] = []
        self._unsubscribe = _subscribe_weakly(storage, self)
        _live.add(self)

    def key(self, session_id: str) -> EntryKey:
        """The storage key of a session of this provider."""
        return EntryKey(self.provider_id, session_id)

    @contextlib.contextmanager
    def writing(self, key: EntryKey) -> Iterator[None]:
        """Mark a write of ours, so the change notice it causes here does not count as another worker's."""
        token = _writing.set((id(self), key.digest))
        try:
            yield
        finally:
            # ValueError: the job's coroutine is being closed from another context (collected with the event
            # loop that was closed under it); that context never sees the mark.
            with contextlib.suppress(ValueError):
                _writing.reset(token)

    def close(self) -> None:
        """Stop listening to the storage's change notifications; cache nothing any more (a closed manager
        would no longer hear another worker's logout of a cached session)."""
        self.closing = True
        with self._lock:
            self._cache.clear()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def after_fork(self) -> None:
        """In a forked child: no inherited work (its threads did not survive), locks or cached tokens.

        The storage re-attaches this manager's subscription to the child's own change feed; changes made
        between the fork and then are not missed, since the cache starts empty.
        """
        self._lock = threading.Lock()
        self.jitter = _jitter(self.provider_id, self.clock, os.getpid())
        self._flights.clear()
        self._reads.clear()
        self._cache.clear()
        self._retry_at.clear()
        self._failures.clear()
        self._config_failure = None
        # Tokens the parent's running jobs presented: the parent records their outcome, and the child waits
        # for the parent's lease in the store. A store whose lease lives in this process only cannot make
        # the child wait: then the child never presents them either.
        if type(_backend(self.storage)).acquire_lease is not Storage.acquire_lease:
            self._consumed = {digest: entry for digest, entry in self._consumed.items() if entry.lost}
        self._when_idle.clear()

    def footprint(self) -> Footprint:
        """The size of every per-session table (see :class:`Footprint`)."""
        return Footprint(
            cached=len(self._cache),
            epochs=len(self._epochs),
            digests=len(self._digests),
            flights=len(self._flights),
            reads=len(self._reads),
            waiting=sum(flight.waiting for flight in list(self._flights.values())),
            consumed=len(self._consumed) + len(self._refused),
            distrusted=len(self._distrusted),
            backing_off=len(self._retry_at),
            failing=len(self._failures) + (self._config_failure is not None),
            lost_claims=len(backend._orphans) if isinstance(backend := _backend(self.storage), SharedStorage) else 0,
        )

    # -- freshness -----------------------------------------------------------------------------------
    def observe(self, took: float) -> None:
        """Record one request's round trip (seconds), so tokens are refreshed before they could expire
        on the way."""
        srtt = self._srtt
        if srtt is None:
            srtt, rttvar = took, took / 2
        else:
            rttvar = (1 - RTT_BETA) * self._rttvar + RTT_BETA * abs(srtt - took)
            srtt = (1 - RTT_ALPHA) * srtt + RTT_ALPHA * took
        self._srtt, self._rttvar = srtt, rttvar
        self.latency = srtt + RTT_K * rttvar

    def is_fresh(self, tokens: UpstreamTokens) -> bool:
        """True when the token can be sent now without refreshing first."""
        return self.policy.is_fresh(tokens, self.clock.time(), self.latency)

    def is_valid(self, tokens: UpstreamTokens) -> bool:
        """True when the token has not expired, with room for a request's round trip."""
        return tokens.expires_at is None or self.clock.time() + self.latency < tokens.expires_at

    # -- the in-process cache of fresh tokens ------------------------------------------------------
    def cached(
        self, session_id: str, ahead: Callable[[str, UpstreamTokens], None] | None = None
    ) -> UpstreamTokens | None:
        """The cached entry while it is fresh, else ``None``. The request hot path: no lock, no I/O.

        Inside the entry's refresh-ahead window, ``ahead(session_id, tokens)`` is called (it starts the
        background refresh) and the entry is still returned."""
        hit = self._cache.get(session_id)
        if hit is None:
            self.lookups.misses += 1
            return None
        tokens, bounds, calm_until, ahead_for, ahead_floor = hit
        now = self.clock.time()
        if now < calm_until:
            self.lookups.hits += 1
            return tokens
        # The window ends where the leeway begins, which grows with the observed latency: a window fixed at
        # caching time would shrink to nothing on a slow link, and every expiry would block again. It never
        # opens before the floor, or a grown leeway plus the window would refresh short tokens twice as often.
        due = bounds.fresh_until(self.latency)
        if now >= due:
            self.lookups.misses += 1
            return None
        if now >= max(due - ahead_for, ahead_floor) and ahead is not None:
            ahead(session_id, tokens)
        self.lookups.hits += 1
        return tokens

    def epoch(self, key: EntryKey) -> int:
        """The session's login generation in this process (see :meth:`new_epoch`)."""
        return self._epochs.get(key.session_id, self._epoch_floor)

    def new_epoch(self, key: EntryKey) -> None:
        """A logout or login happened: drop the cached entry and refuse results of older work."""
        with self._lock:
            self._bump(key.session_id)
            self._retry_at.pop(key, None)
            self._distrusted.pop(key.session_id, None)
            self._refused.pop(key.session_id, None)

    def remember(self, key: EntryKey, tokens: UpstreamTokens, epoch: int) -> None:
        """Cache ``tokens`` if no logout or login happened since ``epoch`` (an older version never
        replaces a newer one)."""
        bounds = self.policy.bounds(tokens)
        window = self.policy.ahead_window(tokens)
        calm_until = bounds.calm_until()
        ahead_for, ahead_floor = -1.0, float("-inf")
        if window > 0:
            ahead_for = window * self.jitter.uniform(1 - AHEAD_JITTER, 1.0)
            ahead_floor = self.policy.ahead_floor(tokens)
            calm_until = min(calm_until, max(calm_until - ahead_for, ahead_floor))
        entry = (tokens, bounds, calm_until, ahead_for, ahead_floor)
        session_id = key.session_id
        with self._lock:
            if self._epochs.get(session_id, self._epoch_floor) != epoch or self.closing:
                return  # a logout or login happened since, or the manager was closed (it hears no notice)
            held = self._cache.get(session_id)
            if held is None or held[0].version <= tokens.version:
                self._cache[session_id] = entry
                self._cache.move_to_end(session_id)  # eviction takes the oldest
                self._track(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
                self._trim()

    def forget(self, key: EntryKey, access_token: str | None = None) -> None:
        """Drop the cached entry (only if it still holds ``access_token``, when given)."""
        with self._lock:
            held = self._cache.get(key.session_id)
            if held is not None and (access_token is None or held[0].access_token == access_token):
                self._cache.pop(key.session_id, None)

    def _bump(self, session_id: str) -> None:
        # Caller holds the lock.
        self._epochs.pop(session_id, None)
        self._epochs[session_id] = next(self._epoch_counter)
        self._cache.pop(session_id, None)
        # The entry changed (a login, a logout, another worker's refresh): a failure of the old one says nothing.
        self._failures.pop(session_id, None)
        self._trim()

    def _track(self, key: EntryKey) -> None:
        """Make sure a session in use has its epoch and its digest (caller holds the lock)."""
        session_id = key.session_id
        if session_id not in self._epochs:
            self._epochs[session_id] = self._epoch_floor
        self._digests[key.digest] = session_id
        self._digests.move_to_end(key.digest)

    def _in_use(self, session_id: str) -> bool:
        key = EntryKey(self.provider_id, session_id)
        return session_id in self._cache or key in self._flights or key in self._reads

    def _trim(self) -> None:
        """Drop the oldest epochs and digests of sessions not in use beyond twice cache_size (lock held).

        Sessions in use are moved to the end instead: they are at most cache_size plus the work in
        progress, so the scan ends, and a notice about them is never missed.
        """
        limit = 2 * self._cache_size
        if len(self._epochs) <= limit and len(self._digests) <= limit:
            return
        for _ in range(len(self._epochs)):
            if len(self._epochs) <= limit:
                break
            session_id, epoch = next(iter(self._epochs.items()))
            if self._in_use(session_id):
                self._epochs.move_to_end(session_id)
                continue
            del self._epochs[session_id]
            self._epoch_floor = max(self._epoch_floor, epoch)
        for _ in range(len(self._digests)):
            if len(self._digests) <= limit:
                break
            digest, session_id = next(iter(self._digests.items()))
            if self._in_use(session_id):
                self._digests.move_to_end(digest)
                continue
            del self._digests[digest]

    def on_change(self, digest: str | None) -> None:
        """Another worker saved or deleted an entry (a logout looks like any other change): drop the cached
        token and refuse results of reads and refreshes that began before, as a local logout does."""
        if digest is not None and _writing.get() == (id(self), digest):
            return
        with self._lock:
            if digest is None:
                sessions = list(self._epochs.keys() | self._cache.keys())
            else:
                session = self._digests.get(digest)
                sessions = [] if session is None else [session]
            for session_id in sessions:
                self._bump(session_id)
        if sessions and self.tracer.listening("change.notice"):  # only notices that changed something here
            key = None if digest is None or not sessions else EntryKey(self.provider_id, sessions[0])
            self.tracer.emit("change.notice", key, sessions=len(sessions))

    # -- single flight -----------------------------------------------------------------------------
    def flights_in_progress(self) -> int:
        """How many refreshes this manager has in flight (no lock: a bound's check, not a count to rely on)."""
        return len(self._flights)

    def join_flight(self, key: EntryKey, reads: bool = False) -> tuple[Flight, bool]:
        """The key's refresh (or shared read) in progress, or a new one; the bool is true when new."""
        table = self._reads if reads else self._flights
        with self._lock:
            flight = table.get(key)
            if flight is not None and flight.alive():
                return flight, False
            if not reads and self.closing:
                raise RefreshFailed(
                    "the TokenManager is closed, so no refresh starts; use a manager that is open.",
                    retryable=False,
                )
            self._track(key)
            dead, flight = flight, Flight(self._epochs[key.session_id])
            table[key] = flight
            self._trim()
        if dead is not None:
            dead.finish(Outcome())  # its waiters start over too
        return flight, True

    def end_flight(self, key: EntryKey, flight: Flight, outcome: Outcome, reads: bool = False) -> None:
        """Publish the outcome; later callers start a new flight."""
        table = self._reads if reads else self._flights
        idle: list[Callable[[], None]] = []
        with self._lock:
            if table.get(key) is flight:
                del table[key]
            if not self._flights and self._when_idle:
                idle, self._when_idle = self._when_idle, []
        flight.finish(outcome)
        for run in idle:
            run()

    def running(self) -> list[Flight]:
        """The refresh jobs in progress."""
        with self._lock:
            return list(self._flights.values())

    def storage_in_use_elsewhere(self) -> bool:
        """True when another manager that is open, or still running a job, uses this manager's storage."""
        return any(other.storage is self.storage for other in self._others_in_use())

    def refresher_in_use_elsewhere(self) -> bool:
        """True when another manager that is open, or still running a job, uses this manager's refresher."""
        return any(other.refresher is self.refresher for other in self._others_in_use())

    def _others_in_use(self) -> list[ManagerCore]:
        return [other for other in list(_live) if other is not self and (not other.closing or other.running())]

    def when_idle(self, run: Callable[[], None]) -> bool:
        """Call ``run`` once no refresh job runs: now (returns True) or when the last one ends (False)."""
        with self._lock:
            if self._flights:
                self._when_idle.append(run)
                return False
        run()
        return True

    # -- what this process knows about redeemed tokens -------------------------------------------
    def mark_consumed(self, refresh_token: str) -> None:
        """Remember that ``refresh_token`` is being presented and may be consumed."""
        with self._lock:
            self._consumed[_digest(refresh_token)] = _Presented(lost=False, until=float("inf"))

    def settle_consumed(self, refresh_token: str) -> None:
        """The answer is recorded (saved, or the provider certainly did not consume ``refresh_token``), or
        the store certainly no longer holds it: no need to remember it."""
        with self._lock:
            self._consumed.pop(_digest(refresh_token), None)

    def lose_consumed(self, tokens: UpstreamTokens) -> None:
        """The answer for ``tokens.refresh_token`` was lost, and the store may still hold it: remember it
        until no store can (its refresh expiry, else the storage's retention from now)."""
        assert tokens.refresh_token is not None
        now = self.clock.time()
        retention = getattr(self.storage, "retention", DEFAULT_RETENTION)
        until = tokens.refresh_expires_at if tokens.refresh_expires_at is not None else now + retention
        with self._lock:
            self._consumed[_digest(tokens.refresh_token)] = _Presented(lost=True, until=until)
            if len(self._consumed) > CONSUMED_MEMORY:
                self._trim_consumed(now)

    def refuse(self, key: EntryKey, refresh_token: str) -> None:
        """The provider called ``refresh_token`` dead (invalid_grant): do not present it again for the session."""
        digest = _digest(refresh_token)
        with self._lock:
            self._consumed.pop(digest, None)
            self._refused.pop(key.session_id, None)
            self._refused[key.session_id] = digest
            while len(self._refused) > self._cache_size:
                self._refused.popitem(last=False)

    def _trim_consumed(self, now: float) -> None:
        # Caller holds the lock. First what no store can hold any more; then, should lost answers outnumber
        # the memory, the ones no store will hold soonest, down to nine tenths of it (so the sort is paid
        # once per tenth, not per call). Each is also a session the user must log in to again: this takes a
        # store outage across a hundred thousand lost answers.
        for digest in [d for d, entry in self._consumed.items() if entry.lost and entry.until <= now]:
            del self._consumed[digest]
        if len(self._consumed) > CONSUMED_MEMORY:
            excess = len(self._consumed) - CONSUMED_MEMORY * 9 // 10
            lost = sorted((entry.until, digest) for digest, entry in self._consumed.items() if entry.lost)
            for _, digest in lost[:excess]:
                del self._consumed[digest]
            logger.warning("forgot %d refresh tokens whose refresh answer was lost (memory full)", excess)

    def is_consumed(self, key: EntryKey, refresh_token: str) -> bool:
        """True when this process presented ``refresh_token`` and may not present it again (its answer is
        pending or lost, or the provider called it dead)."""
        digest = _digest(refresh_token)
        return digest in self._consumed or self._refused.get(key.session_id) == digest

    def is_lost(self, refresh_token: str) -> bool:
        """True when ``refresh_token``'s answer was lost and its entry could not be removed then."""
        entry = self._consumed.get(_digest(refresh_token))
        return entry is not None and entry.lost

    def distrust(self, session_id: str, tokens: UpstreamTokens) -> None:
        """The API refused ``tokens`` right after they were refreshed: do not refresh on their account
        until the API accepts them, or they expire (when their lifetime is unknown, for
        UNKNOWN_LIFETIME_DISTRUST seconds)."""
        now = self.clock.time()
        until = now + UNKNOWN_LIFETIME_DISTRUST if tokens.expires_at is None else tokens.expires_at
        with self._lock:
            self._distrusted.pop(session_id, None)
            self._distrusted[session_id] = (tokens.access_token, until)
            if len(self._distrusted) > self._cache_size:
                for sid in [s for s, (_, ends) in self._distrusted.items() if ends <= now]:
                    del self._distrusted[sid]
                while len(self._distrusted) > self._cache_size:
                    # Forgetting costs at most one more refresh for that session: never a correctness loss.
                    del self._distrusted[next(iter(self._distrusted))]

    def trust(self, session_id: str, access_token: str) -> None:
        """The API accepted ``access_token``: a distrust of it ends. Called on every answer: cheap."""
        held = self._distrusted.get(session_id)
        if held is not None and held[0] == access_token:
            with self._lock:
                if self._distrusted.get(session_id) == held:
                    del self._distrusted[session_id]

    def is_distrusted(self, session_id: str, access_token: str) -> bool:
        """True when refreshing because the API refused ``access_token`` would not help."""
        held = self._distrusted.get(session_id)
        if held is None or held[0] != access_token:
            return False
        if self.clock.time() >= held[1]:
            self.trust(session_id, access_token)  # over: a distrust never outlives its token, nor its bound
            return False
        return True

    def back_off(self, key: EntryKey, retry_after: float | None = None) -> None:
        """An early refresh failed harmlessly: serve the still-valid token for ``retry_interval``, or as long as
        the provider's ``Retry-After`` asked if longer."""
        now = self.clock.monotonic()
        with self._lock:
            self._retry_at.pop(key, None)
            self._retry_at[key] = now + max(self.retry_interval, retry_after or 0.0)
            if len(self._retry_at) > self._cache_size:
                for stale in [k for k, until in self._retry_at.items() if until <= now]:
                    del self._retry_at[stale]
                while len(self._retry_at) > self._cache_size:
                    # Forgetting a pause costs one early retry: never a correctness loss.
                    del self._retry_at[next(iter(self._retry_at))]

    def backing_off(self, key: EntryKey) -> bool:
        """True while a failed early refresh of ``key`` should not be tried again."""
        until = self._retry_at.get(key)
        if until is None:
            return False
        if self.clock.monotonic() < until:
            return True
        with self._lock:
            if self._retry_at.get(key) == until:
                del self._retry_at[key]
        return False

    def remember_failure(self, key: EntryKey, error: RefreshFailed, epoch: int) -> None:
        """A refresh of ``key`` failed without consuming anything: answer its callers with ``error`` for
        ``failure_window`` seconds (longer if the provider's Retry-After asked for it), with no token request.
        A :class:`ConfigurationError` is remembered for every session, except a refused scope: that depends on
        what the session's grant allows, so it is remembered for that session only. A logout or login of the
        session ends its own failure (not a configuration error: a new login does not fix a setting)."""
        now = self.clock.monotonic()
        window = max(self.failure_window, error.retry_after or 0.0)
        if window <= 0:
            return
        # Kept without its traceback, whose frames would hold this manager (a cycle only a full collection
        # frees: the storage's subscription would keep calling a dropped manager) and the job's locals.
        kept = copy_error(error)
        with self._lock:
            if isinstance(kept, ConfigurationError) and kept.setting != "scope":
                self._config_failure = (kept, now + window)
            elif self._epochs.get(key.session_id, self._epoch_floor) == epoch:
                self._remember_session_failure(key, kept, now, window)
            else:
                return  # a logout or login happened since the job began: the failure was the old grant's
        self.tracer.emit("failure.remembered", key, error=type(kept).__name__, window=window)

    def _remember_session_failure(self, key: EntryKey, kept: RefreshFailed, now: float, window: float) -> None:
        # Caller holds the lock.
        self._failures.pop(key.session_id, None)
        self._failures[key.session_id] = (kept, now + window)
        if len(self._failures) > self._cache_size:
            for stale in [sid for sid, (_, until) in self._failures.items() if until <= now]:
                del self._failures[stale]
            while len(self._failures) > self._cache_size:
                # Forgetting one costs that session one more token request: never a correctness loss.
                del self._failures[next(iter(self._failures))]

    def remembered_failure(self, key: EntryKey) -> RefreshFailed | None:
        """The failure a refresh of ``key`` would meet now, while it is remembered; else ``None``."""
        now = self.clock.monotonic()
        config = self._config_failure
        if config is not None:
            if now < config[1]:
                return _counting_down(config[0], config[1] - now)
            with self._lock:
                if self._config_failure is config:
                    self._config_failure = None
        held = self._failures.get(key.session_id)
        if held is None:
            return None
        if now < held[1]:
            return _counting_down(held[0], held[1] - now)
        with self._lock:
            if self._failures.get(key.session_id) is held:
                del self._failures[key.session_id]
        return None

    # -- checks ----------------------------------------------------------------------------------------
    def check_binding(self, tokens: UpstreamTokens, expect: Binding | None) -> None:
        """Raise BindingMismatch when the entry is another provider's or not the expected identity."""
        if tokens.provider_id is not None and tokens.provider_id != self.provider_id:
            raise BindingMismatch(
                "the stored entry belongs to another provider than this manager's; nothing was sent. "
                "Use the TokenManager of that provider."
            )
        if expect is not None:
            expect.check(tokens)


def _backend(storage: Storage) -> Storage:
    """The store that holds the entries and leases: an encrypting wrapper's backend."""
    return storage.inner if isinstance(storage, EncryptedStorage) else storage


def _jitter(provider_id: str, clock: Clock, pid: int) -> random.Random:
    return random.Random(f"{provider_id}:{pid}:{clock.time()!r}")


def _subscribe_weakly(storage: Storage, state: ManagerCore) -> Callable[[], None] | None:
    """Subscribe ``state`` to the storage's change notices without keeping it alive: a manager dropped
    without close() is freed, and its subscription removes itself at the next notice.

    Not ``weakref.finalize``: its registry would hold the unsubscribe function, hence the storage, and a
    storage that refers back to the manager (through anything it holds) would then keep it alive for good.
    """
    ref = weakref.ref(state)
    unsubscribe: Callable[[], None] | None = None

    def on_change(digest: str | None) -> None:
        target = ref()
        if target is not None:
            target.on_change(digest)
        elif unsubscribe is not None:
            unsubscribe()

    unsubscribe = storage.subscribe(on_change)
    return unsubscribe


def _counting_down(error: RefreshFailed, left: float) -> RefreshFailed:
    """``error`` as remembered ``left`` seconds before its memory ends: a ``retry_after`` it carries counts down."""
    if error.retry_after is None:
        return error
    fresh = copy_error(error)
    fresh.retry_after = min(error.retry_after, left)
    return fresh
