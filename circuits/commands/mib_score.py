"""``circuits mib-score``: MIB's circuit-track CPR and CMD of saved scores, before submitting.

Reads a discover run's circuit.json or scores.json, or a file in MIB's layout (an
``importances.json``, by ``circuits export --format mib`` or MIB's own code; it names no task or
model, so ``--task`` and ``--model`` are needed, and no weights to check), makes fresh prompts
of the task (by default the discovery's seed + 1, as ``circuits evaluate`` does: MIB too scores
on prompts other than those a method ranked on), and measures the faithfulness at MIB's ten edge
fractions as MIB's evaluation does (`circuits.curves.mib_curves`): the top ``floor(x * n)``
edges pruned, n the edge count of the *ungrouped* graph on grouped-query models, CPR the
trapezoid area under the curve of the edges ranked by signed score, CMD the area under |1 - f|
of the curve ranked by |score|. Prints both curves, CPR and CMD; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api import make_setup
from ..circuit_writers import FORMAT as CIRCUIT_FORMAT
from ..curves import MIB_FRACTIONS, MibCurves, mib_curves
from ..errors import CircuitFileError
from ..files import dumps, write_atomic
from ..graph import Graph
from ..io import load_circuit
from ..metrics import get_metric
from ..mib import check_components, mib_scores
from ..model import Model, check_same_weights, dtype_name, load_model
from ..positions import PositionGraph
from ..report import SCORES_FORMAT
from ..scores import Scores
from ..tables import text_table
from .common import (
    ABLATIONS,
    PROG,
    add_device_arguments,
    check_device_and_dtype,
    check_output,
    check_seed_and_n,
    fail,
    load_task_and_model,
    saved_task,
    stages,
)
from .select import MAX_BYTES, read_scores, scores_from

HELP_EXAMPLES = """examples:
  circuits mib-score circuits-out/ioi/circuit.json
  circuits mib-score circuits-out/ioi/scores.json --n 200 --out ioi-mib.json
  circuits mib-score circuits-out/ioi/scores.json --ablation mean --seed 7
  circuits mib-score ioi_gpt2/importances.json --task ioi --model gpt2"""

MIB_SCORE_FORMAT = "circuits.mib-score"
MIB_SCORE_VERSION = 1
_FORMAT_KEY = re.compile(rb'"format"\s*:\s*"([^"\\]{0,64})"')


@dataclass
class Scored:
    """Scores read from a file, with what the file says about the run that made them."""

    scores: Scores
    task: str
    model: str
    seed: Any
    n: Any
    ablation: Any
    metric: Any
    dtype: Any
    bos: Any
    fingerprint: Any
    mib: Any = None  # the document of a file in MIB's layout: no run, no weights to check


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments: the file, what to evaluate on, the output, device and dtype."""
    p.add_argument("file", metavar="CIRCUIT_OR_SCORES",
                   help="a discover run's circuit.json or scores.json, or a MIB importances.json")
    p.add_argument("--task", help="task name or JSONL file (default: the file's task)")
    p.add_argument("--model", help="model (default: the file's model)")
    p.add_argument("--n", type=int, help="number of prompts (default: as many as the discovery "
                   "used)")
    p.add_argument("--seed", type=int, metavar="S", help="prompt seed (default: the "
                   "discovery's seed + 1, so the prompts are fresh; 1 for a MIB file)")
    p.add_argument("--ablation", choices=ABLATIONS, help="default: the file's (MIB's circuit "
                   "track patches in corrupted activations: resample)")
    p.add_argument("--metric", help="default: the file's")
    p.add_argument("--batch-size", type=int, default=32, metavar="B")
    p.add_argument("--any-model", action="store_true",
                   help="score on a model whose weights differ from those the scores were made "
                   "on (refused by default)")
    p.add_argument("-o", "--out", metavar="FILE.json", help="also write the scores and both "
                   "curves as JSON")
    add_device_arguments(p, dtype=None)


def file_kind(path: Path) -> str:
    """The ``format`` a JSON file declares first (circuit and scores files open with it), or
    ""; a CircuitFileError when the file cannot be read."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as err:
        raise CircuitFileError(f"{path}: cannot read it ({err.strerror or err}); pass a "
                               "discover run's circuit.json or scores.json") from None
    found = _FORMAT_KEY.search(head)
    return found.group(1).decode("utf-8", "replace") if found else ""


def read_scored(path: Path) -> Scored:
    """The scores of a circuit.json or scores.json and its run's settings (one CircuitFileError
    line for anything else)."""
    kind = file_kind(path)
    if kind == SCORES_FORMAT:
        _, doc = read_scores(path)
        run = doc["run"]
        return Scored(scores_from(doc, path), run["task"], run["model"], run["seed"], run["n"],
                      run.get("ablation"), run.get("metric"), run.get("dtype"), run.get("bos"),
                      run.get("model_fingerprint"))
    if kind == CIRCUIT_FORMAT:
        circuit = load_circuit(path)
        scores = circuit.scores
        if scores is None:
            raise CircuitFileError(f"{path}: the circuit holds no scores to rank edges by; pass "
                                   "the scores.json of its discover run")
        o = circuit.options
        return Scored(scores, saved_task(circuit), circuit.model, o.get("seed", 0),
                      o.get("n_prompts"), o.get("ablation"), o.get("metric"), o.get("dtype"),
                      o.get("bos"), o.get("model_fingerprint"))
    if kind:
        raise CircuitFileError(f"{path}: a {kind!r} file, not a circuit or scores file; pass a "
                               "discover run's circuit.json or scores.json")
    doc = read_json(path)
    return Scored(mib_scores(doc, str(path)), "", "", None, None, None, None, None, None, None,
                  mib=doc)


def read_json(path: Path) -> Any:
    """The parsed JSON of a file of MIB's layout, its size bounded (CircuitFileError: one
    line)."""
    with path.open("rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise CircuitFileError(f"{path}: larger than {MAX_BYTES // 2**20} MiB; is it a MIB "
                               "importances.json?")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        what = "not a circuit or scores file (nor JSON in MIB's layout)"
        raise CircuitFileError(f"{path}: {what}; pass a discover run's circuit.json or "
                               "scores.json") from None


def run(args: argparse.Namespace) -> int:
    """Evaluate the file's ranking at MIB's edge fractions; print (and write) CPR and CMD."""
    path = Path(args.file)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_output(out, folder=False, flag="--out")
    scored = read_scored(path)
    if isinstance(scored.scores.graph, PositionGraph):
        fail(f"{path} scores edges at positions, and MIB scores edges between components; "
             "score a discover run made without --positions")
    check_components(scored.scores.graph)  # nor SAE features
    task_name = args.task or scored.task
    model_name = args.model or scored.model
    if not task_name or not model_name:
        fail(f"{path} names no {'task' if not task_name else 'model'}; pass "
             f"{'--task' if not task_name else '--model'}")
    mib = scored.mib is not None
    saved_seed = 0 if mib else scored.seed  # MIB's files record no run: seed 1
    if not isinstance(saved_seed, int) or not (scored.n is None or isinstance(scored.n, int)):
        fail(f"{path}: the run's seed and number of prompts must be integers; pass --seed and "
             "--n")
    seed = args.seed if args.seed is not None else (saved_seed + 1) % 2**32
    n = args.n if args.n is not None else scored.n
    check_seed_and_n(seed, n)
    ablation = args.ablation or scored.ablation or "resample"
    metric = args.metric or scored.metric
    if metric is not None:
        get_metric(metric)
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    args.dtype = args.dtype or (scored.dtype if isinstance(scored.dtype, str) else "float32")
    check_device_and_dtype(args)

    with stages(["loading", "scoring at MIB's fractions"]) as stage:
        stage("loading")
        model = load_model(model_name, args.device, args.dtype)
        check_model(scored, model, path, args.any_model or mib)
        if args.bos is None and isinstance(scored.bos, bool):  # start as the discovery's did
            args.bos = scored.bos
        task, model = load_task_and_model(task_name, model, n, seed, args)
        setup = make_setup(model, task, ablation=ablation, metric=metric,
                           batch_size=args.batch_size)
        scores = same_graph(scored, setup.graph, path, model.name)
        stage("scoring at MIB's fractions")
        result = mib_curves(scores, setup, MIB_FRACTIONS)

    show(result, path, scored, task, model, setup, seed)
    if out is not None:
        doc = document(result, path, scored, task.name, model.name, setup, seed, len(task))
        write_atomic(out, dumps(doc, indent=1).encode("utf-8"))
    return 0


def same_graph(scored: Scored, graph: Graph, path: Path, model: str) -> Scores:
    """The file's scores on the model's graph: refused when the shapes differ; a MIB file whose
    cfg names no key/value heads (MIB's own, written ungrouped) read again with the model's."""
    scores = scored.scores
    if scored.mib is not None and "n_kv_heads" not in scored.mib["cfg"] and (
            graph.n_kv_heads != scores.graph.n_kv_heads):
        scores = mib_scores(scored.mib, str(path), graph.n_kv_heads)
    g = scores.graph
    if g.shape() != graph.shape():
        def shape(x: Graph) -> str:
            kv = f", {x.n_kv_heads} key/value heads" if x.n_kv_heads != x.n_heads else ""
            return f"{x.n_layers} layers, {x.n_heads} heads{kv}"

        fail(f"{path} scores a model of {shape(g)} but {model!r} has {shape(graph)}; pass the "
             "file's model with --model")
    return scores


def check_model(scored: Scored, model: Model, path: Path, any_model: bool) -> None:
    """Refuse a model whose weights differ from those the scores were made on, unless
    --any-model; warn where an older fingerprint cannot tell."""
    note = check_same_weights(
        model, scored.fingerprint, scored.dtype or "float32",
        f"{path} was scored on {scored.model or 'another model'!r}",
        "pass the file's model with --model, or --any-model to score it anyway",
        any_model=any_model)
    if note is not None:
        print(f"{PROG}: warning: {note}", file=sys.stderr)


def show(result: MibCurves, path: Path, scored: Scored, task: Any, model: Model, setup: Any,
         seed: int) -> None:
    """Print the settings, both curves, CPR and CMD."""
    unit = "edges" if scored.scores.level == "edge" else "nodes"
    print(text_table([
        ("scores", f"{path} ({scored.scores.method or 'no method'}, {scored.scores.level} "
                   "level)"),
        ("task", f"{task.name} ({len(task)} prompts, seed {seed})"),
        ("model", f"{model.name} ({dtype_name(model.dtype)}, {model.device})"),
        ("ablation / metric", f"{setup.ablation} / {setup.metric.name}"),
        (f"{unit} (MIB's count)", result.n_total),
    ]))
    s, a = result.signed, result.absolute
    print(f"\nfaithfulness at MIB's fractions of the {unit} (pruned)")
    print(text_table([(f"{x:.1%}", ks, f"{fs:.3f}", ka, f"{fa:.3f}")
                      for x, ks, fs, ka, fa in zip(s.fractions, s.n_edges, s.faithfulness,
                                                   a.n_edges, a.faithfulness, strict=True)],
                     header=("fraction", "edges", "f (signed)", "edges", "f (|score|)")))
    print(f"CPR {result.cpr:.4f} (signed ranking; higher is better)   CMD {result.cmd:.4f} "
          "(|score| ranking; lower is better)")
    if math.isnan(result.cpr) or math.isnan(result.cmd):
        print(f"{PROG}: warning: faithfulness is undefined: the model and the empty circuit "
              "score alike on these prompts; check the task and metric", file=sys.stderr)


def document(result: MibCurves, path: Path, scored: Scored, task: str, model: str, setup: Any,
             seed: int, n: int) -> dict[str, Any]:
    """What ``--out`` writes (a NaN is written as null)."""
    def curve(c: Any) -> dict[str, Any]:
        return {"n_edges": list(c.n_edges), "faithfulness": list(c.faithfulness),
                "metric": list(c.metric)}

    return {
        "format": MIB_SCORE_FORMAT, "version": MIB_SCORE_VERSION, "file": str(path),
        "method": scored.scores.method, "level": scored.scores.level, "task": task,
        "model": model, "n_prompts": n, "seed": seed, "ablation": setup.ablation,
        "metric": setup.metric.name, "n_total": result.n_total, "cpr": result.cpr,
        "cmd": result.cmd, "fractions": list(result.signed.fractions),
        "metric_model": result.signed.metric_model, "metric_empty": result.signed.metric_empty,
        "signed": curve(result.signed), "absolute": curve(result.absolute),
    }
