"""OpenTelemetry spans and metrics from the manager's events, when ``opentelemetry-api`` is installed
(``pip install httpx-upstream-auth[otel]``).

Only the API is used: with no SDK configured its tracer and meter do nothing. Instruments (meter
``httpx_upstream_auth``):

* ``httpx_upstream_auth.refreshes`` (counter, ``{refresh}``): refreshes by ``outcome`` (``success``,
  ``failure``) and ``reason`` (``expired``, ``rejected``, ``ahead``);
* ``httpx_upstream_auth.refresh.duration`` (histogram, ``s``): how long the job took, same attributes;
* ``httpx_upstream_auth.lease.waits`` (counter): times a job waited for another worker's lease;
* ``httpx_upstream_auth.replays`` (counter): requests replayed after a 401.

Every refresh is also a span ``httpx_upstream_auth.refresh`` (status ERROR with the error's class on a
failure), recorded when the job ends with its true start and end; a replay is an event on the caller's
current span. Attributes carry the provider id and the session's digest, never a token or a session id.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
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


def otel_sink() -> OtelSink | None:
    """A sink when ``opentelemetry-api`` is installed, else ``None``."""
    return OtelSink() if AVAILABLE else None
