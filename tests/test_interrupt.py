"""Real signals sent to `circuits discover --method acdc` in the middle of a run, then --resume.

Each run is a subprocess of the installed ``circuits`` command on the shipped induction model;
the signal is timed by waiting for the run's first progress file, not by a fixed sleep.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

pytestmark = pytest.mark.slow

# the installed command next to this Python (a virtual environment's bin/), else the module
_SCRIPT = Path(sys.executable).with_name("circuits")
CIRCUITS = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "circuits"]
ARGS = ["discover", "induction", "--n", "16", "--select", "topk:20", "--method", "acdc"]
PROGRESS = Path(".progress") / "acdc.safetensors"


def command(out: Path, *extra: str) -> list[str]:
    return [*CIRCUITS, *ARGS, "--out", str(out), *extra]


def strict_json(path: Path) -> Any:
    """The parsed file; NaN, Infinity or a truncated file fail."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text("utf-8"), parse_constant=refuse)


def results(out: Path) -> tuple[Any, Any]:
    """circuit.json and scores.json of a finished run, without the cost (time, passes run)."""
    scores = strict_json(out / "scores.json")
    scores.pop("cost")
    return strict_json(out / "circuit.json"), scores


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Any, Any]:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    done = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return results(out)


def stop_mid_run(out: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start a run, send `sig` as soon as its first progress is written; (status, stderr)."""
    run = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 240
    while not (out / PROGRESS).exists():
        assert run.poll() is None, f"the run ended before any progress: {run.communicate()}"
        assert time.monotonic() < deadline, "no progress written in 240 s"
        time.sleep(0.01)
    run.send_signal(sig)
    _, err = run.communicate(timeout=120)
    return run.returncode, err


def check_files(out: Path) -> int:
    """Every file left is whole: no temporary files, JSON that parses, progress that loads.
    Returns the number of ACDC destinations the progress says are done."""
    names = [p.name for p in out.rglob("*")]
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".staging")], names
    for path in out.rglob("*.json"):
        strict_json(path)
    with safe_open(str(out / PROGRESS), "pt") as f:
        assert set(f.keys()) == {"removed", "scores"}
        state = json.loads(f.metadata()["state"])
    assert not (out / "circuit.json").exists()  # the run stopped before its outputs
    return state["position"]


def resume(out: Path) -> tuple[Any, Any]:
    done = subprocess.run(command(out, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (out / ".progress").exists()  # a finished run leaves no progress behind
    return results(out)


def test_ctrl_c_stops_with_130_and_resume_gives_the_same_circuit(tmp_path, uninterrupted):
    out = tmp_path / "out"
    status, err = stop_mid_run(out, signal.SIGINT)
    assert status == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert check_files(out) >= 1
    assert resume(out) == uninterrupted


def test_sigkill_mid_run_then_resume_gives_the_same_circuit(tmp_path, uninterrupted):
    out = tmp_path / "out"
    status, _ = stop_mid_run(out, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert check_files(out) >= 1
    assert resume(out) == uninterrupted


@pytest.mark.parametrize("delay", [0.05, 0.4, 1.5])
@pytest.mark.parametrize("ignored", [False, True], ids=["foreground", "started-ignoring"])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(tmp_path, delay, ignored):
    """While the package is still importing, while the model loads, while it runs; also for a
    run started with SIGINT ignored, as `circuits ... &` from a script is."""
    out = tmp_path / "out"
    run = subprocess.Popen(
        [*CIRCUITS, *ARGS, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if ignored else None)
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuits: interrupted"), err
    assert not (out / "circuit.json").exists()  # stopped before the outputs were written
