"""``httpx-upstream-auth demo``: many concurrent callers across several token expiries.

It starts the local provider (rotation on every refresh, reuse revokes the grant) with short-lived
tokens, logs a user in once, then runs worker processes of concurrent tasks that call the API through
``manager.auth(...)`` while the tokens expire again and again. A live line shows requests per second,
refreshes, reused refresh tokens, failed requests and the time to the next expiry (rewritten in place on
a terminal, a plain line a second otherwise); the summary table counts what matters: every request
succeeded, one refresh per expiry, no refresh token ever presented twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TextIO

import anyio
import httpx

from ._cli_config import OneLineParser, UsageError
from ._exceptions import StorageError
from ._manager import TokenManager
from ._models import EntryKey
from ._refresher import OAuth2Refresher
from ._storages import open_storage
from .testing import LocalProvider, ServerThread

SESSION = "demo-session"
#: Seconds each demo caller waits between its requests.
PAUSE = 0.05
PROVIDER = "local"
#: How often a worker process reports its counts, and the display refreshes on a terminal (seconds).
TICK = 0.25
#: The environment variable a worker process reads the store URL from (never its argv).
STORAGE_ENV = "HTTPX_UPSTREAM_AUTH_DEMO_STORAGE"


def make_manager(storage: str, base_url: str) -> TokenManager:
    """The manager every demo worker builds: same storage, same provider."""
    refresher = OAuth2Refresher(base_url + "/token", "test-client", "test-secret")
    return TokenManager(storage=open_storage(storage), refresher=refresher, provider_id=PROVIDER)


async def run_worker(
    manager: TokenManager,
    base_url: str,
    seconds: float,
    tasks: int,
    session_id: str = SESSION,
    pause: float = 0.02,
    progress: dict[str, int] | None = None,
) -> dict[str, Any]:
    """``tasks`` concurrent callers of ``GET /api/me`` for ``seconds``, each pausing ``pause`` s between calls.

    Returns counts (``ok``, ``failed``, ``errors`` by name), latencies in ms, and wall-clock start and end;
    ``progress`` (when given) holds the running ``ok`` and ``failed`` counts meanwhile.
    """
    counts = {"ok": 0, "failed": 0} if progress is None else progress
    counts.update(ok=0, failed=0)
    errors: dict[str, int] = {}
    latencies: list[float] = []

    async def caller(client: httpx.AsyncClient, end: float) -> None:
        while time.monotonic() < end:
            start = time.perf_counter()
            try:
                response = await client.get(base_url + "/api/me")
            except Exception as exc:  # a failed request is counted and named, never hidden
                counts["failed"] += 1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            else:
                latencies.append((time.perf_counter() - start) * 1000)
                if response.status_code == 200:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    name = f"HTTP {response.status_code}"
                    errors[name] = errors.get(name, 0) + 1
            await anyio.sleep(pause)

    limits = httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks)
    auth = manager.auth(session_id)
    async with httpx.AsyncClient(auth=auth, limits=limits) as client, anyio.create_task_group() as tg:
        # The clock starts once the client is made (its TLS context alone can take a second on a busy machine):
        # the callers get their ``seconds`` in full.
        started, end = time.time(), time.monotonic() + seconds
        for _ in range(tasks):
            tg.start_soon(caller, client, end)
    return {
        "ok": counts["ok"],
        "failed": counts["failed"],
        "errors": errors,
        "latencies": latencies,
        "started": started,
        "ended": time.time(),
    }


def masked(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, fit to print."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def worker_main(argv: list[str]) -> int:
    """Entry of one demo worker process: prints its counts as JSON lines while it runs, then its result."""
    # The store URL comes through the environment: argv is visible to every user of the machine, and the URL
    # may carry a password.
    storage = os.environ.get(STORAGE_ENV)
    try:
        if storage is None or len(argv) != 4:
            raise ValueError
        base_url, seconds, tasks, start = argv[0], float(argv[1]), int(argv[2]), float(argv[3])
    except ValueError:
        raise UsageError("demo-worker is one of the demo's worker processes: run `httpx-upstream-auth demo`") from None
    # The parent handles Ctrl-C (the terminal sends it to the whole group) and ends its workers with SIGTERM:
    # a worker then exits at once and says nothing (the demo's store is the parent's to tidy).
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    previous.update({signum: signal.signal(signum, _quit) for signum in _STOP_SIGNALS})
    try:
        return _work(storage, base_url, seconds, tasks, start)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _work(storage: str, base_url: str, seconds: float, tasks: int, start: float) -> int:
    manager = make_manager(storage, base_url)
    time.sleep(max(start - time.time(), 0.0))  # every worker starts calling at once, after its imports
    progress = {"ok": 0, "failed": 0}
    done = threading.Event()

    def report() -> None:
        while not done.wait(TICK):
            print(json.dumps({"progress": dict(progress)}), flush=True)

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    result = anyio.run(run_worker, manager, base_url, seconds, tasks, SESSION, PAUSE, progress)
    done.set()
    reporter.join()
    manager.close()
    print(json.dumps({"result": result}), flush=True)
    return 0


def _bounded(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            number = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {number}, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}, not {text}")
        return value

    return parse


DESCRIPTION = """\
Many concurrent callers across several token expiries: the local provider (rotation on every refresh, a
reused refresh token revokes the grant) with short-lived tokens, one login, then worker processes of
concurrent tasks calling its API through manager.auth(...) on one store. A live line shows requests per
second, refreshes, reused refresh tokens, failed requests and the time to the next expiry; the summary
table counts what matters: every request succeeded, no refresh token presented twice."""

EPILOG = """\
exit status:
  0  every request succeeded and no refresh token was presented twice
  1  a request failed, or a refresh token was presented twice
  2  a flag out of range, a store it cannot open, a missing extra (the testing extra's uvicorn)
  4  the store is unreachable: retry later
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The demo's flags, each checked (a value out of range is a usage error, status 2)."""
    parser = OneLineParser(
        prog="httpx-upstream-auth demo",
        description=DESCRIPTION,
        epilog=EPILOG,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--storage",
        metavar="STORE",
        default="sqlite",
        help="sqlite (the default: a temporary file), sqlite:PATH, memory (one process), or a redis:// URL",
    )
    parser.add_argument(
        "--processes", metavar="N", type=_bounded(int, 1, 16), default=2, help="worker processes, 1 to 16 (default 2)"
    )
    parser.add_argument(
        "--tasks",
        metavar="N",
        type=_bounded(int, 1, 500),
        default=25,
        help="callers per process, 1 to 500 (default 25)",
    )
    parser.add_argument(
        "--seconds",
        metavar="S",
        type=_bounded(float, 0.5, 120),
        default=8.0,
        help="how long the callers run, 0.5 to 120 (default 8)",
    )
    parser.add_argument(
        "--token-ttl",
        metavar="S",
        type=_bounded(float, 0.5, 60),
        default=2.0,
        help="the access tokens' lifetime in seconds, 0.5 to 60 (default 2)",
    )
    return parser.parse_args(argv)


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _quit(signum: int, frame: object) -> None:
    """End this worker at once, quietly: its parent was interrupted, or is gone."""
    os._exit(128 + signum)


def main(argv: list[str]) -> int:
    """Run the demo and print its summary; exit status 1 if any request failed or a token was reused."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        storage = "sqlite:" + os.path.join(tmp, "tokens.db") if args.storage == "sqlite" else args.storage
        # memory, memory:, memory://: one process's store (workers of their own would each see an empty one)
        processes = 1 if storage.split(":", 1)[0] == "memory" else args.processes
        provider = LocalProvider(access_ttl=args.token_ttl)
        try:
            server = ServerThread(provider).start()
        except ImportError as exc:  # uvicorn is an optional extra: the message names it
            raise UsageError(str(exc)) from None
        try:
            try:
                manager = make_manager(storage, server.url)
            except (ValueError, StorageError) as exc:  # the messages never repeat the URL
                raise UsageError(f"--storage: {exc}") from None
            except ImportError as exc:
                raise UsageError(str(exc)) from None
            manager.store(SESSION, provider.login(sub="alice", client_id="test-client", provider_id=PROVIDER))
            print(
                f"demo: {processes} process(es) x {args.tasks} tasks for {args.seconds:g} s, "
                f"{args.token_ttl:g}-second tokens, storage {masked(args.storage)}",
                flush=True,
            )
            display = Display(sys.stdout, lambda: provider.stats, manager)
            if processes == 1:
                results = _run_here(manager, server.url, args, display)
            else:
                results = _run_processes(storage, server.url, args, processes, display)
            manager.close()
            stats = provider.stats
        finally:
            server.stop()
    return print_summary(results, stats, args.token_ttl)


class Display:
    """The live line: requests/s, refreshes, reused refresh tokens, failures, time to the next expiry.

    On a terminal it is rewritten in place every :data:`TICK`; otherwise a plain line is printed every second.
    """

    def __init__(self, out: TextIO, stats: Callable[[], dict[str, int]], manager: TokenManager) -> None:
        self.out = out
        self.live = out.isatty()
        self._stats = stats
        self._manager = manager
        self._last = (time.monotonic(), 0)
        self.lines = 0

    def show(self, ok: int, failed: int) -> None:
        """Print the line for these counts."""
        stats = self._stats()
        now = time.monotonic()
        since, before = self._last
        rate = (ok + failed - before) / max(now - since, 1e-9)
        self._last = (now, ok + failed)
        entry = self._manager.storage.get(EntryKey(PROVIDER, SESSION))
        left = None if entry is None or entry.expires_at is None else entry.expires_at - time.time()
        expiry = "-" if left is None else f"{left:.1f} s" if left > 0 else "now"
        line = (
            f"{ok + failed:7d} requests  {rate:6.0f}/s  refreshes {stats['refresh_ok']:3d}  "
            f"reused {stats['refresh_reuse']}  failed {failed}  next expiry in {expiry}"
        )
        self.lines += 1
        if self.live:
            self.out.write("\r\033[K" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def finish(self) -> None:
        """End the live line."""
        if self.live and self.lines:
            self.out.write("\n")
            self.out.flush()

    def follow(self, running: Callable[[], bool], counts: Callable[[], tuple[int, int]]) -> None:
        """Show the line until ``running()`` is false."""
        interval = TICK if self.live else 1.0
        next_at = time.monotonic() + interval
        while running():
            time.sleep(min(TICK / 5, max(next_at - time.monotonic(), 0.0)))
            if time.monotonic() >= next_at:
                self.show(*counts())
                next_at += interval
        self.finish()


def _run_here(manager: TokenManager, url: str, args: argparse.Namespace, display: Display) -> list[dict[str, Any]]:
    """One process: the callers on an event loop in a thread, the display in this one."""
    progress = {"ok": 0, "failed": 0}
    results: list[dict[str, Any]] = []
    thread = threading.Thread(
        target=lambda: results.append(
            anyio.run(run_worker, manager, url, args.seconds, args.tasks, SESSION, PAUSE, progress)
        )
    )
    thread.start()
    display.follow(thread.is_alive, lambda: (progress["ok"], progress["failed"]))
    thread.join()
    return results


def _run_processes(
    storage: str, url: str, args: argparse.Namespace, processes: int, display: Display
) -> list[dict[str, Any]]:
    start = time.time() + 2.0
    command = [
        sys.executable, "-m", "httpx_upstream_auth", "demo-worker", url, str(args.seconds), str(args.tasks), str(start),
    ]  # fmt: skip
    environ = {**os.environ, STORAGE_ENV: storage}
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=environ) for _ in range(processes)]
    latest = [{"ok": 0, "failed": 0} for _ in procs]
    results: list[dict[str, Any] | None] = [None] * len(procs)

    def read(index: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                message = json.loads(line)
                if "progress" in message:
                    latest[index] = message["progress"]
                else:
                    results[index] = message["result"]
                    latest[index] = {"ok": message["result"]["ok"], "failed": message["result"]["failed"]}

    try:
        readers = [threading.Thread(target=read, args=(i, p), daemon=True) for i, p in enumerate(procs)]
        for reader in readers:
            reader.start()
        display.follow(
            lambda: any(reader.is_alive() for reader in readers),
            lambda: (sum(x["ok"] for x in latest), sum(x["failed"] for x in latest)),
        )
        for proc in procs:
            if proc.wait(timeout=args.seconds + 60) != 0:  # pragma: no cover - a crashed worker (a bug, a kill)
                raise SystemExit(f"a demo worker exited with status {proc.returncode}")
    finally:  # interrupted (Ctrl-C, SIGTERM): the workers end with the demo, not after it
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait()
    return [result for result in results if result is not None]


def print_summary(results: list[dict[str, Any]], stats: dict[str, int], token_ttl: float) -> int:
    """Print the summary table of the workers' ``results`` and the provider's ``stats``; 0 when every request
    succeeded and no refresh token was presented twice, else 1."""
    ok = sum(r["ok"] for r in results)
    failed = sum(r["failed"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
    expiries = math.ceil(elapsed / token_ttl)
    p50 = statistics.median(latencies) if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
    errors: dict[str, int] = {}
    for r in results:
        for name, count in r["errors"].items():
            errors[name] = errors.get(name, 0) + count
    healthy = failed == 0 and stats["refresh_reuse"] == 0 and ok > 0
    rows = [
        ("requests", f"{ok + failed} ({ok} ok, {failed} failed), {(ok + failed) / max(elapsed, 1e-9):.0f}/s"),
        ("refreshes", f"{stats['refresh_ok']} for about {expiries} token lifetimes"),
        ("reused refresh tokens", str(stats["refresh_reuse"])),
        ("invalid_grant", str(stats["invalid_grant"])),
        ("replays after a 401", str(stats["api_401"])),
        ("latency", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"),
        *([("errors", ", ".join(f"{name}: {count}" for name, count in sorted(errors.items())))] if errors else []),
        ("result", "OK: the callers never saw an expiry" if healthy else "FAILED"),
    ]
    left = max(len(name) for name, _ in rows)
    right = max(len(value) for _, value in rows)
    rule = f"+-{'-' * left}-+-{'-' * right}-+"
    print(rule)
    for name, value in rows:
        print(f"| {name:<{left}} | {value:<{right}} |")
    print(rule)
    return 0 if healthy else 1
