"""Scale over a deployment's life: 100,000 distinct sessions through one manager, then a logout and a
re-login made by another process, and the manager's memory against its configured bounds.

    python benchmarks/bench_sessions.py [--sessions 100000] [--cache-size 10000] [--json out.json]

One manager on a SQLite file serves every session once (a valid token from the store, then cached),
with a random cookie that has no entry after every tenth session (the gateway case: those end in
``ReauthenticationRequired``), while session 0 stays in use. Another process then logs session 0
out, and later logs it in as another user: the manager must honour both. Reported: per-request cost
while the sessions pile up, the manager's table sizes (``TokenManager.footprint()``) against their
bounds, and the Python heap it holds (tracemalloc) per cached session. Count violations (a table over
its bound, a logout or login not honoured) exit with status 3; timings are printed, never judged.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import _common as common
import attrs

import httpx_upstream_auth as hua

PROVIDER_ID = "bench"

_OTHER_PROCESS = """
import sys, time
import httpx_upstream_auth as hua
storage = hua.SQLiteStorage(sys.argv[1])
manager = hua.TokenManager(provider_id="bench", storage=storage,
                           refresher=hua.OAuth2Refresher("https://as.invalid/token", "c", "s"))
if sys.argv[2] == "logout":
    print(manager.delete("s-0"))
else:
    print(manager.store("s-0", hua.UpstreamTokens(access_token="bob-token", refresh_token="bob-refresh",
                                                  expires_at=time.time() + 3600, user_id="bob")).version)
manager.close()
"""


def _entry(n: int) -> hua.UpstreamTokens:
    return hua.UpstreamTokens(
        access_token=f"access-{n}",
        refresh_token=f"refresh-{n}",
        expires_at=time.time() + 3600,
        provider_id=PROVIDER_ID,
        user_id=f"user-{n}",
    )


def _other_process(path: Path, action: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, str(path), action], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def _honoured(manager: hua.TokenManager, check: object, limit: float = 10.0) -> float | None:
    """Seconds until ``check()`` holds (polling get_token), or None if it never did within ``limit``."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        if check():  # type: ignore[operator]
            return time.perf_counter() - start
        time.sleep(0.001)
    return None


def run(sessions: int, cache_size: int) -> dict[str, object]:
    """Run the scenario; return its measurements and the list of count violations."""
    violations: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokens.db"
        storage = hua.SQLiteStorage(path)
        manager = hua.TokenManager(
            provider_id=PROVIDER_ID,
            storage=storage,
            refresher=hua.OAuth2Refresher("https://as.invalid/token", "c", "s"),
            cache_size=cache_size,
        )
        seed_start = time.perf_counter()
        for n in range(sessions):
            storage.put(hua.EntryKey(PROVIDER_ID, f"s-{n}"), _entry(n), expected_version=None)
        seeded = time.perf_counter() - seed_start

        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        cookies = 0
        for n in range(sessions):
            manager.get_token(f"s-{n}")
            manager.get_token("s-0")  # session 0 stays in use throughout
            if n % 10 == 0:
                cookies += 1
                with contextlib.suppress(hua.ReauthenticationRequired):
                    manager.get_token(secrets.token_urlsafe(16))
        elapsed = time.perf_counter() - start
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        footprint = manager.footprint()
        bounds = {"cached": cache_size, "epochs": 2 * cache_size, "digests": 2 * cache_size}
        for name, bound in bounds.items():
            if getattr(footprint, name) > bound:
                violations.append(f"{name}: {getattr(footprint, name)} > {bound}")
        for name in ("flights", "reads", "consumed", "distrusted", "backing_off"):
            if getattr(footprint, name):
                violations.append(f"{name}: {getattr(footprint, name)} left after the run")

        assert manager.get_token("s-0").user_id == "user-0"
        _other_process(path, "logout")

        def logged_out() -> bool:
            try:
                manager.get_token("s-0")
            except hua.ReauthenticationRequired:
                return True
            return False

        logout_seen = _honoured(manager, logged_out)
        if logout_seen is None:
            violations.append("another process's logout of session 0 was not honoured")
        _other_process(path, "login")
        login_seen = _honoured(manager, lambda: manager.get_token("s-0").user_id == "bob")
        if login_seen is None:
            violations.append("another process's login of session 0 was not honoured")
        manager.close()
    requests = 2 * sessions + cookies
    return {
        "sessions": sessions,
        "cache_size": cache_size,
        "seed_seconds": seeded,
        "us_per_request": 1e6 * elapsed / requests,
        "footprint": attrs.asdict(footprint),
        "heap_bytes": held,
        "heap_bytes_per_cached_session": held / max(footprint.cached, 1),
        "logout_seen_after_s": logout_seen,
        "login_seen_after_s": login_seen,
        "violations": violations,
    }


def _ms(seconds: object) -> str:
    return "never" if not isinstance(seconds, float) else f"{seconds * 1000:.1f} ms"


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--cache-size", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with common.count_violations_exit():
        result = run(args.sessions, args.cache_size)
        fp = result["footprint"]
        assert isinstance(fp, dict)
        common.print_table(
            ["sessions", "cache_size", "us/request", "cached", "epochs", "digests", "heap/cached", "logout", "login"],
            [
                [
                    result["sessions"],
                    result["cache_size"],
                    f"{result['us_per_request']:.1f}",
                    fp["cached"],
                    fp["epochs"],
                    fp["digests"],
                    f"{result['heap_bytes_per_cached_session']:.0f} B",
                    _ms(result["logout_seen_after_s"]),
                    _ms(result["login_seen_after_s"]),
                ]
            ],
        )
        common.write_json(args.json, result)
        violations = result["violations"]
        assert isinstance(violations, list)
        if violations:
            raise common.CountViolation("; ".join(map(str, violations)))


if __name__ == "__main__":
    main()
