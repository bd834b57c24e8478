"""The refresh_token grant, sans-I/O (request building, merging, error classification) and OAuth2Refresher's edges."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import pickle
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import anyio
import attrs
import httpx
import pytest
from support import FakeClock

from httpx_upstream_auth import (
    BindingMismatch,
    ConfigurationError,
    FreshnessPolicy,
    OAuth2Refresher,
    ReauthenticationRequired,
    RefreshFailed,
    SystemClock,
    UpstreamAuthError,
    UpstreamTokens,
)
from httpx_upstream_auth._oauth import (
    MAX_LIFETIME,
    MAX_RETRY_AFTER,
    TokenAnswer,
    build_refresh_request,
    check_token_url,
    merge_response,
    retry_after_seconds,
)
from httpx_upstream_auth.testing import ServerThread, serve

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


@pytest.mark.parametrize(
    ("status", "payload", "setting", "advice"),
    [
        (404, body(error="not_found"), "token_url", "Check the token URL"),
        (404, b"<html>Not Found</html>", "token_url", "Check the token URL"),
        (404, b"", "token_url", "Check the token URL"),
        (405, b"", "token_url", "Check the token URL"),
        (410, b"gone", "token_url", "Check the token URL"),
        (302, b"", "token_url", "set token_url to the final URL"),
        (401, body(error="invalid_client"), "client", "Check client_id, client_secret and auth_method"),
        (401, b"", "client", "Check client_id, client_secret and auth_method"),
        (400, body(error="unauthorized_client"), "client", "Check client_id, client_secret and auth_method"),
        (400, body(error="unsupported_grant_type"), "client", "may use refresh tokens"),
        (400, body(error="invalid_scope"), "scope", "Check the refresher's scope"),
        (407, b"<html>proxy</html>", "proxy", "Check the proxy setting"),
    ],
)
def test_a_setting_to_fix_is_named(status: int, payload: bytes, setting: str, advice: str) -> None:
    """Error answers that a setting must fix are ConfigurationErrors naming that setting, with advice that points
    at it (a 404 of any body at the token URL, never at the client credentials)."""
    error = classify(status, payload)
    assert isinstance(error, ConfigurationError)
    assert (error.setting, error.status_code, error.retryable, error.may_have_rotated) == (
        setting,
        status,
        False,
        False,
    )
    assert advice in str(error)
    if setting == "token_url":
        assert "client_secret" not in str(error)


@pytest.mark.parametrize(("status", "payload"), [(400, body(error="invalid_request")), (403, b"<html>WAF</html>")])
def test_other_refusals_are_not_configuration_errors(status: int, payload: bytes) -> None:
    """A refusal no one setting explains is a plain RefreshFailed, not retryable."""
    error = classify(status, payload)
    assert type(error) is RefreshFailed and error.retryable is False


def test_a_configuration_error_survives_copy_and_pickle() -> None:
    """A ConfigurationError copies (each waiter gets its own) and pickles with its fields."""
    error = classify(401, body(error="invalid_client"))
    for again in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert isinstance(again, ConfigurationError) and again is not error
        assert (str(again), again.setting, again.status_code, again.retryable) == (
            str(error),
            "client",
            401,
            False,
        )


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
    assert error.may_have_rotated is True


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
        OAuth2Refresher("https://p.example/token", "my-app", CLIENT_SECRET, auth_method="tls_client_auth")  # type: ignore[arg-type]


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


def test_close_leaves_an_injected_client_open() -> None:
    """close() closes only a client the refresher made: an injected one stays open, and the refresher still sends
    with it."""
    with httpx.Client(transport=httpx.MockTransport(token_answer)) as client:
        refresher = OAuth2Refresher("https://p.example/token", "my-app", CLIENT_SECRET, client=client)
        refresher.close()
        assert not client.is_closed
        assert refresher.refresh(stored(), SystemClock()).access_token == NEW_ACCESS


def test_a_setting_that_cannot_be_encoded_sends_nothing() -> None:
    """A client_id with a lone surrogate cannot be form-encoded: a RefreshFailed saying so, not retryable, with
    nothing sent (the refresh token was not presented)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return token_answer(request)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        refresher = OAuth2Refresher("https://p.example/token", "my-app\udce9", CLIENT_SECRET, client=client)
        with pytest.raises(RefreshFailed) as caught:
            refresher.refresh(stored(), SystemClock())
    assert "could not be encoded (UnicodeEncodeError); nothing was sent" in str(caught.value)
    assert (caught.value.retryable, caught.value.may_have_rotated) == (False, False) and seen == []
    assert_no_secrets(str(caught.value))


@pytest.mark.anyio
async def test_async_refresh_through_injected_client() -> None:
    """arefresh() posts with the injected async client and merges the answer."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(token_answer)) as client:
        refresher = OAuth2Refresher("https://p.example/token", "my-app", CLIENT_SECRET, async_client=client)
        fresh = await refresher.arefresh(stored(), SystemClock())
    assert fresh.access_token == NEW_ACCESS


class _CloseFails(httpx.AsyncByteStream):
    """An answer body whose connection fails to close."""

    def __init__(self, content: bytes) -> None:
        self.content = content

    async def __aiter__(self) -> Any:
        yield self.content

    async def aclose(self) -> None:
        raise httpx.ReadError("connection reset while closing")


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
    assert caught.value.may_have_rotated is True  # a 200 was dropped: it may have carried rotated tokens
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


@pytest.mark.anyio
async def test_async_oversize_answer_stays_oversize_when_the_close_fails() -> None:
    """A failure to close the connection after the read was stopped does not hide why it stopped: the error is
    the oversize answer's (dropped, may have rotated), not a lost answer's."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_CloseFails(huge(request).content))

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        refresher = OAuth2Refresher(
            "https://p.example/token", "my-app", CLIENT_SECRET, async_client=client, max_response_bytes=1024
        )
        with pytest.raises(RefreshFailed) as caught:
            await refresher.arefresh(stored(), SystemClock())
    assert "1024" in str(caught.value) and "lost" not in str(caught.value)
    assert (caught.value.retryable, caught.value.may_have_rotated) == (False, True)


@pytest.mark.parametrize(
    ("exc", "may_have_rotated", "retryable"),
    [
        (httpx.ConnectError("refused"), False, True),
        (httpx.ConnectTimeout("slow connect"), False, True),
        (httpx.PoolTimeout("pool full"), False, True),
        (httpx.ProxyError("proxy refused CONNECT"), False, True),
        (httpx.ProxyError("502 Bad Gateway"), False, True),
        (httpx.ProxyError("407 Proxy Authentication Required"), False, False),
        (httpx.UnsupportedProtocol("gopher"), False, False),
        (httpx.LocalProtocolError("bad header"), False, True),
        (httpx.ReadTimeout("slow"), True, True),
        (httpx.ReadError("reset"), True, True),
        (httpx.RemoteProtocolError("closed without answer"), True, True),
        (httpx.WriteTimeout("slow write"), True, True),
        (httpx.WriteError("broken pipe"), True, True),
        (RuntimeError("a custom transport failed"), True, True),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_transport_errors_are_typed(exc: Exception, may_have_rotated: bool, retryable: bool) -> None:
    """Transport errors are a RefreshFailed, nothing chained; only errors before sending say not rotated; those a
    setting causes (a proxy's 4xx refusal of the tunnel, a URL httpx cannot send to) are configuration errors."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        refresher = OAuth2Refresher("https://p.example/token", "my-app", CLIENT_SECRET, client=client)
        with pytest.raises(RefreshFailed) as caught:
            refresher.refresh(stored(), SystemClock())
    assert caught.value.retryable is retryable
    assert isinstance(caught.value, ConfigurationError) is not retryable
    assert caught.value.may_have_rotated is may_have_rotated
    assert caught.value.__cause__ is None and caught.value.__context__ is None
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
    assert caught.value.may_have_rotated is False
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


# -- odd answers, sans-I/O -----------------------------------------------------------------------------


def test_merge_new_refresh_token_without_access_token_is_kept() -> None:
    """A 200 with a new refresh token but no usable access token keeps the new refresh token, access expired."""
    fresh = merge_response(stored(), 200, body(access_token=7, refresh_token=NEW_REFRESH, expires_in=60), SENT_AT)
    assert fresh.refresh_token == NEW_REFRESH
    assert fresh.access_token == ACCESS
    assert fresh.expires_at == SENT_AT
    assert not FreshnessPolicy().is_fresh(fresh, SENT_AT)
    assert fresh.version == stored().version + 1


def test_merge_unusable_refresh_token_leaves_none() -> None:
    """A 200 whose refresh_token cannot be sent back keeps the new access token and no refresh token."""
    for odd in (7, {"token": NEW_REFRESH}, ["x"], True, "\ud800"):
        fresh = merge_response(stored(), 200, body(access_token=NEW_ACCESS, refresh_token=odd), SENT_AT)
        assert fresh.access_token == NEW_ACCESS
        assert fresh.refresh_token is None and fresh.refresh_expires_at is None


def test_merge_error_field_does_not_void_issued_tokens() -> None:
    """A 200 that carries tokens and an 'error' field gives the tokens (the provider may have rotated)."""
    fresh = merge_response(stored(), 200, body(access_token=NEW_ACCESS, refresh_token=NEW_REFRESH, error="x"), SENT_AT)
    assert (fresh.access_token, fresh.refresh_token) == (NEW_ACCESS, NEW_REFRESH)


@pytest.mark.parametrize("access_token", ["has\nnewline", " padded ", "caf\u00e9", "\ud800"])
def test_merge_access_token_unfit_for_a_header_is_unusable(access_token: str) -> None:
    """An access token that cannot go into an Authorization header is not usable: RefreshFailed, rotated."""
    error = classify(200, body(access_token=access_token))
    assert isinstance(error, RefreshFailed) and error.may_have_rotated is True


def test_merge_odd_token_type_and_id_token_keep_stored() -> None:
    """A non-string token_type or id_token is ignored; the stored values stay."""
    id_token = jwt(sub="alice")
    fresh = merge_response(
        stored(id_token=id_token, token_type="Bearer"),
        200,
        body(access_token=NEW_ACCESS, token_type={"a": 1}, id_token=12),
        SENT_AT,
    )
    assert fresh.token_type == "Bearer" and fresh.id_token == id_token


def test_merge_error_code_text_is_never_quoted_unless_registered() -> None:
    """Only registered OAuth error codes appear in messages: a provider may put anything in 'error'."""
    assert "invalid_client" in str(classify(401, body(error="invalid_client")))
    assert "an unregistered error code" in str(classify(400, body(error=NEW_REFRESH)))


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),  # an HTTP date: counted from now (SENT_AT is 22:13:20 GMT)
        ("Tue, 14 Nov 2023 22:13:00 GMT", 0.0),  # a date passed: no wait
        ("Tue, 14 Nov 2023 22:13:50 -0000", None),  # a date in no known time zone cannot be placed
        ("Sun, 14 Nov 2100 00:00:00 GMT", MAX_RETRY_AFTER),  # capped
        ("86400", MAX_RETRY_AFTER),
        ("soon", None),
        ("-5", None),
    ],
)
def test_retry_after_reads_seconds_or_an_http_date(header: str | None, seconds: float | None) -> None:
    """Retry-After is delay-seconds or an HTTP date (RFC 9110), read as seconds from now, never negative,
    capped; anything else is no advice."""
    assert retry_after_seconds(header, SENT_AT) == seconds


@pytest.mark.parametrize(("status", "rotated"), [(200, True), (400, False)])
def test_a_bug_reading_the_answer_fails_typed_and_quiet(
    monkeypatch: pytest.MonkeyPatch, status: int, rotated: bool
) -> None:
    """Should reading an answer ever raise (a bug), the refresh fails as a retryable RefreshFailed that asks for a
    report, names no secret, chains nothing, and says a 2xx may have rotated the refresh token."""

    def broken(*args: Any) -> Any:
        raise KeyError(NEW_REFRESH)

    monkeypatch.setattr("httpx_upstream_auth._oauth._read_answer", broken)
    error = classify(status, body(access_token=NEW_ACCESS, refresh_token=NEW_REFRESH))
    assert isinstance(error, RefreshFailed) and "a bug in httpx-upstream-auth: KeyError" in str(error)
    assert (error.retryable, error.may_have_rotated, error.status_code) == (True, rotated, status)
    assert error.__cause__ is None and error.__context__ is None


def test_merge_3xx_is_refresh_failed_not_rotated() -> None:
    """A redirect answer is a RefreshFailed that did not rotate, whatever its body says."""
    for status in (301, 302, 303, 307, 308):
        error = classify(status, body(error="invalid_grant", access_token=NEW_ACCESS))
        assert isinstance(error, RefreshFailed)
        assert (error.retryable, error.may_have_rotated, error.status_code) == (False, False, status)


# -- odd answers over real HTTP --------------------------------------------------------------------------


class ScriptedEndpoint:
    """An ASGI token endpoint that answers whatever the test scripted, and records what it received.

    ``mode`` is ``answer`` (status, headers, body), ``hang`` (answer nothing until released), ``stall``
    (send the head and ``body``, then hang until released) or ``abort`` (send the head and ``body``, then
    drop the connection). ``arrived`` is set once a request has been read in full.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.mode = "answer"
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        self.body = b""
        self.received: list[dict[str, str]] = []
        self.arrived = threading.Event()
        self.release = threading.Event()

    def script(self, status: int, content: bytes, *, mode: str = "answer", headers: Any = None) -> None:
        self.status, self.body, self.mode = status, content, mode
        if headers is not None:
            self.headers = headers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        release = self.release  # this test's: a later reset must not re-arm a hang that was released
        request = b""
        while True:
            message = await receive()
            request += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.received.append(dict(parse_qsl(request.decode())))
        self.arrived.set()
        if self.mode == "hang":
            await self._hang(release)
            return
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        if self.mode == "answer":
            await send({"type": "http.response.body", "body": self.body})
            return
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        if self.mode == "abort":
            raise ConnectionAbortedError("the scripted endpoint drops the connection mid-answer")
        await self._hang(release)

    async def _hang(self, release: threading.Event) -> None:
        while not release.is_set():
            await asyncio.sleep(0.01)


class Recorder:
    """An ASGI app on another origin that counts requests and answers each with fresh tokens."""

    def __init__(self) -> None:
        self.hits = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.hits += 1
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body(access_token=NEW_ACCESS, refresh_token=NEW_REFRESH)})


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[tuple[ScriptedEndpoint, ServerThread]]:
    """One scripted token endpoint served over real HTTP for the module's tests."""
    app = ScriptedEndpoint()
    with serve(app) as server:
        yield app, server
        app.release.set()


@pytest.fixture
def endpoint(scripted_server: tuple[ScriptedEndpoint, ServerThread]) -> Iterator[ScriptedEndpoint]:
    """The module's scripted token endpoint, reset for this test and released (if hanging) after it."""
    app, _ = scripted_server
    app.reset()
    yield app
    app.release.set()


@pytest.fixture
def refresher(scripted_server: tuple[ScriptedEndpoint, ServerThread]) -> Iterator[OAuth2Refresher]:
    """An OAuth2Refresher with its own clients, pointed at the scripted endpoint."""
    _, server = scripted_server
    made = OAuth2Refresher(server.url + "/token", "my-app", CLIENT_SECRET)
    yield made
    made.close()


@pytest.fixture
def impatient_refresher(scripted_server: tuple[ScriptedEndpoint, ServerThread]) -> Iterator[OAuth2Refresher]:
    """A refresher whose timeout a hanging endpoint trips (loopback connects are immediate, even under load)."""
    _, server = scripted_server
    made = OAuth2Refresher(server.url + "/token", "my-app", CLIENT_SECRET, timeout=0.5, max_response_bytes=4096)
    yield made
    made.close()


def refresh_over_http(refresher: OAuth2Refresher) -> UpstreamTokens:
    return refresher.refresh(stored(), FakeClock(SENT_AT))


def refresh_error(refresher: OAuth2Refresher) -> UpstreamAuthError:
    with pytest.raises(UpstreamAuthError) as caught:
        refresh_over_http(refresher)
    return caught.value


def test_http_string_expires_in_is_accepted(endpoint: ScriptedEndpoint, refresher: OAuth2Refresher) -> None:
    """expires_in sent as the string "3600.5" counts as 3600.5 seconds from the send time."""
    endpoint.script(200, body(access_token=NEW_ACCESS, token_type="Bearer", expires_in="3600.5"))
    fresh = refresh_over_http(refresher)
    assert fresh.access_token == NEW_ACCESS
    assert fresh.expires_at == SENT_AT + 3600.5
    assert endpoint.received[0]["refresh_token"] == REFRESH


@pytest.mark.parametrize(
    "lifetime",
    [b"1e999", b"-1e400", b"NaN", b"Infinity", b"1e12", b"-5", b'"inf"', b'"nan"', b'"1e999"', b"true", b"{}"],
)
def test_http_absurd_lifetimes_are_unknown(
    endpoint: ScriptedEndpoint, refresher: OAuth2Refresher, lifetime: bytes
) -> None:
    """Infinite, NaN, negative, absurd (over MAX_LIFETIME) or non-numeric lifetimes mean unknown (None)."""
    assert MAX_LIFETIME < 1e12
    endpoint.script(
        200,
        b'{"access_token":"%s","refresh_token":"%s","expires_in":%s,"refresh_expires_in":%s}'
        % (NEW_ACCESS.encode(), NEW_REFRESH.encode(), lifetime, lifetime),
    )
    fresh = refresh_over_http(refresher)
    assert (fresh.access_token, fresh.refresh_token) == (NEW_ACCESS, NEW_REFRESH)
    assert fresh.expires_at is None
    assert fresh.refresh_expires_at is None
    assert UpstreamTokens.from_json(fresh.to_json()) == fresh


@pytest.mark.parametrize("field", ["refresh_expires_in", "refresh_token_expires_in"])
def test_http_refresh_expires_in_zero_is_unknown(
    endpoint: ScriptedEndpoint, refresher: OAuth2Refresher, field: str
) -> None:
    """refresh_expires_in 0 (Keycloak's offline tokens: no expiry) means unknown, not 'expires now'."""
    endpoint.script(200, body(access_token=NEW_ACCESS, refresh_token=REFRESH, expires_in=300, **{field: 0}))
    fresh = refresh_over_http(refresher)
    assert fresh.refresh_token == REFRESH
    assert fresh.refresh_expires_at is None
    assert fresh.expires_at == SENT_AT + 300


def test_http_non_string_scope_keeps_stored(endpoint: ScriptedEndpoint, refresher: OAuth2Refresher) -> None:
    """A scope that is not a string (7) keeps the stored scope; a list of strings is joined."""
    endpoint.script(200, body(access_token=NEW_ACCESS, scope=7))
    assert refresh_over_http(refresher).scope == "read"
    endpoint.script(200, body(access_token=NEW_ACCESS, scope=["read", "write"]))
    assert refresh_over_http(refresher).scope == "read write"


def test_http_deeply_nested_extra_field_keeps_tokens(endpoint: ScriptedEndpoint, refresher: OAuth2Refresher) -> None:
    """An extra field nested past the interpreter's recursion limit does not make the tokens beside it unreadable."""
    deep = b"[" * 4000 + b"]" * 4000
    endpoint.script(200, body(access_token=NEW_ACCESS, refresh_token=NEW_REFRESH)[:-1] + b', "x": ' + deep + b"}")
    fresh = refresh_over_http(refresher)
    assert (fresh.access_token, fresh.refresh_token) == (NEW_ACCESS, NEW_REFRESH)


@pytest.mark.parametrize(("status", "rotated"), [(200, True), (400, False)])
def test_http_deeply_nested_json_without_tokens(
    endpoint: ScriptedEndpoint, refresher: OAuth2Refresher, status: int, rotated: bool
) -> None:
    """A deeply nested answer without tokens is a RefreshFailed, not a RecursionError; a 2xx one may have rotated."""
    endpoint.script(status, b"[" * 4000 + b'"' + NEW_REFRESH.encode() + b'"' + b"]" * 4000)
    error = refresh_error(refresher)
    assert isinstance(error, RefreshFailed) and "exceeded" not in str(error)
    assert error.may_have_rotated is rotated and error.status_code == status


@pytest.mark.parametrize(
    "payload",
    [
        # JSON in UTF-16 (json.loads reads it) nested past the recursion limit: the flattened re-read, UTF-8 only,
        # gives up on it
        ("[" * 4000 + '"x"' + "]" * 4000).encode("utf-16"),
        # nested past the limit and then not JSON at all: still not JSON once flattened
        b"[" * 4000 + b"]" * 4000 + b" trailing",
    ],
)
def test_deeply_nested_unreadable_200_is_refresh_failed(payload: bytes) -> None:
    """A 2xx answer nested too deep to parse and unreadable once flattened is no JSON object: it may have rotated."""
    error = classify(200, payload)
    assert isinstance(error, RefreshFailed) and "not a JSON object" in str(error)
    assert error.may_have_rotated is True


def test_merge_id_token_unfit_for_a_header_has_no_subject() -> None:
    """An id_token that could not go into a header is not read for its subject (a stored subject is not matched)
    nor kept."""
    id_token = jwt(sub="alice") + "\n"
    with pytest.raises(BindingMismatch):
        merge_response(stored(), 200, body(access_token=NEW_ACCESS, id_token=id_token), SENT_AT)
    # with no stored subject to match, the unusable id_token is dropped and the stored one kept
    kept = jwt(sub="alice")
    unbound = stored(upstream_subject=None, id_token=kept)
    fresh = merge_response(unbound, 200, body(access_token=NEW_ACCESS, id_token=id_token), SENT_AT)
    assert fresh.id_token == kept and fresh.access_token == NEW_ACCESS


@pytest.mark.parametrize(("status", "rotated"), [(200, True), (400, False)])
def test_http_oversize_answer(
    endpoint: ScriptedEndpoint, refresher: OAuth2Refresher, status: int, rotated: bool
) -> None:
    """An answer over max_response_bytes is dropped; only a 2xx one may have rotated."""
    endpoint.script(status, body(access_token=NEW_ACCESS, refresh_token=NEW_REFRESH, padding="x" * 100_000))
    error = refresh_error(refresher)
    assert isinstance(error, RefreshFailed)
    assert (error.may_have_rotated, error.status_code, error.retryable) == (rotated, status, False)


@pytest.mark.parametrize(
    ("mode", "status", "rotated"), [("hang", 200, True), ("stall", 200, True), ("stall", 400, False)]
)
def test_http_read_timeout_after_request_received(
    endpoint: ScriptedEndpoint, impatient_refresher: OAuth2Refresher, mode: str, status: int, rotated: bool
) -> None:
    """A read timeout after the provider received the request may have rotated, unless it had answered an error."""
    endpoint.script(status, b'{"access_token":"' + NEW_ACCESS.encode(), mode=mode)
    error = refresh_error(impatient_refresher)
    assert isinstance(error, RefreshFailed)
    assert error.may_have_rotated is rotated and error.retryable is True
    assert error.status_code == (None if mode == "hang" else status)
    assert endpoint.arrived.wait(10)
    assert [form["refresh_token"] for form in endpoint.received] == [REFRESH]


@pytest.mark.anyio
async def test_http_read_timeout_after_request_received_async(
    endpoint: ScriptedEndpoint, impatient_refresher: OAuth2Refresher
) -> None:
    """arefresh: a read timeout after the provider received the request may have rotated."""
    endpoint.script(200, b"", mode="hang")
    with pytest.raises(RefreshFailed) as caught:
        await impatient_refresher.arefresh(stored(), FakeClock(SENT_AT))
    assert caught.value.may_have_rotated is True
    assert await anyio.to_thread.run_sync(endpoint.arrived.wait, 10)
    assert len(endpoint.received) == 1


@pytest.mark.parametrize(("status", "rotated"), [(200, True), (503, True), (400, False)])
def test_http_answer_cut_mid_body(
    endpoint: ScriptedEndpoint, refresher: OAuth2Refresher, status: int, rotated: bool
) -> None:
    """A connection dropped mid-answer may have rotated on a 2xx, and on a 5xx (whose unread body cannot show
    it was the provider's own OAuth error), not on a 4xx."""
    endpoint.script(status, b'{"access_token":"' + NEW_ACCESS.encode(), mode="abort")
    error = refresh_error(refresher)
    assert isinstance(error, RefreshFailed)
    assert error.may_have_rotated is rotated and error.status_code == status


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback URL where nothing listens: the port is bound but never listened on, so it stays refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/token"


def test_http_connection_refused_did_not_rotate(refused_url: str) -> None:
    """A refused connection certainly did not send the refresh token: may_have_rotated is False."""
    refresher = OAuth2Refresher(refused_url, "my-app", CLIENT_SECRET)
    try:
        with pytest.raises(RefreshFailed) as caught:
            refresher.refresh(stored(), SystemClock())
    finally:
        refresher.close()
    assert caught.value.may_have_rotated is False and caught.value.retryable is True


@pytest.mark.anyio
async def test_http_connection_refused_did_not_rotate_async(refused_url: str) -> None:
    """arefresh: a refused connection did not rotate either."""
    with pytest.raises(RefreshFailed) as caught:
        await OAuth2Refresher(refused_url, "my-app", CLIENT_SECRET).arefresh(stored(), SystemClock())
    assert caught.value.may_have_rotated is False


@pytest.mark.parametrize("status", [503, 429, 500])
def test_http_unavailable_did_not_rotate(endpoint: ScriptedEndpoint, refresher: OAuth2Refresher, status: int) -> None:
    """503, 429 and 500 are definitive answers: retryable, and the refresh token was not rotated."""
    endpoint.script(status, body(error="temporarily_unavailable"))
    error = refresh_error(refresher)
    assert isinstance(error, RefreshFailed)
    assert (error.retryable, error.may_have_rotated, error.status_code) == (True, False, status)


def test_http_unusable_200_may_have_rotated(endpoint: ScriptedEndpoint, refresher: OAuth2Refresher) -> None:
    """A 200 that cannot be turned into tokens may have rotated."""
    endpoint.script(200, b"<html>proxy login</html>")
    error = refresh_error(refresher)
    assert isinstance(error, RefreshFailed) and error.may_have_rotated is True


def test_http_rotated_refresh_token_kept_without_access_token(
    endpoint: ScriptedEndpoint, refresher: OAuth2Refresher
) -> None:
    """A 200 with a new refresh token and a null access token keeps the new refresh token; access is expired."""
    endpoint.script(200, body(access_token=None, refresh_token=NEW_REFRESH))
    fresh = refresh_over_http(refresher)
    assert fresh.refresh_token == NEW_REFRESH
    assert not FreshnessPolicy().is_fresh(fresh, SENT_AT)


# -- redirects are never followed, even by a client told to -------------------------------------------


@pytest.fixture
def elsewhere() -> Iterator[tuple[Recorder, str]]:
    """A second server, on another origin, that records whether the refresh reached it."""
    app = Recorder()
    with serve(app) as server:
        yield app, server.url + "/token"


def test_sync_injected_client_following_redirects_does_not(
    endpoint: ScriptedEndpoint, refresher: OAuth2Refresher, elsewhere: tuple[Recorder, str]
) -> None:
    """An injected Client(follow_redirects=True) still does not follow the token endpoint's 307."""
    recorder, target = elsewhere
    endpoint.script(307, b"", headers=[(b"location", target.encode())])
    with httpx.Client(follow_redirects=True) as client:
        injected = OAuth2Refresher(refresher.token_url, "my-app", CLIENT_SECRET, client=client)
        with pytest.raises(RefreshFailed) as caught:
            injected.refresh(stored(), SystemClock())
    assert (caught.value.status_code, caught.value.may_have_rotated) == (307, False)
    assert recorder.hits == 0 and len(endpoint.received) == 1


@pytest.mark.anyio
async def test_async_injected_client_following_redirects_does_not(
    endpoint: ScriptedEndpoint, refresher: OAuth2Refresher, elsewhere: tuple[Recorder, str]
) -> None:
    """An injected AsyncClient(follow_redirects=True) still does not follow the token endpoint's 307."""
    recorder, target = elsewhere
    endpoint.script(307, b"", headers=[(b"location", target.encode())])
    async with httpx.AsyncClient(follow_redirects=True) as client:
        injected = OAuth2Refresher(refresher.token_url, "my-app", CLIENT_SECRET, async_client=client)
        with pytest.raises(RefreshFailed) as caught:
            await injected.arefresh(stored(), SystemClock())
    assert caught.value.status_code == 307
    assert recorder.hits == 0 and len(endpoint.received) == 1


# -- no secret in any traceback ----------------------------------------------------------------------------

ID_TOKEN = jwt(sub="mallory", nonce="idt-SECRET-id-token")
RAW = "raw-SECRET-body-marker"
ALL_SECRETS = (*SECRETS, ID_TOKEN, RAW, "idt-SECRET-id-token")
FULL = {"access_token": NEW_ACCESS, "refresh_token": NEW_REFRESH, "id_token": ID_TOKEN, "raw": RAW}


def _json(**fields: Any) -> bytes:
    return json.dumps({**FULL, **fields}).encode()


SCENARIOS: dict[str, tuple[str, int, bytes]] = {
    "invalid-grant": ("answer", 400, _json(error="invalid_grant", error_description=f"{REFRESH} revoked")),
    "secret-as-error-code": ("answer", 401, _json(error=NEW_REFRESH)),
    "unavailable": ("answer", 503, _json(error="temporarily_unavailable")),
    "redirect": ("answer", 307, _json()),
    "other-subject": ("answer", 200, _json()),
    "unusable-200": ("answer", 200, _json(access_token={"t": NEW_ACCESS}, refresh_token=[NEW_REFRESH])),
    "deep-200": ("answer", 200, b'{"x":' + b"[" * 1500 + _json() + b"]" * 1500 + b"}"),
    "oversize-200": ("answer", 200, _json(padding="x" * 10_000)),
    "oversize-400": ("answer", 400, _json(padding="x" * 10_000)),
    "read-timeout-mid-body": ("stall", 200, _json()[:-20]),
    "cut-mid-body": ("abort", 200, _json()[:-20]),
}


def exception_texts(exc: BaseException) -> Iterator[str]:
    """Every rendering of ``exc`` and of each exception linked to it, frame locals included."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield "".join(traceback.TracebackException.from_exception(current, capture_locals=True).format())
        yield str(current)
        yield repr(current)
        pending += [current.__cause__, current.__context__]


def raised_by(call: Callable[[], object]) -> BaseException:
    """The exception ``call`` raises, caught in a frame that holds nothing but ``call``."""
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("no exception was raised")


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("scenario", [*SCENARIOS, "refused", "unsendable-stored-token"])
def test_no_secret_in_any_traceback(
    scripted_server: tuple[ScriptedEndpoint, ServerThread],
    endpoint: ScriptedEndpoint,
    refused_url: str,
    scenario: str,
    use_async: bool,
) -> None:
    """Every error path, over real HTTP: no token, client secret or answer body in any traceback's text or locals."""
    _, server = scripted_server
    url = refused_url if scenario == "refused" else server.url + "/token"
    entry = stored(id_token=None)
    if scenario == "unsendable-stored-token":
        entry = stored(refresh_token=REFRESH + "\ud800")
    elif scenario in SCENARIOS:
        mode, status, content = SCENARIOS[scenario]
        headers = [(b"location", f"{server.url}/elsewhere?code={NEW_REFRESH}".encode())] if status == 307 else None
        endpoint.script(status, content, mode=mode, headers=headers)
    hanging = scenario in SCENARIOS and SCENARIOS[scenario][0] == "stall"
    refresher = OAuth2Refresher(
        url,
        "my-app",
        CLIENT_SECRET,
        auth_method="client_secret_post",
        timeout=0.5 if hanging else 10.0,
        max_response_bytes=4096,
    )
    try:
        if use_async:
            exc = raised_by(lambda: anyio.run(refresher.arefresh, entry, FakeClock(SENT_AT)))
        else:
            exc = raised_by(lambda: refresher.refresh(entry, FakeClock(SENT_AT)))
    finally:
        refresher.close()
    assert isinstance(exc, UpstreamAuthError), repr(exc)
    for text in exception_texts(exc):
        for secret in ALL_SECRETS:
            assert secret not in text, f"{scenario}: {type(exc).__name__} shows a secret"
    if scenario in SCENARIOS and SCENARIOS[scenario][0] == "answer":
        assert endpoint.received and endpoint.received[-1]["client_secret"] == CLIENT_SECRET


def test_no_secret_in_merge_response_tracebacks() -> None:
    """merge_response's own errors carry no token or body in their text or frame locals."""
    answers = [
        TokenAnswer(200, _json()),
        TokenAnswer(200, _json(access_token=None, refresh_token=7)),
        TokenAnswer(400, _json(error="invalid_grant")),
    ]
    for answer in answers:
        # The body travels masked (TokenAnswer): a lambda's frame would show a captured bytes object.
        exc = raised_by(lambda: merge_response(stored(), answer.status_code, answer.body, SENT_AT))  # noqa: B023
        assert isinstance(exc, UpstreamAuthError)
        for text in exception_texts(exc):
            for secret in ALL_SECRETS:
                assert secret not in text


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "1\u00b2", "", "soon"])
def test_a_retry_after_that_is_not_ascii_digits_or_a_date_is_ignored(value: str) -> None:
    """Digits float() refuses ("\u00b2", Arabic-Indic "\u0663") are no delay: the header is ignored, never an
    error that would turn the answer it came with into a lost one."""
    assert retry_after_seconds(value, 1_800_000_000.0) is None
