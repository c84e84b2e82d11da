"""``circuits trace``: causal tracing of a task's prompts (Meng et al., 2022).

The subject of each prompt is noised and each hidden state, MLP output and attention output is
restored in turn (`circuits.reading.tracing.causal_trace`). Prints, per kind, the layer and
token group with the strongest indirect effect, and the total effect; writes trace.png (the
three-panel heatmap) and trace.json, staged inside ``--out`` and moved into place together
(`circuits.outputs.staged`). ``--noise``, ``--samples`` and the whole trace's number of noised
runs are bounded (`circuits.reading.tracing.MAX_NOISE`, `MAX_SAMPLES`, `MAX_RUNS`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..io import dumps, write_atomic
from ..outputs import staged
from ..reading.tracing import MAX_NOISE, MAX_RUNS, MAX_SAMPLES, causal_trace
from ..tables import text_table
from .common import (
    add_device_arguments,
    check_device_and_dtype,
    check_output,
    check_seed_and_n,
    fail,
    load_task_and_model,
    task_name,
)

if TYPE_CHECKING:
    from ..reading.tracing import CausalTrace

HELP_EXAMPLES = """examples:
  circuits trace factual                        # circuits-out/trace-factual/trace.png
  circuits trace factual --n 50 --samples 10 --window 2 -o out/factual-trace
  circuits trace my_facts.jsonl --model ./my-model   # each line's "meta": {"subject": "..."}"""

FILES = ("trace.png", "trace.json")
DEFAULT_N = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The task, model, prompt count, noise, samples, window, seed, output folder, device."""
    parser.add_argument("task", metavar="TASK", help="a built-in task (`circuits tasks`) or a "
                        "JSONL file whose lines name their subject in \"meta\": {\"subject\": ...}")
    parser.add_argument("--model", help="a shipped model (`circuits models`), a local model folder "
                        "or a hub name (default: the task's reference model)")
    parser.add_argument("--n", type=int, default=DEFAULT_N,
                        help="number of prompts, also for a JSONL file (default: %(default)s)")
    parser.add_argument("--noise", type=float, default=3.0, metavar="K",
                        help="noise on the subject's embeddings, in standard deviations of "
                        f"those embeddings, 0 to {MAX_NOISE:g} (default: %(default)s, as ROME)")
    parser.add_argument("--samples", type=int, default=10, metavar="S",
                        help=f"noise draws per prompt, 1 to {MAX_SAMPLES} (default: "
                        f"%(default)s, as ROME); a trace runs at most {MAX_RUNS:,} noised "
                        "prompts (prompts x samples x restorations)")
    parser.add_argument("--window", type=int, metavar="W",
                        help="consecutive layers whose MLP or attention outputs are restored "
                        "together (default: a quarter of the layers, 1 to 10)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seeds the prompts and the noise (default: %(default)s)")
    parser.add_argument("-o", "--out", metavar="DIR", help="output folder for trace.png and "
                        "trace.json (default: circuits-out/trace-TASK)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Check the options, load the task and model, trace, write and print the summary."""
    check_seed_and_n(args.seed, args.n)
    if not 0 <= args.noise <= MAX_NOISE:
        fail(f"--noise must be a number of standard deviations from 0 to {MAX_NOISE:g} (ROME "
             f"uses 3), got {args.noise}")
    if not 1 <= args.samples <= MAX_SAMPLES:
        fail(f"--samples must be from 1 to {MAX_SAMPLES} (ROME uses 10), got {args.samples}")
    if args.window is not None and args.window < 1:
        fail(f"--window must be at least 1 layer, got {args.window}")
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / f"trace-{task_name(args.task)}")
    check_output(out, folder=True, flag="--out")

    task, model = load_task_and_model(args.task, args.model, args.n, args.seed, args)
    trace = causal_trace(model, task, noise=args.noise, samples=args.samples,
                         window=args.window, seed=args.seed)
    write_outputs(trace, out)
    rows = []
    for kind in trace.kinds:
        for single in (False, True) if kind != "hidden" and trace.window > 1 else (False,):
            layer, label, value = trace.strongest(kind, single=single)
            span = ("1 layer" if kind == "hidden" or single or trace.window == 1
                    else f"{trace.window}-layer window")
            rows.append((f"{kind} ({span})", layer, label, f"{value:+.3f}"))
    print(f"causal trace of {task.name} on {model.name}: {trace.n_prompts} prompts x "
          f"{trace.samples} noise samples, noise {trace.noise:g} sd ({trace.noise_std:.3g})")
    print(text_table(rows, header=("restored", "layer", "token", "indirect effect")))
    print(f"total effect {trace.total_effect:+.3f} (p(answer) clean {trace.p_clean:.3f}, subject "
          f"noised {trace.p_corrupt:.3f})")
    print(f"wrote {out / FILES[0]} and {out / FILES[1]}")
    return 0


def write_outputs(trace: CausalTrace, out: Path) -> None:
    """trace.png and trace.json, staged inside `out` and moved into place together."""
    with staged(out) as staging:
        trace.plot(staging / FILES[0])
        write_atomic(staging / FILES[1], (dumps(trace.to_dict(), indent=1) + "\n").encode("utf-8"))
