"""What one TokenManager shares between its async and sync halves: settings, the cache, the flights.

Both locks here guard dict operations only; nothing slow (I/O, waiting) ever happens under them.
"""

from __future__ import annotations

import hashlib
import logging
import threading

import attrs

from ._clock import Clock
from ._exceptions import BindingMismatch
from ._models import Binding, EntryKey, UpstreamTokens
from ._policy import FreshnessBounds, FreshnessPolicy
from ._refresher import Refresher
from ._storage import Storage
from ._synchronization import Flight, Outcome

logger = logging.getLogger("httpx_upstream_auth")

#: Seconds for the latency estimate to halve once requests get faster again.
LATENCY_HALF_LIFE = 2.0


@attrs.frozen
class Need:
    """What a caller needs from the key's entry: a fresh token, and not the one the API just refused."""

    rejected: str | None = attrs.field(default=None, repr=False)

    def satisfied_by(self, tokens: UpstreamTokens, state: ManagerState) -> bool:
        """True when ``tokens`` can be sent as they are."""
        return tokens.access_token != self.rejected and state.is_fresh(tokens)


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
        cache_size: int,
    ) -> None:
        self.provider_id = provider_id
        self.storage = storage
        self.refresher = refresher
        self.clock = clock
        self.policy = policy
        self.refresh_timeout = refresh_timeout
        self.lease_ttl = lease_ttl
        self.lease_wait = lease_wait
        # session id -> (tokens, their freshness bounds, computed once per entry): the hot path is a dict
        # read and a few float operations. Reads take no lock (a dict read is atomic); writes do, and
        # evict the oldest entries beyond cache_size.
        self._cache: dict[str, tuple[UpstreamTokens, FreshnessBounds]] = {}
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._flights: dict[EntryKey, Flight] = {}
        self._flights_lock = threading.Lock()
        # Recent request round trips, as a maximum that halves every LATENCY_HALF_LIFE seconds. Updated
        # without a lock: a lost update between racing threads only delays the estimate by one request.
        self.latency = 0.0
        self._latency_at = 0.0

    def key(self, session_id: str) -> EntryKey:
        """The storage key of a session of this provider."""
        return EntryKey(self.provider_id, session_id)

    # -- the in-process cache of fresh tokens ---------------------------------------------------------
    def observe(self, took: float) -> None:
        """Record one request's round trip (seconds), so tokens are refreshed before they could expire
        on the way."""
        now = self.clock.monotonic()
        decayed = self.latency * 0.5 ** ((now - self._latency_at) / LATENCY_HALF_LIFE)
        self.latency = took if took > decayed else decayed
        self._latency_at = now

    def is_fresh(self, tokens: UpstreamTokens) -> bool:
        """True when the token can be sent now, given the policy and the observed latency."""
        return self.policy.is_fresh(tokens, self.clock.time(), self.latency)

    def cached(self, session_id: str) -> UpstreamTokens | None:
        """The cached entry while it is fresh, else ``None``. The request hot path: no lock, no I/O."""
        hit = self._cache.get(session_id)
        if hit is None:
            return None
        tokens, bounds = hit
        return tokens if self.clock.time() < bounds.fresh_until(self.latency) else None

    def remember(self, key: EntryKey, tokens: UpstreamTokens) -> None:
        """Cache ``tokens`` (an older version never replaces a newer one)."""
        entry = (tokens, self.policy.bounds(tokens))
        with self._cache_lock:
            held = self._cache.get(key.session_id)
            if held is None or held[0].version <= tokens.version:
                self._cache.pop(key.session_id, None)  # re-insert at the end: eviction takes the oldest
                self._cache[key.session_id] = entry
                while len(self._cache) > self._cache_size:
                    del self._cache[next(iter(self._cache))]

    def forget(self, key: EntryKey, access_token: str | None = None) -> None:
        """Drop the cached entry (only if it still holds ``access_token``, when given)."""
        with self._cache_lock:
            held = self._cache.get(key.session_id)
            if held is not None and (access_token is None or held[0].access_token == access_token):
                del self._cache[key.session_id]

    # -- single flight ------------------------------------------------------------------------------
    def join_flight(self, key: EntryKey) -> tuple[Flight, bool]:
        """The key's flight in progress, or a new one; the bool is true when the caller leads it."""
        with self._flights_lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = Flight()
            return flight, True

    def end_flight(self, key: EntryKey, flight: Flight, outcome: Outcome) -> None:
        """Publish the leader's outcome; later callers start a new flight."""
        with self._flights_lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.finish(outcome)

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


def describe(key: EntryKey) -> str:
    """A log-safe name for a key: session ids can be bearer secrets (cookies), so only a digest."""
    digest = hashlib.sha256(key.session_id.encode()).hexdigest()[:12]
    return f"{key.provider_id}:{digest}"
