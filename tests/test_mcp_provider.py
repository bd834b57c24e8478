"""What the local provider and ServerThread grew for MCP: authorization with PKCE, registration, metadata
under a path, introspection, and the ASGI lifespan."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from httpx_upstream_auth.testing import LocalProvider, ServerThread, protected_resource_metadata, serve

ISSUER_PATH = "/tenants/acme"
REDIRECT = "http://127.0.0.1:9/cb"


@pytest.fixture
def provider() -> LocalProvider:
    """A provider with its authorization server under a path."""
    return LocalProvider(access_ttl=60, issuer_path=ISSUER_PATH)


@pytest.fixture
def server(provider: LocalProvider) -> Iterator[ServerThread]:
    """The provider on 127.0.0.1."""
    with ServerThread(provider) as running:
        yield running


def pkce() -> tuple[str, str]:
    """A (verifier, S256 challenge) pair."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize(server: ServerThread, client_id: str, challenge: str, **extra: str) -> dict[str, list[str]]:
    """Follow the authorization endpoint once; the query of the redirect it answers with."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "state": "st",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "scope": "api",
        **extra,
    }
    response = httpx.get(server.url + ISSUER_PATH + "/authorize", params=params)
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return parse_qs(urlsplit(location).query)


def test_metadata_is_served_under_the_issuer_path_only(server: ServerThread, provider: LocalProvider) -> None:
    """RFC 8414 and OpenID metadata name the issuer with its path; /token at the root answers 404."""
    issuer = server.url + ISSUER_PATH
    for path in (
        "/.well-known/oauth-authorization-server" + ISSUER_PATH,
        "/.well-known/openid-configuration" + ISSUER_PATH,
        ISSUER_PATH + "/.well-known/openid-configuration",
    ):
        document = httpx.get(server.url + path).json()
        assert document["issuer"] == issuer and document["token_endpoint"] == issuer + "/token"
    assert httpx.get(server.url + "/.well-known/oauth-authorization-server").status_code == 404
    assert httpx.post(server.url + "/token").status_code == 404
    assert provider.flow_stats["metadata_requests"] == 3
    with pytest.raises(ValueError, match="issuer_path"):
        LocalProvider(issuer_path="tenants/")


def test_registration_authorization_and_code_exchange(server: ServerThread, provider: LocalProvider) -> None:
    """A dynamically registered client logs a user in with PKCE; the code is single-use; the tokens are live."""
    registered = httpx.post(
        server.url + ISSUER_PATH + "/register",
        json={"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "client_secret_post", "client_name": "t"},
    )
    assert registered.status_code == 201
    client = registered.json()
    assert client["client_id"].startswith("dyn-") and client["client_secret"] and client["client_name"] == "t"
    verifier, challenge = pkce()
    query = authorize(server, client["client_id"], challenge, resource="http://mcp.example/mcp")
    assert query["state"] == ["st"] and query["iss"] == [server.url + ISSUER_PATH]
    form = {
        "grant_type": "authorization_code",
        "code": query["code"][0],
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
        "client_id": client["client_id"],
        "client_secret": client["client_secret"],
    }
    token_url = server.url + ISSUER_PATH + "/token"
    answer = httpx.post(token_url, data=form)
    assert answer.status_code == 200, answer.text
    tokens = answer.json()
    assert tokens["refresh_token"] and tokens["expires_in"] == 60 and tokens["scope"] == "api"
    info = provider.introspect(tokens["access_token"])
    assert info is not None and info["sub"] == "alice" and info["resource"] == "http://mcp.example/mcp"
    assert httpx.post(token_url, data=form).json() == {"error": "invalid_grant"}  # the code is single-use
    refreshed = httpx.post(
        token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": client["client_id"],
            "client_secret": client["client_secret"],
        },
    )
    assert refreshed.status_code == 200
    assert provider.flow_stats == {"registrations": 1, "authorizations": 1, "code_exchanges": 1, "metadata_requests": 0}


def test_pkce_and_redirect_uri_are_enforced(server: ServerThread, provider: LocalProvider) -> None:
    """A wrong verifier is invalid_grant; no PKCE is an error redirect; an unregistered redirect_uri is refused."""
    client_id, secret = provider.register_client([REDIRECT], auth_method="client_secret_basic")
    assert secret is not None
    _, challenge = pkce()
    query = authorize(server, client_id, challenge)
    form = {
        "grant_type": "authorization_code",
        "code": query["code"][0],
        "redirect_uri": REDIRECT,
        "code_verifier": "wrong" * 10,
    }
    answer = httpx.post(server.url + ISSUER_PATH + "/token", data=form, auth=(client_id, secret))
    assert answer.json() == {"error": "invalid_grant"}
    no_pkce = authorize(server, client_id, "", code_challenge_method="plain")
    assert no_pkce["error"] == ["invalid_request"] and "code" not in no_pkce
    elsewhere = httpx.get(
        server.url + ISSUER_PATH + "/authorize",
        params={"response_type": "code", "client_id": client_id, "redirect_uri": "http://evil.example/cb"},
    )
    assert elsewhere.status_code == 400


def test_introspection_follows_expiry_and_revocation(provider: LocalProvider) -> None:
    """introspect() answers only for live tokens."""
    tokens = provider.login()
    assert provider.introspect(tokens.access_token) is not None
    assert provider.introspect("nope") is None
    provider.revoke_access(tokens.access_token)
    assert provider.introspect(tokens.access_token) is None


def test_protected_resource_metadata_document() -> None:
    """The RFC 9728 helper names the resource and its authorization servers."""
    document = protected_resource_metadata("https://api.example/mcp", ["https://id.example/t"], scopes=["api"])
    assert document["resource"] == "https://api.example/mcp"
    assert document["authorization_servers"] == ["https://id.example/t"]
    assert document["scopes_supported"] == ["api"]


class LifespanApp:
    """An ASGI app that records its lifespan events and answers 200 only once started."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.events.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    self.events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        status = 200 if self.events == ["startup"] else 503
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_server_thread_runs_the_lifespan_when_asked() -> None:
    """lifespan="on" runs startup before serving and shutdown at stop; the default stays "off"."""
    app = LifespanApp()
    with serve(app, lifespan="on") as server:
        assert httpx.get(server.url).status_code == 200
    assert app.events == ["startup", "shutdown"]
    quiet = LifespanApp()
    with serve(quiet) as server:
        assert httpx.get(server.url).status_code == 503
    assert quiet.events == []


def test_bind_gives_the_url_before_start() -> None:
    """bind() reserves the port so an app can be built from its own URL, then start() serves on it."""
    server = ServerThread(LifespanApp(), lifespan="on")
    url = server.bind()
    assert url == f"http://127.0.0.1:{server.port}" and server.bind() == url
    server.start()
    try:
        assert server.url == url and httpx.get(url).status_code == 200
    finally:
        server.stop()
    never_started = ServerThread(LifespanApp())
    never_started.bind()
    never_started.stop()  # closes the bound socket
