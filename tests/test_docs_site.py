"""The documentation site's sources hang together: the API reference lists every public name, every page is in
the navigation, and the packages that build it are installed by the README's test command (``.ci/run`` builds
the site itself with ``mkdocs build --strict``)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx_upstream_auth
import httpx_upstream_auth.mcp
import httpx_upstream_auth.testing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIG = (ROOT / "mkdocs.yml").read_text()


def test_the_api_reference_lists_every_public_name() -> None:
    """docs/api.md has one ``::: module.name`` per name of the package's, ``.testing``'s and ``.mcp``'s
    ``__all__``, and nothing else."""
    listed = set(re.findall(r"^::: (\S+)$", (DOCS / "api.md").read_text(), flags=re.M))
    public = {
        f"{module.__name__}.{name}"
        for module in (httpx_upstream_auth, httpx_upstream_auth.testing, httpx_upstream_auth.mcp)
        for name in module.__all__
    }
    assert listed == public


def test_every_page_is_in_the_navigation() -> None:
    """Each markdown file under docs/ is a page of the nav, or excluded from the site on purpose (the benchmark
    results file, which a page includes); the CLI page's line waits, commented out, for that page."""
    nav = set(re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)$", CONFIG, flags=re.M))
    excluded = set(CONFIG.split("exclude_docs: |", 1)[1].split("\n\n", 1)[0].split())
    pages = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    assert pages - excluded == nav - {"cli.md"} | ({"cli.md"} & pages)
    assert excluded <= pages
    assert re.search(r"^\s+# - Command line: cli\.md$", CONFIG, flags=re.M) or "cli.md" in nav


def test_the_docs_extra_builds_the_site_and_dev_brings_it() -> None:
    """``pip install -e '.[dev]'`` (the README's test command) installs mkdocs, the theme and mkdocstrings."""
    # Read without tomllib (Python 3.11+): the package supports 3.10.
    pyproject = (ROOT / "pyproject.toml").read_text()
    docs = re.search(r"^docs = \[(.*)\]$", pyproject, flags=re.M)
    dev = re.search(r'^dev = \[\n    "httpx-upstream-auth\[([a-z,]+)\]",$', pyproject, flags=re.M)
    assert docs is not None and dev is not None
    requirements = re.findall(r'"([^"]+)"', docs.group(1))
    assert {re.split(r"[\[<>=]", requirement)[0] for requirement in requirements} == {
        "mkdocs",
        "mkdocs-material",
        "mkdocstrings",
    }
    assert any(requirement.startswith("mkdocstrings[python]") for requirement in requirements)
    assert "docs" in dev.group(1).split(",")
