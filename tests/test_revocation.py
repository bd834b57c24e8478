"""Logout that revokes (RFC 7009), over real HTTP against the local provider's revocation endpoint: the grant
ends at the provider, and a provider that fails, refuses or hangs never fails or holds up the logout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support import AUTH_METHODS, CLIENT_SECRETS, SESSION, SSL, ManagerFactory, expired, put_entry, stored

from httpx_upstream_auth import (
    Clock,
    EncryptedStorage,
    EncryptionKey,
    EntryKey,
    Logout,
    MemoryStorage,
    OAuth2Refresher,
    ReauthenticationRequired,
    Refresher,
    TokenManager,
    UpstreamTokens,
)
from httpx_upstream_auth.mcp import DiscoveringRefresher, discover
from httpx_upstream_auth.testing import LocalMCPServer, LocalProvider, ServerThread, serve_mcp


def refresher(server: ServerThread, client_id: str = "test-client", **options: Any) -> OAuth2Refresher:
    """A refresher for ``client_id`` that knows the provider's revocation endpoint."""
    options.setdefault("revocation_url", server.url + "/revoke")
    return OAuth2Refresher(
        server.url + "/token",
        client_id,
        CLIENT_SECRETS[client_id],
        auth_method=AUTH_METHODS[client_id],  # type: ignore[arg-type]
        **options,
    )


def refresh_fails(server: ServerThread, tokens: UpstreamTokens) -> bool:
    """Whether a refresh with ``tokens`` (in a manager of its own) is refused as a dead grant."""
    other = TokenManager(refresher=refresher(server, tokens.client_id or ""), provider_id="local")
    other.store("probe", expired(tokens))
    try:
        other.get_token("probe")
    except ReauthenticationRequired:
        return True
    finally:
        other.close()
    return False


@pytest.mark.parametrize("client_id", ["test-client", "post-client", "public-client"])
def test_logout_revokes_the_grant_with_the_clients_own_authentication(
    client_id: str, provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """delete(revoke=True) removes the entry, then the provider revokes the grant (its refresh token can no longer
    refresh, its access token is refused), the client authenticating as for a refresh (basic, post, none)."""
    manager = make_manager(refresher=refresher(server, client_id))
    tokens = provider.login(client_id=client_id)
    manager.store(SESSION, tokens)
    assert manager.delete(SESSION, revoke=True) == Logout(deleted=True, revoked=True, reason="revoked")
    assert stored(manager) is None
    assert provider.is_revoked(provider.grant_of(tokens.access_token))
    assert provider.revocation_stats["revocation_calls"] == 1 and provider.revocation_stats["revoked_grants"] == 1
    assert provider.introspect(tokens.access_token) is None
    assert refresh_fails(server, tokens)
    assert provider.stats["invalid_grant"] == 1 and provider.stats["invalid_client"] == 0


@pytest.mark.anyio
async def test_async_logout_revokes_the_refresh_token_it_removed(
    provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """adelete(revoke=True) revokes the refresh token of the entry it removed: after a refresh, the rotated one
    (its grant ends); a second logout finds no entry and revokes nothing."""
    manager = make_manager(refresher=refresher(server))
    login = provider.login()
    manager.store(SESSION, expired(login))
    refreshed = await manager.aget_token(SESSION)
    assert refreshed.refresh_token != login.refresh_token
    result = await manager.adelete(SESSION, revoke=True)
    assert result == Logout(deleted=True, revoked=True, reason="revoked")
    assert provider.is_revoked(provider.grant_of(refreshed.access_token))
    assert await manager.adelete(SESSION, revoke=True) == Logout(deleted=False, revoked=False, reason="no_entry")
    assert await manager.adelete(SESSION) is False
    assert provider.revocation_stats["revocation_calls"] == 1


def test_logout_completes_when_the_revocation_endpoint_is_down_refuses_or_hangs(
    provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory, dead_url: str
) -> None:
    """Nothing listening, a 503, a wrong client secret, and an endpoint that does not answer within
    revoke_timeout: each logout removes the entry and says why the grant was not revoked (which it was not)."""
    down = make_manager(refresher=refresher(server, revocation_url=dead_url + "/revoke"))
    tokens = provider.login()
    down.store(SESSION, tokens)
    assert down.delete(SESSION, revoke=True) == Logout(
        deleted=True, revoked=False, reason="failed", error="RefreshFailed"
    )
    assert stored(down) is None

    manager = make_manager(refresher=refresher(server, timeout=2.0))
    provider.fail_next_revocation("503")
    manager.store(SESSION, tokens)
    assert manager.delete(SESSION, revoke=True) == Logout(
        deleted=True, revoked=False, reason="refused", status_code=503, error="RefreshFailed"
    )

    wrong = make_manager(
        refresher=OAuth2Refresher(
            server.url + "/token", "test-client", "wrong-secret", revocation_url=server.url + "/revoke"
        )
    )
    wrong.store(SESSION, tokens)
    assert wrong.delete(SESSION, revoke=True).status_code == 401

    provider.fail_next_revocation("hang:30")
    manager.store(SESSION, tokens)
    result = manager.delete(SESSION, revoke=True, revoke_timeout=0.3)
    assert result == Logout(deleted=True, revoked=False, reason="timed_out")
    assert stored(manager) is None
    assert not provider.is_revoked(provider.grant_of(tokens.access_token))
    assert not refresh_fails(server, tokens), "the grant is alive: it was not revoked"


class Unrevoking(Refresher):
    """A custom refresher: no revocation of its own, or one that fails in its own way."""

    def __init__(self, failing: bool = False) -> None:
        self.failing = failing

    def refresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        raise NotImplementedError

    async def arefresh(self, tokens: UpstreamTokens, clock: Clock) -> UpstreamTokens:
        raise NotImplementedError

    def revoke(self, tokens: UpstreamTokens, clock: Clock) -> bool:
        if self.failing:
            raise OSError("broken")
        return super().revoke(tokens, clock)

    async def arevoke(self, tokens: UpstreamTokens, clock: Clock) -> bool:
        if self.failing:
            raise OSError("broken")
        return await super().arevoke(tokens, clock)


@pytest.mark.anyio
async def test_what_a_logout_says_when_nothing_can_be_revoked(provider: LocalProvider) -> None:
    """No revocation endpoint, no refresh token, an entry the encrypted store refuses, and a custom refresher that
    fails: the entry is removed each time, and the result says why nothing was revoked."""
    plain = UpstreamTokens(access_token="at", provider_id="local")
    for failing, reason, error in ((False, "not_configured", None), (True, "failed", "OSError")):
        manager = TokenManager(refresher=Unrevoking(failing), provider_id="local")
        await manager.astore(SESSION, provider.login())
        expected = Logout(deleted=True, revoked=False, reason=reason, error=error)  # type: ignore[arg-type]
        assert await manager.adelete(SESSION, revoke=True) == expected
        await manager.astore(SESSION, plain)
        assert await manager.adelete(SESSION, revoke=True) == Logout(
            deleted=True, revoked=False, reason="no_refresh_token"
        )
        await manager.aclose()

    inner = MemoryStorage()
    EncryptedStorage(inner, [EncryptionKey.generate("gone")]).put(
        EntryKey("local", SESSION), provider.login(), expected_version=None
    )
    manager = TokenManager(
        refresher=Unrevoking(), provider_id="local", storage=EncryptedStorage(inner, [EncryptionKey.generate()])
    )
    login = provider.login()
    assert (await manager.astore(SESSION, login)).access_token == login.access_token  # a login replaces it
    assert (await manager.aget_token(SESSION)).access_token == login.access_token
    assert inner.delete(EntryKey("local", SESSION))
    EncryptedStorage(inner, [EncryptionKey.generate("gone")]).put(
        EntryKey("local", SESSION), provider.login(), expected_version=None
    )
    assert await manager.adelete(SESSION, revoke=True) == Logout(deleted=True, revoked=False, reason="entry_refused")
    assert inner.get(EntryKey("local", SESSION)) is None
    await manager.aclose()


class Churning(MemoryStorage):
    """A store where a refresh lands between every read and conditional delete of the logout."""

    def delete(self, key: EntryKey, *, expected_version: int | None = None) -> bool:
        if expected_version is not None:
            return False
        return super().delete(key)


def test_a_logout_racing_refreshes_still_removes_the_entry(provider: LocalProvider, server: ServerThread) -> None:
    """When the entry changes under every conditional delete, the logout removes whatever is there and says it
    knows no refresh token to revoke."""
    manager = TokenManager(refresher=refresher(server), provider_id="local", storage=Churning())
    manager.store(SESSION, provider.login())
    assert manager.delete(SESSION, revoke=True) == Logout(deleted=True, revoked=False, reason="no_entry")
    assert stored(manager) is None
    manager.close()


@pytest.fixture
def revoke_url(server: ServerThread) -> Iterator[str]:
    """The provider's revocation endpoint."""
    yield server.url + "/revoke"


def test_the_revocation_endpoint_follows_rfc_7009(provider: LocalProvider, revoke_url: str) -> None:
    """Unknown tokens get 200; an access token is revoked alone, a refresh token ends its grant; another client's
    token is refused; it wants a POST, a token and a client; a bad fault kind is refused."""
    basic = ("test-client", "test-secret")
    tokens = provider.login()
    with httpx.Client(verify=SSL) as client:
        assert client.post(revoke_url, data={"token": "never-issued"}, auth=basic).status_code == 200
        assert client.post(revoke_url, data={"token": tokens.access_token}, auth=basic).status_code == 200
        assert provider.introspect(tokens.access_token) is None
        assert not provider.is_revoked(provider.grant_of(tokens.access_token))
        theirs = provider.login(client_id="post-client")
        refused = client.post(revoke_url, data={"token": theirs.refresh_token or ""}, auth=basic)
        assert (refused.status_code, refused.json()) == (400, {"error": "unauthorized_client"})
        for _ in range(2):  # a refresh token ends its grant, once
            assert client.post(revoke_url, data={"token": tokens.refresh_token or ""}, auth=basic).status_code == 200
        assert provider.is_revoked(provider.grant_of(tokens.access_token))
        assert client.post(revoke_url, data={}, auth=basic).status_code == 400
        assert client.post(revoke_url, data={"token": "x"}, auth=("test-client", "nope")).status_code == 401
        assert client.get(revoke_url).status_code == 405
        metadata = client.get(revoke_url.replace("/revoke", "/.well-known/oauth-authorization-server")).json()
        assert metadata["revocation_endpoint"] == revoke_url
    assert provider.revocation_stats == {"revocation_calls": 8, "revoked_grants": 1}
    for kind in ("500", "hang:x", "hang:-1", "nap:1"):
        with pytest.raises(ValueError, match="fault"):
            provider.fail_next_revocation(kind)


def test_a_revocation_url_must_be_https_or_loopback() -> None:
    """A revocation endpoint in clear text off loopback is refused, naming the setting."""
    with pytest.raises(ValueError, match="revocation_url must be an https"):
        OAuth2Refresher("https://p.example/token", "c", "s", revocation_url="http://p.example/revoke")


def test_a_hung_revocation_gives_up_when_the_client_hangs_up(
    provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """A logout whose revocation answer never comes (the refresher's own timeout ends it) revokes nothing; the
    entry is removed all the same."""
    manager = make_manager(refresher=refresher(server, timeout=0.2))
    tokens = provider.login()
    put_entry(manager, tokens)
    provider.fail_next_revocation("hang:5")
    result = manager.delete(SESSION, revoke=True)
    assert (result.deleted, result.revoked, result.reason) == (True, False, "failed")
    assert not provider.is_revoked(provider.grant_of(tokens.access_token))


@pytest.mark.anyio
async def test_async_logout_reports_refusals_timeouts_and_races(
    provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """adelete(revoke=True) through an injected async client and through one made per logout: a 503 is refused,
    an endpoint that does not answer in time timed out, a refresher without revocation_url not configured, a
    logout racing refreshes removes the entry; each removes the entry."""
    tokens = provider.login()
    async with httpx.AsyncClient(verify=SSL) as injected:
        manager = make_manager(refresher=refresher(server, async_client=injected), redeem_in="task")
        await manager.astore(SESSION, tokens)
        provider.fail_next_revocation("503")
        assert await manager.adelete(SESSION, revoke=True) == Logout(
            deleted=True, revoked=False, reason="refused", status_code=503, error="RefreshFailed"
        )
        await manager.astore(SESSION, tokens)
        provider.fail_next_revocation("hang:30")
        assert await manager.adelete(SESSION, revoke=True, revoke_timeout=0.3) == Logout(
            deleted=True, revoked=False, reason="timed_out"
        )
    plain = make_manager(refresher=refresher(server, revocation_url=None))
    await plain.astore(SESSION, tokens)
    assert await plain.adelete(SESSION, revoke=True) == Logout(deleted=True, revoked=False, reason="not_configured")
    churning = make_manager(refresher=refresher(server, timeout=2.0), storage=Churning())
    await churning.astore(SESSION, tokens)
    assert await churning.adelete(SESSION, revoke=True) == Logout(deleted=True, revoked=False, reason="no_entry")
    assert not provider.is_revoked(provider.grant_of(tokens.access_token))


def test_sync_logout_without_a_revocation_url_is_not_configured(
    provider: LocalProvider, server: ServerThread, make_manager: ManagerFactory
) -> None:
    """An OAuth2Refresher without revocation_url revokes nothing and says so; the entry is removed."""
    manager = make_manager(refresher=refresher(server, revocation_url=None))
    manager.store(SESSION, provider.login())
    assert manager.delete(SESSION, revoke=True) == Logout(deleted=True, revoked=False, reason="not_configured")
    assert provider.revocation_stats["revocation_calls"] == 0


# -- discovery: the revocation endpoint from the authorization server's metadata ----------------------------
@pytest.fixture
def provider_server(provider: LocalProvider) -> Iterator[ServerThread]:
    """The provider on 127.0.0.1, for the MCP server in front of it."""
    with ServerThread(provider) as running:
        yield running


@pytest.fixture
def mcp_server(provider: LocalProvider, provider_server: ServerThread) -> Iterator[LocalMCPServer]:
    """A real MCP server accepting the provider's tokens; its metadata leads to the provider."""
    with serve_mcp(provider, provider_server.url) as served:
        yield served


@pytest.mark.anyio
async def test_a_discovering_refresher_revokes_at_the_discovered_endpoint(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer
) -> None:
    """A DiscoveringRefresher revokes at the revocation_endpoint of the authorization server's RFC 8414 metadata,
    after the same checks as a refresh; the grant ends at the provider."""
    refresher = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret")
    manager = TokenManager(refresher=refresher, provider_id="local")
    tokens = provider.login()
    await manager.astore(SESSION, tokens)
    assert await manager.adelete(SESSION, revoke=True) == Logout(deleted=True, revoked=True, reason="revoked")
    assert refresher.metadata is not None
    assert refresher.metadata.revocation_endpoint == provider_server.url + "/revoke"
    assert provider.is_revoked(provider.grant_of(tokens.access_token))
    await manager.aclose()


def test_a_discovering_refresher_revokes_from_a_thread_and_takes_a_configured_endpoint(
    provider: LocalProvider, provider_server: ServerThread, mcp_server: LocalMCPServer, dead_url: str
) -> None:
    """The blocking twin revokes too; a revocation_url in refresher_options wins over the metadata's."""
    refresher = DiscoveringRefresher(
        mcp_server.url, "test-client", "test-secret", refresher_options={"revocation_url": dead_url + "/x"}
    )
    manager = TokenManager(refresher=refresher, provider_id="local")
    manager.store(SESSION, provider.login())
    assert manager.delete(SESSION, revoke=True).reason == "failed"  # sent where it was told: nothing listens
    manager.close()
    refresher = DiscoveringRefresher(mcp_server.url, "test-client", "test-secret")
    manager = TokenManager(refresher=refresher, provider_id="local")
    tokens = provider.login()
    manager.store(SESSION, tokens)
    assert manager.delete(SESSION, revoke=True).revoked is True
    assert provider.is_revoked(provider.grant_of(tokens.access_token))
    manager.close()


@pytest.mark.parametrize(
    ("named", "kept"),
    [
        ("https://id.example/t/revoke", "https://id.example/t/revoke"),
        ("http://id.example/t/revoke", None),  # clear text off loopback: never sent a refresh token
        ("not a url", None),
        (7, None),
    ],
)
def test_discovery_keeps_only_a_usable_revocation_endpoint(named: object, kept: str | None) -> None:
    """A metadata's revocation_endpoint is kept when secrets may go there, and left out (discovery still works)
    otherwise."""
    documents = {
        "https://mcp.example/.well-known/oauth-protected-resource/mcp": {
            "resource": "https://mcp.example/mcp",
            "authorization_servers": ["https://id.example/t"],
        },
        "https://id.example/.well-known/oauth-authorization-server/t": {
            "issuer": "https://id.example/t",
            "token_endpoint": "https://id.example/t/token",
            "revocation_endpoint": named,
        },
    }

    def handle(request: httpx.Request) -> httpx.Response:
        document = documents.get(str(request.url))
        return httpx.Response(404) if document is None else httpx.Response(200, json=document)

    with httpx.Client(transport=httpx.MockTransport(handle)) as client:
        found = discover("https://mcp.example/mcp", client=client)
    assert found.token_endpoint == "https://id.example/t/token" and found.revocation_endpoint == kept


def test_revoke_timeout_must_bound_the_wait(provider: LocalProvider, make_manager: ManagerFactory) -> None:
    """A revoke_timeout that would not bound the logout (0, negative, infinite, NaN, not a number) is refused before
    anything is removed."""
    manager = make_manager()
    manager.store(SESSION, provider.login())
    for odd in (0, -1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ValueError, match="revoke_timeout"):
            manager.delete(SESSION, revoke=True, revoke_timeout=odd)  # type: ignore[arg-type]
    assert stored(manager) is not None
