"""A worker process for the multi-process tests: its own TokenManager over a shared storage.

    python tests/mp_worker.py herd STORAGE URL SECONDS TASKS PAUSE START
        # the demo's callers (tasks loop on GET /api/me) from wall time START; prints JSON counts
    python tests/mp_worker.py token STORAGE URL                 # one get_token; prints the entry's JSON
Storage specs: ``sqlite:PATH`` or a redis URL. Lease settings come from HUA_REFRESH_TIMEOUT / HUA_LEASE_TTL; with
HUA_ENCRYPTION_KEY (base64), the storage is an EncryptedStorage with that key; HUA_DPOP=1 gives the refresher DPoP
with per-session keys (the key comes from the stored entry).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time

import anyio

import httpx_upstream_auth as hua
from httpx_upstream_auth import open_storage
from httpx_upstream_auth._demo import run_worker

SESSION = "shared"


class EarlyRefreshes:
    """For each refresh of an expiring token this process starts (not one the API refused): the share of the
    token's lifetime still left then, by the manager's own clock. The freshness policy never refreshes with
    more than ``max_latency_fraction`` left, however slowly the loaded machine answers."""

    def __init__(self) -> None:
        self.storage: hua.Storage | None = None
        self.left: list[float] = []

    def __call__(self, event: hua.TraceEvent) -> None:
        if event.name != "refresh.started" or event.fields["reason"] != "expired" or self.storage is None:
            return
        # The job holds the lease: the stored entry is the one it redeems.
        entry = self.storage.get(hua.EntryKey(event.provider_id, event.session_id or ""))
        if entry is not None and entry.expires_at is not None and entry.issued_at is not None:
            self.left.append((entry.expires_at - time.time()) / (entry.expires_at - entry.issued_at))


def manager(spec: str, url: str, on_event: EarlyRefreshes | None = None) -> hua.TokenManager:
    """A manager like every process of the app would build."""
    storage = open_storage(spec)
    if "HUA_ENCRYPTION_KEY" in os.environ:
        storage = hua.EncryptedStorage(storage, [base64.b64decode(os.environ["HUA_ENCRYPTION_KEY"])])
    refresh_timeout = float(os.environ.get("HUA_REFRESH_TIMEOUT", "15"))
    lease_ttl = float(os.environ.get("HUA_LEASE_TTL", str(refresh_timeout + 5)))
    if on_event is not None:
        on_event.storage = storage
    return hua.TokenManager(
        on_event=on_event,
        storage=storage,
        refresher=hua.OAuth2Refresher(
            url + "/token",
            "test-client",
            "test-secret",
            timeout=refresh_timeout,
            dpop=hua.DPoP() if os.environ.get("HUA_DPOP") == "1" else None,
        ),
        provider_id="local",
        refresh_timeout=refresh_timeout,
        lease_ttl=lease_ttl,
    )


def main(argv: list[str]) -> None:
    """Run one mode and print its JSON result on the last line."""
    mode, spec, url = argv[:3]
    early = EarlyRefreshes()
    mgr = manager(spec, url, early if mode == "herd" else None)
    if mode == "herd":
        time.sleep(max(float(argv[6]) - time.time(), 0))  # start together, once every process has imported
        result = anyio.run(run_worker, mgr, url, float(argv[3]), int(argv[4]), SESSION, float(argv[5]))
        result["lifetime_left_at_refresh"] = early.left
    else:
        result = mgr.get_token(SESSION).to_dict()
    mgr.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
