"""Hot-path cost of ``UpstreamAuth``: a valid token, compared with a static ``Authorization`` header.

Three measurements, all taken in the same run so they can be compared as ratios:

1. **Throughput over loopback.** Requests per second through ``client.get(url, auth=manager.auth(sid))``
   versus the *same* client instance sending ``headers={"Authorization": "Bearer …"}``, against a
   dedicated resource server in a child process that accepts any Bearer token (so the comparison is
   purely about client-side overhead). For ``httpx.Client`` (sequential), ``httpx.AsyncClient``
   (``--concurrency`` asyncio tasks) and the httpx2 twins. The variants are interleaved in rounds
   (the order rotates every round), and each variant's median over rounds is reported, with the ratio
   auth/static; an A/A control (the static variant run twice) shows the run's noise floor. Sync
   clients are also compared request by request (variants alternating ABC CBA ...), the finest
   interleaving, whose median latencies resolve about a microsecond on a noisy machine.
2. **Client-side overhead without the network**: the same comparison through an in-process
   ``MockTransport`` (whole requests, no socket: all the time is the client's, so the extra
   microseconds per request show plainly), and, with timeit, microseconds for the step the auth runs
   before a request is sent (``next(auth.sync_auth_flow(request))``) versus setting the header.
3. **Cost of ``manager.auth(session_id)``** (gateways make one per request): nanoseconds per call with
   1 and with ``--sessions`` stored sessions, to show it is O(1) and does no I/O.

Run ``python benchmarks/bench_hot_path.py [--seconds N] [--rounds R] [--json out.json]``. Nothing here
asserts a timing; a non-200 answer is a count violation (exit status 3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import _common as common
import httpx

import httpx_upstream_auth as hua

SESSION = "bench-session"
ACCESS_TOKEN = "at-bench-0123456789abcdef"
STATIC_HEADERS = {"Authorization": f"Bearer {ACCESS_TOKEN}"}
CLIENT_KINDS = ("httpx", "httpx-async", "httpx2", "httpx2-async")
CONTROL = "static (A/A)"


# -- the manager under test ---------------------------------------------------------------------------


def valid_tokens(access_token: str = ACCESS_TOKEN) -> hua.UpstreamTokens:
    """Tokens valid for a day, so the hot path never refreshes."""
    now = time.time()
    return hua.UpstreamTokens(
        access_token=access_token,
        refresh_token="rt-bench",
        expires_at=now + 86_400,
        issued_at=now,
        provider_id="bench",
        user_id="user-1",
        upstream_subject="alice",
        client_id="bench-client",
    )


def make_manager(storage: hua.Storage, sessions: int = 1) -> hua.TokenManager:
    """A manager whose ``SESSION`` (and ``sessions - 1`` others) holds valid tokens.

    Its refresher points at a port nobody listens on: the hot path must never call it.
    """
    manager = hua.TokenManager(
        refresher=hua.OAuth2Refresher(token_url="http://127.0.0.1:9/token", client_id="bench", client_secret="x"),
        provider_id="bench",
        storage=storage,
    )
    manager.store(SESSION, valid_tokens())
    for index in range(1, sessions):
        manager.store(f"session-{index}", valid_tokens(f"at-{index}"))
    return manager


# -- variants: one way of sending, measured in rounds ------------------------------------------------


class SyncVariant:
    """Sequential requests from one thread; ``send`` makes one request and returns its response."""

    def __init__(self, name: str, send: Callable[[], Any]) -> None:
        self.name = name
        self.send = send
        self.errors = 0

    def run(self, seconds: float) -> list[float]:
        """Send until ``seconds`` have passed; return each request's latency."""
        send, clock = self.send, time.perf_counter
        latencies: list[float] = []
        deadline = clock() + seconds
        while (started := clock()) < deadline:
            if send().status_code != 200:
                self.errors += 1
            latencies.append(clock() - started)
        return latencies

    def once(self) -> float:
        """Send one request; return its latency."""
        started = time.perf_counter()
        if self.send().status_code != 200:
            self.errors += 1
        return time.perf_counter() - started


class AsyncVariant:
    """``concurrency`` asyncio tasks sending in a loop, on an event loop kept open between rounds."""

    def __init__(
        self, name: str, send: Callable[[], Awaitable[Any]], loop: asyncio.AbstractEventLoop, concurrency: int
    ) -> None:
        self.name = name
        self.send = send
        self.loop = loop
        self.concurrency = concurrency
        self.errors = 0

    def run(self, seconds: float) -> list[float]:
        """Send until ``seconds`` have passed; return each request's latency."""
        return self.loop.run_until_complete(self._run(seconds))

    async def _run(self, seconds: float) -> list[float]:
        send, clock = self.send, time.perf_counter
        latencies: list[float] = []
        deadline = clock() + seconds

        async def worker() -> None:
            while (started := clock()) < deadline:
                if (await send()).status_code != 200:
                    self.errors += 1
                latencies.append(clock() - started)

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return latencies


@dataclass(frozen=True)
class ClientKind:
    """A client class to measure: which module, sync or async."""

    name: str
    module: ModuleType
    is_async: bool


def client_kinds(names: Sequence[str]) -> list[ClientKind]:
    """The requested client kinds that can run here (httpx2 ones are skipped, with a note, without it)."""
    kinds = []
    for name in names:
        if name not in CLIENT_KINDS:
            raise SystemExit(f"unknown client {name!r}; choose from {', '.join(CLIENT_KINDS)}")
        module: ModuleType = httpx
        if name.startswith("httpx2"):
            try:
                import httpx2
            except ImportError:
                print(f"note: {name} skipped: httpx2 is not installed")
                continue
            module = httpx2
        kinds.append(ClientKind(name, module, name.endswith("-async")))
    return kinds


def _get_with_auth(client: Any, *, url: str, manager: hua.TokenManager) -> Any:
    """One request through the manager, with a new auth as a gateway makes per request."""
    return client.get(url, auth=manager.auth(SESSION))


def _mock_api(module: ModuleType, request: Any) -> Any:
    """The bearer server's answers, in process: 200 for any Bearer token, else 401."""
    if request.headers.get("authorization", "").startswith("Bearer "):
        return module.Response(200, content=b'{"sub":"bench"}', headers={"content-type": "application/json"})
    return module.Response(401, content=b'{"error":"invalid_token"}', headers={"www-authenticate": "Bearer"})


def measure_client(
    kind: ClientKind,
    url: str,
    managers: dict[str, hua.TokenManager],
    *,
    rounds: int,
    seconds: float,
    concurrency: int,
    control: bool = True,
    in_process: bool = False,
) -> dict[str, Any]:
    """Interleave ``static`` with ``auth[<storage>]`` for each manager, all on one client of ``kind``.

    ``in_process``: the client sends through a ``MockTransport`` answering like the bearer server, so
    no socket or server is involved and the whole time per request is the client's own work.

    With ``control``, ``static`` also runs a second time as ``static (A/A)``: its ratio to ``static`` is
    pure noise, the resolution this run has for the auth's ratios.
    """
    # name -> how to send one request with a given client: every variant shares the same client object.
    senders: dict[str, Callable[[Any], Any]] = {"static": lambda c: c.get(url, headers=STATIC_HEADERS)}
    if control:
        senders[CONTROL] = senders["static"]
    for storage, manager in managers.items():
        senders[f"auth[{storage}]"] = functools.partial(_get_with_auth, url=url, manager=manager)
    transport = (
        {"transport": kind.module.MockTransport(functools.partial(_mock_api, kind.module))} if in_process else {}
    )
    variants: list[SyncVariant | AsyncVariant]
    if kind.is_async:
        loop = asyncio.new_event_loop()
        limits = kind.module.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        aclient = kind.module.AsyncClient(limits=limits, **transport)
        variants = [
            AsyncVariant(name, functools.partial(send, aclient), loop, concurrency) for name, send in senders.items()
        ]
        try:
            measured = common.interleave(variants, rounds=rounds, seconds=seconds)
        finally:
            loop.run_until_complete(aclient.aclose())
            loop.close()
    else:
        client = kind.module.Client(**transport)
        sync_variants = [SyncVariant(name, functools.partial(send, client)) for name, send in senders.items()]
        variants = [*sync_variants]
        try:
            measured = common.interleave(variants, rounds=rounds, seconds=seconds)
            alternating = common.alternate(sync_variants, seconds=rounds * seconds)
        finally:
            client.close()
    errors = {variant.name: variant.errors for variant in variants if variant.errors}
    if errors:
        raise common.CountViolation(f"{kind.name}: non-200 answers per variant: {errors}")
    result: dict[str, Any] = {"concurrency": concurrency if kind.is_async else 1, "variants": {}}
    for name, rates in measured.rates.items():
        result["variants"][name] = {
            "rps": common.Summary.of(rates).as_dict(),
            "latency_us": common.Summary.of(measured.latencies[name]).scaled(1e6).as_dict(),
            "cpu_us_per_request": common.Summary.of(measured.cpu[name]).scaled(1e6).as_dict(),
            "rounds_rps": rates,
            "ratio": None if name == "static" else measured.ratio(name, "static"),
        }
    if not kind.is_async:
        static_us = statistics.median(alternating["static"]) * 1e6
        result["alternating"] = {}
        for name, latencies in alternating.items():
            median_us = statistics.median(latencies) * 1e6
            result["alternating"][name] = {
                "n": len(latencies),
                "median_us": median_us,
                "p99_us": common.percentile(latencies, 99) * 1e6,
                "extra_us": median_us - static_us,
                "ratio": static_us / median_us,
            }
    return result


def print_alternating(results: dict[str, dict[str, Any]]) -> None:
    """The sync clients' request-by-request comparison (no table when no sync client ran)."""
    rows = [
        [kind, name, entry["n"], entry["median_us"], f"{entry['extra_us']:+.2f}", f"{entry['ratio']:.4f}"]
        for kind, result in results.items()
        for name, entry in result.get("alternating", {}).items()
    ]
    if not rows:
        return
    common.print_table(["client", "variant", "requests", "median us", "+us vs static", "ratio"], rows)
    print(
        "Variants alternate request by request (sync clients only), so machine drift cancels out:\n"
        "ratio = static's median latency / this one's. The most precise of these numbers."
    )


def print_throughput(results: dict[str, dict[str, Any]]) -> None:
    """One table: per client kind and variant, median rate and latency, and the comparisons to ``static``."""
    rows = []
    for kind, result in results.items():
        static_us = 1e6 / result["variants"]["static"]["rps"]["median"]
        for name, entry in result["variants"].items():
            ratio = entry["ratio"] or {}
            rows.append(
                [
                    kind,
                    result["concurrency"],
                    name,
                    entry["rps"]["median"],
                    f"{1e6 / entry['rps']['median'] - static_us:+.1f}" if ratio else "",
                    entry["latency_us"]["median"],
                    entry["cpu_us_per_request"]["median"],
                    f"{ratio['rps']:.3f}" if ratio else "",
                    f"{ratio['paired']:.3f} ({ratio['paired_min']:.2f}-{ratio['paired_max']:.2f})" if ratio else "",
                    f"{ratio['cpu']:.3f}" if ratio else "",
                ]
            )
    common.print_table(
        [
            "client",
            "tasks",
            "variant",
            "rps",
            "+us/req",
            "latency us",
            "cpu us/req",
            "rps ratio",
            "paired (range)",
            "cpu ratio",
        ],
        rows,
    )
    print(
        "Medians over rounds (rps, cpu us/req: this process's CPU time per request) or over requests (latency).\n"
        "+us/req = 1/rps - 1/static's rps: the extra client time per request (async: of all tasks together).\n"
        "rps ratio = rps / static's rps; paired = median over rounds of that ratio within the same round;\n"
        "cpu ratio = static's cpu us/req / this one's (the JSON also has a median-latency ratio).\n"
        "1.000 = no overhead, below 1 = slower than the static header; target >= 0.97.\n"
        f"'{CONTROL}' is the static variant run again: its ratios are pure noise (this run's resolution)."
    )


# -- client-side overhead without the network ---------------------------------------------------------


def _sync_step(auth: httpx.Auth, request: httpx.Request) -> None:
    """What httpx does with an auth before sending: start the flow, take the request, close the flow."""
    flow = auth.sync_auth_flow(request)
    next(flow)
    flow.close()


def _async_step(auth: httpx.Auth, request: httpx.Request) -> None:
    """The async flow's first step, driven without an event loop (the fast path never suspends)."""
    flow = auth.async_auth_flow(request)
    step = flow.__anext__()
    try:
        step.send(None)
    except StopIteration:
        pass
    else:
        step.close()
        raise RuntimeError("the async fast path suspended: it waited on I/O")
    closing = flow.aclose()
    with contextlib.suppress(StopIteration):
        closing.send(None)


def _new_auth_step(manager: hua.TokenManager, request: httpx.Request) -> None:
    """A gateway's whole per-request cost before sending: make the auth, run its first step."""
    _sync_step(manager.auth(SESSION), request)


def measure_overhead(managers: dict[str, hua.TokenManager], url: str) -> dict[str, dict[str, float]]:
    """Microseconds per call (median of timeit runs) for each pre-send step, and the baseline."""
    request = httpx.Request("GET", url)
    value = STATIC_HEADERS["Authorization"]
    steps: dict[str, Callable[[], object]] = {
        "set header (baseline)": lambda: request.headers.__setitem__("Authorization", value),
        "httpx no-op Auth flow": lambda: _sync_step(httpx.Auth(), request),
    }
    for storage, manager in managers.items():
        auth = manager.auth(SESSION)
        steps[f"sync flow [{storage}]"] = functools.partial(_sync_step, auth, request)
        steps[f"async flow [{storage}]"] = functools.partial(_async_step, auth, request)
        steps[f"manager.auth() + sync flow [{storage}]"] = functools.partial(_new_auth_step, manager, request)
    results = {name: common.per_call(func).scaled(1e6).as_dict() for name, func in steps.items()}
    # From the minimum (the least disturbed run): what the step costs when nothing else interferes.
    baseline = results["set header (baseline)"]["min"]
    for entry in results.values():
        entry["overhead_us"] = entry["min"] - baseline
    return results


def print_overhead(results: dict[str, dict[str, float]], request_us: float | None) -> None:
    """The overhead table; with ``request_us`` (one sync request's time), the ratio it predicts."""
    rows = []
    for name, entry in results.items():
        predicted = "" if request_us is None else f"{request_us / (request_us + entry['overhead_us']):.4f}"
        rows.append([name, entry["median"], entry["min"], entry["overhead_us"], predicted])
    common.print_table(["step before sending", "median us", "min us", "+us vs header (min)", "predicted ratio"], rows)
    if request_us is not None:
        print(f"(predicted ratio = one sync httpx request over loopback, {request_us:.1f} us, plus the overhead)")


# -- cost of manager.auth() ---------------------------------------------------------------------------


def measure_construction(sessions: int) -> dict[str, dict[str, Any]]:
    """Nanoseconds per ``manager.auth(sid)`` and per cached ``manager.get_token(sid)``, by store size."""
    results: dict[str, dict[str, Any]] = {}
    for count in sorted({1, sessions}):
        started = time.perf_counter()
        manager = make_manager(hua.MemoryStorage(), sessions=count)
        filled = time.perf_counter() - started
        manager.get_token(SESSION)
        results[str(count)] = {
            "sessions": count,
            "fill_seconds": filled,
            "auth_ns": common.per_call(functools.partial(manager.auth, SESSION)).scaled(1e9).as_dict(),
            "get_token_ns": common.per_call(functools.partial(manager.get_token, SESSION)).scaled(1e9).as_dict(),
        }
        manager.close()
    return results


def print_construction(results: dict[str, dict[str, Any]]) -> None:
    """One row per store size."""
    rows = [
        [
            entry["sessions"],
            entry["auth_ns"]["median"],
            entry["auth_ns"]["min"],
            entry["get_token_ns"]["median"],
            entry["fill_seconds"],
        ]
        for entry in results.values()
    ]
    common.print_table(
        ["stored sessions", "auth() median ns", "auth() min ns", "get_token() cached ns", "fill s"], rows
    )


# -- main ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one variant's round (default 0.5)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per variant (default 20)")
    parser.add_argument(
        "--mock-seconds", type=float, default=0.2, help="round length without network (MockTransport; 0.2)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="asyncio tasks for async clients (16)")
    parser.add_argument("--sessions", type=int, default=100_000, help="stored sessions for the O(1) check")
    parser.add_argument("--clients", default=",".join(CLIENT_KINDS), help="comma-separated client kinds")
    parser.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the static variant twice (A/A), to show the noise floor (default: on)",
    )
    common.add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the three measurements and print them."""
    args = parse_args(argv)
    pinning = common.pin_cpus(args.pin)
    print(f"hot path: {common.machine_description()} ({pinning})")
    kinds = client_kinds([name.strip() for name in args.clients.split(",") if name.strip()])
    with common.count_violations_exit(), contextlib.ExitStack() as stack:
        managers = {name: make_manager(factory(stack)) for name, factory in common.select_storages(args.storages)}
        for manager in managers.values():
            stack.callback(manager.close)
        server = stack.enter_context(common.ServerProcess("bearer"))
        url = server.url + "/api/me"

        print(f"\n## 1. throughput over loopback: {args.rounds} rounds x {args.seconds:g}s per variant, interleaved")
        print("server: dedicated Bearer-accepting ASGI app under uvicorn, in a child process")
        throughput = {}
        for kind in kinds:
            throughput[kind.name] = measure_client(
                kind,
                url,
                managers,
                rounds=args.rounds,
                seconds=args.seconds,
                concurrency=args.concurrency,
                control=args.control,
            )
        print_throughput(throughput)
        print(f"\n1b. sync clients, requests alternating one by one ({args.rounds * args.seconds:g}s in all)")
        print_alternating(throughput)

        print(f"\n## 2. client-side overhead per request, no network ({args.rounds} rounds x {args.mock_seconds:g}s)")
        print("2a. whole requests through an in-process MockTransport (no socket, no server)")
        in_process = {}
        for kind in kinds:
            in_process[kind.name] = measure_client(
                kind,
                url,
                managers,
                rounds=args.rounds,
                seconds=args.mock_seconds,
                concurrency=args.concurrency,
                control=args.control,
                in_process=True,
            )
        print_throughput(in_process)
        print(f"\n2a'. the same, sync clients alternating one request at a time ({args.rounds * args.mock_seconds:g}s)")
        print_alternating(in_process)
        print("\n2b. the step the auth runs before a request is sent (timeit)")
        overhead = measure_overhead(managers, url)
        request_us = None
        if "httpx" in throughput:
            request_us = 1e6 / throughput["httpx"]["variants"]["static"]["rps"]["median"]
        print_overhead(overhead, request_us)

    print(f"\n## 3. cost of manager.auth(session_id): O(1), no I/O (memory storage, {args.sessions:,} sessions)")
    construction = measure_construction(args.sessions)
    print_construction(construction)
    common.write_json(
        args.json,
        {
            "benchmark": "hot_path",
            "settings": {k: str(v) for k, v in vars(args).items()},
            "pinning": pinning,
            "throughput": throughput,
            "in_process": in_process,
            "overhead_us": overhead,
            "construction": construction,
        },
    )


if __name__ == "__main__":
    main()
