"""A small model with a direction planted by construction, for tests and examples.

`planted_direction` builds a randomly initialised two-layer GPT-2 over a word vocabulary and
plants one unit direction ``v`` (orthogonal to the all-ones vector, so LayerNorm's centring
keeps it):

- every *positive* word's embedding gets ``alpha * v`` added, so wherever a positive word is
  read the residual stream carries ``alpha * v`` on top of whatever the random weights write;
  a probe for "the last word is positive" and the difference of class means should both find
  ``v``;
- the unembedding rows of ``yes`` and ``no`` are ``+beta * v`` and ``-beta * v`` (GPT-2 ties
  them to the embeddings; neither word occurs in a prompt), so the logit difference ``yes - no``
  is ``2 * beta * v . ln_f(h)`` for the final residual ``h``: steering along ``v`` moves it by
  an amount computable by hand from ``h``.

The texts are ``"the word is W"`` with ``W`` a positive or a negative word; the task's clean
prompt ends in a positive word and its corrupted prompt in a negative one, both answered
``yes`` (right) against ``no`` (wrong).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from ..handset import EOS, UNK, word_tokenizer
from ..model import Model
from ..task import Example, Task
from .labels import Labeled

POSITIVE = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "kiwi",
            "lynx")
NEGATIVE = ("axe", "bolt", "cup", "desk", "fork", "gear", "hook", "iron", "jar", "key", "lamp",
            "mug")
FILLER = ("the", "word", "is", "a", "new")
VOCAB = (EOS, UNK, *FILLER, "yes", "no", *POSITIVE, *NEGATIVE)


@dataclass
class PlantedDirection:
    """A model with a planted direction, its labelled texts and its task.

    Attributes
    ----------
    model : Model
        A two-layer GPT-2 with a word-level tokenizer.
    direction : Tensor
        The planted unit vector ``[d_model]``.
    labeled : Labeled
        Texts labelled ``pos`` or ``neg`` by their last word (the control word).
    task : Task
        Clean prompts end in a positive word, corrupted ones in a negative word; the metric is
        the logit difference ``yes - no``.
    alpha : float
        How far along `direction` a positive word's embedding is moved.
    beta : float
        The unembedding rows of ``yes`` and ``no`` are ``+beta`` and ``-beta`` times `direction`.
    """

    model: Model
    direction: Tensor
    labeled: Labeled
    task: Task
    alpha: float
    beta: float


def planted_direction(seed: int = 0, d_model: int = 32, alpha: float = 0.5, beta: float = 1.0,
                      n: int = 200) -> PlantedDirection:
    """Build the planted-direction model (module docstring) and `n` labelled texts.

    The global random state is left as it was.

    Examples
    --------
    >>> p = planted_direction()
    >>> round(float(p.direction.norm()), 4), abs(float(p.direction.sum())) < 1e-6
    (1.0, True)
    >>> p.labeled.classes, p.task.examples[0].answers
    (('neg', 'pos'), (' yes',))
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = GPT2Config(n_layer=2, n_head=2, n_embd=d_model, vocab_size=len(VOCAB),
                         n_positions=16, bos_token_id=0, eos_token_id=0)
        hf = GPT2LMHeadModel(cfg).eval()
        v = torch.randn(d_model)
    v = v - v.mean()
    v = v / v.norm()
    index = {w: i for i, w in enumerate(VOCAB)}
    with torch.no_grad():
        wte = hf.transformer.wte.weight
        for word in POSITIVE:
            wte[index[word]] += alpha * v
        wte[index["yes"]] = beta * v
        wte[index["no"]] = -beta * v
    model = Model(hf=hf, tokenizer=word_tokenizer(VOCAB), name="planted-direction")
    rng = random.Random(seed)
    texts, labels, words = [], [], []
    for i in range(n):
        word = rng.choice(POSITIVE if i % 2 == 0 else NEGATIVE)
        texts.append(f"{rng.choice(('the', 'a', 'new'))} word is {word}")
        labels.append("pos" if word in POSITIVE else "neg")
        words.append(word)
    labeled = Labeled("planted-direction", tuple(texts), tuple(labels), words=tuple(words))
    examples = [Example(f"the word is {p}", f"the word is {q}", (" yes",), (" no",))
                for p, q in zip(POSITIVE, NEGATIVE, strict=True)]
    return PlantedDirection(model, v, labeled, Task("planted-direction", examples), alpha, beta)
