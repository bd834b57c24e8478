"""The shipped test provider's less travelled paths: a public client's registration and code flow, a provider
that states refresh lifetimes and issues ID tokens at the code exchange, a revocation that hangs then answers,
a request without a Host header, and what an ASGI server may send that uvicorn seldom does (a client gone before
its body, a stray message during a delay, a websocket or an unknown lifespan message). The last ones drive the
ASGI app directly: a real connection cannot produce them on demand."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
from collections.abc import Iterator, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest

from httpx_upstream_auth.testing import LocalProvider, ServerThread, protected_resource_metadata

REDIRECT = "http://127.0.0.1/callback"


@pytest.fixture
def provider() -> LocalProvider:
    """A provider that states refresh-token lifetimes and issues ID tokens."""
    return LocalProvider(refresh_ttl=3600, issue_id_token=True)


@pytest.fixture
def server(provider: LocalProvider) -> Iterator[ServerThread]:
    with ServerThread(provider) as running:
        yield running


def test_protected_resource_metadata_names_scopes_only_when_given() -> None:
    """RFC 9728 metadata: scopes_supported only when scopes are given."""
    document = protected_resource_metadata("https://api.example/mcp", ["https://as.example"])
    assert document == {
        "resource": "https://api.example/mcp",
        "authorization_servers": ["https://as.example"],
        "bearer_methods_supported": ["header"],
    }
    scoped = protected_resource_metadata("https://api.example/mcp", ["https://as.example"], scopes=["api"])
    assert scoped["scopes_supported"] == ["api"]


def test_a_public_clients_registration_and_code_flow(server: ServerThread, provider: LocalProvider) -> None:
    """A client registered with token_endpoint_auth_method "none" gets no secret; an authorization request
    with another response_type than code is answered with unsupported_response_type at the redirect URI; the
    code exchange answers refresh_token_expires_in and an ID token for the user."""
    with httpx.Client(base_url=server.url) as http:
        metadata = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
        registered = http.post("/register", json=metadata)
        assert registered.status_code == 201
        client = registered.json()
        assert client["token_endpoint_auth_method"] == "none" and "client_secret" not in client
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        params = {
            "response_type": "code",
            "client_id": client["client_id"],
            "redirect_uri": REDIRECT,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }

        def redirected(**extra: str) -> dict[str, list[str]]:
            answer = http.get("/authorize", params={**params, **extra})
            assert answer.status_code == 302 and answer.headers["location"].startswith(REDIRECT + "?")
            return parse_qs(urlsplit(answer.headers["location"]).query)

        assert redirected(response_type="token")["error"] == ["unsupported_response_type"]
        code = redirected()["code"][0]
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
            "client_id": client["client_id"],
        }
        exchanged = http.post("/token", data=form)
    assert exchanged.status_code == 200, exchanged.text
    answer = exchanged.json()
    assert answer["refresh_token_expires_in"] == 3600 and answer["refresh_token"]
    claims = json.loads(base64.urlsafe_b64decode(answer["id_token"].split(".")[1] + "=="))
    assert claims["aud"] == client["client_id"] and claims["iss"] == provider.issuer
    assert provider.flow_stats["code_exchanges"] == 1


def test_a_revocation_that_hangs_then_answers_503(server: ServerThread, provider: LocalProvider) -> None:
    """ "hang:<seconds>" holds the revocation answer that long, then answers temporarily_unavailable; nothing
    is revoked."""
    tokens = provider.login()
    provider.fail_next_revocation("hang:0.05")
    with httpx.Client(base_url=server.url) as http:
        answer = http.post("/revoke", data={"token": tokens.refresh_token}, auth=("test-client", "test-secret"))
        me = http.get("/api/me", headers={"Authorization": f"Bearer {tokens.access_token}"})
    assert (answer.status_code, answer.json()["error"]) == (503, "temporarily_unavailable")
    assert me.status_code == 200 and provider.revocation_stats["revocation_calls"] == 1


def test_a_request_without_a_host_header_names_the_servers_address(server: ServerThread) -> None:
    """An HTTP/1.0 request without Host: the metadata's issuer is the address the server listens on."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(b"GET /.well-known/openid-configuration HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["issuer"] == f"http://127.0.0.1:{server.port}"


# -- the ASGI app driven directly --------------------------------------------------------------------------------
def _drive(
    app: LocalProvider, scope: dict[str, Any], messages: list[dict[str, Any]], *, then_disconnect: bool = True
) -> list[dict[str, Any]]:
    """Run the app on ``scope`` with ``receive`` taking ``messages`` in order, then a disconnect (or nothing
    more, ever: a client that waits); return what it sent."""
    sent: list[dict[str, Any]] = []
    queue = messages

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if not then_disconnect:
            await anyio.sleep_forever()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def run() -> None:
        await app(scope, receive, send)

    anyio.run(run)
    return sent


def _http(method: str, path: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """An ASGI http scope for ``method path`` from a client at 127.0.0.1:8000."""
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"127.0.0.1:8000"), *headers],
    }


def test_a_client_gone_before_its_body_is_answered_as_an_empty_request() -> None:
    """The disconnect comes instead of the body: the token endpoint reads an empty form (no client: 401), the
    upload API counts 0 bytes."""
    app = LocalProvider()
    sent = _drive(app, _http("POST", "/token"), [])
    assert sent[0]["status"] == 401 and json.loads(sent[1]["body"])["error"] == "invalid_client"
    token = app.login().access_token
    sent = _drive(app, _http("POST", "/api/upload", (b"authorization", f"Bearer {token}".encode())), [])
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"])["bytes"] == 0


def test_a_delayed_token_request_waits_for_the_disconnect_past_stray_messages() -> None:
    """During a "delay:" fault a message that is not the disconnect is passed over (the request is handled
    once the delay is over); a disconnect ends the wait, and that request changes nothing (the refresh token
    it carried still works)."""
    app = LocalProvider()
    tokens = app.login()
    assert tokens.refresh_token is not None
    scope = _http("POST", "/token", (b"authorization", b"Basic " + base64.b64encode(b"test-client:test-secret")))
    form = f"grant_type=refresh_token&refresh_token={tokens.refresh_token}".encode()
    request = {"type": "http.request", "body": form, "more_body": False}
    stray = {"type": "http.request", "body": b"", "more_body": False}
    app.fail_next("delay:30")
    sent = _drive(app, scope, [request])
    assert sent[0]["status"] == 400 and app.stats["refresh_ok"] == 0, "the client left: nothing was handled"
    app.fail_next("delay:0.05")
    sent = _drive(app, scope, [request, stray], then_disconnect=False)
    assert sent[0]["status"] == 200 and app.stats["refresh_ok"] == 1 and app.stats["refresh_reuse"] == 0


def test_other_asgi_scopes_and_lifespan_messages_are_passed_over() -> None:
    """A websocket scope gets nothing sent; an unknown lifespan message is passed over until the shutdown."""
    app = LocalProvider()
    assert _drive(app, {"type": "websocket", "path": "/"}, []) == []
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.other"}, {"type": "lifespan.shutdown"}]
    sent = _drive(app, {"type": "lifespan"}, messages)
    assert [message["type"] for message in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert messages == [], "every message was received, the shutdown last"
