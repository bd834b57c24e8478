"""A deterministic simulation of the refresh protocol: the real ``TokenManager`` against a simulated
provider, simulated storages and several simulated processes, on virtual time, under a seeded scheduler.

See docs/simulation.md. Replay one schedule with ``python -m tests.sim --seed N``.
"""

from .runner import KNOWN_BUGS, Result, make_plan, run_many, run_schedule

__all__ = ["KNOWN_BUGS", "Result", "make_plan", "run_many", "run_schedule"]
