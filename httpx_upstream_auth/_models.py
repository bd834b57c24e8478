"""Token entries and identity bindings: frozen values, secrets hidden, JSON with a schema version."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs

from ._exceptions import BindingMismatch

__all__ = ["SCHEMA_VERSION", "Binding", "EntryKey", "UpstreamTokens"]

SCHEMA_VERSION = 1
BINDING_FIELDS = ("provider_id", "user_id", "upstream_subject", "client_id")


def _hidden(value: object) -> str:
    return "None" if value is None else "'<hidden>'"


def _opt_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


@attrs.frozen(kw_only=True)
class UpstreamTokens:
    """One session's tokens for one upstream provider, plus the identity they are bound to.

    ``expires_at`` and ``refresh_expires_at`` are absolute epoch seconds (``None``: unknown; a token
    with an unknown expiry is refreshed only when the API rejects it). ``issued_at`` is when the access
    token was obtained (it bounds the refresh leeway for short-lived tokens). ``version`` grows with
    every write; storages compare-and-set on it. Secrets never appear in ``repr`` or ``str``.
    """

    access_token: str = attrs.field(repr=_hidden)
    refresh_token: str | None = attrs.field(default=None, repr=_hidden)
    id_token: str | None = attrs.field(default=None, repr=_hidden)
    token_type: str = "Bearer"
    scope: str | None = None
    expires_at: float | None = attrs.field(default=None, converter=_opt_float)
    refresh_expires_at: float | None = attrs.field(default=None, converter=_opt_float)
    issued_at: float | None = attrs.field(default=None, converter=_opt_float)
    provider_id: str | None = None
    user_id: str | None = None
    upstream_subject: str | None = None
    client_id: str | None = None
    version: int = 0

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value (``Bearer`` for any token type spelled that way)."""
        kind = "Bearer" if self.token_type.lower() == "bearer" else self.token_type
        return f"{kind} {self.access_token}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with a ``schema`` version, the form every storage persists."""
        data = attrs.asdict(self)
        data["schema"] = SCHEMA_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpstreamTokens:
        """Rebuild from :meth:`to_dict` output; unknown keys from newer writers are ignored."""
        schema = data.get("schema", SCHEMA_VERSION)
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise ValueError(f"token entry has schema {schema!r}; this version reads up to {SCHEMA_VERSION}")
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> str:
        """Serialize to a compact JSON string."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> UpstreamTokens:
        """Parse :meth:`to_json` output."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("token entry is not a JSON object")
        return cls.from_dict(data)


@attrs.frozen(kw_only=True)
class Binding:
    """The identity a caller expects an entry to belong to. ``None`` fields are not checked."""

    provider_id: str | None = None
    user_id: str | None = None
    upstream_subject: str | None = None
    client_id: str | None = None

    def check(self, tokens: UpstreamTokens) -> None:
        """Raise :class:`BindingMismatch` unless every set field equals the entry's."""
        wrong = [
            name
            for name in BINDING_FIELDS
            if getattr(self, name) is not None and getattr(self, name) != getattr(tokens, name)
        ]
        if wrong:
            raise BindingMismatch(
                f"the stored tokens belong to another identity ({', '.join(wrong)} differ); nothing was "
                "sent. Check which session id this caller uses, or log the user in again."
            )


@attrs.frozen
class EntryKey:
    """Where an entry lives in a storage: one provider, one session."""

    provider_id: str
    session_id: str

    def __str__(self) -> str:
        # A session id can be a bearer secret (a gateway's cookie): never print it.
        return f"{self.provider_id}:{self.digest[:12]}"

    def __repr__(self) -> str:
        return f"EntryKey(provider_id={self.provider_id!r}, digest={self.digest[:12]!r})"

    @property
    def digest(self) -> str:
        """A stable hex digest of (provider, session): how storages name the entry without the session id."""
        raw = self.provider_id.encode("utf-8", "surrogatepass") + b"\0" + self.session_id.encode("utf-8", "surrogatepass")
        return hashlib.sha256(raw).hexdigest()[:32]
