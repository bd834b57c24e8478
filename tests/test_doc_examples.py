"""Every code block of README.md and docs/ runs, as written, against the local provider over loopback.

The convention (docs/testing.md, "The examples in these docs"): a fenced block whose info string is ``python``
runs here, each in a fresh interpreter in an empty folder, and must exit 0 (its own ``assert`` lines check what
the text around it says). Any other block (a shell command, output, a fragment, a snippet include) carries an
HTML comment on the line just before its fence, which the site does not show:

- ``<!-- not run: why -->``: nothing runs it; the reason is said;
- ``<!-- run by: tests/test_x.py (why) -->``: another test runs it (it needs the MCP SDK 1.x, or checks the
  output), and that test file names the document.

The counts below make every exclusion visible in a diff: a new block that does not run changes them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^`\n]*)$")
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', flags=re.M)
MARKER = re.compile(r"^\s*<!-- (?P<kind>not run|run by): (?P<why>.+?) -->\s*$")

#: How many blocks run here, run in another test, and run nowhere (update with the docs, on purpose).
RUN_HERE = 12
RUN_ELSEWHERE = 8
NOT_RUN = 14


@attrs.frozen
class Block:
    """One fenced code block of a document."""

    path: Path
    line: int  # of the opening fence, 1-based
    info: str
    code: str
    marker: tuple[str, str] | None  # (kind, why) from the comment before the fence

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file (indented ones, inside tabs or lists, included)."""
    lines = path.read_text().splitlines()
    found = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = index + 1
        while end < len(lines) and not re.fullmatch(rf" *{re.escape(fence)}\s*", lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{index + 1}: the fence is never closed")
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[index + 1 : end]]
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.match(before)
        found.append(
            Block(
                path,
                index + 1,
                opening["info"].strip(),
                "\n".join(body) + "\n",
                None if marker is None else (marker["kind"], marker["why"]),
            )
        )
        index = end + 1
    return found


ALL = [block for path in DOCUMENTS for block in blocks(path)]
RUNNABLE = [block for block in ALL if block.marker is None and block.info == "python"]


def test_every_block_runs_or_says_why_not() -> None:
    """Each block is a plain ``python`` block run here, or marked; the counts are the ones recorded above."""
    unmarked = [block.name for block in ALL if block.marker is None and block.info != "python"]
    assert unmarked == [], "mark these blocks <!-- not run: why --> or <!-- run by: tests/... -->"
    for block in ALL:
        if block.marker is not None and block.marker[0] == "run by":
            where = block.marker[1].split()[0]  # the test file, then why it runs the block
            test = ROOT / where
            assert test.is_file(), f"{block.name}: {where} does not exist"
            # A snippet include (--8<-- "examples/x.py") is the file it includes; any other block, its page.
            named = [Path(name).name for name in SNIPPET.findall(block.code)] or [block.path.name]
            assert all(name in test.read_text() for name in named), f"{block.name}: {where} does not name {named}"
    elsewhere = [block for block in ALL if block.marker is not None and block.marker[0] == "run by"]
    skipped = [block for block in ALL if block.marker is not None and block.marker[0] == "not run"]
    counts = {"run here": len(RUNNABLE), "run by another test": len(elsewhere), "not run": len(skipped)}
    assert counts == {"run here": RUN_HERE, "run by another test": RUN_ELSEWHERE, "not run": NOT_RUN}, "\n".join(
        f"{block.name}: {block.marker}" for block in [*elsewhere, *skipped]
    )


def test_the_parser_finds_indented_blocks_and_markers(tmp_path: Path) -> None:
    """A block inside a tab (indented) is found and dedented; a marker applies to the next fence only."""
    page = tmp_path / "page.md"
    page.write_text(
        '=== "Sync"\n\n    ```python\n    if True:\n        print(1)\n    ```\n\n'
        "<!-- not run: a shell command -->\n```bash\nls\n```\n\n```\nout\n```\n"
    )
    found = blocks(page)
    assert [(b.line, b.info, b.code, b.marker) for b in found] == [
        (3, "python", "if True:\n    print(1)\n", None),
        (9, "bash", "ls\n", ("not run", "a shell command")),
        (13, "", "out\n", None),
    ]


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_example_runs(block: Block, tmp_path: Path) -> None:
    """The example runs to its end in a fresh interpreter (its own asserts check what the page says)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", block.code],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, f"{block.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
