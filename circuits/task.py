"""Tasks: a behavior as clean/corrupted prompt pairs with answer tokens and a metric.

A `Task` is plain data (strings), independent of any model; `Task.batches` tokenizes it for
one tokenizer, checks it, and groups it into `Batch` objects of one token length each. The
built-in tasks (``ioi``, ``induction``, ``factual``) are defined with this same API in the
``circuits.tasks`` package and are found by name through `get_task`.

The parts of a task live apart: `circuits.example` (one prompt pair and its checks),
`circuits.task_files` (JSONL files), `circuits.task_tokens` (token ids and batches); this module
holds the `Task` type and the registry of named tasks.
"""

from __future__ import annotations

import importlib
import numbers
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .batch import Batch
from .errors import OptionError, TaskError
from .example import Example, items_of, show
from .metrics import Metric, get_metric
from .positions import Positions
from .task_files import example_from_record, read_examples, write_examples
from .task_tokens import encode as _encode  # noqa: F401  (attribution.known imports it here)
from .task_tokens import (
    is_single_token,
    n_tokens,
    prefix_ids,
    to_batch,
    tokenize_example,
    unknown_token,
)

#: What this module offers; `Example` and the token helpers live in `circuits.example` and
#: `circuits.task_tokens` and are importable from here as before.
__all__ = ["MAX_PROMPTS", "Example", "Task", "TaskSpec", "get_task", "is_single_token",
           "list_tasks", "n_tokens", "prefix_ids", "register_task"]


@dataclass(frozen=True)
class Task:
    """A behavior: clean/corrupted prompt pairs, their answer tokens and a metric.

    Attributes
    ----------
    name : str
        Short name, e.g. ``"ioi"``.
    examples : tuple of Example
        The prompt pairs (a list is accepted and stored as a tuple).
    metric : str or Metric
        A metric name (see `circuits.metrics.METRICS`) or a `Metric`; default ``"logit-diff"``.
    description : str
        One line saying what the behavior is.
    reference_model : str or None
        Name of the shipped model trained on this behavior (see `circuits.zoo`), if any.
    bos : bool or None
        What `batches` puts before every prompt (`prefix_ids`): None (default) what the
        tokenizer itself adds before a text (a BOS token for Llama and Gemma, nothing for
        GPT-2), False nothing, True the tokenizer's BOS token.

    Examples
    --------
    >>> task = Task("greeting", [Example("Hello", "Bye", " world", " moon")])
    >>> len(task), task.metric_fn.name
    (1, 'logit-diff')
    """

    name: str
    examples: tuple[Example, ...]
    metric: str | Metric = "logit-diff"
    description: str = ""
    reference_model: str | None = None
    bos: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TaskError(f"the task name must be a string, got {show(self.name)}")
        if self.bos is not None and not isinstance(self.bos, bool):
            raise OptionError(f"bos must be True, False or None (the tokenizer's convention), "
                              f"got {show(self.bos)}")
        examples = items_of(f"task {self.name!r}", self.examples)
        if not examples:
            raise TaskError(f"task {self.name!r} has no examples: give at least one")
        for i, example in enumerate(examples):
            if not isinstance(example, Example):
                raise TaskError(
                    f"task {self.name!r}: item {i} is a {type(example).__name__}, not an "
                    "Example; build it with Example(clean, corrupt, answers, wrong)"
                )
        object.__setattr__(self, "examples", examples)
        get_metric(self.metric)  # fail early on an unknown metric name

    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        metric = self.metric if isinstance(self.metric, str) else self.metric.name
        return (
            f"Task({self.name!r}, {len(self.examples)} examples, metric={metric!r}, "
            f"reference_model={self.reference_model!r})"
        )

    @property
    def metric_fn(self) -> Metric:
        """The task's `Metric` object."""
        return get_metric(self.metric)

    @classmethod
    def from_examples(
        cls,
        name: str,
        examples: Iterable[Example | Mapping[str, Any]],
        metric: str | Metric = "logit-diff",
        description: str = "",
        reference_model: str | None = None,
    ) -> Task:
        """Build a task from `Example` objects or dicts shaped like a JSONL record.

        Parameters
        ----------
        name : str
            Task name.
        examples : iterable of Example or dict
            Dicts take the keys ``clean``, ``corrupt``, ``answers`` (or ``answer``) and
            ``wrong``, plus an optional ``meta`` dict.
        metric : str or Metric
            Metric name or object.
        description : str
            One-line description.
        reference_model : str or None
            Name of a shipped reference model.

        Returns
        -------
        Task

        Examples
        --------
        >>> task = Task.from_examples("t", [{"clean": "a b", "corrupt": "c b",
        ...                                  "answer": " x", "wrong": " y"}])
        >>> task.examples[0].answers
        (' x',)
        """
        parsed = [
            e if isinstance(e, Example) else example_from_record(e, f"examples[{i}]")
            for i, e in enumerate(items_of("from_examples", examples))
        ]
        return cls(name, tuple(parsed), metric, description, reference_model)

    @classmethod
    def from_jsonl(
        cls,
        path: str | os.PathLike,
        name: str | None = None,
        metric: str | Metric = "logit-diff",
        description: str = "",
    ) -> Task:
        """Read a task from a JSONL file, one example per line.

        Each line is ``{"clean": ..., "corrupt": ..., "answers": [...], "wrong": [...]}``;
        ``"answer"`` / a single string for ``"wrong"`` are accepted too, and an optional
        ``"meta"`` dict is kept. Blank lines are skipped. The file must be UTF-8 (a byte-order
        mark is allowed); only ``\\n`` ends a line. Nothing in the file is executed.

        Parameters
        ----------
        path : path-like
            The JSONL file.
        name : str or None
            Task name; defaults to the file's stem.
        metric : str or Metric
            Metric name or object.
        description : str
            One-line description.

        Returns
        -------
        Task

        Raises
        ------
        TaskError
            On a missing, unreadable, non-UTF-8 or empty file, a directory, invalid JSON, a
            line that is not a JSON object, a missing key or a value of the wrong type, and
            every check of `Example` (naming the file and line).
        """
        examples, path = read_examples(path)
        return cls(name or path.stem, examples, metric, description)

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """Write the examples to a JSONL file that `from_jsonl` reads back unchanged (the file
        is overwritten; `circuits.task_files.write_examples` says what it refuses)."""
        write_examples(self.examples, path)

    def split(self, n_or_fraction: int | float, seed: int = 0) -> tuple[Task, Task]:
        """Split into a discovery task and a held-out task, after a seeded shuffle.

        Parameters
        ----------
        n_or_fraction : int or float
            Number of discovery examples, or a fraction in ``(0, 1)`` of them.
        seed : int
            Shuffle seed.

        Returns
        -------
        (Task, Task)
            ``(discovery, heldout)``, both non-empty, named ``<name>/discovery`` and
            ``<name>/heldout``.

        Raises
        ------
        OptionError
            `n_or_fraction` is not a number, or `seed` is not a valid seed.
        TaskError
            A count outside ``1 .. len(task) - 1``, a fraction outside ``(0, 1)``, or a
            fraction that leaves a part empty.
        """
        value = n_or_fraction
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise OptionError(f"split takes a count (int) or a fraction (float between 0 and 1), "
                              f"got {show(value)}")
        _check_seed(seed)
        total = len(self.examples)
        if total < 2:
            raise TaskError(f"task {self.name!r} has {total} example and cannot be split in two; "
                            "add examples")
        if _whole(value):
            n = int(value)
        elif 0 < value < 1:
            n = round(total * value)
        else:  # a float outside (0, 1), NaN included
            n = -1
        if not 0 < n < total:
            raise TaskError(
                f"cannot split {total} examples of task {self.name!r} at {value!r}: that leaves "
                f"a part empty; give a count between 1 and {total - 1} or a fraction between 0 "
                "and 1 that keeps both parts non-empty"
            )
        order = list(range(total))
        random.Random(seed).shuffle(order)
        first = tuple(self.examples[i] for i in order[:n])
        second = tuple(self.examples[i] for i in order[n:])
        return (
            Task(f"{self.name}/discovery", first, self.metric, self.description,
                 self.reference_model, self.bos),
            Task(f"{self.name}/heldout", second, self.metric, self.description,
                 self.reference_model, self.bos),
        )

    def batches(
        self,
        tokenizer: Any,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        max_length: int | None = None,
        positions: Positions | None = None,
    ) -> list[Batch]:
        """Tokenize, check and group the examples into batches of one token length each.

        Examples are bucketed by token length (shortest first), keeping their order within a
        bucket; each bucket is cut into batches of at most `batch_size`. Every clean and
        corrupted prompt starts with ``prefix_ids(tokenizer, self.bos)``: by default what the
        tokenizer itself puts before a text (a BOS token for Llama and Gemma, nothing for
        GPT-2); answers and wrong tokens are single tokens without special ones.

        Parameters
        ----------
        tokenizer : tokenizer
            A Hugging Face tokenizer (``model.tokenizer``) or a ``tokenizers`` tokenizer.
        batch_size : int
            Largest number of examples in a batch.
        device : torch.device or str
            Where the tensors are put.
        max_length : int or None
            Longest prompt, in tokens, the model can read (``model.context_length``); None
            checks no length.
        positions : Positions, optional
            For position-resolved circuits: each batch's ``where`` gives the position of every
            token (`circuits.positions.Positions.row`).

        Returns
        -------
        list of Batch

        Raises
        ------
        TaskError
            If there is no tokenizer; a clean and corrupted prompt differ in token length, are
            the same tokens or are longer than `max_length` (the prefix included); an answer
            or wrong token is not a single token for this tokenizer or is its unknown token;
            or an answer is also a wrong token.
        OptionError
            If `batch_size` or `max_length` is not a positive whole number, or ``bos=True``
            with a tokenizer that has no BOS token.
        """
        if tokenizer is None:
            raise TaskError(f"task {self.name!r} needs a tokenizer, got None; load the model with "
                            "its tokenizer (load_model reads it from the model folder)")
        if not _whole(batch_size) or batch_size < 1:
            raise OptionError(f"batch_size must be a whole number of at least 1, got "
                              f"{show(batch_size)}")
        if max_length is not None and (not _whole(max_length) or max_length < 1):
            raise OptionError(f"max_length must be a whole number of at least 1 or None, got "
                              f"{show(max_length)}")
        unknown = unknown_token(tokenizer)
        prefix = prefix_ids(tokenizer, self.bos)
        buckets: dict[int, list[tuple[list[int], list[int], list[int], list[int]]]] = {}
        wheres: dict[int, list[list[int]]] = {}
        for example in self.examples:
            row = tokenize_example(tokenizer, example, max_length, unknown, prefix)
            buckets.setdefault(len(row[0]), []).append(row)
            if positions is not None:
                at = positions.row(example, len(row[0]), len(prefix))
                wheres.setdefault(len(row[0]), []).append(at)
        batches = []
        for length in sorted(buckets):
            rows = buckets[length]
            for start in range(0, len(rows), batch_size):
                where = wheres[length][start:start + batch_size] if positions else None
                batches.append(to_batch(rows[start : start + batch_size], device, where))
        return batches


@dataclass(frozen=True)
class TaskSpec:
    """A registered task builder.

    Attributes
    ----------
    name : str
        Registry name.
    description : str
        One line for ``circuits tasks``.
    build : callable
        ``build(tokenizer, n, seed) -> Task``; `tokenizer` may be None (no filtering).
    reference_model : str or None
        Name of the shipped model trained on the task.
    default_n : int
        Number of examples when `get_task` is called without `n`.
    """

    name: str
    description: str
    build: Callable[[Any, int, int], Task]
    reference_model: str | None = None
    default_n: int = 200


# Built-in tasks live in modules that are imported on first use, so importing `circuits` stays
# cheap; each module defines a module-level ``SPEC: TaskSpec``. New built-ins add a line here.
_BUILTIN_MODULES: dict[str, str] = {
    "ioi": "circuits.tasks.ioi",
    "induction": "circuits.tasks.induction",
    "factual": "circuits.tasks.factual",
    "shortcut": "circuits.tasks.shortcut",
    "planted-induction": "circuits.tasks.planted",
    "planted-ioi": "circuits.tasks.planted",
    "planted-mlp": "circuits.tasks.planted",
}
_REGISTRY: dict[str, TaskSpec] = {}
#: The most prompts `get_task` builds: a bound so that a huge ``--n`` fails at once instead of
#: running the machine out of memory.
MAX_PROMPTS = 100_000


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task builder to the registry so `get_task` finds it by name.

    Parameters
    ----------
    spec : TaskSpec
        The builder; a spec with the same name replaces the old one.

    Returns
    -------
    TaskSpec
        `spec`, so the call can be used as an assignment.
    """
    _REGISTRY[spec.name] = spec
    return spec


def _spec(name: str) -> TaskSpec:
    """Look up a spec, importing its built-in module on first use."""
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        module = importlib.import_module(_BUILTIN_MODULES[name])
        for spec in getattr(module, "SPECS", None) or (module.SPEC,):
            register_task(spec)
    if name not in _REGISTRY:
        names = sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))
        raise OptionError(f"unknown task {name!r}: use one of {', '.join(names)}")
    return _REGISTRY[name]


def get_task(name: str, tokenizer: Any = None, n: int | None = None, seed: int = 0) -> Task:
    """Build a registered task by name.

    Parameters
    ----------
    name : str
        ``"ioi"``, ``"induction"``, ``"factual"`` or any registered name (see `list_tasks`).
    tokenizer : tokenizer, optional
        The tokenizer of the model the task will run on; words that are not a single token for
        it are left out so that every prompt pair is valid. None keeps every word (fine for the
        shipped reference models).
    n : int, optional
        Number of examples (the task's default when None).
    seed : int
        Seed of the example generator; different seeds give fresh prompts.

    Returns
    -------
    Task

    Raises
    ------
    OptionError
        If the name is unknown, `n` is not a whole number from 1 to `MAX_PROMPTS`, or `seed` is
        not a whole number from 0 to ``2**32 - 1``.

    Examples
    --------
    >>> task = get_task("ioi", n=4, seed=1)
    >>> task.name, len(task), task.reference_model
    ('ioi', 4, 'ioi-gpt2-4l')
    """
    if not isinstance(name, str):
        raise OptionError(f"a task name must be a string, got {show(name)}; see `circuits tasks`")
    spec = _spec(name)
    if n is not None:
        if not _whole(n) or n < 1:
            raise OptionError(f"n must be a whole number of prompts of at least 1, got {show(n)}")
        if n > MAX_PROMPTS:
            raise OptionError(f"n={n} is too many: at most {MAX_PROMPTS} prompts; a few hundred "
                              "are usually enough, so pass a smaller n")
    _check_seed(seed)
    return spec.build(tokenizer, spec.default_n if n is None else int(n), int(seed))


def _whole(value: Any) -> bool:
    """Whether `value` is an integer (numpy ones too), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_seed(seed: Any) -> None:
    """Raise `OptionError` unless `seed` is a whole number from 0 to ``2**32 - 1``."""
    if not _whole(seed) or not 0 <= seed < 2**32:
        raise OptionError(f"seed must be a whole number from 0 to {2**32 - 1}, got {show(seed)}")


def list_tasks() -> list[tuple[str, str]]:
    """Return ``(name, one-line description)`` of every registered task, sorted by name.

    Returns
    -------
    list of (str, str)

    Examples
    --------
    >>> [name for name, _ in list_tasks()][:3]
    ['factual', 'induction', 'ioi']
    """
    for name in _BUILTIN_MODULES:
        _spec(name)
    return sorted((spec.name, spec.description) for spec in _REGISTRY.values())
