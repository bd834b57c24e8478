"""OpenTelemetry spans and metrics from the manager's events, when ``opentelemetry-api`` is installed
(``pip install httpx-upstream-auth[otel]``).

Only the API is used: with no SDK configured its tracer and meter do nothing. Instruments (meter
``httpx_upstream_auth``):

* ``httpx_upstream_auth.refreshes`` (counter, ``{refresh}``): refreshes by ``outcome`` (``success``,
  ``failure``) and ``reason`` (``expired``, ``rejected``, ``ahead``);
* ``httpx_upstream_auth.refresh.duration`` (histogram, ``s``): how long the job took, same attributes;
* ``httpx_upstream_auth.lease.waits`` (counter): times a job waited for another worker's lease;
* ``httpx_upstream_auth.replays`` (counter): requests replayed after a 401;
* ``httpx_upstream_auth.cache.lookups`` (observable counter, ``{lookup}``): token lookups answered by the
  in-process cache (``result`` = ``hit``) or not (``miss``: a store read, a wait or a refresh followed); the
  cache hit ratio is hits over both. Managers count in plain integers on the hot path; the meter reads them
  when it collects, and a manager's counts outlive it (added to its provider's total when it is collected).

Every refresh is also a span ``httpx_upstream_auth.refresh`` (status ERROR with the error's class on a
failure), recorded when the job ends with its true start and end; a replay is an event on the caller's
current span. Attributes carry the provider id and the session's digest, never a token or a session id.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Protocol


class TraceEvent(Protocol):
    """What this module reads of ``_trace.TraceEvent`` (a protocol, so the seam imports this module and not
    the other way round)."""

    @property
    def name(self) -> str: ...
    @property
    def provider_id(self) -> str: ...
    @property
    def session(self) -> str | None: ...
    @property
    def fields(self) -> Mapping[str, Any]: ...


class LookupCounts(Protocol):
    """What this module reads of a manager's cache counters (``_core.Lookups``)."""

    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...


try:
    from opentelemetry import metrics, trace

    AVAILABLE = True
except ImportError:  # the [otel] extra is not installed
    AVAILABLE = False

__all__ = ["OtelSink", "otel_sink"]

#: The events this sink turns into telemetry (the tracer builds no other event for it).
OTEL_EVENTS = frozenset({"refresh.succeeded", "refresh.failed", "lease.waited", "replayed"})


class OtelSink:
    """Turns the manager's events into OpenTelemetry spans and metrics."""

    def __init__(self) -> None:
        from . import __version__

        self._tracer = trace.get_tracer("httpx_upstream_auth", __version__)
        meter = metrics.get_meter("httpx_upstream_auth", __version__)
        self._refreshes = meter.create_counter(
            "httpx_upstream_auth.refreshes", unit="{refresh}", description="Refreshes of upstream tokens, by outcome"
        )
        self._duration = meter.create_histogram(
            "httpx_upstream_auth.refresh.duration", unit="s", description="How long a refresh job took"
        )
        self._lease_waits = meter.create_counter(
            "httpx_upstream_auth.lease.waits", description="Times a refresh job waited for another worker's lease"
        )
        self._replays = meter.create_counter(
            "httpx_upstream_auth.replays", description="Requests replayed with a newer token after a 401"
        )

    def count_lookups(self, owner: object, provider_id: str, lookups: LookupCounts) -> None:
        """Export ``lookups`` (the cache counters of ``owner``, a manager) until ``owner`` is collected."""
        _lookups().watch(owner, provider_id, lookups)

    def __call__(self, event: TraceEvent) -> None:
        """Record ``event`` (one of :data:`OTEL_EVENTS`)."""
        base: dict[str, Any] = {"httpx_upstream_auth.provider_id": event.provider_id}
        if event.name in ("refresh.succeeded", "refresh.failed"):
            self._refresh(event, base)
        elif event.name == "lease.waited":
            self._lease_waits.add(1, base)
        elif event.name == "replayed":
            self._replays.add(1, base)
            trace.get_current_span().add_event("httpx_upstream_auth.replayed", {**base})

    def _refresh(self, event: TraceEvent, base: dict[str, Any]) -> None:
        fields = event.fields
        failed = event.name == "refresh.failed"
        labels = {**base, "outcome": "failure" if failed else "success", "reason": str(fields.get("reason", ""))}
        duration = float(fields["duration"])
        self._refreshes.add(1, labels)
        self._duration.record(duration, labels)
        end = time.time_ns()
        span = self._tracer.start_span(
            "httpx_upstream_auth.refresh",
            start_time=end - int(duration * 1e9),
            attributes={
                **labels,
                "httpx_upstream_auth.session": event.session or "",
                "httpx_upstream_auth.waiters": int(fields.get("waiters", 0)),
                "httpx_upstream_auth.retries": int(fields.get("retries", 0)),
            },
        )
        if failed:
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(fields.get("error", ""))))
        span.end(end_time=end)


#: Provider ids whose managers' lookups are kept apart; the managers of any further id count under
#: :data:`OTHER_PROVIDERS`. Two series per id (hit, miss) then stay within the SDK's default cardinality limit
#: (2,000 attribute sets per instrument), beyond which it would fold them into an overflow series of its own.
MAX_RETIRED_PROVIDERS = 500
OTHER_PROVIDERS = "(other)"


class _CacheLookups:
    """The one ``httpx_upstream_auth.cache.lookups`` instrument, fed by every live manager's counters.

    One instrument for the process, not one per manager (a meter keeps the first instrument of a name). Its
    tables hold the live managers and one total per provider id for the collected ones, so managers made and
    dropped over months cost nothing here once gone, and the counter never goes down.
    """

    def __init__(self) -> None:
        from . import __version__

        self._lock = threading.Lock()
        self._live: dict[int, tuple[str, LookupCounts]] = {}
        self._retired: dict[str, tuple[int, int]] = {}
        self._dead: collections.deque[int] = collections.deque()
        metrics.get_meter("httpx_upstream_auth", __version__).create_observable_counter(
            "httpx_upstream_auth.cache.lookups",
            callbacks=[self._observe],
            unit="{lookup}",
            description="Token lookups answered by the in-process cache (result=hit) or not (result=miss)",
        )

    def watch(self, owner: object, provider_id: str, lookups: LookupCounts) -> None:
        with self._lock:
            self._drain()
            # The series is chosen once, for the manager's whole life (a series that later moved to "(other)"
            # would go down): its provider's, while fewer than MAX_RETIRED_PROVIDERS ids have one.
            if provider_id not in self._retired and len(self._retired) >= MAX_RETIRED_PROVIDERS:
                provider_id = OTHER_PROVIDERS
            self._retired.setdefault(provider_id, (0, 0))
            self._live[id(lookups)] = (provider_id, lookups)
        # A finalizer may run in any thread, at any allocation, this one's included while it holds the lock:
        # it only queues the retirement (deque.append is atomic), and the lock's holders apply it.
        weakref.finalize(owner, self._dead.append, id(lookups))

    def _drain(self) -> None:
        while self._dead:
            provider_id, lookups = self._live.pop(self._dead.popleft())
            hits, misses = self._retired[provider_id]
            self._retired[provider_id] = (hits + lookups.hits, misses + lookups.misses)

    def _observe(self, options: Any) -> Iterator[Any]:
        with self._lock:
            self._drain()
            totals = dict(self._retired)
            for provider_id, lookups in list(self._live.values()):
                hits, misses = totals.get(provider_id, (0, 0))
                totals[provider_id] = (hits + lookups.hits, misses + lookups.misses)
        for provider_id, (hits, misses) in totals.items():
            base = {"httpx_upstream_auth.provider_id": provider_id}
            yield metrics.Observation(hits, {**base, "result": "hit"})
            yield metrics.Observation(misses, {**base, "result": "miss"})


_instrument: _CacheLookups | None = None
_instrument_lock = threading.Lock()


def _lookups() -> _CacheLookups:
    global _instrument
    with _instrument_lock:
        if _instrument is None:
            _instrument = _CacheLookups()
        return _instrument


def otel_sink() -> OtelSink | None:
    """A sink when ``opentelemetry-api`` is installed, else ``None``."""
    return OtelSink() if AVAILABLE else None
