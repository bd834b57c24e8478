"""The package's import graph: arrows only point down the layers that docs/design.md describes, and no
module imports another in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "httpx_upstream_auth"

#: Bottom first. A module may import modules of its own layer or of layers below it.
LAYERS: list[tuple[str, set[str]]] = [
    ("pure core", {"_exceptions", "_answer", "_models", "_clock", "_policy", "_jose", "_oauth", "_logout"}),
    ("observability", {"_trace", "_otel"}),
    ("concurrency primitives", {"_synchronization", "_changes"}),
    ("storage contract", {"_storages._base", "_storages._shared"}),
    (
        "refresher and storages",
        {
            "_refresher",
            "_dpop",
            "_async._http",
            "_sync._http",
            "_storages",
            "_storages._memory",
            "_storages._encrypted",
            "_storages._sqlite",
            "_storages._registry",
            "_storages._redis",
            "_storages._redis._storage",
            "_storages._redis._keys",
            "_storages._redis._errors",
            "_storages._redis._clients",
            "_storages._redis._loops",
            "_storages._redis._feed",
            "_storages._redis._async",
            "_storages._redis._sync",
        },
    ),
    ("core and coordinators", {"_core", "_async._manager", "_sync._manager", "_coordinators"}),
    ("adapters", {"_auth", "_async._auth", "_sync._auth", "_async._transport", "_sync._transport"}),
    (
        "public api and integrations",
        {"_manager", "__init__", "_demo", "__main__", "_cli", "_cli_config", "mcp", "testing"},
    ),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[0] in ("mcp", "testing"):
        return parts[0]  # an integration package counts as one unit
    if parts[-1] == "__init__" and len(parts) > 1:
        return ".".join(parts[:-1])
    return ".".join(parts)


def _layer_of(name: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS and to docs/design.md")


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (relative imports only; the package imports itself no other way)."""
    here = path.relative_to(PACKAGE).parent.parts
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - (node.level - 1)])
            target = [*base, *(node.module.split(".") if node.module else [])]
            candidates = [target] if node.module else [[*target, alias.name] for alias in node.names]
            for parts in candidates:
                if (PACKAGE.joinpath(*parts).with_suffix(".py")).exists() or PACKAGE.joinpath(*parts).is_dir():
                    found.add(_module_name(PACKAGE.joinpath(*parts).with_suffix(".py")))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph.setdefault(name, set()).update(_imports(path) - {name})
    return graph


def test_every_import_points_down_or_sideways() -> None:
    """No module imports one of a higher layer."""
    upward = [
        f"{name} ({LAYERS[_layer_of(name)][0]}) -> {target} ({LAYERS[_layer_of(target)][0]})"
        for name, targets in _graph().items()
        for target in targets
        if _layer_of(target) > _layer_of(name)
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    """No module reaches itself through its imports."""
    graph = _graph()
    cycles: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
