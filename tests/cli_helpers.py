"""What the command-line tests share: run the program in-process and read what it printed."""

from __future__ import annotations

import re

import pytest

from circuits import cli


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``circuits ARGV`` in this process: its exit status, stdout and stderr."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, *words: str) -> str:
    """stderr holds exactly one line, ``circuits: error: ...`` naming `words`, no traceback;
    returns that line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("circuits: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, err)
    return lines[0]


def summary_rows(stdout: str) -> list[tuple[str, str]]:
    """The printed summary's rows (name, value), in order: columns are two or more spaces
    apart."""
    return [tuple(re.split(r"\s{2,}", line, maxsplit=1)) for line in stdout.strip().splitlines()]


def summary(stdout: str) -> dict[str, str]:
    """The printed summary's rows as a dict from name to value."""
    return dict(summary_rows(stdout))
