"""The libraries ``compare.py`` measures, each driven through its own documented public API.

A *stack* is one library (with one setting) on one HTTP client package. It opens a client that holds the
grant the benchmark gives it and returns ``send(url) -> status``; every request it sends is noted by an
event hook ``(time.monotonic(), access token)``, so the benchmark can tell which token each request
carried and when it left. Peers are imported only when used: they live in the benchmark environment
(``benchmarks/requirements-peers.txt``), never in the library's dependencies.

* ``ours[storage]``: ``httpx_upstream_auth`` with memory, SQLite or Redis storage, ``auth=manager.auth(sid)``.
* ``authlib``: ``authlib.integrations.httpx_client.AsyncOAuth2Client`` / ``OAuth2Client`` with ``token=``,
  ``token_endpoint=`` and an ``update_token`` callback (Authlib 1.9 builds them on httpx2 when it is
  installed). Default ``leeway=60``; ``authlib (leeway=0)`` for short-lived tokens, where 60 s refreshes on
  every request.
* ``mcp-sdk``: the MCP SDK's ``OAuthClientProvider`` as ``auth=`` of an ``httpx2.AsyncClient``, its
  ``TokenStorage`` holding the grant and the pre-registered client, and a headless browser as its
  ``redirect_handler``/``callback_handler`` (the provider approves at once): each login it asks for is
  done and counted. Async only.
* ``httpx-auth``: ``OAuth2AuthorizationCodePKCE`` (its OAuth2 flow with refresh tokens); its first
  login goes through a headless browser too (``$BROWSER``, which ``webbrowser`` honours). Default
  ``early_expiry=30``; ``httpx-auth (early_expiry=0.1)`` for short-lived tokens (0 is read as 30).
* ``hand-written``: the usual code: an ``Auth`` that sends the token and, on a 401, refreshes and
  retries once; no lock, no expiry tracking.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import stat
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

import httpx_upstream_auth as hua

CLIENT_ID, CLIENT_SECRET = "test-client", "test-secret"
PUBLIC_CLIENT = "public-client"
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: the headless browser reads the redirect
SESSION = "bench-session"

AsyncSend = Callable[..., Awaitable[int]]
SyncSend = Callable[..., int]


@dataclass
class Env:
    """Where a stack runs: the provider's URL, a folder for files, the Redis URL (if any), the grant."""

    url: str
    folder: Path
    redis_url: str | None = None
    tokens: dict[str, Any] = field(default_factory=dict)
    """The grant as ``/_bench/login`` answered it (``UpstreamTokens`` JSON)."""
    shared_file: Path | None = None
    """For the cross-process scenario: the file (or SQLite database) the processes share the grant through."""
    preloaded: bool = False
    """The grant is already in the shared store (a worker process of the cross-process scenario)."""
    sent: list[tuple[float, str]] = field(default_factory=list)
    """Every request sent to the API: ``(time.monotonic(), access token)``, filled by the event hooks."""
    logins: list[float] = field(default_factory=list)
    """Interactive logins the stack asked for (the headless browser's visits)."""
    sent_token: str = ""
    """The access token the warm-up request carried (the one a scenario revokes)."""

    in_process: bool = False
    """Clients answer API requests themselves (a ``MockTransport``: 200, no socket), so the time measured
    is the client's and the library's alone."""

    def options(self, module: ModuleType) -> dict[str, Any]:
        """Client options every stack passes: the pool size, and the in-process transport if asked for."""
        options: dict[str, Any] = {"limits": _limits(module)}
        if self.in_process:
            options["transport"] = module.MockTransport(lambda request: module.Response(200, content=b"{}"))
        return options

    def note(self, request: Any) -> None:
        """Event hook: note the token a request to the API carries, and when it leaves."""
        if "/api/" in str(request.url):
            header = request.headers.get("authorization", "")
            self.sent.append((time.monotonic(), header[7:] if header.lower().startswith("bearer ") else ""))

    async def anote(self, request: Any) -> None:
        """The async event hook."""
        self.note(request)


def client_module(kind: str) -> ModuleType:
    """``httpx`` or ``httpx2``."""
    if kind == "httpx2":
        import httpx2

        return httpx2
    return httpx


def _limits(module: ModuleType) -> Any:
    return module.Limits(max_connections=100, max_keepalive_connections=100)


def async_sender(client: Any, plain: dict[str, Any] | None = None, **kwargs: Any) -> AsyncSend:
    """``send(url, plain=False) -> status`` through ``client`` (``plain``: without the library's auth, to
    open connections before a scenario; ``plain=`` the arguments that do that, ``auth=None`` by default)."""
    bare = {"auth": None} if plain is None else plain

    async def send(url: str, plain: bool = False) -> int:
        return int((await client.request("GET", url, **(bare if plain else kwargs))).status_code)

    return send


def sync_sender(client: Any, plain: dict[str, Any] | None = None, **kwargs: Any) -> SyncSend:
    """The sync twin of :func:`async_sender`."""
    bare = {"auth": None} if plain is None else plain

    def send(url: str, plain: bool = False) -> int:
        return int(client.request("GET", url, **(bare if plain else kwargs)).status_code)

    return send


class Stack(abc.ABC):
    """One library with one setting on one client package; subclasses open clients for a scenario."""

    library = ""
    setting = ""
    peer = True
    logs_in = False
    """Whether it gets its first tokens by an interactive login of its own (not from the benchmark)."""

    def __init__(self, client: str) -> None:
        self.client = client

    @property
    def name(self) -> str:
        """``library (setting)``, as the tables print it."""
        return f"{self.library} ({self.setting})" if self.setting else self.library

    @abc.abstractmethod
    def aopen(self, env: Env) -> contextlib.AbstractAsyncContextManager[AsyncSend]:
        """An async client holding ``env.tokens``: yields ``send(url) -> status``."""

    @abc.abstractmethod
    def open(self, env: Env) -> contextlib.AbstractContextManager[SyncSend]:
        """A sync client holding ``env.tokens`` (shared by threads): yields ``send(url) -> status``."""


class Static(Stack):
    """The plain client with a static ``Authorization: Bearer`` header: the baseline of every ratio."""

    library = "plain client, static header"
    peer = False

    @contextlib.asynccontextmanager
    async def aopen(self, env: Env) -> AsyncIterator[AsyncSend]:
        module = client_module(self.client)
        headers = {"Authorization": f"Bearer {env.tokens['access_token']}"}
        async with module.AsyncClient(**env.options(module), event_hooks={"request": [env.anote]}) as client:
            yield async_sender(client, headers=headers)

    @contextlib.contextmanager
    def open(self, env: Env) -> Iterator[SyncSend]:
        module = client_module(self.client)
        headers = {"Authorization": f"Bearer {env.tokens['access_token']}"}
        with module.Client(**env.options(module), event_hooks={"request": [env.note]}) as client:
            yield sync_sender(client, headers=headers)


# -- ours ----------------------------------------------------------------------------------------------


def our_storage(kind: str, env: Env, stack: contextlib.ExitStack) -> hua.Storage:
    """A storage of ``kind``; on ``env.shared_file`` (SQLite) or ``env.redis_url`` when the grant is shared."""
    if kind == "memory":
        return hua.MemoryStorage()
    if kind == "sqlite":
        path = env.shared_file or Path(stack.enter_context(tempfile.TemporaryDirectory(dir=env.folder))) / "t.db"
        storage: hua.Storage = hua.SQLiteStorage(path)
    else:
        assert env.redis_url is not None, "the redis storage needs a redis-server"
        storage = hua.RedisStorage.from_url(env.redis_url)
    stack.callback(storage.close)
    return storage


class Ours(Stack):
    """``httpx_upstream_auth``: ``auth=manager.auth(session_id)`` on the client."""

    library = "httpx-upstream-auth"
    peer = False

    def __init__(self, client: str, storage: str) -> None:
        super().__init__(client)
        self.storage = storage
        self.setting = storage

    @contextlib.contextmanager
    def manager(self, env: Env, *, store: bool = True) -> Iterator[hua.TokenManager]:
        """A manager on a storage of this stack's kind, holding the grant unless ``store=False``."""
        with contextlib.ExitStack() as stack:
            manager = hua.TokenManager(
                refresher=hua.OAuth2Refresher(env.url + "/token", CLIENT_ID, CLIENT_SECRET),
                provider_id="local",
                storage=our_storage(self.storage, env, stack),
            )
            stack.callback(manager.close)
            if store:
                manager.store(SESSION, hua.UpstreamTokens.from_json(json.dumps(env.tokens)))
            yield manager

    @contextlib.asynccontextmanager
    async def aopen(self, env: Env) -> AsyncIterator[AsyncSend]:
        module = client_module(self.client)
        with self.manager(env, store=not env.preloaded) as manager:
            hooks = {"request": [env.anote]}
            auth = manager.auth(SESSION)
            async with module.AsyncClient(auth=auth, **env.options(module), event_hooks=hooks) as client:
                yield async_sender(client)

    @contextlib.contextmanager
    def open(self, env: Env) -> Iterator[SyncSend]:
        module = client_module(self.client)
        with self.manager(env, store=not env.preloaded) as manager:
            hooks = {"request": [env.note]}
            with module.Client(auth=manager.auth(SESSION), **env.options(module), event_hooks=hooks) as client:
                yield sync_sender(client)


# -- Authlib -------------------------------------------------------------------------------------------


def authlib_token(tokens: dict[str, Any]) -> dict[str, Any]:
    """The grant as Authlib keeps it (``expires_at`` must be an int, or Authlib never refreshes)."""
    return {
        "access_token": tokens["access_token"],
        "refresh_token": tokens["refresh_token"],
        "token_type": "Bearer",
        "expires_at": int(tokens["expires_at"]),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_text(json.dumps(data))
    os.chmod(temporary, stat.S_IRUSR | stat.S_IWUSR)
    os.replace(temporary, path)


class Authlib(Stack):
    """Authlib's httpx integration: the client holds the token and refreshes it before a request."""

    library = "authlib"

    def __init__(self, client: str, leeway: int | None = None) -> None:
        super().__init__(client)
        self.leeway = leeway
        self.setting = "" if leeway is None else f"leeway={leeway}"

    def _kwargs(self, env: Env, hook: Any) -> dict[str, Any]:
        token = authlib_token(env.tokens)
        if env.shared_file is not None and env.shared_file.exists():
            token = json.loads(env.shared_file.read_text())  # the app loads the saved token at start
        kwargs: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "token_endpoint": env.url + "/token",
            "token": token,
            "event_hooks": {"request": [hook]},
            **env.options(client_module("httpx2")),
        }
        if self.leeway is not None:
            kwargs["leeway"] = self.leeway
        return kwargs

    @contextlib.asynccontextmanager
    async def aopen(self, env: Env) -> AsyncIterator[AsyncSend]:
        from authlib.integrations.httpx_client import AsyncOAuth2Client

        async def update_token(token: dict[str, Any], refresh_token: str | None = None, **_: Any) -> None:
            if env.shared_file is not None:
                _write_json(env.shared_file, dict(token))

        async with AsyncOAuth2Client(update_token=update_token, **self._kwargs(env, env.anote)) as client:
            yield async_sender(client, plain={"withhold_token": True})

    @contextlib.contextmanager
    def open(self, env: Env) -> Iterator[SyncSend]:
        from authlib.integrations.httpx_client import OAuth2Client

        def update_token(token: dict[str, Any], refresh_token: str | None = None, **_: Any) -> None:
            if env.shared_file is not None:
                _write_json(env.shared_file, dict(token))

        with OAuth2Client(update_token=update_token, **self._kwargs(env, env.note)) as client:
            yield sync_sender(client, plain={"withhold_token": True})


# -- the MCP SDK ---------------------------------------------------------------------------------------


class HeadlessBrowser:
    """A ``redirect_handler``/``callback_handler`` pair: opens the authorize URL (the provider approves at
    once) and hands the code from its redirect to the SDK. Each visit is a login a user would have made."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self._result: Any = None

    async def redirect(self, url: str) -> None:
        """Open the authorization URL and keep the code it redirects with."""
        from mcp.shared.auth import AuthorizationCodeResult

        self.env.logins.append(time.monotonic())
        async with httpx.AsyncClient() as client:
            response = await client.get(url)
        query = parse_qs(urlsplit(response.headers["location"]).query)
        self._result = AuthorizationCodeResult(
            code=query["code"][0], state=query["state"][0], iss=query.get("iss", [None])[0]
        )

    async def callback(self) -> Any:
        """Hand the code to the SDK."""
        return self._result


class SDKTokenStorage:
    """The SDK's ``TokenStorage``: in memory, or a JSON file (``env.shared_file``) for the cross-process
    scenario, read whenever the SDK asks and written whenever it saves."""

    def __init__(self, env: Env) -> None:
        from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

        self.path = env.shared_file
        tokens = env.tokens
        remaining = max(0, int(tokens["expires_at"] - time.time()))
        self.tokens: Any = OAuthToken(
            access_token=tokens["access_token"],
            token_type="Bearer",
            expires_in=remaining,
            refresh_token=tokens["refresh_token"],
            scope=tokens.get("scope"),
        )
        self.client_info = OAuthClientInformationFull(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            token_endpoint_auth_method="client_secret_basic",
            redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
        )

    async def get_tokens(self) -> Any:
        """The stored tokens (from the file when there is one)."""
        from mcp.shared.auth import OAuthToken

        if self.path is not None and self.path.exists():
            return OAuthToken.model_validate_json(self.path.read_text())
        return self.tokens

    async def set_tokens(self, tokens: Any) -> None:
        """Keep new tokens (in the file when there is one)."""
        self.tokens = tokens
        if self.path is not None:
            _write_json(self.path, json.loads(tokens.model_dump_json()))

    async def get_client_info(self) -> Any:
        """The pre-registered client."""
        return self.client_info

    async def set_client_info(self, client_info: Any) -> None:
        """Keep a registration."""
        self.client_info = client_info


def sdk_auth(env: Env, server_url: str) -> Any:
    """The SDK's ``OAuthClientProvider`` for ``server_url``, with its storage and a headless browser."""
    from mcp.client.auth import OAuthClientProvider
    from mcp.shared.auth import OAuthClientMetadata

    browser = HeadlessBrowser(env)
    metadata = OAuthClientMetadata(
        redirect_uris=[REDIRECT_URI],  # type: ignore[list-item]
        token_endpoint_auth_method="client_secret_basic",
        scope="api",
    )
    return OAuthClientProvider(
        server_url,
        metadata,
        storage=SDKTokenStorage(env),
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
    )


class MCPSDK(Stack):
    """The MCP SDK's ``OAuthClientProvider`` as the ``auth=`` of an httpx2 client."""

    library = "mcp-sdk OAuthClientProvider"

    def __init__(self) -> None:
        super().__init__("httpx2")

    @contextlib.asynccontextmanager
    async def aopen(self, env: Env) -> AsyncIterator[AsyncSend]:
        import httpx2

        auth = sdk_auth(env, env.url + "/api/me")
        hooks = {"request": [env.anote]}
        async with httpx2.AsyncClient(auth=auth, **env.options(httpx2), event_hooks=hooks) as client:
            yield async_sender(client)

    @contextlib.contextmanager
    def open(self, env: Env) -> Iterator[SyncSend]:
        import httpx2

        auth = sdk_auth(env, env.url + "/api/me")
        with httpx2.Client(auth=auth, **env.options(httpx2), event_hooks={"request": [env.note]}) as client:
            yield sync_sender(client)  # the SDK's auth is async only


# -- httpx-auth ----------------------------------------------------------------------------------------

_BROWSER_SCRIPT = """#!/bin/sh
# A headless browser for httpx-auth's login: opens the URL in the background (the library's redirect
# server waits for it only once this returns) and follows the provider's redirect back to that server.
( "{python}" -c 'import sys, httpx; httpx.get(sys.argv[1], follow_redirects=True, timeout=30)' "$1" \\
    >/dev/null 2>&1 & )
"""


def install_headless_browser(folder: Path) -> None:
    """Point ``$BROWSER`` (read by ``webbrowser`` on first use) at a script that logs in headlessly."""
    script = folder / "headless-browser.sh"
    script.write_text(_BROWSER_SCRIPT.format(python=sys.executable))
    script.chmod(0o700)
    os.environ["BROWSER"] = f"{script} %s"


class HttpxAuth(Stack):
    """httpx-auth's ``OAuth2AuthorizationCodePKCE`` (it refreshes with the refresh token it got at login)."""

    library = "httpx-auth"
    logs_in = True

    def __init__(self, early_expiry: float | None = None) -> None:
        super().__init__("httpx")
        self.early_expiry = early_expiry
        self.setting = "" if early_expiry is None else f"early_expiry={early_expiry:g}"

    def auth(self, env: Env) -> Any:
        """The auth object; its tokens live in httpx-auth's process-wide cache (a JSON file if shared)."""
        import httpx_auth

        if env.shared_file is not None:
            httpx_auth.OAuth2.token_cache = httpx_auth.JsonTokenFileCache(str(env.shared_file))
        else:
            httpx_auth.OAuth2.token_cache = httpx_auth.TokenMemoryCache()
        install_headless_browser(env.folder)
        kwargs: dict[str, Any] = {"client_id": PUBLIC_CLIENT, "redirect_uri_port": 0, "timeout": 10}
        if self.early_expiry is not None:
            kwargs["early_expiry"] = self.early_expiry
        # redirect_uri_port=0 would mean "the default, 5000": pick a free port ourselves.
        kwargs["redirect_uri_port"] = _free_port()
        return httpx_auth.OAuth2AuthorizationCodePKCE(env.url + "/authorize", env.url + "/token", **kwargs)

    @contextlib.asynccontextmanager
    async def aopen(self, env: Env) -> AsyncIterator[AsyncSend]:
        auth = self.auth(env)
        hooks = {"request": [env.anote]}
        async with httpx.AsyncClient(auth=auth, **env.options(httpx), event_hooks=hooks) as client:
            yield async_sender(client)

    @contextlib.contextmanager
    def open(self, env: Env) -> Iterator[SyncSend]:
        auth = self.auth(env)
        with httpx.Client(auth=auth, **env.options(httpx), event_hooks={"request": [env.note]}) as client:
            yield sync_sender(client)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- hand-written --------------------------------------------------------------------------------------


class RefreshOn401:
    """The refresh code people write: send the token; on a 401, refresh and retry once. No lock, no expiry
    tracking, tokens in memory (a process starts from the shared file when there is one)."""

    def __init__(self, module: ModuleType, env: Env) -> None:
        self.module = module
        self.token_url = env.url + "/token"
        tokens = env.tokens
        if env.shared_file is not None and env.shared_file.exists():
            tokens = json.loads(env.shared_file.read_text())
        self.access_token = tokens["access_token"]
        self.refresh_token = tokens["refresh_token"]

    def _form(self) -> dict[str, str]:
        return {"grant_type": "refresh_token", "refresh_token": self.refresh_token}

    def _take(self, response: Any) -> None:
        response.raise_for_status()
        body = response.json()
        self.access_token = body["access_token"]
        self.refresh_token = body.get("refresh_token", self.refresh_token)

    def auth(self) -> Any:
        """An ``Auth`` of the client package, with both flows."""
        outer = self
        module = self.module

        class Auth(module.Auth):  # type: ignore[misc,name-defined]
            def sync_auth_flow(self, request: Any) -> Any:
                request.headers["Authorization"] = f"Bearer {outer.access_token}"
                response = yield request
                if response.status_code == 401:
                    with module.Client() as client:
                        outer._take(client.post(outer.token_url, data=outer._form(), auth=(CLIENT_ID, CLIENT_SECRET)))
                    request.headers["Authorization"] = f"Bearer {outer.access_token}"
                    yield request

            async def async_auth_flow(self, request: Any) -> Any:
                request.headers["Authorization"] = f"Bearer {outer.access_token}"
                response = yield request
                if response.status_code == 401:
                    async with module.AsyncClient() as client:
                        answer = await client.post(outer.token_url, data=outer._form(), auth=(CLIENT_ID, CLIENT_SECRET))
                    outer._take(answer)
                    request.headers["Authorization"] = f"Bearer {outer.access_token}"
                    yield request

        return Auth()


class HandWritten(Stack):
    """The usual "on 401 refresh and retry" ``Auth``."""

    library = "hand-written (refresh on 401)"

    @contextlib.asynccontextmanager
    async def aopen(self, env: Env) -> AsyncIterator[AsyncSend]:
        module = client_module(self.client)
        auth = RefreshOn401(module, env).auth()
        hooks = {"request": [env.anote]}
        async with module.AsyncClient(auth=auth, **env.options(module), event_hooks=hooks) as client:
            yield async_sender(client)

    @contextlib.contextmanager
    def open(self, env: Env) -> Iterator[SyncSend]:
        module = client_module(self.client)
        auth = RefreshOn401(module, env).auth()
        with module.Client(auth=auth, **env.options(module), event_hooks={"request": [env.note]}) as client:
            yield sync_sender(client)


def stack(spec: str) -> Stack:
    """A stack from its spec, ``name@client`` (how worker processes are told which to build)."""
    name, _, client = spec.partition("@")
    if name.startswith("ours:"):
        return Ours(client, name[5:])
    if name == "static":
        return Static(client)
    if name.startswith("authlib"):
        return Authlib(client, int(name[8:]) if name[8:] else None)
    if name == "mcp-sdk":
        return MCPSDK()
    if name.startswith("httpx-auth"):
        return HttpxAuth(float(name[11:]) if name[11:] else None)
    if name == "hand":
        return HandWritten(client)
    raise ValueError(f"unknown stack {spec!r}")
