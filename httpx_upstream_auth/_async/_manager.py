"""The async half of TokenManager: the fast path, single flight, and the leader's refresh."""

from __future__ import annotations

import contextlib

import attrs

from .._exceptions import ReauthenticationRequired, RefreshFailed, StorageError
from .._models import Binding, EntryKey, UpstreamTokens
from .._state import ManagerState, Need, describe, logger
from .._synchronization import AsyncShield, Outcome

#: Flights a caller joins before giving up (each one ends with a write or an error, so this is generous).
MAX_FLIGHTS = 8


class AsyncTokenOps:
    """Token operations for async callers; the sync twin is generated from this file."""

    def __init__(self, state: ManagerState) -> None:
        self._s = state

    async def get_token(self, session_id: str, expect: Binding | None = None) -> UpstreamTokens:
        """A fresh entry for the session, refreshed (once, across all callers) when needed."""
        s = self._s
        tokens = s.cached(session_id)
        if tokens is None:
            key = s.key(session_id)
            tokens = await self._read(key)
            s.check_binding(tokens, expect)
            if s.is_fresh(tokens):
                s.remember(key, tokens)
            else:
                tokens = await self._single_flight(key, Need())
        s.check_binding(tokens, expect)
        return tokens

    async def refresh_rejected(
        self, session_id: str, rejected: str, expect: Binding | None = None
    ) -> UpstreamTokens:
        """The entry to retry with after the API refused ``rejected``: the stored one if it differs
        (someone refreshed meanwhile) and is fresh, else a new one from a single-flight refresh."""
        s = self._s
        key = s.key(session_id)
        s.forget(key, rejected)
        tokens = await self._single_flight(key, Need(rejected))
        s.check_binding(tokens, expect)
        return tokens

    async def store(self, session_id: str, tokens: UpstreamTokens) -> UpstreamTokens:
        """Write a new entry for the session (after a login), above any version already stored."""
        s = self._s
        key = s.key(session_id)
        if tokens.provider_id is None:
            tokens = attrs.evolve(tokens, provider_id=s.provider_id)
        s.check_binding(tokens, None)
        if tokens.issued_at is None and tokens.expires_at is not None:
            # The true lifetime is unknown; from now is a lower bound, so the leeway stays small enough.
            tokens = attrs.evolve(tokens, issued_at=min(s.clock.time(), tokens.expires_at))
        for _ in range(MAX_FLIGHTS):
            current = await s.storage.aget(key)
            version = tokens.version if current is None else current.version
            entry = attrs.evolve(tokens, version=max(version + 1, 1))
            if await s.storage.aput(key, entry, expected_version=None if current is None else current.version):
                s.remember(key, entry)
                return entry
        raise StorageError("the entry kept changing while storing it; retry the store")

    async def delete(self, session_id: str) -> bool:
        """Remove the session's entry (logout). True when there was one."""
        key = self._s.key(session_id)
        self._s.forget(key)
        return await self._s.storage.adelete(key)

    # -- internals -------------------------------------------------------------------------------------
    async def _read(self, key: EntryKey) -> UpstreamTokens:
        tokens = await self._s.storage.aget(key)
        if tokens is None:
            raise ReauthenticationRequired(
                "no tokens are stored for this session; send the user through the login flow and store "
                "the result with TokenManager.store()."
            )
        return tokens

    async def _single_flight(self, key: EntryKey, need: Need) -> UpstreamTokens:
        s = self._s
        for _ in range(MAX_FLIGHTS):
            flight, leading = s.join_flight(key)
            if leading:
                try:
                    tokens, refreshed = await self._lead(key, need)
                except Exception as exc:
                    s.end_flight(key, flight, Outcome(error=exc))
                    raise
                except BaseException:
                    # Cancelled before anything was sent: a follower takes over.
                    s.end_flight(key, flight, Outcome())
                    raise
                s.end_flight(key, flight, Outcome(tokens=tokens, refreshed=refreshed))
                return tokens
            outcome = await flight.aoutcome()
            if outcome.abandoned:
                continue
            tokens = outcome.unwrap()
            if outcome.refreshed or need.satisfied_by(tokens, s):
                return tokens
        raise RefreshFailed("the token kept changing during the refresh; retry the request", retryable=True)

    async def _lead(self, key: EntryKey, need: Need) -> tuple[UpstreamTokens, bool]:
        """Refresh unless storage already has what ``need`` asks; the bool says whether we refreshed."""
        s = self._s
        give_up = s.clock.monotonic() + s.lease_wait
        while True:
            # Re-read after winning: another task, thread or process may have refreshed already.
            current = await self._read(key)
            if need.satisfied_by(current, s):
                s.remember(key, current)
                return current, False
            self._check_refreshable(current)
            lease = await s.storage.aacquire_lease(key, s.lease_ttl)
            if lease is None:
                left = give_up - s.clock.monotonic()
                if left <= 0:
                    raise RefreshFailed(
                        "another worker holds the refresh lease and has not finished; retry the request",
                        retryable=True,
                    )
                logger.debug("refresh of %s: waiting for another process's lease", describe(key))
                await s.storage.awatch(key, current.version, min(left, 1.0))
                continue
            try:
                # Re-read under the lease: the previous holder may have saved just before releasing.
                current = await self._read(key)
                if need.satisfied_by(current, s):
                    s.remember(key, current)
                    return current, False
                self._check_refreshable(current)
                return await self._redeem(key, current), True
            finally:
                with AsyncShield(s.refresh_timeout):
                    try:
                        await s.storage.arelease_lease(lease)
                    except StorageError:
                        logger.debug("refresh of %s: lease release failed; it expires", describe(key))

    def _check_refreshable(self, current: UpstreamTokens) -> None:
        if current.refresh_token is None:
            raise ReauthenticationRequired(
                "the access token is no longer valid and no refresh token is stored; log the user in again."
            )

    async def _redeem(self, key: EntryKey, current: UpstreamTokens) -> UpstreamTokens:
        s = self._s
        result: UpstreamTokens | None = None
        # From here on the provider may consume the refresh token: finish and save even if cancelled.
        with AsyncShield(s.refresh_timeout) as shield:
            logger.debug("refresh of %s: redeeming version %d", describe(key), current.version)
            try:
                fresh = await s.refresher.arefresh(current, s.clock)
            except ReauthenticationRequired:
                # invalid_grant may mean another worker rotated first: use its tokens if so.
                again = await s.storage.aget(key)
                if again is None or again.version == current.version:
                    raise
                result = again
            else:
                result = await self._save(key, current, fresh)
            s.remember(key, result)
        if result is None or shield.timed_out:
            raise RefreshFailed(
                "the refresh did not finish in time; stored tokens are unchanged. Retry the request.",
                retryable=True,
            )
        return result

    async def _save(self, key: EntryKey, current: UpstreamTokens, fresh: UpstreamTokens) -> UpstreamTokens:
        s = self._s
        rotated = fresh.refresh_token != current.refresh_token
        try:
            saved = await s.storage.aput(key, fresh, expected_version=current.version)
        except StorageError:
            if not rotated:
                # The stored refresh token still works; serve the new access token from memory.
                logger.debug("refresh of %s: save failed, the old refresh token stays valid", describe(key))
                return fresh
            # The write may have landed before the error (a timeout after the server ran it): look.
            with contextlib.suppress(StorageError):
                again = await s.storage.aget(key)
                if again is not None and again.version == fresh.version and again.refresh_token == fresh.refresh_token:
                    return again
            # Fail closed: the stored refresh token is consumed, and presenting it again would make the
            # provider revoke the whole grant. The delete is conditional, so a newer entry survives.
            s.forget(key)
            with contextlib.suppress(StorageError):
                await s.storage.adelete(key, expected_version=current.version)
            raise StorageError(
                "the provider rotated the refresh token but the new one could not be saved; the stored entry "
                "was removed so the consumed token is never reused. Log the user in again."
            ) from None
        if saved:
            return fresh
        # Compare-and-set lost: someone saved a newer entry (a new login, or a refresh after our lease
        # ran out). Theirs wins; ours would overwrite it with an older lineage.
        return await self._read(key)
