"""The async auth flow: attach the token, and after a 401 replay once with a newer one."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import httpx

from .._dpop import is_nonce_challenge, is_proof_refused, origin_of
from .._models import Binding, UpstreamTokens
from .._policy import can_replay, carried, is_token_rejected

if TYPE_CHECKING:
    from .._coordinators import Coordinators


class AsyncAuthFlow:
    """The async flow of :class:`~httpx_upstream_auth.UpstreamAuth` (the sync one is generated)."""

    _coordinators: Coordinators
    _session_id: str
    _expect: Binding | None

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Send with the session's token; on a Bearer (or DPoP) 401, replay once with a newer token. With
        DPoP configured, DPoP tokens go with a proof, and a server's nonce challenge is answered by one replay.

        Nothing is held across a ``yield``: httpx may close this generator there, from another task.
        """
        ops = self._coordinators.for_async
        state = self._coordinators.core
        dpop = state.refresher.dpop
        tokens = await ops.get_token(self._session_id, self._expect)
        if dpop is None:
            request.headers["Authorization"] = tokens.authorization
        else:
            dpop.authorize(request, tokens, state.clock.time())
        sent = state.clock.monotonic()
        response = yield request
        state.observe(state.clock.monotonic() - sent)
        if dpop is not None:
            for attempt in range(2):
                # A nonce challenge, or a proof that a redirect within the origin took to a URL it does not
                # name: no verdict on the token. The same token goes again, to the URL that answered, with a
                # proof of its own (never the same proof twice): once, and once more only when the proof
                # made for the redirect's target then meets a nonce challenge.
                again = dpop.resend(response, request)
                if again is None or not can_replay(request):
                    break
                nonce_asked = is_nonce_challenge(response.status_code, response.headers)
                dpop.authorize(again, tokens, state.clock.time())
                response = yield again
                if nonce_asked or attempt:
                    dpop.resend(response, request)  # keeps the nonce for the next request; no further retry
                    break
            if self._proof_refused(response, request, tokens):
                return
        if not carried(response, request, tokens.authorization):
            # A redirect to another origin, where the client dropped our token: that answer says nothing
            # about it, and neither a refresh nor a replay would reach that origin with it.
            return
        if not is_token_rejected(response):
            ops.accepted(self._session_id, tokens.access_token)
            return
        retry = await ops.refresh_rejected(self._session_id, tokens.access_token, self._expect)
        if retry is None or not can_replay(request):
            # A one-shot body is never resent: the caller gets the 401, the next request the new token.
            # None: the API refused this token right after its refresh; another would not help.
            return
        if dpop is None:
            request.headers["Authorization"] = retry.authorization
        else:
            dpop.authorize(request, retry, state.clock.time())
        ops.replayed(self._session_id, retry)
        response = yield request
        if dpop is not None:
            dpop.resend(response, request)  # keeps the nonce for the next request; no second replay
            if self._proof_refused(response, request, retry):
                return
        if not carried(response, request, retry.authorization):
            return
        if is_token_rejected(response):
            # Refused again, with a token just refreshed (or just saved by another worker): the API is
            # rejecting us for another reason, and refreshing on every request would only rotate tokens
            # (until the API accepts this token again, or it expires).
            ops.distrust(self._session_id, retry)
        else:
            ops.accepted(self._session_id, retry.access_token)

    def _proof_refused(self, response: httpx.Response, request: httpx.Request, tokens: UpstreamTokens) -> bool:
        """True when the API refused our DPoP proof (``invalid_dpop_proof``), which is said in an event: no
        verdict on the token, so neither a refresh nor a distrust follows."""
        if not is_proof_refused(response) or not carried(response, request, tokens.authorization):
            return False
        answered = response.request
        self._coordinators.for_async.proof_refused(
            self._session_id, origin_of(str(answered.url)), redirected=answered is not request
        )
        return True
