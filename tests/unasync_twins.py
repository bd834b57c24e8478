"""Generate every sync twin from its async source with unasync: ``_async/`` -> ``_sync/`` (each file), and
``_storages/_redis/_async.py`` -> ``_storages/_redis/_sync.py``.

python tests/unasync_twins.py            # regenerate
python tests/unasync_twins.py --check    # exit 1 if a twin is stale (tests/test_twins.py runs this)
"""

from __future__ import annotations

import difflib
import sys
import tempfile
from pathlib import Path

import unasync

PACKAGE = Path(__file__).resolve().parent.parent / "httpx_upstream_auth"
#: Each hand-written async source (a folder of modules, or one module) and its generated sync twin.
TWINS = [
    (PACKAGE / "_async", PACKAGE / "_sync"),
    (PACKAGE / "_storages" / "_redis" / "_async.py", PACKAGE / "_storages" / "_redis" / "_sync.py"),
]
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
    "aprepare": "prepare",
    "arenew_lease": "renew_lease",
    "AsyncLeaseKeeper": "SyncLeaseKeeper",
    "AsyncDeadline": "SyncDeadline",
    "async_sleep": "sync_sleep",
    "async_call_bounded": "sync_call_bounded",
    "async_lead": "sync_lead",
    "AsyncCall": "SyncCall",
    "AsyncStoreCalls": "SyncStoreCalls",
    "start_async_job": "start_sync_job",
}


def sources() -> dict[Path, Path]:
    """Every async source module and the sync module generated from it."""
    found: dict[Path, Path] = {}
    for source, twin in TWINS:
        if source.is_dir():
            found.update({path: twin / path.name for path in sorted(source.glob("*.py"))})
        else:
            found[source] = twin
    return found


def _header(source: Path) -> str:
    name = source.parent.name if source.parent.name == "_async" else source.name
    return f"# Generated from {name} by tests/unasync_twins.py: do not edit.\n"


def generate() -> dict[Path, str]:
    """The text of every sync twin, by the path it belongs at (nothing is written)."""
    rule = unasync.Rule(fromdir="/_async/", todir="/_sync/", additional_replacements=REPLACEMENTS)
    out: dict[Path, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for number, (source, twin) in enumerate(sources().items()):
            copy = Path(tmp) / str(number) / "_async" / "module.py"
            copy.parent.mkdir(parents=True)
            copy.write_text(source.read_text())
            unasync.unasync_files([str(copy)], [rule])
            out[twin] = _header(source) + (Path(tmp) / str(number) / "_sync" / "module.py").read_text()
    return out


def check() -> list[str]:
    """The twins that differ from a fresh generation (whole-file comparison), and files in a generated
    folder that no source generates."""
    fresh = generate()
    current = {path: path.read_text() for path in fresh if path.exists()}
    for source, twin in TWINS:
        if source.is_dir():
            current.update({path: path.read_text() for path in sorted(twin.glob("*.py"))})
    stale = []
    for path in sorted(set(fresh) | set(current)):
        if fresh.get(path) != current.get(path):
            name = str(path.relative_to(PACKAGE))
            diff = difflib.unified_diff(
                current.get(path, "").splitlines(), fresh.get(path, "").splitlines(), name, name, lineterm=""
            )
            stale.append("\n".join(diff))
    return stale


if __name__ == "__main__":
    if "--check" in sys.argv:
        problems = check()
        print("\n".join(problems) or "every sync twin is current")
        sys.exit(1 if problems else 0)
    for path, text in generate().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
