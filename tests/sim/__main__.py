"""Command line: replay one seed with its trace, or sweep a range of seeds and summarize.

python -m tests.sim --seed 1234            # plan, trace and violations of one schedule
python -m tests.sim --start 0 --count 10000  # sweep; prints each category with the seeds that hit it
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from .runner import KNOWN_BUGS, run_schedule


def main(argv: list[str] | None = None) -> int:
    """Replay (``--seed``) or sweep (``--start``/``--count``); exit status 1 when an invariant broke."""
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="replay this schedule and print its trace")
    parser.add_argument("--start", type=int, default=0, help="first seed of a sweep")
    parser.add_argument("--count", type=int, default=1000, help="number of seeds in a sweep")
    parser.add_argument("--show", type=int, default=10, help="seeds listed per category in a sweep")
    args = parser.parse_args(argv)
    if args.seed is not None:
        result = run_schedule(args.seed)
        print(result.report())
        return 1 if result.violations or result.error else 0
    started = time.perf_counter()
    seen: dict[str, list[int]] = collections.defaultdict(list)
    failing = 0
    for seed in range(args.start, args.start + args.count):
        result = run_schedule(seed)
        failing += bool(result.categories)
        for category in dict.fromkeys(result.categories):
            seen[category].append(seed)
    took = time.perf_counter() - started
    print(
        f"{args.count} schedules (seeds {args.start}..{args.start + args.count - 1}) in {took:.1f}s: "
        f"{args.count / took:.0f} schedules/s; {failing} broke an invariant"
    )
    for category, seeds in sorted(seen.items(), key=lambda item: -len(item[1])):
        known = f"  (known bug {KNOWN_BUGS[category]})" if category in KNOWN_BUGS else ""
        print(f"  {category:45s} {len(seeds):6d} schedules, e.g. {seeds[: args.show]}{known}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
