"""Indirect object identification (IOI), built with the public `Task` API.

"When Mary and John went to the store, John gave a drink to" -> " Mary". Two names are
introduced; one of them (the subject, S) is mentioned again; the model must name the other one
(the indirect object, IO). Answer = IO, wrong = S.

Expected mechanism (as in Wang et al., 2022): heads at the second mention of S detect that it
is a duplicate (duplicate-token / induction heads), S-inhibition heads carry that to the last
position, and name-mover heads copy the name that is *not* inhibited into the logits.

What the data rules out: both name orders (ABBA and BABA) appear equally often, so "the first
name" or "the second name" is never the answer by position; many templates put the names at
different positions; names are drawn uniformly from a large list, so no name is a better guess
than another. The only way to be right is to find the name that was *not* repeated.

Corruption (ABC): the second mention of S is replaced by a third name C, so the prompt has
three distinct names and no duplicate: "When Mary and John went to the store, Tom gave a drink
to". Same token length; IO and S are no longer distinguishable.
"""

from __future__ import annotations

import random
from typing import Any

from circuits.errors import TaskError
from circuits.task import Example, Task, TaskSpec, is_single_token, n_tokens

MODEL = "ioi-gpt2-4l"

NAMES = (
    "Mary John Tom James Michael David Robert William Richard Paul Mark George Steven Kevin "
    "Brian Eric Adam Peter Kate Anna Sarah Laura Lisa Amy Emma Alice Jack Ryan Jason Justin "
    "Daniel Andrew Matthew Henry Frank Scott Sam Ben Max Joe Bill Tim Dan Chris Alex Jane Rose "
    "Grace Helen Ruth Susan Karen Nancy Linda Julia Maria Anne Martin Simon Luke Carl Roger "
    "Edward Arthur Harry Victor Ray Jessica Rachel Emily Sophie Lucy Claire Fred Nick Tony"
).split()

PLACES = (
    "store garden restaurant school hospital office station house park beach market library "
    "church bank cafe museum"
).split()

OBJECTS = "drink ring kiss necklace snack book bone basketball computer letter gift key".split()

# {a} {b}: the two introduced names, {s}: the repeated one, {place}/{obj}: fillers.
# Every name follows a space, so it is the same (leading-space) token everywhere.
TEMPLATES = (
    "When {a} and {b} went to the {place}, {s} gave a {obj} to",
    "After {a} and {b} went to the {place}, {s} gave a {obj} to",
    "While {a} and {b} were working at the {place}, {s} gave a {obj} to",
    "Then, {a} and {b} were thinking about going to the {place}. {s} wanted to give a {obj} to",
    "Friends {a} and {b} found a {obj} at the {place}. {s} gave it to",
    "The {place} was closed, so {a} and {b} went home. Then {s} handed a {obj} to",
    "Yesterday {a} and {b} had a long argument at the {place}. Afterwards {s} said to",
    "At the {place}, {a} and {b} found a {obj}. Later, {s} threw the {obj} to",
)

DESCRIPTION = (
    "indirect object identification: 'When Mary and John ..., John gave a drink to' -> ' Mary'"
)


def usable_names(tokenizer: Any = None) -> list[str]:
    """Return the names that are a single token (with a leading space) for `tokenizer`.

    Parameters
    ----------
    tokenizer : tokenizer, optional
        None keeps every name.

    Returns
    -------
    list of str
    """
    if tokenizer is None:
        return list(NAMES)
    return [name for name in NAMES if is_single_token(tokenizer, " " + name)]


def sample(rng: random.Random, names: list[str], tokenizer: Any = None
           ) -> tuple[Example, str]:
    """Draw one IOI example and its full sentence (prompt + answer) from `rng`; with a
    tokenizer, the example names its spans (`spans`)."""
    template = rng.choice(TEMPLATES)
    io, s, c = rng.sample(names, 3)
    a, b = (io, s) if rng.random() < 0.5 else (s, io)  # ABBA or BABA
    fill = {"a": a, "b": b, "place": rng.choice(PLACES), "obj": rng.choice(OBJECTS)}
    clean = template.format(s=s, **fill)
    corrupt = template.format(s=c, **fill)
    order = "ABBA" if a == io else "BABA"
    named = {} if tokenizer is None else spans(template, fill, s, tokenizer)
    example = Example(clean, corrupt, (" " + io,), (" " + s,), {"order": order}, spans=named)
    return example, clean + " " + io


def spans(template: str, fill: dict[str, str], s: str, tokenizer: Any) -> dict[str, tuple]:
    """The token spans of an IOI prompt, as position-resolved circuits name them: ``IO`` and
    ``S1`` (the two introduced names, in their order), ``S2`` (the repeated name) and ``END``
    (the last token). Every name is one token after a space, so the tokens before it are those
    of the text before it."""
    text = template.format(s=s, **fill)
    at = {key: template.index("{" + key + "}") for key in ("a", "b", "s")}
    # the text before a placeholder, filled in, ends where the name's token begins
    token = {key: n_tokens(tokenizer, template[:i].rstrip(" ").format(s=s, **fill))
             for key, i in at.items()}
    io_key = "a" if fill["a"] != s else "b"
    s1_key = "b" if io_key == "a" else "a"
    last = n_tokens(tokenizer, text)
    return {"IO": (token[io_key], token[io_key] + 1), "S1": (token[s1_key], token[s1_key] + 1),
            "S2": (token["s"], token["s"] + 1), "END": (last - 1, last)}


def build(tokenizer: Any = None, n: int = 200, seed: int = 0) -> Task:
    """Build `n` IOI examples whose names are single tokens for `tokenizer`.

    Parameters
    ----------
    tokenizer : tokenizer, optional
        The target model's tokenizer; None keeps every name.
    n : int
        Number of examples.
    seed : int
        Generator seed.

    Returns
    -------
    Task

    Examples
    --------
    >>> task = build(n=2, seed=0)
    >>> task.examples[0].answers != task.examples[0].wrong
    True
    """
    names = usable_names(tokenizer)
    if len(names) < 3:
        raise TaskError(
            f"only {len(names)} IOI names are single tokens for this tokenizer; IOI needs 3"
        )
    rng = random.Random(seed)
    examples = tuple(sample(rng, names, tokenizer)[0] for _ in range(n))
    return Task("ioi", examples, "logit-diff", DESCRIPTION, MODEL)


def fragments() -> list[str]:
    """Return every piece of text the generator can emit (to build a vocabulary)."""
    return [*TEMPLATES, *NAMES, *PLACES, *OBJECTS]


SPEC = TaskSpec("ioi", DESCRIPTION, build, MODEL, default_n=200)
