"""Data parallel over prompts (circuits.distributed): the ranks' shares add up to one process.

The rank split is checked in one process by playing each rank in turn; the collectives and the
command line under ``torchrun`` (gloo, two CPU ranks) in subprocesses, marked slow.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from circuits import Setup, cli, distributed, evaluate, get_task, load_model
from circuits.api import make_setup, task_positions
from circuits.commands.common import DISCOVER_FILES
from circuits.errors import OptionError
from circuits.methods import get_method, run_method
from circuits.testing import make_batch, model_folder, tiny_gpt2
from circuits.toys import induction_toy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--standalone"]


def play_rank(monkeypatch, r: int, w: int) -> None:
    """Make this process answer as rank `r` of `w` (no process group needed)."""
    monkeypatch.setattr(distributed, "rank", lambda: r)
    monkeypatch.setattr(distributed, "world", lambda: w)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_one_process_helpers_are_identities():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert distributed.world() == 1 and distributed.is_main()
    assert distributed.shard(5) == slice(0, 5)
    assert distributed.all_sum(t) is t and distributed.gather_rows(t) is t
    setup = Setup(tiny_gpt2(), [make_batch(vocab=32)], "logit-diff")
    assert setup.shard() is setup


def test_shards_cover_every_prompt_once(monkeypatch):
    # batches of 3 and 2 prompts over 3 ranks: 5 rows, split 1 / 2 / 2 across batch borders
    batches = [make_batch(b=3, vocab=32, seed=0), make_batch(b=2, vocab=32, seed=1)]
    setup = Setup(tiny_gpt2(), batches, "logit-diff")
    rows, weights = [], []
    for r in range(3):
        play_rank(monkeypatch, r, 3)
        part = setup.shard()
        rows += [row for b in part.batches for row in b.clean.tolist()]
        # each batch's weight is its share of all five prompts
        weights += [(b.size, w) for b, w in zip(part.batches, part.weights, strict=True)]
    assert rows == [row for b in batches for row in b.clean.tolist()]
    assert weights == [(1, 1 / 5), (2, 2 / 5), (2, 2 / 5)]


def test_more_ranks_than_prompts_is_refused(monkeypatch):
    setup = Setup(tiny_gpt2(), [make_batch(b=2, vocab=32)], "logit-diff")
    play_rank(monkeypatch, 0, 3)
    with pytest.raises(OptionError, match="2 prompts cannot be shared by 3 ranks"):
        setup.shard()


@pytest.mark.parametrize("method", ["eap", "exact", "eap-ig", "path-patching"])
@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_ranks_scores_add_up_to_one_process(monkeypatch, method, ablation):
    batches = [make_batch(b=3, vocab=32, seed=0), make_batch(b=4, vocab=32, seed=1)]
    setup = Setup(tiny_gpt2(), batches, "logit-diff", ablation)
    fn = get_method(method).fn

    def scores(s: Setup) -> torch.Tensor:
        out = fn(s)
        return (out[0] if isinstance(out, tuple) else out).double()

    whole = scores(setup)
    parts = []
    for r in range(2):
        play_rank(monkeypatch, r, 2)
        parts.append(scores(setup.shard()))
    assert whole.abs().max() > 1e-3  # a real signal, not rounding noise
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-7)


WORKER = """
import json, sys
import torch
from circuits import Setup, distributed, evaluate
from circuits.methods import get_method, run_method
from circuits.testing import make_batch, tiny_gpt2
from circuits.toys import induction_toy

torch.set_num_threads(1)
with distributed.process_group() as created:
    assert created and distributed.world() == 2
    setup = Setup(tiny_gpt2(), [make_batch(b=3, vocab=32, seed=0),
                                make_batch(b=4, vocab=32, seed=1)], "logit-diff")
    diffs, passes = {}, {}
    for method in ("eap", "exact", "eap-ig", "path-patching"):
        out = get_method(method).fn(setup)  # the whole run, in this process
        whole = out[0] if isinstance(out, tuple) else out
        both = run_method(method, setup)  # each rank its share, then the sum
        diffs[method] = [float((both.values - whole).abs().max()), float(whole.abs().max())]
        passes[method] = [both.cost.forward, both.cost.backward]
    model, batches, _ = induction_toy(n=8)
    acdc = run_method("acdc", Setup(model, batches, "logit-diff"), threshold=0.1)
    passes["acdc"] = [acdc.cost.forward, acdc.cost.backward]
    found = evaluate(acdc.circuit, Setup(model, batches, "logit-diff", "mean")).as_dict()
    rows = distributed.gather_rows(torch.arange(3.0) + 10 * distributed.rank())
    if distributed.is_main():
        json.dump({"diffs": diffs, "rows": rows.tolist(), "acdc": acdc.values.tolist(),
                   "kept": acdc.circuit.tolist(), "evaluation": found,
                   "passes": passes},
                  open(sys.argv[1], "w"))
assert not torch.distributed.is_initialized()  # the group made here is gone
"""


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    result = tmp_path / "result.json"
    done = subprocess.run([*TORCHRUN, str(script), str(result)], env=env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(result.read_text())
    for method, (diff, size) in found["diffs"].items():
        assert size > 1e-3 and diff <= 1e-5 * size, method
    assert found["rows"] == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    # ACDC: the ranks add each variant's loss before deciding, so they decide as one process
    model, batches, _ = induction_toy(n=8)
    one = run_method("acdc", Setup(model, batches, "logit-diff"), threshold=0.1)
    assert found["kept"] == one.circuit.tolist()
    torch.testing.assert_close(torch.tensor(found["acdc"]), one.values, rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    # the job's passes are the ranks' together: those of one process
    assert found["passes"]["acdc"] == pytest.approx([one.cost.forward, one.cost.backward])
    setup = Setup(tiny_gpt2(), [make_batch(b=3, vocab=32, seed=0),
                                make_batch(b=4, vocab=32, seed=1)], "logit-diff")
    for method in ("eap", "exact"):
        cost = run_method(method, setup).cost
        assert found["passes"][method] == pytest.approx([cost.forward, cost.backward]), method
    # evaluation: per-prompt values gathered from the ranks, the interval drawn on all of them
    whole = evaluate(one.circuit, Setup(model, batches, "logit-diff", "mean")).as_dict()
    assert found["evaluation"] == pytest.approx(whole, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_discover_under_torchrun_writes_one_set_of_files(tmp_path, capsys):
    model = model_folder("gpt2", tmp_path / "model", initializer_range=0.2)
    argv = ["discover", "ioi", "--model", str(model), "--n", "12", "--batch-size", "4",
            "--method", "eap-ig", "--steps", "2", "--select", "topk:10"]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    # without `--`, torchrun takes --n for one of its own options and stops
    wrong = subprocess.run([*TORCHRUN, "-m", "circuits", *argv], env=env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "ambiguous option: --n" in wrong.stderr
    done = subprocess.run([*TORCHRUN, "-m", "circuits", "--", *argv,
                           "--out", str(tmp_path / "two")],
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("edges kept") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(DISCOVER_FILES)
    one, two = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("one", "two"))
    a = torch.tensor(list(one["scores"].values()), dtype=torch.float64)
    b = torch.tensor(list(two["scores"].values()), dtype=torch.float64)
    assert list(one["scores"]) == list(two["scores"]) and a.abs().max() > 1e-3
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    kept, metrics = [], []
    for d in ("one", "two"):
        circuit = json.loads((tmp_path / d / "circuit.json").read_text())
        kept.append({e for e, v in circuit["edges"].items() if v["in_circuit"]})
        metrics.append(circuit["metrics"])
    assert kept[0] == kept[1] and kept[0]
    for key in ("faithfulness", "faithfulness_ci_low", "faithfulness_ci_high"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-5, abs=1e-7), key


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The ranks torchrun started, by rank: {rank: pid}."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher.pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone in the meantime
        rank = next(v for v in environ if v.startswith(b"RANK=")).split(b"=")[1]
        found[int(rank)] = int(stat.parent.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks in /proc")
@pytest.mark.parametrize("method, progress", [("exact", "exact"), ("acdc", "acdc")])
def test_ctrl_c_to_one_rank_stops_all_and_resume_finishes(tmp_path, capsys, method, progress):
    model = model_folder("gpt2", tmp_path / "model", initializer_range=0.2)
    argv = ["discover", "ioi", "--model", str(model), "--n", "48", "--batch-size", "2",
            "--method", method, "--select", "topk:10"]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    two = [*TORCHRUN, "-m", "circuits", "--", *argv, "--out", str(tmp_path / "two")]
    launcher = subprocess.Popen(two, env=env(), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    # rank 0 has saved progress (ACDC's state is every rank's: rank 0 alone keeps it)
    saved = tmp_path / "two" / ".progress" / "rank-0" / f"{progress}.safetensors"
    while not saved.exists() and launcher.poll() is None:
        time.sleep(0.05)
    os.kill(rank_pids(launcher)[1], signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    # torchrun's summary: both ranks ended with 130
    assert err.count("exitcode  : 130") == 2, err[-3000:]
    assert err.count("circuits: interrupted") == 2
    assert not (tmp_path / "two" / "scores.json").exists()
    done = subprocess.run([*two, "--resume"], env=env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "two" / ".progress").exists()
    a, b = (json.loads((tmp_path / d / "scores.json").read_text())["scores"]
            for d in ("one", "two"))
    # ACDC leaves the edges of skipped destinations unscored (null)
    a, b = (torch.tensor([math.nan if v is None else v for v in s.values()],
                         dtype=torch.float64) for s in (a, b))
    assert a.nan_to_num().abs().max() > 1e-3
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.nan_to_num().abs().max(),
                               equal_nan=True)


@pytest.mark.slow
def test_evaluate_under_torchrun_prints_what_one_process_prints(tmp_path, capsys):
    model = model_folder("gpt2", tmp_path / "model", initializer_range=0.2)
    argv = ["discover", "ioi", "--model", str(model), "--n", "12", "--method", "eap",
            "--select", "topk:10", "--out", str(tmp_path / "one")]
    assert cli.main(argv) == 0
    evaluate_ = ["evaluate", str(tmp_path / "one" / "circuit.json"), "--n", "16"]
    capsys.readouterr()
    assert cli.main(evaluate_) == 0
    one = capsys.readouterr().out
    done = subprocess.run([*TORCHRUN, "-m", "circuits", "--", *evaluate_], env=env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # faithfulness, its interval (on all 16 prompts) and the curve, printed once
    assert "faithfulness" in one and done.stdout == one


@pytest.fixture(scope="module")
def ioi_at_positions() -> Setup:
    model = load_model("ioi-gpt2-4l")
    task = get_task("ioi", model.tokenizer, n=6, seed=3)
    return make_setup(model, task, positions=task_positions(task, model), batch_size=4)


@pytest.mark.parametrize("method", ["eap", "exact"])
def test_ranks_scores_at_positions_add_up_to_one_process(monkeypatch, ioi_at_positions, method):
    setup = ioi_at_positions
    fn = get_method(method).fn
    whole = fn(setup).double()  # [P, n_src, n_dst]
    parts = torch.zeros_like(whole)
    for r in range(2):
        play_rank(monkeypatch, r, 2)
        parts += fn(setup.shard()).double()
    assert whole.abs().max() > 1e-3
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
