"""``python -m httpx_upstream_auth demo``: many concurrent callers across several token expiries.

It starts the local provider (rotation on every refresh, reuse revokes the grant) with short-lived
tokens, logs a user in once, then runs worker processes of concurrent tasks that call the API through
``manager.auth(...)`` while the tokens expire again and again. The summary counts what matters: every
request succeeded, one refresh per expiry, no refresh token ever presented twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import anyio
import httpx

from ._manager import TokenManager
from ._refresher import OAuth2Refresher
from ._storages import open_storage

SESSION = "demo-session"
#: Seconds each demo caller waits between its requests.
PAUSE = 0.05
PROVIDER = "local"


def make_manager(storage: str, base_url: str) -> TokenManager:
    """The manager every demo worker builds: same storage, same provider."""
    refresher = OAuth2Refresher(base_url + "/token", "test-client", "test-secret")
    return TokenManager(storage=open_storage(storage), refresher=refresher, provider_id=PROVIDER)


async def run_worker(
    manager: TokenManager, base_url: str, seconds: float, tasks: int, session_id: str = SESSION, pause: float = 0.02
) -> dict[str, Any]:
    """``tasks`` concurrent callers of ``GET /api/me`` for ``seconds``, each pausing ``pause`` s between calls.

    Returns counts (``ok``, ``failed``, ``errors`` by name), latencies in ms, and wall-clock start and end.
    """
    ok = failed = 0
    errors: dict[str, int] = {}
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def caller(client: httpx.AsyncClient) -> None:
        nonlocal ok, failed
        while time.monotonic() < end:
            start = time.perf_counter()
            try:
                response = await client.get(base_url + "/api/me")
            except Exception as exc:  # a failed request is counted and named, never hidden
                failed += 1
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            else:
                latencies.append((time.perf_counter() - start) * 1000)
                if response.status_code == 200:
                    ok += 1
                else:
                    failed += 1
                    name = f"HTTP {response.status_code}"
                    errors[name] = errors.get(name, 0) + 1
            await anyio.sleep(pause)

    started = time.time()
    limits = httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks)
    auth = manager.auth(session_id)
    async with httpx.AsyncClient(auth=auth, limits=limits) as client, anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(caller, client)
    return {
        "ok": ok,
        "failed": failed,
        "errors": errors,
        "latencies": latencies,
        "started": started,
        "ended": time.time(),
    }


def worker_main(argv: list[str]) -> int:
    """Entry of one demo worker process: prints its result as one JSON line."""
    storage, base_url, seconds, tasks, start = argv[0], argv[1], float(argv[2]), int(argv[3]), float(argv[4])
    manager = make_manager(storage, base_url)
    time.sleep(max(start - time.time(), 0.0))  # every worker starts calling at once, after its imports
    result = anyio.run(run_worker, manager, base_url, seconds, tasks, SESSION, PAUSE)
    manager.close()
    print(json.dumps(result))
    return 0


def main(argv: list[str]) -> int:
    """Run the demo and print its summary; exit status 1 if any request failed or a token was reused."""
    parser = argparse.ArgumentParser(prog="python -m httpx_upstream_auth demo", description=__doc__)
    parser.add_argument(
        "--storage", default="sqlite", help="sqlite (default, a temporary file), sqlite:PATH, memory, or a redis:// URL"
    )
    parser.add_argument("--processes", type=int, default=2, help="worker processes (memory: always 1)")
    parser.add_argument("--tasks", type=int, default=25, help="concurrent callers per process")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the callers run")
    parser.add_argument("--token-ttl", type=float, default=2.0, help="access token lifetime in seconds")
    args = parser.parse_args(argv)
    try:
        from .testing import LocalProvider, ServerThread
    except ImportError as exc:  # uvicorn is an optional extra
        raise SystemExit(str(exc)) from None

    with tempfile.TemporaryDirectory() as tmp:
        storage = "sqlite:" + os.path.join(tmp, "tokens.db") if args.storage == "sqlite" else args.storage
        processes = 1 if storage == "memory" else max(args.processes, 1)
        provider = LocalProvider(access_ttl=args.token_ttl)
        with ServerThread(provider) as server:
            manager = make_manager(storage, server.url)
            manager.store(SESSION, provider.login(sub="alice", client_id="test-client", provider_id=PROVIDER))
            print(
                f"demo: {processes} process(es) x {args.tasks} tasks for {args.seconds:.0f} s, "
                f"{args.token_ttl:g}-second tokens, storage {args.storage}",
                flush=True,
            )
            if processes == 1:
                results = [anyio.run(run_worker, manager, server.url, args.seconds, args.tasks, SESSION, PAUSE)]
            else:
                results = _run_processes(storage, server.url, args, processes)
            manager.close()
            stats = provider.stats
    return _summary(results, stats, args)


def _run_processes(storage: str, url: str, args: argparse.Namespace, processes: int) -> list[dict[str, Any]]:
    start = time.time() + 2.0
    command = [
        sys.executable,
        "-m",
        "httpx_upstream_auth",
        "demo-worker",
        storage,
        url,
        str(args.seconds),
        str(args.tasks),
        str(start),
    ]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=args.seconds + 60)
        if proc.returncode != 0:
            raise SystemExit(f"a demo worker exited with status {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _summary(results: list[dict[str, Any]], stats: dict[str, int], args: argparse.Namespace) -> int:
    ok = sum(r["ok"] for r in results)
    failed = sum(r["failed"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    elapsed = max(r["ended"] for r in results) - min(r["started"] for r in results)
    expiries = math.ceil(elapsed / args.token_ttl)
    p50 = statistics.median(latencies) if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
    print(f"requests:  {ok + failed} ({ok} ok, {failed} failed)")
    print(
        f"refreshes: {stats['refresh_ok']} for about {expiries} token lifetimes "
        f"(reused refresh tokens: {stats['refresh_reuse']}, invalid_grant: {stats['invalid_grant']})"
    )
    print(f"replays:   {stats['api_401']} requests met an expired token at the API and were replayed")
    print(f"latency:   p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    errors: dict[str, int] = {}
    for r in results:
        for name, count in r["errors"].items():
            errors[name] = errors.get(name, 0) + count
    if errors:
        print(f"errors:    {errors}")
    healthy = failed == 0 and stats["refresh_reuse"] == 0 and ok > 0
    print("result:    " + ("OK: the callers never saw an expiry" if healthy else "FAILED"))
    return 0 if healthy else 1
