"""SDK-login mode: the MCP SDK's own interactive login (registration, PKCE, browser), and our refresh after it."""

from __future__ import annotations

import contextvars
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

pytest.importorskip("mcp.server.mcpserver", reason="the MCP SDK 2.x is not installed")

import httpx2
import mcp_fixtures
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientMetadata, OAuthToken
from support import ManagerFactory, aput_entry, expired

from httpx_upstream_auth import EntryKey, OAuth2Refresher, SQLiteStorage
from httpx_upstream_auth.mcp import (
    SDKLogin,
    TokenStorageAdapter,
    connect,
    oauth_token_from,
    tokens_from_oauth,
)
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider, ServerThread, serve_mcp

HeadlessBrowser = mcp_fixtures.HeadlessBrowser

# The shared fixtures, served for this module's own ``provider``.
mcp_server = mcp_fixtures.mcp_server
provider_server = mcp_fixtures.provider_server

pytestmark = pytest.mark.anyio

ISSUER_PATH = "/oauth/tenant-a"
SESSION = "sdk-session"
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: the headless browser reads the redirect


def client_metadata() -> OAuthClientMetadata:
    """What the SDK registers: a confidential client with client_secret_post."""
    return OAuthClientMetadata(
        redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
        token_endpoint_auth_method="client_secret_post",
        client_name="sdk-login-test",
        scope="api",
    )


@pytest.fixture
def provider() -> LocalProvider:
    """2-second tokens, rotation, the authorization server under a path."""
    return LocalProvider(access_ttl=2, issuer_path=ISSUER_PATH)


@pytest.fixture
def browser() -> HeadlessBrowser:
    """The user's (headless) browser."""
    return HeadlessBrowser()


@pytest.fixture
async def login(tmp_path: Path, mcp_server: LocalMCPServer, browser: HeadlessBrowser) -> AsyncIterator[SDKLogin]:
    """SDK-login mode over a SQLite file."""
    made = SDKLogin(
        mcp_server.url,
        client_metadata=client_metadata(),
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
        storage=SQLiteStorage(tmp_path / "tokens.db"),
        provider_id="mcp-test",
    )
    yield made
    await made.aclose()


def test_oauth_token_conversions() -> None:
    """The SDK's relative expires_in becomes an absolute expiry from the time obtained, and back."""
    token = OAuthToken(access_token="a", refresh_token="r", expires_in=3600, scope="api")
    ours = tokens_from_oauth(token, obtained_at=1_700_000_000.0, provider_id="p", user_id="u", client_id="c")
    assert (ours.expires_at, ours.issued_at, ours.refresh_token, ours.user_id, ours.client_id) == (
        1_700_003_600.0,
        1_700_000_000.0,
        "r",
        "u",
        "c",
    )
    assert oauth_token_from(ours, now=1_700_000_600.0).expires_in == 3000
    assert oauth_token_from(ours, now=1_700_009_999.0).expires_in == 0


async def test_first_login_goes_through_the_sdk_then_tokens_are_stored_absolute(
    provider: LocalProvider, mcp_server: LocalMCPServer, login: SDKLogin, browser: HeadlessBrowser
) -> None:
    """The first connect logs in through the SDK's flow (registration, PKCE, browser) once; the stored entry
    has an absolute expiry and the binding fields; the discovered token endpoint is the one under the path."""
    async with connect(mcp_server.url, login, SESSION, user_id="u-42", mode="legacy") as client:
        assert (await client.call_tool("echo", {"text": "hi"})).content[0].text == "hi"  # type: ignore[union-attr]
    assert browser.visits == 1
    assert provider.flow_stats["registrations"] == 1 and provider.flow_stats["code_exchanges"] == 1
    entry = await login.manager.storage.aget(EntryKey(login.manager.provider_id, SESSION))
    assert entry is not None and entry.expires_at is not None and entry.issued_at is not None
    assert entry.expires_at - entry.issued_at == pytest.approx(2)  # the 2-second lifetime, from when it came
    assert entry.issued_at > time.time() - 3600  # a point in time, not a lifetime
    assert entry.user_id == "u-42" and entry.client_id is not None and entry.client_id.startswith("dyn-")
    token_url, metadata = login.refresher.token_url, login.refresher.metadata
    assert token_url is not None and metadata is not None
    assert token_url == metadata.issuer + "/token" and token_url.endswith(ISSUER_PATH + "/token")


async def test_a_401_with_a_valid_refresh_token_refreshes_without_a_browser(
    provider: LocalProvider, mcp_server: LocalMCPServer, login: SDKLogin, browser: HeadlessBrowser
) -> None:
    """After the login, a revoked access token (401) is refreshed by us and the call replayed: no browser."""
    async with connect(mcp_server.url, login, SESSION, mode="legacy") as client:
        await client.call_tool("echo", {"text": "1"})
        provider.revoke_access((await login.manager.aget_token(SESSION)).access_token)
        assert (await client.call_tool("echo", {"text": "2"})).content[0].text == "2"  # type: ignore[union-attr]
        await anyio.sleep(2.1)  # expired: refreshed before sending, still no browser
        assert (await client.call_tool("echo", {"text": "3"})).content[0].text == "3"  # type: ignore[union-attr]
    assert browser.visits == 1 and provider.flow_stats["code_exchanges"] == 1
    assert provider.stats["refresh_ok"] == 2 and provider.stats["refresh_reuse"] == 0
    assert "resource" in provider.requests[-1]["form"]  # RFC 8707, as the server named one


async def test_a_dead_grant_logs_in_again_through_the_sdk(
    provider: LocalProvider, mcp_server: LocalMCPServer, login: SDKLogin, browser: HeadlessBrowser
) -> None:
    """A genuine re-login (the grant was revoked) goes through the SDK's flow again, reusing the registration."""
    async with connect(mcp_server.url, login, SESSION, mode="legacy") as client:
        await client.call_tool("echo", {"text": "1"})
        provider.revoke_grant(provider.grant_of((await login.manager.aget_token(SESSION)).access_token))
        assert (await client.call_tool("echo", {"text": "2"})).content[0].text == "2"  # type: ignore[union-attr]
    assert browser.visits == 2 and provider.flow_stats["code_exchanges"] == 2
    assert provider.flow_stats["registrations"] == 1
    assert provider.stats["refresh_reuse"] == 0


RESTART = """
import sys, anyio
from mcp.shared.auth import OAuthClientMetadata
from httpx_upstream_auth import SQLiteStorage
from httpx_upstream_auth.mcp import SDKLogin, connect

async def no_browser(url: str) -> None:
    raise SystemExit("the restarted client asked for a login")

async def main() -> None:
    login = SDKLogin(sys.argv[1], storage=SQLiteStorage(sys.argv[2]), provider_id="mcp-test",
                     client_metadata=OAuthClientMetadata(redirect_uris=["http://127.0.0.1:9/callback"]),
                     redirect_handler=no_browser, callback_handler=None)
    async with connect(sys.argv[1], login, "sdk-session", mode="legacy") as client:
        print((await client.call_tool("echo", {"text": "after restart"})).content[0].text)
    print("discoveries", login.refresher.discoveries)
    await login.aclose()

anyio.run(main)
"""


async def test_a_restarted_client_process_needs_no_login_and_refreshes(
    tmp_path: Path, provider: LocalProvider, mcp_server: LocalMCPServer, login: SDKLogin, browser: HeadlessBrowser
) -> None:
    """Log in, then start a new client process on the same SQLite file after the token expired: no second
    login, no rediscovery, one refresh at the discovered endpoint."""
    async with connect(mcp_server.url, login, SESSION, mode="legacy") as client:
        await client.call_tool("echo", {"text": "first"})
    await anyio.sleep(2.1)
    metadata_requests = provider.flow_stats["metadata_requests"]
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-c", textwrap.dedent(RESTART), mcp_server.url, str(tmp_path / "tokens.db")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["after restart", "discoveries 0"]
    assert browser.visits == 1 and provider.flow_stats["code_exchanges"] == 1
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0
    assert provider.flow_stats["metadata_requests"] == metadata_requests


async def five_sleeps(client: Client) -> float:
    """Five concurrent 1-second tool calls; their wall time."""
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(client.call_tool, "sleep", {"seconds": 1.0})
    return time.monotonic() - started


@pytest.fixture
def json_server(provider: LocalProvider, provider_server: ServerThread) -> Iterator[LocalMCPServer]:
    """A real MCP server that answers each POST with JSON (headers only once the tool is done)."""
    with serve_mcp(provider, provider_server.url + ISSUER_PATH, json_response=True) as served:
        yield served


async def test_five_concurrent_calls_run_in_parallel_in_sdk_login_mode(
    tmp_path: Path, provider: LocalProvider, json_server: LocalMCPServer, browser: HeadlessBrowser
) -> None:
    """Five concurrent 1-s tool calls in SDK-login mode all run at once on the server (we hold nothing across a
    request); through the SDK's own OAuthClientProvider, which holds its lock across each request, one at a time."""
    provider.access_ttl = 60
    mcp_server = json_server
    login = SDKLogin(
        mcp_server.url,
        client_metadata=client_metadata(),
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
        storage=SQLiteStorage(tmp_path / "json.db"),
    )
    async with connect(mcp_server.url, login, SESSION, mode="legacy") as client:
        ours = await five_sleeps(client)
    ours_parallel = mcp_server.max_sleeping
    assert browser.visits == 1

    mcp_server.max_sleeping = 0
    sdk_browser = HeadlessBrowser()
    sdk_auth = OAuthClientProvider(
        mcp_server.url,
        client_metadata(),
        storage=TokenStorageAdapter(login.manager, "sdk-own", mcp_server.url),
        redirect_handler=sdk_browser.redirect,
        callback_handler=sdk_browser.callback,
    )
    async with (
        httpx2.AsyncClient(auth=sdk_auth, timeout=httpx2.Timeout(30, read=300)) as http,
        Client(streamable_http_client(mcp_server.url, http_client=http), mode="legacy") as client,
    ):
        sdk = await five_sleeps(client)
    await login.aclose()
    print(f"\nfive concurrent 1-s tool calls: {ours:.2f} s in SDK-login mode, {sdk:.2f} s with the SDK's provider")
    assert ours_parallel == 5
    assert mcp_server.max_sleeping == 1


async def test_concurrent_first_requests_log_in_once(
    provider: LocalProvider, provider_server: ServerThread, login: SDKLogin, browser: HeadlessBrowser
) -> None:
    """Five concurrent first requests of one session: one login through the SDK, the others wait for it (holding
    nothing) and then use its tokens."""
    statuses: list[int] = []
    async with httpx2.AsyncClient(auth=login.auth(SESSION), base_url=provider_server.url) as client:

        async def get() -> None:
            statuses.append((await client.get("/api/me")).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(get)
    assert statuses == [200] * 5
    assert browser.visits == 1 and provider.flow_stats["code_exchanges"] == 1


async def test_the_sdks_own_provider_over_the_adapter_survives_a_restart(
    tmp_path: Path, provider: LocalProvider, mcp_server: LocalMCPServer, browser: HeadlessBrowser
) -> None:
    """Apps that keep the SDK's OAuthClientProvider, with TokenStorageAdapter as its storage: after a restart
    (new provider, manager and storage objects over the same file) and an expiry, no login: our manager
    refreshes at the discovered endpoint when the SDK asks for the tokens."""
    from httpx_upstream_auth import TokenManager
    from httpx_upstream_auth.mcp import DiscoveringRefresher

    async def run_app() -> str:
        storage = SQLiteStorage(tmp_path / "own.db")
        manager = TokenManager(
            refresher=DiscoveringRefresher(mcp_server.url, storage=storage), provider_id="own", storage=storage
        )
        sdk_auth = OAuthClientProvider(
            mcp_server.url,
            client_metadata(),
            storage=TokenStorageAdapter(manager, "app-user", mcp_server.url, user_id="u-7"),
            redirect_handler=browser.redirect,
            callback_handler=browser.callback,
        )
        try:
            async with (
                httpx2.AsyncClient(auth=sdk_auth, timeout=httpx2.Timeout(30, read=300)) as http,
                Client(streamable_http_client(mcp_server.url, http_client=http), mode="legacy") as client,
            ):
                text: str = (await client.call_tool("echo", {"text": "ok"})).content[0].text  # type: ignore[union-attr]
                return text
        finally:
            await manager.aclose()

    assert await run_app() == "ok"
    assert browser.visits == 1 and provider.stats["refresh_ok"] == 0
    await anyio.sleep(2.1)
    assert await run_app() == "ok"  # the restart
    assert browser.visits == 1 and provider.flow_stats["code_exchanges"] == 1
    assert provider.stats["refresh_ok"] == 1 and provider.stats["refresh_reuse"] == 0


async def test_refreshes_keep_the_registration_and_metadata_records_alive(
    provider: LocalProvider, mcp_server: LocalMCPServer, login: SDKLogin
) -> None:
    """A refresh rewrites the stored registration and metadata (at most every ``keep_alive`` seconds), so they do
    not outlive the storage's retention while the token entries, rewritten by every refresh, live on (item 3)."""
    from httpx_upstream_auth.mcp._refresher import METADATA_NAMESPACE, REGISTRATION_NAMESPACE

    provider.access_ttl = 3600  # only the expiries stored below may refresh, however slow the machine
    storage = login.manager.storage
    keys = [EntryKey(ns, mcp_server.url) for ns in (REGISTRATION_NAMESPACE, METADATA_NAMESPACE)]
    async with connect(mcp_server.url, login, SESSION, mode="legacy") as client:
        await client.call_tool("echo", {"text": "1"})
        before = [(await storage.aget(key)).version for key in keys]  # type: ignore[union-attr]
        login.refresher.keep_alive = 0
        await login.manager.astore(SESSION, expired_entry(await login.manager.aget_token(SESSION)))
        await client.call_tool("echo", {"text": "2"})
        login.refresher.keep_alive = 3600
        await login.manager.astore(SESSION, expired_entry(await login.manager.aget_token(SESSION)))
        await client.call_tool("echo", {"text": "3"})
    after = [(await storage.aget(key)).version for key in keys]  # type: ignore[union-attr]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]
    assert provider.stats["refresh_ok"] == 2


async def test_a_lost_registration_means_a_new_login_not_a_stuck_session(
    provider: LocalProvider, mcp_server: LocalMCPServer, login: SDKLogin, browser: HeadlessBrowser
) -> None:
    """When the registration record is gone (past the storage's retention), the next refresh asks for a login,
    after which the registration is stored again: the session goes on (it was stuck on DiscoveryFailed), and
    the next expiry is a refresh, not a login."""
    from httpx_upstream_auth.mcp._refresher import REGISTRATION_NAMESPACE

    key = EntryKey(REGISTRATION_NAMESPACE, mcp_server.url)
    async with connect(mcp_server.url, login, SESSION, mode="legacy") as client:
        await client.call_tool("echo", {"text": "1"})
        await login.manager.storage.adelete(key)
        await login.manager.astore(SESSION, expired_entry(await login.manager.aget_token(SESSION)))
        assert (await client.call_tool("echo", {"text": "2"})).content[0].text == "2"  # type: ignore[union-attr]
        assert await login.manager.storage.aget(key) is not None
        await login.manager.astore(SESSION, expired_entry(await login.manager.aget_token(SESSION)))
        assert (await client.call_tool("echo", {"text": "3"})).content[0].text == "3"  # type: ignore[union-attr]
    assert browser.visits == 2 and provider.stats["refresh_ok"] == 1


def expired_entry(tokens: Any) -> Any:
    """The same grant, as if its access token had expired."""
    import attrs

    return attrs.evolve(tokens, expires_at=time.time() - 1)


async def test_what_the_adapter_cannot_do_the_sdk_logs_in_at_the_first_expiry_after_a_restart(
    tmp_path: Path, provider: LocalProvider, mcp_server: LocalMCPServer, browser: HeadlessBrowser
) -> None:
    """The limit docs/mcp.md states (item 7): the SDK's provider reads the adapter's tokens once and never learns
    their expiry (python-sdk #1318/#3250), so in a restarted app the first expiry is a 401 and the SDK's
    login (a browser) although the grant is alive; SDKLogin (test_a_restarted_client_process_...) does not."""
    from httpx_upstream_auth import TokenManager
    from httpx_upstream_auth.mcp import DiscoveringRefresher

    storage = SQLiteStorage(tmp_path / "own.db")
    manager = TokenManager(
        refresher=DiscoveringRefresher(mcp_server.url, storage=storage), provider_id="own", storage=storage
    )
    texts = []
    try:
        for _ in range(2):  # the first run logs in; the second is the restarted app
            sdk_auth = OAuthClientProvider(
                mcp_server.url,
                client_metadata(),
                storage=TokenStorageAdapter(manager, "app-user", mcp_server.url),
                redirect_handler=browser.redirect,
                callback_handler=browser.callback,
            )
            async with (
                httpx2.AsyncClient(auth=sdk_auth, timeout=httpx2.Timeout(30, read=300)) as http,
                Client(streamable_http_client(mcp_server.url, http_client=http), mode="legacy") as client,
            ):
                texts.append((await client.call_tool("echo", {"text": "a"})).content[0].text)  # type: ignore[union-attr]
            assert browser.visits == 1
        async with (
            httpx2.AsyncClient(auth=sdk_auth, timeout=httpx2.Timeout(30, read=300)) as http,
            Client(streamable_http_client(mcp_server.url, http_client=http), mode="legacy") as client,
        ):
            await anyio.sleep(2.1)  # the token the restarted SDK loaded expires while it runs
            texts.append((await client.call_tool("echo", {"text": "b"})).content[0].text)  # type: ignore[union-attr]
    finally:
        await manager.aclose()
    assert texts == ["a", "a", "b"]
    assert browser.visits == 2 and provider.flow_stats["code_exchanges"] == 2  # a second login, grant alive


class ConsentBrowser(HeadlessBrowser):
    """A browser whose user may untick scopes on the consent screen: ``granted`` replaces the asked scope."""

    granted: str | None = None
    asked: list[str]

    async def redirect(self, url: str) -> None:
        """Record the scope asked for; approve only ``granted`` when set."""
        from urllib.parse import parse_qsl, urlencode

        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        self.asked = [*getattr(self, "asked", []), query.get("scope", "")]
        if self.granted is not None:
            query["scope"] = self.granted
        await super().redirect(parts._replace(query=urlencode(query)).geturl())


async def test_insufficient_scope_steps_up_through_the_sdk_once(
    provider: LocalProvider, mcp_server: LocalMCPServer, tmp_path: Path
) -> None:
    """Item 6: a 403 insufficient_scope naming "api admin" makes SDK-login mode re-authorize through the SDK with
    that scope and replay (one login); when the user does not grant it, InsufficientScope with the scope asked,
    after one step-up (no loop)."""
    from httpx_upstream_auth.mcp import InsufficientScope

    browser = ConsentBrowser()
    login = SDKLogin(
        mcp_server.url,
        client_metadata=client_metadata(),
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
        storage=SQLiteStorage(tmp_path / "tokens.db"),
    )
    try:
        async with connect(mcp_server.url, login, SESSION, mode="legacy") as client:
            await client.call_tool("echo", {"text": "1"})
            mcp_server.require_scope = "api admin"
            assert (await client.call_tool("echo", {"text": "2"})).content[0].text == "2"  # type: ignore[union-attr]
            assert browser.visits == 2 and set(browser.asked[-1].split()) == {"api", "admin"}
            granted = (await login.manager.aget_token(SESSION)).scope or ""
            assert set(granted.split()) == {"api", "admin"}
            mcp_server.require_scope = "api admin audit"
            browser.granted = "api admin"  # the user unticks "audit"
            with pytest.raises(InsufficientScope) as caught:
                await client.call_tool("echo", {"text": "3"})
    finally:
        await login.aclose()
    assert caught.value.scope == "api admin audit"
    assert browser.visits == 3  # one step-up for the refused call, then the typed error


async def test_sdk_login_is_an_async_context_manager_and_keeps_its_scope_per_session(
    mcp_server: LocalMCPServer, browser: HeadlessBrowser
) -> None:
    """``async with SDKLogin(...)`` closes it; a first request that logs in and then meets 403 insufficient_scope
    steps up within the same call; the SDK's rewrite of the scope stays in its session (the configured client
    metadata is never changed)."""
    metadata = client_metadata()
    async with SDKLogin(
        mcp_server.url,
        client_metadata=metadata,
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
    ) as login:
        mcp_server.require_scope = "api admin"
        async with connect(mcp_server.url, login, SESSION, mode="legacy", max_sse_event_size=1 << 20) as client:
            assert (await client.call_tool("echo", {"text": "1"})).content[0].text == "1"  # type: ignore[union-attr]
    assert browser.visits == 2  # the login, then one step-up for the same request
    assert login.client_metadata is not None
    assert metadata.scope == "api" and login.client_metadata.scope == "api"


async def test_a_pre_registered_client_logs_in_and_refreshes_without_registering(
    provider: LocalProvider, mcp_server: LocalMCPServer, browser: HeadlessBrowser
) -> None:
    """SDKLogin(client_information=...): the login uses the pre-registered client (nothing registered), and our
    refreshes authenticate as it with its auth method."""
    from mcp.shared.auth import OAuthClientInformationFull

    client = OAuthClientInformationFull(
        client_id="post-client",
        client_secret="post-secret",
        token_endpoint_auth_method="client_secret_post",
        redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
    )
    async with (
        SDKLogin(
            mcp_server.url,
            client_metadata=client_metadata(),
            redirect_handler=browser.redirect,
            callback_handler=browser.callback,
            client_information=client,
        ) as login,
        connect(mcp_server.url, login, SESSION, mode="legacy") as session,
    ):
        assert (await session.call_tool("whoami", {})).content[0].text == "post-client"  # type: ignore[union-attr]
        await login.manager.astore(SESSION, expired_entry(await login.manager.aget_token(SESSION)))
        assert (await session.call_tool("whoami", {})).content[0].text == "post-client"  # type: ignore[union-attr]
    assert provider.flow_stats["registrations"] == 0 and browser.visits == 1
    assert provider.stats["refresh_ok"] == 1
    assert (provider.requests[-1]["client_id"], provider.requests[-1]["auth_method"]) == (
        "post-client",
        "client_secret_post",
    )


async def test_an_sdk_provider_of_your_own_does_the_logins(
    provider: LocalProvider, mcp_server: LocalMCPServer, browser: HeadlessBrowser
) -> None:
    """SDKLogin(sdk_provider=...) builds the SDK provider that logs in (here the SDK's own, made by the caller;
    the conformance suite runs the SDK's client-credentials providers this way); refreshes stay ours."""
    built: list[OAuthClientProvider] = []

    def make(storage: object) -> OAuthClientProvider:
        made = OAuthClientProvider(
            mcp_server.url,
            client_metadata(),
            storage=storage,  # type: ignore[arg-type]
            redirect_handler=browser.redirect,
            callback_handler=browser.callback,
        )
        built.append(made)
        return made

    async with (
        SDKLogin(mcp_server.url, sdk_provider=make) as login,
        connect(mcp_server.url, login, SESSION, mode="legacy") as client,
    ):
        await client.call_tool("echo", {"text": "1"})
        await login.manager.astore(SESSION, expired_entry(await login.manager.aget_token(SESSION)))
        await client.call_tool("echo", {"text": "2"})
    assert len(built) == 1 and browser.visits == 1 and provider.stats["refresh_ok"] == 1
    with pytest.raises(TypeError, match="client_metadata"):
        SDKLogin(mcp_server.url)


_code: contextvars.ContextVar[Any] = contextvars.ContextVar("code")


class ConcurrentBrowser(HeadlessBrowser):
    """The headless browser for logins running at once: each login's code stays in its own task's context; with
    ``barrier``, every login waits at the browser until that many have reached it."""

    def __init__(self, barrier: int = 0) -> None:
        super().__init__()
        self.barrier = barrier
        self.arrived = anyio.Event()

    async def redirect(self, url: str) -> None:
        """Follow the authorization URL; keep the code for this task."""
        await super().redirect(url)
        _code.set(self._result)
        if self.visits >= self.barrier:
            self.arrived.set()
        await self.arrived.wait()

    async def callback(self) -> Any:
        """This task's code."""
        return _code.get()


async def call_as(login: SDKLogin, session: str, text: str) -> None:
    """Connect as ``session`` and call echo."""
    async with connect(login.server_url, login, session, mode="legacy") as client:
        await client.call_tool("echo", {"text": text})


async def expire_and_call(login: SDKLogin, sessions: list[str]) -> None:
    """Every session's access token expires; each calls again."""
    for session in sessions:
        await login.manager.astore(session, expired_entry(await login.manager.aget_token(session)))
        await call_as(login, session, "again")


USERS = ["alice", "bob", "carol", "dave"]


async def test_concurrent_first_logins_register_one_client(provider: LocalProvider, mcp_server: LocalMCPServer) -> None:
    """Four users logging in for the first time at once: one dynamic registration, which every login uses, so
    every later refresh works (with a client each, all but the stored one's refreshes were refused)."""
    browser = ConcurrentBrowser()
    async with SDKLogin(
        mcp_server.url,
        client_metadata=client_metadata(),
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
    ) as login:
        async with anyio.create_task_group() as group:
            for user in USERS:
                group.start_soon(call_as, login, user, user)
        await expire_and_call(login, USERS)
    assert provider.flow_stats["registrations"] == 1 and provider.flow_stats["code_exchanges"] == 4
    assert provider.stats["refresh_ok"] == 4 and provider.stats["invalid_grant"] == 0


async def test_two_connections_of_one_session_log_in_once(provider: LocalProvider, mcp_server: LocalMCPServer) -> None:
    """One session opened twice at once (two connections, one SDKLogin): one login, the other connection waits
    for it and uses its tokens."""
    browser = ConcurrentBrowser()
    async with (
        SDKLogin(
            mcp_server.url,
            client_metadata=client_metadata(),
            redirect_handler=browser.redirect,
            callback_handler=browser.callback,
        ) as login,
        anyio.create_task_group() as group,
    ):
        for text in ("first connection", "second connection"):
            group.start_soon(call_as, login, SESSION, text)
    assert browser.visits == 1 and provider.flow_stats["registrations"] == 1


async def test_first_logins_in_two_processes_end_with_one_client(
    provider: LocalProvider, mcp_server: LocalMCPServer
) -> None:
    """Two processes (two SDKLogin over one storage) whose first logins both register a client at once: the
    second to store keeps the first's and logs in with it, so both users' tokens belong to the stored client
    and both refresh."""
    from httpx_upstream_auth import MemoryStorage

    provider.access_ttl = 600  # the refreshes counted below are the forced ones: none may come of a slow machine

    storage = MemoryStorage()
    browser = ConcurrentBrowser(barrier=2)  # both logins registered before either goes on
    logins = [
        SDKLogin(
            mcp_server.url,
            client_metadata=client_metadata(),
            redirect_handler=browser.redirect,
            callback_handler=browser.callback,
            storage=storage,
        )
        for _ in range(2)
    ]
    try:
        async with anyio.create_task_group() as group:
            for login, user in zip(logins, ("alice", "bob"), strict=True):
                group.start_soon(call_as, login, user, user)
        stored = await logins[0].refresher.aregistration()
        for login, user in zip(logins, ("alice", "bob"), strict=True):
            entry = await login.manager.aget_token(user)
            assert provider.introspect(entry.access_token)["client_id"] == stored.client_id  # type: ignore[index]
            await expire_and_call(login, [user])
    finally:
        for login in logins:
            await login.aclose()
    assert provider.flow_stats["registrations"] == 2  # both registered: the race is real
    assert provider.stats["refresh_ok"] == 2 and provider.stats["invalid_grant"] == 0


async def test_the_adapter_hands_the_sdk_the_stored_token_when_a_refresh_cannot_happen_now(
    provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """TokenStorageAdapter.get_tokens(): None when there is no entry (the SDK then logs the user in); when the
    refresh cannot happen now (the token endpoint is unreachable), the stored entry as it is, not None: the
    SDK decides, and no login is forced on a user whose grant is fine."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        refused = f"http://127.0.0.1:{unused.getsockname()[1]}/token"
        manager = make_manager(refresher=OAuth2Refresher(refused, "test-client", "test-secret"))
        adapter = TokenStorageAdapter(manager, SESSION, "https://mcp.example/mcp")
        assert await adapter.get_tokens() is None
        entry = await aput_entry(manager, expired(provider.login()), session=SESSION)
        handed = await adapter.get_tokens()
    assert handed is not None and handed.access_token == entry.access_token
    assert handed.refresh_token == entry.refresh_token
