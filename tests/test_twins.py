"""The generated sync twins are current."""

from __future__ import annotations

import ast
import re

import pytest
import unasync_twins


def test_sync_twins_are_generated_from_async_source() -> None:
    """Every sync twin equals a fresh unasync run over its async source (whole-file comparison)."""
    stale = unasync_twins.check()
    assert not stale, "run `python tests/unasync_twins.py`:\n" + "\n".join(stale)


def test_every_replacement_rule_is_used() -> None:
    """A replacement that matches nothing in the async sources is dead configuration (a renamed method?)."""
    source = "\n".join(path.read_text() for path in unasync_twins.sources())
    unused = [name for name in unasync_twins.REPLACEMENTS if name not in source]
    assert not unused, f"replacements matching nothing: {unused}"


def test_sync_docstrings_say_sync() -> None:
    """No docstring of a generated sync twin calls itself async or awaitable (the PROSE rules rewrite them)."""
    said = []
    for twin in unasync_twins.generate().values():
        for node in ast.walk(ast.parse(twin)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = (ast.get_docstring(node) or "").replace("generated from the async", "")
                said += re.findall(r"[^.]*\b(?:async|await|awaitable)\b[^.]*", doc, flags=re.IGNORECASE)
    assert said == []


def test_a_prose_rule_that_matches_nothing_fails_the_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prose rule whose async text is gone (the docstring was reworded) stops the generation, naming it."""
    monkeypatch.setitem(unasync_twins.PROSE, "_async/_auth.py", [("no such sentence", "none")])
    with pytest.raises(LookupError, match="no such sentence"):
        unasync_twins.generate()
