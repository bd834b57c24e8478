"""The generated sync twins are current."""

from __future__ import annotations

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
