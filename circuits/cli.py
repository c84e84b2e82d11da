"""The ``circuits`` command line: discover, evaluate, render and export circuits; list what exists.

Every command is a thin layer over the Python API (`circuits.api.discover`, `circuits.evaluate`,
`Circuit.render`, `circuits.io.export`); each imports what it needs inside the command function.
The program's entry point is `circuits_entry`, which runs before the package is imported.

Exit status: 0 on success; 2 when an input is wrong (unknown task, method or model, a bad option
value, an unreadable or malformed file: any `CircuitsError`), with one line ``circuits: error:
...`` on stderr, before any work and before anything is written (the output path is checked
first); 1 when something unexpected fails once the work has started (the previous outputs stay
as they were: `discover` stages its files and moves them into place together); 130 on Ctrl-C,
at any moment, with one line. ``--debug`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

PROG = "circuits"
ABLATIONS = ("resample", "mean", "zero")
RENDER_SUFFIXES = ("svg", "png", "pdf", "dot", "gv", "html")
EXPORT_FORMATS = ("graphml", "dot", "json", "mib")
DISCOVER_FILES = ("circuit.json", "scores.json", "circuit.svg", "circuit.png", "circuit.html",
                  "report.md")

# Flags that become method options only when given, so each method keeps its own defaults.
METHOD_FLAGS = {"steps": "steps", "threshold": "threshold"}


@contextlib.contextmanager
def stages(names: Sequence[str]) -> Iterator[Any]:
    """A command's step indicator (`circuits.outputs.Stages`), erased also when it fails."""
    from .outputs import Stages

    shown = Stages(names)
    try:
        yield shown
    finally:
        shown.close()


def _fail(message: str) -> Any:
    """Raise an OptionError (imported lazily to keep this module light)."""
    from .errors import OptionError

    raise OptionError(message)


# -- inputs ---------------------------------------------------------------------------------------
def _is_task_file(text: str) -> bool:
    return text.endswith(".jsonl") or os.path.isfile(text)


def check_output(path: Path, folder: bool, flag: str) -> None:
    """Fail before any work when `path` cannot be written: an existing file where a folder is
    wanted (or the reverse), a path under a file, or a place that refuses new files (read-only,
    no permission, /proc). Nothing is created: the test file goes into the deepest existing
    folder and is removed at once."""
    import tempfile

    if folder and path.exists() and not path.is_dir():
        _fail(f"{flag} {path} is an existing file, not a folder; pass a new or existing folder")
    if not folder and path.is_dir():
        _fail(f"{flag} {path} is a folder; pass a file name")
    place = path if folder else path.parent
    place = place.absolute()
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        _fail(f"cannot write {path}: {place} is a file, not a folder; pick another {flag}")
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as err:
        _fail(f"cannot write into {place} ({err.strerror or err}); pick another {flag} "
              "in a folder you can write to")


def check_seed_and_n(seed: int, n: int | None) -> None:
    """Fail on a --seed or --n out of range before any work."""
    from .task import MAX_PROMPTS

    if not 0 <= seed < 2**32:
        _fail(f"--seed must be between 0 and 2**32 - 1, got {seed}")
    if n is not None and not 1 <= n <= MAX_PROMPTS:
        _fail(f"--n must be between 1 and {MAX_PROMPTS}, got {n}; more prompts rarely "
              "change a circuit, and the prompts alone would fill the memory")


def check_device_and_dtype(args: argparse.Namespace) -> None:
    """Fail on an unknown or unavailable --device or an unknown --dtype before any work."""
    from .model import resolve_device, resolve_dtype

    resolve_device(args.device)
    resolve_dtype(args.dtype)


def load_task_and_model(task: str, model: Any, n: int | None, seed: int,
                        args: argparse.Namespace) -> tuple[Any, Any]:
    """The Task (built-in name or JSONL file) and the Model (name, folder, hub name or None for
    the task's reference model) loaded on ``--device`` in ``--dtype``; ``--bos``/``--no-bos``
    set the task's `bos` (checked against the tokenizer here, before any work)."""
    from dataclasses import replace

    from .api import resolve
    from .task import Task, get_task, prefix_ids

    if _is_task_file(task):
        given = Task.from_jsonl(task)
    else:
        get_task(task, n=1)  # an unknown name fails here, before a model is loaded
        given = task
    found, loaded = resolve(given, model, n=n, seed=seed, device=args.device, dtype=args.dtype)
    if getattr(args, "bos", None) is not None:
        found = replace(found, bos=args.bos)
        prefix_ids(loaded.tokenizer, found.bos)  # --bos with a tokenizer that has no BOS
    return found, loaded


def method_options(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The method options given on the command line, checked against the method's signature."""
    from .methods import get_method

    spec = get_method(method)
    accepted = inspect.signature(spec.fn).parameters
    options = {}
    for flag, name in METHOD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if name not in accepted:
            _fail(f"method {method!r} has no --{flag} option; drop it or pick a method that "
                  "takes it (see `circuits methods`)")
        options[name] = value
    return options


def d_model_of(name: str) -> int | None:
    """Width of a shipped or local model, read from its config.json without loading it."""
    import json

    from . import zoo

    folder = zoo.find(name) or (Path(name) if name and Path(name).is_dir() else None)
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text("utf-8"))
    width = config.get("n_embd", config.get("hidden_size"))
    return width if isinstance(width, int) else None


# -- commands -----------------------------------------------------------------------------------
def cmd_discover(args: argparse.Namespace) -> int:
    """Score, select, evaluate on held-out prompts, write the six files, print a summary."""
    from .api import resolve_selection
    from .methods import check_metric, check_options, get_method
    from .metrics import get_metric

    # check everything that can be wrong before the slow part starts
    spec = get_method(args.method)
    options = method_options(args.method, args)
    check_options(args.method, options)
    selection = resolve_selection(args.select, args.method, spec.decides_circuit, args.level)
    if args.metric is not None:
        check_metric(args.method, get_metric(args.metric))
    if not 0 < args.heldout < 1:
        _fail(f"--heldout must be a fraction between 0 and 1, got {args.heldout}")
    if args.batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {args.batch_size}")
    check_seed_and_n(args.seed, args.n)
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / task_name(args.task))
    check_output(out, folder=True, flag="--out")

    t0 = time.perf_counter()
    names = ["loading", "measuring the behavior", "scoring", "selecting", "evaluating",
             "reading the heads", "writing"]
    with stages(names) as stage:
        stage("loading")
        task, model = load_task_and_model(args.task, args.model, args.n, args.seed, args)
        checkpoint = discovery_checkpoint(out, task, model, args, options)
        found = run_discovery(task, model, args, selection, options, stage, checkpoint)
        stage("writing")
        from .report import run_record, scores_json

        run = run_record(found, args.task, args.model or model.name)
        run["prompts"] = prompts_digest(found.task)
        write_discovery(found, out, " ".join([PROG, *map(shlex.quote, args.argv)]),
                        scores_json(found.scores, run))
        checkpoint.finish()
    from .report import summary_rows, text_table

    print(text_table(summary_rows(found, f"{out}{os.sep}", time.perf_counter() - t0)))
    return 0


def task_name(task: str) -> str:
    """The name a task will have: a built-in task's own, a JSONL file's stem."""
    return Path(task).stem if _is_task_file(task) else task


def prompts_digest(task: Any) -> str:
    """16 hex characters of sha256 over a task's prompt pairs and answers: what a discovery
    ran on, recorded so that its progress and scores are used only with the same prompts."""
    import hashlib
    import json

    prompts = json.dumps([e.to_dict() for e in task.examples], sort_keys=True)
    return hashlib.sha256(prompts.encode("utf-8")).hexdigest()[:16]


def discovery_checkpoint(out: Path, task: Any, model: Any, args: argparse.Namespace,
                         options: dict[str, Any]) -> Any:
    """Where a long discovery keeps its progress (``OUT/.progress``), keyed by everything the
    scores depend on, so ``--resume`` continues only the same run."""
    from .progress import Checkpoint

    run = dict(command="discover", method=args.method, options=options,
               task=task.name, prompts=prompts_digest(task), bos=task.bos,
               model=model.fingerprint, dtype=args.dtype, ablation=args.ablation,
               metric=args.metric, batch_size=args.batch_size, heldout=args.heldout,
               seed=args.seed)
    return Checkpoint(out / ".progress", run, resume=args.resume)


def run_discovery(task: Any, model: Any, args: argparse.Namespace, selection: dict[str, float],
                  options: dict[str, Any], stage: Callable[[str], None],
                  checkpoint: Any = None) -> Any:
    """`circuits.api.discover` on a resolved task and model, the circuit named after the whole
    task (and its JSONL file, so `evaluate` finds it again)."""
    from .api import discover

    kwargs: dict[str, Any] = dict(ablation=args.ablation, metric=args.metric, level=args.level,
                                  selection=selection, heldout=args.heldout, seed=args.seed,
                                  batch_size=args.batch_size, progress=stage,
                                  strict=args.strict, checkpoint=checkpoint, **options)
    return name_circuit(discover(task, model, args.method, **kwargs), args.task)


def name_circuit(found: Any, task: str) -> Any:
    """Name `found`'s circuit after the whole task, and record `task` when it is a file."""
    # the circuit belongs to the whole task (the scores to its discovery part): evaluate and
    # the diagrams' titles use this name, and a JSONL task is found again through its path
    found.circuit.task = found.task.name
    if _is_task_file(task):
        found.circuit.options["task_file"] = task
    return found


def write_discovery(found: Any, out: Path, command: str, scores_text: str) -> list[Path]:
    """Write circuit.json, scores.json (`scores_text`), the diagrams, the page and report.md
    into `out`.

    Everything is first written into a staging folder inside `out`, then moved into place with
    Ctrl-C held back, so `out` holds either the previous complete set of files or the new one,
    never a mix or half a file."""
    from .io import write_atomic
    from .outputs import move_into_place, staged
    from .report import report_markdown

    circuit = found.circuit
    with staged(out) as staging:
        files = [circuit.save(staging / "circuit.json")]
        write_atomic(staging / "scores.json", scores_text.encode("utf-8"))
        files.append(staging / "scores.json")
        files.append(circuit.render(staging / "circuit.svg"))
        files.append(circuit.render(staging / "circuit.png"))
        files.append(circuit.to_html(staging / "circuit.html"))
        report = report_markdown(found, [f.name for f in files], command)
        write_atomic(staging / "report.md", report.encode("utf-8"))
        files.append(staging / "report.md")
        # in this order (circuit.json first), not the staging folder's
        return move_into_place(files, out)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Faithfulness, metric values and the faithfulness curve of a saved circuit on fresh
    prompts."""
    from .api import make_setup
    from .evaluate import evaluate, faithfulness_curve
    from .io import load_circuit
    from .metrics import get_metric
    from .model import dtype_name, load_model
    from .report import interval, text_table

    circuit = load_circuit(args.circuit)
    task_file = circuit.options.get("task_file")
    saved_task = task_file if isinstance(task_file, str) and _is_task_file(task_file) else (
        circuit.task.removesuffix("/discovery").removesuffix("/heldout"))
    task_name = args.task or saved_task
    model_name = args.model or circuit.model
    if not task_name:
        _fail(f"{args.circuit} names no task; pass --task (a built-in task or a JSONL file)")
    if not model_name:
        _fail(f"{args.circuit} names no model; pass --model")
    # fresh prompts: a generator seed other than the one the circuit was discovered with
    saved_seed, saved_n = circuit.options.get("seed", 0), circuit.options.get("n_prompts")
    if not isinstance(saved_seed, int) or not (saved_n is None or isinstance(saved_n, int)):
        _fail(f"{args.circuit}: options 'seed' and 'n_prompts' must be integers; fix the file "
              "or pass --seed and --n")
    seed = args.seed if args.seed is not None else (saved_seed + 1) % 2**32
    n = args.n if args.n is not None else saved_n
    check_seed_and_n(seed, n)
    ablation = args.ablation or circuit.options.get("ablation", "resample")
    metric = args.metric or circuit.options.get("metric")
    if metric is not None:
        get_metric(metric)
    if args.batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {args.batch_size}")
    check_device_and_dtype(args)

    with stages(["loading", "evaluating", "curve"]) as stage:
        stage("loading")
        model = load_model(model_name, args.device, args.dtype)
        check_model(circuit, model, args)
        saved_bos = circuit.options.get("bos")
        if args.bos is None and isinstance(saved_bos, bool):  # start as the discovery's did
            args.bos = saved_bos
        task, model = load_task_and_model(task_name, model, n, seed, args)
        setup = make_setup(model, task, ablation=ablation, metric=metric,
                           batch_size=args.batch_size)
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


def check_shape(circuit: Any, model: Any, graph: Any) -> None:
    """Refuse a model whose graph has another shape than the circuit's."""
    g = circuit.graph
    if g.shape() != graph.shape():
        _fail(f"the circuit is for a {g.n_layers}-layer, {g.n_heads}-head model but "
              f"{model.name!r} has {graph.n_layers} layers and {graph.n_heads} heads; pass the "
              "circuit's model with --model")


def check_model(circuit: Any, model: Any, args: argparse.Namespace) -> None:
    """Refuse a model whose weights differ from those the circuit was discovered on (its
    fingerprint, recorded in the circuit file) unless --any-model; warn where an older
    fingerprint cannot tell (`circuits.model.check_same_weights`)."""
    from .model import check_same_weights

    note = check_same_weights(
        model, circuit.options.get("model_fingerprint"), circuit.options.get("dtype", "float32"),
        f"{args.circuit} was discovered on {circuit.model or 'another model'!r}",
        "pass the circuit's model with --model, or --any-model to evaluate it anyway",
        any_model=args.any_model)
    if note is not None:
        print(f"{PROG}: warning: {note}", file=sys.stderr)


def cmd_render(args: argparse.Namespace) -> int:
    """Draw a saved circuit to SVG, PNG, PDF, DOT or an interactive HTML page."""
    from .io import load_circuit

    out = Path(args.output)
    suffix = out.suffix.lstrip(".").lower()
    if suffix not in RENDER_SUFFIXES:
        _fail(f"cannot tell the format of {out.name!r}; name the output .svg, .png, .pdf, .dot "
              "or .html")
    check_output(out, folder=False, flag="-o")
    circuit = load_circuit(args.circuit)
    if suffix == "html":
        circuit.to_html(out)
    else:
        circuit.render(out, reverse=args.reverse)
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a saved circuit as GraphML, DOT, our JSON, or a MIB submission entry."""
    from .io import export, load_circuit

    out = Path(args.output)
    fmt = args.format or out.suffix.lstrip(".").lower()
    if fmt not in EXPORT_FORMATS:
        _fail(f"cannot tell the export format of {out.name!r}; pass --format "
              f"{'|'.join(EXPORT_FORMATS)}")
    if args.d_model is not None and args.d_model < 1:
        _fail(f"--d-model must be a positive width, got {args.d_model}")
    check_output(out, folder=fmt == "mib" and args.binary, flag="-o")
    circuit = load_circuit(args.circuit)
    options: dict[str, Any] = {}
    if fmt == "mib":
        width = args.d_model or circuit.options.get("d_model") or d_model_of(circuit.model)
        if not isinstance(width, int):
            _fail(f"MIB's format records the model width and {circuit.model or 'the model'!r} "
                  "is not a local model to read it from; pass --d-model (768 for GPT-2 small)")
        options = dict(d_model=width, binary=args.binary)
    elif args.binary or args.d_model:
        _fail("--binary and --d-model only apply to --format mib")
    export(circuit, out, format=fmt, **options)
    print(out)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .report import text_table
    from .task import get_task, list_tasks

    rows = [(name, f"[{get_task(name, n=1).reference_model or 'no reference model'}]", text)
            for name, text in list_tasks()]
    print(text_table(rows))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .zoo import list_models

    for card in list_models():
        print(card.line())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import available
    from .report import text_table

    print(text_table([(s.name, s.level, s.passes, s.description)
                      for s in available().values()]))
    return 0


def _module_missing(args: argparse.Namespace) -> int:
    """Never reached: a module command is built with its own parser when it is named."""
    raise AssertionError(f"command {args.command} was not built")


def cmd_bench_missing(args: argparse.Namespace) -> int:
    from .errors import DependencyError

    raise DependencyError("`circuits bench` needs the circuits.bench module, which this "
                          "installation lacks; update circuits")


# -- the parser ---------------------------------------------------------------------------------
EXAMPLES = {
    "discover": """examples:
  circuits discover ioi                              # IOI circuit of the reference model
  circuits discover ioi --method eap --select topk:30 --out out/ioi-eap
  circuits discover my_behavior.jsonl --model ioi-gpt2-4l --n 100 --seed 1
  circuits discover induction --method acdc --threshold 0.02
  circuits discover ioi --model gpt2 --device cuda --dtype bfloat16""",
    "evaluate": """examples:
  circuits evaluate circuits-out/ioi/circuit.json
  circuits evaluate circuits-out/ioi/circuit.json --n 300 --seed 7 --ablation mean""",
    "render": """examples:
  circuits render circuits-out/ioi/circuit.json -o ioi.pdf
  circuits render circuits-out/ioi/circuit.json -o ioi.html    # interactive page""",
    "export": """examples:
  circuits export circuits-out/ioi/circuit.json --format graphml -o ioi.graphml
  circuits export circuits-out/ioi/circuit.json --format mib -o ioi_gpt2/importances.json
  circuits export circuits-out/ioi/circuit.json --format mib --binary -o ioi_gpt2/""",
    "tasks": "example:\n  circuits tasks",
    "models": "example:\n  circuits models",
    "methods": "example:\n  circuits methods",
    "bench": "example:\n  circuits bench --help",
}

# Commands that live in modules of their own (`circuits.commands.NAME`), imported only when
# named: name -> one-line help. Each module gives ``HELP_EXAMPLES`` (the epilog),
# ``add_arguments(parser)`` and ``run(args) -> int``.
MODULE_COMMANDS = {
    "select": "Make a new circuit from saved scores (a discover run's scores.json) without "
              "running the method again: select, evaluate, write the same outputs.",
    "heads": "Score every attention head's role (previous-token, duplicate-token, first-token, "
             "induction, copying, name-mover): a table and a layers x heads heatmap per role.",
    "attention": "Draw the attention patterns of chosen heads on chosen prompts (PNG heatmaps "
                 "with the tokens on the axes).",
    "lens": "Logit lens or tuned lens: the answer's rank and the task metric after each layer, "
            "as a table and a plot.",
    "dla": "Direct logit attribution: each head's and MLP's direct contribution to the task "
           "metric through the unembedding (a layer x head heatmap).",
    "trace": "Causal tracing (Meng et al. 2022): noise the subject, restore hidden states, MLP "
             "and attention outputs per layer and token; the three-panel heatmap.",
    "attribute": "Per-token attributions of the metric (integrated gradients, SHAP, LRP, "
                 "attention rollout and flow, occlusion, ...), or --compare the methods.",
}


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def add_device_arguments(parser: argparse.ArgumentParser, bos: bool = True,
                         dtype: str | None = "float32") -> None:
    """``--device`` and ``--dtype``, for every command that loads a model (checked by the
    command, so that a bad value is one line and exit status 2), and unless `bos` is False
    ``--bos``/``--no-bos``, which `load_task_and_model` applies to the task. `dtype` is the
    default dtype; None: the one the command's input file records."""
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help="where the model runs: cpu, cuda, cuda:N or mps "
                        "(default: %(default)s)")
    parser.add_argument("--dtype", default=dtype, metavar="DTYPE",
                        help="parameter dtype: float32, bfloat16 or float16; metrics are "
                        "computed in float32, and float16 is slow on CPUs (default: "
                        f"{dtype or 'the dtype the file records'})")
    if bos:
        parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                            help="put the tokenizer's BOS token before every prompt, or with "
                            "--no-bos nothing (default: what the tokenizer itself puts before "
                            "a text: nothing for GPT-2, the BOS for Llama and Gemma)")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; `argv` tells whether ``bench`` needs its (lazily imported) options."""
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback when something fails")
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Causal circuit discovery for Hugging Face transformer language models.",
        epilog="example:\n  circuits discover ioi     # then open circuits-out/ioi/circuit.svg\n"
               "run `circuits COMMAND --help` for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], text: str,
                examples: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text,
                           epilog=EXAMPLES[name] if examples is None else examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        p.set_defaults(func=func)
        return p

    p = command("discover", cmd_discover, "Discover a behavior's circuit: score every edge, "
                "select a circuit, check it on held-out prompts, write diagrams and a report.")
    p.add_argument("task", metavar="TASK",
                   help="a built-in task (`circuits tasks`) or a JSONL file of prompt pairs")
    p.add_argument("--model", help="a shipped model (`circuits models`), a local model folder "
                   "or a hub name (default: the task's reference model)")
    p.add_argument("--method", default="eap-ig",
                   help="a registered method (`circuits methods`; default: %(default)s)")
    p.add_argument("--ablation", choices=ABLATIONS, default="resample",
                   help="what replaces an edge outside the circuit (default: %(default)s)")
    p.add_argument("--metric", help="logit-diff, prob-diff, logprob or kl (default: the task's)")
    p.add_argument("--level", choices=("edge", "node"), default="edge",
                   help="select edges, or heads and MLPs (default: %(default)s)")
    p.add_argument("--select", metavar="RULE",
                   help="threshold:X, topk:N, faithfulness:F (the smallest prefix of the "
                   "ranking reaching faithfulness F on the discovery prompts) or method (the "
                   "circuit the method decided itself, acdc) (default: method for acdc, "
                   "faithfulness:0.85 otherwise)")
    p.add_argument("-o", "--out", metavar="DIR",
                   help="output folder (default: circuits-out/TASK)")
    p.add_argument("--n", type=int, help="number of prompts, discovery and held-out together "
                   "(default: the task's; a JSONL task uses all its lines)")
    p.add_argument("--heldout", type=float, default=0.3, metavar="F",
                   help="fraction of the prompts kept apart for evaluation (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B",
                   help="prompts per forward pass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seeds the prompts, the split and the method; same seed, same circuit "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, metavar="K",
                   help="integration steps (eap-ig, eap-ig-activations, eap-ig-stages; method "
                        "default if unset)")
    p.add_argument("--threshold", type=float, metavar="TAU",
                   help="ACDC's removal threshold τ (acdc; method default if unset)")
    p.add_argument("--strict", action="store_true",
                   help="stop with an error, instead of a warning, when the model barely shows "
                   "the behavior (its effect is small against its spread over the prompts)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from the progress "
                   "it kept in the output folder (acdc, exact, eap-ig)")
    add_device_arguments(p)

    p = command("evaluate", cmd_evaluate, "Evaluate a saved circuit on fresh prompts: "
                "faithfulness, metric values and the faithfulness curve (CPR, CMD).")
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
    add_device_arguments(p)

    p = command("render", cmd_render, "Draw a saved circuit: SVG, PNG, PDF or DOT with "
                "graphviz, or an interactive HTML page (format from the file name).")
    p.add_argument("circuit", metavar="CIRCUIT.json")
    p.add_argument("-o", "--output", "--out", dest="output", required=True, metavar="FILE",
                   help="FILE.svg, .png, .pdf, .dot or .html")
    p.add_argument("--reverse", action="store_true", help="input at the top, logits at the "
                   "bottom")

    p = command("export", cmd_export, "Export a saved circuit as GraphML, DOT, JSON or a MIB "
                "circuit-track submission entry.")
    p.add_argument("circuit", metavar="CIRCUIT.json")
    p.add_argument("--format", choices=EXPORT_FORMATS,
                   help="default: from the output's suffix (mib must be named)")
    p.add_argument("-o", "--output", "--out", dest="output", required=True, metavar="PATH",
                   help="output file (a folder for --format mib --binary)")
    p.add_argument("--d-model", type=int, metavar="D", help="model width MIB records (default: "
                   "from the circuit or its local model)")
    p.add_argument("--binary", action="store_true", help="MIB: one circuit per edge budget "
                   "instead of an importance-score file")

    command("tasks", cmd_tasks, "List the built-in tasks, one per line.")
    command("models", cmd_models, "List the shipped reference models, one per line.")
    command("methods", cmd_methods, "List the discovery methods: name, level, passes, "
            "description.")

    named = _command_of(argv)
    for name, text in MODULE_COMMANDS.items():
        if name != named:  # listed in --help; its options are read only when it runs
            p = command(name, _module_missing, text, examples=f"run `circuits {name} --help`")
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            continue
        import importlib

        module = importlib.import_module(f"{__package__}.commands.{name}")
        p = command(name, module.run, text, examples=module.HELP_EXAMPLES)
        module.add_arguments(p)

    text = "Benchmark methods x tasks x models (faithfulness curves, ROC AUC, time, memory)."
    if _command_of(argv) == "bench":
        # imported only when asked for: the benchmark runner pulls in far more than --help needs
        try:
            from . import bench
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.bench":
                raise
            p = command("bench", cmd_bench_missing, text)
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        else:
            p = command("bench", bench.run, text)
            bench.add_arguments(p)
    else:
        command("bench", cmd_bench_missing, text)
    return parser


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Inside the block, a warning the package issues is printed as one line ``circuits:
    warning: ...`` on stderr (others as Python prints them); the previous printer is restored."""
    import warnings

    previous = warnings.showwarning
    package = str(Path(__file__).resolve().parent)

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        if str(Path(filename).resolve()).startswith(package):
            print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line. An argument the command does not know is reported with that
    command's usage (not the program's) and the closest option it has."""
    import difflib

    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions  # the command's own parser
                   if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        known = [o for a in sub._actions for o in a.option_strings]
        flag = next((e for e in extra if e.startswith("-")), "").split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1) if flag else []
        hint = (f"; did you mean {close[0]}?" if close else "") + (
            f" (see `{PROG} {args.command} --help`)")
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``circuits`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name (``sys.argv[1:]`` when None).

    Returns
    -------
    int
        The exit status: 0 success, 1 unexpected failure, 2 bad input, 130 interrupted.

    Examples
    --------
    >>> main(["methods"]) == 0  # doctest: +ELLIPSIS
    acdc ...
    True
    """
    from .progress import interrupted, sigint_handler

    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()

    args: argparse.Namespace | None = None

    def stopped() -> int:
        # only commands that keep progress can continue where they stopped
        resumable = args is not None and hasattr(args, "resume")
        again = ("rerun the same command with --resume to continue"
                 if resumable and not args.resume else
                 "rerun the same command to continue" if resumable else
                 f"`{PROG} {args.command}` starts over when run again" if args is not None
                 else "nothing was started")
        print(f"\n{PROG}: interrupted after {time.perf_counter() - t0:.0f} s; finished outputs "
              f"are kept ({again})", file=sys.stderr)
        return 130

    debug = False
    # from the start: parsing `bench` already imports torch
    with sigint_handler(), one_line_warnings():
        try:
            try:
                args = parse(argv)
            except SystemExit as done:  # --help, --version and argparse's usage errors
                return done.code if isinstance(done.code, int) else (
                    0 if done.code is None else 2)
            args.argv = argv
            debug = getattr(args, "debug", False)
            status = args.func(args)
        except KeyboardInterrupt:
            return stopped()
        except Exception as err:  # every failure ends as one line (and a traceback with --debug)
            if interrupted():  # a Ctrl-C that a library turned into another exception
                return stopped()
            from .errors import CircuitsError

            if debug:
                traceback.print_exc()
            text = " ".join(str(err).split()) or "no message"
            if isinstance(err, CircuitsError):
                print(f"{PROG}: error: {text}", file=sys.stderr)
                return 2
            hint = "" if debug else " (run again with --debug for the traceback)"
            print(f"{PROG}: error: {type(err).__name__}: {text}{hint}", file=sys.stderr)
            return 1
        # a Ctrl-C swallowed somewhere still ends the command as interrupted
        return stopped() if interrupted() else status


def entry() -> None:
    """The ``circuits`` program: `main`, then exit with its status.

    Once `main` has returned, a Ctrl-C is ignored: the interpreter's shutdown (atexit callbacks,
    library finalizers) takes a moment, and a Ctrl-C there would print a traceback and lose the
    status.
    """
    import signal

    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(status)
