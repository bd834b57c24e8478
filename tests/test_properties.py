"""Properties over arbitrary input: reading a token answer is total and quiet; the entry codec checks, round-trips."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import attrs
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from httpx_upstream_auth import (
    BindingMismatch,
    ReauthenticationRequired,
    RefreshFailed,
    UpstreamAuthError,
    UpstreamTokens,
)
from httpx_upstream_auth._models import EARLIEST_TIME, LATEST_TIME
from httpx_upstream_auth._oauth import MAX_LIFETIME, REGISTERED_ERRORS, merge_response

# database=None: failing examples are printed, not saved into the shared working tree.
SETTINGS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SENT_AT = 1_700_000_000.0
SECRETS = ("at-SECRET-7f3a9c", "rt-SECRET-0b5e2d", "idt-SECRET-c41d88", "misc-SECRET-9a0f17")


def jwt(claims: Any) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJub25lIn0.{payload}."


STORED = UpstreamTokens(
    access_token="stored-access",
    refresh_token="stored-refresh",
    id_token=jwt({"sub": "alice"}),
    scope="read",
    expires_at=SENT_AT - 10,
    refresh_expires_at=SENT_AT + 1000,
    issued_at=SENT_AT - 3610,
    provider_id="github",
    user_id="u-1",
    upstream_subject="alice",
    client_id="my-app",
    version=4,
)

# -- strategies for token answers ---------------------------------------------------------------------------

FIELDS = [
    "access_token",
    "refresh_token",
    "id_token",
    "token_type",
    "scope",
    "expires_in",
    "refresh_expires_in",
    "refresh_token_expires_in",
    "error",
    "error_description",
]
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 3600, 0.5, 10**400, MAX_LIFETIME, MAX_LIFETIME + 1]),
)
texts = st.one_of(
    st.sampled_from(SECRETS),
    st.sampled_from(["", " ", "Bearer", "invalid_grant", "server_error", "read write", "3600.5", "inf", "nan"]),
    st.sampled_from(["1e999", "-5", "0x10", "\ud800", "caf\u00e9", "a\nb", jwt({"sub": "alice"}), jwt({"sub": 7})]),
    st.builds(jwt, st.fixed_dictionaries({"sub": st.sampled_from(["alice", "mallory", *SECRETS])})),
    st.text(max_size=12),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), children, max_size=4),
    ),
    max_leaves=12,
)
token_objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=8)


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity come out as the non-standard literals, on purpose


bodies = st.one_of(
    token_objects.map(encode),
    json_values.map(encode),
    st.binary(max_size=64),
    st.integers(min_value=1, max_value=5000).map(lambda depth: b'{"access_token":"a","x":' + b"[" * depth),
    st.integers(min_value=1, max_value=5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from(SECRETS).map(lambda secret: f'{{"access_token":"{secret}","expires_in":1e999}}'.encode()),
)
statuses = st.one_of(
    st.sampled_from([200, 201, 204, 301, 307, 400, 401, 403, 429, 500, 503]), st.integers(min_value=-1, max_value=1000)
)


def _oauth_error(content: bytes) -> bool:
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"] in REGISTERED_ERRORS


def finite_in(value: float | None, low: float, high: float) -> bool:
    return value is None or (math.isfinite(value) and low <= value <= high)


@SETTINGS
@given(status=statuses, content=bodies)
def test_merge_response_is_total_bounded_and_quiet(status: int, content: bytes) -> None:
    """Any status and body give an entry with bounded numbers and the stored binding, or a quiet UpstreamAuthError."""
    try:
        fresh = merge_response(STORED, status, content, SENT_AT)
    except UpstreamAuthError as exc:
        assert isinstance(exc, (ReauthenticationRequired, RefreshFailed, BindingMismatch))
        assert exc.__cause__ is None and exc.__context__ is None
        for text in (str(exc), repr(exc)):
            assert "a bug in httpx-upstream-auth" not in text
            for secret in SECRETS:
                assert secret not in text
        if isinstance(exc, RefreshFailed) and not 200 <= status < 300:
            # Only the authorization server's own OAuth error proves nothing was consumed; a 5xx without one
            # (a gateway's) may follow a redemption.
            assert exc.may_have_rotated is (status >= 500 and not _oauth_error(content))
        return
    assert 200 <= status < 300
    assert isinstance(fresh.access_token, str) and fresh.access_token
    assert fresh.refresh_token is None or isinstance(fresh.refresh_token, str)
    assert fresh.id_token is None or isinstance(fresh.id_token, str)
    assert isinstance(fresh.token_type, str) and fresh.token_type
    assert fresh.scope is None or isinstance(fresh.scope, str)
    assert finite_in(fresh.expires_at, SENT_AT, SENT_AT + MAX_LIFETIME)
    assert fresh.refresh_expires_at in (None, STORED.refresh_expires_at) or finite_in(
        fresh.refresh_expires_at, SENT_AT, SENT_AT + MAX_LIFETIME
    )
    assert fresh.issued_at == SENT_AT
    assert fresh.version == STORED.version + 1
    binding = ("provider_id", "user_id", "upstream_subject", "client_id")
    assert [getattr(fresh, name) for name in binding] == [getattr(STORED, name) for name in binding]
    assert UpstreamTokens.from_json(fresh.to_json()) == fresh


@SETTINGS
@given(
    refresh=st.sampled_from(SECRETS),
    extra=st.dictionaries(st.sampled_from(FIELDS[2:]) | st.text(max_size=6), json_values, max_size=6),
    access=json_values,
    depth=st.integers(min_value=0, max_value=3000),
)
def test_usable_refresh_token_in_200_is_never_dropped(
    refresh: str, extra: dict[str, Any], access: Any, depth: int
) -> None:
    """A 200 carrying a usable refresh_token yields an entry holding it, whatever else it carries (id_token aside)."""
    answer = {**extra, "access_token": access, "refresh_token": refresh}
    answer.pop("id_token", None)  # a foreign id_token is a BindingMismatch by design
    # An extra field nested up to 3000 deep, past what json.loads accepts by default.
    content = encode(answer)[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}" if depth else encode(answer)
    fresh = merge_response(STORED, 200, content, SENT_AT)
    assert fresh.refresh_token == refresh


#: A stored entry with nothing for a merge to fall back on: what a login has before its first answer.
BLANK = UpstreamTokens(access_token="blank-access", upstream_subject="alice", version=0)


@SETTINGS
@given(status=statuses, content=bodies)
def test_from_token_response_reads_as_a_refresh_does(status: int, content: bytes) -> None:
    """A login's answer is read by the refresh's parser: from_token_response gives the entry a merge into a blank
    entry gives, or the same typed error (and only adds one: an answer without a usable access token)."""
    response = httpx.Response(status, content=content)
    try:
        merged: UpstreamTokens | UpstreamAuthError = merge_response(BLANK, status, content, SENT_AT)
    except UpstreamAuthError as exc:
        merged = exc
    try:
        made = UpstreamTokens.from_token_response(response, obtained_at=SENT_AT, upstream_subject="alice")
    except UpstreamAuthError as exc:
        assert exc.__cause__ is None and exc.__context__ is None
        if isinstance(merged, UpstreamAuthError):
            assert (type(exc), str(exc)) == (type(merged), str(merged))
        else:
            assert isinstance(exc, RefreshFailed) and merged.access_token == BLANK.access_token
        return
    assert isinstance(merged, UpstreamTokens)
    assert attrs.evolve(made, version=merged.version) == merged


# -- the stored-entry codec ---------------------------------------------------------------------------------

optional_text = st.none() | st.text(max_size=20)
times = st.none() | st.floats(min_value=EARLIEST_TIME, max_value=LATEST_TIME)
entries = st.builds(
    UpstreamTokens,
    access_token=st.text(min_size=1, max_size=20),
    refresh_token=st.none() | st.text(min_size=1, max_size=20),
    id_token=optional_text,
    token_type=st.text(max_size=10),
    scope=optional_text,
    expires_at=times,
    refresh_expires_at=times,
    issued_at=times,
    provider_id=optional_text,
    user_id=optional_text,
    upstream_subject=optional_text,
    client_id=optional_text,
    version=st.integers(min_value=0, max_value=2**63 - 1),
)


@SETTINGS
@given(entries)
def test_codec_round_trips_any_valid_entry(entry: UpstreamTokens) -> None:
    """to_json then from_json (str or bytes) gives back an equal entry."""
    assert UpstreamTokens.from_json(entry.to_json()) == entry
    assert UpstreamTokens.from_json(entry.to_json().encode()) == entry


ENTRY_FIELDS = [field.name for field in attrs.fields(UpstreamTokens)] + ["schema"]
entry_like = st.one_of(
    st.dictionaries(st.sampled_from(ENTRY_FIELDS), json_values, max_size=14),
    st.tuples(entries, st.sampled_from(ENTRY_FIELDS), json_values).map(
        lambda case: {**case[0].to_dict(), case[1]: case[2]}
    ),
)
documents = st.one_of(
    entry_like.map(encode),
    json_values.map(encode),
    st.binary(max_size=64),
    st.text(max_size=64),
    st.integers(min_value=1, max_value=5000).map(lambda depth: "[" * depth + "]" * depth),
)


@SETTINGS
@given(documents)
def test_codec_reads_a_valid_entry_or_raises_value_error(document: str | bytes) -> None:
    """from_json on anything returns a well-typed entry (finite times, int version) or raises ValueError."""
    try:
        entry = UpstreamTokens.from_json(document)
    except ValueError as exc:
        assert exc.__context__ is None
        return
    assert isinstance(entry.access_token, str) and isinstance(entry.token_type, str)
    for name in ("refresh_token", "id_token", "scope", "provider_id", "user_id", "upstream_subject", "client_id"):
        assert getattr(entry, name) is None or isinstance(getattr(entry, name), str)
    for name in ("expires_at", "refresh_expires_at", "issued_at"):
        value = getattr(entry, name)
        assert value is None or (isinstance(value, float) and math.isfinite(value))
    assert type(entry.version) is int and 0 <= entry.version < 2**63
    assert UpstreamTokens.from_json(entry.to_json()) == entry


@pytest.mark.parametrize(
    "change",
    [
        {"access_token": 7},
        {"access_token": None},
        {"version": 1.0},
        {"version": True},
        {"version": -1},
        {"expires_at": float("inf")},
        {"issued_at": float("nan")},
        {"refresh_expires_at": "soon"},
        {"refresh_token": ["x"]},
        {"schema": True},
    ],
    ids=repr,
)
def test_codec_refuses_ill_typed_fields(change: dict[str, Any]) -> None:
    """Each ill-typed field is a ValueError naming the field, not its value."""
    data = {**STORED.to_dict(), **change}
    with pytest.raises(ValueError) as caught:
        UpstreamTokens.from_json(json.dumps(data))
    assert "stored-access" not in str(caught.value) and "stored-refresh" not in str(caught.value)
