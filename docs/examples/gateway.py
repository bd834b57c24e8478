"""A small ASGI gateway: its own sessions mapped to users' upstream tokens, proxied with ``manager.auth(session)``.

The scenario httpx-upstream-auth was written for. A browser (or an MCP client) holds a session with the
gateway; the gateway holds the user's upstream tokens in SQLite or Redis, keyed by that session, and
proxies ``/upstream/...`` to the upstream API with them. Sessions outlive many access tokens: the auth
refreshes once per expiry (across the gateway's workers too) and replays after a 401. When the user must
log in again the gateway answers 401 with a Bearer challenge saying so; when the token store is down, 503.

It is a streaming proxy, so an MCP server works behind it (point an MCP client at ``/upstream/mcp``): the
answer streams through as it comes (server-sent events included), and the MCP headers
(``Mcp-Session-Id``, ``MCP-Protocol-Version``, ``Last-Event-ID``) pass both ways. Request bodies are read
first (at most ``MAX_BODY`` bytes): the auth may replay a request after refreshing.

Run the demo (a local provider with 2-second tokens as the upstream)::

    python docs/examples/gateway.py --seconds 5
    python docs/examples/gateway.py --storage redis://127.0.0.1:6379/0

Use it in your app::

    manager = TokenManager(refresher=OAuth2Refresher(...), provider_id="github", storage=SQLiteStorage("t.db"))
    app = create_app(manager, "https://api.github.com")
    # your login callback: await manager.astore(session_cookie, UpstreamTokens(...))
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import httpx_upstream_auth as hua

SESSION_COOKIE = "gw_session"
REAUTH_CHALLENGE = (
    'Bearer error="invalid_token", error_description="upstream token is no longer valid; re-authentication required"'
)
# Hop-by-hop and credential headers are the gateway's business, not the upstream's: the gateway session (a cookie
# or X-Gateway-Session) is a bearer credential for this gateway, which an upstream must never see.
_DROP_REQUEST = {
    "host",
    "cookie",
    "authorization",
    "proxy-authorization",
    "x-gateway-session",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "transfer-encoding",
}
_KEEP_RESPONSE = (
    "content-type",
    "content-encoding",
    "cache-control",
    "etag",
    "last-modified",
    "retry-after",
    "mcp-session-id",
    "mcp-protocol-version",
)
MAX_BODY = 4 * 1024 * 1024


def session_of(request: Request) -> str | None:
    """The gateway's own session id: a cookie (browsers) or an ``X-Gateway-Session`` header (API clients)."""
    return request.cookies.get(SESSION_COOKIE) or request.headers.get("x-gateway-session")


def create_app(manager: hua.TokenManager, upstream_url: str, *, timeout: float = 30.0) -> Starlette:
    """The gateway: ``/upstream/{path}`` proxied to ``upstream_url`` with the session's upstream tokens."""
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One pooled client for every session: the auth is per request, the connections are shared.
        # Reads may wait long: a server-sent event stream stays quiet between events (the MCP SDK waits 300 s).
        limits = httpx.Timeout(timeout, read=300.0)
        async with httpx.AsyncClient(base_url=upstream_url, timeout=limits) as client:
            state["client"] = client
            yield
        await manager.aclose()

    async def proxy(request: Request) -> Response:
        session = session_of(request)
        if session is None:
            return _reauthenticate("no gateway session")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return JSONResponse({"error": "request body too large"}, status_code=413)
        client = state["client"]
        outgoing = client.build_request(
            request.method,
            "/" + request.path_params["path"],
            params=str(request.query_params),
            content=body,
            headers=headers,
        )
        try:
            # stream=True: the answer is passed on as it arrives (an SSE stream may never end).
            upstream = await client.send(outgoing, auth=manager.auth(session), stream=True)  # O(1), no I/O
        except hua.ReauthenticationRequired:
            return _reauthenticate("log in again")
        except hua.StorageError:
            return JSONResponse({"error": "token store unavailable"}, status_code=503, headers={"retry-after": "1"})
        except hua.RefreshFailed as exc:
            status = 503 if exc.retryable else 502
            return JSONResponse({"error": "upstream token refresh failed"}, status_code=status)
        except hua.BindingMismatch:
            return JSONResponse({"error": "session bound to another identity"}, status_code=403)
        except httpx.TransportError:
            return JSONResponse({"error": "upstream unreachable"}, status_code=502)
        if upstream.status_code == 401:
            # The auth already refreshed and replayed once: the upstream still refuses, so the user must log in.
            await upstream.aclose()
            return _reauthenticate("upstream refused the refreshed token")
        kept = {k: v for k, v in upstream.headers.items() if k.lower() in _KEEP_RESPONSE}
        return StreamingResponse(
            upstream.aiter_raw(),  # raw: compressed as it came, with its content-encoding
            status_code=upstream.status_code,
            headers=kept,
            background=BackgroundTask(upstream.aclose),
        )

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/upstream/{path:path}", proxy, methods=methods)], lifespan=lifespan)


def _reauthenticate(detail: str) -> Response:
    return JSONResponse(
        {"error": "invalid_token", "detail": detail}, status_code=401, headers={"www-authenticate": REAUTH_CHALLENGE}
    )


def main(argv: list[str] | None = None) -> int:
    """Run the gateway against a local provider and call it like a browser would; print a summary."""
    from httpx_upstream_auth.testing import LocalProvider, ServerThread

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to keep calling (default 5)")
    parser.add_argument("--storage", default="sqlite", help="'sqlite' (a temporary file) or a redis:// URL")
    args = parser.parse_args(argv)

    import tempfile

    provider = LocalProvider(access_ttl=2.0)
    with tempfile.TemporaryDirectory() as tmp, ServerThread(provider) as upstream:
        storage: hua.Storage
        if args.storage.startswith(("redis://", "rediss://")):
            storage = hua.RedisStorage.from_url(args.storage)
        else:
            storage = hua.SQLiteStorage(f"{tmp}/tokens.db")
        refresher = hua.OAuth2Refresher(upstream.url + "/token", "test-client", "test-secret")
        manager = hua.TokenManager(refresher=refresher, provider_id="local", storage=storage)
        manager.store("browser-session-1", provider.login())  # what your login callback does
        with (
            ServerThread(create_app(manager, upstream.url), lifespan="on") as gateway,
            httpx.Client(base_url=gateway.url, cookies={SESSION_COOKIE: "browser-session-1"}) as browser,
        ):
            ok = failed = 0
            started = time.monotonic()
            while time.monotonic() - started < args.seconds:
                if browser.get("/upstream/api/me").status_code == 200:
                    ok += 1
                else:
                    failed += 1
                time.sleep(0.05)
            provider.revoke_grant(provider.grant_of(manager.get_token("browser-session-1").access_token))
            time.sleep(2.1)  # let the last access token expire too
            after = browser.get("/upstream/api/me")
    stats = provider.stats
    print(f"requests: {ok + failed} ({ok} ok, {failed} failed) in {args.seconds:.0f} s")
    print(f"refreshes: {stats['refresh_ok']} (2-second tokens), reused refresh tokens: {stats['refresh_reuse']}")
    print(f"after the grant was revoked: {after.status_code} {after.headers.get('www-authenticate')}")
    return 0 if failed == 0 and stats["refresh_reuse"] == 0 and after.status_code == 401 else 1


if __name__ == "__main__":
    raise SystemExit(main())
