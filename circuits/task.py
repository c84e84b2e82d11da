"""Tasks: a behavior as clean/corrupted prompt pairs with answer tokens and a metric.

A `Task` is plain data (strings), independent of any model; `Task.batches` tokenizes it for
one tokenizer, checks it, and groups it into `Batch` objects of one token length each. The
built-in tasks (``ioi``, ``induction``, ``factual``) are defined with this same API in the
``circuits.tasks`` package and are found by name through `get_task`.
"""

from __future__ import annotations

import importlib
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .batch import Batch
from .errors import OptionError, TaskError
from .metrics import Metric, get_metric


@dataclass(frozen=True)
class Example:
    """One clean/corrupted prompt pair.

    Attributes
    ----------
    clean : str
        The prompt that shows the behavior.
    corrupt : str
        The same prompt with the behavior removed; must have the clean prompt's token length.
    answers : tuple of str
        Tokens that show the behavior (each a single token, e.g. ``" Mary"``).
    wrong : tuple of str
        Tokens the behavior argues against (each a single token).
    meta : mapping
        Free-form extra data (e.g. the subject string of a factual prompt). Not compared.
    line : int or None
        Source line in a JSONL file, used in error messages. Not compared.
    """

    clean: str
    corrupt: str
    answers: tuple[str, ...]
    wrong: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    line: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Accept a single string or any iterable for answers/wrong, store tuples.
        for name in ("answers", "wrong"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            if not all(isinstance(v, str) for v in value):
                raise TaskError(f"{self.where()}: {name} must be strings, got {value!r}")
            object.__setattr__(self, name, value)
        for name in ("clean", "corrupt"):
            if not isinstance(getattr(self, name), str):
                raise TaskError(f"{self.where()}: {name!r} must be a string")
        if not self.answers:
            raise TaskError(f"{self.where()}: no answers; give at least one answer token")

    def where(self) -> str:
        """Say where the example came from, for error messages."""
        return f"line {self.line}" if self.line is not None else f"example {self.clean!r}"

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict (``meta`` only when non-empty)."""
        record: dict[str, Any] = {
            "clean": self.clean,
            "corrupt": self.corrupt,
            "answers": list(self.answers),
            "wrong": list(self.wrong),
        }
        if self.meta:
            record["meta"] = dict(self.meta)
        return record


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without special tokens (HF tokenizers and `tokenizers` objects)."""
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def is_single_token(tokenizer: Any, text: str) -> bool:
    """Return whether `text` encodes to exactly one token for `tokenizer`.

    Parameters
    ----------
    tokenizer : tokenizer
        A Hugging Face tokenizer or a ``tokenizers`` tokenizer.
    text : str
        Usually a word with its leading space, e.g. ``" Mary"``.

    Returns
    -------
    bool
    """
    return len(_encode(tokenizer, text)) == 1


def n_tokens(tokenizer: Any, text: str) -> int:
    """Return the number of tokens `text` encodes to (no special tokens).

    Parameters
    ----------
    tokenizer : tokenizer
        A Hugging Face tokenizer or a ``tokenizers`` tokenizer.
    text : str
        Any text.

    Returns
    -------
    int
    """
    return len(_encode(tokenizer, text))


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

    def __post_init__(self) -> None:
        examples = tuple(self.examples)
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
            e if isinstance(e, Example) else _example_from_record(e, None) for e in examples
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
        ``"meta"`` dict is kept. Blank lines are skipped.

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
            On a missing or empty file, invalid JSON or a missing key (naming the line).
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TaskError(
                f"cannot read task file {path}: {exc.strerror}; check the path"
            ) from exc
        examples = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(
                    f"{path}: line {number} is not valid JSON ({exc.msg}); write one JSON "
                    "object per line"
                ) from None
            examples.append(_example_from_record(record, number, path))
        if not examples:
            raise TaskError(
                f"{path} is empty: write one JSON object per line with keys "
                "clean, corrupt, answers, wrong"
            )
        return cls(name or path.stem, tuple(examples), metric, description)

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """Write the examples to a JSONL file that `from_jsonl` reads back unchanged.

        Parameters
        ----------
        path : path-like
            Output file (overwritten).
        """
        with open(path, "w", encoding="utf-8") as out:
            for example in self.examples:
                out.write(json.dumps(example.to_dict(), ensure_ascii=False) + "\n")

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
        TaskError
            If either part would be empty.
        """
        total = len(self.examples)
        if isinstance(n_or_fraction, float) and 0 < n_or_fraction < 1:
            n = round(total * n_or_fraction)
        else:
            n = int(n_or_fraction)
        if not 0 < n < total:
            raise TaskError(
                f"cannot split {total} examples of task {self.name!r} at {n_or_fraction!r}: "
                f"give a count between 1 and {total - 1} or a fraction between 0 and 1"
            )
        order = list(range(total))
        random.Random(seed).shuffle(order)
        first = tuple(self.examples[i] for i in order[:n])
        second = tuple(self.examples[i] for i in order[n:])
        return (
            Task(f"{self.name}/discovery", first, self.metric, self.description,
                 self.reference_model),
            Task(f"{self.name}/heldout", second, self.metric, self.description,
                 self.reference_model),
        )

    def batches(
        self, tokenizer: Any, batch_size: int = 32, device: torch.device | str = "cpu"
    ) -> list[Batch]:
        """Tokenize, check and group the examples into batches of one token length each.

        Examples are bucketed by token length (shortest first), keeping their order within a
        bucket; each bucket is cut into batches of at most `batch_size`. No special tokens are
        added.

        Parameters
        ----------
        tokenizer : tokenizer
            A Hugging Face tokenizer (``model.tokenizer``) or a ``tokenizers`` tokenizer.
        batch_size : int
            Largest number of examples in a batch.
        device : torch.device or str
            Where the tensors are put.

        Returns
        -------
        list of Batch

        Raises
        ------
        TaskError
            If a clean and corrupted prompt differ in token length, or an answer or wrong
            token is not a single token for this tokenizer.
        """
        if batch_size < 1:
            raise OptionError(f"batch_size must be at least 1, got {batch_size}")
        buckets: dict[int, list[tuple[list[int], list[int], list[int], list[int]]]] = {}
        for example in self.examples:
            row = _tokenize_example(tokenizer, example)
            buckets.setdefault(len(row[0]), []).append(row)
        batches = []
        for length in sorted(buckets):
            rows = buckets[length]
            for start in range(0, len(rows), batch_size):
                batches.append(_to_batch(rows[start : start + batch_size], device))
        return batches


def _example_from_record(
    record: Any, line: int | None, path: Path | None = None
) -> Example:
    """Turn one JSON record into an `Example`, raising `TaskError` that names the line."""
    where = f"{path}: line {line}" if line is not None else "example"
    if not isinstance(record, Mapping):
        raise TaskError(
            f"{where} is a {type(record).__name__}, not a JSON object; write "
            '{"clean": ..., "corrupt": ..., "answers": [...], "wrong": [...]}'
        )
    answers = record.get("answers", record.get("answer"))
    wrong = record.get("wrong", record.get("wrongs", ()))
    missing = [key for key in ("clean", "corrupt") if key not in record]
    if answers is None:
        missing.append("answers")
    if missing:
        raise TaskError(f"{where} is missing key(s) {', '.join(missing)}: add them to the line")
    meta = record.get("meta") or {}
    if not isinstance(meta, Mapping):
        raise TaskError(f"{where}: 'meta' must be a JSON object")
    try:
        return Example(record["clean"], record["corrupt"], answers, wrong, dict(meta), line)
    except TaskError as exc:
        raise TaskError(f"{where}: {exc}") from None


def _tokenize_example(
    tokenizer: Any, example: Example
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids of one example's clean, corrupt, answers and wrong, after checking them."""
    clean = _encode(tokenizer, example.clean)
    corrupt = _encode(tokenizer, example.corrupt)
    if len(clean) != len(corrupt):
        raise TaskError(
            f"{example.where()}: clean has {len(clean)} tokens but corrupt has {len(corrupt)}; "
            "make the corrupted prompt the same token length for this tokenizer"
        )
    if not clean:
        raise TaskError(f"{example.where()}: the clean prompt is empty; give a prompt")
    ids: dict[str, list[int]] = {"answers": [], "wrong": []}
    for kind in ("answers", "wrong"):
        for text in getattr(example, kind):
            token = _encode(tokenizer, text)
            if len(token) != 1:
                raise TaskError(
                    f"{example.where()}: {kind} {text!r} is {len(token)} tokens for this "
                    "tokenizer, not one; use a single-token word (often with a leading space)"
                )
            ids[kind].append(token[0])
    return clean, corrupt, ids["answers"], ids["wrong"]


def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Stack ragged id lists into ``[batch, n]`` padded with -1."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def _to_batch(
    rows: list[tuple[list[int], list[int], list[int], list[int]]], device: torch.device | str
) -> Batch:
    """Build one `Batch` from tokenized rows of equal length."""
    clean = torch.tensor([r[0] for r in rows], dtype=torch.long, device=device)  # [batch, pos]
    corrupt = torch.tensor([r[1] for r in rows], dtype=torch.long, device=device)
    answers = _pad([r[2] for r in rows]).to(device)  # [batch, n]
    wrong = _pad([r[3] for r in rows]).to(device)
    return Batch(clean, corrupt, answers, wrong)


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
    "planted-induction": "circuits.tasks.planted",
    "planted-ioi": "circuits.tasks.planted",
    "planted-mlp": "circuits.tasks.planted",
}
_REGISTRY: dict[str, TaskSpec] = {}


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
        If the name is unknown.

    Examples
    --------
    >>> task = get_task("ioi", n=4, seed=1)
    >>> task.name, len(task), task.reference_model
    ('ioi', 4, 'ioi-gpt2-4l')
    """
    spec = _spec(name)
    if n is not None and n < 1:
        raise OptionError(f"n must be at least 1, got {n}")
    return spec.build(tokenizer, spec.default_n if n is None else n, seed)


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
