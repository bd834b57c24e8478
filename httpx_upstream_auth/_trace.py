"""The one place the manager reports what it does: structured events to stdlib logging and to user hooks.

In the spirit of httpcore's ``_trace.py``: the code that refreshes, replays or hears a change calls
:meth:`Tracer.emit` with an event name and a few fields; the tracer decides who hears it. Events are only
emitted off the hot path (a cache hit emits nothing), never while one of the manager's locks is held, and
cost one check when nobody listens. Token material never leaves here except through ``on_refresh``: events
carry a short hash of a token (:func:`short_hash`), never the token.

Loggers (see docs/design.md, "Events"): ``httpx_upstream_auth.events`` at DEBUG (refresh started, refresh
ahead started, change notice), INFO (refresh succeeded, 401 replayed) and WARNING (refresh failed,
distrust, failure remembered, store error); a hook that raises is logged on it at ERROR.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._models import EntryKey, UpstreamTokens

__all__ = ["EVENT_LEVELS", "JobTrace", "TraceEvent", "Tracer", "event_logger", "short_hash"]

event_logger = logging.getLogger("httpx_upstream_auth.events")

#: Every event name and the level it is logged at.
EVENT_LEVELS: Mapping[str, int] = {
    "refresh.started": logging.DEBUG,
    "refresh.succeeded": logging.INFO,
    "refresh.failed": logging.WARNING,
    "refresh_ahead.started": logging.DEBUG,
    "replayed": logging.INFO,
    "distrusted": logging.WARNING,
    "dpop.proof_refused": logging.WARNING,
    "failure.remembered": logging.WARNING,
    "store.error": logging.WARNING,
    "change.notice": logging.DEBUG,
    "lease.waited": logging.DEBUG,
}


def short_hash(secret: str) -> str:
    """The first 8 hex digits of the secret's SHA-256: enough to tell tokens apart in logs, useless to an attacker."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:8]


@attrs.frozen
class TraceEvent:
    """One thing the manager did, as ``on_event`` receives it.

    ``name`` is one of: ``refresh.started`` (``reason``: ``expired``, ``rejected`` or ``ahead``),
    ``refresh.succeeded`` (``duration``, ``waiters``, ``retries``, ``version``, ``access_token_hash``),
    ``refresh.failed`` (``error``, ``retryable``, ``duration``, ``waiters``, ``retries``, ``served_stale``),
    ``refresh_ahead.started``, ``replayed`` (a 401 replayed with a newer token), ``distrusted`` (refused again
    right after its refresh), ``failure.remembered`` (``error``, ``window``), ``store.error`` (``operation``,
    ``error``), ``change.notice`` (another worker changed an entry this manager had in use; ``session`` is
    ``None`` when the notice named no entry, so every session in use was dropped).
    ``session`` is the session's storage digest (12 hex digits; a session id may be a secret),
    ``session_id`` the id itself (``None`` for a change notice, which names entries by digest only);
    durations are seconds.
    """

    name: str
    provider_id: str
    session: str | None
    session_id: str | None = attrs.field(repr=False)
    fields: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.define
class JobTrace:
    """What one refresh job did, filled in as it goes (read when it publishes its outcome)."""

    started: float
    reason: str = ""
    retries: int = 0
    redeemed: bool = False
    error: BaseException | None = None


#: The running job's trace (each job runs in a thread or task of its own, so in a context of its own).
current_job: contextvars.ContextVar[JobTrace | None] = contextvars.ContextVar("httpx_upstream_auth_job", default=None)


class Tracer:
    """Hands events to the loggers and the user's hooks, or drops them at once when nobody listens."""

    __slots__ = ("_otel_events", "on_event", "on_refresh", "otel", "provider_id")

    def __init__(
        self,
        provider_id: str,
        on_event: Callable[[TraceEvent], None] | None = None,
        on_refresh: Callable[[str, UpstreamTokens], None] | None = None,
    ) -> None:
        from ._otel import OTEL_EVENTS, otel_sink

        self.provider_id = provider_id
        self.on_event = on_event
        self.on_refresh = on_refresh
        #: OpenTelemetry spans and metrics, when opentelemetry-api is installed; the events it records.
        self.otel = otel_sink()
        self._otel_events = OTEL_EVENTS if self.otel is not None else frozenset()

    def listening(self, name: str) -> bool:
        """True when an event called ``name`` would reach anyone (checked before building its fields)."""
        return self.on_event is not None or name in self._otel_events or event_logger.isEnabledFor(EVENT_LEVELS[name])

    def emit(self, name: str, key: EntryKey | None, **fields: Any) -> None:
        """Report ``name`` about ``key``'s session (``None``: no one session) to whoever listens."""
        level = EVENT_LEVELS[name]
        hook = self.on_event
        if hook is None and name not in self._otel_events and not event_logger.isEnabledFor(level):
            return
        event = TraceEvent(
            name=name,
            provider_id=self.provider_id,
            session=None if key is None else key.digest[:12],
            session_id=None if key is None else key.session_id,
            fields=fields,
        )
        if event_logger.isEnabledFor(level):
            shown = " ".join(f"{k}={v}" for k, v in fields.items())
            event_logger.log(level, "%s %s:%s %s", name, self.provider_id, event.session, shown)
        if hook is not None:
            self._call(hook, event)
        if self.otel is not None and name in self._otel_events:
            self._call(self.otel, event)

    def refreshed(self, key: EntryKey, tokens: UpstreamTokens) -> None:
        """Hand a successful refresh's tokens to ``on_refresh`` (an app mirroring them elsewhere)."""
        hook = self.on_refresh
        if hook is not None:
            self._call(hook, key.session_id, tokens)

    @staticmethod
    def _call(hook: Callable[..., object], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            # A hook is the app's code: its failure is reported, never allowed to fail a refresh or a request.
            event_logger.exception("an httpx_upstream_auth hook (%r) raised; ignored", hook)
