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
* ``circuits`` runs with its imports already made (tests/warm_program.py: a forked child of a
  process that imported the program, with the command's arguments, folder, environment and
  streams); a command given its own environment variables runs the installed program itself.

Other fences (```` ```python ````, ```` ```text ````) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import one_error_line, run
from warm_program import warm_program

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_WORDS = ("needs network", "needs a gpu", "setup", "benchmark")  # lower case
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


@pytest.fixture(scope="module")
def program() -> Iterator[tuple[dict[str, str], Path]]:
    """The environment the blocks run in, with ``circuits`` warm (tests/warm_program.py), and
    the file that lists the commands the server ran."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MPLBACKEND="Agg")
    with tempfile.TemporaryDirectory() as server, warm_program(env, Path(server)) as warm:
        yield warm, Path(server) / "server.sock.log"


def run_blocks(readme: Path, workdir: Path, env: dict[str, str], timeout: float = 900) -> int:
    """Run every runnable block of `readme` in `workdir` with environment `env`; returns how
    many ran. Fails the test with the block's output on the first non-zero exit or missing
    expected path."""
    blocks = bash_blocks(readme.read_text(encoding="utf-8"))
    if not blocks:
        pytest.fail(f"{readme} has no ```bash blocks; add the Quickstart commands (see "
                    "tests/test_readme.py for the conventions)")
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
            "```bash\n# expect: setup.json\ntouch setup.json\n```\n"
            "```bash\n# needs a GPU\ncircuits discover ioi --device cuda\n```\n")
    blocks = bash_blocks(text)
    assert [b.line for b in blocks] == [2, 9, 13, 17, 21]
    assert blocks[0].expect == ("a.txt", "b/c.json")
    assert [b.skipped for b in blocks] == [False, True, True, False, True]


def test_warm_program_runs_commands_as_the_program(program, tmp_path, capsys, monkeypatch):
    """Through the stand-in a command writes the output and files in its folder and exits with
    the status the program gives; one given its own environment variable runs the installed
    program itself."""
    warm, log = program
    if not (log.parent / "bin" / "circuits").is_file():
        pytest.skip("no stand-in here (no installed circuits, or a space in this Python's path)")
    script = ("circuits tasks > tasks.txt\n"
              "circuits discover nosuchtask 2> err.txt || echo $? > status.txt\n"
              "echo {} > bad.json\n"  # read from the command's folder: the message says why
              "circuits evaluate bad.json 2> bad.txt || true\n"
              "CIRCUITS_KEEP_FREED_MEMORY=0 circuits tasks > tasks-real.txt\n")
    before = log.read_text().splitlines() if log.exists() else []
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=warm, check=True,
                   timeout=300)
    served = log.read_text().splitlines()[len(before):]
    assert served == ['["tasks"]', '["discover", "nosuchtask"]', '["evaluate", "bad.json"]']
    assert run(["tasks"], capsys)[1] == (tmp_path / "tasks.txt").read_text() \
        == (tmp_path / "tasks-real.txt").read_text()
    status, _, err = run(["discover", "nosuchtask"], capsys)
    assert (tmp_path / "status.txt").read_text() == f"{status}\n" == "2\n"
    assert (tmp_path / "err.txt").read_text() == err == one_error_line(err, "nosuchtask") + "\n"
    monkeypatch.chdir(tmp_path)
    err = run(["evaluate", "bad.json"], capsys)[2]
    assert (tmp_path / "bad.txt").read_text() == err == one_error_line(err, "format") + "\n"


@pytest.mark.slow
def test_readme_bash_blocks_run(program, tmp_path):
    assert README.is_file(), f"{README} is missing; the README's Quickstart is tested here"
    ran = run_blocks(README, tmp_path, program[0])
    assert ran > 0, "every ```bash block of README.md is skipped"
