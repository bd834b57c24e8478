"""Mutation check of the simulation: does it notice when a protocol guard is broken?

Each mutant is one small edit (file, exact original text, replacement) to a *copy* of the package in a
temporary directory; the real tree is never touched. For each one the simulation runs over a range of
seeds (in a fresh interpreter that imports the copy) and, optionally, named pytest tests run against
the copy. A mutant is **killed** when it produces a violation category the unmutated copy does not in the
same seeds (today's code has findings of its own, so the baseline is subtracted), or a named test fails;
otherwise it **survived**. A mutant whose original text is no longer in the code prints
``n/a (code changed)``.

    python -m tests.sim.mutants                       # every mutant, 2,000 seeds each
    python -m tests.sim.mutants --count 500 --only waiter-epoch,discard-any-version
    python -m tests.sim.mutants --pytest tests/test_refresh.py::test_x   # also run these tests per mutant
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "httpx_upstream_auth"


@dataclass(frozen=True)
class Mutant:
    """One edit: in ``file`` (relative to the package), ``original`` becomes ``replacement``."""

    name: str
    file: str
    original: str
    replacement: str
    description: str


A = "_async/_manager.py"
MUTANTS = [
    Mutant(
        "waiter-epoch", A,
        "if outcome.abandoned or state.epoch(key) != flight.epoch:\n                continue  # the job was stopped",
        "if outcome.abandoned:\n                continue  # the job was stopped",
        "(a) a refresh waiter does not compare its flight's epoch (a login since the job began)",
    ),
    Mutant(
        "reader-epoch", A,
        "if outcome.abandoned or state.epoch(key) != flight.epoch:\n                continue  # its reader",
        "if outcome.abandoned:\n                continue  # its reader",
        "a shared-read waiter does not compare its flight's epoch",
    ),
    Mutant(
        "discard-any-version", A,
        "await state.storage.adelete(key, expected_version=current.version)",
        "await state.storage.adelete(key)",
        "(b) the fail-closed delete does not check the version (deletes a login made meanwhile)",
    ),
    Mutant(
        "sqlite-put-no-entry", "_sqlite.py",
        "if (None if row is None else row[0]) != expected_version:",
        "if row is not None and row[0] != expected_version:",
        "(c) a SQLite put with an expected version succeeds when there is no entry",
    ),
    Mutant(
        "sqlite-delete-any-version", "_sqlite.py",
        "AND (? IS NULL OR version = ?)",
        "AND (? IS NULL OR version = ? OR 1)",
        "a SQLite delete with an expected version deletes whatever version is there",
    ),
    Mutant(
        "no-mark-consumed", A,
        "state.mark_consumed(current.refresh_token)",
        "None",
        "the refresh token is not remembered as presented before sending",
    ),
    Mutant(
        "ignore-consumed", A,
        "if state.is_consumed(current.refresh_token):",
        "if False:",
        "a refresh token this process presented (result unknown) may be presented again",
    ),
    Mutant(
        "no-renew-before-send", A,
        "if await state.storage.arenew_lease(lease) is False:",
        "if False:",
        "the lease is not confirmed (renewed) before the refresh token leaves",
    ),
    Mutant(
        "keeper-never-renews", A,
        "AsyncLeaseKeeper(functools.partial(state.storage.arenew_lease, lease), state.lease_ttl)",
        "AsyncLeaseKeeper(functools.partial(state.storage.arenew_lease, lease), 1e9)",
        "the lease keeper never renews the lease while the provider answers",
    ),
    Mutant(
        "refresh-unbounded", A,
        "with AsyncDeadline(state.refresh_timeout) as deadline:",
        "with AsyncDeadline(100 * state.refresh_timeout) as deadline:",
        "refresh_timeout does not bound the token request (answers outlive the lease)",
    ),
    Mutant(
        "retries-outlive-lease", A,
        "give_up = state.clock.monotonic() + state.refresh_timeout",
        "give_up = state.clock.monotonic() + 10 * state.refresh_timeout",
        "save/delete retries go on long after the lease stopped being renewed",
    ),
    Mutant(
        "lost-answer-kept", A,
        "if exc.may_have_rotated:\n                await self._discard(key, current)",
        "if exc.may_have_rotated:\n                pass",
        "an answer lost after the token may have rotated does not fail closed",
    ),
    Mutant(
        "mismatch-kept", A,
        "except BindingMismatch:\n            await self._discard(key, current)",
        "except BindingMismatch:\n            pass",
        "a binding mismatch after rotation does not fail closed",
    ),
    Mutant(
        "invalid-grant-any-entry", A,
        "if again is None or again.version == current.version:\n                raise",
        "if again is None:\n                raise",
        "after invalid_grant, an unchanged entry counts as someone else's refresh",
    ),
    Mutant(
        "landed-ignores-version", A,
        "if again is None or again.version != current.version:\n            return False",
        "if again is None:\n            return False",
        "after a failed write, only a deleted entry counts as someone else's write",
    ),
    Mutant(
        "remember-any-epoch", "_state.py",
        "if self._epochs.get(key.session_id, self._epoch_floor) != epoch:\n                return",
        "if False:\n                return",
        "the cache takes results of work that began before a logout/login",
    ),
    Mutant(
        "ignore-change-notices", "_state.py",
        "if digest is not None and _writing.get() == (id(self), digest):",
        "if digest is not None:",
        "change notices of other workers are ignored (other processes' logouts)",
    ),
    Mutant(
        "delete-no-second-epoch", A,
        "state.new_epoch(key)  # a read that raced the delete must not cache the deleted entry",
        "pass",
        "a logout does not bump the epoch after the delete (a racing read caches the deleted entry)",
    ),
    Mutant(
        "dead-flight-joined", "_state.py",
        "if flight is not None and flight.alive():",
        "if flight is not None:",
        "a flight whose loop closed is joined anyway",
    ),
    Mutant(
        "no-distrust", "_async/_auth.py",
        "ops.distrust(self._session_id, retry.access_token)",
        "None",
        "a token refused on its replay is not distrusted (refresh on every 401)",
    ),
    Mutant(
        "binding-not-checked", "_state.py",
        "if tokens.provider_id is not None and tokens.provider_id != self.provider_id:",
        "if False:",
        "an entry of another provider is used",
    ),
]

_PROBE = """
import sys
from tests.sim.runner import run_schedule
for seed in range({start}, {stop}):
    result = run_schedule(seed)
    for category in sorted(set(result.categories)):
        print(seed, category)
"""


def _copy_tree(dest: Path) -> None:
    shutil.copytree(ROOT / PACKAGE, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    # A copy, not a link: the simulation may be edited while the mutants run.
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "conftest.py"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, dest / name)


def _findings(where: Path, start: int, count: int) -> set[tuple[int, str]] | str:
    env = {**os.environ, "PYTHONPATH": str(where), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(start=start, stop=start + count)],
        cwd=where, env=env, capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        return f"crashed: {done.stderr.strip().splitlines()[-1:] or '?'}"
    found = set()
    for line in done.stdout.splitlines():
        seed, _, category = line.partition(" ")
        found.add((int(seed), category))
    return found


def _tests(where: Path, tests: list[str]) -> str | None:
    if not tests:
        return None
    env = {**os.environ, "PYTHONPATH": str(where), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=where, env=env, capture_output=True, text=True, check=False,
    )
    return None if done.returncode == 0 else (done.stdout.strip().splitlines() or ["failed"])[-1]


def main(argv: list[str] | None = None) -> int:
    """Run every (or the named) mutant; print a table of killed / survived."""
    parser = argparse.ArgumentParser(prog="python -m tests.sim.mutants", description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--pytest", action="append", default=[], help="a pytest node id to run per mutant")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="hua-mutants-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        _copy_tree(base)
        started = time.perf_counter()
        baseline = _findings(base, args.start, args.count)
        if isinstance(baseline, str):
            print(f"the unmutated copy {baseline}")
            return 2
        print(f"baseline: {len(baseline)} (seed, category) findings in {args.count} seeds "
              f"({time.perf_counter() - started:.0f}s)")
        base_categories = {c for _, c in baseline}
        print(f"baseline categories: {sorted(base_categories)}")
        rows = []
        for m in chosen:
            where = Path(tmp) / m.name
            where.mkdir()
            _copy_tree(where)
            target = where / PACKAGE / m.file
            text = target.read_text()
            if text.count(m.original) != 1:
                rows.append((m, "n/a (code changed)", ""))
                continue
            target.write_text(text.replace(m.original, m.replacement))
            started = time.perf_counter()
            found = _findings(where, args.start, args.count)
            failed = _tests(where, args.pytest)
            took = time.perf_counter() - started
            if isinstance(found, str):
                rows.append((m, "killed", f"{found} ({took:.0f}s)"))
            else:
                # Killed: a category of violation the unmutated code never shows in these seeds. (Comparing
                # (seed, category) pairs would count today's own findings moving to other seeds when the
                # mutant changes an interleaving.)
                cats = sorted({c for _, c in found} - base_categories)
                moved = len(found - baseline)
                if cats or failed:
                    first = {c: min(s for s, cc in found if cc == c) for c in cats}
                    why = ", ".join(f"{c} (seed {first[c]})" for c in cats[:4])
                    why += f"; tests: {failed}" if failed else ""
                    rows.append((m, "killed", f"{why} ({took:.0f}s)"))
                else:
                    rows.append((m, "SURVIVED", f"{moved} (seed, known category) pairs differ ({took:.0f}s)"))
            shutil.rmtree(where, ignore_errors=True)
            print(f"  {m.name:26s} {rows[-1][1]:20s} {rows[-1][2]}", flush=True)
    print()
    print("| mutant | result | description | evidence |\n| --- | --- | --- | --- |")
    for m, result, why in rows:
        print(f"| {m.name} | {result} | {m.description} | {why} |")
    killed = sum(r == "killed" for _, r, _ in rows)
    print(f"\n{killed} of {len(rows)} killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
