"""Benchmark figures have one source: docs/benchmark-results.md, which ``python benchmarks/compare.py --full``
writes whole (machine, command, date, the table) and docs/benchmarks.md includes (no benchmark runs here).

The convention: a figure quoted from the benchmarks is a link to the benchmarks page whose text is the figure as
the results file prints it, ``[0.98X](docs/benchmarks.md)`` where X is the multiplication sign U+00D7
(``(benchmarks.md)`` from docs/, ``(../docs/benchmarks.md)`` from benchmarks/, an anchor allowed). The checks
over README.md, docs/*.md and benchmarks/README.md: (1) every such link's text appears in the results file,
verbatim; (2) a ratio written as the results write them (``0.97`` and the sign, no space) appears only as such a
link; (3) in the sections that report results (README.md's "Performance", docs/benchmarks.md's "httpx or
httpx2?" and "Targets", all of docs/storage.md and benchmarks/README.md), no measured figure (a number with the
multiplication sign, µs, ms, req/s, % or B; in the README's section also s and counts) stands outside such a
link, a code span or a code block. A target is written after ≤ or ≥ and is not a figure.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
SOURCE = ROOT / "docs" / "benchmark-results.md"
COMPARE = ROOT / "benchmarks" / "compare.py"

TIMES = "\N{MULTIPLICATION SIGN}"
LINK = re.compile(r"\[([^\]]*)\]\(((?:\.\./)?(?:docs/)?benchmarks\.md)(#[^)]*)?\)")
# As the results print ratios: a multiplier written with a space before the sign (in docs/simulation.md) is none.
RATIO = re.compile(r"\d+\.\d+" + TIMES)
TARGET = r"(?<![≤≥] )(?<![≤≥\d.,])"
MEASURED = re.compile(TARGET + r"\d[\d,]*(?:\.\d+)?\s*(?:" + TIMES + r"|µs|us\b|ms\b|req/s|%|B\b)")
UNIT_NUMBER = re.compile(
    TARGET + r"\d[\d,]*(?:\.\d+)?\s*(?:" + TIMES + r"|µs|us\b|ms\b|s\b|req/s|%|B\b"
    r"|refresh(?:es)?\b|logins?\b|reused\b|failures?\b|failed\b|requests\b|calls\b)"
)
#: The sections that report results: (file, section title or None for the whole file).
STRICT = [
    ("README.md", "Performance", UNIT_NUMBER),
    ("docs/benchmarks.md", "httpx or httpx2?", MEASURED),
    ("docs/benchmarks.md", "Targets", MEASURED),
    ("docs/storage.md", None, MEASURED),
    ("benchmarks/README.md", None, MEASURED),
]


def section(text: str, title: str | None) -> str:
    """A markdown ``## title`` section's text (empty when there is none; the whole text for ``None``)."""
    if title is None:
        return text
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    return match.group(1) if match else ""


def code_free(text: str) -> str:
    """``text`` without its code blocks and code spans (which show a link's syntax, or a setting's value)."""
    text = re.sub(r"^ *```.*?^ *```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def prose(text: str) -> str:
    """``text`` without its code and its links to the benchmarks page."""
    return LINK.sub("", code_free(text))


def problems(name: str, text: str, source: str) -> list[str]:
    """What is wrong with the benchmark figures ``text`` (the file ``name``, from the root) quotes from ``source``."""
    found = []
    for match in LINK.finditer(code_free(text)):
        label = match.group(1)
        if re.search(r"\d", label) and label not in source:
            found.append(f"{name}: [{label}] is not in docs/benchmark-results.md")
    found += [f"{name}: ratio {ratio!r} is not a link to docs/benchmarks.md" for ratio in RATIO.findall(prose(text))]
    for path, title, pattern in STRICT:
        if path == name:
            where = f"{name}, {title}" if title else name
            found += [
                f"{where}: {figure!r} is not a link to docs/benchmarks.md"
                for figure in pattern.findall(prose(section(text, title)))
            ]
    return found


def documents() -> list[Path]:
    """Every file that may quote a benchmark figure (the results file itself aside)."""
    docs = [path for path in sorted((ROOT / "docs").glob("*.md")) if path != SOURCE]
    return [ROOT / "README.md", *docs, ROOT / "benchmarks" / "README.md"]


def test_quoted_benchmark_figures_are_in_the_results_file() -> None:
    """Every benchmark figure the README, docs/*.md and benchmarks/README.md quote is in the results file."""
    source = SOURCE.read_text()
    found: list[str] = []
    for path in documents():
        found += problems(str(path.relative_to(ROOT)), path.read_text(), source)
    assert found == []


def test_the_results_file_is_generated_and_included() -> None:
    """The results file starts with the header compare.py writes, names its run, and the benchmarks page
    includes it (a snippet) instead of copying it."""
    header = re.search(r'^RESULTS_HEADER = "(.*)"$', COMPARE.read_text(), flags=re.M)
    assert header is not None
    text = SOURCE.read_text()
    assert text.startswith(header.group(1) + "\n\nMode: full; ")
    assert "\nCommand: `python benchmarks/compare.py --full" in text and "\nMachine: " in text
    page = PAGE.read_text()
    assert '\n--8<-- "benchmark-results.md"\n' in page
    assert "| scenario | library |" not in page


def test_the_check_finds_figures_that_are_not_in_the_results() -> None:
    """A figure missing from the results, an unlinked ratio and an unlinked figure in a strict section are
    all reported; targets, code spans and figures outside the strict sections are not."""
    source = "| 1 overhead | ours | 0.98x plain | 2.1 ms |".replace("x", TIMES)
    readme = (
        (
            "Intro 0.5x\n\n## Performance\n\n"
            "[0.98x](docs/benchmarks.md) and [0.42x](docs/benchmarks.md#x), then 2.1 ms, 7 req/s and 3 refreshes;"
            " targets ≤ 5 µs and ≥ 0.97, and `--seconds 2 s`.\n\n## More\n3 ms\n"
        )
        .replace("x]", TIMES + "]")
        .replace("0.5x", "0.5" + TIMES)
    )
    assert problems("README.md", readme, source) == [
        f"README.md: [0.42{TIMES}] is not in docs/benchmark-results.md",
        f"README.md: ratio '0.5{TIMES}' is not a link to docs/benchmarks.md",
        "README.md, Performance: '2.1 ms' is not a link to docs/benchmarks.md",
        "README.md, Performance: '7 req/s' is not a link to docs/benchmarks.md",
        "README.md, Performance: '3 refreshes' is not a link to docs/benchmarks.md",
    ]
    assert problems("docs/mcp.md", "[2.1 ms](benchmarks.md) 1.5 s", source) == []
    assert problems("docs/storage.md", "a wake-up in 3 ms, every `2 ms`", source) == [
        "docs/storage.md: '3 ms' is not a link to docs/benchmarks.md"
    ]
