"""Where a prompt's subject is: its token positions, from ``meta["subject"]`` or a task's rule.

Causal tracing noises the subject's tokens. A user's prompt names its subject in
``example.meta["subject"]`` (a part of the clean prompt); a built-in task whose module defines
``subject_positions(example, tokenizer)`` gives the rule for prompts without one (the factual
task reads the subject off its templates).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import TaskError
from ..task import Example, list_tasks, n_tokens, prefix_ids

SubjectRule = Callable[[Example, Any], Sequence[int]]


def subject_tokens(example: Example, tokenizer: Any, rule: SubjectRule | None = None,
                   bos: bool | None = None) -> list[int]:
    """The token positions of an example's subject in its clean prompt, as `Task.batches`
    tokenizes it (after ``prefix_ids(tokenizer, bos)``, the tokenizer's BOS by default).

    ``example.meta["subject"]`` is found in the clean prompt (its first occurrence) and every
    token that covers a non-space character of it is a subject token; without it, `rule`
    decides (in the prompt's own positions, before the prefix).

    Parameters
    ----------
    example : Example
    tokenizer : tokenizer
        A Hugging Face tokenizer or a ``tokenizers`` tokenizer.
    rule : callable, optional
        ``rule(example, tokenizer) -> positions`` for examples without ``meta["subject"]``.
    bos : bool or None
        The task's ``bos`` (`Task.bos`): what goes before the prompt, shifting every position.

    Returns
    -------
    list of int
        Consecutive positions.

    Raises
    ------
    TaskError
        No subject given and no rule, a subject that is not in the prompt, or no positions.

    Examples
    --------
    >>> from circuits import load_model
    >>> tok = load_model("factual-gpt2-4l").tokenizer
    >>> subject_tokens(Example("The athlete Roger Federer plays", "The athlete Rafael Nadal plays",
    ...                        " tennis", meta={"subject": "Roger Federer"}), tok)
    [2, 3]
    """
    subject = example.meta.get("subject")
    if subject is None:
        if rule is None:
            raise TaskError(f"{example.where()}: no subject to noise; give it as \"meta\": "
                            "{\"subject\": \"...\"} (a part of the clean prompt)")
        positions = sorted(int(i) for i in rule(example, tokenizer))
    else:
        if not isinstance(subject, str) or not subject.strip() or subject not in example.clean:
            raise TaskError(f"{example.where()}: meta subject {subject!r} is not a part of the "
                            f"clean prompt {example.clean!r}; give the subject as it is written "
                            "there")
        start = example.clean.index(subject)
        positions = _covering(tokenizer, example.clean, start, start + len(subject))
    if not positions:
        raise TaskError(f"{example.where()}: the subject is no tokens of the clean prompt; give a "
                        "subject of at least one word")
    shift = len(prefix_ids(tokenizer, bos))
    return [i + shift for i in positions]


def _covering(tokenizer: Any, text: str, start: int, end: int) -> list[int]:
    """Positions of the tokens of `text` that cover a non-space character of ``[start, end)``."""
    offsets = _offsets(tokenizer, text)
    if offsets is None:  # no offsets: count the tokens of the text before and up to the span
        first = n_tokens(tokenizer, text[:start].rstrip(" ")) if text[:start].strip() else 0
        return list(range(first, n_tokens(tokenizer, text[:end])))
    return [i for i, (a, b) in enumerate(offsets)
            if text[max(a, start):min(b, end)].strip()]


def _offsets(tokenizer: Any, text: str) -> list[tuple[int, int]] | None:
    """Character spans of the tokens of `text` (no special tokens), or None when unknown."""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    if hasattr(encoded, "offsets"):  # a `tokenizers` tokenizer
        return [tuple(span) for span in encoded.offsets]
    try:
        spans = tokenizer(text, add_special_tokens=False,
                          return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        return None
    return [tuple(span) for span in spans] if len(spans) == len(encoded) else None


def task_rule(name: str) -> SubjectRule | None:
    """The subject rule of built-in task `name`: its module's ``subject_positions``, if any."""
    base = name.split("/")[0]
    if base not in {task for task, _ in list_tasks()}:
        return None
    try:
        module = importlib.import_module(f"circuits.tasks.{base}")
    except ModuleNotFoundError:
        return None
    return getattr(module, "subject_positions", None)
