"""Run every benchmark with short settings and print a summary.

``python benchmarks/run_all.py [--storages memory,sqlite,redis] [--pin]`` takes about a minute and a
half on 2 cores with the memory storage. Each benchmark runs in its own process (so one crashing does
not hide the others) and writes JSON, from which the summary is made. Exit status: 0 when every
benchmark finished; otherwise 1, naming the ones that crashed or found a count violation (a wrong
number of refreshes, a non-200 answer). Timings are never judged here: they are printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as common

HERE = Path(__file__).resolve().parent
TIMEOUT = 600.0


def summarize_hot_path(data: dict[str, Any]) -> list[str]:
    """Ratios per client over loopback and in process, the pre-send step, and ``manager.auth()``."""
    lines = ["auth vs static header on the same client (ratio 1.000 = no overhead; A/A = noise floor):"]
    for section, label in (("throughput", "loopback"), ("in_process", "in-process")):
        for kind, result in data[section].items():
            static_us = 1e6 / result["variants"]["static"]["rps"]["median"]
            parts = []
            for name, entry in result["variants"].items():
                if entry["ratio"] is not None:
                    extra = 1e6 / entry["rps"]["median"] - static_us
                    parts.append(f"{name} {entry['ratio']['rps']:.3f} ({extra:+.1f} us)")
            lines.append(f"  {label:<10} {kind:<13} static {static_us:7.1f} us/req; " + "; ".join(parts))
            alternating = [
                f"{name} {entry['ratio']:.4f} ({entry['extra_us']:+.1f} us)"
                for name, entry in result.get("alternating", {}).items()
                if name != "static"
            ]
            if alternating:
                lines.append(f"  {'':<10} {'':<13} request by request: " + "; ".join(alternating))
    steps = data["overhead_us"]
    lines.append("pre-send step (min us): " + ", ".join(f"{name} {e['min']:.2f}" for name, e in steps.items()))
    lines.append(
        "manager.auth() median ns: "
        + ", ".join(f"{e['sessions']:,} sessions {e['auth_ns']['median']:.0f}" for e in data["construction"].values())
    )
    return lines


def summarize_refresh(data: dict[str, Any]) -> list[str]:
    """Median/p99 per mode for the expired scenario, and the refresh counts."""
    lines = []
    for storage, by_mode in data["results"].items():
        for mode, by_scenario in by_mode.items():
            cells = []
            for scenario in ("expired", "rejected"):
                entry = by_scenario[scenario]
                latency = entry["latency_ms"]
                refreshes = ",".join(map(str, entry["refreshes_per_trial"]))
                cells.append(
                    f"{scenario} median {latency['median']:.1f} p99 {latency['p99']:.1f} ms (refreshes {refreshes})"
                )
            lines.append(f"  [{storage}] {mode:<17}: " + "; ".join(cells))
    return lines


def summarize_storages(data: dict[str, Any]) -> list[str]:
    """Refresh through each storage's lease, and save-to-use across processes."""
    lines = [
        f"  refresh via lease [{name}]: median {r['median']:.2f} p99 {r['p99']:.2f} ms"
        for name, r in data["refresh_ms"].items()
    ]
    lines += [
        f"  save -> other process [{name}]: median {r['median']:.2f} p99 {r['p99']:.2f} ms"
        for name, r in data["save_to_use_ms"].items()
    ]
    return lines


@dataclass(frozen=True)
class Benchmark:
    """One benchmark script, its short settings, and how to summarize its JSON."""

    name: str
    script: str
    args: tuple[str, ...]
    summarize: Callable[[dict[str, Any]], list[str]]


BENCHMARKS = (
    Benchmark(
        "hot path",
        "bench_hot_path.py",
        ("--seconds", "0.2", "--mock-seconds", "0.1", "--rounds", "10"),
        summarize_hot_path,
    ),
    Benchmark("refresh", "bench_refresh.py", ("--trials", "10", "--herd-trials", "3"), summarize_refresh),
    Benchmark("storages", "bench_storages.py", ("--trials", "10"), summarize_storages),
)


def run(benchmark: Benchmark, extra: Sequence[str], folder: Path) -> tuple[int, list[str]]:
    """Run one benchmark (its output goes straight through); its exit status and summary lines."""
    out = folder / f"{benchmark.script}.json"
    command = [sys.executable, str(HERE / benchmark.script), *benchmark.args, *extra, "--json", str(out)]
    print(f"\n===== {benchmark.name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command)
    try:
        status = process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the benchmark stops the servers it started, then exits
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return -1, [f"timed out after {TIMEOUT:.0f}s"]
    elapsed = time.perf_counter() - started
    if status != 0:
        kind = "count violation" if status == common.COUNT_VIOLATION_EXIT else "crashed"
        return status, [f"{kind} (exit status {status}) after {elapsed:.0f}s"]
    return 0, [f"finished in {elapsed:.0f}s", *benchmark.summarize(json.loads(out.read_text()))]


def main(argv: Sequence[str] | None = None) -> None:
    """Run them all, print the summary, exit 1 if any failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--storages", default="memory", help="passed to each benchmark (default: memory)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=False, help="passed through")
    args = parser.parse_args(argv)
    extra = ["--storages", args.storages, "--pin" if args.pin else "--no-pin"]
    failed = []
    summary: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hua-bench-") as folder:
        for benchmark in BENCHMARKS:
            status, lines = run(benchmark, extra, Path(folder))
            if status != 0:
                failed.append(benchmark.name)
            summary += [f"{benchmark.name}: {lines[0]}", *lines[1:]]
    print(f"\n===== summary ({time.perf_counter() - started:.0f}s, {common.machine_description()['cpus']} CPUs)")
    print("\n".join(summary))
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
