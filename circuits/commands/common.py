"""What the commands share: checking inputs before any work, loading a task and a model, the
device flags, a step indicator, and writing a discovery's files.

Every check fails with one `OptionError` line (the program turns it into ``circuits: error:
...`` and exit status 2) before any slow work and before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from ..ablation import ABLATIONS as ABLATIONS  # the choices of --ablation
from ..api import Discovery, resolve
from ..circuit import Circuit
from ..errors import OptionError
from ..io import write_atomic
from ..model import Model, resolve_device, resolve_dtype
from ..outputs import Stages, move_into_place, staged
from ..placement import check_placing
from ..report import report_markdown
from ..task import MAX_PROMPTS, Task, get_task, prefix_ids

PROG = "circuits"
DISCOVER_FILES = ("circuit.json", "scores.json", "circuit.svg", "circuit.png", "circuit.html",
                  "report.md")


def fail(message: str) -> NoReturn:
    """Raise an OptionError: a command-line mistake, reported as one line and exit status 2.

    Examples
    --------
    >>> fail("--n must be at least 1, got 0")
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: --n must be at least 1, got 0
    """
    raise OptionError(message)


@contextlib.contextmanager
def stages(names: Sequence[str]) -> Iterator[Stages]:
    """A command's step indicator (`circuits.outputs.Stages`), erased also when it fails."""
    shown = Stages(names)
    try:
        yield shown
    finally:
        shown.close()


# -- inputs ---------------------------------------------------------------------------------------
def is_task_file(text: str) -> bool:
    """Whether a TASK argument names a JSONL file rather than a built-in task."""
    return text.endswith(".jsonl") or os.path.isfile(text)


def saved_task(circuit: Circuit) -> str:
    """The TASK a saved circuit was discovered on: its JSONL file, where it names one, else the
    task's name without the ``/discovery`` or ``/heldout`` part of a split."""
    task_file = circuit.options.get("task_file")
    if isinstance(task_file, str) and is_task_file(task_file):
        return task_file
    return circuit.task.removesuffix("/discovery").removesuffix("/heldout")


def task_name(task: str) -> str:
    """The name a task will have: a built-in task's own, a JSONL file's stem.

    Examples
    --------
    >>> task_name("ioi"), task_name("data/my_behavior.jsonl")
    ('ioi', 'my_behavior')
    """
    return Path(task).stem if is_task_file(task) else task


def check_output(path: Path, folder: bool, flag: str) -> None:
    """Fail before any work when `path` cannot be written: an existing file where a folder is
    wanted (or the reverse), a path under a file, or a place that refuses new files (read-only,
    no permission, /proc). Nothing is created: the test file goes into the deepest existing
    folder and is removed at once."""
    if folder and path.exists() and not path.is_dir():
        fail(f"{flag} {path} is an existing file, not a folder; pass a new or existing folder")
    if not folder and path.is_dir():
        fail(f"{flag} {path} is a folder; pass a file name")
    place = path if folder else path.parent
    place = place.absolute()
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        fail(f"cannot write {path}: {place} is a file, not a folder; pick another {flag}")
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as err:
        fail(f"cannot write into {place} ({err.strerror or err}); pick another {flag} "
             "in a folder you can write to")


def check_seed_and_n(seed: int, n: int | None) -> None:
    """Fail on a --seed or --n out of range before any work."""
    if not 0 <= seed < 2**32:
        fail(f"--seed must be between 0 and 2**32 - 1, got {seed}")
    if n is not None and not 1 <= n <= MAX_PROMPTS:
        fail(f"--n must be between 1 and {MAX_PROMPTS}, got {n}; more prompts rarely "
             "change a circuit, and the prompts alone would fill the memory")


#: The placement flags' destinations, passed to `circuits.load_model` by name.
PLACING = ("device_map", "max_memory", "offload_folder")


def check_device_and_dtype(args: argparse.Namespace) -> None:
    """Fail on an unknown or unavailable --device or an unknown --dtype before any work."""
    device = resolve_device(args.device)
    resolve_dtype(args.dtype)
    check_placing(device, getattr(args, "device_map", None), getattr(args, "max_memory", None),
                  getattr(args, "offload_folder", None))


def read_task(spec: str, model: Model | None, n: int | None, seed: int) -> Task:
    """A TASK argument as a Task: a JSONL file, or a built-in task built for `model`'s
    tokenizer (any tokenizer when `model` is None, e.g. to check the name before loading)."""
    if is_task_file(spec):
        return Task.from_jsonl(spec)
    return get_task(spec, model.tokenizer if model else None, n=n, seed=seed)


def load_task_and_model(task: str, model: Model | str | None, n: int | None, seed: int,
                        args: argparse.Namespace) -> tuple[Task, Model]:
    """The Task (built-in name or JSONL file) and the Model (name, folder, hub name or None for
    the task's reference model) loaded on ``--device`` in ``--dtype``; ``--bos``/``--no-bos``
    set the task's `bos` (checked against the tokenizer here, before any work)."""
    if is_task_file(task):
        given: Task | str = Task.from_jsonl(task)
    else:
        get_task(task, n=1)  # an unknown name fails here, before a model is loaded
        given = task
    found, loaded = resolve(given, model, n=n, seed=seed, device=args.device, dtype=args.dtype,
                            placing={k: getattr(args, k, None) for k in PLACING})
    if getattr(args, "bos", None) is not None:
        found = replace(found, bos=args.bos)
        prefix_ids(loaded.tokenizer, found.bos)  # --bos with a tokenizer that has no BOS
    return found, loaded


def add_model_argument(parser: argparse.ArgumentParser, also: str = "") -> None:
    """The positional ``MODEL`` of the commands that take a model before anything else; `also`
    ends its help (what the model must be, e.g. the one an SAE was trained on)."""
    parser.add_argument("model", metavar="MODEL", help="a shipped model (`circuits models`), a "
                        f"local model folder or a hub name{also}")


def add_device_arguments(parser: argparse.ArgumentParser, bos: bool = True,
                         dtype: str | None = "float32", placement: bool = False) -> None:
    """``--device`` and ``--dtype``, for every command that loads a model (checked by the
    command, so that a bad value is one line and exit status 2), and unless `bos` is False
    ``--bos``/``--no-bos``, which `load_task_and_model` applies to the task. `dtype` is the
    default dtype; None: the one the command's input file records. With `placement` (commands
    whose work runs on a model placed by a device map), ``--device-map``, ``--max-memory`` and
    ``--offload-folder`` (`circuits.load_model`)."""
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help="where the model runs: cpu, cuda, cuda:N or mps "
                        "(default: %(default)s)")
    parser.add_argument("--dtype", default=dtype, metavar="DTYPE",
                        help="parameter dtype: float32, bfloat16 or float16; metrics are "
                        "computed in float32, and float16 is slow on CPUs (default: "
                        f"{dtype or 'the dtype the file records'})")
    if placement:
        parser.add_argument("--device-map", metavar="MAP",
                            help="place the model's layers on several GPUs or offload them to "
                            "the CPU or disk (accelerate): auto, balanced, sequential, or a JSON "
                            'file such as {"transformer.h.0": "cuda:0", "transformer.h.1": '
                            '"disk", ...}; instead of --device')
        parser.add_argument("--max-memory", metavar="SPEC",
                            help="with --device-map auto: the most each device holds, e.g. "
                            "0=20GiB,1=20GiB,cpu=64GiB (the rest goes to disk)")
        parser.add_argument("--offload-folder", metavar="DIR",
                            help="where weights offloaded to disk are written when they cannot "
                            "be read in place from the model's safetensors files (default: a "
                            "temporary folder)")
    if bos:
        parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                            help="put the tokenizer's BOS token before every prompt, or with "
                            "--no-bos nothing (default: what the tokenizer itself puts before "
                            "a text: nothing for GPT-2, the BOS for Llama and Gemma)")


# -- a discovery's outputs ----------------------------------------------------------------------
def prompts_digest(task: Task, spans: bool = False) -> str:
    """16 hex characters of sha256 over a task's prompt pairs and answers (and their spans,
    with `spans`: a discovery at positions): what a discovery ran on, recorded so that its
    progress and scores are used only with the same prompts."""
    prompts = json.dumps([{k: v for k, v in e.to_dict().items() if spans or k != "spans"}
                          for e in task.examples], sort_keys=True)
    return hashlib.sha256(prompts.encode("utf-8")).hexdigest()[:16]


def name_circuit(found: Discovery, task: str) -> Discovery:
    """Name `found`'s circuit after the whole task, and record `task` when it is a file."""
    # the circuit belongs to the whole task (the scores to its discovery part): evaluate and
    # the diagrams' titles use this name, and a JSONL task is found again through its path
    found.circuit.task = found.task.name
    if is_task_file(task):
        found.circuit.options["task_file"] = task
    return found


def write_discovery(found: Discovery, out: Path, command: str, scores_text: str) -> list[Path]:
    """Write circuit.json, scores.json (`scores_text`), the diagrams, the page and report.md
    into `out`.

    Everything is first written into a staging folder inside `out`, then moved into place with
    Ctrl-C held back, so `out` holds either the previous complete set of files or the new one,
    never a mix or half a file."""
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
