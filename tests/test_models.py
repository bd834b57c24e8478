"""The pure core: token entries, bindings, freshness, and what a 401 or a body means (no I/O)."""

from __future__ import annotations

import json
import time
import types
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import httpx
import pytest

from httpx_upstream_auth import (
    Binding,
    BindingMismatch,
    ConfigurationError,
    EntryKey,
    FreshnessPolicy,
    ReauthenticationRequired,
    RefreshFailed,
    UpstreamTokens,
    can_replay,
    is_token_rejected,
)
from httpx_upstream_auth._models import SCHEMA_VERSION

ACCESS = "at-SECRET-access-0123456789"
REFRESH = "rt-SECRET-refresh-0123456789"
ID_TOKEN = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.SECRET"
NOW = 1_700_000_000.0


def full_tokens(**changes: Any) -> UpstreamTokens:
    tokens = UpstreamTokens(
        access_token=ACCESS,
        refresh_token=REFRESH,
        id_token=ID_TOKEN,
        token_type="Bearer",
        scope="read write",
        expires_at=NOW + 3600,
        refresh_expires_at=NOW + 86400,
        issued_at=NOW,
        provider_id="github",
        user_id="u-1",
        upstream_subject="12345",
        client_id="my-app",
        version=7,
    )
    return attrs.evolve(tokens, **changes)


# -- serialization -----------------------------------------------------------------------------------


def test_json_round_trip_keeps_every_field() -> None:
    """to_json/from_json give back an equal entry, every field included."""
    tokens = full_tokens()
    assert UpstreamTokens.from_json(tokens.to_json()) == tokens
    assert UpstreamTokens.from_json(tokens.to_json().encode()) == tokens


def test_json_round_trip_with_unknown_expiries() -> None:
    """None expiries and absent optional secrets survive the round trip."""
    tokens = UpstreamTokens(access_token="a")
    again = UpstreamTokens.from_json(tokens.to_json())
    assert again == tokens
    assert again.expires_at is None and again.refresh_token is None and again.version == 0


def test_to_dict_carries_schema_version() -> None:
    """The persisted form names its schema version."""
    data = full_tokens().to_dict()
    assert data["schema"] == SCHEMA_VERSION == 1
    assert json.loads(full_tokens().to_json())["schema"] == SCHEMA_VERSION


def test_newer_schema_is_refused() -> None:
    """An entry written by a newer schema is refused rather than misread."""
    data = full_tokens().to_dict()
    data["schema"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="schema"):
        UpstreamTokens.from_dict(data)
    with pytest.raises(ValueError, match="schema"):
        UpstreamTokens.from_json(json.dumps(data))


def test_non_integer_schema_is_refused() -> None:
    """A schema that is not an integer is refused."""
    data = full_tokens().to_dict()
    data["schema"] = "1"
    with pytest.raises(ValueError):
        UpstreamTokens.from_dict(data)


def test_unknown_keys_from_newer_writers_are_ignored() -> None:
    """Extra keys from a newer writer of the same schema are ignored."""
    data = full_tokens().to_dict()
    data["future_field"] = "x"
    assert UpstreamTokens.from_dict(data) == full_tokens()


def test_from_json_refuses_non_object() -> None:
    """A JSON value that is not an object is refused."""
    with pytest.raises(ValueError):
        UpstreamTokens.from_json("[1, 2]")


def test_expiries_are_converted_to_float() -> None:
    """Integer expiries become floats, so equality does not depend on how a backend stored them."""
    tokens = UpstreamTokens(
        access_token="a", expires_at=1_700_000_010, refresh_expires_at=1_700_000_020, issued_at=1_700_000_005
    )
    assert isinstance(tokens.expires_at, float)
    assert isinstance(tokens.refresh_expires_at, float)
    assert isinstance(tokens.issued_at, float)


# -- validated inputs ----------------------------------------------------------------------------------

MILLIS = NOW * 1000


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"access_token": ""}, "access_token must be a non-empty string"),
        ({"refresh_token": ""}, "refresh_token must be a non-empty string, or None"),
        ({"expires_at": MILLIS}, "looks like milliseconds: pass epoch seconds (divide by 1000)"),
        ({"expires_at": "1700000000"}, "expires_at must be absolute epoch seconds"),
        ({"expires_at": True}, "not bool"),
        ({"expires_at": float("nan")}, "expires_at must be a finite number"),
        ({"expires_at": float("inf")}, "expires_at must be a finite number"),
        ({"expires_at": 10**400}, "expires_at must be a finite number"),
        ({"expires_at": 3600}, "is before the year 2000: pass an absolute time, such as time.time() + expires_in"),
        ({"expires_at": 1e13}, "is after the year 2200"),
        ({"refresh_expires_at": MILLIS}, "refresh_expires_at=1700000000000.0 looks like milliseconds"),
        ({"issued_at": "now"}, "issued_at must be absolute epoch seconds"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_entries_refuse_values_that_cannot_be_right(changes: dict[str, Any], says: str) -> None:
    """An empty token, a time that is not a finite number, or one that is not plausible epoch seconds
    (milliseconds, a lifetime) is a ValueError saying what to pass, and never quoting a token."""
    with pytest.raises(ValueError) as caught:
        full_tokens(**changes)
    assert says in str(caught.value)
    assert ACCESS not in str(caught.value) and REFRESH not in str(caught.value)


def test_the_plausible_range_is_2000_to_2200() -> None:
    """Times from 2000-01-01 to 2200-01-01 (UTC) are taken, as ints or floats; one second outside is not."""
    for good in (946_684_800, 946_684_800.0, NOW, 7_258_118_400):
        assert full_tokens(expires_at=good).expires_at == float(good)
    for bad in (946_684_799, 7_258_118_401):
        with pytest.raises(ValueError):
            full_tokens(expires_at=bad)


def test_stored_rows_with_implausible_times_read_as_unknown() -> None:
    """A row an older version wrote with an implausible time (milliseconds, a lifetime) or an empty refresh
    token still reads: the time is unknown and the refresh token none, as an answer's would be. An empty
    access token stays unreadable (this library never wrote one)."""
    data = full_tokens().to_dict()
    data.update(expires_at=MILLIS, refresh_expires_at=3600, issued_at=1e13, refresh_token="")
    entry = UpstreamTokens.from_json(json.dumps(data))
    assert (entry.expires_at, entry.refresh_expires_at, entry.issued_at, entry.refresh_token) == (None,) * 4
    assert entry.access_token == ACCESS and entry.version == 7
    data["access_token"] = ""
    with pytest.raises(ValueError, match="empty access_token"):
        UpstreamTokens.from_dict(data)


@pytest.mark.parametrize("value", [float("nan"), 10**400])
def test_stored_rows_with_times_that_are_no_finite_number_are_unreadable(value: object) -> None:
    """A stored time that is NaN or an integer beyond a float's range makes the row unreadable (a ValueError
    saying which field), rather than a row with a time no comparison can use."""
    data = full_tokens().to_dict()
    data["expires_at"] = value
    with pytest.raises(ValueError, match="field expires_at must be a finite number"):
        UpstreamTokens.from_dict(data)


ANSWER = {
    "access_token": ACCESS,
    "refresh_token": REFRESH,
    "token_type": "bearer",
    "expires_in": 3600,
    "refresh_token_expires_in": 86400,
    "scope": ["read", "write"],
}


def test_from_token_response_reads_a_dict_or_a_response() -> None:
    """A token answer (its JSON object, an httpx response or an httpx2 response) becomes an entry: lifetimes
    counted from obtained_at, the binding fields as given, version 0."""
    import httpx2

    binding: dict[str, Any] = {
        "provider_id": "github",
        "user_id": "u-1",
        "upstream_subject": "12345",
        "client_id": "my-app",
    }
    expected = UpstreamTokens(
        access_token=ACCESS,
        refresh_token=REFRESH,
        token_type="bearer",
        scope="read write",
        expires_at=NOW + 3600,
        refresh_expires_at=NOW + 86400,
        issued_at=NOW,
        issuer="https://as.example",
        **binding,
    )
    answers: list[Any] = [ANSWER, httpx.Response(200, json=ANSWER), httpx2.Response(200, json=ANSWER)]
    for answer in answers:
        made = UpstreamTokens.from_token_response(answer, obtained_at=NOW, issuer="https://as.example", **binding)
        assert made == expected


def test_from_token_response_reads_lifetimes_as_a_refresh_does() -> None:
    """No expires_in, 0, a negative or absurd one: unknown expiry. A string number counts. obtained_at
    defaults to now, and is checked like any time."""
    for lifetime in (None, 0, -5, "soon", float("nan"), 1e12):
        answer = {"access_token": ACCESS} if lifetime is None else {"access_token": ACCESS, "expires_in": lifetime}
        assert UpstreamTokens.from_token_response(answer, obtained_at=NOW).expires_at is None
    counted = UpstreamTokens.from_token_response({"access_token": ACCESS, "expires_in": "60"}, obtained_at=NOW)
    assert counted.expires_at == NOW + 60
    before = time.time()
    made = UpstreamTokens.from_token_response({"access_token": ACCESS, "expires_in": 60})
    assert made.issued_at is not None and before <= made.issued_at <= time.time()
    with pytest.raises(ValueError, match=r"obtained_at=.* looks like milliseconds"):
        UpstreamTokens.from_token_response(ANSWER, obtained_at=MILLIS)


def test_from_token_response_raises_what_a_refresh_would() -> None:
    """Error answers and unusable ones raise the typed errors a refresh's answer gets, without quoting it."""
    cases: list[tuple[Any, type[Exception]]] = [
        (httpx.Response(400, json={"error": "invalid_grant"}), ReauthenticationRequired),
        (httpx.Response(401, json={"error": "invalid_client"}), ConfigurationError),
        (httpx.Response(404, text="<html>not found</html>"), ConfigurationError),
        (httpx.Response(503, json={"error": "temporarily_unavailable"}), RefreshFailed),
        (httpx.Response(200, text=f"<html>{ACCESS}</html>"), RefreshFailed),
        ({"refresh_token": REFRESH}, RefreshFailed),
        ({"access_token": ACCESS + "\n"}, RefreshFailed),
        ({"access_token": ACCESS, "id_token": ID_TOKEN.replace("eyJzdWIiOiJhbGljZSJ9", "e30")}, BindingMismatch),
    ]
    for answer, kind in cases:
        with pytest.raises(kind) as caught:
            UpstreamTokens.from_token_response(answer, obtained_at=NOW, upstream_subject="alice")
        assert ACCESS not in str(caught.value) and REFRESH not in str(caught.value)


def test_from_token_response_needs_a_read_response() -> None:
    """A streamed response not read yet, or something that is no answer at all, is a TypeError saying so."""
    streamed = httpx.Response(200, stream=httpx.ByteStream(json.dumps(ANSWER).encode()))
    with pytest.raises(TypeError, match="read"):
        UpstreamTokens.from_token_response(streamed)
    streamed.read()
    assert UpstreamTokens.from_token_response(streamed).access_token == ACCESS
    with pytest.raises(TypeError):
        UpstreamTokens.from_token_response("access_token=x")  # type: ignore[arg-type]
    # response-shaped, but its content is text: a TypeError naming the type, not a misread answer
    odd = types.SimpleNamespace(status_code=200, content=json.dumps(ANSWER))
    with pytest.raises(TypeError, match="a response with status_code and content, not SimpleNamespace"):
        UpstreamTokens.from_token_response(odd)


# -- secrets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("render", [repr, str])
def test_secrets_never_in_repr_or_str(render: object) -> None:
    """repr and str of an entry show no access, refresh or id token, but do show the binding."""
    text = render(full_tokens())  # type: ignore[operator]
    for secret in (ACCESS, REFRESH, ID_TOKEN, "SECRET"):
        assert secret not in text
    assert "<hidden>" in text
    assert "u-1" in text and "github" in text


def test_authorization_header() -> None:
    """authorization is 'Bearer <token>' for any spelling of bearer, else the declared type."""
    assert full_tokens().authorization == f"Bearer {ACCESS}"
    assert full_tokens(token_type="bearer").authorization == f"Bearer {ACCESS}"
    assert full_tokens(token_type="DPoP").authorization == f"DPoP {ACCESS}"


def test_entry_key_never_prints_the_session_id() -> None:
    """An EntryKey prints as provider:digest; the session id (maybe a bearer cookie) is in neither str nor repr."""
    key = EntryKey("github", "cookie-secret-1")
    assert str(key) == f"github:{key.digest[:12]}"
    assert "cookie-secret-1" not in str(key) and "cookie-secret-1" not in repr(key)
    assert key.digest == EntryKey("github", "cookie-secret-1").digest != EntryKey("github", "cookie-secret-2").digest
    assert EntryKey("a:b", "c").digest != EntryKey("a", "b:c").digest
    assert len(EntryKey("p", "\ud800").digest) == 32  # a lone surrogate does not raise


# -- bindings ------------------------------------------------------------------------------------------


def test_binding_check_passes_on_match_and_ignores_unset_fields() -> None:
    """A binding whose set fields all match passes; unset fields are not checked."""
    Binding().check(full_tokens())
    Binding(user_id="u-1").check(full_tokens())
    Binding(provider_id="github", user_id="u-1", upstream_subject="12345", client_id="my-app").check(full_tokens())


@pytest.mark.parametrize("field", ["provider_id", "user_id", "upstream_subject", "client_id"])
def test_binding_check_raises_on_any_differing_field(field: str) -> None:
    """Any set binding field that differs raises BindingMismatch naming the field, not the tokens."""
    with pytest.raises(BindingMismatch) as caught:
        Binding(**{field: "mallory"}).check(full_tokens())
    assert field in str(caught.value)
    assert ACCESS not in str(caught.value) and REFRESH not in str(caught.value)


def test_binding_check_fails_when_entry_has_no_value() -> None:
    """A binding field set by the caller fails against an entry that lacks it."""
    with pytest.raises(BindingMismatch):
        Binding(user_id="u-1").check(full_tokens(user_id=None))


# -- freshness -----------------------------------------------------------------------------------------


def test_one_second_token_just_issued_is_fresh() -> None:
    """A 1-second token just issued is fresh despite a 30 s leeway (the leeway is capped by the lifetime)."""
    policy = FreshnessPolicy(leeway=30.0)
    tokens = full_tokens(issued_at=NOW, expires_at=NOW + 1)
    assert policy.is_fresh(tokens, NOW)
    assert policy.is_fresh(tokens, NOW + 0.5)
    assert not policy.is_fresh(tokens, NOW + 1)


def test_leeway_capped_at_fraction_of_lifetime() -> None:
    """The effective leeway is min(leeway, fraction * lifetime)."""
    policy = FreshnessPolicy(leeway=30.0, max_leeway_fraction=0.25)
    short = full_tokens(issued_at=NOW, expires_at=NOW + 40)
    assert policy.bounds(short).leeway_for(0.0) == 10.0
    assert policy.bounds(short).fresh_until() == NOW + 30
    long = full_tokens(issued_at=NOW, expires_at=NOW + 3600)
    assert policy.bounds(long).leeway_for(0.0) == 30.0
    assert policy.is_fresh(long, NOW + 3569)
    assert not policy.is_fresh(long, NOW + 3570)


def test_leeway_without_issued_at_is_the_full_leeway() -> None:
    """Without issued_at the lifetime is unknown, so the configured leeway applies."""
    policy = FreshnessPolicy(leeway=30.0)
    tokens = full_tokens(issued_at=None, expires_at=NOW + 100)
    assert policy.bounds(tokens).leeway_for(0.0) == 30.0
    assert policy.is_fresh(tokens, NOW + 69)
    assert not policy.is_fresh(tokens, NOW + 70)


def test_refresh_ahead_without_issued_at_is_the_full_window_and_no_floor() -> None:
    """Without issued_at the lifetime is unknown: refresh ahead starts the configured seconds before the leeway,
    with no floor from a fraction of the lifetime; with it, the window is capped and floored by the lifetime."""
    policy = FreshnessPolicy(leeway=30.0, refresh_ahead=600.0, max_ahead_fraction=0.5)
    unknown = full_tokens(issued_at=None, expires_at=NOW + 100)
    assert policy.ahead_window(unknown) == 600.0 and policy.ahead_floor(unknown) == float("-inf")
    known = full_tokens(issued_at=NOW, expires_at=NOW + 100)
    assert policy.ahead_window(known) == 50.0 and policy.ahead_floor(known) == NOW + 50


def test_unknown_expiry_is_always_fresh() -> None:
    """A token without expires_at is fresh at any time (refreshed only when the API rejects it)."""
    policy = FreshnessPolicy()
    tokens = full_tokens(expires_at=None)
    assert policy.bounds(tokens).fresh_until() == float("inf")
    assert policy.is_fresh(tokens, NOW + 10**9)


def test_expired_token_is_not_fresh() -> None:
    """A token past its expiry is not fresh."""
    assert not FreshnessPolicy().is_fresh(full_tokens(expires_at=NOW - 1, issued_at=NOW - 3601), NOW)


# -- rejected tokens -----------------------------------------------------------------------------------


def response(status: int, *challenges: str) -> httpx.Response:
    return httpx.Response(status, headers=[("WWW-Authenticate", c) for c in challenges])


def test_401_bearer_is_rejected() -> None:
    """A 401 with a Bearer challenge means the token was rejected."""
    assert is_token_rejected(response(401, 'Bearer error="invalid_token"'))
    assert is_token_rejected(response(401, "bearer"))


def test_401_without_header_is_rejected() -> None:
    """A 401 without WWW-Authenticate counts as a rejected token (many APIs omit it)."""
    assert is_token_rejected(response(401))


def test_401_with_bearer_among_challenges_is_rejected() -> None:
    """A Bearer challenge among several counts, in one header or in separate ones."""
    assert is_token_rejected(response(401, 'Basic realm="x"', 'Bearer realm="y"'))
    assert is_token_rejected(response(401, 'Basic realm="x", Bearer realm="y"'))


def test_401_basic_only_is_not_rejected() -> None:
    """A 401 whose only challenges are for other schemes is not about our token."""
    assert not is_token_rejected(response(401, 'Basic realm="api"'))
    assert not is_token_rejected(response(401, 'Basic realm="api"', "Digest realm=x"))


@pytest.mark.parametrize("status", [200, 400, 403, 404, 500])
def test_other_statuses_are_not_rejected(status: int) -> None:
    """Only a 401 means the token was rejected; 403 (and anything else) does not."""
    assert not is_token_rejected(response(status, 'Bearer error="insufficient_scope"'))


# -- replayable bodies ---------------------------------------------------------------------------------


def test_in_memory_bodies_can_replay() -> None:
    """Requests without a body, or with bytes, form, or JSON bodies can be sent again."""
    assert can_replay(httpx.Request("GET", "https://x/"))
    assert can_replay(httpx.Request("POST", "https://x/", content=b"abc"))
    assert can_replay(httpx.Request("POST", "https://x/", data={"a": "1"}))
    assert can_replay(httpx.Request("POST", "https://x/", json={"a": 1}))


def test_generator_body_cannot_replay() -> None:
    """A request streaming from a generator is one-shot."""

    def gen() -> Iterator[bytes]:
        yield b"abc"

    assert not can_replay(httpx.Request("POST", "https://x/", content=gen()))


def test_async_generator_body_cannot_replay() -> None:
    """A request streaming from an async generator is one-shot."""

    async def agen() -> AsyncIterator[bytes]:
        yield b"abc"

    assert not can_replay(httpx.Request("POST", "https://x/", content=agen()))


def test_read_generator_body_can_replay() -> None:
    """Once a streamed body has been read into memory, it can be sent again."""

    def gen() -> Iterator[bytes]:
        yield b"abc"

    request = httpx.Request("POST", "https://x/", content=gen())
    request.read()
    assert can_replay(request)


def test_leeway_grows_with_observed_latency_up_to_a_third_of_the_lifetime() -> None:
    """A token must outlive the request carrying it: the leeway is at least the latency, capped at 35% of its life."""
    policy = FreshnessPolicy()
    one_second = full_tokens(issued_at=NOW, expires_at=NOW + 1)
    assert policy.bounds(one_second).leeway_for(0.0) == pytest.approx(0.1)
    assert policy.bounds(one_second).leeway_for(0.3) == pytest.approx(0.3)
    assert policy.bounds(one_second).leeway_for(5.0) == pytest.approx(0.35)
    hour = full_tokens(issued_at=NOW, expires_at=NOW + 3600)
    assert policy.bounds(hour).leeway_for(2.0) == 30.0
    assert not policy.is_fresh(one_second, NOW + 0.75, latency=0.3)
    assert policy.is_fresh(one_second, NOW + 0.75, latency=0.0)
