"""Planted tasks: behaviors of hand-set models whose circuit is known (``circuits.planted``).

Each task is defined with the public `Task` API like the other built-ins, and its reference
model is the planted model of the same name (shipped in ``models/planted-*``, rebuilt with
``python -m circuits.planted``). The known circuit of each is ``circuits.planted.true_edges``.

- ``planted-induction``: ``BOS w1 ... w6 wi`` -> ``w(i+1)``; corrupted: an independent prompt.
- ``planted-ioi``: ``BOS When A and B went , S gave it to`` -> the name that is not S;
  corrupted: three fresh names, none repeated (nothing to inhibit).
- ``planted-mlp``: ``BOS a plus b is`` -> ``(a + b) mod 5``; corrupted: both digits changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from circuits.planted import NAMES, PLANTED, planted_examples
from circuits.task import Task, TaskSpec


def _builder(name: str) -> Callable[[Any, int, int], Task]:
    def build(tokenizer: Any = None, n: int = 200, seed: int = 0) -> Task:
        """Build `n` examples (the planted words are fixed; `tokenizer` is not consulted)."""
        return Task(name, tuple(planted_examples(name, n, seed)), "logit-diff",
                    PLANTED[name].description, name)

    return build


SPECS: tuple[TaskSpec, ...] = tuple(
    TaskSpec(name, PLANTED[name].description, _builder(name), name, default_n=200)
    for name in NAMES
)
