"""Counterfactual edits of the factual-recall task's facts, and the editing papers' scores:
efficacy (the new target beats the old on the edit prompt) and neighbourhood specificity
(other subjects of the relation keep their answer).

`factual_context` gives an edit written with one of the factual task's templates its
paraphrases (the relation's other templates) and neighbours (other subjects of the relation),
as CounterFact pairs each fact with such prompts."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from circuits.editing.edits import Edit, target_ids
from circuits.model import Model
from circuits.tasks.factual import RELATIONS, facts

__all__ = ["FactEdit", "factual_edits", "factual_context", "efficacy", "neighbourhood",
           "top_tokens"]


@dataclass(frozen=True)
class FactEdit:
    """An edit of a known fact: `edit` replaces `old`; `neighbours` are prompts about other
    subjects of the same relation (their answers should stay); `paraphrases` say the edit's
    prompt in other words (they should give the new target too).

    `old` is None when it is not known: evaluation then takes the model's prediction before
    the edit (`circuits.editing.evaluate`).
    """

    edit: Edit
    old: str | None
    neighbours: tuple[str, ...]
    paraphrases: tuple[str, ...] = ()


def factual_edits(tokenizer: Any, n: int, seed: int = 0, n_neighbours: int = 10
                  ) -> list[FactEdit]:
    """`n` counterfactual edits of distinct facts of the factual task (`circuits.tasks.factual`),
    each new target another object of the same relation, chosen with a seeded
    ``random.Random`` among the objects at least three subjects share (as CounterFact draws
    common objects: an object one subject has may be stored with that subject's tokens and
    not be reachable through another subject's representation).

    Examples
    --------
    >>> from circuits import load_model
    >>> e = factual_edits(load_model("factual-gpt2-4l").tokenizer, 3)
    >>> len(e), all(f.edit.target != f.old for f in e)
    (3, True)
    """
    rng = random.Random(seed)
    usable = facts(tokenizer)
    chosen = rng.sample(usable, min(n, len(usable)))
    out = []
    for relation, subject, obj, _ in chosen:
        template, *others_t = RELATIONS[relation][0]
        same = [f for f in usable if f[0] == relation and f[1] != subject]
        counts = Counter(f[2] for f in usable if f[0] == relation)
        common = sorted(o for o, c in counts.items() if c >= 3 and o != obj)
        target = rng.choice(common or sorted(o for o in counts if o != obj))
        others = rng.sample(same, min(n_neighbours, len(same)))
        out.append(FactEdit(Edit(subject, template.format(s=subject), target), obj,
                            tuple(template.format(s=f[1]) for f in others),
                            tuple(t.format(s=subject) for t in others_t)))
    return out


def factual_context(tokenizer: Any, edit: Edit, n_neighbours: int = 10, seed: int = 0,
                    exclude: Collection[str] = ()) -> FactEdit | None:
    """The paraphrases and neighbours of an edit whose prompt is one of the factual task's
    templates written with the edit's subject, else None.

    The paraphrases are the relation's other templates with the subject; the neighbours are
    up to `n_neighbours` other subjects of the relation (drawn with a seeded
    ``random.Random`` among the facts usable with `tokenizer`, leaving out the subjects in
    `exclude`, e.g. those of other edits) in the edit's own template.
    `old` is the fact's object when the task knows the subject for this relation, else None.

    Examples
    --------
    >>> f = factual_context(None, Edit("Big Ben", "The landmark Big Ben is located in the city "
    ...                                "of", "Rome"), n_neighbours=2)
    >>> f.old, f.paraphrases, len(f.neighbours)
    ('London', ('Tourists who visit Big Ben are staying in the city of',), 2)
    >>> factual_context(None, Edit("Big Ben", "Big Ben is in", "Rome")) is None
    True
    """
    for relation, (templates, table) in RELATIONS.items():
        for template in templates:
            if template.format(s=edit.subject) != edit.prompt:
                continue
            same = sorted(f[1] for f in facts(tokenizer)
                          if f[0] == relation and f[1] != edit.subject
                          and f[1] not in exclude)
            others = random.Random(seed).sample(same, min(n_neighbours, len(same)))
            return FactEdit(edit, table.get(edit.subject),
                            tuple(template.format(s=s) for s in others),
                            tuple(t.format(s=edit.subject) for t in templates if t != template))
    return None


def top_tokens(model: Model, prompts: Sequence[str]) -> list[int]:
    """The most likely next token after each prompt."""
    with torch.no_grad():
        return [int(model.hf(model.tokenize([p])).logits[0, -1].argmax()) for p in prompts]


def efficacy(model: Model, fact: FactEdit) -> bool:
    """Whether the new target's first token beats the old one's after the edit prompt (`fact`
    must name its old target; `circuits.editing.evaluate.Evaluator` also takes edits without).

    Examples
    --------
    >>> from circuits import load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> efficacy(model, factual_edits(model.tokenizer, 1)[0])  # before any edit
    False
    """
    new = target_ids(model, fact.edit)[0]
    old = target_ids(model, Edit(fact.edit.subject, fact.edit.prompt, fact.old))[0]
    with torch.no_grad():
        logits = model.hf(model.tokenize([fact.edit.prompt])).logits[0, -1]
    return bool(logits[new] > logits[old])


def neighbourhood(model: Model, fact: FactEdit, before: Sequence[int]) -> float:
    """The fraction of the neighbour prompts whose top token is still `before` (their top
    tokens before the edit, `top_tokens`)."""
    after = top_tokens(model, fact.neighbours)
    return sum(a == b for a, b in zip(after, before, strict=True)) / max(len(before), 1)
