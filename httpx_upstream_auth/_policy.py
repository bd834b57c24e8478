"""Pure decisions (sans-I/O): freshness, retention, and what a 401 means for a request."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import attrs

from ._models import UpstreamTokens

__all__ = ["FreshnessBounds", "FreshnessPolicy", "can_replay", "carried", "is_token_rejected", "retention_deadline"]

DEFAULT_RETENTION = 30 * 24 * 3600.0


@attrs.frozen(kw_only=True)
class FreshnessPolicy:
    """When a stored access token is still good enough to send.

    A token is refreshed once it is within ``leeway`` seconds of ``expires_at``; the leeway is capped at
    ``max_leeway_fraction`` of the token's lifetime, so a 2-second token is not refreshed on every request.
    The caller may pass the recently observed request ``latency``: a token must not expire while a request
    carrying it is on the way, so the leeway grows to the latency, up to ``max_latency_fraction`` of the
    lifetime (beyond that, refreshing earlier would only trade expiries for refreshes).
    """

    leeway: float = 30.0
    max_leeway_fraction: float = 0.1
    max_latency_fraction: float = 0.35
    #: Seconds before the leeway in which a request that finds the token nearly due starts a refresh in the
    #: background and is served the still-valid token (0: off); capped at ``max_ahead_fraction`` of the
    #: token's lifetime, so a short-lived token is not refreshed as soon as it is issued.
    refresh_ahead: float = 0.0
    max_ahead_fraction: float = 0.5

    def bounds(self, tokens: UpstreamTokens) -> FreshnessBounds:
        """The token's freshness inputs, computed once (callers may keep them with the token)."""
        if tokens.expires_at is None:
            return FreshnessBounds(float("inf"), self.leeway, float("inf"))
        if tokens.issued_at is None:
            return FreshnessBounds(tokens.expires_at, self.leeway, float("inf"))
        lifetime = max(tokens.expires_at - tokens.issued_at, 0.0)
        return FreshnessBounds(
            tokens.expires_at,
            min(self.leeway, lifetime * self.max_leeway_fraction),
            lifetime * self.max_latency_fraction,
        )

    def ahead_window(self, tokens: UpstreamTokens) -> float:
        """How many seconds before its leeway a refresh of ``tokens`` starts in the background (0: never)."""
        if self.refresh_ahead <= 0 or tokens.expires_at is None:
            return 0.0
        if tokens.issued_at is None:
            return self.refresh_ahead
        lifetime = max(tokens.expires_at - tokens.issued_at, 0.0)
        return min(self.refresh_ahead, lifetime * self.max_ahead_fraction)

    def ahead_floor(self, tokens: UpstreamTokens) -> float:
        """Epoch seconds before which no refresh starts ahead, however long the leeway grew: once the last
        ``max_ahead_fraction`` of the lifetime begins (``-inf`` when the lifetime is unknown)."""
        if tokens.expires_at is None or tokens.issued_at is None:
            return float("-inf")
        return tokens.expires_at - max(tokens.expires_at - tokens.issued_at, 0.0) * self.max_ahead_fraction

    def is_fresh(self, tokens: UpstreamTokens, now: float, latency: float = 0.0) -> bool:
        """True when the token can be sent as it is."""
        return now < self.bounds(tokens).fresh_until(latency)


class FreshnessBounds(NamedTuple):
    """A token's freshness inputs: its expiry (inf when unknown), its leeway, and the latency cap."""

    expires_at: float
    leeway: float
    latency_cap: float

    def leeway_for(self, latency: float) -> float:
        """The leeway once the observed ``latency`` is taken into account."""
        return max(self.leeway, min(latency, self.latency_cap))

    def fresh_until(self, latency: float = 0.0) -> float:
        """Epoch seconds until which the token is sent without refreshing."""
        return self.expires_at - self.leeway_for(latency)

    def calm_until(self) -> float:
        """Epoch seconds until which the token is fresh whatever the observed latency (a lower bound of
        every :meth:`fresh_until`)."""
        if self.expires_at == float("inf"):
            return self.expires_at
        return self.expires_at - max(self.leeway, self.latency_cap)


def retention_deadline(
    tokens: UpstreamTokens, now: float, default_retention: float, max_retention: float = 10 * 365 * 24 * 3600.0
) -> float:
    """Until when a storage keeps the entry: the refresh token's life, never the access token's.

    Always finite and at most ``max_retention`` ahead, so every store can take it.

    An infinite, NaN or absurd ``refresh_expires_at`` (more than ``max_retention``, ten years, from
    ``now``) means "unknown", so the default retention applies; the default itself is clamped to
    [0, max_retention].
    A deadline in the past stays in the past (clamped to the epoch), so the entry is born expired.
    """
    if math.isfinite(default_retention):
        fallback = now + min(max(default_retention, 0.0), max_retention)
    else:  # inf: as long as allowed; -inf or NaN: not at all
        fallback = now + (max_retention if default_retention > 0 else 0.0)
    end = tokens.refresh_expires_at
    if end is None or not math.isfinite(end) or end > now + max_retention:
        return fallback
    return max(end, 0.0)


def is_token_rejected(response: Any) -> bool:
    """True when a response says the token was not accepted (401 with a Bearer or DPoP challenge).

    A 401 without any ``WWW-Authenticate`` header counts too (many APIs omit it); a 401 whose challenges
    are all for another scheme (``Basic``, ``Digest``) does not: a new token would not help. Nor does a
    DPoP nonce challenge (``error="use_dpop_nonce"``, RFC 9449 section 9): the token is fine, the proof
    lacked the server's nonce. Nor does a refused proof (``error="invalid_dpop_proof"``): its ``htu``,
    ``iat`` or key was wrong, and a new token would carry the same fault.
    """
    if response.status_code != 401:
        return False
    challenges = (
        response.headers.get_list("www-authenticate")
        if hasattr(response.headers, "get_list")
        else [response.headers.get("www-authenticate", "")]
    )
    challenges = [c.strip().lower() for c in challenges if c.strip()]
    if not challenges:
        return True
    if any("use_dpop_nonce" in c or "invalid_dpop_proof" in c for c in challenges):
        return False
    return any(c.startswith(("bearer", "dpop")) or ", bearer" in c or ", dpop" in c for c in challenges)


def carried(response: Any, request: Any, authorization: str) -> bool:
    """True when ``response`` answers a request that carried ``authorization``: ``request`` itself, or the
    last hop of a redirect that kept the header (httpx and httpx2 drop it on a hop to another origin)."""
    try:
        answered = response.request
    except RuntimeError:  # a response built without a request
        return True
    return answered is request or answered.headers.get("authorization") == authorization


def can_replay(request: Any) -> bool:
    """True when the request's body is held in memory, so sending it again sends the same bytes.

    Uses only the public API of httpx and httpx2: ``request.content`` is there for a body given as bytes
    (or already read), and raises ``RequestNotRead`` for a streaming body that can be sent once.
    """
    try:
        request.content  # noqa: B018 - the property is the test
    except Exception:
        return False
    return True
