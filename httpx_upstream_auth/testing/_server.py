"""Run an ASGI app under uvicorn in a background thread, on a free loopback port."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Literal

import anyio.to_thread

from ._provider import ASGIApp

__all__ = ["ServerThread", "serve"]

START_TIMEOUT = 10.0


class ServerThread:
    """An ASGI app served by uvicorn from a daemon thread, on ``host`` (loopback only).

    ``port=0`` picks a free port: the socket is bound here, before uvicorn starts, so there is no race
    with other processes. Use it as a context manager (``async with`` in async code), or call
    :meth:`start` and :meth:`stop`.
    ``lifespan="on"`` runs the app's ASGI lifespan (startup before the first request, shutdown at
    :meth:`stop`), which apps such as MCP servers need; the default ``"off"`` never sends it.
    :meth:`bind` takes the port before starting, for apps that must know their own URL.
    Needs the ``testing`` extra (``pip install httpx-upstream-auth[testing]``).
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lifespan: Literal["on", "off", "auto"] = "off",
    ) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"ServerThread only listens on loopback addresses, not {host!r}")
        self.app = app
        """The ASGI app being served."""
        self.host = host
        """The address listened on."""
        self.lifespan = lifespan
        """Whether uvicorn runs the app's ASGI lifespan: ``"on"``, ``"off"`` or ``"auto"``."""
        self._port = port
        self._socket: socket.socket | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one picked, once started, when ``0`` was asked)."""
        return self._port

    @property
    def url(self) -> str:
        """The base URL, such as ``http://127.0.0.1:54321``; only known once started."""
        if self._thread is None and self._socket is None:
            raise RuntimeError("the server is not started; call start() (or bind()) first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    def bind(self) -> str:
        """Bind the listening socket now, before :meth:`start`, and return the URL it will serve.

        For an app built from its own URL (an MCP server names itself in its metadata): bind, build
        the app, assign :attr:`app`, then start. Calling it again returns the same URL.
        """
        if self._socket is None and self._thread is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only then,
            # and without it every keep-alive response stalls ~40 ms on Nagle plus delayed ACK.
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self._port))
            except OSError:
                sock.close()
                raise
            self._port = sock.getsockname()[1]
            self._socket = sock
        return self.url

    def start(self, timeout: float = START_TIMEOUT) -> ServerThread:
        """Start serving and wait until the server accepts connections; return ``self``.

        Raises ``RuntimeError`` if uvicorn fails or is not up within ``timeout`` seconds.
        """
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        try:
            import uvicorn
        except ImportError as exc:
            raise ImportError("ServerThread needs uvicorn: pip install httpx-upstream-auth[testing]") from exc
        self.bind()
        sock, self._socket = self._socket, None
        assert sock is not None
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self._port,
            log_level="error",
            log_config=None,
            access_log=False,
            lifespan=self.lifespan,
            interface="asgi3",
            limit_concurrency=4096,
            backlog=2048,
            loop="asyncio",
            http="auto",
            timeout_graceful_shutdown=2,
            # Longer than uvicorn's 5 s: a client reusing a connection just as the server drops it for
            # idleness sees a spurious RemoteProtocolError, noise in tests that count every failure.
            timeout_keep_alive=60,
        )
        self._server = uvicorn.Server(config)
        self._error = None
        thread = threading.Thread(target=self._run, args=(sock,), name=f"ServerThread-{self._port}", daemon=True)
        self._thread = thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                self._thread = None
                raise RuntimeError(f"uvicorn did not start on {self.host}:{self._port}") from self._error
            time.sleep(0.005)
        return self

    def _run(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except BaseException as exc:  # uvicorn reports startup failure with SystemExit
            self._error = exc
        finally:
            sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit (open requests get a short grace period) and wait for the thread."""
        if self._socket is not None:  # bound, never started
            self._socket.close()
            self._socket = None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    async def __aenter__(self) -> ServerThread:
        """``async with ServerThread(app) as server:`` starts it from a worker thread: the start waits for
        uvicorn, which an event loop must not do."""
        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def serve(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    lifespan: Literal["on", "off", "auto"] = "off",
) -> Iterator[ServerThread]:
    """Serve ``app`` (a :class:`LocalProvider`, or any ASGI app) for the ``with`` block; yield the server.

    ``lifespan="on"`` for apps that need their ASGI lifespan run (MCP servers, most Starlette apps).

    ::

        with serve(provider) as server:
            httpx.get(server.url + "/api/me")
    """
    with ServerThread(app, host=host, port=port, lifespan=lifespan) as server:
        yield server
