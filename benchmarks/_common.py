"""Shared helpers of the benchmarks: servers in subprocesses, storages, interleaved rounds, statistics.

The benchmarks import this module by name (``python benchmarks/bench_*.py`` puts this folder on
``sys.path``). It is also the entry point of the server subprocess::

    python benchmarks/_common.py serve bearer      # any Bearer token is accepted: pure client overhead
    python benchmarks/_common.py serve provider    # LocalProvider plus /_bench/ control routes

Every server listens on 127.0.0.1 only and is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import httpx

import httpx_upstream_auth as hua
from httpx_upstream_auth.testing import LocalProvider
from httpx_upstream_auth.testing._provider import Message, Receive, Scope, Send

__all__ = [
    "COUNT_VIOLATION_EXIT",
    "LOOPBACK",
    "CountViolation",
    "RedisServer",
    "Rounds",
    "ServerProcess",
    "Step",
    "StorageFactory",
    "Summary",
    "Variant",
    "add_common_arguments",
    "alternate",
    "count_violations_exit",
    "interleave",
    "machine_description",
    "per_call",
    "percentile",
    "pin_cpus",
    "print_table",
    "select_storages",
    "write_json",
]

LOOPBACK = "127.0.0.1"
T = TypeVar("T")
#: Exit status of a benchmark whose counts (refreshes, non-200 answers) were wrong: a bug, not noise.
COUNT_VIOLATION_EXIT = 3
_READY_TIMEOUT = 15.0


class CountViolation(Exception):
    """A count the library guarantees (one refresh per expiry, every request answered 200) was wrong."""


# -- statistics --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Median, p99 and spread of a set of samples (all in the samples' unit)."""

    n: int
    median: float
    p99: float
    mean: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        """Summarize ``samples`` (at least one)."""
        return cls(
            n=len(samples),
            median=statistics.median(samples),
            p99=percentile(samples, 99),
            mean=statistics.fmean(samples),
            min=min(samples),
            max=max(samples),
        )

    def scaled(self, factor: float) -> Summary:
        """The same summary in another unit (e.g. ``1e6`` for seconds to microseconds)."""
        return Summary(
            self.n,
            self.median * factor,
            self.p99 * factor,
            self.mean * factor,
            self.min * factor,
            self.max * factor,
        )

    def as_dict(self) -> dict[str, float]:
        """A JSON-ready dict."""
        return asdict(self)


def per_call(func: Callable[[], object], repeat: int = 7, min_time: float = 0.2) -> Summary:
    """Seconds per call of ``func``, over ``repeat`` timeit runs of at least ``min_time`` seconds each.

    The loop count is picked once (as ``timeit.Timer.autorange`` does, but to ``min_time``), then each
    run gives one sample: total time / loops. Report the median; the minimum is the least disturbed run.
    """
    timer = timeit.Timer(func)
    number = 1
    while True:
        if timer.timeit(number) >= min_time:
            break
        number *= 2 if number < 8 else 4
    return Summary.of([timer.timeit(number) / number for _ in range(repeat)])


# -- interleaved rounds ------------------------------------------------------------------------------


class Variant(Protocol):
    """One thing to measure in rounds: ``run`` sends requests for about ``seconds`` and returns the
    latency of each one that completed, in seconds."""

    name: str

    def run(self, seconds: float) -> list[float]:
        """Send requests for ``seconds``; return each completed request's latency."""
        ...


@dataclass
class Rounds:
    """What :func:`interleave` measured, per variant name."""

    rates: dict[str, list[float]]
    """Requests per second, one sample per round."""
    latencies: dict[str, list[float]]
    """Every request's latency in seconds, all rounds pooled."""
    cpu: dict[str, list[float]]
    """This process's CPU seconds per request, one sample per round: the client's own work, which the
    server (another process) and other load on the machine barely change."""

    def ratio(self, name: str, baseline: str) -> dict[str, float]:
        """How ``name`` compares with ``baseline`` (1.0 = as fast; below 1 = slower).

        ``rps``: median rate over median rate. ``paired``: median over rounds of the rate ratio of the two
        variants' runs in the same round (robust to drift between rounds). ``latency``: median latency of
        ``baseline`` over that of ``name`` (robust to stalls inside a round, which hit the mean rate).
        ``cpu``: median client CPU per request of ``baseline`` over that of ``name`` (robust to other
        processes competing for the CPUs, which stretch wall time but not this process's CPU time).
        """
        rates, base = self.rates[name], self.rates[baseline]
        paired = [mine / theirs for mine, theirs in zip(rates, base, strict=True)]
        return {
            "rps": statistics.median(rates) / statistics.median(base),
            "paired": statistics.median(paired),
            "paired_min": min(paired),
            "paired_max": max(paired),
            "latency": statistics.median(self.latencies[baseline]) / statistics.median(self.latencies[name]),
            "cpu": statistics.median(self.cpu[baseline]) / statistics.median(self.cpu[name]),
        }


def round_order(variants: Sequence[T], index: int) -> list[T]:
    """The order of round ``index``: rotated by one each round, reversed every other cycle.

    So each variant runs in each position (first, middle, last) equally often and after each of the
    others, and no variant carries a position effect (say, always running right after a slow one).
    """
    shift = index % len(variants)
    order = [*variants[shift:], *variants[:shift]]
    return order if (index // len(variants)) % 2 == 0 else order[::-1]


class Step(Protocol):
    """Something that sends one request at a time: ``once`` sends it and returns its latency."""

    name: str

    def once(self) -> float:
        """Send one request; return its latency in seconds."""
        ...


def alternate(variants: Sequence[Step], *, seconds: float) -> dict[str, list[float]]:
    """Latencies of single requests with the variants alternating request by request, for ``seconds``.

    The finest interleaving there is: consecutive requests of different variants see the same machine,
    so the medians compare the variants' own costs to within about a microsecond even when the
    machine's speed wanders by tens of percent between rounds. Only for sequential (sync) senders:
    concurrent requests would share their costs between variants.
    """
    latencies: dict[str, list[float]] = {variant.name: [] for variant in variants}
    deadline = time.perf_counter() + seconds
    index = 0
    while time.perf_counter() < deadline:
        for variant in round_order(variants, index):
            latencies[variant.name].append(variant.once())
        index += 1
    return latencies


def interleave(variants: Sequence[Variant], *, rounds: int, seconds: float, warmup: float = 0.5) -> Rounds:
    """Run each variant for ``rounds`` rounds of ``seconds``, the variants interleaved.

    Every round runs every variant once, in the order :func:`round_order` gives, so a drift in machine
    speed (thermal, a neighbour's load, the server's GC) affects every variant alike. One untimed
    ``warmup`` pass per variant opens connections and fills caches; before each run, a full garbage
    collection clears the previous variant's garbage, so each pays for its own.
    """
    for variant in variants:
        variant.run(warmup)
    names = [variant.name for variant in variants]
    result = Rounds({n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names})
    for index in range(rounds):
        for variant in round_order(variants, index):
            gc.collect()
            started, cpu_started = time.perf_counter(), time.process_time()
            latencies = variant.run(seconds)
            cpu, elapsed = time.process_time() - cpu_started, time.perf_counter() - started
            result.rates[variant.name].append(len(latencies) / elapsed)
            result.cpu[variant.name].append(cpu / max(len(latencies), 1))
            result.latencies[variant.name].extend(latencies)
    return result


# -- ASGI apps served by the subprocess --------------------------------------------------------------

_JSON_HEADERS = [(b"content-type", b"application/json")]
_CHALLENGE = [*_JSON_HEADERS, (b"www-authenticate", b'Bearer error="invalid_token"')]


async def _reply(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = _JSON_HEADERS) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return b"".join(chunks)


async def bearer_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A resource server that accepts any ``Bearer`` token: 200 with a small JSON body, else a 401.

    It does the same tiny amount of work for every request, so a throughput difference between two
    clients talking to it is the clients' own overhead.
    """
    if scope["type"] != "http":
        return
    await _drain(receive)
    if scope["path"] == "/health":
        await _reply(send, 200, b"{}")
        return
    for name, value in scope["headers"]:
        if name == b"authorization" and value[:7].lower() == b"bearer " and len(value) > 7:
            await _reply(send, 200, b'{"sub":"bench"}')
            return
    await _reply(send, 401, b'{"error":"invalid_token"}', _CHALLENGE)


class ControlledProvider:
    """:class:`LocalProvider` plus routes a benchmark in another process uses to drive it.

    ``POST /_bench/login`` (a new grant; the tokens as JSON; ``?ttl=`` sets its access tokens' lifetime,
    ``&then=`` that of the tokens its refreshes issue),
    ``GET /_bench/stats`` (the counters, the interactive-login ones included), ``POST /_bench/revoke``
    (body: an access token the API must reject from now on), ``POST /_bench/ttl`` (body: the lifetime of
    access tokens issued by interactive logins from now on), ``GET /_bench/issued`` (each access token
    the token endpoint issued, with the system-wide monotonic time its answer was sent), ``GET /health``.
    """

    def __init__(self, provider: LocalProvider) -> None:
        self.provider = provider
        self.issued: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 entry point."""
        path = scope.get("path", "")
        if scope["type"] == "http" and path == "/token":
            await self.provider(scope, receive, self._recording(send))
            return
        if scope["type"] != "http" or not (path == "/health" or path.startswith("/_bench/")):
            await self.provider(scope, receive, send)
            return
        body = await _drain(receive)
        if path == "/health":
            await _reply(send, 200, b"{}")
        elif path == "/_bench/login":
            query = dict(item.split("=", 1) for item in scope["query_string"].decode().split("&") if "=" in item)
            ttl = float(query["ttl"]) if "ttl" in query else None
            tokens = self.provider.login(provider_id="local", access_ttl=ttl)
            if "then" in query:
                # The first access token lives ``ttl``, the refreshed ones ``then``: an hour-long token that
                # has just expired, without the hour. (The grant's lifetime is private state of our own
                # test provider: the benchmark may set it.)
                grant = self.provider._grants[self.provider.grant_of(tokens.access_token)]
                grant.access_ttl = float(query["then"])
            await _reply(send, 200, tokens.to_json().encode())
        elif path == "/_bench/stats":
            await _reply(send, 200, json.dumps({**self.provider.stats, **self.provider.flow_stats}).encode())
        elif path == "/_bench/revoke":
            self.provider.revoke_access(body.decode())
            await _reply(send, 200, b"{}")
        elif path == "/_bench/ttl":
            self.provider.access_ttl = float(body.decode())
            await _reply(send, 200, b"{}")
        elif path == "/_bench/issued":
            await _reply(send, 200, json.dumps(self.issued).encode())
        else:
            await _reply(send, 404, b'{"error":"not_found"}')

    def _recording(self, send: Send) -> Send:
        """``send``, noting the access token of a token answer and when it was sent (``time.monotonic()``, which
        is one clock for every process on Linux, so a client can tell how long it took to use the token)."""

        async def recording(message: Message) -> None:
            if message["type"] == "http.response.body":
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    token = json.loads(message.get("body", b"")).get("access_token")
                    if isinstance(token, str):
                        if len(self.issued) >= 100_000:
                            self.issued.clear()
                        self.issued[token] = time.monotonic()
            await send(message)

        return recording


def _serve_main(argv: Sequence[str]) -> None:
    """Entry point of the server subprocess: bind a free loopback port, print it, serve until SIGTERM."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="_common.py serve")
    parser.add_argument("app", choices=["bearer", "provider"])
    args = parser.parse_args(argv)
    app: Any = bearer_app if args.app == "bearer" else ControlledProvider(LocalProvider(token_delay=0.0))
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it Nagle's algorithm meets delayed ACKs and every response waits ~40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        interface="asgi3",
        backlog=2048,
        limit_concurrency=4096,
        timeout_keep_alive=60,
    )
    uvicorn.Server(config).run(sockets=[sock])


# -- child processes ---------------------------------------------------------------------------------


#: CPUs for servers we start, set by :func:`pin_cpus` (``None``: no pinning).
_server_cpus: set[int] | None = None


def _spawn(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a child process, pinned to the server CPUs when :func:`pin_cpus` pinned this one."""
    cpus = _server_cpus
    if cpus:
        kwargs["preexec_fn"] = lambda: os.sched_setaffinity(0, cpus)  # before exec: every thread inherits it
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, **kwargs)


def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """Stop one child we started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


class ServerProcess:
    """One of this module's ASGI apps under uvicorn in a child process, on a free 127.0.0.1 port.

    A separate process keeps the server off the benchmark's interpreter (its GIL and its event loop), so
    the server's work does not slow the client being measured.
    """

    def __init__(self, app: str) -> None:
        self.app = app
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> ServerProcess:
        """Start the child and wait until it answers ``GET /health``."""
        command = [sys.executable, str(Path(__file__).resolve()), "serve", self.app]
        self.process = _spawn(command, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the {self.app} server did not start (said {line!r})")
        self.port = int(line.split()[1])
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {self.app} server on port {self.port} did not become ready")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the child (by PID)."""
        _stop(self.process)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A throwaway ``redis-server`` on a free 127.0.0.1 port, keeping nothing on disk."""

    def __init__(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.executable = executable
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        command = [self.executable, "--port", str(self.port), "--save", "", "--appendonly", "no",
                   "--bind", LOOPBACK, "--loglevel", "warning"]  # fmt: skip
        self.process = _spawn(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _READY_TIMEOUT
        while not self._ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop the server (by PID)."""
        _stop(self.process)


# -- storages ----------------------------------------------------------------------------------------

#: Makes a fresh storage; whatever it starts (a file, a server) is closed by the given stack.
StorageFactory = Callable[[contextlib.ExitStack], hua.Storage]


def _memory(stack: contextlib.ExitStack) -> hua.Storage:
    return hua.MemoryStorage()


def _sqlite(stack: contextlib.ExitStack) -> hua.Storage:
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="hua-bench-"))
    storage: hua.Storage = hua.SQLiteStorage(Path(folder) / "tokens.db")
    stack.callback(storage.close)
    return storage


def _redis(stack: contextlib.ExitStack) -> hua.Storage:
    server = RedisServer().start()
    stack.callback(server.stop)
    storage: hua.Storage = hua.RedisStorage.from_url(server.url)
    stack.callback(storage.close)
    return storage


def available_storages() -> dict[str, StorageFactory]:
    """The storages this installation has, by ``--storages`` name."""
    found: dict[str, StorageFactory] = {"memory": _memory}
    if hasattr(hua, "SQLiteStorage"):
        found["sqlite"] = _sqlite
    if hasattr(hua, "RedisStorage") and shutil.which("redis-server"):
        found["redis"] = _redis
    return found


def select_storages(spec: str) -> list[tuple[str, StorageFactory]]:
    """The storages named in ``spec`` (comma-separated) that exist here; a note for each that does not."""
    available = available_storages()
    chosen = []
    for name in (part.strip() for part in spec.split(",") if part.strip()):
        if name in available:
            chosen.append((name, available[name]))
        else:
            print(f"note: storage {name!r} skipped: not available here (have: {', '.join(available)})")
    if not chosen:
        raise SystemExit("no storage to benchmark")
    return chosen


# -- command line and output -------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--storages``, ``--json`` and ``--pin``/``--no-pin``, shared by every benchmark."""
    parser.add_argument("--storages", default="memory", help="comma-separated: memory,sqlite,redis")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="pin the benchmark to its first CPU and the servers to the others (default: off)",
    )


def pin_cpus(enabled: bool) -> str:
    """Pin this process to its first CPU and the servers started later to the others; describe the result.

    On a 2-core machine this gives the client being measured a core of its own, so the server's work
    never competes with it for time.
    """
    global _server_cpus
    if not enabled or not hasattr(os, "sched_getaffinity"):
        return "not pinned"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned (1 CPU)"
    os.sched_setaffinity(0, {cpus[0]})
    _server_cpus = set(cpus[1:])
    return f"benchmark on CPU {cpus[0]}, servers on CPU {','.join(map(str, cpus[1:]))}"


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on."""
    import httpx as httpx_module

    try:
        import httpx2

        httpx2_version: str | None = httpx2.__version__
    except ImportError:
        httpx2_version = None
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "httpx": httpx_module.__version__,
        "httpx2": httpx2_version,
        "httpx_upstream_auth": hua.__version__,
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows as an aligned plain-text table (numbers right-aligned)."""
    text = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in text)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row, values in zip(text, rows, strict=True):
        cells = [
            cell.rjust(w) if isinstance(value, int | float) else cell.ljust(w)
            for cell, value, w in zip(row, values, widths, strict=True)
        ]
        print("  ".join(cells).rstrip())


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_json(path: Path | None, data: Mapping[str, Any]) -> None:
    """Write ``data`` (plus the machine description) to ``path`` when given."""
    if path is None:
        return
    path.write_text(json.dumps({"machine": machine_description(), **data}, indent=2) + "\n")
    print(f"results written to {path}")


@contextlib.contextmanager
def count_violations_exit() -> Iterator[None]:
    """Turn a :class:`CountViolation` into a message and exit status :data:`COUNT_VIOLATION_EXIT`.

    Also makes SIGTERM exit through the ``with`` blocks, so the servers this process started are stopped.
    """
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    except CountViolation as exc:
        print(f"COUNT VIOLATION: {exc}", file=sys.stderr)
        raise SystemExit(COUNT_VIOLATION_EXIT) from None


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        raise SystemExit("usage: python benchmarks/_common.py serve {bearer,provider}")
    _serve_main(sys.argv[2:])
