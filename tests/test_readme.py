"""The README's set-up commands stay true: CI runs its test command, and the demo command works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Set-up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one() -> None:
    """The README shows a demo command and a test command, and .ci/run contains the test command verbatim."""
    demo, tests = _setup_commands()
    assert "httpx_upstream_auth demo" in demo
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_demo_runs_clean_on_the_embedded_default() -> None:
    """The demo (SQLite, 2 processes, 2-second tokens) shows plain progress lines and ends with a summary table:
    no failed request and no reused token."""
    result = subprocess.run(
        [sys.executable, "-m", "httpx_upstream_auth", "demo", "--seconds", "5", "--tasks", "10"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\| reused refresh tokens \| 0 ", result.stdout)
    assert re.search(r"\| requests +\| \d+ \(\d+ ok, 0 failed\)", result.stdout)
    assert re.search(r"^ +\d+ requests .* reused 0 +failed 0 +next expiry in ", result.stdout, re.MULTILINE), (
        "a plain progress line (stdout is not a terminal)"
    )
