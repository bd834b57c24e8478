"""The refresh_token grant, sans-I/O (request building, merging, error classification) and OAuth2Refresher's edges."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import attrs
import httpx
import pytest

from httpx_upstream_auth import (
    BindingMismatch,
    OAuth2Refresher,
    ReauthenticationRequired,
    RefreshFailed,
    SystemClock,
    UpstreamAuthError,
    UpstreamTokens,
)
from httpx_upstream_auth._oauth import build_refresh_request, check_token_url, merge_response
from httpx_upstream_auth.testing import serve

ACCESS = "at-OLD-SECRET-access"
REFRESH = "rt-OLD-SECRET-refresh"
NEW_ACCESS = "at-NEW-SECRET-access"
NEW_REFRESH = "rt-NEW-SECRET-refresh"
CLIENT_SECRET = "cs-SECRET-client"
SECRETS = (ACCESS, REFRESH, NEW_ACCESS, NEW_REFRESH, CLIENT_SECRET)
SENT_AT = 1_700_000_000.0


def stored(**changes: Any) -> UpstreamTokens:
    tokens = UpstreamTokens(
        access_token=ACCESS,
        refresh_token=REFRESH,
        id_token=None,
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
    return attrs.evolve(tokens, **changes)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def jwt(**claims: Any) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}."


def assert_no_secrets(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


# -- building the request ------------------------------------------------------------------------------


def form(text: str) -> list[tuple[str, str]]:
    return sorted(parse_qsl(text, keep_blank_values=True, strict_parsing=True))


def test_build_basic() -> None:
    """client_secret_basic: urlencoded id:secret in a Basic header, neither in the body."""
    request = build_refresh_request(
        token_url="https://p.example/token",
        client_id="my:app",
        client_secret="s/e:c",
        auth_method="client_secret_basic",
        refresh_token=REFRESH,
        scope=None,
    )
    assert request.url == "https://p.example/token"
    assert request.headers == {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
        "Authorization": "Basic " + base64.b64encode(b"my%3Aapp:s%2Fe%3Ac").decode(),
    }
    assert form(request.body) == [("grant_type", "refresh_token"), ("refresh_token", REFRESH)]


def test_build_post() -> None:
    """client_secret_post: id and secret in the form body, no Authorization header."""
    request = build_refresh_request(
        token_url="https://p.example/token",
        client_id="my-app",
        client_secret=CLIENT_SECRET,
        auth_method="client_secret_post",
        refresh_token=REFRESH,
        scope=None,
    )
    assert request.headers == {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    assert form(request.body) == sorted(
        [
            ("grant_type", "refresh_token"),
            ("refresh_token", REFRESH),
            ("client_id", "my-app"),
            ("client_secret", CLIENT_SECRET),
        ]
    )


def test_build_none() -> None:
    """Public clients ('none'): client_id in the body, no secret anywhere."""
    request = build_refresh_request(
        token_url="https://p.example/token",
        client_id="my-app",
        client_secret=None,
        auth_method="none",
        refresh_token=REFRESH,
        scope=None,
    )
    assert request.headers == {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    assert form(request.body) == sorted(
        [("grant_type", "refresh_token"), ("refresh_token", REFRESH), ("client_id", "my-app")]
    )


def test_build_scope_and_extra_params() -> None:
    """A configured scope and extra parameters are sent in the form."""
    request = build_refresh_request(
        token_url="https://p.example/token",
        client_id="my-app",
        client_secret=CLIENT_SECRET,
        auth_method="client_secret_basic",
        refresh_token=REFRESH,
        scope="read write",
        extra_params={"resource": "https://api.example"},
    )
    assert form(request.body) == sorted(
        [
            ("grant_type", "refresh_token"),
            ("refresh_token", REFRESH),
            ("scope", "read write"),
            ("resource", "https://api.example"),
        ]
    )


def test_refresh_request_repr_hides_secrets() -> None:
    """A RefreshRequest's repr shows the URL, not its headers or body."""
    request = build_refresh_request(
        token_url="https://p.example/token",
        client_id="my-app",
        client_secret=CLIENT_SECRET,
        auth_method="client_secret_post",
        refresh_token=REFRESH,
        scope=None,
    )
    assert "p.example" in repr(request)
    assert_no_secrets(repr(request))


# -- merging the answer --------------------------------------------------------------------------------


def test_merge_takes_token_fields_from_response() -> None:
    """A full answer gives the new access and refresh tokens, expiries from sent_at, and version + 1."""
    fresh = merge_response(
        stored(),
        200,
        body(
            access_token=NEW_ACCESS,
            token_type="Bearer",
            expires_in=3600,
            refresh_token=NEW_REFRESH,
            refresh_expires_in=7200,
            scope="read write",
        ),
        SENT_AT,
    )
    assert fresh.access_token == NEW_ACCESS
    assert fresh.refresh_token == NEW_REFRESH
    assert fresh.expires_at == SENT_AT + 3600
    assert fresh.refresh_expires_at == SENT_AT + 7200
    assert fresh.issued_at == SENT_AT
    assert fresh.scope == "read write"
    assert fresh.version == stored().version + 1


def test_merge_keeps_binding_fields_from_stored() -> None:
    """Binding fields always come from the stored entry, whatever the response says."""
    fresh = merge_response(
        stored(),
        200,
        body(
            access_token=NEW_ACCESS,
            token_type="Bearer",
            expires_in=60,
            provider_id="evil",
            user_id="mallory",
            upstream_subject="mallory",
            client_id="evil-app",
        ),
        SENT_AT,
    )
    assert (fresh.provider_id, fresh.user_id, fresh.upstream_subject, fresh.client_id) == (
        "github",
        "u-1",
        "alice",
        "my-app",
    )


def test_merge_keeps_omitted_refresh_id_token_and_scope() -> None:
    """refresh_token, id_token and scope are kept from the stored entry when the response omits them."""
    id_token = jwt(sub="alice")
    fresh = merge_response(
        stored(id_token=id_token), 200, body(access_token=NEW_ACCESS, token_type="Bearer", expires_in=60), SENT_AT
    )
    assert fresh.refresh_token == REFRESH
    assert fresh.id_token == id_token
    assert fresh.scope == "read"
    # Not rotated and no new lifetime given: the refresh token's known expiry stands.
    assert fresh.refresh_expires_at == stored().refresh_expires_at


def test_merge_empty_refresh_token_keeps_stored() -> None:
    """An empty refresh_token in the answer is treated as omitted."""
    fresh = merge_response(stored(), 200, body(access_token=NEW_ACCESS, token_type="Bearer", refresh_token=""), SENT_AT)
    assert fresh.refresh_token == REFRESH


def test_merge_missing_expires_in_means_unknown() -> None:
    """No expires_in: the new access token's expiry is unknown (None), not the stored one."""
    fresh = merge_response(stored(), 200, body(access_token=NEW_ACCESS, token_type="Bearer"), SENT_AT)
    assert fresh.expires_at is None


def test_merge_expires_at_counts_from_sent_at() -> None:
    """expires_at is sent_at + expires_in (a slow answer makes the expiry early, never late)."""
    fresh = merge_response(stored(), 200, body(access_token=NEW_ACCESS, token_type="Bearer", expires_in=0.5), SENT_AT)
    assert fresh.expires_at == SENT_AT + 0.5
    fresh = merge_response(stored(), 200, body(access_token=NEW_ACCESS, token_type="Bearer", expires_in="120"), SENT_AT)
    assert fresh.expires_at == SENT_AT + 120


def test_merge_refresh_token_expires_in_is_honoured() -> None:
    """refresh_token_expires_in (GitHub's spelling) sets refresh_expires_at too."""
    fresh = merge_response(
        stored(),
        200,
        body(access_token=NEW_ACCESS, token_type="Bearer", refresh_token=NEW_REFRESH, refresh_token_expires_in=900),
        SENT_AT,
    )
    assert fresh.refresh_expires_at == SENT_AT + 900


def test_merge_rotated_without_lifetime_forgets_old_refresh_expiry() -> None:
    """A rotated refresh token without a stated lifetime does not inherit the old token's expiry."""
    fresh = merge_response(
        stored(), 200, body(access_token=NEW_ACCESS, token_type="Bearer", refresh_token=NEW_REFRESH), SENT_AT
    )
    assert fresh.refresh_expires_at is None


def test_merge_id_token_same_subject_is_taken() -> None:
    """A new id_token for the stored subject replaces the stored one."""
    id_token = jwt(sub="alice", n=2)
    fresh = merge_response(
        stored(id_token=jwt(sub="alice")),
        200,
        body(access_token=NEW_ACCESS, token_type="Bearer", id_token=id_token),
        SENT_AT,
    )
    assert fresh.id_token == id_token


def test_merge_id_token_other_subject_is_binding_mismatch() -> None:
    """A new id_token naming another subject raises BindingMismatch (and leaks nothing)."""
    with pytest.raises(BindingMismatch) as caught:
        merge_response(
            stored(),
            200,
            body(access_token=NEW_ACCESS, token_type="Bearer", refresh_token=NEW_REFRESH, id_token=jwt(sub="mallory")),
            SENT_AT,
        )
    assert_no_secrets(str(caught.value))
    assert_no_secrets(repr(caught.value))


def test_merge_id_token_without_subject_is_binding_mismatch() -> None:
    """An unreadable id_token cannot prove the subject: BindingMismatch."""
    with pytest.raises(BindingMismatch):
        merge_response(stored(), 200, body(access_token=NEW_ACCESS, token_type="Bearer", id_token="not-a-jwt"), SENT_AT)


def test_merge_token_type_defaults_to_stored() -> None:
    """A missing token_type keeps the stored one."""
    fresh = merge_response(stored(token_type="Bearer"), 200, body(access_token=NEW_ACCESS), SENT_AT)
    assert fresh.token_type == "Bearer"


# -- classifying errors --------------------------------------------------------------------------------


def classify(status: int, payload: bytes) -> UpstreamAuthError:
    with pytest.raises(UpstreamAuthError) as caught:
        merge_response(stored(), status, payload, SENT_AT)
    assert_no_secrets(str(caught.value))
    assert_no_secrets(repr(caught.value))
    return caught.value


def test_invalid_grant_is_reauthentication_required() -> None:
    """invalid_grant means the grant is dead: ReauthenticationRequired."""
    error = classify(400, body(error="invalid_grant", error_description=f"token {REFRESH} revoked"))
    assert isinstance(error, ReauthenticationRequired)


@pytest.mark.parametrize(
    ("status", "payload"),
    [
        (500, body(error="server_error")),
        (503, body(error="temporarily_unavailable")),
        (429, body(error="slow_down")),
        (502, b"<html>bad gateway</html>"),
        (400, body(error="temporarily_unavailable")),
    ],
)
def test_unavailable_is_retryable_refresh_failed(status: int, payload: bytes) -> None:
    """5xx, 429 and the temporary OAuth errors give a retryable RefreshFailed with the status."""
    error = classify(status, payload)
    assert isinstance(error, RefreshFailed)
    assert error.retryable is True
    assert error.status_code == status


@pytest.mark.parametrize(
    ("status", "payload"),
    [
        (401, body(error="invalid_client")),
        (400, body(error="unauthorized_client")),
        (400, body(error="invalid_scope")),
        (404, b"not found"),
    ],
)
def test_configuration_errors_are_not_retryable(status: int, payload: bytes) -> None:
    """invalid_client and other refusals need a configuration change: RefreshFailed, not retryable."""
    error = classify(status, payload)
    assert isinstance(error, RefreshFailed)
    assert error.retryable is False


def test_error_field_in_200_is_an_error() -> None:
    """An 'error' in a 200 answer is still an error."""
    assert isinstance(classify(200, body(error="invalid_grant")), ReauthenticationRequired)


@pytest.mark.parametrize(
    "payload",
    [
        b"<html>upstream proxy error</html>",
        b"",
        b"[1, 2]",
        body(token_type="Bearer", expires_in=60),
        body(access_token="", token_type="Bearer"),
        body(access_token=None, token_type="Bearer"),
        body(access_token={"a": 1}, token_type="Bearer"),
    ],
    ids=["html", "empty", "array", "no-access-token", "empty-access-token", "null-access-token", "object-access-token"],
)
def test_malformed_200_is_refresh_failed(payload: bytes) -> None:
    """A 200 that is not a token response (not JSON, no usable access_token string) is RefreshFailed, retryable."""
    error = classify(200, payload)
    assert isinstance(error, RefreshFailed)
    assert error.retryable is True


# -- OAuth2Refresher configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://provider.example/token", "ftp://127.0.0.1/token", "https:///token", "provider.example/token", ""],
)
def test_refuses_insecure_token_url(url: str) -> None:
    """Token URLs that are not https (except http on loopback) are refused."""
    with pytest.raises(ValueError):
        OAuth2Refresher(url, "my-app", CLIENT_SECRET)


@pytest.mark.parametrize(
    "url", ["https://provider.example/token", "http://127.0.0.1:8000/token", "http://localhost/token", "http://[::1]/t"]
)
def test_accepts_https_and_loopback_http(url: str) -> None:
    """https anywhere and plain http on loopback are accepted."""
    check_token_url(url)
    OAuth2Refresher(url, "my-app", CLIENT_SECRET)


def test_refuses_unknown_auth_method() -> None:
    """An unknown auth_method is refused at construction."""
    with pytest.raises(ValueError, match="auth_method"):
        OAuth2Refresher("https://p.example/token", "my-app", CLIENT_SECRET, auth_method="private_key_jwt")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_refuses_missing_secret(method: str) -> None:
    """Secret-based auth methods without a client_secret are refused at construction."""
    with pytest.raises(ValueError, match="client_secret"):
        OAuth2Refresher("https://p.example/token", "my-app", None, auth_method=method)  # type: ignore[arg-type]


def test_public_client_needs_no_secret() -> None:
    """auth_method='none' works without a secret."""
    OAuth2Refresher("https://p.example/token", "my-app", None, auth_method="none")


def test_refresher_repr_hides_secret() -> None:
    """The refresher's repr and str show no client secret."""
    refresher = OAuth2Refresher("https://p.example/token", "my-app", CLIENT_SECRET)
    assert "my-app" in repr(refresher)
    assert_no_secrets(repr(refresher))
    assert_no_secrets(str(refresher))


# -- OAuth2Refresher on the wire (MockTransport for the edges) -----------------------------------------


def token_answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"access_token": NEW_ACCESS, "token_type": "Bearer", "expires_in": 60})


def test_sync_refresh_through_injected_client() -> None:
    """refresh() posts the built request with the injected client and merges the answer."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return token_answer(request)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        refresher = OAuth2Refresher("https://p.example/token", "my-app", CLIENT_SECRET, client=client)
        fresh = refresher.refresh(stored(), SystemClock())
    assert fresh.access_token == NEW_ACCESS and fresh.version == stored().version + 1
    assert len(seen) == 1
    assert seen[0].method == "POST" and str(seen[0].url) == "https://p.example/token"
    assert seen[0].headers["authorization"].startswith("Basic ")
    assert dict(parse_qsl(seen[0].content.decode())) == {"grant_type": "refresh_token", "refresh_token": REFRESH}


@pytest.mark.anyio
async def test_async_refresh_through_injected_client() -> None:
    """arefresh() posts with the injected async client and merges the answer."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(token_answer)) as client:
        refresher = OAuth2Refresher("https://p.example/token", "my-app", CLIENT_SECRET, async_client=client)
        fresh = await refresher.arefresh(stored(), SystemClock())
    assert fresh.access_token == NEW_ACCESS


def huge(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b'{"access_token":"x","padding":"' + b"x" * 200_000 + b'"}')


def test_sync_oversize_response_refused() -> None:
    """An answer above max_response_bytes is dropped: RefreshFailed, not retryable."""
    with httpx.Client(transport=httpx.MockTransport(huge)) as client:
        refresher = OAuth2Refresher(
            "https://p.example/token", "my-app", CLIENT_SECRET, client=client, max_response_bytes=1024
        )
        with pytest.raises(RefreshFailed) as caught:
            refresher.refresh(stored(), SystemClock())
    assert caught.value.retryable is False
    assert "1024" in str(caught.value)


@pytest.mark.anyio
async def test_async_oversize_response_refused() -> None:
    """The async path refuses oversize answers too."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(huge)) as client:
        refresher = OAuth2Refresher(
            "https://p.example/token", "my-app", CLIENT_SECRET, async_client=client, max_response_bytes=1024
        )
        with pytest.raises(RefreshFailed) as caught:
            await refresher.arefresh(stored(), SystemClock())
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    "exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("bad")]
)
def test_transport_errors_are_retryable(exc: Exception) -> None:
    """Network errors and timeouts become a retryable RefreshFailed, without the httpx error chained."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        refresher = OAuth2Refresher("https://p.example/token", "my-app", CLIENT_SECRET, client=client)
        with pytest.raises(RefreshFailed) as caught:
            refresher.refresh(stored(), SystemClock())
    assert caught.value.retryable is True
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert_no_secrets(str(caught.value))


class Redirector:
    """An ASGI app whose /token redirects to /elsewhere (which counts its hits)."""

    def __init__(self) -> None:
        self.elsewhere = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/token":
            status, headers, content = 307, [(b"location", b"/elsewhere")], b""
        else:
            self.elsewhere += 1
            status, headers = 200, [(b"content-type", b"application/json")]
            content = json.dumps({"access_token": NEW_ACCESS, "token_type": "Bearer"}).encode()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


@pytest.fixture
def redirector() -> Iterator[tuple[Redirector, str]]:
    app = Redirector()
    with serve(app) as server:  # type: ignore[arg-type]
        yield app, server.url + "/token"


def test_sync_redirect_not_followed(redirector: tuple[Redirector, str]) -> None:
    """The refresher's own sync client does not follow a redirect (secrets would go elsewhere)."""
    app, url = redirector
    refresher = OAuth2Refresher(url, "my-app", CLIENT_SECRET)
    try:
        with pytest.raises(RefreshFailed) as caught:
            refresher.refresh(stored(), SystemClock())
    finally:
        refresher.close()
    assert caught.value.status_code == 307
    assert caught.value.retryable is False
    assert app.elsewhere == 0


@pytest.mark.anyio
async def test_async_redirect_not_followed(redirector: tuple[Redirector, str]) -> None:
    """The refresher's own async client does not follow a redirect either."""
    app, url = redirector
    refresher = OAuth2Refresher(url, "my-app", CLIENT_SECRET)
    with pytest.raises(RefreshFailed) as caught:
        await refresher.arefresh(stored(), SystemClock())
    assert caught.value.status_code == 307
    assert app.elsewhere == 0
