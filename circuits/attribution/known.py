"""The tokens a behavior is known to rest on, and whether an attribution finds them.

On the built-in tasks the answer says which context token the model must use: the indirect
object's name in IOI, the token after the earlier occurrence of the current token in induction
(the one an induction head attends to and copies), the subject in factual recall. A user's task
names its own with ``"meta": {"known": ...}`` on each example (token positions or a substring of
the clean prompt), or none. A method *finds* the known token when its highest-scored context
token (every position but the last: every next-token prediction reads its own position, so
naming it says nothing about which earlier token the model used) is a known one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..batch import Batch
from ..errors import OptionError
from ..task import Example, Task, _encode, prefix_ids


def _ioi_known(clean: list[int], answers: list[int], example: Example, tokenizer: Any) -> list[int]:
    """The indirect object's position: where the answer (the IO name) stands in the prompt."""
    return [i for i, t in enumerate(clean[:-1]) if t == answers[0]]


def _induction_known(clean: list[int], answers: list[int], example: Example,
                     tokenizer: Any) -> list[int]:
    """The token after the earlier occurrence of the last token: the one an induction head
    attends to from the last position and copies into the logits (its identity is the answer;
    the earlier occurrence itself only marks where it is, through a previous-token head)."""
    last = len(clean) - 1
    return [i + 1 for i in range(last - 1) if clean[i] == clean[last]]


def _factual_known(clean: list[int], answers: list[int], example: Example,
                   tokenizer: Any) -> list[int]:
    """The subject's tokens (``meta["subject"]``)."""
    subject = example.meta.get("subject")
    return _span(example.clean, subject, tokenizer) if isinstance(subject, str) else []


#: built-in task name -> rule giving the known positions of one example
KNOWN_RULES: dict[str, Callable[[list[int], list[int], Example, Any], list[int]]] = {
    "ioi": _ioi_known,
    "induction": _induction_known,
    "factual": _factual_known,
}


def _span(text: str, part: str, tokenizer: Any) -> list[int]:
    """Token positions of `text` that hold the substring `part` (its first occurrence): from
    the token after ``text[:start]`` (trailing space dropped, since tokenizers glue a leading
    space to the next word) to the last token of ``text[:end]``."""
    start = text.find(part)
    if not part or start < 0:
        return []
    first = len(_encode(tokenizer, text[:start].rstrip(" "))) if text[:start].strip() else 0
    return list(range(first, len(_encode(tokenizer, text[: start + len(part)]))))


def _given_known(value: Any, example: Example, tokenizer: Any, length: int) -> list[int]:
    """Positions from a user's ``meta["known"]``: a position, a list of positions (negative ones
    count from the end) or a substring of the clean prompt."""
    if isinstance(value, str):
        found = _span(example.clean, value, tokenizer)
        if not found:
            raise OptionError(f"{example.where()}: meta['known'] {value!r} is not in the clean "
                              "prompt; give a substring of it or token positions")
        return found
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items) or any(
            not -length <= i < length for i in items):
        raise OptionError(f"{example.where()}: meta['known'] must be a substring of the clean "
                          f"prompt or token positions from {-length} to {length - 1}, got "
                          f"{value!r}")
    return [i % length for i in items]


def known_mask(task: Task, tokenizer: Any, batch: Batch) -> Tensor | None:
    """Which tokens of each clean prompt the behavior is known to rest on.

    An example's ``meta["known"]`` (a token position, a list of them, or a substring of the
    clean prompt) comes first. Otherwise the built-in tasks have rules: for ``ioi`` the
    indirect object's name; for ``induction`` the token after the earlier occurrence of the
    last token (the one the induction head attends to and copies: the answer); for
    ``factual`` the subject's tokens (``meta["subject"]``).

    Parameters
    ----------
    task : Task
        The task the batch was made from (`Task.batches`, with its ``bos``); rows are matched
        to its examples by their token ids, and positions count the prefix put before each
        prompt (its BOS).
    tokenizer : tokenizer
        The tokenizer the batch was made with.
    batch : Batch
        ``[b, p]`` prompts.

    Returns
    -------
    Tensor or None
        ``[b, p]`` bool (a row of False where nothing is known for that prompt), or None when
        nothing is known for any prompt of the batch.

    Examples
    --------
    >>> from circuits.task import Example, Task
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> words = ["when", "Mary", "and", "John", "left", "Tom", "gave", "it", "to"]
    >>> tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "to"))
    >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> ex = Example("when Mary and John left John gave it to",
    ...              "when Mary and John left Tom gave it to", " Mary", " John")
    >>> batch = Task("ioi", [ex]).batches(tok)[0]
    >>> known_mask(Task("ioi", [ex]), tok, batch).nonzero().tolist()
    [[0, 1]]
    """
    rule = KNOWN_RULES.get(task.name.split("/", 1)[0])
    # rows start with what the task puts before every prompt (its BOS); the rules and meta
    # positions speak of the prompt's own tokens, after it
    prefix = prefix_ids(tokenizer, task.bos)
    by_ids: dict[tuple[int, ...], Example] = {}
    for example in task.examples:
        by_ids.setdefault(tuple(prefix + _encode(tokenizer, example.clean)), example)
    mask = torch.zeros(batch.clean.shape, dtype=torch.bool)  # [b, p]
    for row, ids in enumerate(batch.clean.tolist()):
        example = by_ids.get(tuple(ids))
        if example is None:
            continue
        own = ids[len(prefix):]
        if "known" in example.meta:
            found = _given_known(example.meta["known"], example, tokenizer, len(own))
        elif rule is not None:
            answers = [a for a in batch.answers[row].tolist() if a >= 0]
            found = rule(own, answers, example, tokenizer)
        else:
            continue
        mask[row, [len(prefix) + i for i in found if 0 <= i < len(own)]] = True
    return mask if bool(mask.any()) else None


def known_masks(task: Task, tokenizer: Any, batches: Sequence[Batch],
                batch_size: int) -> Iterator[Tensor | None]:
    """`known_mask` of each of `batches`, made by ``task.batches(tokenizer, batch_size)``,
    matching each batch against the examples it was made from only.

    `known_mask` matches a batch's rows against every example of the task, which costs the
    task's length per batch: over a whole task, the square of it. `Task.batches` groups the
    examples by token length (shortest first, in order within a length) and cuts each group
    into batches of `batch_size`, so the same grouping gives each batch its examples: the work
    grows with the number of prompts. Batches that do not follow that grouping are matched
    against the whole task.

    Examples
    --------
    >>> from circuits.task import Example, Task
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> words = ["when", "Mary", "and", "John", "left", "Tom", "gave", "it", "to"]
    >>> tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "to"))
    >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> ex = Example("when Mary and John left John gave it to",
    ...              "when Mary and John left Tom gave it to", " Mary", " John")
    >>> task = Task("ioi", [ex, ex])
    >>> [m.nonzero().tolist() for m in known_masks(task, tok, task.batches(tok, 1), 1)]
    [[[0, 1]], [[0, 1]]]
    """
    groups: dict[int, list[Example]] = {}
    for example in task.examples:
        groups.setdefault(len(_encode(tokenizer, example.clean)), []).append(example)
    parts = [group[lo:lo + batch_size] for _, group in sorted(groups.items())
             for lo in range(0, len(group), batch_size)]
    follows = [len(part) for part in parts] == [batch.size for batch in batches]
    for n, batch in enumerate(batches):
        yield known_mask(replace(task, examples=tuple(parts[n])) if follows else task,
                         tokenizer, batch)


def known_token_accuracy(scores: Tensor, known: Tensor) -> Tensor:
    """Whether each prompt's highest-scored context token is a known token.

    Parameters
    ----------
    scores : Tensor
        ``[b, p]`` attributions (positive pushes the metric up).
    known : Tensor
        ``[b, p]`` bool, from `known_mask`.

    Returns
    -------
    Tensor
        ``[b]`` 1.0 (found), 0.0 (missed), or NaN where the prompt has no known context token.
        The last position is not a candidate; ties go to the earliest position.

    Examples
    --------
    >>> import torch
    >>> known = torch.tensor([[False, True, False, False], [True, False, False, False]])
    >>> known_token_accuracy(torch.tensor([[0.1, 0.9, 0.2, 5.0], [0.0, 0.3, 0.1, 0.0]]), known)
    tensor([1., 0.])
    """
    context = scores[:, :-1].float()  # [b, p-1]
    top = context.argmax(-1)  # [b]; argmax returns the first of equal maxima
    hit = known[:, :-1].gather(1, top[:, None].to(known.device))[:, 0].float()
    return hit.masked_fill(~known[:, :-1].any(-1), float("nan"))
