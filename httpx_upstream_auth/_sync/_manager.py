# Generated from _async by tests/unasync_twins.py: do not edit.
"""The sync (blocking) half of TokenManager: the fast path, single flight, and the refresh job.

Callers only wait. A refresh is a job the manager owns (``run_flight``): it re-reads the entry, takes
the storage lease, redeems the refresh token, and saves the result or removes the entry, then
publishes its outcome to every waiter. It runs in a worker thread (or a task no caller awaits), so no
caller's cancellation, timeout or exit reaches it once the refresh request may have left the process.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator
from typing import Literal, TypeVar

import attrs

from .._core import ManagerCore, Requirement, logger
from .._exceptions import (
    BindingMismatch,
    ConfigurationError,
    EntryRefused,
    ReauthenticationRequired,
    RefreshFailed,
    StorageError,
    UpstreamAuthError,
)
from .._logout import Logout
from .._models import Binding, EntryKey, UpstreamTokens
from .._refresher import Refresher
from .._synchronization import (
    SyncCall,
    SyncDeadline,
    SyncLeaseKeeper,
    SyncStoreCalls,
    Flight,
    Outcome,
    SameThreadWait,
    TimedOut,
    sync_call_bounded,
    sync_lead,
    sync_sleep,
    copy_error,
    start_sync_job,
)
from .._trace import JobTrace, current_job, short_hash

T = TypeVar("T")

#: Flights a caller joins before giving up (each one ends with a write or an error, so this is generous).
MAX_FLIGHTS = 8
#: Refreshes in flight in one manager above which no refresh starts ahead of expiry: sessions whose windows open
#: together (a fleet logged in at once) must not start hundreds of threads and token requests at one moment. A
#: session over the bound keeps its valid token and starts its refresh on a later request, or, once inside the
#: leeway, refreshes as it would without refresh-ahead.
MAX_AHEAD_FLIGHTS = 16
#: The error for a refresher without the half a job calls: ``refresh`` in worker threads, ``arefresh`` in tasks.
HALF_MISSING = {
    "refresh": "the refresher does not implement refresh() for worker threads; implement it, or use "
    "TokenManager(redeem_in='task') with an async-only refresher",
    "refresh": "the refresher does not implement arefresh() for task jobs; implement it, or use "
    "TokenManager(redeem_in='thread') (the default) with a sync-only refresher",
}
#: A new login's version starts at the wall clock in microseconds, above every version the session
#: had before (one refresh adds 1): a refresh redeemed from an older login can never match it.
VERSION_CLOCK_SCALE = 1_000_000
#: First and longest pause between attempts to write while the store is failing (seconds).
RETRY_PAUSE = (0.05, 1.0)
#: Token requests retried after a refusal that consumed nothing, and the backoff's base and cap (seconds).
MAX_RETRIES = 3
RETRY_BACKOFF = (0.25, 2.0)
#: How a fail-closed error message ends, by whether the store confirmed it no longer holds the entry.
REMOVED = "the entry was removed, so the consumed refresh token is never presented again"
NOT_REMOVED = (
    "the store did not confirm removing the entry: this process never presents that refresh token again (and "
    "removes the entry when it next finds it), but other processes sharing the store may until then"
)


class SyncCoordinator:
    """The I/O half of a manager for sync (blocking) callers: reads the store, coordinates the single-flight refresh (one
    job per key, waiters on its outcome) and runs the job. It is generated from the async one."""

    def __init__(self, core: ManagerCore) -> None:
        self._core = core
        # Bound once: the hot path hands it to the cache without building a method object per request.
        self._ahead = self._refresh_ahead

    def get_token(self, session_id: str, expect: Binding | None = None) -> UpstreamTokens:
        """A fresh entry for the session, refreshed (once, across all callers) when needed."""
        state = self._core
        tokens = state.cached(session_id, self._ahead)
        if tokens is None:
            key = state.key(session_id)
            tokens = self._shared_read(key)
            state.check_binding(tokens, expect)
            if not state.is_fresh(tokens) and not self._serves_stale(key, Requirement(), tokens):
                tokens = self._refreshed(key, Requirement())
        state.check_binding(tokens, expect)
        return tokens

    def refresh_rejected(
        self, session_id: str, rejected: str, expect: Binding | None = None
    ) -> UpstreamTokens | None:
        """The entry to retry with after the API refused ``rejected``: the stored one if it differs
        (someone refreshed meanwhile) and is fresh, else a new one from a single-flight refresh.
        When ``rejected`` was refused right after its own refresh, only a stored token that differs is
        returned (another refresh would not help), else ``None``."""
        state = self._core
        key = state.key(session_id)
        state.forget(key, rejected)
        need = Requirement(rejected)
        tokens = self._shared_read(key)
        state.check_binding(tokens, expect)  # before anything is sent, the token request included
        if state.is_distrusted(session_id, rejected):
            # Refreshing again would not help; only a token another worker saved meanwhile might.
            return tokens if self._usable(need, tokens) else None
        if not need.satisfied_by(tokens, state):
            tokens = self._refreshed(key, need)
            state.check_binding(tokens, expect)
        return tokens

    def refresh(self, session_id: str, expect: Binding | None = None) -> UpstreamTokens:
        """New tokens now, though the stored ones may still be valid, through the single flight and the lease as
        any refresh; a token another worker stored meanwhile (not the one this call found) is the answer too."""
        state = self._core
        key = state.key(session_id)
        current = self._shared_read(key)
        state.check_binding(current, expect)  # before anything is sent
        state.forget(key, current.access_token)
        tokens = self._refreshed(key, Requirement(current.access_token))
        state.check_binding(tokens, expect)
        return tokens

    def distrust(self, session_id: str, tokens: UpstreamTokens) -> None:
        """The API refused ``tokens`` on the replay right after their refresh."""
        state = self._core
        state.distrust(session_id, tokens)
        state.tracer.emit("distrusted", state.key(session_id), access_token_hash=short_hash(tokens.access_token))

    def replayed(self, session_id: str, tokens: UpstreamTokens) -> None:
        """A request the API refused is being sent again with ``tokens``."""
        state = self._core
        state.tracer.emit("replayed", state.key(session_id), access_token_hash=short_hash(tokens.access_token))

    def proof_refused(self, session_id: str, origin: str, *, redirected: bool) -> None:
        """The API at ``origin`` refused a DPoP proof (``redirected``: on a hop of a redirect the client followed)."""
        state = self._core
        state.tracer.emit("dpop.proof_refused", state.key(session_id), origin=origin, redirected=redirected)

    def accepted(self, session_id: str, access_token: str) -> None:
        """The API accepted ``access_token``: it is trusted again if it was not."""
        self._core.trust(session_id, access_token)

    def store(self, session_id: str, tokens: UpstreamTokens) -> UpstreamTokens:
        """Write a new entry for the session (after a login), above any version it ever had."""
        state = self._core
        key = state.key(session_id)
        if tokens.provider_id is None:
            tokens = attrs.evolve(tokens, provider_id=state.provider_id)
        state.check_binding(tokens, None)
        now = state.clock.time()
        if tokens.issued_at is None and tokens.expires_at is not None:
            # The true lifetime is unknown; from now is a lower bound, so the leeway stays small enough.
            tokens = attrs.evolve(tokens, issued_at=min(now, tokens.expires_at))
        floor = int(now * VERSION_CLOCK_SCALE)
        for _ in range(MAX_FLIGHTS):
            try:
                current = state.storage.get(key)
                expected = None if current is None else current.version
            except EntryRefused as exc:
                # An entry the store cannot open (sealed by a key not configured, moved, tampered with): the
                # login's tokens replace it, over the version it has.
                expected = exc.version
            version = max(floor, tokens.version + 1, 1 if expected is None else expected + 1)
            entry = attrs.evolve(tokens, version=version)
            with state.writing(key):
                saved = state.storage.put(key, entry, expected_version=expected)
            if saved:
                state.new_epoch(key)
                state.remember(key, entry, state.epoch(key))
                return entry
        raise StorageError("the entry kept changing while storing it; retry the store")

    def delete(self, session_id: str) -> bool:
        """Remove the session's entry (logout). True when there was one."""
        state = self._core
        key = state.key(session_id)
        state.new_epoch(key)
        try:
            return state.storage.delete(key)
        finally:
            state.new_epoch(key)  # a read that raced the delete must not cache the deleted entry

    def logout(self, session_id: str, timeout: float) -> Logout:
        """Remove the session's entry, then revoke the refresh token it held at the provider (RFC 7009), waiting
        at most ``timeout`` seconds for that; a provider's failure is reported in the result, never raised."""
        state = self._core
        key = state.key(session_id)
        state.new_epoch(key)
        try:
            deleted, held = self._remove(key)
        finally:
            state.new_epoch(key)  # a read that raced the delete must not cache the deleted entry
        if not isinstance(held, UpstreamTokens):
            return Logout(deleted=deleted, revoked=False, reason=held)
        if held.refresh_token is None:
            return Logout(deleted=deleted, revoked=False, reason="no_refresh_token")
        try:
            done = sync_call_bounded(timeout, state.refresher.revoke, held, state.clock)
        except RefreshFailed as exc:
            refused = exc.status_code is not None
            logger.debug("logout of %s: revocation %s", key, "refused" if refused else "failed")
            return Logout(
                deleted=deleted,
                revoked=False,
                reason="refused" if refused else "failed",
                status_code=exc.status_code,
                error=type(exc).__name__,
            )
        except Exception as exc:  # a custom refresher's failure: the logout stands all the same
            return Logout(deleted=deleted, revoked=False, reason="failed", error=type(exc).__name__)
        if done is TimedOut:
            return Logout(deleted=deleted, revoked=False, reason="timed_out")
        return Logout(deleted=deleted, revoked=done, reason="revoked" if done else "not_configured")

    def _remove(self, key: EntryKey) -> tuple[bool, UpstreamTokens | Literal["no_entry", "entry_refused"]]:
        """Delete the entry; return whether there was one, and what it held (the version read is the version
        removed, so the refresh token to revoke is the one removed, not one a refresh replaced meanwhile)."""
        state = self._core
        for _ in range(3):
            try:
                current = state.storage.get(key)
            except EntryRefused:
                return state.storage.delete(key), "entry_refused"
            if current is None:
                return state.storage.delete(key), "no_entry"
            if state.storage.delete(key, expected_version=current.version):
                return True, current
        # Refreshes kept landing between the read and the delete: remove whatever is there now.
        return state.storage.delete(key), "no_entry"

    # -- waiting ---------------------------------------------------------------------------------------
    def _shared_read(self, key: EntryKey) -> UpstreamTokens:
        """Read the entry once for every concurrent caller of this process (a cold herd is one read)."""
        state = self._core
        for _ in range(MAX_FLIGHTS):
            flight, leading = state.join_flight(key, reads=True)
            read_here = False
            if leading:
                sync_lead(flight)  # a read whose event loop was closed under it is not waited for
                outcome = Outcome()
                try:
                    tokens = self._read(key)
                    outcome = Outcome(tokens=tokens)
                    if state.is_fresh(tokens):
                        # Cached while the read is still in progress, so its session is in use throughout
                        # and a change notice arriving now is heard.
                        state.remember(key, tokens, flight.epoch)
                except UpstreamAuthError as exc:
                    outcome = Outcome(error=exc)
                finally:
                    state.end_flight(key, flight, outcome, reads=True)
            else:
                try:
                    found = flight.outcome(state.wait_timeout)
                except SameThreadWait:  # pragma: no cover (only the generated twin's blocking wait raises it)
                    found = None  # a blocking call under the reading task's own loop: read directly
                outcome = Outcome(tokens=self._read(key)) if found is None else found
                read_here = found is None
            if outcome.abandoned or state.epoch(key) != flight.epoch:
                continue  # its reader was cancelled, or a logout/login raced it: read again
            tokens = outcome.unwrap()
            if read_here and state.is_fresh(tokens):
                # Not by the flight's reader, which cached what it read (with this epoch) before publishing it.
                state.remember(key, tokens, flight.epoch)
            return tokens
        raise StorageError("the entry kept changing while reading it; retry the request")

    def _refreshed(self, key: EntryKey, need: Requirement) -> UpstreamTokens:
        """Wait for the key's refresh job (starting one if none runs) until it yields what ``need`` asks."""
        state = self._core
        remembered = state.remembered_failure(key)
        if remembered is not None:
            # A refresh failed moments ago without consuming anything: the same request now would fail the same
            # way, so every caller gets (its own copy of) that error at once, with no token request.
            raise copy_error(remembered)
        deadline = state.clock.monotonic() + state.wait_timeout
        born_expired = 0
        for _ in range(MAX_FLIGHTS):
            flight, new = state.join_flight(key)
            if new:
                self._launch(key, need, flight)
            outcome = flight.outcome(max(deadline - state.clock.monotonic(), 0.0))
            if outcome is None:
                raise RefreshFailed(
                    "the refresh is still in progress (a slow token endpoint, or another worker holds the "
                    "lease); it will finish on its own. Retry the request.",
                    retryable=True,
                )
            if outcome.abandoned or state.epoch(key) != flight.epoch:
                continue  # the job was stopped, or a logout/login happened since it began
            tokens = outcome.unwrap()
            if need.accepts(outcome, state):
                return tokens
            if outcome.refreshed:
                # Minted already expired. Once is an answer that rotated the refresh token without a usable
                # access token (the next flight redeems the new one); again is a refresher that keeps doing it.
                born_expired += 1
                if born_expired >= 2:
                    raise RefreshFailed(
                        "the token endpoint keeps issuing access tokens that are already expired (a zero or "
                        "negative lifetime from a custom refresher?); retry later, or check the refresher.",
                        retryable=True,
                    )
        raise RefreshFailed("the token kept changing during the refresh; retry the request", retryable=True)

    def _refresh_ahead(self, session_id: str, tokens: UpstreamTokens) -> None:
        """The cached entry is inside its refresh-ahead window: start the session's refresh job in the
        background unless one runs (or refreshing cannot work now); the caller goes on with ``tokens``."""
        state = self._core
        key = state.key(session_id)
        refresh_token = tokens.refresh_token
        if (
            state.closing
            or refresh_token is None
            or state.backing_off(key)
            or state.remembered_failure(key) is not None
            or state.is_consumed(key, refresh_token)
            or state.flights_in_progress() >= MAX_AHEAD_FLIGHTS
        ):
            return
        try:
            flight, new = state.join_flight(key)
        except RefreshFailed:
            return  # closed meanwhile: no job starts, and the token is still valid
        if new:
            self._launch(key, Requirement(ahead_of=tokens.version), flight)
            state.tracer.emit("refresh_ahead.started", key, version=tokens.version)

    def _launch(self, key: EntryKey, need: Requirement, flight: Flight) -> None:
        state = self._core

        def thread_job() -> None:
            state.thread_job(key, need, flight)

        def task_job() -> None:
            self.run_flight(key, need, flight)

        try:
            start_sync_job(flight, thread_job, task_job, in_task=state.redeem_in == "task")
        except RuntimeError as exc:  # no thread could be started (resource limits, interpreter shutdown)
            failure = RefreshFailed(f"could not start the refresh ({exc}); retry the request", retryable=True)
            state.end_flight(key, flight, Outcome(error=failure))

    # -- the refresh job ---------------------------------------------------------------------------
    def run_flight(self, key: EntryKey, need: Requirement, flight: Flight) -> None:
        """The job: lead the key's refresh and publish its outcome, whatever happens to the callers."""
        state = self._core
        outcome = Outcome()
        job = JobTrace(started=state.clock.monotonic())
        marked = current_job.set(job)
        waiters = 0
        # Every storage call after the token request goes through this, bounded (and, in a thread job, on a
        # worker thread started before the request).
        calls = SyncStoreCalls(2 * state.refresh_timeout + state.lease_ttl)
        try:
            outcome = self._lead(key, need, flight.epoch, calls)
        except UpstreamAuthError as exc:
            outcome = Outcome(error=exc)
        except Exception as exc:  # a bug in a custom storage: say so, typed, without its text
            logger.debug("refresh of %s: unexpected %s", key, type(exc).__name__)
            state.tracer.emit("store.error", key, operation="refresh", error=type(exc).__name__)
            outcome = Outcome(
                error=RefreshFailed(
                    f"the refresh failed with {type(exc).__name__} from the storage; retry the request",
                    retryable=True,
                )
            )
        finally:
            waiters = flight.waiting
            calls.close()
            state.end_flight(key, flight, outcome)
            with contextlib.suppress(ValueError):  # closed from another context (see ManagerCore.writing)
                current_job.reset(marked)
        # After publishing: the waiters have their tokens, and no lock or lease is held while hooks run.
        self._report(key, job, outcome, waiters)

    def _report(self, key: EntryKey, job: JobTrace, outcome: Outcome, waiters: int) -> None:
        """Tell the tracer how the job ended: a refresh that succeeded or failed (nothing if none was needed)."""
        state = self._core
        duration = state.clock.monotonic() - job.started
        tokens = outcome.tokens
        if outcome.refreshed and tokens is not None:
            state.tracer.emit(
                "refresh.succeeded",
                key,
                reason=job.reason,
                duration=duration,
                waiters=waiters,
                retries=job.retries,
                version=tokens.version,
                access_token_hash=short_hash(tokens.access_token),
            )
            state.tracer.refreshed(key, tokens)
            return
        error = outcome.error if outcome.error is not None else job.error
        if error is not None:
            state.tracer.emit(
                "refresh.failed",
                key,
                reason=job.reason,
                error=type(error).__name__,
                retryable=getattr(error, "retryable", False),
                duration=duration,
                waiters=waiters,
                retries=job.retries,
                served_stale=outcome.error is None,
            )

    def _lead(self, key: EntryKey, need: Requirement, epoch: int, calls: SyncStoreCalls) -> Outcome:
        state = self._core
        give_up = state.clock.monotonic() + state.lease_wait
        announced = False  # refresh.started reported
        prepared = False
        while True:
            # Re-read first: another task, thread or process may have refreshed already.
            current = self._read(key)
            early = self._early_answer_or_discard(key, need, current, epoch, calls)
            if early is not None:
                return early
            if not prepared:
                fallback = self._prepare(key, need, current, epoch)
                if fallback is not None:
                    return fallback
                prepared = True
            lease = state.storage.acquire_lease(key, state.lease_ttl)
            if lease is None:
                left = give_up - state.clock.monotonic()
                if left <= 0 or state.closing:
                    if self._usable(need, current):
                        return Outcome(tokens=current, fallback=True)
                    raise RefreshFailed(
                        "another worker holds the refresh lease and has not finished; retry the request",
                        retryable=True,
                    )
                logger.debug("refresh of %s: waiting for another worker's lease", key)
                state.tracer.emit("lease.waited", key)
                state.storage.watch(key, current.version, min(left, 1.0))
                continue
            try:
                # The lease is renewed for as long as the job may still save or remove what it redeemed
                # (the token request, then its writes, each bounded by refresh_timeout), never longer.
                renew = functools.partial(state.storage.renew_lease, lease)
                with SyncLeaseKeeper(renew, state.lease_ttl, 2 * state.refresh_timeout + state.lease_ttl):
                    # Re-read under the lease: the previous holder may have saved just before releasing.
                    current = self._read(key)
                    early = self._early_answer_or_discard(key, need, current, epoch, calls)
                    if early is not None:
                        return early
                    if state.closing:
                        raise RefreshFailed(
                            "the TokenManager was closed before the refresh was sent; nothing was sent.",
                            retryable=False,
                        )
                    if not announced:
                        # Before the last lease check, not after it: the event's hooks run here, in the job,
                        # and one that takes long is then covered by that check like a slow read.
                        announced = True
                        state.tracer.emit("refresh.started", key, reason=_reason(need), version=current.version)
                    # The reads may have been slow: make sure the lease is still ours, for a full ttl, at the
                    # moment the refresh token leaves; the keeper renews it from then on. A renewal runs its
                    # ttl from when the store applied it, no earlier than we asked: one whose answer took
                    # longer than the ttl proves nothing about now (the lease may have lapsed meanwhile).
                    asked = state.clock.monotonic()
                    renewed = state.storage.renew_lease(lease)
                    if renewed is False or state.clock.monotonic() - asked >= state.lease_ttl:
                        logger.debug("refresh of %s: lease lost before sending; starting over", key)
                        if state.clock.monotonic() > give_up:
                            raise RefreshFailed(
                                "the refresh lease kept running out before the refresh could start (a slow "
                                "store?); retry the request",
                                retryable=True,
                            )
                        continue
                    return self._redeem(key, need, current, epoch, calls)
            except GeneratorExit:
                lease = None  # collected with its closed loop: nothing can be awaited; the lease expires
                raise
            finally:
                if lease is not None:
                    try:
                        self._bounded(calls, functools.partial(state.storage.release_lease, lease))
                    except StorageError:
                        logger.debug("refresh of %s: lease release failed or hung; it expires", key)

    def _prepare(self, key: EntryKey, need: Requirement, current: UpstreamTokens, epoch: int) -> Outcome | None:
        """The refresher's work before its token request (discovery, for one), outside the lease and the bounded
        token request: it sends no refresh token, so a failure or a timeout here leaves the entry as it is. As
        after a refusal that consumed nothing, a still-valid token is served, and the failure is remembered."""
        state = self._core
        refresher = state.refresher
        if type(refresher).prepare is Refresher.prepare:
            return None  # nothing to prepare: no call, no thread
        try:
            done = sync_call_bounded(state.refresh_timeout, refresher.prepare, current)
            if done is not TimedOut:
                return None
            failure = RefreshFailed(
                "the refresher's preparation (such as discovering the token endpoint) did not finish in time; no "
                "token request was sent. Retry the request.",
                retryable=True,
            )
        except RefreshFailed as exc:
            failure = exc
        except UpstreamAuthError:
            raise
        except Exception as exc:
            failure = RefreshFailed(
                f"the refresher's preparation failed ({type(exc).__name__}); no token request was sent",
                retryable=False,
            )
        if isinstance(failure, ConfigurationError):
            state.remember_failure(key, failure, epoch)  # every session's refresh would fail the same way
        if self._usable(need, current):
            state.back_off(key)
            return Outcome(tokens=current, fallback=True)
        state.remember_failure(key, failure, epoch)
        raise failure

    def _early_answer_or_discard(
        self, key: EntryKey, need: Requirement, current: UpstreamTokens, epoch: int, calls: SyncStoreCalls
    ) -> Outcome | None:
        """:meth:`_early_answer`; when it is that the stored token's answer was lost and the store would not
        remove the entry then, remove it now (compare-and-set on its version, so no lease is needed)."""
        state = self._core
        try:
            return self._early_answer(key, need, current, epoch)
        except ReauthenticationRequired:
            if current.refresh_token is not None and state.is_lost(current.refresh_token):
                self._discard(key, current, state.clock.monotonic() + state.refresh_timeout, calls)
            raise

    def _early_answer(self, key: EntryKey, need: Requirement, current: UpstreamTokens, epoch: int) -> Outcome | None:
        """The outcome without a refresh, when the entry already serves; raise when it cannot be refreshed."""
        state = self._core
        if need.satisfied_by(current, state):
            state.remember(key, current, epoch)
            return Outcome(tokens=current)
        if self._serves_stale(key, need, current):
            return Outcome(tokens=current, fallback=True)
        if current.refresh_token is None:
            raise ReauthenticationRequired(
                "the access token is no longer valid and no refresh token is stored; log the user in again."
            )
        if state.is_consumed(key, current.refresh_token):
            raise ReauthenticationRequired(
                "this process already presented the stored refresh token and could not record the answer, "
                "so the provider may have consumed it; it is never presented again. Log the user in again."
            )
        return None

    def _usable(self, need: Requirement, tokens: UpstreamTokens) -> bool:
        return tokens.access_token != need.rejected and self._core.is_valid(tokens)

    def _serves_stale(self, key: EntryKey, need: Requirement, tokens: UpstreamTokens) -> bool:
        """True when a token inside its leeway is sent as it is: it is still valid, and refreshing it
        cannot work now (no refresh token, one already presented) or just failed harmlessly."""
        state = self._core
        if not self._usable(need, tokens):
            return False
        refresh_token = tokens.refresh_token
        return (
            refresh_token is None
            or state.is_consumed(key, refresh_token)
            or state.backing_off(key)
            or state.remembered_failure(key) is not None
        )

    def _redeem(
        self, key: EntryKey, need: Requirement, current: UpstreamTokens, epoch: int, calls: SyncStoreCalls
    ) -> Outcome:
        state = self._core
        assert current.refresh_token is not None
        logger.debug("refresh of %s: redeeming version %d", key, current.version)
        # What the writes after the request need is acquired now: a process that cannot provide it sends nothing.
        calls.prepare()
        job = _this_job()
        job.redeemed = True
        job.reason = _reason(need)
        # From here on the provider may consume the refresh token: never present it again from this
        # process unless we learn it was not consumed.
        state.mark_consumed(current.refresh_token)
        try:
            return self._redeem_marked(key, need, current, epoch, calls)
        except Exception:
            raise  # each failure below already saved, removed or kept the entry as it should
        except GeneratorExit:
            # A task of a loop that was closed without running it, collected: nothing can be awaited any
            # more. This process never presents the token again; the lease expires on its own.
            state.lose_consumed(current)
            raise
        except BaseException:
            # Stopped for good (the event loop is ending, the interpreter is exiting) after the request may
            # have left: fail closed while we still can, so no other process presents the token again.
            with SyncDeadline(state.refresh_timeout, shield=True):
                self._discard(key, current, state.clock.monotonic() + state.refresh_timeout, calls)
            raise

    def _redeem_marked(
        self, key: EntryKey, need: Requirement, current: UpstreamTokens, epoch: int, calls: SyncStoreCalls
    ) -> Outcome:
        state = self._core
        assert current.refresh_token is not None
        # Whatever happens to the token request, the writes that follow get refresh_timeout of their own.
        try:
            fresh = self._answer(need, current)
        except ReauthenticationRequired:
            # invalid_grant may mean another worker rotated first: use its tokens if so.
            again = self._bounded(calls, functools.partial(state.storage.get, key))
            if again is None or again.version == current.version:
                state.refuse(key, current.refresh_token)  # the provider calls it dead: never present it again
                raise
            state.settle_consumed(current.refresh_token)
            return Outcome(tokens=again)
        except RefreshFailed as exc:
            if exc.may_have_rotated:
                removed = self._discard(key, current, state.clock.monotonic() + state.refresh_timeout, calls)
                raise ReauthenticationRequired(
                    "the token endpoint's answer was lost or unusable after it may have rotated the refresh "
                    f"token; {REMOVED if removed else NOT_REMOVED}. Log the user in again. What happened: {exc}"
                ) from None
            state.settle_consumed(current.refresh_token)
            _this_job().error = exc
            if isinstance(exc, ConfigurationError):
                state.remember_failure(key, exc, epoch)  # every session's refresh would fail the same way
            if self._usable(need, current):
                # The provider had a blip and the stored token is still valid: serve it, try again later (not
                # before the provider's Retry-After).
                state.back_off(key, exc.retry_after)
                return Outcome(tokens=current, fallback=True)
            state.remember_failure(key, exc, epoch)
            raise
        except BindingMismatch:
            removed = self._discard(key, current, state.clock.monotonic() + state.refresh_timeout, calls)
            raise BindingMismatch(
                "the provider returned an id_token for another subject than the stored entry; the new tokens "
                f"were refused and the refresh token was consumed: {REMOVED if removed else NOT_REMOVED}. Log "
                "the user in again."
            ) from None
        except NotImplementedError:
            # A refresher without this (sync or async) half sent nothing.
            state.settle_consumed(current.refresh_token)
            # arefresh here, refresh in the generated sync twin: the half this job called
            raise RefreshFailed(HALF_MISSING[Refresher.refresh.__name__], retryable=False) from None
        except Exception as exc:
            # A custom refresher failed in a way that does not say whether the request left: assume it did.
            removed = self._discard(key, current, state.clock.monotonic() + state.refresh_timeout, calls)
            raise RefreshFailed(
                f"the refresher failed ({type(exc).__name__}), so the refresh token may have been consumed; "
                f"{REMOVED if removed else NOT_REMOVED}. Raise RefreshFailed(may_have_rotated=False) from a custom "
                "refresher for failures that certainly did not reach the provider. Log the user in again.",
                retryable=False,
            ) from None
        if fresh.refresh_token == current.refresh_token:
            state.settle_consumed(current.refresh_token)  # not rotated: it stays valid
        return self._save(
            key, need, current, fresh, epoch, state.clock.monotonic() + state.refresh_timeout, calls
        )

    def _answer(self, need: Requirement, current: UpstreamTokens) -> UpstreamTokens:
        """The refresher's answer as the next entry, within refresh_timeout; a refusal that proves nothing was
        consumed (the provider's own 5xx/429/408 error answer, a connection that never opened) is retried
        with the same refresh token when no valid token could be served instead. An answer lost after the
        provider may have redeemed the token is retried once, within ``reuse_grace`` of sending it."""
        state = self._core
        give_up = state.clock.monotonic() + state.refresh_timeout
        graced = False
        for attempt in itertools.count():
            sent = state.clock.monotonic()
            left = give_up - sent
            try:
                answer = sync_call_bounded(left, state.refresher.refresh, current, state.clock)
            except RefreshFailed as exc:
                if graced and not exc.may_have_rotated:
                    # The first answer was lost: whatever the retry's refusal says, the token may be consumed,
                    # so it is never presented again (not even for a transient refusal), and the job fails closed.
                    raise RefreshFailed(
                        f"the token endpoint's answer was lost, and the retry within reuse_grace was refused ({exc}); "
                        "the provider may have rotated the refresh token.",
                        retryable=True,
                        status_code=exc.status_code,
                        may_have_rotated=True,
                    ) from None
                if not graced and self._within_grace(exc, sent, give_up):
                    # The provider honours the token it may have just redeemed for reuse_grace seconds (Okta,
                    # Auth0, Keycloak, Hydra): this job, still holding the lease, presents it once more instead
                    # of failing closed. No other job or process ever presents it (it is marked consumed).
                    graced = True
                    _this_job().retries += 1
                    logger.debug("refresh: the answer was lost; presenting the refresh token again within reuse_grace")
                    continue
                pause = self._transient_pause(exc, attempt, need, current, give_up)
                if pause is None:
                    raise
                _this_job().retries += 1
                logger.debug("refresh: HTTP %s, trying again in %.2fs", exc.status_code, pause)
                sync_sleep(pause)
                continue
            if answer is TimedOut:
                raise RefreshFailed("the token endpoint did not answer in time", retryable=True, may_have_rotated=True)
            return self._checked(answer, current)
        raise AssertionError("unreachable")  # pragma: no cover

    def _within_grace(self, exc: RefreshFailed, sent: float, give_up: float) -> bool:
        """True when ``exc`` says the answer was lost after the provider may have redeemed the token (timeout
        after sending, connection reset, a gateway's 5xx, an unreadable 200) and the same token may still be
        presented: with time left in the job's refresh_timeout, and sure to reach the provider within
        ``reuse_grace`` of the first request (the retry may take as long as the job lets it to arrive, and the
        provider's grace runs from when it redeemed, no earlier than when the first request was sent)."""
        state = self._core
        now = state.clock.monotonic()
        if not (exc.may_have_rotated and exc.retryable) or now >= give_up:
            return False
        travel = min(give_up - now, getattr(state.refresher, "timeout", state.refresh_timeout))
        return now + travel - sent < state.reuse_grace

    def _transient_pause(
        self, exc: RefreshFailed, attempt: int, need: Requirement, current: UpstreamTokens, give_up: float
    ) -> float | None:
        """How long to wait before trying again after ``exc``, or ``None`` to give up now.

        Only refusals that consumed nothing are retried, at most MAX_RETRIES times, with exponential backoff
        and full jitter (so a fleet does not retry in step), never sooner than the provider's Retry-After,
        and only while the attempt after the pause keeps at least half of refresh_timeout. A still-valid
        token is served instead (and the refresh retried after retry_interval)."""
        state = self._core
        if exc.may_have_rotated or not exc.retryable or attempt >= MAX_RETRIES or self._usable(need, current):
            return None
        pause = state.jitter.uniform(0, min(RETRY_BACKOFF[1], RETRY_BACKOFF[0] * 2**attempt))
        if exc.retry_after is not None:
            pause = max(pause, exc.retry_after)
        if give_up - state.clock.monotonic() - pause < state.refresh_timeout / 2:
            return None
        return pause

    def _checked(self, answer: object, current: UpstreamTokens) -> UpstreamTokens:
        """The refresher's answer as the next entry: binding fields and version from the entry it redeemed."""
        if not isinstance(answer, UpstreamTokens) or not isinstance(answer.access_token, str):
            raise TypeError(f"the refresher returned {type(answer).__name__}, not UpstreamTokens")
        return attrs.evolve(
            answer,
            provider_id=current.provider_id,
            user_id=current.user_id,
            upstream_subject=current.upstream_subject,
            client_id=current.client_id,
            # The issuer that issued the grant issued its refresh too (a refresher may name it on entries
            # that did not record it yet).
            issuer=current.issuer if current.issuer is not None else answer.issuer,
            version=current.version + 1,
        )

    def _retry_pauses(self, give_up: float) -> Iterator[float]:
        """Pauses between writes while the store fails, doubling, until ``give_up`` (monotonic): the lease is
        renewed until then, so nobody else can redeem, and a store that comes back in time loses nothing."""
        state = self._core
        pause, longest = RETRY_PAUSE
        while (left := give_up - state.clock.monotonic()) > 0:
            yield min(pause, left)
            pause = min(pause * 2, longest)

    def _save(
        self,
        key: EntryKey,
        need: Requirement,
        current: UpstreamTokens,
        fresh: UpstreamTokens,
        epoch: int,
        give_up: float,
        calls: SyncStoreCalls,
    ) -> Outcome:
        state = self._core
        assert current.refresh_token is not None
        rotated = fresh.refresh_token != current.refresh_token
        pauses = self._retry_pauses(give_up)
        while True:
            try:
                with state.writing(key):
                    put = functools.partial(state.storage.put, key, fresh, expected_version=current.version)
                    saved = bool(self._bounded(calls, put))
            except Exception as exc:
                saved = False
                state.tracer.emit("store.error", key, operation="put", error=type(exc).__name__)
            # Unless the store said it saved, look at what it holds: a write may land though it raised, and a
            # refusal only counts when someone else wrote (one over an unchanged entry is a failed write).
            landed = True if saved else self._landed(key, current, fresh, calls)
            if landed:
                state.settle_consumed(current.refresh_token)  # the store moved past it
                state.remember(key, fresh, epoch)
                return Outcome(tokens=fresh, refreshed=True)
            if landed is False:
                # Compare-and-set lost: a new login or a logout replaced the entry, which no longer holds
                # the redeemed token. Theirs wins.
                state.settle_consumed(current.refresh_token)
                theirs = self._bounded(calls, functools.partial(state.storage.get, key))
                return Outcome(tokens=self._present(theirs))
            pause = next(pauses, None)
            if pause is None or not rotated:
                break
            sync_sleep(pause)
        if not rotated:
            logger.debug("refresh of %s: save failed, the old refresh token stays valid", key)
            return Outcome(tokens=fresh, refreshed=True)
        removed = self._discard(key, current, give_up, calls)
        raise StorageError(
            "the provider rotated the refresh token but the new one could not be saved; "
            f"{REMOVED if removed else NOT_REMOVED}. Log the user in again."
        )

    def _landed(
        self, key: EntryKey, current: UpstreamTokens, fresh: UpstreamTokens, calls: SyncStoreCalls
    ) -> bool | None:
        """After a failed write: True if it landed anyway, False if someone else wrote, None if unknown."""
        try:
            again = self._bounded(calls, functools.partial(self._core.storage.get, key))
        except Exception:
            return None
        if again is not None and again.version == fresh.version and again.refresh_token == fresh.refresh_token:
            return True
        if again is None or again.version != current.version:
            return False
        return None

    def _discard(self, key: EntryKey, current: UpstreamTokens, give_up: float, calls: SyncStoreCalls) -> bool:
        """Fail closed: the entry's refresh token may be consumed; remove the entry if it still holds it
        (retrying until ``give_up``). Until the store confirms, this process remembers the token as lost.
        True when the store confirmed it no longer holds the entry."""
        state = self._core
        assert current.refresh_token is not None
        state.forget(key)
        state.lose_consumed(current)
        pauses = self._retry_pauses(give_up)
        while True:
            try:
                with state.writing(key):
                    self._bounded(
                        calls, functools.partial(state.storage.delete, key, expected_version=current.version)
                    )
            except Exception as exc:
                state.tracer.emit("store.error", key, operation="delete", error=type(exc).__name__)
                pause = next(pauses, None)
                if pause is None:
                    logger.debug("refresh of %s: could not remove the consumed entry", key)
                    return False
                sync_sleep(pause)
            else:
                # Removed, or the entry has another version (a login, a logout): the store no longer holds it.
                state.settle_consumed(current.refresh_token)
                return True

    def _bounded(self, calls: SyncStoreCalls, call: SyncCall[T]) -> T:
        """A storage call made after the token request. A slow store is waited for as long as the job's lease
        may still be renewed (twice refresh_timeout, plus lease_ttl): the write may yet land before anyone else can
        redeem. A store that hangs beyond that counts as a failing one (retried, then fail closed), and cannot
        keep the job, or the interpreter's exit, waiting for ever (unless no thread can be started to replace a
        worker left behind in a hung call: the job's thread then makes the call itself)."""
        result = calls.call(call)
        if result is TimedOut:
            raise StorageError("the store did not answer in time")
        return result

    def _read(self, key: EntryKey) -> UpstreamTokens:
        return self._present(self._core.storage.get(key))

    def _present(self, tokens: UpstreamTokens | None) -> UpstreamTokens:
        """``tokens`` read from the store, or ReauthenticationRequired when there were none."""
        if tokens is None:
            raise ReauthenticationRequired(
                "no tokens are stored for this session; send the user through the login flow and store "
                "the result with TokenManager.store()."
            )
        return tokens


def _this_job() -> JobTrace:
    """The trace of the running job: the code that calls this runs only inside :meth:`AsyncCoordinator.run_flight`."""
    job = current_job.get()
    assert job is not None
    return job


def _reason(need: Requirement) -> str:
    """Why a refresh is made, as events and metrics name it."""
    return "rejected" if need.rejected is not None else "ahead" if need.ahead_of is not None else "expired"
