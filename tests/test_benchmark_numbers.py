"""Benchmark figures quoted in README.md and docs/*.md come from docs/benchmarks.md, the page that
``python benchmarks/compare.py --full`` writes (no benchmark runs here).

The convention: a figure quoted from the benchmarks is a link to that page whose text is the figure as the
page prints it, ``[0.98X](docs/benchmarks.md)`` where X is the multiplication sign U+00D7 (``(benchmarks.md)``
from docs/, an anchor allowed). The checks: (1) every such link's text appears in the page's results,
verbatim; (2) a ratio written as the page writes them (``0.97`` and the sign, no space) appears only as
such a link; (3) in README.md's "Performance" section, every number with a unit (the multiplication sign,
µs, ms, s, req/s, %, B) or a count (refreshes, logins, reused, failures, requests, calls) is inside such a
link.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results: begin", "<!-- results: end -->"

TIMES = "\N{MULTIPLICATION SIGN}"
LINK = re.compile(r"\[([^\]]*)\]\(((?:\.\./)?(?:docs/)?benchmarks\.md)(#[^)]*)?\)")
# As the page prints ratios: a multiplier written with a space before the sign (in docs/simulation.md) is none.
RATIO = re.compile(r"\d+\.\d+" + TIMES)
UNIT_NUMBER = re.compile(
    r"\d[\d,]*(?:\.\d+)?\s*(?:" + TIMES + r"|µs|us\b|ms\b|s\b|req/s|%|B\b"
    r"|refresh(?:es)?\b|logins?\b|reused\b|failures?\b|failed\b|requests\b|calls\b)"
)


def results(page: str) -> str:
    """The generated part of the benchmarks page."""
    start = page.index(BEGIN)
    return page[start : page.index(END, start)]


def section(text: str, title: str) -> str:
    """A markdown ``## title`` section's text (empty when there is none)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    return match.group(1) if match else ""


def problems(name: str, text: str, source: str) -> list[str]:
    """What is wrong with the benchmark figures ``text`` (the file ``name``) quotes from ``source``."""
    found = []
    for match in LINK.finditer(text):
        label = match.group(1)
        if re.search(r"\d", label) and label not in source:
            found.append(f"{name}: [{label}] is not in docs/benchmarks.md's results")
    unlinked = LINK.sub("", text)
    found += [f"{name}: ratio {ratio!r} is not a link to docs/benchmarks.md" for ratio in RATIO.findall(unlinked)]
    if name == "README.md":
        performance = LINK.sub("", section(text, "Performance"))
        found += [
            f"README.md, Performance: {figure!r} is not a link to docs/benchmarks.md"
            for figure in UNIT_NUMBER.findall(performance)
        ]
    return found


def test_quoted_benchmark_figures_are_on_the_benchmarks_page() -> None:
    """Every benchmark figure README.md and docs/*.md quote is a link whose text is on docs/benchmarks.md."""
    source = results(PAGE.read_text())
    found: list[str] = []
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in documents:
        if path != PAGE:
            found += problems(path.name, path.read_text(), source)
    assert found == []


def test_the_check_finds_figures_that_are_not_on_the_page() -> None:
    """A figure missing from the page, an unlinked ratio and an unlinked Performance number are all reported."""
    source = "| 1 overhead | ours | 0.98x plain | 2.1 ms |".replace("x", TIMES)
    readme = (
        (
            "Intro 0.5x\n\n## Performance\n\n"
            "[0.98x](docs/benchmarks.md) and [0.42x](docs/benchmarks.md#x), then 2.1 ms, 7 req/s and 3 refreshes."
            "\n\n## More\n3 ms\n"
        )
        .replace("x]", TIMES + "]")
        .replace("0.5x", "0.5" + TIMES)
    )
    assert problems("README.md", readme, source) == [
        f"README.md: [0.42{TIMES}] is not in docs/benchmarks.md's results",
        f"README.md: ratio '0.5{TIMES}' is not a link to docs/benchmarks.md",
        "README.md, Performance: '2.1 ms' is not a link to docs/benchmarks.md",
        "README.md, Performance: '7 req/s' is not a link to docs/benchmarks.md",
        "README.md, Performance: '3 refreshes' is not a link to docs/benchmarks.md",
    ]
    assert problems("mcp.md", "[2.1 ms](benchmarks.md) 1.5 s", source) == []
