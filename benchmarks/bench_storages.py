"""What shared storages cost: each operation, the refresh through the lease, how fast other processes
see a save, and what idle watchers cost.

    python benchmarks/bench_storages.py [--storages memory,sqlite,redis] [--trials 40] [--json out.json]
        [--parts micro,idle,refresh,save] [--sessions 1,100000] [--idle-watchers 40] [--idle-seconds 5]

1. Refresh latency through the lease: ``manager.get_token`` on an expired entry (read, lease, re-read,
   token endpoint, compare-and-set save, release), median and p99 per storage, and what the storage adds
   over memory. The local provider answers at once, so the numbers are the library's and the store's.
2. Save to use, across processes (SQLite, Redis): another process asks for the same expired entry while
   this one holds the lease mid-refresh; it waits on ``storage.watch``. Measured from the moment this
   process's save returns to the moment the other process has the new token (one system-wide
   monotonic clock). Target: p99 <= 10 ms.
3. Storage operations (``micro``), in µs per call, with 1 and with 100k stored sessions: ``get``, ``put``
   (a successful compare-and-set), ``failed CAS`` (a stale expected version), ``lease`` (acquire +
   release), ``get 1MB`` / ``CAS 1MB`` (an entry with a 1 MB scope), and ``wake`` (from a save returning
   to a watcher in another thread returning; same process).
4. Idle watchers (``idle``): N watchers waiting on keys nobody saves, for S seconds: this process's CPU
   time over wall time (1.0 = one core busy). The target for 40 SQLite watchers is under 0.10.
Counts are checked (one refresh per trial, the other process gets exactly the saved token); timings are
printed, never judged.
"""

from __future__ import annotations

import argparse
import contextlib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as common
import attrs

import httpx_upstream_auth as hua
from httpx_upstream_auth.testing import LocalProvider, ServerThread

CHILD = r"""
import sys, time
import httpx_upstream_auth as hua
spec, url = sys.argv[1], sys.argv[2]
storage = hua.SQLiteStorage(spec[7:]) if spec.startswith("sqlite:") else hua.RedisStorage.from_url(spec)
mgr = hua.TokenManager(storage=storage, provider_id="local",
                       refresher=hua.OAuth2Refresher(url + "/token", "test-client", "test-secret"))
print("ready", flush=True)
for line in sys.stdin:
    tokens = mgr.get_token(line.strip())
    print(time.monotonic(), tokens.version, flush=True)
"""


class TimedStorage(hua.Storage):
    """Delegates to ``inner`` and notes when the last successful ``put`` returned."""

    def __init__(self, inner: hua.Storage) -> None:
        super().__init__(retention=inner.retention)
        self.inner = inner
        self.saved_at = 0.0

    def get(self, key: hua.EntryKey) -> hua.UpstreamTokens | None:
        """Delegate."""
        return self.inner.get(key)

    def put(self, key: hua.EntryKey, tokens: hua.UpstreamTokens, *, expected_version: int | None) -> bool:
        """Delegate, noting the time a write landed."""
        done = self.inner.put(key, tokens, expected_version=expected_version)
        if done:
            self.saved_at = time.monotonic()
        return done

    def delete(self, key: hua.EntryKey, *, expected_version: int | None = None) -> bool:
        """Delegate."""
        return self.inner.delete(key, expected_version=expected_version)

    def acquire_lease(self, key: hua.EntryKey, ttl: float) -> hua.Lease | None:
        """Delegate."""
        return self.inner.acquire_lease(key, ttl)

    def release_lease(self, lease: hua.Lease) -> None:
        """Delegate."""
        self.inner.release_lease(lease)

    def watch(self, key: hua.EntryKey, version: int | None, timeout: float) -> None:
        """Delegate."""
        self.inner.watch(key, version, timeout)


def expired(provider: LocalProvider) -> hua.UpstreamTokens:
    """A fresh login whose access token is already past its expiry."""
    return attrs.evolve(provider.login(provider_id="local"), expires_at=time.time() - 1, issued_at=time.time() - 61)


def manager(storage: hua.Storage, url: str) -> hua.TokenManager:
    """The manager under test."""
    return hua.TokenManager(
        storage=storage, provider_id="local",
        refresher=hua.OAuth2Refresher(url + "/token", "test-client", "test-secret"),
    )  # fmt: skip


def refresh_latency(name: str, factory: common.StorageFactory, trials: int) -> common.Summary:
    """Caller-visible latency of one refresh through ``get_token``, in ms."""
    provider = LocalProvider()
    samples = []
    with contextlib.ExitStack() as stack, ServerThread(provider) as server:
        mgr = manager(factory(stack), server.url)
        for i in range(trials + 3):
            mgr.store(f"s{i}", expired(provider))
            start = time.perf_counter()
            mgr.get_token(f"s{i}")
            if i >= 3:  # the first refreshes warm up connections and imports
                samples.append((time.perf_counter() - start) * 1000)
        if provider.stats["refresh_ok"] != trials + 3:
            raise common.CountViolation(f"{name}: {provider.stats['refresh_ok']} refreshes for {trials + 3}")
    return common.Summary.of(samples)


def shared_storage(name: str, stack: contextlib.ExitStack) -> tuple[hua.Storage, str]:
    """A storage another process can open too, and the spec that process opens it with."""
    if name == "sqlite":
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="hua-bench-"))
        spec = "sqlite:" + str(Path(folder) / "tokens.db")
        storage: hua.Storage = hua.SQLiteStorage(spec.removeprefix("sqlite:"))
    else:
        server = common.RedisServer().start()
        stack.callback(server.stop)
        spec = server.url
        storage = hua.RedisStorage.from_url(spec)
    stack.callback(storage.close)
    return storage, spec


def save_to_use(name: str, trials: int) -> common.Summary:
    """From this process's save to another process holding the new token, in ms."""
    provider = LocalProvider(token_delay=0.1)  # the other process starts waiting while we refresh
    samples = []
    with contextlib.ExitStack() as stack, ServerThread(provider) as server:
        inner, spec = shared_storage(name, stack)
        timed = TimedStorage(inner)
        mgr = manager(timed, server.url)
        child = subprocess.Popen([sys.executable, "-c", CHILD, spec, server.url], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)  # fmt: skip
        stack.callback(child.kill)
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the other process did not start")
        for i in range(trials):
            session = f"w{i}"
            stored = mgr.store(session, expired(provider))
            calls = provider.stats["token_calls"]
            leader = threading.Thread(target=mgr.get_token, args=(session,))
            leader.start()
            while provider.stats["token_calls"] == calls:  # we hold the lease, the refresh is on its way
                time.sleep(0.001)
            child.stdin.write(session + "\n")
            child.stdin.flush()
            woke, version = child.stdout.readline().split()
            leader.join()
            if int(version) != stored.version + 1:
                raise common.CountViolation(f"{name}: the other process got version {version}, not the saved one")
            samples.append((float(woke) - timed.saved_at) * 1000)
        if provider.stats["refresh_ok"] != trials:
            raise common.CountViolation(f"{name}: {provider.stats['refresh_ok']} refreshes for {trials} trials")
    return common.Summary.of(samples)


def populate(storage: hua.Storage, count: int) -> None:
    """Store ``count`` sessions quickly (bulk writes straight into the store's own layout)."""
    entry = hua.UpstreamTokens(access_token="at", refresh_token="rt", version=1)
    if isinstance(storage, hua.SQLiteStorage):
        with contextlib.closing(sqlite3.connect(storage.path)) as conn, conn:
            conn.executemany(
                "INSERT OR REPLACE INTO entries (provider_id, session_id, version, data, expires_at_retention) "
                "VALUES (?, ?, 1, ?, ?)",
                (("bulk", f"s{n}", entry.to_json(), time.time() + 3600) for n in range(count)),
            )
    elif isinstance(storage, hua.RedisStorage):
        from httpx_upstream_auth._storages._redis._keys import blob

        for start in range(0, count, 1000):
            with storage._sync.pipeline(transaction=False) as pipe:
                for n in range(start, min(start + 1000, count)):
                    key = hua.EntryKey("bulk", f"s{n}")
                    pipe.hset(storage._keys.entry(key), mapping={"v": "1", "d": blob(key, entry)})
                    pipe.expire(storage._keys.entry(key), 3600)
                pipe.execute()
    else:
        for n in range(count):
            storage.put(hua.EntryKey("bulk", f"s{n}"), entry, expected_version=None)


def micro(storage: hua.Storage) -> dict[str, common.Summary]:
    """µs per call of each storage operation on one session (whatever else is stored)."""
    key = hua.EntryKey("micro", "session")
    big_key = hua.EntryKey("micro", "big")
    version = [1]
    storage.delete(key)
    storage.delete(big_key)
    storage.put(key, hua.UpstreamTokens(access_token="at", refresh_token="rt", version=1), expected_version=None)
    big = hua.UpstreamTokens(access_token="at", refresh_token="rt", scope="x" * 1_000_000, version=1)
    storage.put(big_key, big, expected_version=None)
    big_version = [1]

    def put() -> None:
        entry = hua.UpstreamTokens(access_token="at", refresh_token="rt", version=version[0] + 1)
        if not storage.put(key, entry, expected_version=version[0]):
            raise common.CountViolation("a compare-and-set with the current version failed")
        version[0] += 1

    def failed_cas() -> None:
        if storage.put(key, hua.UpstreamTokens(access_token="x", version=1), expected_version=0):
            raise common.CountViolation("a compare-and-set with a stale version succeeded")

    def lease() -> None:
        held = storage.acquire_lease(key, 30.0)
        if held is None:
            raise common.CountViolation("an uncontended lease was refused")
        storage.release_lease(held)

    def cas_big() -> None:
        entry = attrs.evolve(big, version=big_version[0] + 1)
        if not storage.put(big_key, entry, expected_version=big_version[0]):
            raise common.CountViolation("a 1 MB compare-and-set failed")
        big_version[0] += 1

    operations = {
        "get": lambda: storage.get(key),
        "put": put,
        "failed CAS": failed_cas,
        "lease": lease,
        "get 1MB": lambda: storage.get(big_key),
        "CAS 1MB": cas_big,
    }
    found = {name: common.per_call(op, repeat=5, min_time=0.1).scaled(1e6) for name, op in operations.items()}
    found["wake"] = wake_up(storage, key, version)
    return found


def wake_up(storage: hua.Storage, key: hua.EntryKey, version: list[int], trials: int = 100) -> common.Summary:
    """µs from a save returning to a watcher of that key (in another thread) returning."""
    samples = []

    def watch(expected: int, watching: threading.Event, woke: list[float]) -> None:
        watching.set()
        storage.watch(key, expected, 5.0)
        woke[0] = time.perf_counter()

    for _ in range(trials):
        watching = threading.Event()
        woke = [0.0]
        watcher = threading.Thread(target=watch, args=(version[0], watching, woke))
        watcher.start()
        watching.wait()
        time.sleep(0.002)  # let it register and start waiting
        entry = hua.UpstreamTokens(access_token="at", refresh_token="rt", version=version[0] + 1)
        storage.put(key, entry, expected_version=version[0])
        saved = time.perf_counter()
        version[0] += 1
        watcher.join()
        samples.append(max(woke[0] - saved, 0.0) * 1e6)
    return common.Summary.of(samples)


def idle_watchers(storage: hua.Storage, watchers: int, seconds: float) -> dict[str, float]:
    """CPU of this process (fraction of one core) while ``watchers`` threads wait on keys nobody saves."""
    keys = [hua.EntryKey("idle", f"w{n}") for n in range(watchers)]
    for key in keys:
        storage.delete(key)
        storage.put(key, hua.UpstreamTokens(access_token="at", version=1), expected_version=None)
    threads = [threading.Thread(target=storage.watch, args=(key, 1, seconds + 1.5)) for key in keys]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # all registered and waiting
    cpu, wall = time.process_time(), time.monotonic()
    time.sleep(seconds)
    busy = (time.process_time() - cpu) / (time.monotonic() - wall)
    for thread in threads:
        thread.join()
    return {"watchers": watchers, "seconds": seconds, "cores": busy}


def _cell(summary: dict[str, float], *, with_p99: bool) -> str:
    return f"{summary['median']:.0f}" + (f" [{summary['p99']:.0f}]" if with_p99 else "")


def main() -> None:
    """Run the chosen measurements for the chosen storages and print tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--parts", default="micro,idle,refresh,save", help="comma-separated parts to run")
    parser.add_argument("--sessions", default="1,100000", help="stored sessions for the micro benchmarks")
    parser.add_argument("--idle-watchers", type=int, default=40)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    args = parser.parse_args()
    parts = {part.strip() for part in args.parts.split(",")}
    chosen = common.select_storages(args.storages)
    results: dict[str, Any] = {"refresh_ms": {}, "save_to_use_ms": {}, "micro_us": {}, "idle_cpu": {}}
    with common.count_violations_exit():
        if "micro" in parts:
            for name, factory in chosen:
                for count in (int(part) for part in args.sessions.split(",")):
                    with contextlib.ExitStack() as stack:
                        storage = factory(stack)
                        if count > 1:
                            populate(storage, count)
                        found = micro(storage)
                    results["micro_us"][f"{name} ({count:,} sessions)"] = {k: v.as_dict() for k, v in found.items()}
        if "idle" in parts:
            for name, factory in chosen:
                with contextlib.ExitStack() as stack:
                    results["idle_cpu"][name] = idle_watchers(factory(stack), args.idle_watchers, args.idle_seconds)
        if "refresh" in parts:
            for name, factory in chosen:
                results["refresh_ms"][name] = refresh_latency(name, factory, args.trials).as_dict()
        if "save" in parts:
            for name, _ in chosen:
                if name != "memory":
                    results["save_to_use_ms"][name] = save_to_use(name, args.trials).as_dict()
    if results["micro_us"]:
        names = list(next(iter(results["micro_us"].values())))
        print("storage operations (µs per call, median; wake: p99 in brackets)")
        common.print_table(
            ["storage", *names],
            [
                [where, *(_cell(ops[n], with_p99=n == "wake") for n in names)]
                for where, ops in results["micro_us"].items()
            ],
        )
        print()
    if results["idle_cpu"]:
        print("idle watchers: CPU of this process, in cores (target for SQLite: < 0.10)")
        common.print_table(
            ["storage", "watchers", "seconds", "cores"],
            [[n, str(r["watchers"]), f"{r['seconds']:g}", f"{r['cores']:.3f}"] for n, r in results["idle_cpu"].items()],
        )
        print()
    if results["refresh_ms"]:
        base = results["refresh_ms"].get("memory", {}).get("median")
        rows = [
            [name, f"{r['median']:.2f}", f"{r['p99']:.2f}", "" if base is None else f"{r['median'] - base:+.2f}"]
            for name, r in results["refresh_ms"].items()
        ]
        print("refresh through the lease (ms)")
        common.print_table(["storage", "median", "p99", "added vs memory"], rows)
    if results["save_to_use_ms"]:
        print("\nsave in one process -> new token in another (ms; target p99 <= 10)")
        common.print_table(
            ["storage", "median", "p99", "max"],
            [
                [n, f"{r['median']:.2f}", f"{r['p99']:.2f}", f"{r['max']:.2f}"]
                for n, r in results["save_to_use_ms"].items()
            ],
        )
    common.write_json(args.json, results)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
