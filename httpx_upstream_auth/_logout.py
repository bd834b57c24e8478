"""What a logout did: the entry removed, and whether the provider revoked the grant (RFC 7009)."""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ["Logout", "RevocationReason"]

RevocationReason = Literal[
    "revoked", "no_entry", "entry_refused", "no_refresh_token", "not_configured", "refused", "failed", "timed_out"
]


@attrs.frozen(kw_only=True)
class Logout:
    """The result of ``TokenManager.delete(session_id, revoke=True)``.

    ``deleted``: the store held an entry and it was removed (the logout itself; it happens first, whatever the
    provider does). ``revoked``: the provider confirmed revoking the refresh token (so the grant is over).
    ``reason`` says why, or why not: ``"revoked"``; ``"no_entry"`` (nothing was stored: nothing to revoke);
    ``"entry_refused"`` (an :class:`EncryptedStorage` could not open the entry: it was removed, its token is
    unknown); ``"no_refresh_token"``; ``"not_configured"`` (the refresher has no revocation endpoint);
    ``"refused"`` (the endpoint answered an error: ``status_code``); ``"failed"`` (the request failed: ``error``
    names the exception's class); ``"timed_out"`` (no answer within the logout's ``revoke_timeout``).
    """

    deleted: bool
    revoked: bool
    reason: RevocationReason
    status_code: int | None = None
    error: str | None = None
