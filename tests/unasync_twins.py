"""Generate ``httpx_upstream_auth/_sync`` from ``_async`` with unasync.

python tests/unasync_twins.py            # regenerate
python tests/unasync_twins.py --check    # exit 1 if _sync is stale (tests/test_twins.py runs this)
"""

from __future__ import annotations

import difflib
import sys
import tempfile
from pathlib import Path

import unasync

PACKAGE = Path(__file__).resolve().parent.parent / "httpx_upstream_auth"
REPLACEMENTS = {
    "AsyncClient": "Client",
    "AsyncBaseTransport": "BaseTransport",
    "AsyncHTTPTransport": "HTTPTransport",
    "AsyncUpstreamAuthTransport": "UpstreamAuthTransport",
    "handle_async_request": "handle_request",
    "__anext__": "__next__",
    "asend": "send",
    "aclose": "close",
    "aiter_bytes": "iter_bytes",
    "aclosing": "closing",
    "async_auth_flow": "sync_auth_flow",
    "async_ops": "sync_ops",
    "aoutcome": "outcome",
    "aget": "get",
    "aput": "put",
    "adelete": "delete",
    "aacquire_lease": "acquire_lease",
    "arelease_lease": "release_lease",
    "awatch": "watch",
    "arefresh": "refresh",
    "arenew_lease": "renew_lease",
    "AsyncLeaseKeeper": "SyncLeaseKeeper",
    "AsyncDeadline": "SyncDeadline",
    "async_sleep": "sync_sleep",
    "async_call_bounded": "sync_call_bounded",
    "AsyncCall": "SyncCall",
    "start_async_job": "start_sync_job",
}
HEADER = "# Generated from _async by tests/unasync_twins.py: do not edit.\n"


def generate(target: Path) -> dict[str, str]:
    """Write the sync twins into ``target`` (a ``_sync`` folder); return {file name: text}."""
    rule = unasync.Rule(fromdir="/_async/", todir="/_sync/", additional_replacements=REPLACEMENTS)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "_async"
        src.mkdir()
        for path in sorted((PACKAGE / "_async").glob("*.py")):
            (src / path.name).write_text(path.read_text())
        unasync.unasync_files([str(p) for p in sorted(src.glob("*.py"))], [rule])
        out = {p.name: HEADER + p.read_text() for p in sorted((Path(tmp) / "_sync").glob("*.py"))}
    target.mkdir(exist_ok=True)
    for name, text in out.items():
        (target / name).write_text(text)
    return out


def check() -> list[str]:
    """The files of ``_sync`` that differ from a fresh generation (whole-file comparison)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp) / "_sync")
    current = {p.name: p.read_text() for p in sorted((PACKAGE / "_sync").glob("*.py"))}
    stale = []
    for name in sorted(set(fresh) | set(current)):
        if fresh.get(name) != current.get(name):
            diff = difflib.unified_diff(
                current.get(name, "").splitlines(), fresh.get(name, "").splitlines(), name, name, lineterm=""
            )
            stale.append("\n".join(diff))
    return stale


if __name__ == "__main__":
    if "--check" in sys.argv:
        problems = check()
        print("\n".join(problems) or "_sync is current")
        sys.exit(1 if problems else 0)
    generate(PACKAGE / "_sync")
