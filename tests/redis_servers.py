"""Real redis-server processes for tests: one standalone server, or a three-primary cluster.

Each server listens on a free 127.0.0.1 port, keeps nothing on disk, and is stopped by its own PID.
When ``redis-server`` is not installed, tests that need it skip (or fail when the ``CI`` env var is set).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

__all__ = ["RedisCluster", "RedisServer", "free_port", "require_redis_server"]

_READY_TIMEOUT = 10.0


def require_redis_server() -> str:
    """Path of ``redis-server``; skip the test without it (fail instead when ``CI`` is set)."""
    found = shutil.which("redis-server")
    if found is None or shutil.which("redis-cli") is None:
        reason = "redis-server/redis-cli are not on PATH (apt-get install redis-server) "
        if os.environ.get("CI"):
            pytest.fail(reason + "and CI is set: the Redis storage tests must run in CI")
        pytest.skip(reason + "so the Redis storage tests cannot run")
    return found


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    With ``cluster_bus``, port + 10000 is free too (a cluster node's bus port), so the port is <= 55535.
    """
    while True:
        port = random.randint(20000, 55535)
        if _bindable(port) and (not cluster_bus or _bindable(port + 10000)):
            return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` child process on 127.0.0.1, stoppable and restartable on the same port."""

    def __init__(self, port: int | None = None, *, extra_args: tuple[str, ...] = ()) -> None:
        self.executable = require_redis_server()
        self.port = port or free_port(cluster_bus="--cluster-enabled" in extra_args)
        self.extra_args = extra_args
        self.dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> Path:
        """Where the server also listens as a unix socket (``unix://`` URLs)."""
        return self.dir / "redis.sock"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        args = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--loglevel", "warning",
            "--unixsocket", str(self.socket_path), "--unixsocketperm", "700", *self.extra_args,
        ]  # fmt: skip
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - the child keeps it open
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + _READY_TIMEOUT
        while not _ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING: {self.log_tail()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM to its own PID, SIGKILL if it lingers) and wait for its exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused server could not handle SIGTERM
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts no bytes, so clients hit their socket timeouts."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop, then start again on the same port (an outage the client must survive)."""
        self.stop()
        self.start()

    def cli(self, *args: str) -> str:
        """Run ``redis-cli -p <port> <args>`` and return its output."""
        return subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            check=True, capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip

    def log_tail(self) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """Three cluster-enabled primaries on 127.0.0.1 joined with ``redis-cli --cluster create``."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [
            RedisServer(extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                    "--cluster-node-timeout", "2000"))
            for _ in range(size)
        ]  # fmt: skip

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<first port>`` (the storage discovers the other nodes)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisCluster:
        """Start every node, create the cluster and wait until every node reports ``cluster_state:ok``."""
        try:
            self._start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not all("cluster_state:ok" in node.cli("cluster", "info") for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis cluster did not reach cluster_state:ok within 20 s")
            time.sleep(0.05)

    def cleanup(self) -> None:
        """Stop every node and remove their directories."""
        for node in self.nodes:
            node.cleanup()
