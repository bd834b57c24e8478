"""Hot-path cost of encryption at rest: a manager over ``EncryptedStorage`` against one over the bare backend.

The manager serves a valid token from its in-process cache, so encryption should cost nothing there: the
entry was decrypted once, when it was read from the store. Measured, interleaved in rounds (the order
alternates each round) with timeit, in microseconds per call and as the ratio encrypted/plain:

1. ``manager.get_token(session)`` (the cache hit);
2. the auth flow's pre-send step, ``next(auth.sync_auth_flow(request))`` (what every request runs);
3. for contrast, a read that does reach the store, ``storage.get(key)``: there the decryption shows.

The count checked (exit status 3 when wrong, as in the other benchmarks): the hot-path runs decrypt nothing
(``EncryptedStorage.decryptions`` does not move). Run ``python benchmarks/bench_encryption.py [--rounds N]
[--storage memory|sqlite] [--json out.json]``. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common as common
import httpx

import httpx_upstream_auth as hua

SESSION = "bench-session"
KEY = hua.EntryKey("bench", SESSION)


def valid_tokens() -> hua.UpstreamTokens:
    """Tokens valid for a day, so the hot path never refreshes."""
    now = time.time()
    return hua.UpstreamTokens(
        access_token="at-bench-0123456789abcdef",
        refresh_token="rt-bench",
        expires_at=now + 86_400,
        issued_at=now,
        provider_id="bench",
        user_id="user-1",
        upstream_subject="alice",
        client_id="bench-client",
    )


def make_manager(storage: hua.Storage) -> hua.TokenManager:
    """A manager whose session holds valid tokens; its refresher points at a port nobody listens on."""
    manager = hua.TokenManager(
        refresher=hua.OAuth2Refresher(token_url="http://127.0.0.1:9/token", client_id="bench", client_secret="x"),
        provider_id="bench",
        storage=storage,
    )
    manager.store(SESSION, valid_tokens())
    manager.get_token(SESSION)  # read once: from now on the cache serves it
    return manager


def backend(kind: str, folder: Path, name: str) -> hua.Storage:
    """The bare backend of one variant."""
    return hua.MemoryStorage() if kind == "memory" else hua.SQLiteStorage(folder / f"{name}.db")


def steps(manager: hua.TokenManager) -> dict[str, Callable[[], object]]:
    """The calls measured for one manager."""
    auth = manager.auth(SESSION)
    request = httpx.Request("GET", "http://api.example/me")
    storage = manager.storage

    def pre_send() -> object:
        flow = auth.sync_auth_flow(request)
        sent = next(flow)
        flow.close()
        return sent

    return {
        "get_token (cache hit)": lambda: manager.get_token(SESSION),
        "auth flow pre-send step": pre_send,
        "storage.get (reaches the store)": lambda: storage.get(KEY),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, print a table, and check that the hot path decrypted nothing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.1)
    parser.add_argument("--storage", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        encrypted_storage = hua.EncryptedStorage(
            backend(args.storage, folder, "encrypted"), [hua.EncryptionKey.generate()]
        )
        plain = make_manager(backend(args.storage, folder, "plain"))
        encrypted = make_manager(encrypted_storage)
        variants = {"plain": steps(plain), "encrypted": steps(encrypted)}
        samples: dict[tuple[str, str], list[float]] = {}
        hot_decryptions = 0
        for number in range(args.rounds):
            order = ["plain", "encrypted"] if number % 2 == 0 else ["encrypted", "plain"]
            for step in variants["plain"]:
                for name in order:
                    before = encrypted_storage.decryptions
                    summary = common.per_call(variants[name][step], repeat=1, min_time=args.min_time)
                    if step != "storage.get (reaches the store)":
                        hot_decryptions += encrypted_storage.decryptions - before
                    samples.setdefault((name, step), []).append(summary.median * 1e6)
        plain.close()
        encrypted.close()

    results: dict[str, dict[str, float]] = {}
    print(f"storage: {args.storage}; {args.rounds} interleaved rounds; microseconds per call (median of rounds)")
    print(f"{'step':34} {'plain':>10} {'encrypted':>10} {'ratio':>7}")
    for step in variants["plain"]:
        plain_us = statistics.median(samples[("plain", step)])
        encrypted_us = statistics.median(samples[("encrypted", step)])
        ratio = encrypted_us / plain_us
        results[step] = {"plain_us": plain_us, "encrypted_us": encrypted_us, "ratio": ratio}
        print(f"{step:34} {plain_us:10.3f} {encrypted_us:10.3f} {ratio:7.3f}")
    print(f"decryptions during the hot-path runs: {hot_decryptions}")
    if args.json is not None:
        args.json.write_text(json.dumps({"storage": args.storage, "results": results}, indent=2))
    if hot_decryptions:
        print("count violation: the hot path decrypted a cached entry", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
