"""Data parallel over prompts (circuits.distributed): the ranks' shares add up to one process.

The rank split is checked in one process by playing each rank in turn; the collectives and the
command line under ``torchrun`` (gloo, two CPU ranks) in subprocesses, marked slow.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.run as torchrun

from circuits import Setup, cli, distributed, evaluate, get_task, load_model
from circuits.api import make_setup, task_positions
from circuits.commands.common import DISCOVER_FILES
from circuits.errors import OptionError
from circuits.faithfulness import metric_of_masks
from circuits.features.attribution import edge_effects, exact_node_effects, node_effects
from circuits.features.discovery import with_features
from circuits.features.runs import FeatureSet
from circuits.features.sae import SAE
from circuits.methods import get_method, run_method
from circuits.node_circuits import metric_of_nodes
from circuits.testing import make_batch, model_folder, tiny_gpt2, tiny_model
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


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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


def launch(tmp: Path, name: str, commands: list[list[str]], library: bool = False,
           stop_when: Path | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run `commands` in one torchrun job of two ranks (tests/dist_job.py), or one command
    with ``--ranks 2`` (`commands` of one command, `name` ``ranks``); with `stop_when`, send
    rank 1 a Ctrl-C once that file exists. The launcher's result, and per command the ranks'
    status and output (from the torchrun jobs)."""
    report = tmp / name
    report.mkdir()
    plan = tmp / f"{name}.json"
    plan.write_text(json.dumps({"report": str(report), "library": library,
                                "commands": commands}))
    argv = ([sys.executable, "-m", "circuits", *commands[0], "--ranks", "2"] if name == "ranks"
            else [*TORCHRUN, str(ROOT / "tests" / "dist_job.py"), str(plan)])
    launcher = subprocess.Popen(argv, env=env(), cwd=tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    if stop_when is not None:
        while not stop_when.exists() and launcher.poll() is None:
            time.sleep(0.05)
        os.kill(rank_pids(launcher)[1], signal.SIGINT)
    out, err = launcher.communicate(timeout=600)
    said = [[json.loads((report / f"{i}.rank-{r}.json").read_text()) for r in range(2)]
            for i in range(len(commands)) if (report / f"{i}.rank-1.json").exists()]
    done = subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err)
    if library:
        said.append(json.loads((report / "library.rank-0.json").read_text()))
    return done, said


def scores_of(folder: Path) -> torch.Tensor:
    """A discover run's scores in edge order (ACDC's unscored edges as NaN)."""
    scores = json.loads((folder / "scores.json").read_text())["scores"]
    return torch.tensor([math.nan if v is None else v for v in scores.values()],
                        dtype=torch.float64)


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """Everything the slow tests check, from three torchrun jobs of two ranks (gloo, CPU) and
    the same commands in this process:
    1. ``discover --method exact --ranks 2`` (circuits starts the job), rank 1 stopped by a
       Ctrl-C;
    2. the same with ``--resume``, then ``--method acdc``, rank 1 stopped by a Ctrl-C;
    3. the library checks, ACDC's ``--resume``, ``discover --method eap-ig``, ``evaluate``,
       ``bench``, and a command with a bad input (last: the job ends with its status).
    """
    tmp = tmp_path_factory.mktemp("ranks")
    model = str(model_folder("gpt2", tmp / "model", initializer_range=0.2))
    small = ["discover", "ioi", "--model", model, "--n", "12", "--select", "topk:10"]
    ig = [*small, "--batch-size", "4", "--method", "eap-ig", "--steps", "2"]
    slow = ["discover", "ioi", "--model", model, "--n", "48", "--batch-size", "2",
            "--select", "topk:10"]
    exact, acdc = ([*slow, "--method", m] for m in ("exact", "acdc"))
    evaluate_ = ["evaluate", str(tmp / "one-eap" / "circuit.json"), "--n", "16"]
    bench_ = ["bench", "--task", "induction", "--method", "eap,random,exact", "--n", "8"]
    bad = ["discover", str(tmp / "missing.jsonl"), "--model", model]
    found: dict = {"tmp": tmp}
    # one process
    for argv, out in ((ig, "one-ig"), (exact, "one-exact"), (acdc, "one-acdc"),
                      ([*small, "--method", "eap"], "one-eap")):
        assert cli.main([*argv, "--out", str(tmp / out)]) == 0, out
    assert cli.main([*bench_, "--out", str(tmp / "one-bench")]) == 0
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli.main(evaluate_) == 0
    found["evaluate"] = printed.getvalue()
    # two ranks
    found["exact-stopped"] = launch(
        tmp, "ranks", [[*exact, "--out", str(tmp / "two-exact")]],
        stop_when=tmp / "two-exact" / ".progress" / "rank-0" / "exact.safetensors")
    found["acdc-stopped"] = launch(
        tmp, "job-2", [[*exact, "--out", str(tmp / "two-exact"), "--resume"],
                       [*acdc, "--out", str(tmp / "two-acdc")]],
        stop_when=tmp / "two-acdc" / ".progress" / "rank-0" / "acdc.safetensors")
    found["rest"] = launch(
        tmp, "job-3", [[*acdc, "--out", str(tmp / "two-acdc"), "--resume"],
                       [*ig, "--out", str(tmp / "two-ig")], evaluate_,
                       [*bench_, "--out", str(tmp / "two-bench")], bad], library=True)
    return found


@pytest.mark.slow
def test_two_ranks_compute_what_one_process_computes(job):
    said = job["rest"][1][-1]  # the library checks: every method, ACDC, evaluation
    for method, (diff, size) in said["diffs"].items():
        assert size > 1e-3 and diff <= 1e-5 * size, method
    assert said["rows"] == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0]
    assert said["objects"] == [{"rank": 0}, {"rank": 1}]
    assert said["alone"] == [1, True, 1.0]  # rank 0 alone: a job of one, and still the main
    # a feature circuit: the same features chosen, the same scores, the same passes
    features = said["features"]
    assert features["names"][0] == features["names"][1]
    diff, size = features["diff"]
    assert size > 1e-4 and diff <= 1e-5 * size
    assert features["exact"][0] == pytest.approx(features["exact"][1], rel=1e-5, abs=1e-6)
    assert features["passes"][0] == pytest.approx(features["passes"][1])
    # ACDC: the ranks add each variant's loss before deciding, so they decide as one process
    model, batches, _ = induction_toy(n=8)
    one = run_method("acdc", Setup(model, batches, "logit-diff"), threshold=0.1)
    assert said["kept"] == one.circuit.tolist()
    torch.testing.assert_close(torch.tensor(said["acdc"]), one.values, rtol=1e-5, atol=1e-6,
                               equal_nan=True)
    # the job's passes are the ranks' together: those of one process
    assert said["passes"]["acdc"] == pytest.approx([one.cost.forward, one.cost.backward])
    setup = Setup(tiny_gpt2(), [make_batch(b=3, vocab=32, seed=0),
                                make_batch(b=4, vocab=32, seed=1)], "logit-diff")
    for method in ("eap", "exact"):
        cost = run_method(method, setup).cost
        assert said["passes"][method] == pytest.approx([cost.forward, cost.backward]), method
    # evaluation: per-prompt values gathered from the ranks, the interval drawn on all of them
    whole = evaluate(one.circuit, Setup(model, batches, "logit-diff", "mean")).as_dict()
    assert said["evaluation"] == pytest.approx(whole, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_discover_under_torchrun_writes_one_set_of_files(job):
    tmp, (_, said) = job["tmp"], job["rest"]
    ig = said[1]
    assert [r["status"] for r in ig] == [0, 0]
    assert ig[0]["stdout"].count("edges kept") == 1 and ig[1]["stdout"] == ""  # rank 0 prints
    assert sorted(p.name for p in (tmp / "two-ig").iterdir()) == sorted(DISCOVER_FILES)
    one, two = (json.loads((tmp / d / "scores.json").read_text()) for d in ("one-ig", "two-ig"))
    assert list(one["scores"]) == list(two["scores"])
    a, b = scores_of(tmp / "one-ig"), scores_of(tmp / "two-ig")
    assert a.abs().max() > 1e-3 and (a - b).abs().max() <= 1e-5 * a.abs().max()
    kept, metrics = [], []
    for d in ("one-ig", "two-ig"):
        circuit = json.loads((tmp / d / "circuit.json").read_text())
        kept.append({e for e, v in circuit["edges"].items() if v["in_circuit"]})
        metrics.append(circuit["metrics"])
    assert kept[0] == kept[1] and kept[0]
    for key in ("faithfulness", "faithfulness_ci_low", "faithfulness_ci_high"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-5, abs=1e-7), key


def test_torchrun_reads_options_only_after_a_double_dash(capsys):
    # torchrun's own parser (what `torchrun` runs first): without `--` it takes --n for one of
    # its options and stops; after `--` every word goes to circuits
    launch = ["--nproc-per-node", "2", "-m", "circuits"]
    with pytest.raises(SystemExit) as stopped:
        torchrun.parse_args([*launch, "discover", "ioi", "--n", "8"])
    assert stopped.value.code == 2 and "ambiguous option: --n" in capsys.readouterr().err
    args = torchrun.parse_args([*launch, "--", "discover", "ioi", "--n", "8"])
    assert args.training_script == "circuits"
    assert args.training_script_args == ["discover", "ioi", "--n", "8"]


def test_ranks_must_be_a_job_size_and_that_of_the_job_torchrun_started(monkeypatch, capsys):
    argv = ["evaluate", "circuit.json"]
    assert cli.main([*argv, "--ranks", "0"]) == 2
    assert capsys.readouterr().err == "circuits: error: --ranks must be at least 1, got 0\n"
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of a job of two
    assert cli.main([*argv, "--ranks", "3"]) == 2
    assert "--ranks 3 differs from the 2 ranks torchrun started" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks in /proc")
@pytest.mark.parametrize("method", ["exact", "acdc"])
def test_ctrl_c_to_one_rank_stops_all_and_resume_finishes(job, method):
    tmp = job["tmp"]
    stopped, said = job[f"{method}-stopped"]
    if method == "exact":  # discover --ranks 2: 130 when every rank ended with 130
        assert stopped.returncode == 130, stopped.stderr[-3000:]
        assert stopped.stderr.count("circuits: interrupted") == 2
    else:  # torchrun's summary: both ranks ended with 130, each saying it was interrupted
        assert stopped.stderr.count("exitcode  : 130") == 2, stopped.stderr[-3000:]
        assert [r["status"] for r in said[-1]] == [130, 130]
        assert all("circuits: interrupted" in r["stderr"] for r in said[-1])
    # the --resume that finished it: the first command of the next job
    resumed = job["acdc-stopped" if method == "exact" else "rest"][1][0]
    assert [r["status"] for r in resumed] == [0, 0], resumed[0]["stderr"][-3000:]
    assert not (tmp / f"two-{method}" / ".progress").exists()
    a, b = scores_of(tmp / f"one-{method}"), scores_of(tmp / f"two-{method}")
    assert a.nan_to_num().abs().max() > 1e-3
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.nan_to_num().abs().max(),
                               equal_nan=True)


@pytest.mark.slow
def test_evaluate_under_torchrun_prints_what_one_process_prints(job):
    said = job["rest"][1][2]
    # faithfulness, its interval (on all 16 prompts) and the curve, printed once
    assert "faithfulness" in job["evaluate"]
    assert [r["stdout"] for r in said] == [job["evaluate"], ""]


@pytest.mark.slow
def test_bench_rows_shared_by_ranks_equal_one_process(job):
    tmp, said = job["tmp"], job["rest"][1][3]
    assert [r["status"] for r in said] == [0, 0]
    # the ranks computed their shares of the three rows; rank 0 alone printed the summary
    assert "3 rows computed, 0 kept" in said[0]["stdout"] and said[1]["stdout"] == ""
    logged = {line.split()[0] for r in said for line in r["stderr"].splitlines()
              if line.startswith("[")}
    assert logged == {"[1/3]", "[2/3]", "[3/3]"}
    assert "[2/3]" in said[1]["stderr"]  # the second row was rank 1's
    one, two = (read_csv(tmp / d / "results.csv") for d in ("one-bench", "two-bench"))
    timing = {"seconds", "peak_memory_mb"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in two] == [
        {k: v for k, v in r.items() if k not in timing} for r in one]
    assert sorted(p.name for p in (tmp / "two-bench").iterdir()) == sorted(
        p.name for p in (tmp / "one-bench").iterdir())


@pytest.mark.slow
def test_an_input_error_is_one_line_and_every_rank_exits_2(job):
    done, said = job["rest"]
    bad = said[4]
    assert [r["status"] for r in bad] == [2, 2]
    assert bad[0]["stderr"].startswith("circuits: error: cannot read task file")
    assert bad[0]["stderr"].count("\n") == 1 and bad[1]["stderr"] == ""
    assert done.stderr.count("exitcode  : 2") == 2, done.stderr[-3000:]  # torchrun's summary


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


@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_ranks_node_circuit_values_make_up_one_process(monkeypatch, ablation):
    # 5 prompts over 2 ranks: rows 0-1 and 2-4, across the batch border
    setup = Setup(tiny_gpt2(), [make_batch(b=3, vocab=32, seed=0),
                                make_batch(b=2, vocab=32, seed=1)], "logit-diff", ablation)
    keep = torch.ones(3, setup.graph.n_sources, dtype=torch.bool)
    keep[1, 1::2] = False  # every other head and MLP ablated
    keep[2, 1:] = False  # only the input kept
    ranks_make_up_one_process(monkeypatch, lambda: metric_of_nodes(setup, keep,
                                                                  per_prompt=True))


def ranks_make_up_one_process(monkeypatch, values) -> None:
    """`values()` ``[3, 5]`` (per variant and prompt) computed by two ranks, each on its own
    prompts (2 and 3), side by side equal one process's; the variants differ."""
    whole = values()
    parts = []
    for r in range(2):
        play_rank(monkeypatch, r, 2)
        parts.append(values())
    assert [p.shape[1] for p in parts] == [2, 3]  # each rank ran its own prompts only
    assert (whole[0] - whole[2]).abs().max() > 1e-3
    torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-6)


def feature_setup(ablation: str = "resample") -> tuple[Setup, FeatureSet]:
    """A tiny Llama with random SAEs at two sites, on 5 prompts in batches of 3 and 2."""
    model = tiny_model("llama", vocab_size=40)
    setup = Setup(model, [make_batch(b=3, p=5, vocab=40, seed=0),
                          make_batch(b=2, p=5, vocab=40, seed=1)], "logit-diff", ablation)
    saes = [SAE.init(32, 96, "relu", site=s, seed=i) for i, s in enumerate(["resid.0",
                                                                           "resid.1"])]
    return setup, FeatureSet.of(model, saes)


@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_ranks_feature_circuit_values_make_up_one_process(monkeypatch, ablation):
    setup, fs = feature_setup(ablation)
    graph = fs.graph([[1, 2], [3]], setup.model)
    feat = with_features(setup, fs, graph)
    some = graph.valid & (torch.arange(graph.valid.shape[1]) % 2 == 0)  # every other receiver
    masks = torch.stack([graph.valid, some, torch.zeros_like(graph.valid)])
    ranks_make_up_one_process(monkeypatch, lambda: metric_of_masks(feat, masks,
                                                                  per_prompt=True))


def test_ranks_feature_scores_add_up_to_one_process(monkeypatch):
    # what score_features adds over the ranks: node effects, edge effects, exact node effects
    setup, fs = feature_setup()
    graph = fs.graph([[1, 2], [3]], setup.model)

    def scores(s: Setup) -> list[torch.Tensor]:
        return [*node_effects(s, fs, "ig", 2), edge_effects(s, fs, graph, "ig", 2).double(),
                exact_node_effects(s, fs, graph).double()]

    whole = scores(setup)
    parts = []
    for r in range(2):
        play_rank(monkeypatch, r, 2)
        parts.append(scores(setup.shard()))
    for w, a, b in zip(whole, *parts, strict=True):
        size = float(w.abs().max())
        assert size > 1e-4
        torch.testing.assert_close(a + b, w, rtol=1e-4, atol=1e-5 * size)
