"""Token entries and identity bindings: frozen values, secrets hidden, JSON with a schema version."""

from __future__ import annotations

import functools
import hashlib
import json
import math
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
    issuer: str | None = None
    """The authorization server that issued these tokens (``None``: not recorded); a refresher that knows
    it refreshes only there."""
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
        """Rebuild from :meth:`to_dict` output; unknown keys from newer writers are ignored.

        Raises ``ValueError`` for anything that is not a valid entry (a missing or non-string
        ``access_token``, a non-finite time, a version that is not an int...), so a storage can report
        an unreadable entry. Messages name the field, never its value.
        """
        outcome = _decode(cls, data)
        # Raised from a frame that no longer holds the entry: error reporters record frame locals.
        del data
        if isinstance(outcome, ValueError):
            raise outcome
        return outcome

    def to_json(self) -> str:
        """Serialize to a compact JSON string."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> UpstreamTokens:
        """Parse :meth:`to_json` output; ``ValueError`` for text that is not a valid entry."""
        outcome = _parse(cls, text)
        del text
        if isinstance(outcome, ValueError):
            raise outcome
        return outcome


_STRING_FIELDS = ("access_token", "token_type")
_OPTIONAL_STRING_FIELDS = ("refresh_token", "id_token", "scope", "issuer", *BINDING_FIELDS)
_TIME_FIELDS = ("expires_at", "refresh_expires_at", "issued_at")
MAX_VERSION = 2**63 - 1  # storages keep the version in a signed 64-bit column


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse(cls: type[UpstreamTokens], text: str | bytes) -> UpstreamTokens | ValueError:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # A fresh error: json's own keeps the whole text (secrets included) in its ``doc`` attribute.
        return ValueError(f"token entry is not JSON ({type(exc).__name__})")
    return _decode(cls, data)


def _decode(cls: type[UpstreamTokens], data: object) -> UpstreamTokens | ValueError:
    if not isinstance(data, dict):
        return ValueError("token entry is not a JSON object")
    schema = data.get("schema", SCHEMA_VERSION)
    if not _is_int(schema):
        return ValueError(f"token entry has a schema that is not an integer ({type(schema).__name__})")
    if schema > SCHEMA_VERSION:
        return ValueError(f"token entry has schema {schema}; this version reads up to {SCHEMA_VERSION}")
    names = {f.name for f in attrs.fields(cls)}
    fields = {k: v for k, v in data.items() if k in names}
    problem = _problem(fields)
    return ValueError(f"token entry {problem}") if problem else cls(**fields)


def _problem(fields: dict[str, Any]) -> str | None:
    """What keeps ``fields`` (known names only) from making a valid entry; the field, never its value."""
    if "access_token" not in fields:
        return "has no access_token"
    for name in _STRING_FIELDS:
        if name in fields and not isinstance(fields[name], str):
            return f"field {name} must be a string, not {type(fields[name]).__name__}"
    for name in _OPTIONAL_STRING_FIELDS:
        if fields.get(name) is not None and not isinstance(fields[name], str):
            return f"field {name} must be a string or null, not {type(fields[name]).__name__}"
    for name in _TIME_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"field {name} must be a number or null, not {type(value).__name__}"
        try:
            finite = math.isfinite(float(value))
        except OverflowError:  # an int beyond float range
            finite = False
        if not finite:
            return f"field {name} must be a finite number"
    version = fields.get("version", 0)
    if not _is_int(version) or not 0 <= version <= MAX_VERSION:
        return "field version must be an integer from 0 to 2**63 - 1"
    return None


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

    @functools.cached_property
    def digest(self) -> str:
        """A stable hex digest of (provider, session): how storages name the entry without the session id."""
        raw = f"{self.provider_id}\0{self.session_id}".encode("utf-8", "surrogatepass")
        return hashlib.sha256(raw).hexdigest()[:32]
