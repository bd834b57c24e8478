"""Latency of requests near an expiry against steady state, with refresh-ahead off and on.

Against :class:`~httpx_upstream_auth.testing.LocalProvider` (rotating refresh tokens) served by uvicorn in
a child process, ``--workers`` asyncio tasks share one session whose access tokens live ``--ttl`` seconds,
each sending ``client.get("/api/me", auth=manager.auth(session))`` back to back for ``--seconds``. The
refresher records when each token request starts and ends. A request is *near an expiry* when it started
while a token request was in flight (classified by its start, not by overlap, which would favour long
requests); every other request is *steady*. With refresh-ahead off, the near requests include those that waited for
the refresh; with it on (``TokenManager(refresh_ahead=--ahead)``), they ran beside a background refresh.

Variants alternate round by round (off, on, on, off, ...), each round with a new manager and a new grant.
Reported per variant: median and p99 of near and steady requests, and p99 near / p99 steady. Answers other
than 200 are printed; a refresh token presented twice is a count violation (exit status 3).

Run ``python benchmarks/bench_refresh_ahead.py [--workers 20] [--ttl 2] [--seconds 10] [--rounds 4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common as common
import httpx

import httpx_upstream_auth as hua
from httpx_upstream_auth._clock import Clock

VARIANTS = ("off", "on")


class TimedRefresher(hua.OAuth2Refresher):
    """An OAuth2Refresher that records each token request's (start, end) on the perf_counter clock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spans: list[tuple[float, float]] = []

    def refresh(self, tokens: hua.UpstreamTokens, clock: Clock) -> hua.UpstreamTokens:
        started = time.perf_counter()
        try:
            return super().refresh(tokens, clock)
        finally:
            self.spans.append((started, time.perf_counter()))

    async def arefresh(self, tokens: hua.UpstreamTokens, clock: Clock) -> hua.UpstreamTokens:
        started = time.perf_counter()
        try:
            return await super().arefresh(tokens, clock)
        finally:
            self.spans.append((started, time.perf_counter()))


def stats(url: str) -> dict[str, int]:
    """The provider's counters."""
    return dict(json.loads(httpx.get(url + "/_bench/stats").content))


async def one_round(
    url: str, args: argparse.Namespace, ahead: float, tokens: hua.UpstreamTokens
) -> tuple[list[float], list[float], int]:
    """One manager, one session (``tokens``), ``args.workers`` tasks for ``args.seconds``: (near, steady)
    latencies, and the refreshes made."""
    refresher = TimedRefresher(token_url=url + "/token", client_id="test-client", client_secret="test-secret")
    manager = hua.TokenManager(refresher=refresher, provider_id="local", refresh_ahead=ahead)
    await manager.astore("bench", tokens)
    auth = manager.auth("bench")
    requests: list[tuple[float, float]] = []
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=args.workers, max_keepalive_connections=args.workers)
    async with httpx.AsyncClient(limits=limits) as client:
        await client.get(url + "/api/me", auth=auth)  # warm the pool's first connection
        end = time.perf_counter() + args.seconds

        async def worker() -> None:
            while (started := time.perf_counter()) < end:
                response = await client.get(url + "/api/me", auth=auth)
                requests.append((started, time.perf_counter()))
                statuses.append(response.status_code)

        await asyncio.gather(*(worker() for _ in range(args.workers)))
    await manager.aclose()
    bad = sorted(status for status in statuses if status != 200)
    if bad:
        # Reported, not fatal: a 2-second token can expire while a request queues on a loaded machine.
        print(f"refresh_ahead={ahead:g}: {len(bad)} of {len(statuses)} answers not 200: {bad[:10]}")
    near: list[float] = []
    steady: list[float] = []
    for started, ended in requests:
        # By start time, not overlap: a long request overlaps more refreshes, which would bias "near" upwards.
        during = any(r_start <= started <= r_end for r_start, r_end in refresher.spans)
        (near if during else steady).append(ended - started)
    return near, steady, len(refresher.spans)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workers", type=int, default=20, help="asyncio tasks sharing the session (20)")
    parser.add_argument("--ttl", type=float, default=2.0, help="access token lifetime, seconds (2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a round (10)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per variant (4)")
    parser.add_argument("--ahead", type=float, default=1.0, help="refresh_ahead of the 'on' variant (1.0)")
    parser.add_argument("--json", type=Path, default=None, help="write the numbers to this file")
    parser.add_argument("--pin", action="store_true", help="pin this process and the server to separate CPUs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Alternate the variants round by round; print and optionally save the results."""
    args = parse_args(argv)
    pinning = common.pin_cpus(args.pin)
    print(f"refresh-ahead: {common.machine_description()} ({pinning})")
    print(f"{args.workers} asyncio workers, one session, {args.ttl:g}-second tokens, {args.seconds:g} s rounds")
    samples: dict[str, dict[str, list[float]]] = {v: {"near": [], "steady": []} for v in VARIANTS}
    refreshes = dict.fromkeys(VARIANTS, 0)
    with common.count_violations_exit(), common.ServerProcess("provider") as server:
        before = stats(server.url)
        for index in range(args.rounds):
            order = VARIANTS if index % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                ahead = args.ahead if variant == "on" else 0.0
                tokens = hua.UpstreamTokens.from_json(httpx.post(f"{server.url}/_bench/login?ttl={args.ttl}").content)
                near, steady, count = asyncio.run(one_round(server.url, args, ahead, tokens))
                samples[variant]["near"] += near
                samples[variant]["steady"] += steady
                refreshes[variant] += count
        after = stats(server.url)
        if after["refresh_reuse"] != before["refresh_reuse"]:
            raise common.CountViolation(f"{after['refresh_reuse'] - before['refresh_reuse']} refresh tokens reused")
    results: dict[str, Any] = {}
    rows = []
    for variant in VARIANTS:
        near_ms = common.Summary.of(samples[variant]["near"]).scaled(1e3).as_dict()
        steady_ms = common.Summary.of(samples[variant]["steady"]).scaled(1e3).as_dict()
        ratio = near_ms["p99"] / steady_ms["p99"]
        results[variant] = {
            "near_ms": near_ms,
            "steady_ms": steady_ms,
            "p99_ratio": ratio,
            "refreshes": refreshes[variant],
        }
        rows.append(
            [
                variant,
                refreshes[variant],
                near_ms["n"],
                near_ms["median"],
                near_ms["p99"],
                steady_ms["n"],
                steady_ms["median"],
                steady_ms["p99"],
                f"{ratio:.2f}",
            ]
        )
    common.print_table(
        [
            "refresh_ahead",
            "refreshes",
            "near n",
            "near median ms",
            "near p99 ms",
            "steady n",
            "steady median ms",
            "steady p99 ms",
            "p99 near/steady",
        ],
        rows,
    )
    print("near: requests started while a token request was in flight; steady: all others. 0 refresh tokens reused.")
    common.write_json(
        args.json,
        {
            "benchmark": "refresh_ahead",
            "settings": {k: str(v) for k, v in vars(args).items()},
            "pinning": pinning,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
