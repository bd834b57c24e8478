"""Riding out provider trouble (issue 15, first half): errors that say what to fix, failures remembered for a
window instead of re-asked by every request, and lost answers recovered within a provider's reuse grace.

Over real HTTP on 127.0.0.1: the LocalProvider under uvicorn, and small servers for what it does not do (a
404 page, a proxy refusing, a certificate no client trusts). Name resolution is the one thing replaced: a
test cannot make a real resolver fail on demand. Every assertion is a count or a state; waits are bounded
against hangs, never timed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
import socket
import sqlite3
import ssl
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx
import pytest
from redis_servers import RedisServer
from storage_fixtures import redis_server
from support import (
    SESSION,
    SSL,
    WAIT_LIMIT,
    Driver,
    FakeClock,
    ManagerFactory,
    assert_fails_closed,
    expired,
    fail_refresh,
    put_entry,
    stored,
)

from httpx_upstream_auth import (
    ConfigurationError,
    EntryKey,
    OAuth2Refresher,
    ReauthenticationRequired,
    RedisStorage,
    RefreshFailed,
    SQLiteStorage,
    TokenManager,
    UpstreamAuthError,
    UpstreamTokens,
)
from httpx_upstream_auth._async._manager import MAX_RETRIES
from httpx_upstream_auth.testing import LocalProvider, ServerThread
from httpx_upstream_auth.testing._provider import Receive, Scope, Send

pytestmark = pytest.mark.anyio
__all__ = ["redis_server"]  # a fixture used below

#: A certificate and key no CA signed (for 127.0.0.1 and localhost, valid until 2126).
UNTRUSTED_PEM = Path(__file__).with_name("tls_untrusted.pem")


def assert_quiet(exc: BaseException, *secrets: str | None) -> None:
    """The error names no token and no client secret, in its text or its repr."""
    for secret in (*secrets, "test-secret"):
        if secret:
            assert secret not in str(exc) and secret not in repr(exc)


def refresher(token_url: str, **settings: Any) -> OAuth2Refresher:
    """The test client's refresher for ``token_url`` (``secret=`` to present another secret)."""
    return OAuth2Refresher(token_url, "test-client", settings.pop("secret", "test-secret"), **settings)


# -- servers for what the provider does not do ----------------------------------------------------------


class Canned:
    """An ASGI app answering every request with one status, content type and body; it counts requests."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", self.content_type.encode())] if self.content_type else []
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


class SocketServer:
    """A server on 127.0.0.1 that, per connection, optionally speaks TLS with ``tls``, then reads a request
    head and writes ``reply``. It counts connections and records request lines."""

    def __init__(self, reply: bytes, tls: ssl.SSLContext | None = None) -> None:
        self.reply = reply
        self.tls = tls
        self.connections = 0
        self.request_lines: list[str] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(10)
            try:
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)  # the client refuses the handshake
                data = b""
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
                self.request_lines.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                # The body too, before answering: closing with it unread would reset the connection under the
                # client's answer.
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                while length is not None and len(body) < int(length[1]) and (chunk := conn.recv(65536)):
                    body += chunk
                conn.sendall(self.reply)
            except OSError:  # ssl.SSLError included
                pass
            finally:
                conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the serving thread
        self._sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def socket_servers() -> Iterator[list[SocketServer]]:
    """Socket servers a test starts (appended here), closed at teardown."""
    started: list[SocketServer] = []
    yield started
    for server in started:
        server.close()


# -- 1. errors that point the right way -----------------------------------------------------------------

NOT_FOUND_BODIES = {
    "json": (b'{"error":"not_found","path":"/oauth2/token"}', "application/json"),
    "html": (b"<html><body><h1>404 Not Found</h1></body></html>", "text/html"),
    "empty": (b"", ""),
}


@pytest.mark.parametrize("body", sorted(NOT_FOUND_BODIES))
async def test_a_wrong_token_path_says_check_the_token_url(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, body: str
) -> None:
    """A 404 from the token URL (a JSON, HTML or empty body) is a ConfigurationError that says to check the
    token URL, not the client credentials; it is not retried, and the entry is untouched."""
    app = Canned(404, *NOT_FOUND_BODIES[body])
    async with ServerThread(app) as elsewhere:
        manager = make_manager(refresher=refresher(elsewhere.url + "/oauth2/token"))
        entry = put_entry(manager, expired(provider.login()))
        with pytest.raises(ConfigurationError) as caught:
            await driver.get_token(manager)
    assert caught.value.setting == "token_url" and caught.value.status_code == 404
    assert caught.value.retryable is False
    assert "Check the token URL" in str(caught.value) and "client_secret" not in str(caught.value)
    assert app.calls == 1 and stored(manager) == entry
    assert_quiet(caught.value, entry.access_token, entry.refresh_token)


async def test_a_wrong_client_secret_says_check_the_client_credentials(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """invalid_client is a ConfigurationError naming client_id, client_secret and auth_method; not retried."""
    manager = make_manager(refresher=refresher(token_url, secret="wrong-secret"))
    entry = put_entry(manager, expired(provider.login()))
    with pytest.raises(ConfigurationError) as caught:
        await driver.get_token(manager)
    assert caught.value.setting == "client" and caught.value.status_code == 401
    assert "client_id, client_secret and auth_method" in str(caught.value)
    assert provider.stats["token_calls"] == provider.stats["invalid_client"] == 1
    assert stored(manager) == entry
    assert_quiet(caught.value, "wrong-secret", entry.access_token, entry.refresh_token)


NOT_JSON_200 = {
    "html": (b"<!doctype html><html><body>Sign in</body></html>", "text/html"),
    "form": (b"access_token=at-FORM-SECRET&token_type=bearer&scope=api", "application/x-www-form-urlencoded"),
    "text": (b"OK", "text/plain"),
}


@pytest.mark.parametrize("body", sorted(NOT_JSON_200))
async def test_a_200_that_is_not_json_says_check_the_token_url(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, body: str
) -> None:
    """A 200 whose body is not a JSON object (a sign-in page, a form-encoded answer, plain text) may have
    rotated the token, so the entry is removed; the caller is told to log in again, and why: the answer was
    not JSON, check the token URL. Nothing of the answer is quoted."""
    app = Canned(200, *NOT_JSON_200[body])
    async with ServerThread(app) as elsewhere:
        manager = make_manager(refresher=refresher(elsewhere.url + "/"))
        entry = put_entry(manager, expired(provider.login()))
        with pytest.raises(ReauthenticationRequired) as caught:
            await driver.get_token(manager)
    assert "not a JSON object" in str(caught.value) and "Check token_url" in str(caught.value)
    assert app.calls == 1 and stored(manager) is None
    assert_quiet(caught.value, "at-FORM-SECRET", entry.access_token, entry.refresh_token)


class Resolver:
    """``socket.getaddrinfo`` with one host name answered by an error code; it counts lookups of that name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, host: str, code: int) -> None:
        self.host = host
        self.code = code
        self.lookups = 0
        self._real = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)

    def getaddrinfo(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in (self.host, self.host.encode()):
            self.lookups += 1
            raise socket.gaierror(self.code, "no address (test resolver)")
        return self._real(host, *args, **kwargs)


async def test_an_unresolvable_host_is_a_configuration_error(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token URL whose host name does not exist (EAI_NONAME) is a ConfigurationError about the token URL's
    host: not retryable, so the job looks it up once."""
    resolver = Resolver(monkeypatch, "token.example.invalid", socket.EAI_NONAME)
    manager = make_manager(refresher=refresher("https://token.example.invalid/token", trust_env=False))
    entry = put_entry(manager, expired(provider.login()))
    with pytest.raises(ConfigurationError) as caught:
        await driver.get_token(manager)
    assert caught.value.setting == "token_url" and caught.value.retryable is False
    assert "host name does not exist" in str(caught.value)
    assert resolver.lookups == 1 and stored(manager) == entry
    assert_quiet(caught.value, entry.access_token, entry.refresh_token)


async def test_a_temporary_resolver_failure_is_retried(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resolver that cannot answer now (EAI_AGAIN) is a retryable RefreshFailed: nothing was sent, so the job
    tries again (MAX_RETRIES times) before the caller gets it."""
    resolver = Resolver(monkeypatch, "token.example.invalid", socket.EAI_AGAIN)
    manager = make_manager(refresher=refresher("https://token.example.invalid/token", trust_env=False))
    entry = put_entry(manager, expired(provider.login()))
    with pytest.raises(RefreshFailed) as caught:
        await driver.get_token(manager)
    assert not isinstance(caught.value, ConfigurationError)
    assert caught.value.retryable is True and caught.value.may_have_rotated is False
    assert "temporary DNS failure" in str(caught.value)
    assert resolver.lookups == 1 + MAX_RETRIES and stored(manager) == entry


async def test_a_refused_certificate_is_a_configuration_error(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, socket_servers: list[SocketServer]
) -> None:
    """A token endpoint whose certificate no trusted CA signed is a ConfigurationError about TLS (check verify=):
    not retried, and the request never went out."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(UNTRUSTED_PEM)
    server = SocketServer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", tls)
    socket_servers.append(server)
    manager = make_manager(refresher=refresher(f"https://127.0.0.1:{server.port}/token", trust_env=False))
    entry = put_entry(manager, expired(provider.login()))
    with pytest.raises(ConfigurationError) as caught:
        await driver.get_token(manager)
    assert caught.value.setting == "tls" and caught.value.retryable is False
    assert "certificate was refused" in str(caught.value) and "verify=" in str(caught.value)
    assert server.connections == 1 and server.request_lines == []
    assert stored(manager) == entry
    assert_quiet(caught.value, entry.access_token, entry.refresh_token)


async def test_verify_takes_an_ssl_context_that_trusts_the_endpoint(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, socket_servers: list[SocketServer]
) -> None:
    """``verify=`` an SSLContext that trusts the endpoint's certificate (a private CA): the refresh goes through
    over TLS with that context, where the default one refuses the same server (the test above)."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(UNTRUSTED_PEM)
    answer = b'{"access_token": "at-over-tls", "expires_in": 60}'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(answer)
    server = SocketServer(head + answer, tls)
    socket_servers.append(server)
    trusting = ssl.create_default_context(cafile=str(UNTRUSTED_PEM))
    manager = make_manager(refresher=refresher(f"https://127.0.0.1:{server.port}/token", verify=trusting))
    put_entry(manager, expired(provider.login()))
    assert (await driver.get_token(manager)).access_token == "at-over-tls"
    assert server.request_lines == ["POST /token HTTP/1.1"]


async def test_https_to_a_plain_http_port_is_a_configuration_error(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread
) -> None:
    """https:// to a port that speaks plain HTTP fails the TLS handshake: a ConfigurationError about TLS and the
    URL, not retried; the provider never sees a token request."""
    manager = make_manager(refresher=refresher(server.url.replace("http://", "https://") + "/token"))
    entry = put_entry(manager, expired(provider.login()))
    with pytest.raises(ConfigurationError) as caught:
        await driver.get_token(manager)
    assert caught.value.setting == "tls" and "handshake" in str(caught.value)
    assert provider.stats["token_calls"] == 0 and stored(manager) == entry


PROXY_REFUSAL = (
    b'HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm="proxy"\r\n'
    b"content-length: 0\r\nconnection: close\r\n\r\n"
)


@pytest.mark.parametrize("token_url", ["http://127.0.0.1:9/token", "https://token.example.test/token"])
async def test_a_proxy_refusing_is_a_configuration_error(
    driver: Driver,
    provider: LocalProvider,
    make_manager: ManagerFactory,
    socket_servers: list[SocketServer],
    token_url: str,
) -> None:
    """A proxy answering 407 (to a forwarded request, or to the CONNECT of an https tunnel) is a
    ConfigurationError about the proxy, not retried."""
    proxy = SocketServer(PROXY_REFUSAL)
    socket_servers.append(proxy)
    manager = make_manager(refresher=refresher(token_url, proxy=proxy.url, trust_env=False))
    entry = put_entry(manager, expired(provider.login()))
    with pytest.raises(ConfigurationError) as caught:
        await driver.get_token(manager)
    assert caught.value.setting == "proxy" and caught.value.status_code == 407
    assert "proxy" in str(caught.value) and "credentials" in str(caught.value)
    method = "CONNECT" if token_url.startswith("https") else "POST"
    assert [line.split(" ")[0] for line in proxy.request_lines] == [method]
    assert stored(manager) == entry
    assert_quiet(caught.value, entry.access_token, entry.refresh_token)


# -- 2. failure memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("redeem_in", ["thread", "task"])
async def test_a_burst_with_a_wrong_client_secret_makes_one_token_call(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str, server: ServerThread, redeem_in: str
) -> None:
    """500 concurrent API requests of one session, with a wrong client secret, then 500 more spread over 50
    other sessions, then one after a new login: one token request in all (counted at the provider). Every
    caller gets its own ConfigurationError at once: it is the manager's, remembered for every session, and a
    new login does not end it (it does not fix the secret)."""
    manager = make_manager(refresher=refresher(token_url, secret="wrong-secret"), redeem_in=redeem_in)
    sessions = [SESSION, *(f"other-{n}" for n in range(50))]
    for session in sessions:
        put_entry(manager, expired(provider.login()), session=session)
    errors: list[BaseException] = []

    async def request(client: httpx.AsyncClient, session: str) -> None:
        try:
            await client.get("/api/me", auth=manager.auth(session))
        except UpstreamAuthError as exc:
            errors.append(exc)

    async def burst(of: list[str]) -> None:
        async with httpx.AsyncClient(base_url=server.url, verify=SSL) as client, anyio.create_task_group() as tg:
            for session in of:
                tg.start_soon(request, client, session)

    await burst([SESSION] * 500)
    assert provider.stats["token_calls"] == 1
    await burst([session for session in sessions[1:] for _ in range(10)])
    await manager.astore(SESSION, expired(provider.login()))
    await burst([SESSION])
    assert len(errors) == 1001 and len({id(e) for e in errors}) == 1001
    assert all(isinstance(e, ConfigurationError) and e.setting == "client" for e in errors)
    assert provider.stats["token_calls"] == provider.stats["invalid_client"] == 1
    assert provider.api_calls == {}
    assert manager.footprint().failing == 1


async def test_a_configuration_error_is_tried_again_after_the_window(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """The remembered error ends with failure_window: once the client's registration is fixed, the next call
    after the window refreshes (one more token request), and not before."""
    clock = FakeClock()
    manager = make_manager(refresher=refresher(token_url, secret="new-secret"), clock=clock, failure_window=5)
    put_entry(manager, expired(provider.login()))
    with pytest.raises(ConfigurationError):
        await manager.aget_token(SESSION)
    provider.clients["test-client"] = ("new-secret", "client_secret_basic")  # an admin fixes the registration
    clock.advance(4.9)
    with pytest.raises(ConfigurationError):
        await manager.aget_token(SESSION)
    assert provider.stats["token_calls"] == 1
    clock.advance(0.2)
    assert (await manager.aget_token(SESSION)).version > 1
    assert provider.stats["token_calls"] == 2 and manager.footprint().failing == 0


async def test_an_outage_is_remembered_for_its_session_until_a_new_login(
    driver: Driver, provider: LocalProvider, manager: TokenManager
) -> None:
    """After the job's retries of a 503 are exhausted, the session's next call gets the same RefreshFailed
    without a token request; another session is not affected (an outage is remembered per session), and a
    new login of the session ends it."""
    put_entry(manager, expired(provider.login()))
    fail_refresh(provider, "503")
    with pytest.raises(RefreshFailed) as first:
        await driver.get_token(manager)
    calls = provider.stats["token_calls"]
    assert calls == 1 + MAX_RETRIES
    with pytest.raises(RefreshFailed) as again:
        await driver.get_token(manager)
    assert (type(again.value), str(again.value)) == (type(first.value), str(first.value))
    assert provider.stats["token_calls"] == calls
    put_entry(manager, expired(provider.login()), session="other")
    assert (await driver.get_token(manager, "other")).version > 1
    assert provider.stats["token_calls"] == calls + 1
    await driver.store(manager, expired(provider.login()))
    assert manager.footprint().failing == 0
    assert (await driver.get_token(manager)).version > 1
    assert provider.stats["token_calls"] == calls + 2


async def test_a_retry_after_longer_than_the_window_is_honoured(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A 429 asking for Retry-After: 1 is remembered that long, though failure_window is shorter."""
    clock = FakeClock()
    # refresh_timeout leaves no room to wait 1 s inside the job: the 429 reaches the caller at once.
    manager = make_manager(clock=clock, failure_window=0.5, refresh_timeout=1.5)
    put_entry(manager, expired(provider.login()))
    provider.fail_next("429")
    with pytest.raises(RefreshFailed) as caught:
        await manager.aget_token(SESSION)
    assert caught.value.retry_after == 1.0
    clock.advance(0.9)
    with pytest.raises(RefreshFailed):
        await manager.aget_token(SESSION)
    assert provider.stats["token_calls"] == 1
    clock.advance(0.2)
    assert (await manager.aget_token(SESSION)).version > 1
    assert provider.stats["token_calls"] == 2


async def test_remembered_failures_are_bounded_by_cache_size(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """Twelve sessions whose refresh failed: the table keeps the newest cache_size of them (forgetting one costs
    that session one more token request); a logout ends one."""
    manager = make_manager(cache_size=4, refresh_timeout=1.5)
    for n in range(12):
        put_entry(manager, expired(provider.login()), session=f"s-{n}")
        provider.fail_next("429")
        with pytest.raises(RefreshFailed):
            await manager.aget_token(f"s-{n}")
    assert manager.footprint().failing == 4
    with pytest.raises(RefreshFailed):
        await manager.aget_token("s-11")  # remembered: no token request
    assert provider.stats["token_calls"] == 12
    await manager.adelete("s-11")
    assert manager.footprint().failing == 3


async def test_a_still_valid_token_is_served_while_a_configuration_error_is_remembered(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """Another session's token, inside its refresh leeway but still valid, is sent as it is while the manager
    remembers a configuration error: no early refresh is tried, and no request fails."""
    manager = make_manager(refresher=refresher(token_url, secret="wrong-secret"), leeway=30, max_leeway_fraction=0.5)
    put_entry(manager, expired(provider.login()))
    with pytest.raises(ConfigurationError):
        await manager.aget_token(SESSION)
    login = provider.login(access_ttl=20)
    assert login.expires_at is not None
    early = put_entry(manager, attrs.evolve(login, issued_at=login.expires_at - 60), session="early")
    assert (await manager.aget_token("early")).access_token == early.access_token
    assert provider.stats["token_calls"] == 1


async def test_a_remembered_failure_keeps_no_frame(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """A failure is remembered without its traceback, whose frames hold the job's locals (the entry and its
    tokens) and the manager itself: once the jobs ended, no traceback through a job's frames is alive in the
    process while the manager still remembers both failures. Each caller gets a copy raised afresh."""
    manager = make_manager(refresher=refresher(token_url, secret="wrong"))
    put_entry(manager, expired(provider.login()))
    fail_refresh(provider, "503")
    put_entry(manager, expired(provider.login()), session="other")
    errors = []
    for session in ("other", SESSION, SESSION):
        with pytest.raises(RefreshFailed) as caught:
            await driver.get_token(manager, session)
        errors.append(caught.value)
    assert [type(e) for e in errors] == [RefreshFailed, ConfigurationError, ConfigurationError]
    assert manager.footprint().failing == 2 and manager.footprint().flights == 0
    assert errors[1] is not errors[2]
    # The errors raised here hold their callers' frames, which hold the job's outcome: drop them. A job's thread
    # holds its own failure until it ends, just after publishing it: poll until no traceback through a job's
    # frames is alive (a kept one never ends, and fails the test at the bound). The core keeps a failure alike
    # whoever called, and a heap scan is slow in a long-lived worker: once, through the blocking API.
    del errors, caught
    if driver.mode != "sync":
        return
    with anyio.fail_after(WAIT_LIMIT):
        while _job_tracebacks_alive():
            await anyio.sleep(0.05)


def _job_tracebacks_alive() -> bool:
    gc.collect()
    return any(isinstance(tb, types.TracebackType) and _in_a_job(tb) for tb in gc.get_objects())


#: The functions of a refresh job (async source and sync twin alike), where a refresh failure is raised.
JOB_FUNCTIONS = {"run_flight", "_lead", "_redeem", "_redeem_marked", "_answer"}


def _in_a_job(tb: types.TracebackType) -> bool:
    """True when the traceback passes through a refresh job's frames."""
    walk: types.TracebackType | None = tb
    while walk is not None:
        code = walk.tb_frame.f_code
        if code.co_name in JOB_FUNCTIONS and "httpx_upstream_auth" in code.co_filename:
            return True
        walk = walk.tb_next
    return False


# -- 3. reuse_grace: a lost answer recovered --------------------------------------------------------------

LOST_ANSWERS = ["answer_delay:1", "redeem_then:502", "redeem_then:504"]


def graced_manager(make_manager: ManagerFactory, token_url: str, reuse_grace: float) -> TokenManager:
    """A manager whose refresher gives up on an answer after 0.3 s (it is lost), with this reuse_grace."""
    return make_manager(refresher=refresher(token_url, timeout=0.3), reuse_grace=reuse_grace)


@pytest.mark.parametrize("fault", LOST_ANSWERS)
async def test_a_lost_answer_inside_the_grace_keeps_the_session(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str, fault: str
) -> None:
    """The provider redeemed the refresh token but its answer was lost (a timeout after sending, a gateway's
    502/504). Within the provider's grace the job presents the same token once more and saves the fresh pair:
    the session lives on without a login; exactly one grace reuse, no reuse detected."""
    provider.reuse_grace = 30
    manager = graced_manager(make_manager, token_url, reuse_grace=30)
    entry = put_entry(manager, expired(provider.login()))
    provider.fail_next(fault)
    fresh = await driver.get_token(manager)
    assert fresh.version == entry.version + 1 and fresh.refresh_token != entry.refresh_token
    assert stored(manager) == fresh
    stats = provider.stats
    assert (stats["token_calls"], stats["grace_reuse"], stats["refresh_reuse"]) == (2, 1, 0)
    assert manager.footprint().consumed == 0
    assert (await driver.request(manager)).status_code == 200
    # The grant lives on: the next refresh, from the saved pair, works too.
    put_entry(manager, expired(fresh))
    assert (await driver.get_token(manager)).version == fresh.version + 2
    assert (provider.stats["refresh_reuse"], provider.stats["invalid_grant"]) == (0, 0)


@pytest.mark.parametrize("fault", ["answer_delay:1", "redeem_then:502"])
async def test_a_task_job_recovers_a_lost_answer_inside_the_grace(
    provider: LocalProvider, make_manager: ManagerFactory, token_url: str, fault: str
) -> None:
    """The same with redeem_in="task" (the job is a task of the caller's loop, the async refresher sends)."""
    provider.reuse_grace = 30
    manager = make_manager(refresher=refresher(token_url, timeout=0.3), reuse_grace=30, redeem_in="task")
    entry = put_entry(manager, expired(provider.login()))
    provider.fail_next(fault)
    fresh = await manager.aget_token(SESSION)
    assert fresh.version == entry.version + 1 and stored(manager) == fresh
    stats = provider.stats
    assert (stats["token_calls"], stats["grace_reuse"], stats["refresh_reuse"]) == (2, 1, 0)


async def test_a_lost_answer_detected_after_the_grace_fails_closed(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """The answer is known lost only after the grace has passed (a 0.3 s timeout against a 0.1 s grace): the
    token is not presented again, though the provider would still honour it; the entry is removed."""
    provider.reuse_grace = 30
    manager = graced_manager(make_manager, token_url, reuse_grace=0.1)
    put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:1")
    await assert_fails_closed(driver, manager, provider)
    assert provider.stats["grace_reuse"] == 0


async def test_without_a_grace_a_lost_answer_fails_closed(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """reuse_grace=0 (the default) is the strict behaviour: no second presentation, the entry is removed."""
    provider.reuse_grace = 30
    manager = graced_manager(make_manager, token_url, reuse_grace=0)
    put_entry(manager, expired(provider.login()))
    provider.fail_next("redeem_then:502")
    await assert_fails_closed(driver, manager, provider)
    assert provider.stats["grace_reuse"] == 0


async def test_a_grace_retry_is_made_once(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """When the answer to the grace retry is lost too, the job fails closed: two presentations of the token in
    all, both within the grace (none detected as reuse), and none afterwards."""
    provider.reuse_grace = 30
    manager = graced_manager(make_manager, token_url, reuse_grace=30)
    put_entry(manager, expired(provider.login()))
    provider.fail_next("redeem_then:502", 2)
    with pytest.raises(ReauthenticationRequired) as caught:
        await driver.get_token(manager)
    assert "502" in str(caught.value)
    assert stored(manager) is None
    with pytest.raises(ReauthenticationRequired):
        await driver.get_token(manager)
    stats = provider.stats
    assert (stats["token_calls"], stats["grace_reuse"], stats["refresh_reuse"]) == (2, 1, 0)


async def test_a_refused_grace_retry_fails_closed(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """The grace retry meets a refusal that consumed nothing (a 503): the first, lost request may still have
    consumed the token, so it is not presented a third time, nor kept: the job fails closed."""
    provider.reuse_grace = 30
    manager = graced_manager(make_manager, token_url, reuse_grace=30)
    put_entry(manager, expired(provider.login()))
    provider.fail_next("redeem_then:502")
    fail_refresh(provider, "503")
    with pytest.raises(ReauthenticationRequired) as caught:
        await driver.get_token(manager)
    assert "retry within reuse_grace was refused" in str(caught.value)
    assert stored(manager) is None and manager.footprint().failing == 0
    stats = provider.stats
    assert (stats["token_calls"], stats["refresh_reuse"], stats["grace_reuse"]) == (2, 0, 0)


async def test_settings_are_checked(make_manager: ManagerFactory) -> None:
    """A negative, infinite or non-numeric failure_window or reuse_grace is refused at construction."""
    for name in ("failure_window", "reuse_grace"):
        for value in (-1, float("inf"), float("nan"), "5", True):
            with pytest.raises(ValueError, match=name):
                make_manager(**{name: value})


def test_an_entry_from_a_login_answer_refreshes(
    provider: LocalProvider, make_manager: ManagerFactory, server: ServerThread
) -> None:
    """An entry built with UpstreamTokens.from_token_response from a real token answer (here the provider's
    refresh answer, as a login's code exchange gives one) is stored, used and refreshed like any other."""
    login = provider.login()
    manager = make_manager()
    with httpx.Client(base_url=server.url, verify=SSL) as http:
        sent_at = time.time()
        response = http.post(
            "/token",
            data={"grant_type": "refresh_token", "refresh_token": login.refresh_token or ""},
            auth=("test-client", "test-secret"),
        )
        tokens = UpstreamTokens.from_token_response(
            response, obtained_at=sent_at, user_id="user-1", upstream_subject="alice", client_id="test-client"
        )
        assert tokens.expires_at == sent_at + provider.access_ttl and tokens.refresh_token is not None
        manager.store(SESSION, tokens)
        assert http.get("/api/me", auth=manager.auth(SESSION)).status_code == 200
        manager.store(SESSION, expired(tokens))
        assert manager.get_token(SESSION).access_token != tokens.access_token
    assert provider.stats["refresh_ok"] == 2 and provider.stats["refresh_reuse"] == 0


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_an_old_row_with_an_implausible_expiry_is_read_and_healed(
    provider: LocalProvider,
    make_manager: ManagerFactory,
    server: ServerThread,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    """A row written before entries were checked, its expiry in milliseconds: the store still reads it (the
    expiry is unknown), the token is used until the API refuses it, and the refresh then writes a real expiry."""
    login = provider.login()
    assert login.expires_at is not None
    key = EntryKey("local", SESSION)
    storage: SQLiteStorage | RedisStorage
    if backend == "sqlite":
        storage = SQLiteStorage(tmp_path / "tokens.db")
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"old-rows-{uuid.uuid4().hex[:8]}"
        storage = RedisStorage.from_url(redis.url, prefix=prefix)
    manager = make_manager(storage=storage)
    entry = put_entry(manager, login)
    old = json.dumps({**entry.to_dict(), "expires_at": login.expires_at * 1000})  # what an older version took
    if isinstance(storage, SQLiteStorage):
        with contextlib.closing(sqlite3.connect(tmp_path / "tokens.db")) as db, db:
            db.execute("UPDATE entries SET data = ?", (old,))
    else:
        (entry_key,) = [name for name in redis.cli("KEYS", f"{prefix}*").split() if name.endswith(":entry")]
        redis.cli("HSET", entry_key, "d", old)
    read = storage.get(key)
    assert read is not None and read.expires_at is None and read.access_token == login.access_token
    provider.revoke_access(login.access_token)
    with httpx.Client(base_url=server.url, verify=SSL) as http:
        assert http.get("/api/me", auth=manager.auth(SESSION)).status_code == 200  # 401, refresh, replay
    healed = storage.get(key)
    assert healed is not None and healed.expires_at is not None and healed.version == entry.version + 1
    assert provider.stats["refresh_ok"] == 1 and provider.stats["api_401"] == 1


async def test_a_grace_retry_that_might_arrive_after_the_grace_is_not_made(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory, token_url: str
) -> None:
    """The answer is known lost after 0.3 s (the refresher's timeout) and the grace is 0.5 s: a retry could take
    another 0.3 s to arrive, after the provider's grace has ended (reuse, the grant revoked), so the job fails
    closed instead of presenting the token again."""
    provider.reuse_grace = 0.5
    manager = graced_manager(make_manager, token_url, reuse_grace=0.5)
    put_entry(manager, expired(provider.login()))
    provider.fail_next("answer_delay:1")
    await assert_fails_closed(driver, manager, provider)
    assert provider.stats["grace_reuse"] == 0


async def test_a_refused_scope_is_remembered_for_its_session_only(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """invalid_scope depends on what a session's grant allows: it is remembered for that session (its next call
    makes no token request), while another session's refresh goes to the provider and succeeds."""
    manager = make_manager()
    put_entry(manager, expired(provider.login()), session="narrow")
    put_entry(manager, expired(provider.login()), session="other")
    provider.fail_next("invalid_scope")
    with pytest.raises(ConfigurationError) as caught:
        await driver.get_token(manager, "narrow")
    assert caught.value.setting == "scope"
    assert (await driver.get_token(manager, "other")).version == 2
    with pytest.raises(ConfigurationError):
        await driver.get_token(manager, "narrow")
    assert (provider.stats["token_calls"], provider.stats["refresh_ok"]) == (2, 1)


async def test_a_remembered_retry_after_counts_down(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A 429 asking for 1 s is remembered with its Retry-After; a caller answered from that memory later is told
    what is left of it, not the whole second again."""
    clock = FakeClock(1_800_000_000.0)
    # A refresh_timeout too short to wait the second out: the job gives up at once instead of retrying.
    manager = make_manager(clock=clock, failure_window=0.0, refresh_timeout=1.5)
    put_entry(manager, attrs.evolve(provider.login(), expires_at=clock.time() - 5, issued_at=clock.time() - 65))
    provider.fail_next("429")
    with pytest.raises(RefreshFailed) as first:
        await driver.get_token(manager)
    assert first.value.retry_after == 1.0
    calls = provider.stats["token_calls"]
    clock.advance(0.75)
    with pytest.raises(RefreshFailed) as later:
        await driver.get_token(manager)
    assert later.value.retry_after == pytest.approx(0.25) and provider.stats["token_calls"] == calls == 1
