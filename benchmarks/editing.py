"""ROME and MEMIT on the factual-recall reference model, measured as CounterFact measures them,
before and after, with the time each takes.

ROME writes each of `--rome` counterfactual edits (`circuits.editing.score.factual_edits`) on
the original model, one at a time, at the layer causal tracing picks
(`circuits.editing.layer.choose_layer`); MEMIT writes `--memit` edits at once over
`memit_layers`. Both use their defaults for the shipped models (`options_for`,
`memit_defaults`). The key covariance comes from the task's sentences, cached in a temporary
folder (its time is printed apart).

The measures (`circuits.editing.evaluate`): efficacy (the new target beats the old on the edit
prompt), paraphrase (the same on the relation's other template), neighbourhood (neighbour
prompts, other subjects of the relation, keep their top token; for MEMIT also counted over the
neighbours whose subject no edit touches), CounterFact's neighbourhood score (the neighbour's
own answer still beats the edit's new target), fluency (generation entropy) and the loss on
the task's sentences.

Usage::

    python benchmarks/editing.py                       # 20 ROME edits, 100 MEMIT edits
    python benchmarks/editing.py --rome 5 --memit 20

Timings depend on the machine and on what else runs on it: the script prints the CPU count,
torch's thread count and the load average.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from circuits import load_model
from circuits.editing.edits import applied, target_ids
from circuits.editing.evaluate import Evaluator, Snapshot
from circuits.editing.layer import choose_layer, memit_layers
from circuits.editing.memit import memit
from circuits.editing.rome import rome
from circuits.editing.score import FactEdit, factual_edits
from circuits.editing.stats import key_covariance
from circuits.model import Model
from circuits.tasks.factual import sentences

MEASURES = ("efficacy", "paraphrase", "neighbourhood", "NS", "fluency", "loss")


def main() -> None:
    """Run both methods and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rome", type=int, default=20)
    parser.add_argument("--memit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more than the free cores makes torch far slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()}")
    model = load_model("factual-gpt2-4l")
    cache = tempfile.mkdtemp()
    start = time.perf_counter()
    key_covariance(model, 0, sentences(), cache=cache)
    print(f"key covariance of layer 0: {time.perf_counter() - start:.1f} s")
    print("method  edits  layers  " + "  ".join(f"{m:>22s}" for m in MEASURES) + "  seconds")
    if args.rome:
        _rome(model, cache, args.rome)
    if args.memit:
        _memit(model, cache, args.memit)
    print(f"load {os.getloadavg()}")


def _ns(model: Model, case: FactEdit, kept: list[int]) -> float:
    """CounterFact's neighbourhood score: the share of neighbour prompts whose answer before
    the edit (`kept`) still beats the edit's new target, over the neighbours whose answer is
    not the new target."""
    new = target_ids(model, case.edit)[0]
    pairs = [(p, k) for p, k in zip(case.neighbours, kept, strict=True) if k != new]
    with torch.no_grad():
        wins = [bool(model.hf(model.tokenize([p])).logits[0, -1, [k, new]].argmax() == 0)
                for p, k in pairs]
    return sum(wins) / max(len(wins), 1)


def _figures(snap: Snapshot, ns: float) -> list[float]:
    return [snap.efficacy, snap.paraphrase or 0.0, snap.neighbourhood or 0.0, ns,
            snap.fluency, snap.neutral_loss]


def _rome(model: Model, cache: str, n: int) -> None:
    """Write `n` edits one at a time with ROME, each on the original model; print the figures."""
    cases = factual_edits(model.tokenizer, n)
    layer = choose_layer(model, [c.edit for c in cases])
    before, after, took = [], [], 0.0
    for case in cases:
        meter = Evaluator(model, [case], neutral=sentences(), tokens=8)
        start = time.perf_counter()
        deltas = rome(model, case.edit, layer, sentences(), cache=cache)
        took += time.perf_counter() - start
        before.append(_figures(meter.before, _ns(model, case, meter.neighbours[0])))
        with applied(model, deltas):
            after.append(_figures(meter(), _ns(model, case, meter.neighbours[0])))
    _rows("ROME", n, [layer], before, after, f"{took / n:.2f} per edit")


def _memit(model: Model, cache: str, n: int) -> None:
    """Write `n` edits at once with MEMIT and print the figures."""
    cases = factual_edits(model.tokenizer, n)
    layers = memit_layers(model, [c.edit for c in cases])
    meter = Evaluator(model, cases, neutral=sentences(), tokens=8)
    start = time.perf_counter()
    deltas = memit(model, [c.edit for c in cases], layers, sentences(), cache=cache)
    took = time.perf_counter() - start
    edited = {c.edit.subject for c in cases}
    untouched = [(i, j) for i, c in enumerate(cases) for j, p in enumerate(c.neighbours)
                 if not any(s in p for s in edited)]
    ns_before = sum(_ns(model, c, k) for c, k in zip(cases, meter.neighbours, strict=True)) / n
    with applied(model, deltas):
        snap = meter()
        ns_after = sum(_ns(model, c, k) for c, k in zip(cases, meter.neighbours,
                                                         strict=True)) / n
        now = [meter._top(c.neighbours) for c in cases]
    kept = sum(now[i][j] == meter.neighbours[i][j] for i, j in untouched) / max(len(untouched), 1)
    _rows("MEMIT", n, layers, [_figures(meter.before, ns_before)], [_figures(snap, ns_after)],
          f"{took:.1f} for all")
    print(f"MEMIT: neighbour prompts whose subject no edit touches ({len(untouched)}): "
          f"{kept:.0%} keep their top token")


def _rows(method: str, n: int, layers: list[int], before: list[list[float]],
          after: list[list[float]], seconds: str) -> None:
    """Print the mean figures before -> after."""
    mean_b = [sum(col) / len(col) for col in zip(*before, strict=True)]
    mean_a = [sum(col) / len(col) for col in zip(*after, strict=True)]
    cells = []
    for name, b, a in zip(MEASURES, mean_b, mean_a, strict=True):
        fmt = "{:.1%}" if name not in ("fluency", "loss") else "{:.3f}"
        cells.append(f"{fmt.format(b):>10s} -> {fmt.format(a):<8s}")
    print(f"{method:6s}  {n:5d}  {','.join(map(str, layers)):6s}  " + "  ".join(cells)
          + f"  {seconds}")


if __name__ == "__main__":
    main()
