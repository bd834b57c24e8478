"""Token entries and identity bindings: frozen values, secrets hidden, JSON with a schema version."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from ._answer import read_token_answer
from ._exceptions import BindingMismatch, RefreshFailed, UpstreamAuthError

__all__ = ["SCHEMA_VERSION", "Binding", "EntryKey", "UpstreamTokens"]

SCHEMA_VERSION = 1
BINDING_FIELDS = ("provider_id", "user_id", "upstream_subject", "client_id")

#: Absolute times are epoch seconds from 2000-01-01 to 2200-01-01 (UTC). Anything outside is a unit mistake
#: (milliseconds, or a lifetime where a time belongs), refused rather than misread as "never expires".
EARLIEST_TIME = 946_684_800.0
LATEST_TIME = 7_258_118_400.0


def _hidden(value: object) -> str:
    return "None" if value is None else "'<hidden>'"


def _time_problem(name: str, value: object) -> str | None:
    """Why ``value`` is not a plausible absolute time for field ``name`` (the value is no secret), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return (
            f"{name} must be absolute epoch seconds (a number, such as time.time() + expires_in) or None for "
            f"unknown, not {type(value).__name__}"
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond float range
        seconds = math.inf
    if not math.isfinite(seconds):
        return f"{name} must be a finite number of epoch seconds, or None for unknown"
    if seconds > LATEST_TIME and EARLIEST_TIME <= seconds / 1000 <= LATEST_TIME:
        return f"{name}={value!r} looks like milliseconds: pass epoch seconds (divide by 1000)"
    if seconds > LATEST_TIME:
        return f"{name}={value!r} is after the year 2200: pass epoch seconds, such as time.time() + expires_in"
    if seconds < EARLIEST_TIME:
        return (
            f"{name}={value!r} is before the year 2000: pass an absolute time, such as time.time() + expires_in, "
            "not a lifetime"
        )
    return None


def is_plausible_time(value: object) -> bool:
    """True for a value :class:`UpstreamTokens` takes as an absolute time: finite epoch seconds, 2000 to 2200."""
    return value is not None and _time_problem("time", value) is None


def _epoch_seconds(name: str, value: object) -> float | None:
    problem = _time_problem(name, value)
    if problem is not None:
        raise ValueError(problem)
    return None if value is None else float(value)  # type: ignore[arg-type]


def _expires_at(value: object) -> float | None:
    return _epoch_seconds("expires_at", value)


def _refresh_expires_at(value: object) -> float | None:
    return _epoch_seconds("refresh_expires_at", value)


def _issued_at(value: object) -> float | None:
    return _epoch_seconds("issued_at", value)


def _check_access_token(instance: object, attribute: object, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError("access_token must be a non-empty string: the access token the provider issued")


def _check_refresh_token(instance: object, attribute: object, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError("refresh_token must be a non-empty string, or None when the provider issued none")


class _Response(Protocol):
    """What :meth:`UpstreamTokens.from_token_response` reads of a response (httpx's, httpx2's, any alike)."""

    @property
    def status_code(self) -> int: ...

    @property
    def content(self) -> bytes: ...


@attrs.frozen(kw_only=True)
class UpstreamTokens:
    """One session's tokens for one upstream provider, plus the identity they are bound to.

    ``expires_at`` and ``refresh_expires_at`` are absolute epoch seconds (``None``: unknown; a token
    with an unknown expiry is refreshed only when the API rejects it). ``issued_at`` is when the access
    token was obtained (it bounds the refresh leeway for short-lived tokens). ``version`` grows with
    every write; storages compare-and-set on it. Secrets never appear in ``repr`` or ``str``.

    Construction checks the values: ``ValueError`` for an empty ``access_token`` or ``refresh_token``, and
    for a time that is not a finite number (a string, a bool) or not plausible epoch seconds (milliseconds,
    a lifetime, before 2000 or after 2200); the message says what to pass. To build an entry from a token
    endpoint's answer, use :meth:`from_token_response`.
    """

    access_token: str = attrs.field(repr=_hidden, validator=_check_access_token)
    refresh_token: str | None = attrs.field(default=None, repr=_hidden, validator=_check_refresh_token)
    id_token: str | None = attrs.field(default=None, repr=_hidden)
    token_type: str = "Bearer"
    scope: str | None = None
    expires_at: float | None = attrs.field(default=None, converter=_expires_at)
    refresh_expires_at: float | None = attrs.field(default=None, converter=_refresh_expires_at)
    issued_at: float | None = attrs.field(default=None, converter=_issued_at)
    provider_id: str | None = None
    user_id: str | None = None
    upstream_subject: str | None = None
    client_id: str | None = None
    issuer: str | None = None
    """The authorization server that issued these tokens (``None``: not recorded); a refresher that knows
    it refreshes only there."""
    dpop_key: str | None = attrs.field(default=None, repr=_hidden)
    """The private key (JWK JSON) these tokens are DPoP-bound to, when the session has its own (a secret,
    like the tokens: see ``DPoPKey.to_jwk``); ``None`` when they are not bound, or bound to a key the
    refresher's configuration holds."""
    version: int = 0

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value (``Bearer`` for any token type spelled that way)."""
        kind = "Bearer" if self.token_type.lower() == "bearer" else self.token_type
        return f"{kind} {self.access_token}"

    @classmethod
    def from_token_response(
        cls,
        answer: Mapping[str, Any] | _Response,
        *,
        obtained_at: float | None = None,
        provider_id: str | None = None,
        user_id: str | None = None,
        upstream_subject: str | None = None,
        client_id: str | None = None,
        issuer: str | None = None,
    ) -> UpstreamTokens:
        """An entry from a token endpoint's answer (after a login's code exchange, say), read as a refresh's is.

        ``answer`` is the answer's JSON object (a dict), or the response itself (``httpx.Response``, an
        httpx2 response, anything with ``status_code`` and read ``content``). ``obtained_at`` is when the
        token request was sent (epoch seconds; default: now, which makes the expiry late by the round
        trip): ``expires_in`` counts from it. The binding fields say whose tokens these are; ``issuer`` the
        authorization server that issued them. A lifetime that is missing, 0, or not a usable number is
        unknown (``None``).

        Raises what a refresh's answer would: :class:`ReauthenticationRequired` for ``invalid_grant``,
        :class:`ConfigurationError` or :class:`RefreshFailed` for other error answers and for an answer
        without a usable ``access_token``, :class:`BindingMismatch` when its id_token names another
        subject than ``upstream_subject``. Messages never quote the answer.
        """
        body: Mapping[str, Any] | bytes
        if isinstance(answer, Mapping):
            status_code, body = 200, answer
        else:
            try:
                status_code, content = answer.status_code, answer.content
            except Exception as exc:  # httpx.ResponseNotRead, or not a response at all
                raise TypeError(
                    f"answer must be the token endpoint's JSON object (a dict) or its response, read (call "
                    f".read() on a streamed one); got {type(answer).__name__} ({type(exc).__name__})"
                ) from None
            if not isinstance(status_code, int) or not isinstance(content, bytes):
                raise TypeError(
                    f"answer must be a dict or a response with status_code and content, not {type(answer).__name__}"
                )
            body = content
        problem = _time_problem("obtained_at", obtained_at)
        if problem is not None:
            raise ValueError(problem)
        fields = read_token_answer(status_code, body)
        # Raised from a frame that no longer holds the answer: error reporters record frame locals.
        del answer, body
        if isinstance(fields, UpstreamAuthError):
            raise fields
        if fields.access_token is None:
            raise RefreshFailed(
                f"the token endpoint's answer (HTTP {status_code}) has no usable access_token; nothing to store.",
                retryable=False,
                status_code=status_code,
            )
        if fields.id_token_given and upstream_subject is not None and fields.id_subject != upstream_subject:
            raise BindingMismatch(
                "the answer's id_token names another subject than upstream_subject (or could not be read)."
            )
        now = time.time() if obtained_at is None else obtained_at
        return cls(
            access_token=fields.access_token,
            refresh_token=fields.refresh_token,
            id_token=fields.id_token,
            token_type=fields.token_type or "Bearer",
            scope=fields.scope,
            expires_at=now + fields.lifetime if fields.lifetime else None,
            refresh_expires_at=(
                now + fields.refresh_lifetime if fields.refresh_token and fields.refresh_lifetime else None
            ),
            issued_at=now,
            provider_id=provider_id,
            user_id=user_id,
            upstream_subject=upstream_subject,
            client_id=client_id,
            issuer=issuer,
        )

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
_OPTIONAL_STRING_FIELDS = ("refresh_token", "id_token", "scope", "issuer", "dpop_key", *BINDING_FIELDS)
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
    if problem:
        return ValueError(f"token entry {problem}")
    # Entries written before the constructor checked plausibility still read (a store must not fail on its own
    # old rows): an implausible time is unknown, and an empty refresh token none, as an answer's would be.
    for name in _TIME_FIELDS:
        if _time_problem(name, fields.get(name)) is not None:
            fields[name] = None
    if fields.get("refresh_token") == "":
        fields["refresh_token"] = None
    return cls(**fields)


def _problem(fields: dict[str, Any]) -> str | None:
    """What keeps ``fields`` (known names only) from making a valid entry; the field, never its value."""
    if "access_token" not in fields:
        return "has no access_token"
    if fields["access_token"] == "":
        return "has an empty access_token"
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
