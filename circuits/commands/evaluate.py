"""``circuits evaluate``: faithfulness, metric values and the faithfulness curve of a saved
circuit on fresh prompts."""

from __future__ import annotations

import argparse
import sys

from ..api import make_setup
from ..circuit import Circuit
from ..evaluate import evaluate, faithfulness_curve
from ..features.discovery import setup_for_graph
from ..features.graph import FeatureGraph
from ..graph import Graph
from ..io import load_circuit
from ..metrics import get_metric
from ..model import Model, check_same_weights, dtype_name, load_model
from ..report import interval
from ..tables import text_table
from .common import (
    ABLATIONS,
    PROG,
    add_device_arguments,
    check_device_and_dtype,
    check_seed_and_n,
    fail,
    load_task_and_model,
    saved_task,
    stages,
)

HELP_EXAMPLES = """examples:
  circuits evaluate circuits-out/ioi/circuit.json
  circuits evaluate circuits-out/ioi/circuit.json --n 300 --seed 7 --ablation mean"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments: the circuit file, what to evaluate it on, device and dtype."""
    p.add_argument("circuit", metavar="CIRCUIT.json")
    p.add_argument("--task", help="task name or JSONL file (default: the circuit's task)")
    p.add_argument("--model", help="model (default: the circuit's model)")
    p.add_argument("--n", type=int, help="number of prompts (default: as many as the "
                   "discovery used)")
    p.add_argument("--seed", type=int, metavar="S", help="prompt seed (default: the "
                   "discovery's seed + 1, so the prompts are fresh)")
    p.add_argument("--ablation", choices=ABLATIONS, help="default: the circuit's")
    p.add_argument("--metric", help="default: the circuit's")
    p.add_argument("--batch-size", type=int, default=32, metavar="B")
    p.add_argument("--any-model", action="store_true",
                   help="evaluate even on a model whose weights differ from those the circuit "
                   "was discovered on (refused by default)")
    p.add_argument("--features", metavar="SAE_FOLDER", help="a feature circuit's SAEs "
                   "(default: the folder the circuit was discovered with)")
    add_device_arguments(p, placement=True)


def run(args: argparse.Namespace) -> int:
    """Faithfulness, metric values and the faithfulness curve of a saved circuit on fresh
    prompts."""
    circuit = load_circuit(args.circuit)
    task_name = args.task or saved_task(circuit)
    model_name = args.model or circuit.model
    if not task_name:
        fail(f"{args.circuit} names no task; pass --task (a built-in task or a JSONL file)")
    if not model_name:
        fail(f"{args.circuit} names no model; pass --model")
    # fresh prompts: a generator seed other than the one the circuit was discovered with
    saved_seed, saved_n = circuit.options.get("seed", 0), circuit.options.get("n_prompts")
    if not isinstance(saved_seed, int) or not (saved_n is None or isinstance(saved_n, int)):
        fail(f"{args.circuit}: options 'seed' and 'n_prompts' must be integers; fix the file "
             "or pass --seed and --n")
    seed = args.seed if args.seed is not None else (saved_seed + 1) % 2**32
    n = args.n if args.n is not None else saved_n
    check_seed_and_n(seed, n)
    ablation = args.ablation or circuit.options.get("ablation", "resample")
    metric = args.metric or circuit.options.get("metric")
    if metric is not None:
        get_metric(metric)
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    check_device_and_dtype(args)

    with stages(["loading", "evaluating", "curve"]) as stage:
        stage("loading")
        model = load_model(model_name, args.device, args.dtype)
        check_model(circuit, model, args)
        saved_bos = circuit.options.get("bos")
        if args.bos is None and isinstance(saved_bos, bool):  # start as the discovery's did
            args.bos = saved_bos
        task, model = load_task_and_model(task_name, model, n, seed, args)
        # a circuit at positions is evaluated at its own positions (the prompts must fit them)
        positions = getattr(circuit.graph, "positions", None)
        setup = make_setup(model, task, ablation=ablation, metric=metric,
                           batch_size=args.batch_size, positions=positions)
        if isinstance(circuit.graph, FeatureGraph):
            setup = setup_for_graph(setup, circuit.graph,
                                    args.features or circuit.options.get("features"))
        check_shape(circuit, model, setup.graph)
        g = circuit.graph
        stage("evaluating")
        result = evaluate(circuit, setup)
        curve = None
        if circuit.scores is not None:
            stage("curve")
            curve = faithfulness_curve(circuit.scores, setup)

    print(text_table([
        ("circuit", f"{args.circuit} ({circuit.method or 'no method'}, {circuit.level} level)"),
        ("task", f"{task.name} ({len(task)} prompts, seed {seed})"),
        ("model", f"{model.name} ({dtype_name(model.dtype)}, {model.device})"),
        ("ablation / metric", f"{setup.ablation} / {setup.metric.name}"),
        ("edges", f"{result.n_edges} / {g.n_edges} ({result.n_edges / g.n_edges:.1%})"),
        ("nodes", result.n_nodes),
        ("faithfulness", f"{result.faithfulness:.3f} ({interval(result.as_dict())})"),
        ("metric: circuit", f"{result.metric_circuit:.4f}"),
        ("metric: model", f"{result.metric_model:.4f}"),
        ("metric: empty", f"{result.metric_empty:.4f}"),
    ]))
    if curve is None:
        print("\nno faithfulness curve: the circuit file holds no scores to rank edges by")
        return 0
    unit = "edges" if circuit.level == "edge" else "nodes"
    print(f"\nfaithfulness curve (top fraction of {unit} by |score|, pruned)")
    print(text_table([(f"{x:.1%}", k, f"{f:.3f}")
                      for x, k, f in zip(curve.fractions, curve.n_edges, curve.faithfulness,
                                         strict=True)],
                     header=("fraction", "edges", "faithfulness")))
    print(f"CPR {curve.cpr:.3f} (higher is better)   CMD {curve.cmd:.3f} (lower is better)")
    return 0


def check_shape(circuit: Circuit, model: Model, graph: Graph) -> None:
    """Refuse a model whose graph has another shape than the circuit's."""
    g = circuit.graph
    if g.shape() != graph.shape():
        fail(f"the circuit is for a {g.n_layers}-layer, {g.n_heads}-head model but "
             f"{model.name!r} has {graph.n_layers} layers and {graph.n_heads} heads; pass the "
             "circuit's model with --model")


def check_model(circuit: Circuit, model: Model, args: argparse.Namespace) -> None:
    """Refuse a model whose weights differ from those the circuit was discovered on (its
    fingerprint, recorded in the circuit file) unless --any-model; warn where an older
    fingerprint cannot tell (`circuits.model.check_same_weights`)."""
    note = check_same_weights(
        model, circuit.options.get("model_fingerprint"), circuit.options.get("dtype", "float32"),
        f"{args.circuit} was discovered on {circuit.model or 'another model'!r}",
        "pass the circuit's model with --model, or --any-model to evaluate it anyway",
        any_model=args.any_model)
    if note is not None:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
