"""Edge cases of the MCP transports and helpers over real loopback servers: what the SDK 1.x's transport answers,
requests that are no JSON-RPC request, a store that fails while a dead grant is remembered, and the user's own
errors inside ``connect``."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import attrs
import httpx
import pytest

pytest.importorskip("mcp.server.mcpserver", reason="the MCP SDK 2.x is not installed")

import httpx2
import mcp_fixtures
from support import FlakyStorage, expired

from httpx_upstream_auth import (
    DPoP,
    DPoPKey,
    EntryKey,
    MemoryStorage,
    OAuth2Refresher,
    ReauthenticationRequired,
    RefreshFailed,
    StorageError,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth.mcp import (
    AsyncMCPAuthTransport,
    ClientNotRegistered,
    ClientRegistration,
    DiscoveringRefresher,
    DiscoveryFailed,
    IssuerMismatch,
    LegacyAsyncMCPAuthTransport,
    MetadataStore,
    ServerMetadata,
    ServerUnreachable,
    adiscover,
    discover,
    protected_resource_metadata_urls,
)
from httpx_upstream_auth.mcp._discovery import MAX_METADATA_BYTES, check_may_contact
from httpx_upstream_auth.mcp._refresher import REGISTRATION_NAMESPACE
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider, ServerThread, serve_mcp

manager = mcp_fixtures.manager
mcp_server = mcp_fixtures.mcp_server
provider_server = mcp_fixtures.provider_server

pytestmark = pytest.mark.anyio

SESSION = "edge-session"
CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}
NOTICE = {"jsonrpc": "2.0", "method": "notifications/initialized"}


@pytest.fixture
def provider() -> LocalProvider:
    """A provider at the root, 60-second tokens."""
    return LocalProvider(access_ttl=60)


async def test_the_sdk1_transport_hands_a_servers_jsonrpc_error_over_at_200(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """The SDK 1.x raises on any 4xx to a POST, ending the session: its transport hands a JSON-RPC error the server
    sent at 400 over at 200, answering the request's own id, the server's error unchanged."""
    await manager.astore(SESSION, provider.login())
    error = {"code": -32602, "message": "bad arguments"}
    mcp_server.answer_next_call = (
        400,
        {"content-type": "application/json"},
        json.dumps({"jsonrpc": "2.0", "id": 99, "error": error}).encode(),
    )
    async with httpx.AsyncClient(transport=LegacyAsyncMCPAuthTransport(manager, SESSION)) as client:
        answer = await client.post(mcp_server.url, json=CALL, headers={"accept": "application/json, text/event-stream"})
    assert answer.status_code == 200 and answer.json() == {"jsonrpc": "2.0", "id": 7, "error": error}
    assert mcp_server.answer_next_call is None and provider.stats["token_calls"] == 0


async def test_the_sdk1_transport_drops_a_notification_it_cannot_send(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A notification the 1.x transport cannot send (no tokens: a login is needed) is answered 202, as the SDK 1.x
    takes it without ending the session, naming our error in a header and logging a warning; nothing is sent."""
    transport = LegacyAsyncMCPAuthTransport(manager, SESSION)
    with caplog.at_level(logging.WARNING, logger="httpx_upstream_auth.mcp"):
        async with httpx.AsyncClient(transport=transport) as client:
            answer = await client.post(mcp_server.url, json=NOTICE)
    assert answer.status_code == 202 and answer.content == b""
    assert answer.headers["x-upstream-auth-error"] == "ReauthenticationRequired"
    assert isinstance(transport.last_error, ReauthenticationRequired)
    assert "an MCP notification was not sent: ReauthenticationRequired" in caplog.text
    assert sum(mcp_server.requests.values()) == 0


async def test_a_post_that_is_no_jsonrpc_request_gets_a_bare_status(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """A POST whose body is not JSON is no JSON-RPC request: when the auth fails it is answered with a bare status
    (401: a login is needed) and our error's name, no JSON-RPC body; once tokens are stored it goes to the server,
    whose answer comes back as it is."""
    transport = AsyncMCPAuthTransport(manager, SESSION)
    async with httpx2.AsyncClient(transport=transport) as client:
        refused = await client.post(mcp_server.url, content=b"not json")
        await manager.astore(SESSION, provider.login())
        sent = await client.post(mcp_server.url, content=b"not json")
    assert refused.status_code == 401 and refused.content == b""
    assert refused.headers["x-upstream-auth-error"] == "ReauthenticationRequired"
    assert sent.status_code >= 400 and "x-upstream-auth-error" not in sent.headers
    assert mcp_server.requests["POST"] == 1 and transport.last_error is None


class SwitchableStorage(MemoryStorage):
    """A MemoryStorage whose reads fail while ``down`` is set, as a store that went away would."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def get(self, key: EntryKey) -> UpstreamTokens | None:
        if self.down:
            raise StorageError("the store is down")
        return super().get(key)


class DeadGrantAuth(httpx2.Auth):
    """An auth whose every flow says the grant is dead (as SDKLoginAuth's does when the login cannot start)."""

    def __init__(self) -> None:
        self.flows = 0

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        self.flows += 1
        raise ReauthenticationRequired("log the user in again")
        yield request  # pragma: no cover - a generator that fails at its first step


@pytest.mark.parametrize("down_at", ["none", "first", "second"])
async def test_a_dead_grant_is_answered_from_memory_only_while_the_store_can_say_it_is_unchanged(
    down_at: str, provider_server: Any
) -> None:
    """After a dead grant, the next request is answered again without asking the auth, while the store says the
    entry is the one the failure was about. When the store cannot say (it fails when the failure is recorded, or
    when the next request checks), the next request asks the auth again rather than answer from memory."""
    storage = SwitchableStorage()
    refresher = OAuth2Refresher(provider_server.url + "/token", "test-client", "test-secret")
    made = TokenManager(refresher=refresher, provider_id="local", storage=storage)
    auth = DeadGrantAuth()
    transport = AsyncMCPAuthTransport(made, SESSION, auth=auth)
    try:
        async with httpx2.AsyncClient(transport=transport) as client:
            storage.down = down_at == "first"
            first = await client.post("http://127.0.0.1:9/mcp", json=CALL)
            storage.down = down_at == "second"
            second = await client.post("http://127.0.0.1:9/mcp", json=CALL)
    finally:
        await made.aclose()
    for answer in (first, second):
        assert answer.status_code == 401 and answer.json()["error"]["data"]["httpx_upstream_auth"]["error"] == (
            "ReauthenticationRequired"
        )
    assert auth.flows == (1 if down_at == "none" else 2)


@pytest.mark.parametrize("lib", ["httpx", "httpx2"])
async def test_a_dpop_nonce_challenge_is_answered_through_the_mcp_transports(
    lib: str, provider: LocalProvider, provider_server: Any
) -> None:
    """A DPoP-bound session through either MCP transport (whose inner transport answers without naming the
    request): the resource server's nonce challenge costs one replay, with the nonce it gave."""
    key = DPoPKey.generate()
    refresher = OAuth2Refresher(provider_server.url + "/token", "test-client", "test-secret", dpop=DPoP())
    made = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage())
    await made.astore(SESSION, attrs.evolve(provider.login(dpop_jkt=key.thumbprint), dpop_key=key.to_jwk()))
    provider.api_nonce = "api-n1"
    url = provider_server.url + "/api/upload"
    try:
        if lib == "httpx":
            async with httpx.AsyncClient(transport=LegacyAsyncMCPAuthTransport(made, SESSION)) as legacy:
                answer: Any = await legacy.post(url, json=NOTICE)
        else:
            async with httpx2.AsyncClient(transport=AsyncMCPAuthTransport(made, SESSION)) as current:
                answer = await current.post(url, json=NOTICE)
    finally:
        await made.aclose()
    assert answer.status_code == 200 and provider.api_calls["/api/upload"] == 2
    stats = provider.stats
    assert (stats["dpop_nonce_challenges"], stats["api_ok"], stats["dpop_proofs_invalid"]) == (1, 1, 0)


# -- DiscoveringRefresher --------------------------------------------------------------------------------------


async def test_task_refreshes_discover_once_and_another_process_reads_the_stored_metadata(
    provider: LocalProvider, provider_server: Any, mcp_server: LocalMCPServer
) -> None:
    """redeem_in='task' (the async path): the first refresh discovers and stores the metadata, the next one uses it
    from memory, and another refresher over the same storage (another process) reads it instead of discovering;
    every refresh succeeds at the discovered endpoint and records the issuer."""
    storage = MemoryStorage()
    refreshers = [DiscoveringRefresher(mcp_server.url, "test-client", "test-secret", storage=storage) for _ in "ab"]
    managers = [
        TokenManager(refresher=refresher, provider_id="local", storage=storage, redeem_in="task")
        for refresher in refreshers
    ]
    try:
        fresh = []
        for made, session in ((managers[0], "a"), (managers[0], "b"), (managers[1], "c")):
            await made.astore(session, expired(provider.login()))
            fresh.append(await made.aget_token(session))
    finally:
        for made in managers:
            await made.aclose()
    assert [refresher.discoveries for refresher in refreshers] == [1, 0]
    assert {tokens.issuer for tokens in fresh} == {provider_server.url}
    assert provider.stats["refresh_ok"] == 3 and mcp_server.requests["GET"] == 1  # one metadata fetch in all


async def test_discovering_refresher_edges_without_the_network() -> None:
    """Without storage, adopted metadata lives in memory (and is forgotten on demand); remembered metadata of
    another issuer than the one asked for is an IssuerMismatch; an unusable client is a DiscoveryFailed at
    prepare; no registration is ClientNotRegistered; an unreadable stored record is a typed, non-retryable
    DiscoveryFailed naming only its type, and binds no issuer."""
    server_url = "https://mcp.example/mcp"
    refresher = DiscoveringRefresher(server_url, "client", "secret")
    assert repr(refresher) == f"DiscoveringRefresher(server_url={server_url!r})" and refresher.token_url is None
    found = ServerMetadata(
        server_url=server_url, resource=server_url, issuer="https://as.example", token_endpoint="https://as.example/t"
    )
    await refresher.asave_metadata(found)
    await refresher.asave_registration(ClientRegistration("other", None, "none"))  # no storage: kept nowhere
    assert refresher.metadata is found and refresher.token_url == "https://as.example/t"
    assert await refresher.ametadata() is found
    with pytest.raises(IssuerMismatch) as mismatch:
        await refresher.ametadata(issuer="https://elsewhere.example")
    assert (mismatch.value.expected, mismatch.value.found) == ("https://elsewhere.example", "https://as.example")
    await refresher.aforget_metadata()
    assert refresher.metadata is None

    pinned = DiscoveringRefresher(server_url, "client", "secret", token_url="https://as.example/t", auth_method="nope")
    assert pinned.token_url == "https://as.example/t"
    with pytest.raises(DiscoveryFailed, match=r"cannot refresh at https://as\.example/t") as unusable:
        await pinned.aprepare(UpstreamTokens(access_token="a", refresh_token="r"))
    assert not unusable.value.retryable

    storage = MemoryStorage()
    unregistered = DiscoveringRefresher(server_url, storage=storage, token_url="https://as.example/t")
    with pytest.raises(ClientNotRegistered):
        await unregistered.aprepare(UpstreamTokens(access_token="a", refresh_token="r"))
    await MetadataStore(storage, REGISTRATION_NAMESPACE).aput(server_url, "{not json")
    assert await unregistered.atrusted_issuer() is None
    with pytest.raises(DiscoveryFailed) as unreadable:
        await unregistered.aprepare(UpstreamTokens(access_token="a", refresh_token="r"))
    assert str(unreadable.value) == "could not prepare the refresh (JSONDecodeError); no token request was sent"
    assert not unreadable.value.retryable


async def test_the_refresh_follows_metadata_adopted_later(
    provider: LocalProvider, provider_server: Any, dead_url: str
) -> None:
    """Metadata adopted after a refresh (the SDK's login found a new token endpoint) replaces the refresher's
    client: the next refresh goes to the new endpoint (the old one, here gone, is not asked again)."""
    server_url = provider_server.url + "/mcp"
    refresher = DiscoveringRefresher(server_url, "test-client", "test-secret")
    gone = ServerMetadata(
        server_url=server_url, resource=None, issuer=provider_server.url, token_endpoint=dead_url + "/token"
    )
    made = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage(), failure_window=0)
    try:
        await refresher.asave_metadata(gone)
        await made.astore("s", expired(provider.login()))
        with pytest.raises(RefreshFailed) as caught:
            await made.aget_token("s")
        assert caught.value.retryable and provider.stats["token_calls"] == 0
        await refresher.asave_metadata(attrs.evolve(gone, token_endpoint=provider_server.url + "/token"))
        assert (await made.aget_token("s")).issuer == provider_server.url
    finally:
        await made.aclose()
    assert provider.stats["refresh_ok"] == 1


@pytest.mark.parametrize("redeem_in", ["thread", "task"])
async def test_a_keep_alive_the_store_refuses_is_tried_again_at_the_next_refresh(
    redeem_in: str, provider: LocalProvider, mcp_server: LocalMCPServer
) -> None:
    """The stored registration and metadata are rewritten after a refresh (so the store's retention does not drop
    them); when the store refuses that write, the refresh still succeeds and the next refresh tries it again."""
    records = FlakyStorage()
    registration = ClientRegistration("test-client", "test-secret", "client_secret_basic")
    await MetadataStore(records, REGISTRATION_NAMESPACE).aput(mcp_server.url, registration.to_json())
    discovered = DiscoveringRefresher(mcp_server.url, storage=records)
    await discovered.ametadata()  # stored: the refreshes below read it
    records.fail_put, records.puts = True, 0
    refresher = DiscoveringRefresher(mcp_server.url, storage=records)
    made = TokenManager(refresher=refresher, provider_id="local", storage=MemoryStorage(), redeem_in=redeem_in)  # type: ignore[arg-type]
    try:
        for session in ("a", "b"):
            await made.astore(session, expired(provider.login()))
            assert (await made.aget_token(session)).issuer is not None
    finally:
        await made.aclose()
    assert records.puts == 2 and refresher.discoveries == 0 and provider.stats["refresh_ok"] == 2


# -- discovery ------------------------------------------------------------------------------------------------


class Documents:
    """A metadata server: ``documents`` maps a path to ``(status, body)``; anything else is a 404. ``chunked``
    paths are sent in two parts without a Content-Length."""

    def __init__(self) -> None:
        self.documents: dict[str, tuple[int, bytes]] = {}
        self.chunked: set[str] = set()
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.paths.append(scope["path"])
        status, body = self.documents.get(scope["path"], (404, b"{}"))
        headers = [(b"content-type", b"application/json")]
        if scope["path"] in self.chunked:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body[:10], "more_body": True})
            await send({"type": "http.response.body", "body": body[10:]})
            return
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def documents() -> Iterator[tuple[Documents, str]]:
    """A :class:`Documents` server on 127.0.0.1, and its URL."""
    app = Documents()
    with ServerThread(app) as running:
        yield app, running.url


def serve_resource(app: Documents, origin: str, **fields: Any) -> None:
    """Protected-resource metadata for ``{origin}/mcp`` naming ``origin`` as its authorization server."""
    document = {"resource": origin + "/mcp", "authorization_servers": [origin], **fields}
    app.documents["/.well-known/oauth-protected-resource/mcp"] = (200, json.dumps(document).encode())


@pytest.mark.parametrize("blocking", [False, True], ids=["adiscover", "discover"])
async def test_discovery_refuses_what_does_not_check_out(
    blocking: bool, documents: tuple[Documents, str], dead_url: str
) -> None:
    """Discovery fails, typed and not retryable, when the authorization server publishes no metadata at any of its
    well-known URLs, when its metadata has no token_endpoint, when the resource names itself with a fragment, and
    when the named issuer has a query; it fails retryable when nothing answers."""
    app, origin = documents

    async def run(url: str) -> DiscoveryFailed:
        with pytest.raises(DiscoveryFailed) as caught:
            if blocking:
                await anyio.to_thread.run_sync(lambda: discover(url))
            else:
                await adiscover(url)
        return caught.value

    serve_resource(app, origin)
    missing = await run(origin + "/mcp")
    assert "no authorization-server metadata at" in str(missing) and not missing.retryable
    assert app.paths[-2:] == ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"]
    app.documents["/.well-known/oauth-authorization-server"] = (200, json.dumps({"issuer": origin}).encode())
    assert "has no token_endpoint" in str(await run(origin + "/mcp"))
    serve_resource(app, origin, resource=origin + "/mcp#fragment")
    assert "is for another resource" in str(await run(origin + "/mcp"))
    serve_resource(app, origin, authorization_servers=[origin + "/?tenant=1"])
    assert "query or fragment" in str(await run(origin + "/mcp"))
    unreachable = await run(dead_url + "/mcp")
    assert unreachable.retryable and "could not fetch metadata" in str(unreachable)


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "streamed"])
def test_blocking_discovery_caps_the_metadata_size(chunked: bool, documents: tuple[Documents, str]) -> None:
    """The blocking twin refuses metadata past the cap, whether its length is declared or only found reading."""
    app, origin = documents
    path = "/.well-known/oauth-protected-resource/mcp"
    app.documents[path] = (200, b'{"resource": "' + b"x" * (MAX_METADATA_BYTES + 10) + b'"}')
    if chunked:
        app.chunked.add(path)
    with pytest.raises(DiscoveryFailed, match="larger than") as caught:
        discover(origin + "/mcp")
    assert not caught.value.retryable


def test_discovery_urls_of_odd_server_urls() -> None:
    """A server at its origin's root has one well-known URL; a challenge's resource_metadata that is no usable URL
    is ignored; a server URL with an invalid port, and a URL that does not parse, are refused before any request."""
    assert protected_resource_metadata_urls("https://mcp.example") == [
        "https://mcp.example/.well-known/oauth-protected-resource"
    ]
    assert protected_resource_metadata_urls("https://mcp.example/mcp", 'Bearer resource_metadata="ftp://x/y"') == [
        "https://mcp.example/.well-known/oauth-protected-resource/mcp",
        "https://mcp.example/.well-known/oauth-protected-resource",
    ]
    with pytest.raises(DiscoveryFailed, match="is not an http"):
        protected_resource_metadata_urls("https://mcp.example:99999/mcp")
    with pytest.raises(DiscoveryFailed, match="is not https"):
        check_may_contact("http://[::1/x", "http://127.0.0.1/mcp")


class RacingStorage(MemoryStorage):
    """A MemoryStorage where another writer saves the same entry just before each of the next ``races`` writes."""

    def __init__(self) -> None:
        super().__init__()
        self.races = 0

    def put(self, key: EntryKey, tokens: UpstreamTokens, *, expected_version: int | None) -> bool:
        if self.races:
            self.races -= 1
            current = super().get(key)
            theirs = attrs.evolve(tokens, access_token="theirs", version=1 if current is None else current.version + 1)
            assert super().put(key, theirs, expected_version=None if current is None else current.version)
        return super().put(key, tokens, expected_version=expected_version)


async def test_metadata_records_are_saved_over_a_concurrent_writer_or_fail_typed() -> None:
    """A record write that loses to another writer reads again and saves over it; one that loses five times in a
    row is a StorageError saying to retry, not a silent loss; touching or deleting what is not there is harmless."""
    storage = RacingStorage()
    store = MetadataStore(storage, "ns")
    storage.races = 1
    await store.aput("a", "mine")
    storage.races = 1
    store.put("b", "mine")
    storage.races = 1
    assert await store.aput_unless("c", "mine", lambda kept: False) is None
    assert [await store.aget(name) for name in "abc"] == ["mine"] * 3
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: store.aput("d", "mine"),
        lambda: store.aput_unless("d", "mine", lambda kept: False),
        lambda: anyio.to_thread.run_sync(store.put, "d", "mine"),
    ]
    for write in writes:
        storage.races = 5
        with pytest.raises(StorageError, match="kept changing"):
            await write()
    assert store.get("d") == "theirs"
    store.delete("d")
    assert store.get("d") is None and not store.touch("d") and not await store.atouch("d")


# -- the testing MCP server ------------------------------------------------------------------------------------


async def test_the_local_mcp_server_cans_only_a_tool_call_and_counts_only_open_streams(
    provider: LocalProvider, manager: TokenManager, mcp_server: LocalMCPServer
) -> None:
    """answer_next_call waits for a tools/call (other requests reach the server, their bodies intact); a GET the
    server refuses (no token) is no open stream; reject_tokens reads back what was set."""
    from httpx_upstream_auth.mcp import connect

    await manager.astore(SESSION, provider.login())
    mcp_server.answer_next_call = (503, {"content-type": "text/plain"}, b"overloaded")
    async with connect(mcp_server.url, manager, SESSION, mode="legacy") as client:
        assert [tool.name for tool in (await client.list_tools()).tools] == ["echo", "sleep", "whoami"]
        assert mcp_server.answer_next_call is not None
        with pytest.raises(ServerUnreachable):
            await client.call_tool("echo", {"text": "x"})
        assert mcp_server.answer_next_call is None
    async with httpx.AsyncClient() as plain:
        refused = await plain.get(mcp_server.url, headers={"accept": "text/event-stream"})
    assert refused.status_code == 401 and mcp_server.open_streams == 0
    assert not mcp_server.reject_tokens
    mcp_server.reject_tokens = True
    assert mcp_server.reject_tokens and mcp_server.verifier.reject_all


def test_serve_mcp_that_cannot_build_its_server_releases_its_port(provider: LocalProvider) -> None:
    """serve_mcp with an issuer URL the SDK refuses raises, and stops the server thread it had bound."""
    before = threading.active_count()
    with pytest.raises(ValueError):
        serve_mcp(provider, "not a url")
    assert threading.active_count() == before


# -- SDK-login mode ------------------------------------------------------------------------------------------------


async def test_the_adapter_saves_client_registrations_by_issuer() -> None:
    """TokenStorageAdapter.save_client_info: without keep_same_issuer, or for a client that records no issuer, the
    client is saved over whatever is stored; with it, another client of the same issuer is kept (and returned),
    and a stored record that does not read is replaced."""
    from mcp.shared.auth import OAuthClientInformationFull

    from httpx_upstream_auth.mcp import TokenStorageAdapter

    def client(client_id: str, issuer: str | None) -> OAuthClientInformationFull:
        return OAuthClientInformationFull(
            client_id=client_id,
            redirect_uris=["http://127.0.0.1:9/callback"],  # type: ignore[list-item]
            issuer=issuer,
        )

    storage = MemoryStorage()
    made = TokenManager(
        refresher=OAuth2Refresher("https://as.example/token", "c", "s"), provider_id="p", storage=storage
    )
    server_url = "https://mcp.example/mcp"
    adapter = TokenStorageAdapter(made, "s", server_url)
    try:
        assert await adapter.save_client_info(client("one", "https://as.example")) is None
        assert await adapter.save_client_info(client("two", "https://as.example")) is None
        assert await adapter.save_client_info(client("three", None), keep_same_issuer=True) is None
        assert (await adapter.get_client_info()).client_id == "three"  # type: ignore[union-attr]
        await adapter.save_client_info(client("four", "https://as.example"))
        kept = await adapter.save_client_info(client("five", "https://as.example"), keep_same_issuer=True)
        assert kept is not None and kept.client_id == "four"
        await MetadataStore(storage, REGISTRATION_NAMESPACE).aput(server_url, "{not json")
        assert await adapter.save_client_info(client("six", "https://as.example"), keep_same_issuer=True) is None
        assert (await adapter.get_client_info()).client_id == "six"  # type: ignore[union-attr]
    finally:
        await made.aclose()
