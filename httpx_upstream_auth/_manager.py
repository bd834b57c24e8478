"""``TokenManager``: one per upstream provider, shared by every client, auth and transport."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Literal, overload

from ._auth import UpstreamAuth
from ._clock import Clock, SystemClock
from ._coordinators import Coordinators
from ._core import Footprint, ManagerCore, RedeemIn
from ._logout import Logout
from ._models import Binding, UpstreamTokens
from ._policy import FreshnessPolicy
from ._refresher import Refresher
from ._storages import MemoryStorage, Storage
from ._synchronization import SameThreadWait
from ._trace import TraceEvent

__all__ = ["TokenManager"]


class TokenManager:
    """Keeps one provider's upstream tokens valid for every session, refreshing once per expiry.

    Sessions are keyed by (``provider_id``, session id) in ``storage``. A token is refreshed when it is
    within ``leeway`` seconds of expiry (at most ``max_leeway_fraction`` of its lifetime), or when the
    API rejects it. Per key, one refresh job runs while every caller waits for its result: across
    asyncio and trio tasks and threads here, and across processes and hosts through the storage's lease.

    The job belongs to the manager, not to a caller: once the refresh request may have left the process,
    it saves the result (or removes the entry) whatever happens to the callers, who may be cancelled or
    time out at any moment. With ``redeem_in="thread"`` (the default) it runs in a worker thread of its
    own, which nothing cancels and the interpreter waits for at exit; ``"task"`` runs it as a task of the
    caller's event loop that no caller awaits (no threads, but it ends with its loop).

    ``refresh_timeout`` is how long the job keeps its lease renewed while the token endpoint answers
    (keep it above the refresher's own timeout); ``lease_ttl`` (longer) bounds how long a crashed
    process can hold the lease; ``lease_wait`` how long a job waits for another process's refresh;
    ``wait_timeout`` how long a caller waits for a job before :class:`RefreshFailed` (the job goes on).
    When an early refresh fails without consuming anything (the provider had a blip) while the token is
    still valid, the token is served and the refresh retried after ``retry_interval`` seconds.

    A refresh that fails without consuming anything (after the job's own retries of transient refusals)
    is remembered for ``failure_window`` seconds, or as long as the provider's ``Retry-After`` asks:
    meanwhile that session's callers get the same typed error at once, without a token request, so a
    burst of requests costs one call per window. A :class:`ConfigurationError` (a wrong token URL or client
    secret, a refused certificate or proxy) is remembered for every session of the manager. A new
    :meth:`store` (or any change to the entry) ends a session's failure; ``failure_window=0`` remembers none.

    ``reuse_grace`` is how long the provider still accepts a refresh token it has just redeemed (0, the
    default: it never does). Within it, a refresh whose answer was lost after sending (a timeout, a reset
    connection, a gateway's 502/504) is sent once more by the same job, with the same refresh token, instead
    of failing closed. Set it to the provider's setting: Okta's refresh token rotation grace period (30 s by
    default), Auth0's reuse interval (leeway), Ory Hydra's ``oauth2.grant.refresh_token.rotation_grace_period``;
    with Keycloak, a "Refresh Token Max Reuse" of 1 or more allows a retry (choose a grace of a few seconds).

    ``refresh_ahead`` (seconds, 0 = off, the default) opens a window that long before the leeway (never before
    the second half of the token's lifetime): a request that finds the token in it is sent with the
    still-valid token at once, and starts the session's refresh job in the background if none runs (the
    same job, lease and rules as any refresh); only a token inside its leeway, or expired, makes a request
    wait. Each cached entry's window opens at a random point of its last half, so processes and sessions do
    not refresh in step.
    Idle sessions cost nothing (no timers: only a request starts the job). 60 seconds suits most providers.
    It is off by default because it spends refresh tokens earlier than needed, on behalf of a request that
    does not wait for the result, and with ``redeem_in="task"`` the background job lives on the event
    loop of the request that started it: a loop that ends right after the request (``asyncio.run`` per
    call) stops it, and a job stopped after sending fails closed. Turn it on where requests must not wait
    (with the default ``redeem_in="thread"``, or long-lived event loops).

    ``on_refresh(session_id, tokens)`` is called after every refresh that saved new tokens (for apps that
    mirror tokens elsewhere); ``on_event(event)`` with every :class:`TraceEvent` (refresh started, succeeded
    or failed, refresh ahead started, 401 replayed, distrust, failure remembered, store error, change notice).
    The same events are logged on ``httpx_upstream_auth.events`` (tokens only as short hashes). Hooks run in
    the refresh job's thread or task, or the caller's, never under one of the manager's locks, after the
    waiters have their tokens; keep them quick. An exception from a hook is logged and ignored.

    ``refresh_timeout`` bounds a job in both modes: the token request is given up after it (treated as a
    lost answer: the entry is removed), the writes that follow get as long again, and the lease stops
    being renewed after both (plus ``lease_ttl``). :meth:`close` waits for jobs that may have sent a
    request. A forked child (gunicorn ``--preload``, multiprocessing) starts with no inherited jobs and an
    empty cache, and hears other processes' changes through its storage's own change feed.
    """

    def __init__(
        self,
        *,
        refresher: Refresher,
        provider_id: str,
        storage: Storage | None = None,
        leeway: float = 30.0,
        max_leeway_fraction: float = 0.1,
        refresh_timeout: float = 15.0,
        lease_ttl: float | None = None,
        lease_wait: float | None = None,
        wait_timeout: float | None = None,
        retry_interval: float = 1.0,
        failure_window: float = 5.0,
        reuse_grace: float = 0.0,
        refresh_ahead: float = 0.0,
        on_refresh: Callable[[str, UpstreamTokens], None] | None = None,
        on_event: Callable[[TraceEvent], None] | None = None,
        cache_size: int = 10_000,
        clock: Clock | None = None,
        redeem_in: RedeemIn = "thread",
    ) -> None:
        # The job renews its lease while it runs, so the ttl only bounds how long a crashed process blocks.
        lease_ttl = refresh_timeout + 5.0 if lease_ttl is None else lease_ttl
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        for name, value in (
            ("failure_window", failure_window),
            ("reuse_grace", reuse_grace),
            ("refresh_ahead", refresh_ahead),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds, 0 or more, not {value!r}")
        if redeem_in not in ("thread", "task"):
            raise ValueError(f"redeem_in must be 'thread' or 'task', got {redeem_in!r}")
        refusal = refresher.cannot_redeem_in(redeem_in)
        if refusal is not None:
            raise ValueError(refusal)
        # A holder keeps its lease for up to refresh_timeout (renewing), then it lapses within lease_ttl.
        lease_wait = refresh_timeout + 2 * lease_ttl if lease_wait is None else lease_wait
        self._core = ManagerCore(
            provider_id=provider_id,
            storage=MemoryStorage() if storage is None else storage,
            refresher=refresher,
            clock=SystemClock() if clock is None else clock,
            policy=FreshnessPolicy(
                leeway=leeway, max_leeway_fraction=max_leeway_fraction, refresh_ahead=float(refresh_ahead)
            ),
            refresh_timeout=refresh_timeout,
            lease_ttl=lease_ttl,
            lease_wait=lease_wait,
            wait_timeout=lease_wait + refresh_timeout if wait_timeout is None else wait_timeout,
            retry_interval=retry_interval,
            cache_size=cache_size,
            redeem_in=redeem_in,
            failure_window=float(failure_window),
            reuse_grace=float(reuse_grace),
            on_event=on_event,
            on_refresh=on_refresh,
        )
        self._coordinators = Coordinators(self._core)
        self._for_async = self._coordinators.for_async
        self._for_sync = self._coordinators.for_sync

    @property
    def provider_id(self) -> str:
        """The provider whose tokens this manager keeps."""
        return self._core.provider_id

    @property
    def storage(self) -> Storage:
        """Where entries are kept."""
        return self._core.storage

    def __repr__(self) -> str:
        return f"TokenManager(provider_id={self.provider_id!r}, storage={type(self.storage).__name__})"

    def auth(self, session_id: str, expect: Binding | None = None) -> UpstreamAuth:
        """An ``auth=`` for httpx and httpx2 clients that sends this session's tokens. O(1), no I/O."""
        return UpstreamAuth(self._coordinators, session_id, expect)

    def store(self, session_id: str, tokens: UpstreamTokens) -> UpstreamTokens:
        """Save a session's tokens after a login; returns the entry as stored (with its version)."""
        return self._for_sync.store(session_id, tokens)

    async def astore(self, session_id: str, tokens: UpstreamTokens) -> UpstreamTokens:
        """Async twin of :meth:`store`."""
        return await self._for_async.store(session_id, tokens)

    def get_token(self, session_id: str, expect: Binding | None = None) -> UpstreamTokens:
        """A valid entry for the session, refreshed first if needed.

        Raises :class:`ReauthenticationRequired`, :class:`RefreshFailed`, :class:`BindingMismatch` or
        :class:`StorageError`.
        """
        return self._for_sync.get_token(session_id, expect)

    async def aget_token(self, session_id: str, expect: Binding | None = None) -> UpstreamTokens:
        """Async twin of :meth:`get_token`."""
        return await self._for_async.get_token(session_id, expect)

    def refresh(self, session_id: str, expect: Binding | None = None) -> UpstreamTokens:
        """Refresh the session's tokens now, though they may still be valid (after a change of scope or roles
        at the provider, or from an operator's tool), and return the new ones.

        It is the same refresh as on an expiry: one per session across threads, tasks and processes (a
        refresh already under way is joined, not repeated), rotation-safe, and a token another worker stored
        since this call found the entry is returned as it is. Raises as :meth:`get_token` does.
        """
        return self._for_sync.refresh(session_id, expect)

    async def arefresh(self, session_id: str, expect: Binding | None = None) -> UpstreamTokens:
        """Async version of :meth:`refresh`."""
        return await self._for_async.refresh(session_id, expect)

    def footprint(self) -> Footprint:
        """How many entries each per-session table holds (for monitoring; each has a bound)."""
        return self._core.footprint()

    @overload
    def delete(self, session_id: str, revoke: Literal[False] = False) -> bool: ...

    @overload
    def delete(self, session_id: str, revoke: Literal[True], *, revoke_timeout: float = ...) -> Logout: ...

    @overload
    def delete(self, session_id: str, revoke: bool, *, revoke_timeout: float = ...) -> bool | Logout: ...

    def delete(self, session_id: str, revoke: bool = False, *, revoke_timeout: float = 5.0) -> bool | Logout:
        """Forget a session's tokens (logout). True when there was an entry.

        With ``revoke=True`` the refresh token the entry held is then revoked at the provider's revocation
        endpoint (RFC 7009, ``token_type_hint=refresh_token``, the client authenticated as for a refresh), so the
        grant ends there too; the result is a :class:`Logout` saying whether that happened, and why not. The entry
        is removed first, whatever the provider does, and the revocation is waited for at most
        ``revoke_timeout`` seconds: a provider that fails, refuses or hangs is reported, never raised.
        """
        if revoke:
            return self._for_sync.logout(session_id, _bounded(revoke_timeout))
        return self._for_sync.delete(session_id)

    @overload
    async def adelete(self, session_id: str, revoke: Literal[False] = False) -> bool: ...

    @overload
    async def adelete(self, session_id: str, revoke: Literal[True], *, revoke_timeout: float = ...) -> Logout: ...

    @overload
    async def adelete(self, session_id: str, revoke: bool, *, revoke_timeout: float = ...) -> bool | Logout: ...

    async def adelete(self, session_id: str, revoke: bool = False, *, revoke_timeout: float = 5.0) -> bool | Logout:
        """Async twin of :meth:`delete`."""
        if revoke:
            return await self._for_async.logout(session_id, _bounded(revoke_timeout))
        return await self._for_async.delete(session_id)

    def close(self, timeout: float | None = None) -> None:
        """Stop starting refreshes, wait for running ones, then close the storage and the refresher.

        A refresh job that may have sent its request saves the new tokens or removes the entry before
        anything is closed under it: ``close`` waits for it up to ``timeout`` seconds (default: twice
        ``refresh_timeout``, the longest a job can take). A job still running after that closes the
        storage and the refresher itself when it ends. A job that has not sent its request yet stops.
        A storage or refresher that another open manager uses (or one still running a job) is left open
        for that manager to close.
        """
        state = self._core
        state.close()  # no new job, nothing cached, no more change notices
        limit = self._close_limit(timeout)
        for flight in state.running():
            # A task job on this thread's own (blocked) loop cannot end while we wait: it closes up itself.
            with contextlib.suppress(SameThreadWait):
                flight.outcome(max(limit - state.clock.monotonic(), 0.0))
        state.when_idle(self._close_resources)

    async def aclose(self, timeout: float | None = None) -> None:
        """Async twin of :meth:`close`."""
        state = self._core
        state.close()  # no new job, nothing cached, no more change notices
        limit = self._close_limit(timeout)
        for flight in state.running():
            await flight.aoutcome(max(limit - state.clock.monotonic(), 0.0))
        if state.running():
            state.when_idle(self._close_resources)
        else:
            if not state.storage_in_use_elsewhere():
                await state.storage.aclose()
            self._close_refresher()

    def _close_limit(self, timeout: float | None) -> float:
        state = self._core
        return state.clock.monotonic() + (2 * state.refresh_timeout if timeout is None else timeout)

    def _close_resources(self) -> None:
        # A storage shared with another manager that is still open (or still running a job) is left to
        # that one to close.
        if not self._core.storage_in_use_elsewhere():
            self._core.storage.close()
        self._close_refresher()

    def _close_refresher(self) -> None:
        # Likewise a refresher: closing its client under another manager's token request would lose the
        # answer after the provider consumed the refresh token.
        if self._core.refresher_in_use_elsewhere():
            return
        close = getattr(self._core.refresher, "close", None)
        if close is not None:
            close()


def _bounded(revoke_timeout: float) -> float:
    """``revoke_timeout`` if it bounds the wait (a positive, finite number of seconds), else ValueError."""
    if (
        isinstance(revoke_timeout, bool)
        or not isinstance(revoke_timeout, (int, float))
        or not 0 < revoke_timeout < float("inf")
    ):
        raise ValueError(f"revoke_timeout must be a positive, finite number of seconds, not {revoke_timeout!r}")
    return float(revoke_timeout)
