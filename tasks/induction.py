"""Induction: continue a repeated sequence of random tokens, built with the public `Task` API.

The prompt is a sequence of distinct random words followed by a repeat of its beginning:
``" lamp river coat sugar lamp river"`` -> ``" coat"``. The answer is the word that followed
the current word the first time round.

Expected mechanism (Olsson et al., 2022): a previous-token head writes "the word before me"
into each position; an induction head at the last position attends from the current word to
the position *after* its earlier occurrence (query = current word, key = previous word) and
copies that word into the logits.

What the data rules out: words are drawn uniformly and without replacement from a fixed list,
so bigram or unigram statistics cannot predict the next word; the repeat starts at varied
lengths, so position alone gives nothing.

Wrong tokens: every other word of the first half. They are all in the context too, so a
"copy some word from the context" heuristic does not raise the logit difference; only copying
the word that *followed the current one* does.

Corruption: the second half is replaced by fresh words that are not in the first half (same
length), so there is nothing to repeat.
"""

from __future__ import annotations

import random
from typing import Any

from circuits.errors import TaskError
from circuits.task import Example, Task, TaskSpec, is_single_token

MODEL = "induction-gpt2-2l"

WORDS = (
    "apple river coat sugar lamp table window garden horse paper money music water forest "
    "bread stone chair glass phone train dog cat bird fish tree house door book car road "
    "city king queen ship gold silver cloud rain snow fire wind star moon sun sand salt milk "
    "cheese wine beer coffee tea egg rice corn meat soup cake bottle box bag shoe shirt hat "
    "ring bell clock wall floor roof bridge tower island mountain lake ocean field farm wheel "
    "engine rocket cable wire screen camera radio piano guitar drum film game ball card map "
    "pen knife spoon plate bowl cup bed pillow blanket mirror brush soap towel sock glove "
    "button pocket jacket coin letter stamp ticket shop bank school church hotel prison "
    "castle garage kitchen office desk chalk ink"
).split()

MIN_HALF, MAX_HALF = 5, 10

DESCRIPTION = "induction: repeat a random word sequence, '... A B ... A' -> ' B'"


def usable_words(tokenizer: Any = None) -> list[str]:
    """Return the words that are a single token (with a leading space) for `tokenizer`.

    Parameters
    ----------
    tokenizer : tokenizer, optional
        None keeps every word.

    Returns
    -------
    list of str
    """
    if tokenizer is None:
        return list(WORDS)
    return [word for word in WORDS if is_single_token(tokenizer, " " + word)]


def sample(rng: random.Random, words: list[str]) -> tuple[Example, str]:
    """Draw one induction example and the full repeated sequence it was cut from."""
    half = rng.randint(MIN_HALF, MAX_HALF)
    first = rng.sample(words, half)
    shown = rng.randint(1, half - 1)  # words of the repeat shown before the answer
    fresh = rng.sample([w for w in words if w not in first], shown)
    clean = "".join(" " + w for w in first + first[:shown])
    corrupt = "".join(" " + w for w in first + fresh)
    answer = first[shown]
    wrong = tuple(" " + w for w in first if w != answer)
    example = Example(clean, corrupt, (" " + answer,), wrong, {"half": half})
    return example, "".join(" " + w for w in first + first)


def build(tokenizer: Any = None, n: int = 200, seed: int = 0) -> Task:
    """Build `n` induction examples from words that are single tokens for `tokenizer`.

    Parameters
    ----------
    tokenizer : tokenizer, optional
        The target model's tokenizer; None keeps every word.
    n : int
        Number of examples.
    seed : int
        Generator seed.

    Returns
    -------
    Task

    Examples
    --------
    >>> example = build(n=1, seed=0).examples[0]
    >>> example.answers[0] in example.clean
    True
    """
    words = usable_words(tokenizer)
    if len(words) < 2 * MAX_HALF:
        raise TaskError(
            f"only {len(words)} induction words are single tokens for this tokenizer; "
            f"induction needs {2 * MAX_HALF}"
        )
    rng = random.Random(seed)
    examples = tuple(sample(rng, words)[0] for _ in range(n))
    return Task("induction", examples, "logit-diff", DESCRIPTION, MODEL)


def fragments() -> list[str]:
    """Return every piece of text the generator can emit (to build a vocabulary)."""
    return list(WORDS)


SPEC = TaskSpec("induction", DESCRIPTION, build, MODEL, default_n=200)
