"""The benchmark runner: table files, resuming, configuration stamps."""

from __future__ import annotations

import argparse
import csv
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from circuits import bench, bench_report
from circuits.circuit import select
from circuits.errors import OptionError
from circuits.evaluate import MIB_FRACTIONS, cpr, evaluate
from circuits.graph import Graph
from circuits.methods import METHODS, get_method, run_method
from circuits.model import load_model


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_stamp_changes_with_what_changes_the_numbers():
    base = bench.BenchConfig(tasks=("ioi",), methods=("eap", "eap-ig"))
    same = bench.BenchConfig(tasks=("ioi", "induction"), methods=("eap-ig",), quick=True)
    assert base.stamp("ioi", "m", "eap-ig") == same.stamp("ioi", "m", "eap-ig")
    fewer_steps = bench.BenchConfig(tasks=("ioi",), methods=("eap-ig",), steps=3)
    assert base.stamp("ioi", "m", "eap-ig") != fewer_steps.stamp("ioi", "m", "eap-ig")
    # EAP has no steps option: its rows survive a change of EAP-IG's steps.
    assert base.stamp("ioi", "m", "eap") == fewer_steps.stamp("ioi", "m", "eap")
    assert base.stamp("ioi", "m", "eap") != bench.BenchConfig(
        tasks=("ioi",), methods=("eap",), seed=1).stamp("ioi", "m", "eap")
    assert base.stamp("ioi", "m", "eap") != base.stamp("ioi", "other", "eap")


def test_rows_round_trip_and_blank_cells(tmp_path: Path):
    path = tmp_path / "results.csv"
    rows = [{"task": "t", "model": "m", "method": "eap", "cpr": "0.5000", "roc_auc": None,
             "config": "abc"}]
    bench_report.write_rows(path, rows)
    back = bench_report.read_rows(path)
    assert list(back[0]) == list(bench_report.COLUMNS)
    assert back[0]["cpr"] == "0.5000" and back[0]["roc_auc"] == "" and back[0]["config"] == "abc"
    assert not list(tmp_path.glob(".results*"))  # no temporary file left behind


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch):
    path = tmp_path / "results.csv"
    path.write_text("old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new table is half written by then
    with pytest.raises(OSError, match="No space"):
        bench_report.write_rows(path, [{"task": "t", "model": "m", "method": "eap",
                                        "config": "abc"}])
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_a_foreign_csv_is_refused(tmp_path: Path):
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(OptionError, match="not a results table"):
        bench_report.read_rows(tmp_path / "results.csv")


def test_markdown_table_rounds_and_leaves_unknowns_blank():
    row = {"task": "ioi", "model": "m", "method": "eap", "cpr": "0.95312", "cmd": "0.0469",
           "f_1%": "0.1", "f_5%": "0.5", "f_10%": "0.9", "edges_f0.8": "35", "roc_auc": "",
           "seconds": "0.1234", "forward": "10.0", "backward": "10", "peak_memory_mb": "5.4"}
    lines = bench_report.markdown_table([row]).splitlines()
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["ioi", "m", "eap", "0.953", "0.047", "0.100", "0.500", "0.900", "35", "",
                     "0.12", "10", "10", "5.4"]


@pytest.mark.parametrize(("mib", "shown"), [("0.0081", "0.008"), ("1234.567", "1234.6"),
                                            ("nan", "nan")])
def test_markdown_table_keeps_small_memory_figures(mib: str, shown: str):
    """A method that adds a few KiB is not rounded to 0; an unmeasured one stays nan."""
    line = bench_report.markdown_table([{"peak_memory_mb": mib}]).splitlines()[2]
    assert line.strip("| ").split(" | ")[-1].strip() == shown


def test_options_defaults_and_errors():
    config, _ = bench.config_from_args(parse(["--task", "ioi", "--method", "eap"]))
    assert config.n == bench.FULL_N and config.steps == bench.FULL_STEPS
    assert config.models == (None,)
    quick, _ = bench.config_from_args(parse(["--quick", "--method", "eap"]))
    assert quick.n == bench.QUICK_N and quick.steps == bench.QUICK_STEPS
    assert set(quick.tasks) <= set(bench.QUICK_TASKS) and "induction" in quick.tasks
    # Node-level methods are left out of the edge table, with a note.
    config, notes = bench.config_from_args(
        parse(["--task", "ioi", "--method", "eap", "activation-patching"]))
    assert config.methods == ("eap",) and any("activation-patching" in n for n in notes)
    with pytest.raises(OptionError, match="unknown method"):
        bench.config_from_args(parse(["--task", "ioi", "--method", "nope"]))
    with pytest.raises(OptionError, match="unknown task"):
        bench.config_from_args(parse(["--task", "nope", "--method", "eap"]))
    with pytest.raises(OptionError, match="--method names nothing"):
        bench.config_from_args(parse(["--task", "ioi", "--method", ","]))


def test_lists_are_comma_or_space_separated_and_out_has_a_short_form():
    space = parse(["--task", "ioi", "induction", "--method", "eap", "acdc", "exact",
                   "--model", "a", "b", "--out", "x"])
    comma = parse(["--task", "ioi,induction", "--method", "eap,acdc", "--method", "exact",
                   "--model", "a,b", "-o", "x"])
    mixed = parse(["--task", "ioi,", "induction", "--method", "eap, acdc", "exact,eap",
                   "--model", "a", "b,a", "-o", "x"])
    configs = [bench.config_from_args(args)[0] for args in (space, comma, mixed)]
    for config in configs:
        assert config.tasks == ("ioi", "induction")
        assert config.methods == ("eap", "acdc", "exact")  # in order, each once
        assert config.models == ("a", "b") and config.out == Path("x")
    assert bench.deprecation_warnings(comma) == []
    # an ensemble lists its parts with commas: a value with a colon is one method
    ensemble = parse(["--task", "ioi", "--method", "eap,acdc", "mean:eap,eap-ig,eap-ig-stages"])
    assert bench.config_from_args(ensemble)[0].methods == (
        "eap", "acdc", "mean:eap,eap-ig,eap-ig-stages")


def test_stamp_holds_the_methods_defaults_and_the_seed_reaches_every_seeded_method():
    """A row is stale when the method's own defaults change (they decide its numbers as much
    as given options), and --seed reaches every method with a seed option."""
    config = bench.BenchConfig(tasks=("ioi",), methods=("ugs", "eap"), seed=7)
    assert config.method_options("ugs")["seed"] == 7
    assert config.method_options("edge-pruning")["seed"] == 7
    assert "seed" not in config.method_options("eap")
    before = config.stamp("ioi", "m", "ugs")
    spec = get_method("ugs")
    steps = next(p for p in spec.params if p.name == "steps")
    changed = replace(spec, params=tuple(replace(p, default=steps.default + 1) if p is steps
                                         else p for p in spec.params))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, "ugs", changed)
        assert config.stamp("ioi", "m", "ugs") != before


def test_plural_flags_still_work_and_warn_once_each(tmp_path: Path, capsys):
    from circuits.cli import main

    old = parse(["--tasks", "ioi", "--methods", "eap,acdc", "--models", "m"])
    new = parse(["--task", "ioi", "--method", "eap,acdc", "--model", "m"])
    assert bench.config_from_args(old) == bench.config_from_args(new)
    assert bench.deprecation_warnings(old) == [
        "--tasks is deprecated; use --task", "--methods is deprecated; use --method",
        "--models is deprecated; use --model"]
    argv = ["bench", "--tasks", "induction", "--methods", "random", "--n", "8", "-o",
            str(tmp_path)]
    assert main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning" in line] == [
        "circuits: warning: --tasks is deprecated; use --task",
        "circuits: warning: --methods is deprecated; use --method"]
    assert [r["method"] for r in read(tmp_path)] == ["random"]
    # a mistake is still one line: the warnings come only once the options are good
    assert main(["bench", "--methods", "nope", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("circuits: error: unknown method 'nope'")


def fake_row(task: str, method: str, seconds: float, cpr: float) -> dict[str, str]:
    """A results row with a straight faithfulness curve rising to `cpr` at 100%."""
    row = {"task": task, "model": "m", "method": method, "seconds": str(seconds),
           "cpr": str(cpr)}
    row.update({c: str(cpr * (i + 1) / len(bench.CURVE_COLUMNS))
                for i, c in enumerate(bench.CURVE_COLUMNS)})
    return row


def test_a_method_has_one_colour_in_every_plot(tmp_path: Path, monkeypatch):
    from matplotlib.colors import to_hex

    figures = {}
    monkeypatch.setattr(bench_report, "_save_png",
                        lambda fig, path: figures.update({path.name: fig}))
    # the tasks cover different methods in different orders, so any colour given by position
    # (in a plot or in the sorted list of all methods) would differ between the plots
    rows = [fake_row("ioi", "acdc", 1.0, 0.9), fake_row("ioi", "eap", 2.0, 0.8),
            fake_row("induction", "random", 3.0, 0.3), fake_row("induction", "eap", 4.0, 0.7),
            fake_row("induction", "my-method", 5.0, 0.5)]
    written = bench_report.plot_results(tmp_path, rows)
    assert sorted(p.name for p in written) == sorted(figures) == [
        "curves_induction__m.png", "curves_ioi__m.png", "time_vs_cpr.png"]
    seen: dict[str, set[str]] = {}
    for name, fig in figures.items():
        ax = fig.axes[0]
        if name.startswith("curves_"):
            for line in ax.get_lines():
                if line.get_label().startswith("_"):
                    continue  # the grey line at faithfulness 1
                method = line.get_label().split(" (CPR")[0]
                seen.setdefault(method, set()).add(to_hex(line.get_color()))
        else:
            by_seconds = {float(r["seconds"]): r["method"] for r in rows}
            points = [c for c in ax.collections if len(c.get_offsets())]
            assert len(points) == len(rows)
            for points_of_row in points:
                method = by_seconds[float(points_of_row.get_offsets()[0][0])]
                seen.setdefault(method, set()).add(to_hex(points_of_row.get_facecolor()[0]))
            legend = ax.get_legend()
            for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
                if text.get_text() in by_seconds.values():
                    seen[text.get_text()].add(to_hex(handle.get_facecolor()[0]))
    assert {m: sorted(c) for m, c in seen.items() if len(c) > 1} == {}  # one colour each
    assert {m: c.pop() for m, c in seen.items()} == {
        m: bench_report.method_colour(m) for m in ("acdc", "eap", "random", "my-method")}
    assert len({bench_report.method_colour(m) for m in bench.CAUSAL_METHODS
                + bench.BASELINE_METHODS}) == len(bench.CAUSAL_METHODS + bench.BASELINE_METHODS)


def test_default_methods_are_registered_edge_methods():
    chosen, notes = bench.default_methods()
    assert chosen[:5] == ["eap", "eap-ig", "eap-ig-stages", "exact", "acdc"]
    named = bench.CAUSAL_METHODS + bench.BASELINE_METHODS
    assert len(chosen) + len(notes) == len(named)


def read(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_ctrl_c_keeps_the_rows_done_and_resume_finishes_the_table(tmp_path: Path, monkeypatch,
                                                                  capsys):
    argv = ["--task", "induction", "--method", "eap", "random", "exact", "--n", "8"]
    plain = tmp_path / "plain"
    assert bench.main([*argv, "--out", str(plain)]) == 0
    out = tmp_path / "stopped"
    real = bench.bench_row

    def ctrl_c_in_the_second_row(config, prep, method, model, progress):
        if method == "random":
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of the row
            time.sleep(5)
        return real(config, prep, method, model, progress)

    monkeypatch.setattr(bench, "bench_row", ctrl_c_in_the_second_row)
    capsys.readouterr()
    assert bench.main([*argv, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    # the finished row's line, then one line about the interruption (no traceback)
    assert len(err) == 2 and err[0].startswith("[1/3] induction")
    assert "interrupted" in err[1] and "--resume" in err[1]
    assert [r["method"] for r in read(out)] == ["eap"]  # the finished row, in a valid table
    assert sorted(p.name for p in out.iterdir()) == ["results.csv"]  # nothing half written
    monkeypatch.setattr(bench, "bench_row", real)

    assert bench.main([*argv, "--out", str(out), "--resume"]) == 0
    assert "2 rows computed, 1 kept" in capsys.readouterr().out
    timing = {"seconds", "peak_memory_mb"}
    resumed, uninterrupted = read(out), read(plain)
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in uninterrupted]
    # without --resume every row is computed again
    assert bench.main([*argv, "--out", str(out)]) == 0
    assert "3 rows computed, 0 kept" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_run_writes_the_table_and_resumes(tmp_path: Path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    rows = read(out)
    config, _ = bench.config_from_args(parse(["--quick"]))
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in config.tasks for m in config.methods}
    for name in ("results.md", "results.csv", "time_vs_cpr.png"):
        assert (out / name).stat().st_size > 0
    for task in config.tasks:
        assert list(out.glob(f"curves_{task}__*.png"))
    for row in rows:
        assert set(bench_report.COLUMNS) <= set(row)
        # CPR is the area under the row's own curve (columns rounded to 4 decimals, so the two
        # trapezoid sums differ by at most 0.5e-4, plus CPR's own rounding)
        curve = [float(row[c]) for c in bench.CURVE_COLUMNS]
        assert float(row["cpr"]) == pytest.approx(cpr(MIB_FRACTIONS, curve), abs=1.1e-4)
        assert int(row["n_discovery"]) + int(row["n_heldout"]) == bench.QUICK_N
        n_layers, n_heads = (2, 4) if row["task"] == "induction" else (None, None)
        if n_layers:
            assert int(row["n_edges"]) == Graph(n_layers, n_heads).n_edges
        assert 0 < int(row["edges_f0.8"]) <= int(row["n_edges"])
        assert float(row["seconds"]) > 0
        if sys.platform.startswith("linux") and row["method"] != "random":
            # random runs no model: its few KiB are below what resident memory resolves
            assert float(row["peak_memory_mb"]) > 0, row["method"]
        has_truth = bench.true_edges(row["task"]) is not None
        assert (row["roc_auc"] != "") == has_truth
    by_key = {(r["task"], r["method"]): r for r in rows}
    # The ablated outputs are kept before any method is timed, so EAP costs its one
    # forward-backward and nothing else, and random scores run no model at all.
    eap = by_key[("induction", "eap")]
    assert (float(eap["forward"]), float(eap["backward"])) == (1.0, 1.0)
    random = by_key[("induction", "random")]
    assert (float(random["forward"]), float(random["backward"])) == (0.0, 0.0)
    # The curve is measured on the held-out prompts: redo one point of it by hand (MIB's CPR
    # curve: the edges ranked by signed score).
    prep = bench.prepare(config, "induction", load_model("induction-gpt2-2l"))
    scores = run_method("eap", prep.found)
    k = int(0.1 * scores.graph.n_edges)
    assert evaluate(select(scores, top_k=k, signed=True), prep.kept).faithfulness == pytest.approx(
        float(eap["f_10%"]), abs=1e-4)
    md = (out / "results.md").read_text()
    assert "| task | model | method | CPR" in md and "time_vs_cpr.png" in md
    before = (out / "results.csv").read_text()

    # A second run with --resume recomputes nothing and leaves the table as it was.
    capsys.readouterr()
    assert bench.main(["--quick", "--out", str(out), "--resume"]) == 0
    assert f"0 rows computed, {len(rows)} kept" in capsys.readouterr().out
    assert (out / "results.csv").read_text() == before

    # Changing EAP-IG's steps recomputes its rows only, and keeps every other row.
    result = bench.run_bench(bench.BenchConfig(
        tasks=("induction",), methods=("eap", "eap-ig"), out=out, n=bench.QUICK_N,
        steps=bench.QUICK_STEPS + 1, quick=True, resume=True))
    assert result.computed == [("induction", "induction-gpt2-2l", "eap-ig")]
    assert result.skipped == [("induction", "induction-gpt2-2l", "eap")]
    assert len(read(out)) == len(rows)


def test_method_options_from_the_registry_reach_only_the_methods_that_take_them():
    methods = ["--task", "ioi", "--method", "eap,acdc,eap-ig"]
    plain, _ = bench.config_from_args(parse(methods))
    given, _ = bench.config_from_args(parse([*methods, "--absolute", "--threshold", "0.5",
                                             "--steps", "2"]))
    assert plain.given == {}
    assert given.given == {"acdc": {"absolute": True, "threshold": 0.5}, "eap-ig": {"steps": 2}}
    assert given.method_options("acdc") == {"metric": "task", "absolute": True,
                                            "threshold": 0.5}
    assert given.method_options("eap-ig") == {"steps": 2} and given.method_options("eap") == {}
    # only the rows whose options changed are recomputed on --resume
    assert given.stamp("ioi", "m", "eap") == plain.stamp("ioi", "m", "eap")
    assert given.stamp("ioi", "m", "acdc") != plain.stamp("ioi", "m", "acdc")
    with pytest.raises(OptionError, match="no method run takes --receivers"):
        bench.config_from_args(parse([*methods, "--receivers", "logits"]))
    with pytest.raises(OptionError, match="steps must be a whole number from 1"):
        bench.config_from_args(parse([*methods, "--steps", "0"]))


def test_a_threshold_given_replaces_acdcs_tau_from_the_effect(monkeypatch):
    class Prep:  # what bench_row reads of a prepared task before scoring
        found = None

        def metric_span(self) -> float:
            return 10.0

    seen = []

    def scored(method, setup, **options):
        seen.append(options)
        raise OptionError("stop")

    monkeypatch.setattr(bench, "run_method", scored)
    for argv in ([], ["--threshold", "0.5"]):
        config, _ = bench.config_from_args(parse(["--task", "ioi", "--method", "acdc", *argv]))
        with pytest.raises(OptionError, match="stop"):
            bench.bench_row(config, Prep(), "acdc", "m", progress=False)
    # τ = ACDC_TAU_FRACTION x the effect's span, unless given
    assert seen[0]["threshold"] == pytest.approx(bench.ACDC_TAU_FRACTION * 10.0)
    assert seen[1]["threshold"] == 0.5
