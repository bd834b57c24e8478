"""docs/mcp.md's examples run as written, and the README links to the page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mcp.server.mcpserver", reason="the MCP SDK 2.x is not installed")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "mcp.md"


def blocks(info: str) -> list[str]:
    """The fenced code blocks of docs/mcp.md whose info string is exactly ``info``."""
    return re.findall(rf"^```{re.escape(info)}\n(.*?)^```$", DOC.read_text(), flags=re.DOTALL | re.MULTILINE)


def run(source: str) -> str:
    """Run an example in a fresh interpreter; its stdout."""
    result = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_the_page_has_its_examples_and_the_readme_links_it() -> None:
    """Three SDK 2.x examples, one 1.x example, and a link from the README's More section."""
    assert len(blocks("python")) == 3 and len(blocks("python sdk1")) == 1
    more = (ROOT / "README.md").read_text().split("## More", 1)[1]
    assert "(docs/mcp.md)" in more


@pytest.mark.parametrize("index", range(3), ids=["connect", "discovery", "sdk-login"])
def test_example_runs(index: int) -> None:
    """The example runs to the end and prints what the text says it does."""
    output = run(blocks("python")[index])
    if index == 0:
        assert "the user must log in again" in output and output.strip().endswith("0 reused")
    elif index == 1:
        assert "/tenants/acme/token" in output
    else:
        assert output.strip().startswith("1 login,")
