"""Tasks: a behavior as clean/corrupted prompt pairs with answer tokens and a metric.

A `Task` is plain data (strings), independent of any model; `Task.batches` tokenizes it for
one tokenizer, checks it, and groups it into `Batch` objects of one token length each. The
built-in tasks (``ioi``, ``induction``, ``factual``) are defined with this same API in the
``circuits.tasks`` package and are found by name through `get_task`.
"""

from __future__ import annotations

import importlib
import json
import numbers
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
        The same prompt with the behavior removed; must differ from the clean prompt and have
        its token length.
    answers : tuple of str
        Tokens that show the behavior (each a single token, e.g. ``" Mary"``).
    wrong : tuple of str
        Tokens the behavior argues against (each a single token, none of them an answer).
    meta : mapping
        Free-form extra data (e.g. the subject string of a factual prompt). Not compared.
    line : int or None
        Source line in a JSONL file, used in error messages. Not compared.
    file : str or None
        The JSONL file, used in error messages. Not compared.

    Raises
    ------
    TaskError
        A field has the wrong type or is not valid Unicode, there is no answer, a token is both
        an answer and a wrong answer, or the two prompts are the same.
    """

    clean: str
    corrupt: str
    answers: tuple[str, ...]
    wrong: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    line: int | None = field(default=None, compare=False)
    file: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        where = self.where()
        for name in ("clean", "corrupt"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TaskError(f"{where}: {name} must be a string, got {_show(value)}; write "
                                f'e.g. "{name}": "When Mary and John went to the store"')
            _check_unicode(where, name, value)
            if not value.strip():
                raise TaskError(f"{where}: the {name} prompt is empty; give a prompt")
        for name in ("answers", "wrong"):
            object.__setattr__(self, name, _strings(where, name, getattr(self, name)))
        if not self.answers:
            raise TaskError(f"{where}: no answers; give at least one answer token")
        both = [text for text in self.answers if text in self.wrong]
        if both:
            raise TaskError(f"{where}: {both[0]!r} is both an answer and a wrong answer, so the "
                            "metric cannot tell them apart; remove it from one of the lists")
        if self.clean == self.corrupt:
            raise TaskError(f"{where}: the clean and corrupted prompts are the same, so patching "
                            "changes nothing and faithfulness is 0/0; change the corrupted prompt")
        if not isinstance(self.meta, Mapping):
            raise TaskError(f"{where}: meta must be a mapping (a JSON object), got "
                            f"{_show(self.meta)}")

    def where(self) -> str:
        """Say where the example came from, for error messages."""
        if self.line is None:
            return f"example {_short(self.clean)}"
        return f"line {self.line}" if self.file is None else f"{self.file}: line {self.line}"

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


def _show(value: Any) -> str:
    """``5 (a number)``: a value and its JSON kind, cut short, for error messages."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "an object", type(None): "null"}
    kind = kinds.get(type(value), f"a {type(value).__name__}")
    return f"{_short(value)} ({kind})"


def _short(value: Any, width: int = 40) -> str:
    """The repr of `value`, cut to about `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_unicode(where: str, name: str, text: str) -> None:
    """Refuse text that cannot be written as UTF-8 (an unpaired surrogate from a bad escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TaskError(f"{where}: {name} holds {text[exc.start]!r}, half of a surrogate pair, "
                        "which is not a character; fix the \\u escape") from None


def _strings(where: str, name: str, value: Any) -> tuple[str, ...]:
    """A single string or a list of strings as a tuple, else a `TaskError`."""
    if isinstance(value, str):
        value = (value,)
    elif isinstance(value, (Mapping, bytes, bytearray)) or not isinstance(value, Iterable):
        raise TaskError(f"{where}: {name} must be a string or a list of strings, got "
                        f'{_show(value)}; write e.g. "{name}": [" Mary"]')
    value = tuple(value)
    for text in value:
        if not isinstance(text, str):
            raise TaskError(f"{where}: {name} must be strings, but one is {_show(text)}; write "
                            f'e.g. "{name}": [" Mary"]')
        _check_unicode(where, name, text)
    return value


def _encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    """Token ids of `text`, without special tokens unless `special` (HF tokenizers and
    `tokenizers` objects)."""
    out = tokenizer.encode(text, add_special_tokens=special)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def prefix_ids(tokenizer: Any, bos: bool | None = None) -> list[int]:
    """The token ids put before every prompt: by default what the tokenizer itself adds before
    a text (a BOS token for Llama and Gemma, nothing for GPT-2).

    The tokenizer's convention is read off one text encoded with and without its special
    tokens: what comes before the text's own tokens. Tokens it adds after a text (an EOS) are
    never used.

    Parameters
    ----------
    tokenizer : tokenizer
        A Hugging Face tokenizer or a ``tokenizers`` tokenizer.
    bos : bool or None
        None: the tokenizer's convention; False: nothing; True: the tokenizer's BOS token.

    Returns
    -------
    list of int

    Raises
    ------
    OptionError
        `bos` is True and the tokenizer has no BOS token, or `bos` is not a bool or None.

    Examples
    --------
    >>> from circuits import load_model
    >>> tok = load_model("ioi-gpt2-4l").tokenizer
    >>> prefix_ids(tok), prefix_ids(tok, bos=True), tok.bos_token_id
    ([], [0], 0)
    """
    if bos is False:
        return []
    if bos is True:
        token = getattr(tokenizer, "bos_token_id", None)
        if not isinstance(token, int):
            raise OptionError("bos=True (--bos) asks for the tokenizer's BOS token, but this "
                              "tokenizer has none; drop it")
        return [token]
    if bos is not None:
        raise OptionError(f"bos must be True, False or None (the tokenizer's convention), got "
                          f"{_show(bos)}")
    probe = "Hello world"
    plain, full = _encode(tokenizer, probe), _encode(tokenizer, probe, special=True)
    for start in range(len(full) - len(plain) + 1 if plain else 0):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    # the text is split otherwise after the special tokens: keep the leading special ones
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    lead = []
    for token in full:
        if token not in special:
            break
        lead.append(token)
    return lead


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
            raise TaskError(f"the task name must be a string, got {_show(self.name)}")
        if self.bos is not None and not isinstance(self.bos, bool):
            raise OptionError(f"bos must be True, False or None (the tokenizer's convention), "
                              f"got {_show(self.bos)}")
        examples = _items(f"task {self.name!r}", self.examples)
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
            e if isinstance(e, Example) else _example_from_record(e, f"examples[{i}]")
            for i, e in enumerate(_items("from_examples", examples))
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
        text, path = _read_text(path)
        examples = []
        # Only "\n" ends a line: str.splitlines() would also split inside a JSON string at
        # characters such as U+2028 or U+0085, which `to_jsonl` writes unescaped.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(
                    f"{path}: line {number} is not valid JSON ({exc.msg}); write one JSON "
                    "object per line"
                ) from None
            except ValueError as exc:  # e.g. an integer of more than 4300 digits
                raise TaskError(f"{path}: line {number} is not valid JSON ({exc}); write one "
                                "JSON object per line") from None
            except RecursionError:
                raise TaskError(f"{path}: line {number} nests JSON lists or objects too deeply; "
                                "write one flat JSON object per line") from None
            examples.append(
                _example_from_record(record, f"{path}: line {number}", number, str(path))
            )
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

        Raises
        ------
        TaskError
            If an example's ``meta`` holds a value JSON cannot write, or the file cannot be
            written (nothing is written then).
        """
        lines = []
        for example in self.examples:
            try:
                lines.append(json.dumps(example.to_dict(), ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as exc:
                raise TaskError(f"{example.where()}: meta cannot be written as JSON ({exc}); keep "
                                "meta to strings, numbers, lists and dicts") from None
        try:
            with open(path, "w", encoding="utf-8") as out:
                out.writelines(lines)
        except OSError as exc:
            raise TaskError(f"cannot write task file {path}: {exc.strerror or exc}; check that "
                            "its folder exists and is writable") from None

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
                              f"got {_show(value)}")
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
                              f"{_show(batch_size)}")
        if max_length is not None and (not _whole(max_length) or max_length < 1):
            raise OptionError(f"max_length must be a whole number of at least 1 or None, got "
                              f"{_show(max_length)}")
        unknown = _unknown_token(tokenizer)
        prefix = prefix_ids(tokenizer, self.bos)
        buckets: dict[int, list[tuple[list[int], list[int], list[int], list[int]]]] = {}
        for example in self.examples:
            row = _tokenize_example(tokenizer, example, max_length, unknown, prefix)
            buckets.setdefault(len(row[0]), []).append(row)
        batches = []
        for length in sorted(buckets):
            rows = buckets[length]
            for start in range(0, len(rows), batch_size):
                batches.append(_to_batch(rows[start : start + batch_size], device))
        return batches


def _read_text(path: Any) -> tuple[str, Path]:
    """The text of a task file and its `Path`, or a `TaskError` saying why it cannot be read."""
    if not isinstance(path, (str, os.PathLike)):
        raise TaskError(f"a task file must be a path, got {_show(path)}; pass e.g. 'task.jsonl'")
    path = Path(path)
    if path.is_dir():
        raise TaskError(f"{path} is a directory; pass a JSONL file, one JSON object per line")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TaskError(
            f"cannot read task file {path}: {exc.strerror or exc}; check the path"
        ) from None
    except ValueError as exc:  # e.g. a NUL character in the path
        raise TaskError(f"cannot read task file {path!r}: {exc}; check the path") from None
    try:
        return data.decode("utf-8-sig"), path
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TaskError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it "
            "as UTF-8 JSONL, one JSON object per line"
        ) from None


def _items(what: str, items: Any) -> tuple[Any, ...]:
    """A tuple of the items of a list-like, or a `TaskError` for anything else."""
    if isinstance(items, (str, bytes, Mapping, Example)) or not isinstance(items, Iterable):
        raise TaskError(f"{what}: examples must be a list of Example objects or dicts, got "
                        f"{_show(items)}; wrap a single example in a list")
    return tuple(items)


def _example_from_record(
    record: Any, where: str, line: int | None = None, file: str | None = None
) -> Example:
    """Turn one JSON record into an `Example`; errors name `where` (file and line)."""
    if not isinstance(record, Mapping):
        raise TaskError(
            f"{where} is {_show(record)}, not a JSON object; write "
            '{"clean": ..., "corrupt": ..., "answers": [...], "wrong": [...]}'
        )
    missing = [key for key in ("clean", "corrupt") if key not in record]
    if "answers" not in record and "answer" not in record:
        missing.append("answers")
    if missing:
        raise TaskError(f"{where} is missing key(s) {', '.join(missing)}: add them to the line")
    answers = record["answers"] if "answers" in record else record["answer"]
    wrong = record.get("wrong", record.get("wrongs", ()))
    meta = record.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TaskError(f"{where}: meta must be a JSON object, got {_show(meta)}")
    return Example(record["clean"], record["corrupt"], answers, wrong, dict(meta), line, file)


def _unknown_token(tokenizer: Any) -> tuple[int, str] | None:
    """The id and text of the tokenizer's unknown token, or None when it has none."""
    token_id = getattr(tokenizer, "unk_token_id", None)  # transformers tokenizers
    if isinstance(token_id, int):
        return token_id, str(tokenizer.unk_token)
    text = getattr(getattr(tokenizer, "model", None), "unk_token", None)  # `tokenizers` ones
    to_id = getattr(tokenizer, "token_to_id", None)
    if isinstance(text, str) and text and callable(to_id):
        token_id = to_id(text)
        if isinstance(token_id, int):
            return token_id, text
    return None


def _tokenize_example(
    tokenizer: Any,
    example: Example,
    max_length: int | None = None,
    unknown: tuple[int, str] | None = None,
    prefix: list[int] | None = None,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids of one example's clean and corrupt (each after `prefix`), answers and wrong,
    after checking them."""
    where = example.where()
    clean = _encode(tokenizer, example.clean)
    corrupt = _encode(tokenizer, example.corrupt)
    if len(clean) != len(corrupt):
        raise TaskError(
            f"{where}: clean has {len(clean)} tokens but corrupt has {len(corrupt)}; "
            "make the corrupted prompt the same token length for this tokenizer"
        )
    if not clean:
        raise TaskError(f"{where}: the prompts are no tokens for this tokenizer; give a prompt")
    prefix = prefix or []
    clean, corrupt = prefix + clean, prefix + corrupt
    if max_length is not None and len(clean) > max_length:
        lead = f", {len(prefix)} of them put before the prompt (the BOS)" if prefix else ""
        raise TaskError(
            f"{where}: the prompts are {len(clean)} tokens{lead} but the model reads at most "
            f"{max_length} (its context length); shorten the prompts or drop the example"
        )
    if clean == corrupt:
        raise TaskError(
            f"{where}: the clean and corrupted prompts are the same tokens for this tokenizer "
            "(unknown words?), so patching changes nothing; change the corrupted prompt"
        )
    ids: dict[str, list[int]] = {"answers": [], "wrong": []}
    for kind in ("answers", "wrong"):
        for text in getattr(example, kind):
            token = _encode(tokenizer, text)
            if len(token) != 1:
                raise TaskError(
                    f"{where}: {kind} {text!r} is {len(token)} tokens for this "
                    "tokenizer, not one; use a single-token word (often with a leading space)"
                )
            if unknown is not None and token[0] == unknown[0] and text.strip() != unknown[1]:
                raise TaskError(
                    f"{where}: {kind} {text!r} is not in this tokenizer's vocabulary (it becomes "
                    f"the unknown token {unknown[1]!r}); use a word the model knows"
                )
            ids[kind].append(token[0])
    both = set(ids["answers"]) & set(ids["wrong"])
    if both:
        token = both.pop()
        answer = example.answers[ids["answers"].index(token)]
        wrong = example.wrong[ids["wrong"].index(token)]
        raise TaskError(
            f"{where}: answer {answer!r} and wrong answer {wrong!r} are the same token for this "
            "tokenizer, so the metric cannot tell them apart; remove one of them"
        )
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
        raise OptionError(f"a task name must be a string, got {_show(name)}; see `circuits tasks`")
    spec = _spec(name)
    if n is not None:
        if not _whole(n) or n < 1:
            raise OptionError(f"n must be a whole number of prompts of at least 1, got {_show(n)}")
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
        raise OptionError(f"seed must be a whole number from 0 to {2**32 - 1}, got {_show(seed)}")


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
