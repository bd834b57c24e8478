"""Us side by side with the libraries people use today, in ten scenarios, in one run and one table.

    python benchmarks/compare.py --short     # CI: 2 to 3 minutes; prints the table, writes benchmarks/results/
    python benchmarks/compare.py --full      # writes docs/benchmark-results.md (table, machine, command, versions)
        [--scenarios 1,2,...] [--no-venv] [--out FILE]

Every scenario runs against the local provider (``httpx_upstream_auth.testing.LocalProvider``: rotation on
every refresh, a consumed refresh token presented again revokes the grant, exact counters) served by
uvicorn in a child process. The peers (Authlib's httpx clients, the MCP SDK's ``OAuthClientProvider``,
httpx-auth, hand-written refresh-on-401 code; see ``_stacks.py``) are driven through their own public APIs
at their defaults, plus a labelled tuned setting where a default is plainly unsafe for the scenario. They
live in a separate environment, ``.venv/bench``, which this script builds once from
``benchmarks/requirements-peers.txt`` and re-runs itself in (``--no-venv``: use this interpreter as it is).

Ratios are against the *same* client package (httpx or httpx2) sending a static Bearer header in the same
run: httpx's async client is several times slower than httpx2's at concurrency 50, so one ratio against
"plain httpx" would mostly measure the transport.

Exit status: 0 when every correctness figure of ours is right (refresh counts, reuse, failed requests,
logins, in every scenario); 3 when one is wrong. Timings and peers' figures never change the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_VENV = ROOT / ".venv" / "bench"
REQUIREMENTS = HERE / "requirements-peers.txt"
RESULTS = HERE / "results"
#: The one file of benchmark figures the docs quote: docs/benchmarks.md includes it, tests/test_benchmark_numbers.py
#: checks every quote against it. Written whole by a full run of every scenario.
DOCS_RESULTS = ROOT / "docs" / "benchmark-results.md"
RESULTS_HEADER = "<!-- Written by benchmarks/compare.py --full: do not edit. docs/benchmarks.md includes it. -->"
COUNT_VIOLATION_EXIT = 3


# -- the benchmark environment -------------------------------------------------------------------------


def _environment_stamp() -> str:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + (ROOT / "pyproject.toml").read_bytes())
    return digest.hexdigest()[:16]


def ensure_environment(argv: Sequence[str]) -> None:
    """Re-run this script in ``.venv/bench``, building it first (once per requirements/pyproject change)."""
    python = BENCH_VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == BENCH_VENV.resolve():
        return
    stamp_file = BENCH_VENV / "stamp"
    stamp = _environment_stamp()
    if not python.exists() or not stamp_file.exists() or stamp_file.read_text() != stamp:
        started = time.perf_counter()
        print(f"building the benchmark environment {BENCH_VENV.relative_to(ROOT)} (peers: {REQUIREMENTS.name})")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(BENCH_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-e", f"{ROOT}[redis,testing]", "-r", str(REQUIREMENTS)], check=True, cwd=ROOT)
        stamp_file.write_text(stamp)
        print(f"built in {time.perf_counter() - started:.0f} s")
    sys.stdout.flush()
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *argv])


# -- imports that need the benchmark environment (done after ensure_environment) -----------------------

common: Any = None
stacks: Any = None
hua: Any = None
httpx: Any = None


def _import_benchmark_modules() -> None:
    global common, stacks, hua, httpx
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import _common
    import _stacks
    import httpx as httpx_module

    import httpx_upstream_auth

    common, stacks, hua, httpx = _common, _stacks, httpx_upstream_auth, httpx_module


# -- settings ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How long and how big each scenario runs (``--short`` for CI, ``--full`` for the docs page)."""

    mode: str
    overhead_requests: int
    overhead_rounds: int
    cpu_requests: int
    cpu_rounds: int
    herd_trials: int
    sustained_seconds: float
    process_seconds: float
    latency_requests: int
    latency_rounds: int
    latency_cap: float
    boundary_seconds: float
    scale_sessions: tuple[int, ...]
    scale_requests: int
    mcp_seconds: float
    peers: frozenset[str]
    """The scenarios the peers run in (all of them in ours)."""


# -- results -------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    scenario: str
    library: str
    client: str
    requests: int | str = 0
    failed: int | str = 0
    refreshes: int | str = 0
    reused: int | str = 0
    logins: int | str = 0
    figures: str = ""
    check: str = ""
    """Ours: ``ok`` or what was wrong; a peer: ``peer``."""
    data: dict[str, Any] = field(default_factory=dict)


SCENARIOS = {
    "1": "overhead",
    "2": "expiry herd",
    "3": "401 herd",
    "4": "sustained expiry",
    "5": "threads",
    "6": "processes",
    "7": "server latency 20 ms",
    "8": "expiry boundary",
    "9": "scale",
    "10": "MCP",
}

SHORT = Settings(
    mode="short",
    overhead_requests=300,
    overhead_rounds=1,
    cpu_requests=300,
    cpu_rounds=1,
    herd_trials=1,
    sustained_seconds=3.0,
    process_seconds=3.0,
    latency_requests=300,
    latency_rounds=1,
    latency_cap=2.0,
    boundary_seconds=5.0,
    scale_sessions=(1, 1_000, 10_000),
    scale_requests=1000,
    mcp_seconds=3.0,
    peers=frozenset({"3", "5"}),
)
FULL = Settings(
    mode="full",
    overhead_requests=5000,
    overhead_rounds=3,
    cpu_requests=3000,
    cpu_rounds=5,
    herd_trials=3,
    sustained_seconds=10.0,
    process_seconds=10.0,
    latency_requests=2000,
    latency_rounds=3,
    latency_cap=20.0,
    boundary_seconds=16.0,
    scale_sessions=(1, 1_000, 100_000),
    scale_requests=20000,
    mcp_seconds=7.0,
    peers=frozenset(SCENARIOS),
)


class Counters:
    """The provider's counters, read through its control routes."""

    KEYS = ("refresh_ok", "refresh_reuse", "invalid_grant", "code_exchanges", "api_ok", "api_401", "token_calls")

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)

    def snapshot(self) -> dict[str, int]:
        """The counters now."""
        data = self.client.get("/_bench/stats").json()
        return {key: int(data.get(key, 0)) for key in self.KEYS}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """What each counter grew by since ``before``."""
        now = self.snapshot()
        return {key: now[key] - before[key] for key in self.KEYS}

    def login(self, ttl: float, then: float | None = None) -> dict[str, Any]:
        """A new grant whose access tokens live ``ttl`` seconds (``then``: those its refreshes issue live
        that long). Interactive logins get ``ttl`` until :meth:`set_ttl` says otherwise."""
        self.set_ttl(ttl)
        query = f"?ttl={ttl}" + (f"&then={then}" if then is not None else "")
        answer: dict[str, Any] = self.client.post("/_bench/login" + query).json()
        return answer

    def set_ttl(self, ttl: float) -> None:
        """The lifetime of access tokens of interactive logins' grants, from now on (refreshes included)."""
        self.client.post("/_bench/ttl", content=str(ttl)).raise_for_status()

    def revoke(self, token: str) -> None:
        """Make the API reject ``token`` from now on."""
        self.client.post("/_bench/revoke", content=token).raise_for_status()

    def issued(self) -> dict[str, float]:
        """Each access token the token endpoint issued, and when (``time.monotonic()``)."""
        answer: dict[str, float] = self.client.get("/_bench/issued").json()
        return answer


def _status_name(exc: BaseException) -> str:
    return type(exc).__name__


@dataclass
class Load:
    """What a batch of requests did: each one's start (monotonic), latency and status (or exception name)."""

    starts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    statuses: list[int | str] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0

    @property
    def failed(self) -> int:
        """Requests that did not end in a 200."""
        return sum(1 for status in self.statuses if status != 200)

    def failure_kinds(self) -> str:
        """``401 x3, ConnectError x1``."""
        kinds: dict[str, int] = {}
        for status in self.statuses:
            if status != 200:
                kinds[str(status)] = kinds.get(str(status), 0) + 1
        return ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))

    def add(self, start: float, status: int | str) -> None:
        """Record one request."""
        self.starts.append(start)
        self.latencies.append(time.monotonic() - start)
        self.statuses.append(status)


async def aload(send: Any, url: str, *, total: int | None, concurrency: int, seconds: float | None) -> Load:
    """``concurrency`` tasks sending until ``total`` requests were sent or ``seconds`` have passed."""
    load = Load()
    remaining = [total if total is not None else math.inf]
    deadline = time.monotonic() + seconds if seconds is not None else math.inf

    async def worker() -> None:
        while remaining[0] > 0 and time.monotonic() < deadline:
            remaining[0] -= 1
            start = time.monotonic()
            try:
                status: int | str = await send(url)
            except Exception as exc:
                status = _status_name(exc)
            load.add(start, status)

    started, cpu = time.monotonic(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.wall, load.cpu = time.monotonic() - started, time.process_time() - cpu
    return load


def tload(send: Any, url: str, *, total: int | None, concurrency: int, seconds: float | None) -> Load:
    """The same with ``concurrency`` threads sharing one sync client."""
    load = Load()
    lock = threading.Lock()
    remaining = [total if total is not None else math.inf]
    deadline = time.monotonic() + seconds if seconds is not None else math.inf

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] <= 0 or time.monotonic() >= deadline:
                    return
                remaining[0] -= 1
            start = time.monotonic()
            try:
                status: int | str = send(url)
            except Exception as exc:
                status = _status_name(exc)
            with lock:
                load.add(start, status)

    started, cpu = time.monotonic(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    load.wall, load.cpu = time.monotonic() - started, time.process_time() - cpu
    return load


async def aherd(send: Any, url: str, callers: int) -> Load:
    """``callers`` tasks released at once, one request each; wall = release to the last answer."""
    load = Load()
    go = asyncio.Event()

    async def caller() -> None:
        await go.wait()
        start = time.monotonic()
        try:
            status: int | str = await send(url)
        except Exception as exc:
            status = _status_name(exc)
        load.add(start, status)

    tasks = [asyncio.create_task(caller()) for _ in range(callers)]
    await asyncio.sleep(0)
    released = time.monotonic()
    go.set()
    await asyncio.gather(*tasks)
    load.wall = time.monotonic() - released
    return load


def therd(send: Any, url: str, callers: int) -> Load:
    """``callers`` threads released at once (a barrier), one request each."""
    load = Load()
    lock = threading.Lock()
    barrier = threading.Barrier(callers + 1)

    def caller() -> None:
        barrier.wait()
        start = time.monotonic()
        try:
            status: int | str = send(url)
        except Exception as exc:
            status = _status_name(exc)
        with lock:
            load.add(start, status)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    released = time.monotonic()
    for thread in threads:
        thread.join()
    load.wall = time.monotonic() - released
    return load


def ms(seconds: float) -> str:
    """Seconds as milliseconds for the table."""
    value = seconds * 1000
    return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def ratio(value: float) -> str:
    """A ratio as the docs quote it: two decimals and a multiplication sign (``0.97`` then U+00D7)."""
    return f"{value:.2f}\N{MULTIPLICATION SIGN}"


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-100), or NaN for no values."""
    return common.percentile(values, q) if values else math.nan


# -- the run -------------------------------------------------------------------------------------------


class Run:
    """One run of the comparison: the provider server, Redis, a scratch folder, and the rows so far."""

    def __init__(self, settings: Settings, stack: contextlib.ExitStack) -> None:
        self.settings = settings
        self.server = stack.enter_context(common.ServerProcess("provider"))
        self.url = self.server.url
        self.counters = Counters(self.url)
        stack.callback(self.counters.client.close)
        self.folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hua-compare-")))
        self.redis_url: str | None = None
        if "redis" in common.available_storages():
            redis = common.RedisServer().start()
            stack.callback(redis.stop)
            self.redis_url = redis.url
        self.rows: list[Row] = []

    def keep(self, number: str, chosen: list[Any]) -> list[Any]:
        """``chosen`` less the peers, unless this mode runs them in scenario ``number``."""
        if number in self.settings.peers:
            return chosen
        return [item for item in chosen if not (item[0] if isinstance(item, tuple) else item).peer]

    def storages(self) -> list[str]:
        """Our storages available here."""
        return ["memory", "sqlite"] + (["redis"] if self.redis_url else [])

    def env(self, ttl: float, shared_file: Path | None = None, then: float | None = None) -> Any:
        """A fresh grant whose access tokens live ``ttl`` seconds (refreshed ones ``then``, if given)."""
        return stacks.Env(
            url=self.url,
            folder=self.folder,
            redis_url=self.redis_url,
            tokens=self.counters.login(ttl, then),
            shared_file=shared_file,
        )

    def add(self, row: Row) -> None:
        """Keep a row and print it as it comes."""
        self.rows.append(row)
        print(
            f"  {row.scenario:<22} {row.library:<38} {row.client:<13} req {row.requests!s:>6} "
            f"failed {row.failed!s:>4} refreshes {row.refreshes!s:>4} reused {row.reused!s:>3} "
            f"logins {row.logins!s:>3}  {row.figures}  [{row.check}]",
            flush=True,
        )


def check(stack: Any, problems: list[str]) -> str:
    """``ok`` / the problems for ours; ``peer`` for the others (never judged)."""
    if stack.peer:
        return "peer"
    if isinstance(stack, stacks.Static) and not problems:
        return "baseline"
    return "ok" if not problems else "FAIL: " + "; ".join(problems)


def expect(problems: list[str], label: str, value: int, low: int, high: int | None = None) -> None:
    """Note a problem unless ``low <= value <= high`` (``high`` defaults to ``low``)."""
    high = low if high is None else high
    if not low <= value <= high:
        wanted = str(low) if low == high else f"{low}..{high}"
        problems.append(f"{label} {value} (expected {wanted})")


def client_label(stack: Any, mode: str) -> str:
    """``httpx2 async``."""
    return f"{stack.client} {mode}"


# -- 1. overhead ---------------------------------------------------------------------------------------


def overhead_stacks(run: Run) -> list[tuple[Any, str]]:
    """Every stack that can send with a valid token, with the mode it is measured in."""
    chosen: list[tuple[Any, str]] = []
    for client in ("httpx", "httpx2"):
        for mode in ("async", "sync"):
            for storage in run.storages():
                chosen.append((stacks.Ours(client, storage), mode))
    for mode in ("async", "sync"):
        chosen.append((stacks.Authlib("httpx2"), mode))
    chosen.append((stacks.MCPSDK(), "async"))
    for mode in ("async", "sync"):
        chosen.append((stacks.HttpxAuth(), mode))
        for client in ("httpx", "httpx2"):
            chosen.append((stacks.HandWritten(client), mode))
    return run.keep("1", chosen)


def _measure(
    stack: Any, mode: str, env: Any, url: str, total: int, concurrency: int, rounds: int, cap: float = 60.0
) -> dict[str, Any]:
    """``stack`` against the plain client of the same package, interleaved over ``rounds`` rounds."""
    static = stacks.Static(stack.client)
    loads: dict[str, list[Any]] = {"static": [], "stack": []}

    def order(index: int) -> list[tuple[str, Any]]:
        pair = [("static", None), ("stack", None)]
        return pair if index % 2 == 0 else pair[::-1]

    if mode == "async":

        async def main() -> None:
            async with static.aopen(env) as plain, stack.aopen(env) as send:
                senders = {"static": plain, "stack": send}
                for name in senders:  # warm-up: the token cached (or logged in), then the connections opened
                    await aload(senders[name], url, total=1, concurrency=1, seconds=None)
                    await aload(senders[name], url, total=concurrency, concurrency=concurrency, seconds=None)
                for index in range(rounds):
                    for name, _ in order(index):
                        gc.collect()
                        load = await aload(senders[name], url, total=total, concurrency=concurrency, seconds=cap)
                        loads[name].append(load)

        asyncio.run(main())
    else:
        with static.open(env) as plain, stack.open(env) as send:
            senders = {"static": plain, "stack": send}
            for name in senders:
                tload(senders[name], url, total=1, concurrency=1, seconds=None)
                tload(senders[name], url, total=concurrency, concurrency=concurrency, seconds=None)
            for index in range(rounds):
                for name, _ in order(index):
                    gc.collect()
                    loads[name].append(tload(senders[name], url, total=total, concurrency=concurrency, seconds=cap))
    rps = {name: [len(load.statuses) / load.wall for load in runs] for name, runs in loads.items()}
    cpu = {name: [load.cpu / max(len(load.statuses), 1) for load in runs] for name, runs in loads.items()}
    ratios = [mine / theirs for mine, theirs in zip(rps["stack"], rps["static"], strict=True)]
    return {
        "rps": statistics.median(rps["stack"]),
        "static_rps": statistics.median(rps["static"]),
        "ratio": statistics.median(ratios),
        "cpu_us": statistics.median(cpu["stack"]) * 1e6,
        "static_cpu_us": statistics.median(cpu["static"]) * 1e6,
        "requests": sum(len(load.statuses) for load in loads["stack"]),
        "failed": sum(load.failed for load in loads["stack"]),
        "failures": "; ".join(load.failure_kinds() for load in loads["stack"] if load.failed),
        "static_failed": sum(load.failed for load in loads["static"]),
    }


def scenario_overhead(run: Run) -> None:
    """1. Valid token, concurrency 50: requests/s over the same client with a static header, CPU per request."""
    settings = run.settings
    url = run.url + "/api/me"
    plain: dict[str, list[float]] = {}
    for stack, mode in overhead_stacks(run):
        env = run.env(3600)
        before = run.counters.snapshot()
        try:
            result = _measure(stack, mode, env, url, settings.overhead_requests, 50, settings.overhead_rounds)
            env.in_process = True
            alone = _measure(stack, mode, env, url, settings.cpu_requests, 1, settings.cpu_rounds)
        except Exception as exc:
            run.add(
                Row(
                    "1 overhead",
                    stack.name,
                    client_label(stack, mode),
                    "-",
                    "all",
                    0,
                    0,
                    0,
                    f"{exc!r}"[:120],
                    check(stack, [f"crashed: {exc!r}"]),
                )
            )
            continue
        delta = run.counters.since(before)
        problems: list[str] = []
        expect(problems, "failed", result["failed"], 0)
        expect(problems, "refreshes", delta["refresh_ok"], 0)
        expect(problems, "reused", delta["refresh_reuse"], 0)
        plain.setdefault(client_label(stack, mode), []).append(result["static_rps"])
        expect(problems, "failed in process", alone["failed"], 0)
        extra_cpu = alone["cpu_us"] - alone["static_cpu_us"]
        figures = (
            f"{result['rps']:,.0f} req/s = {ratio(result['ratio'])} plain ({result['static_rps']:,.0f}); "
            f"in process {extra_cpu:+.1f} µs CPU/req ({alone['static_cpu_us']:.0f} plain)"
        )
        if result["failed"]:
            figures += f"; failures: {result['failures']}"
        run.add(
            Row(
                "1 overhead",
                stack.name,
                client_label(stack, mode),
                result["requests"],
                result["failed"],
                delta["refresh_ok"],
                delta["refresh_reuse"],
                delta["code_exchanges"],
                figures,
                check(stack, problems),
                {**result, "extra_cpu_us": extra_cpu, "in_process": alone},
            )
        )
    medians = {label: statistics.median(values) for label, values in plain.items()}
    for label, median in medians.items():
        figures = f"{median:,.0f} req/s (median of its runs above)"
        twin = label.replace("httpx ", "httpx2 ")
        if label.startswith("httpx ") and twin in medians:
            figures += f" = {ratio(median / medians[twin])} {twin}'s"
        run.add(Row("1 overhead", "plain client, static header", label, "-", 0, 0, 0, 0, figures, "baseline",
                    {"rps": median}))  # fmt: skip


# -- 2. and 5. expiry herds, 3. 401 herd ---------------------------------------------------------------


def herd_stacks(run: Run, number: str) -> list[Any]:
    """The stacks of a herd scenario."""
    chosen: list[Any] = [stacks.Ours("httpx2", storage) for storage in run.storages()]
    chosen.append(stacks.Ours("httpx", "memory"))
    chosen += [stacks.Authlib("httpx2"), stacks.MCPSDK(), stacks.HttpxAuth(), stacks.HandWritten("httpx2")]
    if number != "3":
        chosen += [stacks.Static("httpx2"), stacks.Static("httpx")]
    return run.keep(number, chosen)


def _follower_waits(env: Any, issued: dict[str, float], since: float) -> list[float]:
    """For each request that carried a token issued after ``since``: how long after the token endpoint's
    answer it left (the first one is the library's wake-up; the rest add the event loop's queue)."""
    waits = [sent - issued[token] for sent, token in env.sent if token in issued and issued[token] >= since]
    return sorted(waits)


def scenario_herd(run: Run, *, mode: str, callers: int, revoked: bool) -> None:
    """``callers`` concurrent requests on an expired token (``revoked``: on a token the API revoked)."""
    number = "3 401 herd" if revoked else ("2 expiry herd" if mode == "async" else "5 threads")
    url = run.url + "/api/me"
    for stack in herd_stacks(run, number[0]):
        baseline = isinstance(stack, stacks.Static)
        totals: dict[str, Any] = {
            "requests": 0,
            "failed": 0,
            "refresh_ok": 0,
            "refresh_reuse": 0,
            "code_exchanges": 0,
            "api_401": 0,
            "walls": [],
            "waits": [],
            "firsts": [],
            "failures": [],
        }
        problems: list[str] = []
        for _ in range(run.settings.herd_trials):
            env = run.env(3600) if revoked or baseline else run.env(1, then=3600)
            before = run.counters.snapshot()
            try:
                load, delta, waits = _herd_trial(run, stack, env, mode, url, callers, revoked)
            except Exception as exc:  # the stack could not even start: every caller failed
                load, delta, waits = Load(statuses=[_status_name(exc)] * callers), run.counters.since(before), []
            totals["requests"] += len(load.statuses)
            totals["failed"] += load.failed
            for key in ("refresh_ok", "refresh_reuse", "code_exchanges", "api_401"):
                totals[key] += delta[key]
            totals["walls"].append(load.wall)
            totals["waits"] += waits
            totals["firsts"] += waits[:1]
            totals["failures"] += [status for status in load.statuses if status != 200]
            expect(problems, "failed", load.failed, 0)
            expect(problems, "refreshes", delta["refresh_ok"], 0 if baseline else 1)
            expect(problems, "reused", delta["refresh_reuse"], 0)
            expect(problems, "logins", delta["code_exchanges"], 0)
            if revoked and delta["api_401"] < 1:
                problems.append("no request met the revoked token")
        trials = run.settings.herd_trials
        figures = f"wall {ms(statistics.median(totals['walls']))}" + (" (median)" if trials > 1 else "")
        if totals["firsts"]:
            figures += (
                f"; new token sent {ms(statistics.median(totals['firsts']))} after its answer "
                f"(median of all {ms(statistics.median(totals['waits']))})"
            )
        if revoked:
            figures += f"; 401s {totals['api_401']}"
        if totals["failures"]:
            figures += f"; failures: {Load(statuses=totals['failures']).failure_kinds()}"
        if baseline:
            figures += " (a valid token: the floor for the herd's wall time)"
        if mode == "sync" and isinstance(stack, stacks.MCPSDK):
            figures += " (its auth is async-only: a sync client sends no token)"
        if trials > 1:
            figures += f"; {trials} trials, counts summed"
        run.add(
            Row(
                number,
                stack.name,
                client_label(stack, mode),
                totals["requests"],
                totals["failed"],
                totals["refresh_ok"],
                totals["refresh_reuse"],
                totals["code_exchanges"],
                figures,
                check(stack, problems),
                {"walls": totals["walls"], "waits": totals["waits"]},
            )
        )


def _herd_trial(
    run: Run, stack: Any, env: Any, mode: str, url: str, callers: int, revoked: bool
) -> tuple[Load, dict[str, int], list[float]]:
    """One herd. Expired: the grant's first token lives 1 s and the trial waits it out before the herd,
    with no request before it (Authlib, whose default leeway is 60 s, would refresh a 1-s token at once),
    except through a stack that must log in first (httpx-auth). Revoked: one request, then the API
    revokes the token it carried."""
    warm = revoked or stack.logs_in
    baseline = isinstance(stack, stacks.Static)

    def prepare() -> float:
        if revoked:
            run.counters.revoke(env.sent_token)
        elif not baseline:
            # The refreshed tokens will live an hour, as after a real hour-long token; short-lived tokens
            # are scenario 4's.
            run.counters.set_ttl(3600)
            time.sleep(max(0.0, env.tokens["expires_at"] + 0.1 - time.time()) if not warm else 1.1)
        env.sent.clear()
        return time.monotonic()

    if mode == "async":

        async def main() -> tuple[Load, dict[str, int], float]:
            if not warm:
                prepare()
            async with stack.aopen(env) as send:
                # Connections opened without the library's auth, so the herd measures the refresh, not the
                # pool's growth.
                await asyncio.gather(*(send(run.url + "/health", plain=True) for _ in range(min(callers, 100))))
                if warm:
                    await send(url)
                    env.sent_token = env.sent[-1][1] if env.sent else ""
                    since = prepare()
                else:
                    since = time.monotonic()
                before = run.counters.snapshot()
                load = await aherd(send, url, callers)
                return load, run.counters.since(before), since

        load, delta, since = asyncio.run(main())
    else:
        if not warm:
            prepare()
        with stack.open(env) as send:
            therd(lambda health: send(health, plain=True), run.url + "/health", callers)
            if warm:
                with contextlib.suppress(Exception):
                    send(url)
                env.sent_token = env.sent[-1][1] if env.sent else ""
                since = prepare()
            else:
                since = time.monotonic()
            before = run.counters.snapshot()
            load = therd(send, url, callers)
            delta = run.counters.since(before)
    return load, delta, _follower_waits(env, run.counters.issued(), since)


# -- 4. sustained expiry, 6. processes -----------------------------------------------------------------


def _refresh_bounds(seconds: float, ttl: float) -> tuple[int, int]:
    """How many refreshes one refresh per token lifetime allows in ``seconds``: at least one per lifetime
    (less the one in flight at the end); at most one each half lifetime, plus the first token's (the leeway
    grows with the observed request latency up to 35 % of the lifetime, and a lifetime counts from the
    refresh request's sending, so a loaded machine's slow refreshes shorten it further). Two refreshes of one
    token would show as reuse, which must be 0: the upper bound catches refreshing far too early."""
    return max(int(seconds / ttl) - 1, 1), math.ceil(seconds / (ttl * 0.5)) + 1


def sustained_stacks(run: Run) -> list[Any]:
    """Ours on each storage and the peers, default and tuned for 1-s tokens."""
    chosen: list[Any] = [stacks.Ours("httpx2", storage) for storage in run.storages()]
    chosen += [
        stacks.Authlib("httpx2"),
        stacks.Authlib("httpx2", 0),
        stacks.MCPSDK(),
        stacks.HttpxAuth(),
        stacks.HttpxAuth(0.1),
        stacks.HandWritten("httpx2"),
    ]
    return run.keep("4", chosen)


def scenario_sustained(run: Run) -> None:
    """4. 1-s access tokens, 20 tasks for a while: requests, refreshes, reuse, failures."""
    seconds, ttl = run.settings.sustained_seconds, 1.0
    url = run.url + "/api/me"
    low, high = _refresh_bounds(seconds, ttl)
    for stack in sustained_stacks(run):
        env = run.env(ttl)

        async def main(stack: Any = stack, env: Any = env) -> tuple[Load, dict[str, int]]:
            async with stack.aopen(env) as send:
                with contextlib.suppress(Exception):
                    await send(url)
                before = run.counters.snapshot()
                load = await aload(send, url, total=None, concurrency=20, seconds=seconds)
                return load, run.counters.since(before)

        load, delta = asyncio.run(main())
        problems: list[str] = []
        expect(problems, "failed", load.failed, 0)
        expect(problems, "reused", delta["refresh_reuse"], 0)
        expect(problems, "logins", delta["code_exchanges"], 0)
        expect(problems, "refreshes", delta["refresh_ok"], low, high)
        figures = f"{len(load.statuses) / load.wall:,.0f} req/s over {seconds:g} s; one per lifetime: {low}..{high}"
        if load.failed:
            figures += f"; failures: {load.failure_kinds()}"
        run.add(
            Row(
                "4 sustained expiry",
                stack.name,
                client_label(stack, "async"),
                len(load.statuses),
                load.failed,
                delta["refresh_ok"],
                delta["refresh_reuse"],
                delta["code_exchanges"],
                figures,
                check(stack, problems),
            )
        )


def process_stacks(run: Run) -> list[Any]:
    """Ours on the shared storages, and each peer with its own persistence."""
    chosen: list[Any] = [stacks.Ours("httpx2", storage) for storage in run.storages() if storage != "memory"]
    chosen += [stacks.Authlib("httpx2", 0), stacks.MCPSDK(), stacks.HttpxAuth(0.1), stacks.HandWritten("httpx2")]
    return run.keep("6", chosen)


def _spec(stack: Any) -> str:
    if isinstance(stack, stacks.Ours):
        return f"ours:{stack.storage}@{stack.client}"
    if isinstance(stack, stacks.Authlib):
        return f"authlib:{'' if stack.leeway is None else stack.leeway}@{stack.client}"
    if isinstance(stack, stacks.MCPSDK):
        return "mcp-sdk@httpx2"
    if isinstance(stack, stacks.HttpxAuth):
        return f"httpx-auth:{'' if stack.early_expiry is None else stack.early_expiry}@httpx"
    return f"hand@{stack.client}"


def _seed_shared(run: Run, stack: Any, env: Any) -> None:
    """Put the grant where this stack's processes will find it."""
    path = env.shared_file
    tokens = env.tokens
    if isinstance(stack, stacks.Ours):
        with stack.manager(env):
            pass
    elif isinstance(stack, stacks.Authlib):
        path.write_text(json.dumps(stacks.authlib_token(tokens)))
    elif isinstance(stack, stacks.MCPSDK):
        remaining = max(0, int(tokens["expires_at"] - time.time()))
        path.write_text(
            json.dumps(
                {
                    "access_token": tokens["access_token"],
                    "token_type": "Bearer",
                    "expires_in": remaining,
                    "refresh_token": tokens["refresh_token"],
                }
            )
        )
    elif isinstance(stack, stacks.HttpxAuth):
        with stack.open(env) as send:  # its login, through the headless browser, saves the token file
            send(run.url + "/api/me")
    else:
        path.write_text(json.dumps({"access_token": tokens["access_token"], "refresh_token": tokens["refresh_token"]}))


def scenario_processes(run: Run) -> None:
    """6. 4 processes x 25 tasks on one grant, through each library's own persistence; 1-s tokens."""
    seconds, ttl, processes, tasks = run.settings.process_seconds, 1.0, 4, 25
    low, high = _refresh_bounds(seconds, ttl)
    for stack in process_stacks(run):
        suffix = ".db" if isinstance(stack, stacks.Ours) else ".json"
        shared = run.folder / f"shared-{len(run.rows)}{suffix}"
        env = run.env(ttl, shared_file=shared)
        _seed_shared(run, stack, env)
        before = run.counters.snapshot()
        start_at = time.monotonic() + 3.0  # every process imported and connected by then
        job = {
            "spec": _spec(stack),
            "url": run.url,
            "redis_url": run.redis_url,
            "shared_file": str(shared),
            "folder": str(run.folder),
            "seconds": seconds,
            "tasks": tasks,
            "start_at": start_at,
            "tokens": env.tokens,
        }
        children = [
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=ROOT,
            )
            for _ in range(processes)
        ]
        statuses: dict[str, int] = {}
        requests = failed = 0
        notes: list[str] = []
        for child in children:
            out, err = child.communicate(timeout=seconds + 120)
            try:
                result = json.loads(out.decode().strip().splitlines()[-1])
            except (IndexError, ValueError):
                notes.append(f"a worker crashed: {err.decode()[-300:]!r}")
                failed += 1
                continue
            requests += result["requests"]
            failed += result["failed"]
            for kind, count in result["statuses"].items():
                statuses[kind] = statuses.get(kind, 0) + count
        delta = run.counters.since(before)
        problems: list[str] = list(notes)
        expect(problems, "failed", failed, 0)
        expect(problems, "reused", delta["refresh_reuse"], 0)
        expect(problems, "logins", delta["code_exchanges"], 0)
        expect(problems, "refreshes", delta["refresh_ok"], low, high)
        persistence = {
            "authlib": "update_token writes a file; each process loads it at start",
            "mcp-sdk OAuthClientProvider": "file-backed TokenStorage",
            "httpx-auth": "JsonTokenFileCache",
            "hand-written (refresh on 401)": "a file read at start",
        }.get(stack.library, stack.storage if isinstance(stack, stacks.Ours) else "")
        kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(statuses.items()) if kind != "200")
        figures = f"{processes}x{tasks} over {seconds:g} s ({persistence}); one per lifetime: {low}..{high}"
        if kinds:
            figures += f"; failures: {kinds}"
        if notes:
            figures += "; " + "; ".join(notes)
        run.add(
            Row(
                "6 processes",
                stack.name,
                client_label(stack, "async"),
                requests,
                failed,
                delta["refresh_ok"],
                delta["refresh_reuse"],
                delta["code_exchanges"],
                figures,
                check(stack, problems),
            )
        )


def worker_main(job: dict[str, Any]) -> None:
    """A process of the cross-process scenario: send with ``job['tasks']`` tasks for ``job['seconds']``."""
    if job.get("kind") == "mcp":
        asyncio.run(mcp_worker(job))
        return
    stack = stacks.stack(job["spec"])
    env = stacks.Env(
        url=job["url"],
        folder=Path(job["folder"]),
        redis_url=job["redis_url"],
        tokens=job["tokens"],
        shared_file=Path(job["shared_file"]),
        preloaded=True,
    )
    url = job["url"] + "/api/me"

    async def main() -> Load:
        async with stack.aopen(env) as send:
            await asyncio.sleep(max(0.0, job["start_at"] - time.monotonic()))
            return await aload(send, url, total=None, concurrency=job["tasks"], seconds=job["seconds"])

    load = asyncio.run(main())
    counts: dict[str, int] = {}
    for status in load.statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    print(json.dumps({"requests": len(load.statuses), "failed": load.failed, "statuses": counts}))


# -- 7. server latency ---------------------------------------------------------------------------------


def scenario_latency(run: Run) -> None:
    """7. The API answers after 20 ms: requests/s at concurrency 50 over the plain client's."""
    url = run.url + "/api/slow?delay=0.02"
    chosen = [
        stacks.Ours("httpx2", "memory"),
        stacks.Ours("httpx", "memory"),
        stacks.Authlib("httpx2"),
        stacks.MCPSDK(),
        stacks.HttpxAuth(),
        stacks.HandWritten("httpx2"),
    ]
    for stack in run.keep("7", chosen):
        env = run.env(3600)
        before = run.counters.snapshot()
        settings = run.settings
        result = _measure(
            stack, "async", env, url, settings.latency_requests, 50, settings.latency_rounds, cap=settings.latency_cap
        )
        delta = run.counters.since(before)
        problems: list[str] = []
        expect(problems, "failed", result["failed"], 0)
        expect(problems, "refreshes", delta["refresh_ok"], 0)
        figures = f"{result['rps']:,.0f} req/s = {ratio(result['ratio'])} plain ({result['static_rps']:,.0f})"
        run.add(
            Row(
                "7 latency 20 ms",
                stack.name,
                client_label(stack, "async"),
                result["requests"],
                result["failed"],
                delta["refresh_ok"],
                delta["refresh_reuse"],
                delta["code_exchanges"],
                figures,
                check(stack, problems),
                result,
            )
        )


# -- 8. expiry boundary --------------------------------------------------------------------------------


def scenario_boundary(run: Run) -> None:
    """8. Latency of requests within a second of a token change vs the others (4-s tokens, 10 tasks)."""
    seconds, ttl = run.settings.boundary_seconds, 4.0
    url = run.url + "/api/me"
    chosen: list[Any] = [stacks.Ours("httpx2", "memory")]
    chosen += [stacks.Authlib("httpx2", 0), stacks.MCPSDK(), stacks.HttpxAuth(1), stacks.HandWritten("httpx2")]
    chosen = run.keep("8", chosen)
    low, high = _refresh_bounds(seconds, ttl)
    for stack in chosen:
        env = run.env(ttl)

        async def main(stack: Any = stack, env: Any = env) -> tuple[Load, dict[str, int], float]:
            async with stack.aopen(env) as send:
                with contextlib.suppress(Exception):
                    await send(url)
                before = run.counters.snapshot()
                started = time.monotonic()
                load = await aload(send, url, total=None, concurrency=10, seconds=seconds)
                return load, run.counters.since(before), started

        load, delta, started = asyncio.run(main())
        changes = sorted(t for t in run.counters.issued().values() if started <= t <= started + seconds + 1)
        near: list[float] = []
        steady: list[float] = []
        for start, latency in zip(load.starts, load.latencies, strict=True):
            (near if any(abs(start - t) <= 1.0 for t in changes) else steady).append(latency)
        problems: list[str] = []
        expect(problems, "failed", load.failed, 0)
        expect(problems, "reused", delta["refresh_reuse"], 0)
        expect(problems, "refreshes", delta["refresh_ok"], low, high)
        figures = (
            f"within 1 s of a new token: p50 {ms(quantile(near, 50))} p99 {ms(quantile(near, 99))} ({len(near)}); "
            f"steady: p50 {ms(quantile(steady, 50))} p99 {ms(quantile(steady, 99))} ({len(steady)})"
        )
        if not stack.peer:
            figures += "; refresh-ahead: not in the library yet, so measured without it"
        if load.failed:
            figures += f"; failures: {load.failure_kinds()}"
        run.add(
            Row(
                "8 expiry boundary",
                stack.name,
                client_label(stack, "async"),
                len(load.statuses),
                load.failed,
                delta["refresh_ok"],
                delta["refresh_reuse"],
                delta["code_exchanges"],
                figures,
                check(stack, problems),
                {"near": near, "steady": steady},
            )
        )


# -- 9. scale ------------------------------------------------------------------------------------------


def scenario_scale(run: Run) -> None:
    """9. 1 ... 100,000 sessions in one manager: per-request cost (in process) and heap per session."""
    import httpx2

    def handler(request: Any) -> Any:
        return httpx2.Response(200, content=b"{}")

    for sessions in run.settings.scale_sessions:
        gc.collect()
        tracemalloc.start()
        baseline = tracemalloc.get_traced_memory()[0]
        manager = hua.TokenManager(
            refresher=hua.OAuth2Refresher(run.url + "/token", stacks.CLIENT_ID, stacks.CLIENT_SECRET),
            provider_id="local",
            storage=hua.MemoryStorage(),
        )
        expires = time.time() + 3600
        for index in range(sessions):
            tokens = hua.UpstreamTokens(access_token=f"at-{index}", refresh_token=f"rt-{index}", expires_at=expires)
            manager.store(f"s-{index}", tokens)
        # Requests spread over every session (a gateway's traffic): most sessions' first use reads the store.
        names = [f"s-{random.randrange(sessions)}" for _ in range(run.settings.scale_requests)]
        headers = {"Authorization": "Bearer at-0"}
        failed = 0
        with httpx2.Client(transport=httpx2.MockTransport(handler)) as client:
            for name in names[:2000]:
                client.get("http://api.test/", auth=manager.auth(name))
            held = (tracemalloc.get_traced_memory()[0] - baseline) / sessions
            tracemalloc.stop()
            # 1,000 of the sessions in use (the rest idle): the manager's cache holds them.
            hot = [f"s-{random.randrange(min(sessions, 1000))}" for _ in names]
            times: dict[str, list[float]] = {"auth": [], "hot": [], "static": []}
            for _ in range(3):  # interleaved with the static header, so drift hits all alike
                for kind, batch in (("auth", names), ("hot", hot), ("static", names)):
                    started = time.perf_counter()
                    for name in batch:
                        auth = None if kind == "static" else manager.auth(name)
                        answer = client.get("http://api.test/", auth=auth, headers=headers if auth is None else None)
                        failed += answer.status_code != 200
                    times[kind].append((time.perf_counter() - started) / len(batch))
            auth_times, static_times = times["auth"], times["static"]
            hot_us = statistics.median(times["hot"]) * 1e6
        manager.close()
        per_request, static = statistics.median(auth_times) * 1e6, statistics.median(static_times) * 1e6
        problems: list[str] = []
        expect(problems, "failed", failed, 0)
        noun = "sessions" if sessions > 1 else "session"
        heap = f"heap {held:,.0f} B/session (manager + memory storage)" if sessions >= 1000 else "heap: fixed costs"
        run.add(Row("9 scale", f"httpx-upstream-auth ({sessions:,} {noun})", "httpx2 sync (in process)",
                    len(names) * 3, failed, 0, 0, 0,
                    f"{per_request:.1f} µs/request (static header {static:.1f}, {per_request - static:+.1f}; "
                    f"1,000 of them in use: {hot_us:.1f}); {heap}",
                    check(stacks.Ours("httpx2", "memory"), problems),
                    {"sessions": sessions, "us_per_request": per_request, "static_us": static, "hot_us": hot_us,
                     "bytes_per_session": held}))  # fmt: skip
    scale = [row for row in run.rows if row.scenario == "9 scale"]
    if len(scale) >= 2:
        first, last = scale[0].data, scale[-1].data
        # Each against the static header of its own rounds: the machine's drift between them cancels out.
        one = first["us_per_request"] / first["static_us"]
        relative = last["us_per_request"] / last["static_us"] / one
        relative_hot = last["hot_us"] / last["static_us"] / one
        scale[-1].figures += f"; per request {ratio(relative)} one session's ({ratio(relative_hot)} with 1,000 in use)"
    for name, note in (
        ()
        if "9" not in run.settings.peers
        else (
            ("authlib", "one OAuth2Client (its own connection pool) per session"),
            ("mcp-sdk OAuthClientProvider", "one provider and TokenStorage per session"),
            ("httpx-auth", "one token per auth object's parameters, in a process-wide cache"),
            ("hand-written (refresh on 401)", "one Auth object per session"),
        )
    ):
        run.add(Row("9 scale", name, "-", "-", "-", "-", "-", "-", f"no session manager: {note}", "peer"))


# -- 10. MCP -------------------------------------------------------------------------------------------


def scenario_mcp(run: Run) -> None:
    """10. Five concurrent 1-s tool calls through an MCP 2.x session: our module vs the SDK's provider."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from httpx_upstream_auth.mcp import connect
    from httpx_upstream_auth.testing import LocalProvider, ServerThread, serve_mcp

    provider = LocalProvider(access_ttl=60)
    with ServerThread(provider) as idp, serve_mcp(provider, idp.url, json_response=True) as server:
        env = stacks.Env(
            url=idp.url, folder=run.folder, tokens=json.loads(provider.login(provider_id="local").to_json())
        )

        async def five(client: Any) -> float:
            started = time.monotonic()
            await asyncio.gather(*(client.call_tool("sleep", {"seconds": 1}) for _ in range(5)))
            return time.monotonic() - started

        async def ours() -> float:
            manager = hua.TokenManager(
                refresher=hua.OAuth2Refresher(idp.url + "/token", stacks.CLIENT_ID, stacks.CLIENT_SECRET),
                provider_id="local",
                storage=hua.MemoryStorage(),
            )
            manager.store(stacks.SESSION, hua.UpstreamTokens.from_json(json.dumps(env.tokens)))
            try:
                async with connect(server.url, manager, stacks.SESSION, mode="legacy") as client:
                    await client.call_tool("echo", {"text": "warm"})
                    return await five(client)
            finally:
                await manager.aclose()

        async def sdk() -> float:
            auth = stacks.sdk_auth(env, server.url)
            async with (
                httpx2.AsyncClient(auth=auth, timeout=httpx2.Timeout(30, read=300)) as http,
                Client(streamable_http_client(server.url, http_client=http), mode="legacy") as client,
            ):
                await client.call_tool("echo", {"text": "warm"})
                return await five(client)

        for name, main, ours_stack in (
            ("httpx-upstream-auth (mcp.connect)", ours, True),
            ("mcp-sdk OAuthClientProvider", sdk, False),
        )[: 2 if "10" in run.settings.peers else 1]:
            server.max_sleeping = 0
            before = provider.stats
            try:
                wall = asyncio.run(main())
                failed = 0
            except Exception as exc:
                wall, failed = math.nan, 5
                print(f"    {name}: {exc!r}")
            after = provider.stats
            problems: list[str] = []
            expect(problems, "failed", failed, 0)
            expect(problems, "parallel calls", server.max_sleeping, 5)
            run.add(
                Row(
                    "10 MCP",
                    name,
                    "httpx2 async",
                    5,
                    failed,
                    after["refresh_ok"] - before["refresh_ok"],
                    after["refresh_reuse"] - before["refresh_reuse"],
                    0,
                    f"5 concurrent 1-s tool calls: {wall:.2f} s; at most {server.max_sleeping} at once on the server",
                    "peer" if not ours_stack else ("ok" if not problems else "FAIL: " + "; ".join(problems)),
                    {"wall": wall},
                )
            )
        for spec in ("ours", "sdk") if "10" in run.settings.peers else ("ours",):
            run.add(_mcp_processes(run, provider, idp, server, spec))


async def mcp_worker(job: dict[str, Any]) -> None:
    """A process of scenario 10's second part: ``job['sessions']`` MCP sessions on the shared grant, each
    calling ``echo`` in a loop for ``job['seconds']``; prints the calls and failures as JSON."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    from httpx_upstream_auth.mcp import connect

    env = stacks.Env(url=job["idp"], folder=Path(job["folder"]), tokens=job["tokens"],
                     shared_file=Path(job["shared_file"]), preloaded=True)  # fmt: skip
    statuses: dict[str, int] = {}

    def note(status: str) -> None:
        statuses[status] = statuses.get(status, 0) + 1

    async with contextlib.AsyncExitStack() as stack:
        clients = []
        if job["spec"] == "ours":
            storage = hua.SQLiteStorage(env.shared_file)
            manager = hua.TokenManager(
                refresher=hua.OAuth2Refresher(job["idp"] + "/token", stacks.CLIENT_ID, stacks.CLIENT_SECRET),
                provider_id="local",
                storage=storage,
            )
            stack.push_async_callback(manager.aclose)
            for _ in range(job["sessions"]):
                clients.append(await stack.enter_async_context(connect(job["server"], manager, stacks.SESSION,
                                                                       mode="legacy")))  # fmt: skip
        else:
            for _ in range(job["sessions"]):
                http = await stack.enter_async_context(
                    httpx2.AsyncClient(auth=stacks.sdk_auth(env, job["server"]), timeout=httpx2.Timeout(30, read=300))
                )
                transport = streamable_http_client(job["server"], http_client=http)
                clients.append(await stack.enter_async_context(Client(transport, mode="legacy")))
        await asyncio.sleep(max(0.0, job["start_at"] - time.monotonic()))
        deadline = time.monotonic() + job["seconds"]

        async def calls(client: Any) -> None:
            while time.monotonic() < deadline:
                try:
                    result = await client.call_tool("echo", {"text": "x"})
                    note("error result" if getattr(result, "is_error", False) else "ok")
                except Exception as exc:
                    note(_status_name(exc))
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(calls(client) for client in clients))
    print(json.dumps({"statuses": statuses, "logins": len(env.logins)}))


def _mcp_processes(run: Run, provider: Any, idp: Any, server: Any, spec: str) -> Row:
    """Two processes x 5 MCP sessions on one grant (1-s tokens): ours through SQLite, the SDK's provider
    through a file-backed TokenStorage."""
    seconds = run.settings.mcp_seconds
    provider.access_ttl = 1.0
    tokens = json.loads(provider.login(provider_id="local", access_ttl=1.0).to_json())
    shared = run.folder / f"mcp-{spec}-{len(run.rows)}{'.db' if spec == 'ours' else '.json'}"
    env = stacks.Env(url=idp.url, folder=run.folder, tokens=tokens, shared_file=shared)
    if spec == "ours":
        with stacks.Ours("httpx2", "sqlite").manager(env):
            pass
    else:
        shared.write_text(json.dumps({"access_token": tokens["access_token"], "token_type": "Bearer",
                                      "expires_in": 1, "refresh_token": tokens["refresh_token"]}))  # fmt: skip
    before = provider.stats
    job = {"kind": "mcp", "spec": spec, "idp": idp.url, "server": server.url, "folder": str(run.folder),
           "shared_file": str(shared), "tokens": tokens, "sessions": 5, "seconds": seconds,
           "start_at": time.monotonic() + 6.0}  # fmt: skip
    children = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    statuses: dict[str, int] = {}
    logins = 0
    notes: list[str] = []
    for child in children:
        out, err = child.communicate(timeout=seconds + 120)
        try:
            result = json.loads(out.decode().strip().splitlines()[-1])
        except (IndexError, ValueError):
            notes.append(f"a process crashed: {err.decode()[-300:]!r}")
            continue
        logins += result["logins"]
        for kind, count in result["statuses"].items():
            statuses[kind] = statuses.get(kind, 0) + count
    after = provider.stats
    calls = sum(statuses.values())
    failed = calls - statuses.get("ok", 0) + len(notes)
    refreshes = after["refresh_ok"] - before["refresh_ok"]
    reused = after["refresh_reuse"] - before["refresh_reuse"]
    low, high = _refresh_bounds(seconds, 1.0)
    problems: list[str] = list(notes)
    expect(problems, "failed", failed, 0)
    expect(problems, "reused", reused, 0)
    expect(problems, "logins", logins, 0)
    expect(problems, "refreshes", refreshes, low, high)
    kinds = ", ".join(f"{kind} x{count}" for kind, count in sorted(statuses.items()) if kind != "ok")
    figures = f"2 processes x 5 sessions, 1-s tokens, {seconds:g} s of echo calls; one per lifetime: {low}..{high}"
    if kinds:
        figures += f"; failures: {kinds}"
    if notes:
        figures += "; " + "; ".join(notes)
    name = "httpx-upstream-auth (mcp.connect, sqlite)" if spec == "ours" else "mcp-sdk OAuthClientProvider (file)"
    return Row("10 MCP", name, "httpx2 async", calls, failed, refreshes, reused, logins, figures,
               ("ok" if not problems else "FAIL: " + "; ".join(problems)) if spec == "ours" else "peer")  # fmt: skip


# -- the table -----------------------------------------------------------------------------------------

COLUMNS = ("scenario", "library", "client", "requests", "failed", "refreshes", "reused", "logins", "figures", "check")


def _cell(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as one markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(getattr(row, column)) for column in COLUMNS) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    """The versions of the packages measured."""
    found = {}
    for name in ("httpx-upstream-auth", "httpx", "httpx2", "authlib", "httpx-auth", "mcp", "uvicorn", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def machine() -> str:
    """What the numbers were measured on, and how loaded it was."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {platform.platform()}; "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"
    )


def code_version() -> str:
    """The commit measured (``+ changes`` when the work tree differs from it), or ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + (" + changes" if dirty.stdout.strip() else "")


def failures_of_ours(rows: Sequence[Row]) -> list[Row]:
    """Rows of ours whose check failed."""
    return [row for row in rows if row.check.startswith("FAIL")]


def report(rows: Sequence[Row], settings: Settings, elapsed: float, command: str) -> str:
    """The results file: the table, then how it was made."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    version_text = ", ".join(f"{name} {version}" for name, version in versions().items())
    bad = failures_of_ours(rows)
    verdict = "every correctness figure of ours as expected" if not bad else f"{len(bad)} row(s) of ours FAILED"
    return (
        f"Mode: {settings.mode}; {stamp}; {elapsed:.0f} s; {verdict}.\n\n"
        f"Command: `{command}` at commit {code_version()}\n\nMachine: {machine()}\n\nVersions: {version_text}\n\n"
        f"{markdown_table(rows)}\n"
    )


# -- main ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--short", action="store_true", help="CI settings (the default)")
    mode.add_argument("--full", action="store_true", help="the docs' settings; writes docs/benchmark-results.md")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated numbers (default: all)")
    parser.add_argument("--no-venv", action="store_true", help="run in this interpreter (peers must be installed)")
    parser.add_argument("--out", type=Path, default=None, help="the results file (default: benchmarks/results/)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen scenarios, print and write the table; 3 if a correctness figure of ours was wrong."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker is None and not args.no_venv:
        ensure_environment(argv)
    _import_benchmark_modules()
    if args.worker is not None:
        worker_main(json.loads(args.worker))
        return 0
    settings = FULL if args.full else SHORT
    chosen = [part.strip() for part in args.scenarios.split(",") if part.strip()]
    unknown = [number for number in chosen if number not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    command = "python benchmarks/compare.py " + shlex.join(a for a in argv if a != "--no-venv")
    started = time.monotonic()
    runners: dict[str, Callable[[Run], None]] = {
        "1": scenario_overhead,
        "2": lambda run: scenario_herd(run, mode="async", callers=200, revoked=False),
        "3": lambda run: scenario_herd(run, mode="async", callers=20, revoked=True),
        "4": scenario_sustained,
        "5": lambda run: scenario_herd(run, mode="sync", callers=16, revoked=False),
        "6": scenario_processes,
        "7": scenario_latency,
        "8": scenario_boundary,
        "9": scenario_scale,
        "10": scenario_mcp,
    }
    common.signal.signal(common.signal.SIGTERM, common._exit_on_sigterm)
    with contextlib.ExitStack() as stack:
        run = Run(settings, stack)
        for number in chosen:
            scenario_started = time.monotonic()
            print(f"\n== {number}. {SCENARIOS[number]}", flush=True)
            runners[number](run)
            print(f"   ({time.monotonic() - scenario_started:.0f} s)", flush=True)
        rows = run.rows
    elapsed = time.monotonic() - started
    text = report(rows, settings, elapsed, command)
    print("\n" + text)
    out = args.out or RESULTS / f"compare-{settings.mode}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps([{**{c: getattr(r, c) for c in COLUMNS}, "data": r.data} for r in rows], indent=1, default=str)
    )
    print(f"written to {out} (and {out.with_suffix('.json').name})")
    if settings.mode == "full" and set(chosen) == set(SCENARIOS):
        write_docs_results(text)
    bad = failures_of_ours(rows)
    if bad:
        for row in bad:
            print(f"COUNT VIOLATION: {row.scenario} / {row.library} / {row.client}: {row.check}", file=sys.stderr)
        return COUNT_VIOLATION_EXIT
    return 0


def write_docs_results(results: str, path: Path = DOCS_RESULTS) -> None:
    """Write the docs' results file whole: a header saying where it comes from, then the run's report."""
    path.write_text(f"{RESULTS_HEADER}\n\n{results}")
    print(f"docs results updated: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    raise SystemExit(main())
