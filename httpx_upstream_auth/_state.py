"""What one TokenManager shares between its async and sync halves: settings, the cache, the flights,
and what this process knows about refresh tokens it has redeemed.

Every lock here guards dict operations only; nothing slow (I/O, waiting) ever happens under them.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Literal

import attrs

from ._clock import Clock
from ._exceptions import BindingMismatch
from ._models import Binding, EntryKey, UpstreamTokens
from ._policy import FreshnessBounds, FreshnessPolicy
from ._refresher import Refresher
from ._storage import Storage
from ._synchronization import Flight, Outcome

logger = logging.getLogger("httpx_upstream_auth")

#: The round-trip estimator of TCP's retransmission timer (RFC 6298): gains for the smoothed round trip
#: and its variation, and how many variations above the mean a request may still take.
RTT_ALPHA, RTT_BETA, RTT_K = 1 / 8, 1 / 4, 4
#: Refresh tokens this process remembers having presented without recording the result.
CONSUMED_MEMORY = 100_000

RedeemIn = Literal["thread", "task"]

#: (manager state, entry digest) this task or thread is writing: that manager's own change notice is not news
#: to it (other managers sharing the storage object, or the task, still hear of it).
_writing: contextvars.ContextVar[tuple[int, str] | None] = contextvars.ContextVar(
    "httpx_upstream_auth_writing", default=None
)


@attrs.frozen
class Need:
    """What a caller needs from the key's entry: a fresh token, and not the one the API just refused."""

    rejected: str | None = attrs.field(default=None, repr=False)

    def satisfied_by(self, tokens: UpstreamTokens, state: ManagerState) -> bool:
        """True when ``tokens`` can be sent as they are."""
        return tokens.access_token != self.rejected and state.is_fresh(tokens)

    def accepts(self, outcome: Outcome, state: ManagerState) -> bool:
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


class ManagerState:
    """Settings and shared tables of one TokenManager."""

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
        self.redeem_in: RedeemIn = redeem_in
        #: The refresh job as a blocking call, for worker threads (set by TokenManager).
        self.thread_job: Callable[[EntryKey, Need, Flight], None] = _unset
        # session id -> (tokens, their freshness bounds, computed once per entry): the hot path is a dict
        # read and a few float operations. Reads take no lock (a dict read is atomic); writes do, and
        # evict the oldest entries beyond cache_size.
        self._cache: dict[str, tuple[UpstreamTokens, FreshnessBounds]] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # Bumped by every logout or login of a session: a job or a read that started before cannot
        # put its (older) result in the cache or hand it to a caller after that.
        # Epochs come from one counter, so a value is never reused; sessions dropped from the table (beyond
        # twice cache_size) read as the highest value dropped, which refuses older work, never newer.
        self._epochs: OrderedDict[str, int] = OrderedDict()
        self._epoch_counter = itertools.count(1)
        self._epoch_floor = 0
        # storage digest -> session id, for every session seen lately, so a change notice names it
        self._digests: OrderedDict[str, str] = OrderedDict()
        self._flights: dict[EntryKey, Flight] = {}
        self._reads: dict[EntryKey, Flight] = {}
        # Refresh tokens presented to the provider whose result this process could not record: never
        # presented again from here, whatever the store says (it may be down, or lag behind).
        self._consumed: OrderedDict[bytes, None] = OrderedDict()
        # Access tokens the API refused right after a refresh: refreshing again would not help.
        self._distrusted: dict[str, str] = {}
        # Keys whose early refresh failed without consuming anything: until this monotonic time, the
        # still-valid token is served instead of trying again on every request.
        self._retry_at: dict[EntryKey, float] = {}
        # How long a request may take, as TCP estimates its retransmission timeout: smoothed round trip
        # plus four times its variation (RFC 6298). A running maximum would let one stall (a GC pause, a
        # busy event loop) refresh every token early for seconds. Updated without a lock: a lost update
        # between racing threads only delays the estimate by one request.
        self.latency = 0.0
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._unsubscribe = storage.subscribe(self._on_change)

    def key(self, session_id: str) -> EntryKey:
        """The storage key of a session of this provider (remembered, so change notices can name it)."""
        key = EntryKey(self.provider_id, session_id)
        digest = key.digest
        if digest not in self._digests:
            with self._lock:
                self._digests[digest] = session_id
                while len(self._digests) > 2 * self._cache_size:
                    self._digests.popitem(last=False)
        return key

    @contextlib.contextmanager
    def writing(self, key: EntryKey) -> Iterator[None]:
        """Mark a write of ours, so the change notice it causes here does not count as another worker's."""
        token = _writing.set((id(self), key.digest))
        try:
            yield
        finally:
            _writing.reset(token)

    def close(self) -> None:
        """Stop listening to the storage's change notifications."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

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
    def cached(self, session_id: str) -> UpstreamTokens | None:
        """The cached entry while it is fresh, else ``None``. The request hot path: no lock, no I/O."""
        hit = self._cache.get(session_id)
        if hit is None:
            return None
        tokens, bounds = hit
        return tokens if self.clock.time() < bounds.fresh_until(self.latency) else None

    def epoch(self, key: EntryKey) -> int:
        """The session's login generation in this process (see :meth:`new_epoch`)."""
        return self._epochs.get(key.session_id, self._epoch_floor)

    def new_epoch(self, key: EntryKey) -> None:
        """A logout or login happened: drop the cached entry and refuse results of older work."""
        with self._lock:
            self._bump(key.session_id)

    def remember(self, key: EntryKey, tokens: UpstreamTokens, epoch: int) -> None:
        """Cache ``tokens`` if no logout or login happened since ``epoch`` (an older version never
        replaces a newer one)."""
        entry = (tokens, self.policy.bounds(tokens))
        with self._lock:
            if self._epochs.get(key.session_id, self._epoch_floor) != epoch:
                return
            held = self._cache.get(key.session_id)
            if held is None or held[0].version <= tokens.version:
                self._cache.pop(key.session_id, None)  # re-insert at the end: eviction takes the oldest
                self._cache[key.session_id] = entry
                while len(self._cache) > self._cache_size:
                    self._drop(next(iter(self._cache)))

    def forget(self, key: EntryKey, access_token: str | None = None) -> None:
        """Drop the cached entry (only if it still holds ``access_token``, when given)."""
        with self._lock:
            held = self._cache.get(key.session_id)
            if held is not None and (access_token is None or held[0].access_token == access_token):
                self._drop(key.session_id)

    def _drop(self, session_id: str) -> None:
        self._cache.pop(session_id, None)

    def _bump(self, session_id: str) -> None:
        # Caller holds the lock.
        self._epochs.pop(session_id, None)
        self._epochs[session_id] = next(self._epoch_counter)
        self._drop(session_id)
        while len(self._epochs) > 2 * self._cache_size:
            _, dropped = self._epochs.popitem(last=False)
            self._epoch_floor = max(self._epoch_floor, dropped)

    def _on_change(self, digest: str | None) -> None:
        # Another worker saved or deleted an entry (a logout looks like any other change): drop the cached
        # token and refuse results of reads and refreshes that began before, as a local logout does.
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

    # -- single flight -----------------------------------------------------------------------------
    def join_flight(self, key: EntryKey, reads: bool = False) -> tuple[Flight, bool]:
        """The key's refresh (or shared read) in progress, or a new one; the bool is true when new."""
        table = self._reads if reads else self._flights
        with self._lock:
            flight = table.get(key)
            if flight is not None and flight.alive():
                return flight, False
            dead, flight = flight, Flight(self._epochs.get(key.session_id, self._epoch_floor))
            table[key] = flight
        if dead is not None:
            dead.finish(Outcome())  # its waiters start over too
        return flight, True

    def end_flight(self, key: EntryKey, flight: Flight, outcome: Outcome, reads: bool = False) -> None:
        """Publish the outcome; later callers start a new flight."""
        table = self._reads if reads else self._flights
        with self._lock:
            if table.get(key) is flight:
                del table[key]
        flight.finish(outcome)

    # -- what this process knows about redeemed tokens -------------------------------------------
    def mark_consumed(self, refresh_token: str) -> None:
        """Remember that ``refresh_token`` was presented and may be consumed."""
        with self._lock:
            self._consumed[_digest(refresh_token)] = None
            while len(self._consumed) > CONSUMED_MEMORY:
                self._consumed.popitem(last=False)

    def unmark_consumed(self, refresh_token: str) -> None:
        """The provider certainly did not consume ``refresh_token`` (it refused before, or did not rotate)."""
        with self._lock:
            self._consumed.pop(_digest(refresh_token), None)

    def is_consumed(self, refresh_token: str) -> bool:
        """True when this process presented ``refresh_token`` and may not present it again."""
        return _digest(refresh_token) in self._consumed

    def distrust(self, session_id: str, access_token: str) -> None:
        """The API refused ``access_token`` right after it was refreshed: do not refresh on its account."""
        with self._lock:
            self._distrusted[session_id] = access_token
            while len(self._distrusted) > self._cache_size:
                del self._distrusted[next(iter(self._distrusted))]

    def is_distrusted(self, session_id: str, access_token: str) -> bool:
        """True when refreshing because the API refused ``access_token`` would not help."""
        return self._distrusted.get(session_id) == access_token

    def back_off(self, key: EntryKey) -> None:
        """An early refresh failed harmlessly: serve the still-valid token for ``retry_interval``."""
        with self._lock:
            self._retry_at[key] = self.clock.monotonic() + self.retry_interval

    def backing_off(self, key: EntryKey) -> bool:
        """True while a failed early refresh of ``key`` should not be tried again."""
        until = self._retry_at.get(key)
        if until is None:
            return False
        if self.clock.monotonic() < until:
            return True
        with self._lock:
            self._retry_at.pop(key, None)
        return False

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


def _unset(key: EntryKey, need: Need, flight: Flight) -> None:
    raise RuntimeError("ManagerState.thread_job was not set by TokenManager")
