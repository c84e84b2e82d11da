"""What a discovery reports is what it did: a method's own circuit, edges it never evaluated, the
smallest faithful prefix, node-level sizes, too few prompts, and the command line around them.

ACDC runs on the planted-MLP model (75 edges) and the induction model, so each run takes seconds.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from cli_helpers import run, summary

from circuits import cli
from circuits.api import discover
from circuits.circuit import select
from circuits.errors import OptionError
from circuits.graph import Graph
from circuits.io import load_circuit
from circuits.scores import Scores

# the module (`circuits.evaluate` is also the function the package exports)
evaluation = importlib.import_module("circuits.evaluate")

ACDC = ["--method", "acdc", "--threshold", "0.05", "--n", "20"]


@pytest.fixture(scope="module")
def acdc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`circuits discover induction --method acdc` with no --select: its output folder."""
    out = tmp_path_factory.mktemp("acdc") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["discover", "induction", *ACDC, "--out", str(out)]) == 0
    return out


# -- a method's own circuit -------------------------------------------------------------------
def test_acdc_discovery_returns_acdcs_own_circuit(acdc_run):
    scores = json.loads((acdc_run / "scores.json").read_text())
    circuit = load_circuit(acdc_run / "circuit.json")
    # the circuit is the kept set ACDC decided, saved next to its scores
    assert sorted(circuit.edge_names) == sorted(scores["circuit"]) != []
    assert circuit.options["selection"] == {"decided": True}
    assert scores["run"]["selection"] == {"decided": True}


def test_edges_acdc_never_evaluated_are_null_not_zero(acdc_run):
    scores = json.loads((acdc_run / "scores.json").read_text())
    nulls = [name for name, v in scores["scores"].items() if v is None]
    # the induction model's ACDC run cuts destinations off the logits and skips their edges
    assert nulls, "expected ACDC to skip some destinations on this model"
    circuit = json.loads((acdc_run / "circuit.json").read_text())
    for name in nulls:
        assert circuit["edges"][name] == {"in_circuit": False, "score": None,
                                          "evaluated": False}
    loaded = load_circuit(acdc_run / "circuit.json")
    g = loaded.graph
    assert all(math.isnan(float(loaded.values[g.edge_index(n)])) for n in nulls)
    report = (acdc_run / "report.md").read_text()
    assert f"never evaluated {len(nulls)} of the {g.n_edges} edges" in report


def test_select_method_gives_the_same_circuit_from_saved_scores(acdc_run, tmp_path, capsys):
    code, out, err = run(["select", str(acdc_run / "scores.json"), "--select", "method",
                          "-o", str(tmp_path / "again")], capsys)
    assert code == 0, err
    again = load_circuit(tmp_path / "again" / "circuit.json")
    assert again.edge_names == load_circuit(acdc_run / "circuit.json").edge_names
    assert summary(out)["selection"] == "acdc's own circuit (--select method)"


def test_the_method_rule_needs_a_method_that_decides_its_circuit(capsys, tmp_path):
    code, _, err = run(["discover", "induction", "--method", "eap", "--select", "method",
                        "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "decides no circuit of its own" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run(["discover", "induction", *ACDC, "--level", "node", "--select", "method",
                        "--out", str(tmp_path / "y")], capsys)
    assert code == 2 and "node level" in err


def test_acdc_own_circuit_through_the_api_and_its_kept_mask():
    found = discover("planted-mlp", method="acdc", n=16, threshold=0.05, annotate=False)
    assert torch.equal(found.circuit.mask, found.scores.circuit)
    assert torch.equal(found.scores.circuit, found.scores.extra["kept"])
    # an explicit rule still selects from the scores
    top = discover("planted-mlp", method="acdc", n=16, threshold=0.05, annotate=False,
                   selection="topk:3")
    assert top.circuit.options["top_k"] == 3


# -- scores files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eap_on_a_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A discover run on a JSONL task: (the task file, the output folder)."""
    root = tmp_path_factory.mktemp("edited")
    task = root / "task.jsonl"
    lines = []
    for a, b, c in [("Mary", "John", "Tom"), ("Anna", "Paul", "Ruth"), ("Kate", "Sam", "Fred"),
                    ("Lucy", "Tom", "Emma"), ("Mary", "Paul", "Fred"), ("Anna", "John", "Tom")]:
        lines.append(json.dumps({
            "clean": f"When {a} and {b} went to the store, {b} gave a drink to",
            "corrupt": f"When {a} and {b} went to the store, {c} gave a drink to",
            "answer": f" {a}", "wrong": f" {b}"}))
    task.write_text("\n".join(lines) + "\n")
    out = root / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["discover", str(task), "--model", "ioi-gpt2-4l", "--method", "eap",
                         "--select", "topk:10", "--out", str(out)]) == 0
    return task, out


def test_select_refuses_a_task_file_edited_after_discover(eap_on_a_file, tmp_path, capsys):
    task, out = eap_on_a_file
    code, _, err = run(["select", str(out / "scores.json"), "--select", "topk:5", "--out",
                        str(tmp_path / "same")], capsys)
    assert code == 0, err  # unedited: fine
    original = task.read_text()
    try:
        task.write_text(original.replace("went to the store", "went to the park"))
        code, _, err = run(["select", str(out / "scores.json"), "--select", "topk:5", "--out",
                            str(tmp_path / "edited")], capsys)
    finally:
        task.write_text(original)
    assert code == 2 and "other prompts" in err and "edited" in err, err
    assert not (tmp_path / "edited" / "circuit.json").exists()


# -- the smallest faithful prefix -------------------------------------------------------------
def test_faithfulness_selection_finds_the_smallest_prefix_when_f_is_not_monotone(monkeypatch):
    """f(k) of the k best edges: 0.81 from 10 to 14 edges, 0.72 from 15 to 42, 0.9 from 43 on,
    as seen on a trained NeoX model. The target 0.8 is first reached at 10; a bisection lands
    on the boundary at 43."""
    g = Graph(4, 4)
    values = torch.zeros(g.n_sources, g.n_destinations)
    order = g.valid.nonzero()
    for rank, (i, j) in enumerate(order.tolist()):
        values[i, j] = 1000.0 - rank  # edges ranked in graph order
    scores = Scores(g, values)

    def f_of(mask: torch.Tensor) -> float:
        k = int(mask.sum())  # unpruned here: see the patched prune below
        return 0.0 if k < 10 else 0.81 if k < 15 else 0.72 if k < 43 else 0.9

    def fake(setup, masks, chunk, base):
        f = torch.tensor([f_of(m) for m in masks], dtype=torch.float64)
        return f, f, evaluation.Baseline(1.0, 0.0)

    search = importlib.import_module("circuits.smallest")  # the search on masks
    monkeypatch.setattr(search, "_faithfulness", fake)
    monkeypatch.setattr(search, "prune", lambda graph, mask: mask)
    for chunk in (1, 4, 32):
        found = evaluation.smallest_faithful(scores, None, 0.8, chunk=chunk)
        assert found.options["k"] == 10 and found.options["smallest"], chunk
        assert found.options["k_bisection"] >= 43
        assert found.metrics["faithfulness"] == pytest.approx(0.81)
    capped = evaluation.smallest_faithful(scores, None, 0.8, chunk=4, max_scan=3)
    assert capped.options["smallest"] is False
    assert capped.options["k"] == capped.options["k_bisection"]


# -- sizes and labels -------------------------------------------------------------------------
def test_node_level_runs_are_labelled_and_counted_as_nodes(tmp_path, capsys):
    out = tmp_path / "nodes"
    code, stdout, err = run(["discover", "induction", "--method", "eap", "--level", "node",
                             "--select", "topk:3", "--n", "16", "--out", str(out)], capsys)
    assert code == 0, err
    rows = summary(stdout)
    assert rows["nodes kept"].startswith("3 / ")
    assert "edges kept" not in rows and "edges among them" in rows
    assert "| level | node |" in (out / "report.md").read_text()
    # a node-level method is labelled node level whatever --level says
    out = tmp_path / "patching"
    code, stdout, err = run(["discover", "induction", "--method", "activation-patching",
                             "--select", "topk:2", "--n", "16", "--out", str(out)], capsys)
    assert code == 0, err
    assert "| level | node |" in (out / "report.md").read_text()
    assert json.loads((out / "circuit.json").read_text())["level"] == "node"
    assert summary(stdout)["nodes kept"].startswith("2 / ")


def test_too_few_prompts_are_called_out(tmp_path, capsys):
    code, stdout, err = run(["discover", "ioi", "--n", "2", "--method", "eap", "--select",
                             "topk:10", "--out", str(tmp_path / "two")], capsys)
    assert code == 0, err
    warnings = [v for k, v in (line.split(None, 1) for line in stdout.strip().splitlines())
                if k == "warning"]
    assert any("1 discovery and 1 held-out prompt" in w for w in warnings), stdout
    assert any("cannot be measured on 1 discovery prompt" in w for w in warnings), stdout
    assert "too few to trust" in summary(stdout)["faithfulness"]
    report = (tmp_path / "two" / "report.md").read_text()
    assert "too few to trust" in report


def test_enough_prompts_carry_no_caution():
    found = discover("induction", method="eap", n=40, selection="topk:10", annotate=False)
    assert not any("rests on" in w for w in found.warnings)
    assert found.circuit.metrics["heldout_n_prompts"] == found.circuit.options["n_heldout"]


# -- the command line -------------------------------------------------------------------------
def test_an_unknown_argument_gets_the_commands_usage_and_a_hint(capsys):
    with pytest.raises(SystemExit) as done:
        cli.parse(["discover", "ioi", "--thresold", "0.1"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: circuits discover")
    assert "did you mean --threshold?" in err and "circuits discover --help" in err


def test_discover_takes_o_for_its_output_folder():
    args = cli.parse(["discover", "ioi", "-o", "somewhere"])
    assert args.out == "somewhere"


@pytest.mark.parametrize("command, resumable", [("discover", True), ("select", False)])
def test_the_ctrl_c_line_offers_resume_only_where_it_exists(command, resumable, monkeypatch,
                                                           capsys):
    import circuits.commands.select

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("circuits.commands.discover.load_task_and_model", interrupt)
    argv = {"discover": ["discover", "ioi", "--method", "eap", "--out", "/tmp/never"],
            "select": ["select", "none.json", "--select", "topk:2"]}[command]
    if command == "select":
        monkeypatch.setattr(circuits.commands.select, "read_scores", interrupt)
    code, _, err = run(argv, capsys)
    assert code == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuits: interrupted")
    assert ("--resume" in lines[0]) == resumable, lines[0]


def test_a_progress_description_of_another_kind_is_refused_on_resume(tmp_path):
    from circuits.progress import Checkpoint

    (tmp_path / "run.json").write_text(json.dumps({"format": "other.tool", "run": {}}))
    with pytest.raises(OptionError, match="not a description of circuits' progress"):
        Checkpoint(tmp_path, {"method": "acdc"}, resume=True)
    (tmp_path / "run.json").write_text(json.dumps(
        {"format": "circuits.progress", "version": 99, "run": {"method": "acdc"}}))
    with pytest.raises(OptionError, match="version 99"):
        Checkpoint(tmp_path, {"method": "acdc"}, resume=True)


def test_a_file_where_the_progress_folder_goes_is_refused(tmp_path, capsys):
    from circuits.progress import Checkpoint

    (tmp_path / ".progress").write_text("mine")
    with pytest.raises(OptionError, match="is a file"):
        Checkpoint(tmp_path / ".progress", {"method": "acdc"}, resume=True)
    code, _, err = run(["discover", "induction", "--method", "eap", "--n", "8", "--resume",
                        "--out", str(tmp_path)], capsys)
    assert code == 2 and "is a file" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / ".progress").read_text() == "mine"


def test_select_accepts_the_decided_rule_only_with_a_circuit():
    g = Graph(1, 1)
    values = torch.ones(g.n_sources, g.n_destinations) * g.valid
    with pytest.raises(OptionError, match="decides no circuit"):
        select(Scores(g, values), decided=True)
    scores = Scores(g, values, circuit=g.mask_from_edges(["a0.h0->logits"]))
    # taken as decided: not pruned, although a0.h0 reads nothing here
    assert select(scores, decided=True).edge_names == ["a0.h0->logits"]


def test_the_page_carries_never_evaluated_scores_as_null(acdc_run):
    from circuits.html import page_data
    from circuits.io import dumps

    circuit = load_circuit(acdc_run / "circuit.json")
    data = json.loads(dumps(page_data(circuit)))  # strict JSON, as the page embeds it
    scores = [edge[3] for edge in data["edges"]]
    assert None in scores and all(s is None or math.isfinite(s) for s in scores)
    # the page's number format names them instead of failing on null
    template = (Path(cli.__file__).parent / "html_template.html").read_text()
    assert 'if (x === null) return "not evaluated";' in template


@pytest.mark.parametrize("argv, dest", [
    (["discover", "ioi"], "out"), (["select", "s.json", "--select", "topk:3"], "out"),
    (["render", "c.json"], "output"), (["export", "c.json"], "output"),
    (["heads", "--model", "ioi-gpt2-4l"], "out"), (["lens", "ioi"], "out"),
    (["dla", "ioi"], "out"), (["trace", "factual"], "out"), (["attribute", "ioi"], "out"),
    (["attention", "--model", "m", "--heads", "a0.h0", "--task", "ioi"], "output"),
    (["bench"], "out")])
def test_every_command_takes_o_and_out_for_where_it_writes(argv, dest):
    for flag in ("-o", "--out"):
        assert getattr(cli.parse([*argv, flag, "there"]), dest) == "there", (argv, flag)
