"""Real signals sent to `circuits discover --method acdc` at chosen moments of a run, then --resume.

Each run is a subprocess of the installed ``circuits`` command on the shipped induction model.
A signal is sent at a moment the test sees from outside the process, never after a fixed delay
(a busy machine can take seconds just to start Python): on Linux through ``/proc/<pid>`` (the
SIGINT handler the entry point installs, torch's libraries mapped, the model's weights mapped),
and anywhere through the run's first progress file. The program itself carries no test hooks.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from circuits.tasks.induction import MODEL
from circuits.zoo import find

pytestmark = pytest.mark.slow

# the installed command next to this Python (a virtual environment's bin/), else the module
_SCRIPT = Path(sys.executable).with_name("circuits")
CIRCUITS = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "circuits"]
ARGS = ["discover", "induction", "--n", "16", "--select", "topk:20", "--method", "acdc"]
PROGRESS = Path(".progress") / "acdc.safetensors"
# a guard against a hung run, not a time limit: on a loaded machine a run takes minutes
HANG = 1800


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
    done = subprocess.run(command(out), capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    return results(out)


# -- moments of a run, as seen from outside it ---------------------------------------------------
def _proc(pid: int, name: str) -> str:
    """/proc/<pid>/<name>; empty once the process has gone."""
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _mapped(pid: int, wanted: Callable[[str], bool]) -> bool:
    """Whether the process maps a file whose path `wanted` accepts (/proc/<pid>/maps)."""
    rows = [line.split(maxsplit=5) for line in _proc(pid, "maps").splitlines()]
    return any(len(row) == 6 and wanted(row[5]) for row in rows)  # the 6th field: the path


def _catches_sigint(pid: int) -> bool:
    """Whether the process has a handler for SIGINT (the SigCgt mask of /proc/<pid>/status)."""
    caught = next((line.split()[1] for line in _proc(pid, "status").splitlines()
                   if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signal.SIGINT - 1) & 1)


_TORCH = str(Path(find_spec("torch").origin).parent.resolve()) + "/"
_WEIGHTS = str((find(MODEL) / "model.safetensors").resolve())

#: Each moment is a test on (pid, output folder) that turns true when the moment has come and
#: stays true after it. "started": the entry point has installed its SIGINT handler (seen only
#: when the run starts with SIGINT ignored; otherwise Python installs one before any of the
#: program runs). "importing": a library of torch is mapped, which the package's import loads
#: after the entry point has installed the handler. "loading": the model's weights are mapped.
#: "running": the method has written its first progress.
MOMENTS: dict[str, Callable[[int, Path], bool]] = {
    "started": lambda pid, out: _catches_sigint(pid),
    "importing": lambda pid, out: _mapped(pid, lambda path: path.startswith(_TORCH)
                                          and ".so" in path),
    "loading": lambda pid, out: _mapped(pid, lambda path: path == _WEIGHTS),
    "running": lambda pid, out: (out / PROGRESS).exists(),
}
needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(),
                                reason="watches the run through /proc/<pid>")


def start(out: Path, ignored: bool = False) -> subprocess.Popen:
    """A run writing into `out`; with `ignored`, started with SIGINT ignored, as `circuits ... &`
    from a script is."""
    return subprocess.Popen(
        command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None)


def signal_at(run: subprocess.Popen, out: Path, moment: str, sig: signal.Signals
              ) -> tuple[int, str]:
    """Send `sig` to the run as soon as `moment` is seen; (status, stderr). A run left over by
    a failed check is killed."""
    reached, deadline = MOMENTS[moment], time.monotonic() + HANG
    try:
        while not reached(run.pid, out):
            assert run.poll() is None, f"the run ended before {moment!r}: {run.communicate()}"
            assert time.monotonic() < deadline, f"{moment!r} not seen in {HANG} s"
            time.sleep(0.005)
        run.send_signal(sig)
        _, err = run.communicate(timeout=HANG)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    return run.returncode, err


def stop_mid_run(out: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start a run, send `sig` as soon as its first progress is written; (status, stderr)."""
    return signal_at(start(out), out, "running", sig)


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
    done = subprocess.run(command(out, "--resume"), capture_output=True, text=True, timeout=HANG)
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


def one_interrupted_line(err: str) -> bool:
    """Whether stderr is one line, the program's own about the interruption."""
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("circuits: interrupted")


@pytest.mark.parametrize("ignored, moment", [
    pytest.param(False, "importing", marks=needs_proc, id="foreground-importing"),
    pytest.param(False, "loading", marks=needs_proc, id="foreground-loading"),
    pytest.param(False, "running", id="foreground-running"),
    pytest.param(True, "started", marks=needs_proc, id="started-ignoring-started"),
    pytest.param(True, "importing", marks=needs_proc, id="started-ignoring-importing"),
    pytest.param(True, "loading", marks=needs_proc, id="started-ignoring-loading"),
    pytest.param(True, "running", id="started-ignoring-running"),
])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(tmp_path, ignored, moment):
    """As soon as the entry point runs (seen only when SIGINT starts ignored), while the package
    is still importing, while the model loads, while it runs; also for a run started with SIGINT
    ignored, as `circuits ... &` from a script is. A Ctrl-C during Python's own start-up,
    before the entry point runs, is outside what the program promises (see circuits_entry)."""
    out = tmp_path / "out"
    status, err = signal_at(start(out, ignored), out, moment, signal.SIGINT)
    assert status == 130, err
    assert one_interrupted_line(err), err
    assert not (out / "circuit.json").exists()  # stopped before the outputs were written


def test_ctrl_c_between_the_import_and_the_commands_own_handler():
    """A Ctrl-C that lands once the package is imported but before the command installs its own
    handler (or after it has removed it) still ends with one line and 130. The command line's
    `entry` is replaced by one that receives a real SIGINT at once: the widest version of a gap
    that in a real run lasts microseconds."""
    code = ("import os, signal, circuits.cli, circuits_entry; "
            "circuits.cli.entry = lambda: os.kill(os.getpid(), signal.SIGINT); "
            "circuits_entry.entry()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=HANG)
    assert done.returncode == 130, done.stderr
    assert one_interrupted_line(done.stderr), done.stderr
