"""Refresh latency as callers see it, and how many refreshes a herd causes (it must be one).

Against :class:`~httpx_upstream_auth.testing.LocalProvider` (``token_delay=0``, rotating refresh tokens)
served by uvicorn in a child process, each trial logs a new grant in, stores it for a new session, and
times ``client.get("/api/me", auth=manager.auth(session))`` until its 200, in three scenarios:

* ``valid``: the token is good (the baseline: one request, no refresh);
* ``expired``: the stored token's ``expires_at`` has passed, so the manager refreshes *before* sending
  (one token request, then the API request);
* ``rejected``: the token looks valid but the provider revoked it, so the API answers 401 and the auth
  refreshes and replays (API request, token request, API request again).

Modes: one sync caller (``httpx.Client``), one asyncio caller (``httpx.AsyncClient``), and a herd of
``--herd`` asyncio tasks released together on the same session (per-task latency from the release to
its 200; median and p99 over all tasks of all trials). The scenarios are interleaved trial by trial.
Counts are asserted: every answer is a 200, and each trial makes exactly the expected number of
refreshes at the provider (0 or 1, whatever the herd size); a violation exits with status 3.

Run ``python benchmarks/bench_refresh.py [--trials N] [--herd 100] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any

import _common as common
import attrs
import httpx

import httpx_upstream_auth as hua

SCENARIOS = ("valid", "expired", "rejected")
EXPECTED_REFRESHES = {"valid": 0, "expired": 1, "rejected": 1}
MODES = ("sync, 1 caller", "asyncio, 1 caller", "asyncio herd")


class ProviderControl:
    """Drives the LocalProvider in the server process through its ``/_bench/`` routes (untimed)."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url)

    def tokens(self, scenario: str) -> hua.UpstreamTokens:
        """Log a new grant in and shape its tokens for ``scenario``."""
        tokens = hua.UpstreamTokens.from_json(self.client.post("/_bench/login").content)
        if scenario == "expired":
            now = time.time()
            tokens = attrs.evolve(tokens, expires_at=now - 1, issued_at=now - 61)
        elif scenario == "rejected":
            self.client.post("/_bench/revoke", content=tokens.access_token).raise_for_status()
        return tokens

    def refreshes(self) -> int:
        """Successful refreshes so far."""
        return int(json.loads(self.client.get("/_bench/stats").content)["refresh_ok"])

    def close(self) -> None:
        """Close the control client."""
        self.client.close()


class Trials:
    """Per-request latencies by mode and scenario, and the count checks."""

    def __init__(self, control: ProviderControl) -> None:
        self.control = control
        self.latencies: dict[str, dict[str, list[float]]] = {m: {s: [] for s in SCENARIOS} for m in MODES}
        self.herd_walls: dict[str, list[float]] = {s: [] for s in SCENARIOS}
        self.refresh_counts: dict[str, dict[str, list[int]]] = {m: {s: [] for s in SCENARIOS} for m in MODES}

    def check(self, mode: str, scenario: str, before: int, statuses: Sequence[int]) -> None:
        """Record this trial's refreshes; raise :class:`CountViolation` on a wrong count or a non-200."""
        refreshes = self.control.refreshes() - before
        self.refresh_counts[mode][scenario].append(refreshes)
        bad = [status for status in statuses if status != 200]
        if bad:
            raise common.CountViolation(f"{mode}/{scenario}: {len(bad)} of {len(statuses)} answers not 200: {bad[:5]}")
        if refreshes != EXPECTED_REFRESHES[scenario]:
            raise common.CountViolation(
                f"{mode}/{scenario}: {refreshes} refreshes for {len(statuses)} callers, "
                f"expected {EXPECTED_REFRESHES[scenario]}"
            )


def run_sync(trials: Trials, manager: hua.TokenManager, url: str, count: int, prefix: str) -> None:
    """One sync caller: ``count`` trials of each scenario, interleaved; the first round is warm-up."""
    mode = MODES[0]
    with httpx.Client() as client:
        for index in range(count + 1):
            for scenario in SCENARIOS:
                session = f"{prefix}-sync-{scenario}-{index}"
                manager.store(session, trials.control.tokens(scenario))
                before = trials.control.refreshes()
                started = time.perf_counter()
                response = client.get(url, auth=manager.auth(session))
                elapsed = time.perf_counter() - started
                trials.check(mode, scenario, before, [response.status_code])
                if index:
                    trials.latencies[mode][scenario].append(elapsed)


async def run_async(
    trials: Trials,
    manager: hua.TokenManager,
    url: str,
    count: int,
    herd: int,
    herd_count: int,
    prefix: str,
    connections: int,
) -> None:
    """One asyncio caller, then a herd of ``herd`` tasks; the first round of each is warm-up.

    The client's pool is capped at ``connections``, all kept alive: the pool then looks the same at the
    start of every trial whatever the storage. (Uncapped, a storage whose refresh path is slower makes
    the herd hold more connections at once; the pool grows, and httpcore's per-request pool scan, linear
    in the connections, slows every later herd: an artefact of the client, not of the storage.)
    """
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits) as client:
        for callers, rounds, mode in ((1, count, MODES[1]), (herd, herd_count, MODES[2])):
            for index in range(rounds + 1):
                for scenario in SCENARIOS:
                    session = f"{prefix}-async-{callers}-{scenario}-{index}"
                    await manager.astore(session, trials.control.tokens(scenario))
                    before = trials.control.refreshes()
                    latencies, statuses, wall = await _herd(client, manager.auth(session), url, callers)
                    trials.check(mode, scenario, before, statuses)
                    if index:
                        trials.latencies[mode][scenario].extend(latencies)
                        if callers > 1:
                            trials.herd_walls[scenario].append(wall)


async def _herd(
    client: httpx.AsyncClient, auth: hua.UpstreamAuth, url: str, callers: int
) -> tuple[list[float], list[int], float]:
    """Release ``callers`` tasks at once on one session; each task's latency, its status, and the wall time."""
    go = asyncio.Event()
    latencies: list[float] = []
    statuses: list[int] = []

    async def caller() -> None:
        await go.wait()
        started = time.perf_counter()
        response = await client.get(url, auth=auth)
        latencies.append(time.perf_counter() - started)
        statuses.append(response.status_code)

    tasks = [asyncio.create_task(caller()) for _ in range(callers)]
    await asyncio.sleep(0)  # every task is now waiting on the event
    released = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    return latencies, statuses, time.perf_counter() - released


def summarize(trials: Trials) -> dict[str, Any]:
    """Milliseconds by mode and scenario, plus the refresh cost (median expired/rejected minus valid)."""
    results: dict[str, Any] = {}
    for mode in MODES:
        results[mode] = {}
        for scenario in SCENARIOS:
            samples = trials.latencies[mode][scenario]
            counts = trials.refresh_counts[mode][scenario]
            results[mode][scenario] = {
                "latency_ms": common.Summary.of(samples).scaled(1e3).as_dict(),
                "refreshes_per_trial": sorted(set(counts)),
                "trials": len(counts) - 1,
            }
            if mode == MODES[2]:
                results[mode][scenario]["herd_wall_ms"] = (
                    common.Summary.of(trials.herd_walls[scenario]).scaled(1e3).as_dict()
                )
        valid = results[mode]["valid"]["latency_ms"]["median"]
        for scenario in SCENARIOS[1:]:
            results[mode][scenario]["refresh_cost_ms"] = results[mode][scenario]["latency_ms"]["median"] - valid
    return results


def print_results(storage: str, results: dict[str, Any], herd: int) -> None:
    """One table per storage."""
    rows = []
    for mode, by_scenario in results.items():
        for scenario, entry in by_scenario.items():
            latency = entry["latency_ms"]
            wall = entry.get("herd_wall_ms")
            cost = entry.get("refresh_cost_ms")
            rows.append(
                [
                    mode,
                    scenario,
                    latency["n"],
                    latency["median"],
                    latency["p99"],
                    latency["max"],
                    "" if cost is None else f"{cost:+.2f}",
                    "" if wall is None else f"{wall['median']:.1f}",
                    ",".join(map(str, entry["refreshes_per_trial"])),
                ]
            )
    print(f"\nstorage: {storage}")
    common.print_table(
        [
            "mode",
            "scenario",
            "samples",
            "median ms",
            "p99 ms",
            "max ms",
            "vs valid ms",
            "herd wall ms",
            "refreshes/trial",
        ],
        rows,
    )
    print(
        f"latency: each caller's, from its request (herd: from the release of {herd} tasks) to its 200.\n"
        "vs valid: median minus the valid scenario's median in the same mode (the refresh's cost).\n"
        "herd wall: from the release to the last task's 200. refreshes/trial: at the provider, every trial."
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=30, help="single-caller trials per scenario (30)")
    parser.add_argument("--herd", type=int, default=100, help="asyncio tasks in a herd (100)")
    parser.add_argument("--herd-trials", type=int, default=10, help="herd trials per scenario (10)")
    parser.add_argument("--connections", type=int, default=10, help="async client's connection pool size (10)")
    common.add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run every mode and scenario for each storage; print and optionally save the results."""
    args = parse_args(argv)
    pinning = common.pin_cpus(args.pin)
    print(f"refresh: {common.machine_description()} ({pinning})")
    print("provider: LocalProvider(token_delay=0, rotate=True) under uvicorn, in a child process")
    results: dict[str, Any] = {}
    with common.count_violations_exit(), contextlib.ExitStack() as stack:
        server = stack.enter_context(common.ServerProcess("provider"))
        control = ProviderControl(server.url)
        stack.callback(control.close)
        for storage, factory in common.select_storages(args.storages):
            with contextlib.ExitStack() as storage_stack:
                manager = hua.TokenManager(
                    refresher=hua.OAuth2Refresher(
                        token_url=server.url + "/token", client_id="test-client", client_secret="test-secret"
                    ),
                    provider_id="local",
                    storage=factory(storage_stack),
                )
                storage_stack.callback(manager.close)
                trials = Trials(control)
                url = server.url + "/api/me"
                run_sync(trials, manager, url, args.trials, storage)
                asyncio.run(
                    run_async(trials, manager, url, args.trials, args.herd, args.herd_trials, storage, args.connections)
                )
                results[storage] = summarize(trials)
                print_results(storage, results[storage], args.herd)
    common.write_json(
        args.json,
        {
            "benchmark": "refresh",
            "settings": {k: str(v) for k, v in vars(args).items()},
            "pinning": pinning,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
