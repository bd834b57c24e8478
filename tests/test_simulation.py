"""The deterministic simulation (tests/sim, docs/simulation.md): seeded schedules of the real TokenManager
against a simulated provider, storages and processes, on virtual time; every invariant after every one.

The default tier runs the first QUICK_SCHEDULES seeds; the slow tier (``pytest -m slow``, run by CI) runs
``HUA_SIM_SCHEDULES`` (default 10000) from ``HUA_SIM_START`` (default 0). A failing seed is replayed with
``python -m tests.sim --seed N``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sim import make_plan, run_schedule
from sim.runner import REDEEM_IN_TASK

SCHEDULES = int(os.environ.get("HUA_SIM_SCHEDULES", "10000"))
START = int(os.environ.get("HUA_SIM_START", "0"))
CHUNK = 500
CHUNKS = range(START, START + SCHEDULES, CHUNK)
#: Seeds the default tier runs (about two seconds), so a quick run still exercises every invariant check.
QUICK_SCHEDULES = 200
#: Findings of the simulation that are open (not yet understood and fixed), each named in the issue's note.
#: Strict: such a seed must still break exactly that invariant (so a fix shows here and the entry goes),
#: and no other seed may break any.
#: (Seed 7124, listed here until brief H1's follow-up: a short-lived manager on a store that reports no
#: changes returned the pre-logout generation after the process's main manager logged the session out. A
#: checker error, not a finding: a manager hears nothing of another manager's changes on such a store, its
#: sibling in the same process included; see docs/simulation.md.)
OPEN_FINDINGS: dict[int, list[str]] = {}
ROOT = Path(__file__).resolve().parent.parent


#: Runs one chunk of seeds in a fresh interpreter and prints, per failing seed, a line of JSON; then the
#: report of the first. A fresh interpreter, because the schedules' full garbage collections would scan
#: whatever the test session has accumulated by then (it made the chunks ten times slower in CI).
_CHUNK_SCRIPT = """
import json, sys
from tests.sim.runner import run_schedule
first, stop = int(sys.argv[1]), int(sys.argv[2])
worst = None
for seed in range(first, stop):
    result = run_schedule(seed)
    if result.violations or result.error:
        print(json.dumps({"seed": seed, "categories": sorted(set(result.categories))}))
        worst = worst or result
if worst is not None:
    print("REPORT")
    print(worst.report()[-6000:])
"""


def _run_seeds(first: int, stop: int) -> None:
    """Run seeds ``first`` to ``stop`` in a fresh interpreter; fail with the seeds that broke an invariant."""
    done = subprocess.run(
        [sys.executable, "-c", _CHUNK_SCRIPT, str(first), str(stop)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out, _, report = done.stdout.partition("REPORT\n")
    found = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    bad = [r for r in found if OPEN_FINDINGS.get(r["seed"]) != r["categories"]]
    fixed = {seed for seed in OPEN_FINDINGS if first <= seed < stop} - {r["seed"] for r in found}
    assert not fixed, f"open findings no longer found (remove them from OPEN_FINDINGS): {sorted(fixed)}"
    if bad:
        lines = [f"seed {r['seed']}: {r['categories']}" for r in bad]
        pytest.fail(
            f"{len(bad)} schedule(s) broke an invariant; replay with `python -m tests.sim --seed N`:\n"
            + "\n".join(lines)
            + f"\n\nfirst one (seed {bad[0]['seed']}):\n{report}"
        )


def test_the_first_schedules_hold_every_invariant() -> None:
    """The first QUICK_SCHEDULES seeded schedules end with no invariant broken and no simulation error."""
    _run_seeds(0, QUICK_SCHEDULES)


@pytest.mark.slow
@pytest.mark.parametrize("first", CHUNKS, ids=[f"seeds-{c}" for c in CHUNKS])
def test_schedules_hold_every_invariant(first: int) -> None:
    """Every seeded schedule of this chunk ends with no invariant broken and no simulation error."""
    _run_seeds(first, min(first + CHUNK, START + SCHEDULES))


def test_manager_runs_its_refresh_job_on_the_simulated_loop() -> None:
    """The manager under test takes redeem_in="task", so no worker thread escapes virtual time."""
    assert REDEEM_IN_TASK


@pytest.mark.parametrize("seed", [1, 7, 42, 254, 1234, 43, 136, 231, 515, 814, 6301, 0, 9, 16, 36, 56, 68, 94])
def test_a_seed_replays_exactly(seed: int) -> None:
    """Running a seed twice gives the same plan, trace, outcomes and violations."""
    first, again = run_schedule(seed), run_schedule(seed)
    assert first.plan.describe() == again.plan.describe() == make_plan(seed).describe()
    assert first.trace == again.trace
    assert first.outcomes == again.outcomes
    assert first.categories == again.categories


#: The command-line replay (``python -m tests.sim --seed N``) of each seed given, in one interpreter.
_REPLAY_SCRIPT = """
import sys
from tests.sim.__main__ import main
for seed in sys.argv[1:]:
    main(["--seed", seed])
    print("-- end of replay --", flush=True)
"""


def test_replay_is_the_same_in_another_interpreter() -> None:
    """The command-line replay prints the same trace under another hash seed (no set/hash order leaks in)."""
    seeds = ["3", "11", "600", "43", "231", "6301", "56", "68"]
    outputs = []
    for hash_seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", _REPLAY_SCRIPT, *seeds],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        outputs.append(done.stdout.split("-- end of replay --\n")[:-1])
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == len(seeds) and all("seed " in out for out in outputs[0])


@pytest.mark.parametrize(
    ("mutant", "expected"),
    [("cas-ignores-version", {"cross-lineage-write", "regression-write"}), ("lease-always-free", {"reuse"})],
)
def test_the_checks_catch_a_broken_store(mutant: str, expected: set[str]) -> None:
    """A store with a deliberate defect makes the simulation report the violation it causes."""
    found: set[str] = set()
    for seed in range(400):
        found.update(v.kind for v in run_schedule(seed, mutant=mutant).violations)
        if found & expected:
            break
    assert found & expected, f"{mutant}: only {sorted(found)} in 400 schedules"


def test_every_deployment_event_is_drawn() -> None:
    """The events of a deployment's life (issue 12) each appear in a good share of the CI seeds."""
    seen: dict[str, int] = {}

    def bump(name: str, hit: bool) -> None:
        seen[name] = seen.get(name, 0) + int(hit)

    for seed in range(START, START + min(SCHEDULES, 2000)):
        plan = make_plan(seed)
        ext, k = plan.ext, plan.knobs
        bump("crowd", bool(ext.crowd))
        bump("fork", bool(ext.forks))
        bump("fork during a job", any(during for _, _, during in ext.forks.values()))
        bump("churn", ext.churn > 0)
        bump("auth flow", ext.auth)
        bump("real sqlite", ext.real_sqlite)
        bump("loop closed", ext.loop_end is not None)
        bump("close", any(e.kind == "close" for e in plan.events))
        bump("api revoke", any(e.kind == "api-revoke" for e in plan.events))
        bump("outage", bool(k.outages))
        bump("gateway after redeem", k.p_gateway > 0)
        bump("expires_in 0", k.p_zero_life > 0)
        bump("partial rotation", k.p_partial_rotation > 0)
        bump("stall", bool(k.stalls))
        bump("outage during a job", any(e.kind == "outage" for e in plan.events))
        bump("stall during a job", any(e.kind == "stall" for e in plan.events))
        bump("a read under the lease hangs", k.read_hang is not None)
        bump("store without change notices", not k.notices)
        bump("provider outage", bool(k.provider_outages))
        bump("grant revoked at the provider", any(e.kind == "grant-revoke" for e in plan.events))
        bump("login of another provider", any(e.kind == "foreign-login" for e in plan.events))
        bump("sync close", any(e.kind == "close" and e.mode == "close" for e in plan.events))
        bump("exit after aclose", any(e.kind == "close" and e.mode == "aclose+exit" for e in plan.events))
        bump("lease shorter than the request", ext.short_lease)
        bump("long back-off pauses", ext.retry_interval > 1.0)
        bump("new event loop", bool(ext.restart))
    rare = {name: n for name, n in seen.items() if n < 20}
    assert not rare, f"extensions drawn too rarely in 2000 plans: {rare}"
