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
    "for_async": "for_sync",
    "aoutcome": "outcome",
    "aget": "get",
    "aput": "put",
    "adelete": "delete",
    "aacquire_lease": "acquire_lease",
    "arelease_lease": "release_lease",
    "awatch": "watch",
    "arefresh": "refresh",
    "arevoke": "revoke",
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
    "AsyncCoordinator": "SyncCoordinator",
}
#: Prose the name rules cannot reach (unasync rewrites names, not docstrings or comments): what the async
#: source says of itself, as its generated sync twin should say it. Each must match in its twin.
PROSE = {
    "_async/__init__.py": [
        (
            "The async source of the I/O shells; ``_sync`` is generated from it by unasync. Edit only this one.",
            "The sync (blocking) I/O shells, generated from ``_async`` by unasync: edit the source, never these.",
        ),
    ],
    "_async/_auth.py": [
        ("The async auth flow: attach", "The sync (blocking) auth flow: attach"),
        ("(the sync one is generated).", "(generated from the async one)."),
        ("The async flow of", "The sync (blocking) flow of"),
    ],
    "_async/_manager.py": [
        ("The async half of TokenManager:", "The sync (blocking) half of TokenManager:"),
        (
            "for async callers: reads the store,",
            "for sync (blocking) callers: reads the store,",
        ),
        (
            "The sync twin is generated from this file.",
            "It is generated from the async one.",
        ),
    ],
    "_async/_transport.py": [
        (
            "The transport (async source; the sync one is generated):",
            "The sync transport (generated from the async one):",
        ),
        ("``httpx.AsyncHTTPTransport``", "``httpx.HTTPTransport``"),
        ("``httpx2.AsyncHTTPTransport``", "``httpx2.HTTPTransport``"),
        ("``httpx.AsyncClient`` and ``httpx2.AsyncClient``", "``httpx.Client`` and ``httpx2.Client``"),
        ("never held across an await.", "never held across a blocking call."),
    ],
    "_redis/_async.py": [
        (
            "The Redis storage's commands, written once: ``_sync.py`` is generated from this file by",
            "The Redis storage's commands, blocking: generated from ``_async.py`` (the source) by",
        ),
        (
            ":class:`AsyncCommands` sends them over one event loop's redis.asyncio client; its twin ``SyncCommands``\n"
            "over the sync client (sync code, trio, worker threads).",
            ":class:`SyncCommands` sends them over the blocking redis client (sync code, trio, worker threads); its\n"
            "source ``AsyncCommands`` over one event loop's redis.asyncio client.",
        ),
    ],
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
            text = (Path(tmp) / str(number) / "_sync" / "module.py").read_text()
            out[twin] = _header(source) + _prose(source, text)
    return out


def _prose(source: Path, text: str) -> str:
    """``text`` (a generated twin) with the async source's prose about itself said of the sync twin."""
    for old, new in PROSE.get(f"{source.parent.name}/{source.name}", []):
        if old not in text:
            raise LookupError(f"prose rule for {source.name} matched nothing: {old!r}")
        text = text.replace(old, new)
    return text


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
