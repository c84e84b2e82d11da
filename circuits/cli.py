"""The ``circuits`` command line: builds the parser from the commands and dispatches.

Each command lives in a module of its own (`circuits.commands.NAME`, and `circuits.bench` for
``bench``), a thin layer over the Python API that gives ``HELP_EXAMPLES`` (its epilog),
``add_arguments(parser)`` and ``run(args) -> int``; what the commands share is in
`circuits.commands.common`. A command's module is imported only when the command is named. The
program's entry point is `circuits_entry`, which runs before the package is imported.

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
import difflib
import importlib
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import distributed
from .commands.common import DISCOVER_FILES as DISCOVER_FILES  # where the tests long found it
from .commands.common import PROG, fail
from .errors import CircuitsError
from .heap import keep_freed_memory
from .progress import interrupted, sigint_handler
from .version import __version__

_fail = fail  # the name the commands and other modules long used

#: Every command: name -> (its module in the package, one-line help for ``circuits --help``).
COMMANDS = {
    "discover": ("commands.discover", "Discover a behavior's circuit: score every edge, select "
                 "a circuit, check it on held-out prompts, write diagrams and a report."),
    "evaluate": ("commands.evaluate", "Evaluate a saved circuit on fresh prompts: "
                 "faithfulness, metric values and the faithfulness curve (CPR, CMD)."),
    "render": ("commands.render", "Draw a saved circuit: SVG, PNG, PDF or DOT with graphviz, "
               "or an interactive HTML page (format from the file name)."),
    "export": ("commands.export", "Export a saved circuit as GraphML, DOT, JSON or a MIB "
               "circuit-track submission entry."),
    "tasks": ("commands.tasks", "List the built-in tasks, one per line."),
    "models": ("commands.models", "List the shipped reference models, one per line."),
    "methods": ("commands.methods", "List the discovery methods: name, level, passes, "
                "description."),
    "select": ("commands.select", "Make a new circuit from saved scores (a discover run's "
               "scores.json) without running the method again: select, evaluate, write the "
               "same outputs."),
    "heads": ("commands.heads", "Score every attention head's role (previous-token, "
              "duplicate-token, first-token, induction, copying, name-mover): a table and a "
              "layers x heads heatmap per role."),
    "attention": ("commands.attention", "Draw the attention patterns of chosen heads on chosen "
                  "prompts (PNG heatmaps with the tokens on the axes)."),
    "lens": ("commands.lens", "Logit lens or tuned lens: the answer's rank and the task metric "
             "after each layer, as a table and a plot."),
    "dla": ("commands.dla", "Direct logit attribution: each head's and MLP's direct "
            "contribution to the task metric through the unembedding (a layer x head heatmap)."),
    "trace": ("commands.trace", "Causal tracing (Meng et al. 2022): noise the subject, restore "
              "hidden states, MLP and attention outputs per layer and token; the three-panel "
              "heatmap."),
    "attribute": ("commands.attribute", "Per-token attributions of the metric (integrated "
                  "gradients, SHAP, LRP, attention rollout and flow, occlusion, ...), or "
                  "--compare the methods."),
    "mib-score": ("commands.mib_score", "MIB's CPR and CMD of saved scores, as its circuit track "
                  "computes them: see your leaderboard numbers before submitting."),
    "sae": ("commands.sae", "Sparse autoencoders and transcoders: train one at a site, "
            "measure its quality, browse its features."),
    "steer": ("commands.steer", "Steering vectors: a direction from contrastive pairs at a "
              "layer (difference of means or PCA), swept over scales: the behavior's metric, "
              "KL and neutral loss, and generations with and without steering."),
    "probe": ("commands.probe", "Linear or MLP probes per layer, with control tasks: "
              "held-out accuracy with its interval, control accuracy and selectivity, a plot "
              "and the probes' weights."),
    "erase": ("commands.erase", "Concept erasure with LEACE at a layer: a linear probe before "
              "and after on held-out examples, and what erasing costs the task's metric, the KL "
              "and the loss on neutral text."),
    "edit": ("commands.edit", "Edit facts with ROME or MEMIT: efficacy, paraphrases, "
             "neighbourhood, fluency and neutral loss before and after; the edited model as a "
             "Hugging Face folder."),
    "plan": ("commands.plan", "Before any weight is loaded, from the model's config: the edges, "
             "the memory a method's run needs per device, its passes, its time and the largest "
             "batch that fits."),
    "bench": ("bench", "Benchmark methods x tasks x models (faithfulness curves, ROC AUC, time, "
              "memory)."),
}


#: The commands whose work the ranks of a torch.distributed job share (``--ranks``).
RANKED = frozenset({"discover", "evaluate", "bench"})


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _not_built(args: argparse.Namespace) -> int:
    """Never reached: a command is built with its own parser when it is named."""
    raise AssertionError(f"command {args.command} was not built")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; the command `argv` names is built whole (its module imported), the
    others are listed with their one-line help."""
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
    named = _command_of(argv)
    for name, (module_name, text) in COMMANDS.items():
        if name != named:  # listed in --help; its options are read only when it runs
            p = sub.add_parser(name, parents=[common], help=text, description=text,
                               epilog=f"run `circuits {name} --help`")
            p.set_defaults(func=_not_built)
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            continue
        module = importlib.import_module(f"{__package__}.{module_name}")
        p = sub.add_parser(name, parents=[common], help=text, description=text,
                           epilog=module.HELP_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=module.run)
        module.add_arguments(p)
        if name in RANKED:
            p.add_argument("--ranks", type=int, metavar="N",
                           help="run as a job of N processes on this machine that share the "
                                "work (torch.distributed: gloo on CPUs, NCCL on GPUs); the "
                                "same as `torchrun --standalone --nproc-per-node N -m "
                                f"circuits -- {name} ...`")
    return parser


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Inside the block, a warning the package issues is printed as one line ``circuits:
    warning: ...`` on stderr (others as Python prints them); the previous printer is restored."""
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
    # from the start: parsing a command imports its module
    with sigint_handler(), one_line_warnings():
        try:
            try:
                with _said_by_rank_0():
                    args = parse(argv)
            except SystemExit as done:  # --help, --version and argparse's usage errors
                return done.code if isinstance(done.code, int) else (
                    0 if done.code is None else 2)
            args.argv = argv
            debug = getattr(args, "debug", False)
            status = _run(args) if getattr(args, "ranks", None) is None else _ranks(args)
        except KeyboardInterrupt:
            return stopped()
        except Exception as err:  # every failure ends as one line (and a traceback with --debug)
            if interrupted():  # a Ctrl-C that a library turned into another exception
                return stopped()
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


@contextlib.contextmanager
def _said_by_rank_0() -> Iterator[None]:
    """Under torchrun, the block's output on ranks other than 0 is dropped: the command line is
    the same on every rank, so rank 0's usage error (or help) is everyone's."""
    if not distributed.launched() or os.environ.get("RANK", "0") == "0":
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        yield


def _run(args: argparse.Namespace) -> int:
    """The command, in the torch.distributed job when torchrun started this process: its
    ranks share the prompts, and only rank 0 prints (`circuits.distributed`). An input error
    is rank 0's one line; every rank ends with status 2 (see `distributed.settle_error`). A
    job the caller has joined already (`main` called by a program under torchrun) is used
    alike."""
    with distributed.process_group(getattr(args, "device", None)):
        if not distributed.active():
            return args.func(args)
        with contextlib.ExitStack() as scope:
            scope.enter_context(distributed.stop_with_the_job())
            if not distributed.is_main():  # rank 0 says it all; errors still show
                sink = scope.enter_context(open(os.devnull, "w"))
                scope.enter_context(contextlib.redirect_stdout(sink))
                scope.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
            try:
                return args.func(args)
            except CircuitsError as err:
                if distributed.settle_error(" ".join(str(err).split())):
                    raise
                return 2  # the same error as rank 0's, which says it


def _ranks(args: argparse.Namespace) -> int:
    """``--ranks N``: the command as a job of N ranks (`distributed.run_ranks`); in a rank of
    a job, the command itself."""
    n, job = args.ranks, int(os.environ.get("WORLD_SIZE", "1"))
    if n < 1:
        fail(f"--ranks must be at least 1, got {n}")
    if distributed.launched() and n != job:
        fail(f"--ranks {n} differs from the {job} ranks torchrun started; leave --ranks out")
    if distributed.launched() or n == 1:
        return _run(args)
    return distributed.run_ranks(args.argv, n)


def entry() -> None:
    """The ``circuits`` program: `main`, then exit with its status.

    Once `main` has returned, a Ctrl-C (or torchrun's SIGTERM) is ignored: the interpreter's
    shutdown (atexit callbacks, library finalizers) takes a moment, and a Ctrl-C there would
    print a traceback and lose the status. The program owns its process: large temporaries
    reuse heap pages (see `circuits.heap`), which a library call never turns on.
    """
    keep_freed_memory()
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # under torchrun: the agent stops the other ranks once one has ended; one that has its
    # status already keeps it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(status)
