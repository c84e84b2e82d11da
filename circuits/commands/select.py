"""``circuits select``: a new circuit from a discover run's saved scores, without the method.

scores.json records, besides every score, how the run was made (its ``run`` entry: task, model,
prompts, seed, split, batch size, ablation, metric, level, dtype, the model's fingerprint). From
it the command makes the same prompts and split again, selects with the new rule, evaluates on
both prompt sets, reads the heads and writes the six files `discover` writes, through the same
staging (`circuits.cli.write_discovery`). scores.json itself is written back byte for byte.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..api import discover_from_scores, parse_selection
from ..cost import Cost
from ..errors import CircuitFileError, OptionError
from ..graph import Graph
from ..io import FLOAT32_MAX, _graph
from ..model import check_same_weights
from ..positions import PositionGraph
from ..report import SCORES_FORMAT, SCORES_VERSION, summary_rows
from ..scores import Scores
from ..tables import text_table
from .common import (
    PROG,
    add_device_arguments,
    check_device_and_dtype,
    check_output,
    load_task_and_model,
    name_circuit,
    prompts_digest,
    stages,
    write_discovery,
)

HELP_EXAMPLES = """examples:
  circuits select circuits-out/ioi/scores.json --select topk:40
  circuits select circuits-out/ioi/scores.json --select faithfulness:0.9 --out out/ioi-f90
  circuits select circuits-out/ioi/scores.json --select threshold:0.01 --level node
  circuits select circuits-out/acdc/scores.json --select method   # acdc's own circuit
  circuits select circuits-out/ioi/scores.json --select stable:0.8,topk:40"""

MAX_BYTES = 512 * 2**20  # as for circuit files: far more than any model's scores

# what the command needs from the file's "run" entry, with the test a value must pass
_RUN: dict[str, Any] = {
    "task": lambda v: isinstance(v, str) and v != "",
    "model": lambda v: isinstance(v, str) and v != "",
    "n": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2,
    "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32,
    "heldout": lambda v: isinstance(v, float) and 0 < v < 1,
    "batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "metric": lambda v: v is None or isinstance(v, str),
    "dtype": lambda v: isinstance(v, str),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments: the scores file, the rule, the output folder, device and
    dtype."""
    parser.add_argument("scores", metavar="SCORES.json",
                        help="the scores.json a `circuits discover` run wrote")
    parser.add_argument("--select", required=True, metavar="RULE",
                        help="threshold:X, topk:N, faithfulness:F (the smallest prefix of the "
                        "ranking reaching faithfulness F on the discovery prompts), method "
                        "(the circuit the method decided itself, acdc) or "
                        "stable:S,topk:N[,resamples:R][,seed:K] (the edges in the top N of at "
                        "least a share S of R bootstrap resamples of the discovery prompts; "
                        "runs the method once more, one prompt at a time)")
    parser.add_argument("--level", choices=("edge", "node"),
                        help="select edges, or heads and MLPs (default: the run's level)")
    parser.add_argument("-o", "--out", metavar="DIR", help="output folder; its discover outputs "
                        "are replaced as a set (default: the folder of SCORES.json)")
    # by default the run's dtype (so faithfulness selects the same circuit) and BOS choice
    add_device_arguments(parser, dtype=None)


def read_scores(path: Path) -> tuple[str, dict[str, Any]]:
    """The text of a scores file and its parsed document, checked: a CircuitFileError with one
    line when it is missing, not JSON, not a scores file, or records no run."""
    def fail(what: str) -> Any:
        raise CircuitFileError(f"{path}: {what}")

    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as err:
        fail(f"cannot read it ({err.strerror or err}); pass the scores.json a discover run "
             "wrote")
    if len(data) > MAX_BYTES:
        fail(f"larger than {MAX_BYTES // 2**20} MiB; is it a scores.json?")
    try:
        text = data.decode("utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        fail("not a JSON file; pass the scores.json a discover run wrote")
    if not isinstance(doc, dict) or doc.get("format") != SCORES_FORMAT:
        fail(f"not a scores file (format {SCORES_FORMAT!r}); pass the scores.json a discover "
             "run wrote")
    if doc.get("version") != SCORES_VERSION:
        fail(f"scores version {doc.get('version')!r} is not supported (this package reads "
             f"version {SCORES_VERSION})")
    if doc.get("level") not in ("edge", "node") or not isinstance(doc.get("scores"), dict):
        fail("'level' or 'scores' is missing or malformed; the file is truncated or edited")
    run = doc.get("run")
    if not isinstance(run, dict):
        fail("the file does not record how its run was made (written by an older circuits); "
             "run `circuits discover` again to select from its scores")
    bad = [key for key, ok in _RUN.items() if not ok(run.get(key))]
    if bad:
        fail(f"the run record lacks or has a bad {', '.join(bad)}; run `circuits discover` "
             "again")
    return text, doc


def graph_of(doc: dict[str, Any], where: Path) -> Any:
    """The Graph of a scores document's 'graph' shape, checked (`circuits.io` rules) against
    the number of edge scores it holds."""
    shape = doc.get("graph")
    if doc["level"] == "edge":
        return _graph(shape, len(doc["scores"]), str(where))
    try:  # node scores: any plausible shape; the names are compared afterwards
        n_edges = Graph.edge_count(shape["n_layers"], shape["n_heads"],
                                   shape.get("n_kv_heads", shape["n_heads"]),
                                   shape.get("parallel", False))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        n_edges = -1
    return _graph(shape, n_edges, str(where))


def scores_from(doc: dict[str, Any], where: Path) -> Any:
    """The Scores of a scores document: every name of its graph present with a finite number,
    nothing else."""
    graph = graph_of(doc, where)

    values = doc["scores"]
    edge = doc["level"] == "edge"
    names = [e.name for e in graph.edges()] if edge else list(graph.sources)
    if set(values) != set(names):
        raise CircuitFileError(f"{where}: its {len(values)} {doc['level']} scores do not name "
                               f"the {len(names)} of its graph; the file was edited")
    # null: the method never evaluated that edge (kept as NaN, which ranks last)
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                             and math.isfinite(v) and abs(v) <= FLOAT32_MAX)
               for v in values.values()):
        raise CircuitFileError(f"{where}: a score is not a number within float32's range "
                               "(or null); the file was edited")
    number = [math.nan if values[n] is None else float(values[n]) for n in names]
    circuit = None
    if edge:
        tensor = torch.zeros(graph.n_sources, graph.n_destinations)
        index = torch.tensor([graph.edge_index(n) for n in names]).reshape(-1, 2)
        tensor[index[:, 0], index[:, 1]] = torch.tensor(number)
        circuit = decided_circuit(doc.get("circuit"), graph, where)
    else:
        tensor = torch.tensor(number)
    cost = doc.get("cost") if isinstance(doc.get("cost"), dict) else {}
    figures = {k: float(v) for k, v in cost.items()
               if k in ("forward", "backward", "seconds", "peak_memory_mb")
               and isinstance(v, (int, float)) and not isinstance(v, bool)}
    options = doc.get("options") if isinstance(doc.get("options"), dict) else {}
    return Scores(graph, tensor, doc["level"], str(doc.get("method", "")),
                  str(doc.get("task", "")), str(doc.get("model", "")), dict(options),
                  Cost(**figures), circuit=circuit)


def decided_circuit(names: Any, graph: Any, where: Path) -> Any:
    """The mask of the circuit a scores file says the method decided (its 'circuit' list of
    edge names), or None when it records none."""
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CircuitFileError(f"{where}: 'circuit' must be a list of edge names; the file was "
                               "edited")
    known = set(graph.edge_names())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CircuitFileError(f"{where}: the method's circuit names {unknown[0]!r}, which is not "
                               "an edge of its graph; the file was edited")
    return graph.mask_from_edges(names)


def run(args: argparse.Namespace) -> int:
    """Select, evaluate and write a new circuit from saved scores; print the summary."""
    path = Path(args.scores)
    selection = parse_selection(args.select)
    text, doc = read_scores(path)
    scores = scores_from(doc, path)
    saved = doc["run"]
    if args.level == "edge" and doc["level"] == "node":
        raise OptionError(f"{path} holds node scores; select with --level node")
    args.dtype = args.dtype or saved["dtype"]
    if args.bos is None:  # files from before BOS tokens were recorded had none
        args.bos = saved.get("bos", False)
    check_device_and_dtype(args)
    out = Path(args.out) if args.out else path.parent
    check_output(out, folder=True, flag="--out")

    t0 = time.perf_counter()
    names = ["loading", "measuring the behavior", "selecting", "evaluating", "reading the heads",
             "writing"]
    with stages(names) as stage:
        stage("loading")
        task, model = load_task_and_model(saved["task"], saved["model"], saved["n"],
                                          saved["seed"], args)
        check_weights(saved, model, path)
        check_prompts(saved, task, path, isinstance(scores.graph, PositionGraph))
        found = rediscover(doc, scores, task, model, args, selection, stage)
        stage("writing")
        write_discovery(name_circuit(found, saved["task"]), out,
                        " ".join([PROG, *map(shlex.quote, args.argv)]), text)
    print(text_table(summary_rows(found, f"{out}{os.sep}", time.perf_counter() - t0)))
    return 0


def check_weights(saved: dict[str, Any], model: Any, path: Path) -> None:
    """Refuse a model whose weights differ from those the scores were made on; warn where an
    older fingerprint cannot tell (`circuits.model.check_same_weights`)."""
    note = check_same_weights(model, saved.get("model_fingerprint"), saved["dtype"],
                              f"{path} was scored on {saved['model']!r}",
                              "the model changed since, so run `circuits discover` again")
    if note is not None:
        print(f"{PROG}: warning: {note}", file=sys.stderr)


def check_prompts(saved: dict[str, Any], task: Any, path: Path, spans: bool = False) -> None:
    """Refuse prompts other than those the scores were made on (a task file edited since; its
    spans too, for scores at positions)."""
    recorded = saved.get("prompts")
    if isinstance(recorded, str) and recorded != prompts_digest(task, spans):
        raise OptionError(f"{path} was scored on other prompts than task {saved['task']!r} gives "
                          "now (its file was edited since `circuits discover`); restore the "
                          "task file, or run `circuits discover` again on the new prompts")


def rediscover(doc: dict[str, Any], scores: Any, task: Any, model: Any,
               args: argparse.Namespace, selection: dict[str, float], stage: Any) -> Any:
    """`circuits.api.discover_from_scores` with the run the document records."""
    saved = doc["run"]
    return discover_from_scores(
        scores, task, model, selection=selection,
        level=args.level or saved.get("level") or doc["level"], metric=saved["metric"],
        heldout=saved["heldout"], seed=saved["seed"], batch_size=saved["batch_size"],
        progress=stage)
