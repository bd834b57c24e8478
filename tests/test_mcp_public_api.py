"""The public surface of ``httpx_upstream_auth.mcp`` and the MCP test helpers: sorted, importable, documented."""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import pytest

pytest.importorskip("mcp.server.mcpserver", reason="the MCP SDK 2.x is not installed")

import httpx_upstream_auth.mcp as hmcp
import httpx_upstream_auth.testing as testing

MODULES = {"mcp": hmcp, "testing": testing}
NAMES = [(m, n) for m, module in MODULES.items() for n in module.__all__]


@pytest.mark.parametrize("module", MODULES.values(), ids=list(MODULES))
def test_all_is_unique(module: ModuleType) -> None:
    """__all__ has no duplicates (ruff keeps it sorted, constants first)."""
    assert len(module.__all__) == len(set(module.__all__))


@pytest.mark.parametrize(("module", "name"), NAMES)
def test_every_name_is_importable_and_documented(module: str, name: str) -> None:
    """Each name imports from its public module and carries its own docstring, as do its public methods."""
    value = getattr(importlib.import_module(f"httpx_upstream_auth.{module}"), name)
    if not (inspect.isclass(value) or inspect.isfunction(value)):
        return  # a constant, documented in the module
    doc = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
    assert doc and doc.strip(), f"{name} has no docstring"
    if inspect.isclass(value):
        missing = [
            attr
            for attr, member in vars(value).items()
            if not attr.startswith("_")
            and (inspect.isfunction(member) or isinstance(member, (property, classmethod, staticmethod)))
            and not (inspect.getdoc(getattr(value, attr)) if not isinstance(member, property) else member.__doc__)
        ]
        assert missing == [], f"{name} lacks docstrings on {missing}"


def test_errors_are_upstream_auth_errors() -> None:
    """DiscoveryFailed is a RefreshFailed (what a refresher may raise), hence an UpstreamAuthError."""
    import httpx_upstream_auth as hua

    assert issubclass(hmcp.DiscoveryFailed, hua.RefreshFailed)
    assert hmcp.__doc__ and hmcp.__doc__.strip()
