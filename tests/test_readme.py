"""README.md's shell examples run as written.

The convention, for whoever edits the README:

* Every fenced ```` ```bash ```` block is run as one script with ``bash -euo pipefail``. All
  blocks run in README order in one fresh temporary directory (so a later block can use what an
  earlier one wrote, as a reader following along would), with the virtual environment's
  ``bin/`` first on ``PATH`` (``circuits`` and ``python`` are the installed ones). Each block
  must exit 0.
* A block whose first line is a comment containing ``needs network``, ``needs a GPU``,
  ``setup`` or ``benchmark`` is not run (hub downloads; commands for a CUDA machine; the
  make-based installation; the benchmarks, which rewrite the committed results and are covered
  by their own quick test).
* A line ``# expect: PATH [PATH ...]`` inside a block names files or folders, relative to that
  directory, that must exist after the block ran (files non-empty).

Other fences (```` ```python ````, ```` ```text ````) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_WORDS = ("needs network", "needs a GPU", "setup", "benchmark")
FENCE = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
EXPECT = re.compile(r"^\s*#\s*expect:\s*(.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """One ```bash block: its text, the README line it starts on, the paths it promises."""

    text: str
    line: int
    expect: tuple[str, ...]

    @property
    def skipped(self) -> bool:
        first = self.text.strip().splitlines()[0].strip() if self.text.strip() else ""
        if EXPECT.match(first):  # a file named e.g. setup.json must not skip the block
            return False
        return first.startswith("#") and any(w in first.lower() for w in SKIP_WORDS)


def bash_blocks(markdown: str) -> list[Block]:
    """The ```bash blocks of a markdown text, in order."""
    blocks = []
    for match in FENCE.finditer(markdown):
        text = match.group(1)
        expect = tuple(p for m in EXPECT.finditer(text) for p in m.group(1).split())
        blocks.append(Block(text, markdown.count("\n", 0, match.start()) + 1, expect))
    return blocks


def run_blocks(readme: Path, workdir: Path, timeout: float = 900) -> int:
    """Run every runnable block of `readme` in `workdir`; returns how many ran. Fails the test
    with the block's output on the first non-zero exit or missing expected path."""
    blocks = bash_blocks(readme.read_text(encoding="utf-8"))
    if not blocks:
        pytest.fail(f"{readme} has no ```bash blocks; add the Quickstart commands (see "
                    "tests/test_readme.py for the conventions)")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MPLBACKEND="Agg")
    ran = 0
    for block in blocks:
        if block.skipped:
            continue
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=workdir,
                              env=env, capture_output=True, text=True, timeout=timeout)
        where = f"README.md line {block.line}"
        assert done.returncode == 0, (
            f"{where}: the block exited {done.returncode}\n--- block ---\n{block.text}"
            f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}")
        for name in block.expect:
            path = workdir / name
            assert path.exists(), f"{where}: the block should have written {name}"
            assert path.is_dir() or path.stat().st_size > 0, f"{where}: {name} is empty"
        ran += 1
    return ran


def test_conventions_are_parsed():
    text = ("intro\n```bash\ncircuits tasks\n# expect: a.txt b/c.json\n```\n"
            "```python\nprint(1)\n```\n"
            "```bash\n# needs network: downloads GPT-2\ncircuits discover ioi --model gpt2\n```\n"
            "```bash\n# setup (once)\nmake setup\n```\n"
            "```bash\n# expect: setup.json\ntouch setup.json\n```\n")
    blocks = bash_blocks(text)
    assert [b.line for b in blocks] == [2, 9, 13, 17]
    assert blocks[0].expect == ("a.txt", "b/c.json")
    assert [b.skipped for b in blocks] == [False, True, True, False]


@pytest.mark.slow
def test_readme_bash_blocks_run(tmp_path):
    assert README.is_file(), f"{README} is missing; the README's Quickstart is tested here"
    assert run_blocks(README, tmp_path) > 0, "every ```bash block of README.md is skipped"
