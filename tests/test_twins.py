"""The generated sync twins are current."""

from __future__ import annotations

import unasync_twins


def test_sync_twins_are_generated_from_async_source() -> None:
    """Every file in _sync equals a fresh unasync run over _async (whole-file comparison)."""
    stale = unasync_twins.check()
    assert not stale, "run `python tests/unasync_twins.py`:\n" + "\n".join(stale)


def test_every_replacement_rule_is_used() -> None:
    """A replacement that matches nothing in _async is dead configuration (a renamed method?)."""
    source = "\n".join(p.read_text() for p in (unasync_twins.PACKAGE / "_async").glob("*.py"))
    unused = [name for name in unasync_twins.REPLACEMENTS if name not in source]
    assert not unused, f"replacements matching nothing: {unused}"
