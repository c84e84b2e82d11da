"""The command line: every command's help, the listings, discover's six files and summary,
reproducibility, evaluate/render/export, and one clear line with the right exit status on errors.

Most checks call `circuits.cli.main(argv)` in-process (no interpreter start-up); a few run the
installed entry points in a subprocess to check what a user's shell sees.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line, run

from circuits import cli
from circuits.graph import Graph
from circuits.io import load_circuit

PYTHON = sys.executable
SMALL = ["--n", "24", "--method", "eap", "--seed", "3"]  # a few seconds on the IOI model
IOI_LAYERS, IOI_HEADS = 4, 4  # the ioi-gpt2-4l reference model


def ioi_edges() -> int:
    """Edges of a 4-layer, 4-head GPT-2 graph, counted by hand: each layer's 4 heads x (q, k, v)
    and its MLP read from the input and every earlier head and MLP (5 per layer); the MLP
    also from its own layer's 4 heads; logits from all 1 + 4 x 5 sources."""
    per_layer = [12 * (1 + 5 * layer) + (1 + 5 * layer + 4) for layer in range(IOI_LAYERS)]
    return sum(per_layer) + 1 + 5 * IOI_LAYERS


@pytest.fixture(scope="module")
def discovered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One small discovery shared by the tests that read its outputs: (folder, stdout)."""
    out = tmp_path_factory.mktemp("discover") / "ioi"
    buffer = io.StringIO()  # capsys is function-scoped, so capture by hand here
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["discover", "ioi", *SMALL, "--select", "topk:30", "--out", str(out)])
    assert code == 0
    return out, buffer.getvalue()


# -- help and listings ------------------------------------------------------------------------
COMMANDS = ["discover", "evaluate", "render", "export", "tasks", "models", "methods"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    assert f"usage: circuits {command}" in out
    assert f"circuits {command}" in out.split("example", 1)[1]


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in [*COMMANDS, "bench"]:
        assert command in out


def test_listings_print_one_line_per_item(capsys):
    from circuits.methods import available
    from circuits.task import list_tasks
    from circuits.zoo import list_models

    code, out, _ = run(["tasks"], capsys)
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == [n for n, _ in list_tasks()]
    ioi = next(line for line in out.splitlines() if line.startswith("ioi "))
    assert "[ioi-gpt2-4l]" in ioi  # its reference model
    code, out, _ = run(["models"], capsys)
    assert [line.split()[0] for line in out.splitlines()] == [c.name for c in list_models()]
    code, out, _ = run(["methods"], capsys)
    rows = [line.split()[:2] for line in out.splitlines()]
    assert rows == [[s.name, s.level] for s in available().values()]
    assert available()["eap"].passes in out


@pytest.mark.skipif(importlib.util.find_spec("circuits.bench") is None,
                    reason="circuits.bench (the benchmark runner) is not written yet")
def test_bench_help(capsys):
    code, out, _ = run(["bench", "--help"], capsys)
    assert code == 0 and "usage: circuits bench" in out


# -- discover ---------------------------------------------------------------------------------
def test_discover_writes_six_valid_files_and_a_summary(discovered):
    out, stdout = discovered
    assert sorted(p.name for p in out.iterdir()) == sorted(cli.DISCOVER_FILES)
    circuit = load_circuit(out / "circuit.json")
    total = ioi_edges()
    assert Graph(IOI_LAYERS, IOI_HEADS).n_edges == total
    # topk:30 keeps at most 30 edges before pruning
    assert 0 < circuit.n_edges <= 30
    assert (circuit.task, circuit.model, circuit.method) == ("ioi", "ioi-gpt2-4l", "eap")
    assert {"faithfulness", "heldout_faithfulness"} <= set(circuit.metrics)
    assert circuit.options["d_model"] == 128 and circuit.options["seed"] == 3

    scores = json.loads((out / "scores.json").read_text())
    assert scores["format"] == "circuits.scores" and scores["method"] == "eap"
    assert len(scores["scores"]) == total
    assert scores["cost"]["backward"] >= 1  # EAP's forward-backward
    # the circuit file carries the very same scores
    doc = json.loads((out / "circuit.json").read_text())
    assert all(doc["edges"][name]["score"] == pytest.approx(v, rel=1e-6)
               for name, v in scores["scores"].items())

    assert (out / "circuit.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (out / "circuit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "circuit.html").read_text()

    report = (out / "report.md").read_text()
    assert report.startswith("# Circuit: ioi on ioi-gpt2-4l")
    assert f"| edges | {circuit.n_edges} of {total} " in report
    m = circuit.metrics
    held = m["heldout_faithfulness"]
    # 24 prompts leave fewer than 10 held out, which the interval flags
    n_held = circuit.options["n_heldout"]
    assert n_held < 10
    interval = f"95% CI {m['heldout_faithfulness_ci_low']:.3f} to " \
               f"{m['heldout_faithfulness_ci_high']:.3f} over only {n_held} prompts: too few " \
               "to trust"
    assert m["heldout_faithfulness_ci_low"] <= held <= m["heldout_faithfulness_ci_high"]
    assert f"| faithfulness, held-out prompts | {held:.3f} ({interval}) |" in report
    assert f"| behavior: effect / spread over prompts | {m['behavior_effect']:.3f} / " in report
    # the reference model does the task: the one warning is about the few held-out prompts
    assert report.count("Warning") == 1 and "held-out prompts, fewer than 10" in report
    assert "## Top 20 edges" in report and "## Top 20 nodes" in report

    summary = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in stdout.strip().splitlines())
    assert summary["edges kept"].startswith(f"{circuit.n_edges} / {total}")
    assert summary["faithfulness"].startswith(f"{held:.3f} held-out ({interval})")
    assert summary["warning"].startswith("faithfulness rests on ")
    assert summary["nodes"] == str(circuit.n_nodes)
    assert summary["outputs"].rstrip("/") == str(out)


def test_same_seed_same_circuit_other_seed_other_prompts(tmp_path, capsys):
    runs = {}
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        argv = ["discover", "ioi", "--n", "24", "--method", "eap", "--seed", seed,
                "--select", "topk:20", "--out", str(tmp_path / name)]
        assert run(argv, capsys)[0] == 0
        runs[name] = json.loads((tmp_path / name / "scores.json").read_text())["scores"]
    a, b, c = (load_circuit(tmp_path / n / "circuit.json") for n in "abc")
    assert a.edge_names == b.edge_names and a.values.equal(b.values)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]  # another seed draws other prompts, so other scores


def test_method_options_are_checked_and_passed(tmp_path, capsys):
    code, _, err = run(["discover", "ioi", "--method", "eap", "--steps", "3"], capsys)
    assert code == 2
    one_error_line(err, "--steps", "eap")
    argv = ["discover", "ioi", "--n", "12", "--method", "eap-ig", "--steps", "2",
            "--select", "topk:10", "--out", str(tmp_path)]
    assert run(argv, capsys)[0] == 0
    assert json.loads((tmp_path / "scores.json").read_text())["options"]["steps"] == 2


# -- evaluate, render, export -----------------------------------------------------------------
def test_evaluate_prints_faithfulness_and_the_curve(discovered, capsys):
    from circuits.api import make_setup, resolve
    from circuits.evaluate import evaluate, faithfulness_curve

    out, _ = discovered
    code, stdout, _ = run(["evaluate", str(out / "circuit.json"), "--n", "16"], capsys)
    assert code == 0
    circuit = load_circuit(out / "circuit.json")
    assert "seed 4" in stdout  # fresh prompts: the discovery's seed 3, plus one
    assert f"{circuit.n_edges} / {ioi_edges()}" in stdout
    # the numbers printed are the circuit's on those 16 prompts, computed here by hand
    task, model = resolve("ioi", None, n=16, seed=4)
    setup = make_setup(model, task)
    result = evaluate(circuit, setup)
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1)
                for line in stdout.split("faithfulness curve", 1)[0].strip().splitlines())
    low, high = result.faithfulness_ci
    assert rows["faithfulness"] == f"{result.faithfulness:.3f} (95% CI {low:.3f} to {high:.3f})"
    assert rows["metric: circuit"] == f"{result.metric_circuit:.4f}"
    assert rows["metric: empty"] == f"{result.metric_empty:.4f}"
    curve = stdout.split("faithfulness curve", 1)[1].splitlines()
    want = faithfulness_curve(circuit.scores, setup)
    printed = [line.split() for line in curve[3:13]]
    assert [row[0] for row in printed] == ["0.1%", "0.2%", "0.5%", "1.0%", "2.0%", "5.0%",
                                           "10.0%", "20.0%", "50.0%", "100.0%"]
    assert [row[1:] for row in printed] == [[str(k), f"{f:.3f}"] for k, f in
                                            zip(want.n_edges, want.faithfulness, strict=True)]
    assert f"CPR {want.cpr:.3f}" in stdout and f"CMD {want.cmd:.3f}" in stdout


@pytest.mark.parametrize("suffix", ["svg", "png", "pdf", "dot", "html"])
def test_render_every_format(discovered, tmp_path, capsys, suffix):
    out, _ = discovered
    target = tmp_path / f"c.{suffix}"
    code, stdout, _ = run(["render", str(out / "circuit.json"), "-o", str(target)], capsys)
    assert code == 0 and stdout.strip() == str(target)
    data = target.read_bytes()
    starts = {"svg": b"<?xml", "png": b"\x89PNG", "pdf": b"%PDF", "dot": b"digraph",
              "html": b"<!"}
    assert data.lstrip().startswith(starts[suffix])


def test_export_every_format(discovered, tmp_path, capsys):
    import networkx as nx

    out, _ = discovered
    circuit = load_circuit(out / "circuit.json")
    src = str(out / "circuit.json")
    assert run(["export", src, "--format", "graphml", "-o", str(tmp_path / "c.graphml")],
               capsys)[0] == 0
    g = nx.read_graphml(tmp_path / "c.graphml")
    assert g.number_of_edges() == circuit.n_edges
    assert run(["export", src, "-o", str(tmp_path / "c.dot")], capsys)[0] == 0  # from suffix
    assert (tmp_path / "c.dot").read_text().startswith("digraph")
    assert run(["export", src, "--format", "json", "-o", str(tmp_path / "c.json")],
               capsys)[0] == 0
    assert load_circuit(tmp_path / "c.json").edge_names == circuit.edge_names
    assert run(["export", src, "--format", "mib", "-o", str(tmp_path / "mib.json")],
               capsys)[0] == 0
    mib = json.loads((tmp_path / "mib.json").read_text())
    assert mib["cfg"]["d_model"] == 128 and len(mib["edges"]) == ioi_edges()
    assert sum(e["in_graph"] for e in mib["edges"].values()) == circuit.n_edges
    assert run(["export", src, "--format", "mib", "--binary", "-o", str(tmp_path / "bin")],
               capsys)[0] == 0
    assert len(list((tmp_path / "bin").glob("edges_*.json"))) == 10  # MIB's ten budgets


# -- devices and dtypes -----------------------------------------------------------------------
def test_discover_and_evaluate_run_in_bfloat16(tmp_path, capsys):
    out = tmp_path / "bf16"
    half = ["--device", "cpu", "--dtype", "bfloat16"]
    argv = ["discover", "ioi", *SMALL, "--select", "topk:30", *half, "--out", str(out)]
    assert run(argv, capsys)[0] == 0
    circuit = load_circuit(out / "circuit.json")
    assert circuit.options["dtype"] == "bfloat16" and circuit.options["device"] == "cpu"
    assert json.loads((out / "scores.json").read_text())["options"]["dtype"] == "bfloat16"
    assert "| model | ioi-gpt2-4l (bfloat16, cpu) |" in (out / "report.md").read_text()
    code, stdout, _ = run(["evaluate", str(out / "circuit.json"), "--n", "16", *half], capsys)
    assert code == 0 and "ioi-gpt2-4l (bfloat16, cpu)" in stdout and "faithfulness" in stdout


def test_bench_runs_in_bfloat16(tmp_path, capsys):
    argv = ["bench", "--task", "induction", "--method", "random", "--n", "8", "--device", "cpu",
            "--dtype", "bfloat16", "--out", str(tmp_path)]
    code, _, _ = run(argv, capsys)
    assert code == 0
    assert "bfloat16 on cpu" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("command", ["discover", "evaluate", "bench"])
@pytest.mark.parametrize("flag, value, words", [
    ("--dtype", "float64", ["'float64'", "float32, bfloat16 or float16"]),
    ("--device", "gpu0", ["'gpu0'", "cuda:N"]),
    ("--device", "cuda", ["no CUDA GPU", "use cpu"]),
])
def test_bad_device_or_dtype_exits_2_before_loading(command, flag, value, words, discovered,
                                                    tmp_path, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    monkeypatch.setattr("circuits.api.load_model", no_loading)
    monkeypatch.setattr("circuits.bench.load_model", no_loading)
    out = tmp_path / "out"
    argv = {"discover": ["discover", "ioi", "--out", str(out)],
            "evaluate": ["evaluate", str(discovered[0] / "circuit.json")],
            "bench": ["bench", "--task", "induction", "--method", "eap", "--out", str(out)]}
    code, stdout, err = run([*argv[command], flag, value], capsys)
    assert code == 2 and stdout == ""
    one_error_line(err, *words)
    assert not out.exists()


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["discover", "nosuchtask"], ["unknown task", "nosuchtask"]),
    (["discover", "ioi", "--method", "nosuch"], ["unknown method", "nosuch"]),
    (["discover", "ioi", "--model", "./no-such-model-folder"], ["no model folder"]),
    (["discover", "ioi", "--select", "topk:many"], ["bad selection", "topk:many"]),
    (["discover", "ioi", "--select", "biggest:3"], ["bad selection"]),
    (["discover", "ioi", "--select", "faithfulness:1.5"], ["faithfulness"]),
    (["discover", "ioi", "--heldout", "1.5"], ["--heldout"]),
    (["discover", "ioi", "--metric", "accuracy"], ["accuracy"]),
    (["discover", "missing-file.jsonl"], ["missing-file.jsonl"]),
])
def test_bad_inputs_exit_2_with_one_line(argv, words, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    one_error_line(err, *words)


def test_bad_circuit_files_exit_2(tmp_path, capsys):
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"format": "circuits.circuit", "version": 1, "graph": ')
    other = tmp_path / "other.json"
    other.write_text('{"format": "something-else"}')
    for path, words in ((tmp_path / "missing.json", ["cannot read"]),
                        (truncated, ["not valid JSON"]), (other, ["something-else"])):
        for argv in (["evaluate", str(path)], ["render", str(path), "-o", "x.svg"],
                     ["export", str(path), "--format", "dot", "-o", "x.dot"]):
            code, _, err = run(argv, capsys)
            assert code == 2, argv
            one_error_line(err, *words)


def test_bad_output_names_exit_2(discovered, capsys):
    out, _ = discovered
    code, _, err = run(["render", str(out / "circuit.json"), "-o", "diagram.jpeg"], capsys)
    assert code == 2
    one_error_line(err, "diagram.jpeg")
    code, _, err = run(["export", str(out / "circuit.json"), "-o", "x.xlsx"], capsys)
    assert code == 2
    one_error_line(err, "--format")


def test_argparse_usage_errors_exit_2(capsys):
    code, _, err = run(["discover", "ioi", "--ablation", "halfway"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2 and "Traceback" not in err


def test_failure_while_writing_exits_1_and_keeps_the_previous_outputs(tmp_path, capsys,
                                                                     monkeypatch):
    from circuits.circuit import Circuit

    argv = ["discover", "ioi", *SMALL, "--select", "topk:10", "--out", str(tmp_path)]
    assert run(argv, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(self, path, *args, **kwargs):
        raise RuntimeError("the renderer broke")

    monkeypatch.setattr(Circuit, "render", broken)
    code, _, err = run([*argv[:-2], "--select", "topk:5", "--out", str(tmp_path)], capsys)
    assert code == 1
    one_error_line(err, "RuntimeError", "the renderer broke", "--debug")
    # the new circuit.json and scores.json were staged, not moved in: every file is the
    # previous run's, and no staging folder is left behind
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_circuit(tmp_path / "circuit.json").n_edges <= 10


def test_debug_shows_the_traceback_and_ctrl_c_exits_130(monkeypatch, capsys):
    import circuits.commands.methods

    def fail():
        raise RuntimeError("boom")

    monkeypatch.setattr(circuits.commands.methods, "available", fail)
    code, _, err = run(["methods", "--debug"], capsys)
    assert code == 1 and "Traceback" in err and err.strip().endswith("RuntimeError: boom")

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(circuits.commands.methods, "available", interrupt)
    code, _, err = run(["methods"], capsys)
    assert code == 130
    assert err.strip().splitlines() == [err.strip()] and "interrupted" in err


def test_stage_indicator_only_when_enabled(capsys):
    from circuits.outputs import Stages

    quiet = Stages(["scoring", "writing"], enabled=False)
    quiet("scoring")
    quiet.close()
    assert capsys.readouterr().err == ""
    shown = Stages(["scoring", "writing"], enabled=True)
    shown("scoring")
    shown("writing")
    shown.close()
    err = capsys.readouterr().err
    assert "scoring ..." in err and "writing ..." in err


# -- what a shell sees --------------------------------------------------------------------------
def test_entry_points_in_a_subprocess(tmp_path):
    script = Path(PYTHON).parent / "circuits"
    for command in ([str(script), "--help"], [PYTHON, "-m", "circuits", "--help"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.startswith("usage: circuits")
    done = subprocess.run([PYTHON, "-m", "circuits", "tasks"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "ioi" in done.stdout
    # a bad input: one line, status 2, and no progress output when stderr is not a terminal
    done = subprocess.run([PYTHON, "-m", "circuits", "discover", "nosuchtask"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    one_error_line(done.stderr, "unknown task")
    assert list(tmp_path.iterdir()) == []  # nothing written on a bad input


# -- node level and mean ablation ---------------------------------------------------------------
def test_discover_at_node_level_with_mean_ablation(tmp_path, capsys):
    """The README's node-level example: ``--ablation mean`` reaches the method and
    ``--level node`` scores each head and MLP by the sum of its outgoing edge scores, then keeps
    the top components and the edges among them."""
    from circuits.api import make_setup, resolve
    from circuits.methods import run_method

    out = tmp_path / "nodes"
    argv = ["discover", "induction", "--method", "eap", "--ablation", "mean", "--level", "node",
            "--select", "topk:3", "--n", "24", "--seed", "2", "--out", str(out)]
    assert run(argv, capsys)[0] == 0
    doc = json.loads((out / "scores.json").read_text())
    assert doc["level"] == "node" and doc["options"]["ablation"] == "mean"
    # the same scores by hand: the discovery part of the same prompts (70%, split by the seed)
    task, model = resolve("induction", None, n=24, seed=2)
    discovery, _ = task.split(0.7, seed=2)
    sums = {}
    for ablation in ("mean", "resample"):
        edge = run_method("eap", make_setup(model, discovery, ablation=ablation))
        sums[ablation] = dict(zip(edge.graph.sources, edge.values.sum(1).tolist(), strict=True))
    assert doc["scores"] == pytest.approx(sums["mean"], abs=1e-5)
    assert doc["scores"] != pytest.approx(sums["resample"], abs=1e-5)  # the option mattered
    circuit = load_circuit(out / "circuit.json")
    assert circuit.options["level"] == "node"
    heads_and_mlps = sorted(sums["mean"], key=lambda s: -abs(sums["mean"][s]))
    top = [s for s in heads_and_mlps if s != "input"][:3]
    assert set(top) <= set(circuit.nodes)
    kept = set(top) | {"input", "logits"}
    for name in circuit.edge_names:
        source, destination = name.split("->")
        assert source in kept and destination.split("<")[0] in kept, name


def random_ioi_model(folder: Path) -> Path:
    """The IOI reference model's configuration and tokenizer with random weights: a model that
    cannot do the task."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    from circuits.zoo import find

    source = find("ioi-gpt2-4l")
    shutil.copytree(source, folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config.from_pretrained(source)).save_pretrained(folder)
    return folder


def test_a_model_without_the_behavior_gets_a_warning_and_strict_stops(tmp_path, capsys):
    model = str(random_ioi_model(tmp_path / "random"))
    argv = ["discover", "ioi", "--model", model, "--n", "40", "--method", "eap", "--select",
            "topk:10"]
    code, stdout, err = run([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    summary = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in stdout.strip().splitlines())
    assert summary["warning"].startswith("the model barely shows this behavior")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "> **Warning:** the model barely shows this behavior" in report

    code, stdout, err = run([*argv, "--strict", "--out", str(tmp_path / "strict")], capsys)
    assert code == 2 and stdout == ""
    one_error_line(err, "barely shows", "strict")
    assert not (tmp_path / "strict").exists()


def test_evaluate_refuses_other_weights_unless_asked(discovered, capsys):
    from circuits.model import load_model

    out, _ = discovered
    circuit = load_circuit(out / "circuit.json")
    assert circuit.options["model_fingerprint"] == load_model("ioi-gpt2-4l").fingerprint
    other = ["evaluate", str(out / "circuit.json"), "--model", "factual-gpt2-4l", "--n", "8"]
    code, _, err = run(other, capsys)
    assert code == 2
    one_error_line(err, "other weights", "--any-model")
    code, stdout, err = run([*other, "--any-model"], capsys)
    assert code == 0, err
    assert "faithfulness" in stdout


# -- method options from the registry ------------------------------------------------------------
def test_every_method_option_is_declared_and_has_one_flag():
    """Each parameter of a registered method (after the setup) is declared in its registry entry
    with the method's own default, so `discover` and `bench` offer it; ACDC's progress bar is
    the one exception (the command shows it on a terminal). Options that share a flag agree on
    what it takes."""
    import inspect

    from circuits.commands.options import option_flags
    from circuits.methods import available

    for name, spec in available().items():
        declared = {p.name: p for p in spec.params}
        signature = inspect.signature(spec.fn).parameters
        wanted = set(spec.options) - ({"progress"} if name == "acdc" else set())
        assert set(declared) == wanted, name
        for option in declared.values():
            assert option.default == signature[option.name].default, (name, option.name)
    for flag, owners in option_flags().items():
        assert len({(o.kind, o.choices) for _, o in owners}) == 1, flag


def test_discover_help_offers_every_method_option(capsys):
    code, out, _ = run(["discover", "--help"], capsys)
    assert code == 0
    for flag in ("--steps", "--threshold", "--acdc-metric", "--absolute", "--chunk",
                 "--receivers", "--senders", "--positions", "--kind"):
        assert flag in out, flag


@pytest.mark.parametrize("argv, options", [
    (["--method", "path-patching", "--receivers", "a3.h0<q>,logits", "--level", "node"],
     {"receivers": ("a3.h0<q>", "logits")}),
    (["--method", "path-patching", "--senders", "a0.h1, m0"], {"senders": ("a0.h1", "m0")}),
    (["--method", "acdc", "--acdc-metric", "task", "--absolute", "--chunk", "4",
      "--threshold", "0.05"], {"metric": "task", "absolute": True, "chunk": 4, "threshold": 0.05}),
    (["--method", "acdc", "--no-absolute"], {"absolute": False}),
    (["--method", "activation-patching", "--positions", "--chunk", "64"],
     {"positions": True, "chunk": 64}),
    (["--method", "activation", "--kind", "diff"], {"kind": "diff"}),
    (["--method", "eap-ig-stages", "--steps", "3"], {"steps": 3}),
    (["--method", "eap"], {}),
    # discover's own --positions: circuits at positions for the methods that score there
    (["--method", "eap", "--positions"], {"(at positions)": True}),
])
def test_method_flags_reach_the_method_only_when_given(argv, options, monkeypatch, capsys,
                                                     tmp_path):
    import circuits.commands.discover as command
    from circuits.errors import OptionError

    seen = {}

    def stop(task, model, args, selection, given, stage, checkpoint=None, by_position=False):
        seen.update(given)
        if by_position:
            seen["(at positions)"] = True
        raise OptionError("stopped before scoring")

    monkeypatch.setattr(command, "run_discovery", stop)
    code, _, err = run(["discover", "ioi", "--n", "8", *argv, "--out", str(tmp_path)], capsys)
    assert code == 2
    one_error_line(err, "stopped before scoring")
    assert seen == options


def test_path_patching_receivers_from_the_command_line(tmp_path, capsys):
    argv = ["discover", "ioi", "--n", "12", "--method", "path-patching", "--receivers",
            "a3.h0<q>,a3.h0<k>", "--level", "node", "--select", "topk:3", "--out", str(tmp_path)]
    assert run(argv, capsys)[0] == 0
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert doc["options"]["receivers"] == ["a3.h0<q>", "a3.h0<k>"]
    # only sources upstream of layer 3 are senders: the layer-3 heads and MLP score 0
    assert all(doc["scores"][name] == 0 for name in ("a3.h1", "a3.h2", "m3"))


@pytest.mark.parametrize("argv, words", [
    (["--method", "eap", "--receivers", "logits"], ["'eap'", "--receivers", "path-patching"]),
    (["--method", "eap-ig", "--absolute"], ["--absolute", "acdc"]),
    (["--method", "acdc", "--kind", "diff"], ["--kind", "activation"]),
])
def test_an_option_of_another_method_is_one_error_line(argv, words, capsys):
    code, out, err = run(["discover", "ioi", *argv], capsys)
    assert code == 2 and out == ""
    one_error_line(err, *words)
