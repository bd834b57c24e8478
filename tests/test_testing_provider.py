"""The shipped test provider, over real HTTP: rotation, reuse detection, client auth, faults, stats."""

from __future__ import annotations

import base64
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from httpx_upstream_auth._models import UpstreamTokens
from httpx_upstream_auth.testing import LocalProvider, ServerThread, serve

BASIC = ("test-client", "test-secret")


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def provider() -> LocalProvider:
    return LocalProvider()


@pytest.fixture
def server(provider: LocalProvider) -> Iterator[ServerThread]:
    with ServerThread(provider) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


def refresh(http: httpx.Client, token: str | None, auth: Any = BASIC, **form: str) -> httpx.Response:
    data = {"grant_type": "refresh_token", **form}
    if token is not None:
        data["refresh_token"] = token
    return http.post("/token", data=data, auth=auth)


def me(http: httpx.Client, access_token: str) -> httpx.Response:
    return http.get("/api/me", headers={"Authorization": f"Bearer {access_token}"})


def claims(id_token: str) -> dict[str, Any]:
    header, payload, signature = id_token.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "none", "typ": "JWT"}
    assert signature == ""
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return result


def test_login_returns_bound_tokens() -> None:
    """login() returns fresh UpstreamTokens carrying the binding fields and version 0."""
    clock = FakeClock()
    provider = LocalProvider(access_ttl=30, refresh_ttl=600, issue_id_token=True, clock=clock)
    tokens = provider.login(sub="bob", client_id="post-client", scope="read write", user_id="u9")
    assert isinstance(tokens, UpstreamTokens)
    assert tokens.access_token and tokens.refresh_token and tokens.access_token != tokens.refresh_token
    assert (tokens.token_type, tokens.scope, tokens.version) == ("Bearer", "read write", 0)
    assert (tokens.issued_at, tokens.expires_at, tokens.refresh_expires_at) == (
        clock.now,
        clock.now + 30,
        clock.now + 600,
    )
    assert (tokens.provider_id, tokens.user_id, tokens.upstream_subject, tokens.client_id) == (
        "local",
        "u9",
        "bob",
        "post-client",
    )
    assert tokens.id_token is not None
    assert claims(tokens.id_token) == {
        "iss": "local-provider",
        "sub": "bob",
        "aud": "post-client",
        "iat": int(clock.now),
        "exp": int(clock.now + 30),
    }
    grant = provider.grant_of(tokens.access_token)
    assert provider.grant_of(tokens.refresh_token) == grant
    assert provider.login().id_token is not None
    assert LocalProvider().login().id_token is None
    with pytest.raises(KeyError):
        provider.grant_of("nope")
    with pytest.raises(ValueError, match="unknown client"):
        provider.login(client_id="stranger")


def test_rotation_issues_new_tokens(provider: LocalProvider, client: httpx.Client) -> None:
    """A refresh answers new access and refresh tokens of the same grant, no-store, and they work."""
    tokens = provider.login()
    response = refresh(client, tokens.refresh_token)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope", "refresh_token"}
    assert (body["token_type"], body["expires_in"], body["scope"]) == ("Bearer", 60, "api")
    assert body["refresh_token"] != tokens.refresh_token
    assert body["access_token"] != tokens.access_token
    assert provider.grant_of(body["refresh_token"]) == provider.grant_of(tokens.access_token)
    answer = me(client, body["access_token"])
    assert answer.status_code == 200
    assert answer.json() == {"sub": "alice", "token_grant": provider.grant_of(tokens.access_token)}
    assert me(client, tokens.access_token).status_code == 200  # the old access token lives to its expiry
    assert refresh(client, body["refresh_token"]).status_code == 200


def test_reuse_revokes_the_whole_grant(provider: LocalProvider, client: httpx.Client) -> None:
    """Presenting a consumed refresh token kills the grant: newer tokens die too; other grants live."""
    tokens = provider.login()
    other = provider.login(sub="bob")
    first = refresh(client, tokens.refresh_token).json()
    reused = refresh(client, tokens.refresh_token)
    assert reused.status_code == 400
    assert reused.json() == {"error": "invalid_grant"}
    assert refresh(client, first["refresh_token"]).json() == {"error": "invalid_grant"}
    for access in (tokens.access_token, first["access_token"]):
        rejected = me(client, access)
        assert rejected.status_code == 401
        assert rejected.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert rejected.json() == {"error": "invalid_token"}
    assert me(client, other.access_token).status_code == 200
    assert refresh(client, other.refresh_token).status_code == 200
    stats = provider.stats
    assert (stats["refresh_reuse"], stats["invalid_grant"], stats["refresh_ok"]) == (1, 2, 2)


def test_reuse_within_the_grace_gets_a_fresh_pair_and_later_revokes() -> None:
    """With reuse_grace (Okta's grace period, Hydra's rotation_grace_period), a consumed refresh token presented
    again within that many seconds of its first use gets a fresh pair and the grant lives (counted as a grace
    reuse, not a reuse); presented after it, the grant is revoked as without a grace."""
    clock = FakeClock()
    provider = LocalProvider(reuse_grace=30, clock=clock)
    with serve(provider) as server, httpx.Client(base_url=server.url) as http:
        tokens = provider.login()
        first = refresh(http, tokens.refresh_token).json()
        clock.now += 29.9
        again = refresh(http, tokens.refresh_token)
        assert again.status_code == 200
        second = again.json()
        assert second["refresh_token"] not in (tokens.refresh_token, first["refresh_token"])
        assert me(http, second["access_token"]).status_code == 200
        assert refresh(http, second["refresh_token"]).status_code == 200
        assert (provider.stats["grace_reuse"], provider.stats["refresh_reuse"]) == (1, 0)
        clock.now += 0.1  # 30 s after the first use: the grace is over
        assert refresh(http, tokens.refresh_token).json() == {"error": "invalid_grant"}
        assert me(http, second["access_token"]).status_code == 401  # the whole grant is revoked
        assert (provider.stats["grace_reuse"], provider.stats["refresh_reuse"]) == (1, 1)


def test_without_rotation_the_refresh_token_stays() -> None:
    """rotate=False omits refresh_token from the answer and the old one keeps working."""
    provider = LocalProvider(rotate=False)
    with serve(provider) as server, httpx.Client(base_url=server.url) as http:
        tokens = provider.login()
        for _ in range(3):
            body = refresh(http, tokens.refresh_token).json()
            assert "refresh_token" not in body
            assert me(http, body["access_token"]).status_code == 200
        assert provider.stats["refresh_ok"] == 3
        assert provider.stats["refresh_reuse"] == 0


@pytest.mark.parametrize(
    ("client_id", "auth", "form"),
    [
        ("test-client", BASIC, {}),
        ("post-client", None, {"client_id": "post-client", "client_secret": "post-secret"}),
        ("public-client", None, {"client_id": "public-client"}),
    ],
)
def test_each_client_auth_method_is_accepted(
    provider: LocalProvider, client: httpx.Client, client_id: str, auth: Any, form: dict[str, str]
) -> None:
    """Basic, form-post and public (client_id only) authentication each work for their client."""
    tokens = provider.login(client_id=client_id)
    response = refresh(client, tokens.refresh_token, auth=auth, **form)
    assert response.status_code == 200, response.text
    method = {"test-client": "client_secret_basic", "post-client": "client_secret_post"}.get(client_id, "none")
    assert provider.requests[-1]["auth_method"] == method
    assert provider.requests[-1]["client_id"] == client_id
    assert provider.requests[-1]["form"]["refresh_token"] == tokens.refresh_token


@pytest.mark.parametrize(
    ("auth", "form"),
    [
        (None, {"client_id": "test-client", "client_secret": "test-secret"}),  # post for a basic client
        (None, {"client_id": "test-client"}),  # no secret
        (("test-client", "wrong"), {}),
        (("post-client", "post-secret"), {}),  # basic for a post client
        (("stranger", "x"), {}),
        (None, {}),  # no client at all
    ],
)
def test_wrong_client_auth_is_rejected(
    provider: LocalProvider, client: httpx.Client, auth: Any, form: dict[str, str]
) -> None:
    """A wrong method, secret or client answers 401 invalid_client with a Basic challenge."""
    tokens = provider.login()
    response = refresh(client, tokens.refresh_token, auth=auth, **form)
    assert response.status_code == 401
    assert response.json() == {"error": "invalid_client"}
    assert response.headers["www-authenticate"] == "Basic"
    assert provider.stats["invalid_client"] == 1
    assert refresh(client, tokens.refresh_token).status_code == 200  # the token was not consumed


def test_basic_credentials_are_form_urlencoded(provider: LocalProvider, client: httpx.Client) -> None:
    """Basic client id and secret are url-decoded (RFC 6749 2.3.1), so ':' and spaces survive."""
    provider.clients["odd:client"] = ("s3cr et&:%", "client_secret_basic")
    tokens = provider.login(client_id="odd:client")
    raw = base64.b64encode(b"odd%3Aclient:s3cr+et%26%3A%25").decode()
    response = client.post(
        "/token",
        data={"grant_type": "refresh_token", "refresh_token": tokens.refresh_token},
        headers={"Authorization": f"Basic {raw}"},
    )
    assert response.status_code == 200, response.text


def test_token_request_errors(provider: LocalProvider, client: httpx.Client) -> None:
    """Other grant types, missing fields, another client's token and two auth methods are refused."""
    tokens = provider.login()
    other = provider.login(client_id="public-client")
    response = client.post("/token", data={"grant_type": "password"}, auth=BASIC)
    assert (response.status_code, response.json()) == (400, {"error": "unsupported_grant_type"})
    assert refresh(client, None).json() == {"error": "invalid_request"}
    assert refresh(client, "rt-unknown").json() == {"error": "invalid_grant"}
    assert refresh(client, other.refresh_token).json() == {"error": "invalid_grant"}
    both = refresh(client, tokens.refresh_token, client_secret="test-secret", client_id="test-client")
    assert both.json() == {"error": "invalid_request"}
    assert client.get("/token").status_code == 405
    assert client.get("/nowhere").status_code == 404
    assert refresh(client, other.refresh_token, auth=None, client_id="public-client").status_code == 200
    assert refresh(client, tokens.refresh_token).status_code == 200


def test_requested_scope_is_echoed(provider: LocalProvider, client: httpx.Client) -> None:
    """A scope parameter on the refresh is echoed in the answer."""
    tokens = provider.login(scope="a b c")
    assert refresh(client, tokens.refresh_token, scope="a").json()["scope"] == "a"


@pytest.mark.parametrize(
    ("kind", "status", "check"),
    [
        ("500", 500, lambda r: r.json() == {"error": "server_error"}),
        ("503", 503, lambda r: r.json() == {"error": "temporarily_unavailable"}),
        ("429", 429, lambda r: r.headers["retry-after"] == "1"),
        ("malformed", 200, lambda r: r.headers["content-type"] == "text/html"),
        ("no_access_token", 200, lambda r: "access_token" not in r.json() and r.json()["expires_in"] == 60),
        ("invalid_client", 401, lambda r: r.json() == {"error": "invalid_client"}),
        ("huge", 200, lambda r: len(r.content) == 2 * 1024 * 1024 and "access_token" in r.json()),
    ],
)
def test_answering_faults_change_nothing(
    provider: LocalProvider, client: httpx.Client, kind: str, status: int, check: Any
) -> None:
    """Each answering fault returns its canned reply once, and the refresh token stays usable."""
    tokens = provider.login()
    provider.fail_next(kind)
    response = refresh(client, tokens.refresh_token)
    assert response.status_code == status
    assert check(response)
    if kind == "malformed":
        with pytest.raises(json.JSONDecodeError):
            response.json()
    if kind == "huge":
        assert me(client, response.json()["access_token"]).status_code == 401
    assert refresh(client, tokens.refresh_token).status_code == 200
    assert provider.stats == {
        "token_calls": 2,
        "refresh_ok": 1,
        "refresh_early": 1,  # at once after the login
        "refresh_reuse": 0,
        "grace_reuse": 0,
        "invalid_grant": 0,
        "invalid_client": 0,
        "faults": 1,
        "api_ok": 0,
        "api_401": 1 if kind == "huge" else 0,
        "assertion_ok": 0,
        "assertion_replay": 0,
        "assertion_invalid": 0,
        "dpop_proofs_ok": 0,
        "dpop_proofs_invalid": 0,
        "dpop_nonce_challenges": 0,
        "dpop_wrong_key": 0,
    }


def test_refreshes_before_half_the_access_tokens_life_count_as_early() -> None:
    """refresh_early counts the refreshes made while the grant's newest access token still had more than half
    its lifetime left, on the provider's clock."""
    clock = FakeClock()
    provider = LocalProvider(access_ttl=60, clock=clock)
    tokens = provider.login()
    with ServerThread(provider) as running, httpx.Client(base_url=running.url) as client:
        first = refresh(client, tokens.refresh_token).json()  # 60 s left of 60: early
        clock.now += 31
        second = refresh(client, first["refresh_token"]).json()  # 29 s left of 60: due
        clock.now += 29.5
        refresh(client, second["refresh_token"])  # 30.5 s left of 60: early
    assert provider.stats["refresh_ok"] == 3 and provider.stats["refresh_early"] == 2


def test_faults_queue_in_order(provider: LocalProvider, client: httpx.Client) -> None:
    """fail_next queues faults: count repeats one, calls append, then requests succeed again."""
    tokens = provider.login()
    provider.fail_next("503", count=2)
    provider.fail_next("500")
    codes = [refresh(client, tokens.refresh_token).status_code for _ in range(4)]
    assert codes == [503, 503, 500, 200]
    with pytest.raises(ValueError, match="unknown fault"):
        provider.fail_next("404")
    with pytest.raises(ValueError, match="unknown fault"):
        provider.fail_next("delay:soon")


@pytest.mark.parametrize("kind", ["html:404", "redirect:200", "token_type:", "token_type:a b", "huge:0", "huge:x"])
def test_fault_options_are_checked(provider: LocalProvider, kind: str) -> None:
    """A fault kind's option outside what it can do is refused when queued, not at the request."""
    with pytest.raises(ValueError, match="unknown fault"):
        provider.fail_next(kind)


def test_faults_with_options(provider: LocalProvider, client: httpx.Client) -> None:
    """html:<status> and redirect:<status> answer without consuming the refresh token; huge:<bytes> sizes its
    body; token_type:<type> redeems and states that type."""
    tokens = provider.login()
    assert tokens.refresh_token is not None
    provider.fail_next("html:503")
    provider.fail_next("redirect:307")
    provider.fail_next("huge:1000")
    page, moved, huge = (refresh(client, tokens.refresh_token) for _ in range(3))
    assert (page.status_code, page.headers["content-type"]) == (503, "text/html")
    assert (moved.status_code, moved.headers["location"]) == (307, "/token")
    assert huge.status_code == 200 and len(huge.content) == 1000
    provider.fail_next("token_type:mac")
    answer = refresh(client, tokens.refresh_token)
    assert answer.status_code == 200 and answer.json()["token_type"] == "mac"
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


def test_delay_fault_then_answers_normally(provider: LocalProvider, client: httpx.Client) -> None:
    """delay:<s> waits that long, then refreshes normally."""
    tokens = provider.login()
    provider.fail_next("delay:0.3")
    started = time.monotonic()
    response = refresh(client, tokens.refresh_token)
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    assert "refresh_token" in response.json()
    assert provider.stats["faults"] == 1


def test_client_gone_during_delay_leaves_no_trace(provider: LocalProvider, client: httpx.Client) -> None:
    """A client that times out during a delay does not consume its refresh token."""
    tokens = provider.login()
    provider.fail_next("delay:0.5")
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            "/token",
            data={"grant_type": "refresh_token", "refresh_token": tokens.refresh_token},
            auth=BASIC,
            timeout=0.1,
        )
    time.sleep(0.6)
    assert refresh(client, tokens.refresh_token).status_code == 200
    assert provider.stats["refresh_reuse"] == 0
    assert provider.stats["refresh_ok"] == 1


def test_id_token_other_sub_still_rotates() -> None:
    """id_token_other_sub answers a normal rotation whose ID token names mallory."""
    provider = LocalProvider(issue_id_token=True)
    with serve(provider) as server, httpx.Client(base_url=server.url) as http:
        tokens = provider.login()
        provider.fail_next("id_token_other_sub")
        body = refresh(http, tokens.refresh_token).json()
        assert claims(body["id_token"])["sub"] == "mallory"
        assert claims(body["id_token"])["aud"] == "test-client"
        assert refresh(http, tokens.refresh_token).json() == {"error": "invalid_grant"}  # consumed: reuse
        assert provider.stats["refresh_reuse"] == 1
        fresh = provider.login()
        assert claims(refresh(http, fresh.refresh_token).json()["id_token"])["sub"] == "alice"


def test_id_token_other_sub_without_id_tokens(provider: LocalProvider, client: httpx.Client) -> None:
    """id_token_other_sub adds an ID token even when the provider issues none by default."""
    tokens = provider.login()
    assert "id_token" not in refresh(client, tokens.refresh_token).json()
    provider.fail_next("id_token_other_sub")
    tokens = provider.login()
    assert claims(refresh(client, tokens.refresh_token).json()["id_token"])["sub"] == "mallory"


def test_revoke_access_and_grant(provider: LocalProvider, client: httpx.Client) -> None:
    """revoke_access kills one access token; revoke_grant kills all its tokens and refreshes."""
    tokens = provider.login()
    fresh = refresh(client, tokens.refresh_token).json()
    provider.revoke_access(tokens.access_token)
    assert me(client, tokens.access_token).status_code == 401
    assert me(client, fresh["access_token"]).status_code == 200
    provider.revoke_grant(provider.grant_of(fresh["refresh_token"]))
    assert me(client, fresh["access_token"]).status_code == 401
    assert refresh(client, fresh["refresh_token"]).json() == {"error": "invalid_grant"}
    assert provider.stats["refresh_reuse"] == 0


def test_expiry_follows_the_clock() -> None:
    """Access tokens and (with refresh_ttl) refresh tokens expire by the provider's clock."""
    clock = FakeClock()
    provider = LocalProvider(access_ttl=10, refresh_ttl=100, clock=clock)
    with serve(provider) as server, httpx.Client(base_url=server.url) as http:
        tokens = provider.login()
        clock.now += 9.9
        assert me(http, tokens.access_token).status_code == 200
        clock.now += 0.1
        assert me(http, tokens.access_token).status_code == 401
        body = refresh(http, tokens.refresh_token).json()
        assert body["refresh_token_expires_in"] == 100
        assert body["expires_in"] == 10
        clock.now += 100
        assert refresh(http, body["refresh_token"]).json() == {"error": "invalid_grant"}
        short = provider.login(access_ttl=0.5)
        assert refresh(http, short.refresh_token).json()["expires_in"] == 0.5


def test_refresh_ttl_expires_in_real_time(provider: LocalProvider, client: httpx.Client) -> None:
    """With the system clock a refresh token past refresh_ttl answers invalid_grant."""
    provider.refresh_ttl = 0.2
    tokens = provider.login()
    time.sleep(0.3)
    assert refresh(client, tokens.refresh_token).json() == {"error": "invalid_grant"}


def test_api_endpoints(provider: LocalProvider, client: httpx.Client) -> None:
    """upload counts bytes, slow waits, echo reports method and header; api_calls counts each path."""
    tokens = provider.login()
    bearer = {"Authorization": tokens.authorization}
    upload = client.post("/api/upload", content=b"x" * 300_000, headers=bearer)
    assert upload.json() == {"bytes": 300_000}
    started = time.monotonic()
    assert client.get("/api/slow", params={"delay": "0.2"}, headers=bearer).status_code == 200
    assert time.monotonic() - started >= 0.2
    echo = client.put("/api/echo", content=b"abc", headers=bearer).json()
    assert echo == {"method": "PUT", "authorization": tokens.authorization, "bytes": 3}
    assert client.get("/api/echo").json()["authorization"] is None
    assert client.post("/api/upload", content=b"x").status_code == 401
    assert client.get("/api/me", headers={"Authorization": f"Basic {tokens.access_token}"}).status_code == 401
    assert client.post("/api/me", headers=bearer).status_code == 405
    assert client.get("/api/missing").status_code == 404
    assert provider.api_calls == {"/api/upload": 2, "/api/slow": 1, "/api/echo": 2, "/api/me": 1}
    assert (provider.stats["api_ok"], provider.stats["api_401"]) == (2, 2)


def test_stats_are_exact_and_reset(provider: LocalProvider, client: httpx.Client) -> None:
    """A known sequence of calls gives exactly these counters; reset_stats zeroes them."""
    tokens = provider.login()
    first = refresh(client, tokens.refresh_token).json()  # ok
    second = refresh(client, first["refresh_token"]).json()  # ok
    refresh(client, tokens.refresh_token)  # reuse -> invalid_grant, grant revoked
    refresh(client, second["refresh_token"])  # invalid_grant (revoked)
    refresh(client, second["refresh_token"], auth=("test-client", "bad"))  # invalid_client
    provider.fail_next("500")
    refresh(client, "whatever")  # fault
    me(client, second["access_token"])  # 401
    other = provider.login(sub="bob")
    me(client, other.access_token)  # ok
    me(client, other.access_token)  # ok
    snapshot = provider.stats
    assert snapshot == {
        "token_calls": 6,
        "refresh_ok": 2,
        "refresh_early": 2,  # both at once after the login
        "refresh_reuse": 1,
        "grace_reuse": 0,
        "invalid_grant": 2,
        "invalid_client": 1,
        "faults": 1,
        "api_ok": 2,
        "api_401": 1,
        "assertion_ok": 0,
        "assertion_replay": 0,
        "assertion_invalid": 0,
        "dpop_proofs_ok": 0,
        "dpop_proofs_invalid": 0,
        "dpop_nonce_challenges": 0,
        "dpop_wrong_key": 0,
    }
    snapshot["token_calls"] = 99
    assert provider.stats["token_calls"] == 6  # a copy
    assert len(provider.requests) == 6
    provider.reset_stats()
    assert set(provider.stats.values()) == {0}
    assert provider.api_calls == {}
    assert provider.requests == []


class InFlight:
    """An ASGI wrapper that counts the requests being handled at once, and the most at any moment."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.now = 0
        self.peak = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.now += 1  # one event loop serves every request: no lock needed
        self.peak = max(self.peak, self.now)
        try:
            await self.app(scope, receive, send)
        finally:
            self.now -= 1


def test_token_delay_and_herd(provider: LocalProvider) -> None:
    """With token_delay, concurrent refreshes of one token: exactly one wins, the rest are reuse; the delays
    overlap (the server handles a second request while the first waits)."""
    provider.token_delay = 0.2
    tokens = provider.login()
    results: list[int] = []
    counted = InFlight(provider)
    with ServerThread(counted) as running, httpx.Client(base_url=running.url) as client:

        def worker() -> None:
            results.append(refresh(client, tokens.refresh_token).status_code)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert counted.peak > 1  # a blocking delay would have served them one at a time
    assert sorted(results) == [200] + [400] * 7
    assert provider.stats["refresh_ok"] == 1
    assert provider.stats["refresh_reuse"] == 7


def test_server_thread_lifecycle() -> None:
    """ServerThread picks a free loopback port, serves, stops, and refuses non-loopback hosts."""
    provider = LocalProvider()
    server = ServerThread(provider)
    with pytest.raises(RuntimeError):
        _ = server.url
    assert server.start() is server
    try:
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.port > 0
        assert httpx.get(server.url + "/api/echo").status_code == 200
        with pytest.raises(RuntimeError, match="already started"):
            server.start()
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/api/echo")
    with pytest.raises(ValueError, match="loopback"):
        ServerThread(provider, host="0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        ServerThread(provider, host="example.com")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_provider_runs_in_process_under_any_loop(backend: str) -> None:
    """The provider is a plain ASGI app: httpx.ASGITransport drives it under asyncio and trio."""
    provider = LocalProvider(token_delay=0.01)
    tokens = provider.login()

    async def main() -> None:
        transport = httpx.ASGITransport(app=provider)
        async with httpx.AsyncClient(transport=transport, base_url="http://provider") as http:
            response = await http.post(
                "/token",
                data={"grant_type": "refresh_token", "refresh_token": tokens.refresh_token},
                auth=BASIC,
            )
            assert response.status_code == 200
            slow = await http.get("/api/slow?delay=0.01", headers={"Authorization": tokens.authorization})
            assert slow.json()["sub"] == "alice"

    anyio.run(main, backend=backend)


def test_keep_alive_requests_are_fast(provider: LocalProvider, client: httpx.Client) -> None:
    """Responses on a kept-alive connection do not stall on Nagle (about 40 ms each if TCP_NODELAY is off)."""
    tokens = provider.login()
    started = time.monotonic()
    for _ in range(50):
        assert me(client, tokens.access_token).status_code == 200
    assert time.monotonic() - started < 1.5


def test_server_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy port raises OSError; a missing uvicorn names the extra to install."""
    with serve(LocalProvider()) as running, pytest.raises(OSError):
        ServerThread(LocalProvider(), port=running.port).start()
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ImportError, match=re.escape("pip install httpx-upstream-auth[testing]")):
        ServerThread(LocalProvider()).start()


def test_a_server_whose_app_fails_to_start_raises_and_leaves_no_thread() -> None:
    """ServerThread.start() on an app whose ASGI startup fails: RuntimeError naming the address, caused by
    uvicorn's own exit, and no serving thread is left behind."""

    async def refuses_to_start(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    server = ServerThread(refuses_to_start, lifespan="on")
    before = threading.active_count()
    with pytest.raises(RuntimeError, match=r"uvicorn did not start on 127\.0\.0\.1") as caught:
        server.start()
    assert isinstance(caught.value.__cause__, SystemExit)
    assert threading.active_count() == before


def test_the_provider_refuses_malformed_requests_as_a_real_one_would(
    provider: LocalProvider, client: httpx.Client
) -> None:
    """Registration, token and set-up requests a real provider would refuse are refused the same way: the
    tests of client code rely on these answers, and a provider that accepted them would hide its bugs."""
    with pytest.raises(ValueError, match="auth_method must be one of"):
        provider.register_client(["http://127.0.0.1/cb"], auth_method="client_secret_jwt")
    with pytest.raises(ValueError, match="count must not be negative"):
        provider.fail_next("500", -1)
    assert client.get("/register").status_code == 405
    for metadata in (b"not json", b"[]", b'{"redirect_uris": "http://127.0.0.1/cb"}'):
        answer = client.post("/register", content=metadata)
        assert (answer.status_code, answer.json()["error"]) == (400, "invalid_client_metadata")
    odd_method = {"redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "private_key_jwt"}
    assert client.post("/register", json=odd_method).json()["error"] == "invalid_client_metadata"
    token = provider.login().refresh_token
    answers = [
        client.post("/token", data={"refresh_token": token}, auth=BASIC),  # no grant_type
        refresh(client, token, client_secret="test-secret"),  # the secret twice: in Basic and in the form
    ]
    assert [(a.status_code, a.json()["error"]) for a in answers] == [(400, "invalid_request")] * 2
    for authorization in ("Basic %%%", "Basic " + base64.b64encode(b"test-client:test-secret").decode()):
        # unreadable Basic credentials; a form client_id naming another client than the Basic one
        answer = client.post(
            "/token",
            data={"grant_type": "refresh_token", "refresh_token": token, "client_id": "other-client"},
            headers={"Authorization": authorization},
        )
        assert (answer.status_code, answer.json()["error"]) == (401, "invalid_client")
    assert provider.stats["refresh_ok"] == 0 and provider.stats["invalid_client"] == 2


def test_the_provider_runs_under_an_asgi_lifespan(provider: LocalProvider) -> None:
    """Served with uvicorn's lifespan on, the provider starts, answers, and shuts down cleanly."""
    with ServerThread(provider, lifespan="on") as running, httpx.Client(base_url=running.url) as http:
        assert me(http, provider.login().access_token).status_code == 200
