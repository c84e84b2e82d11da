"""What the heads of a discovered circuit do: role, direct logit attribution, attention pattern.

`annotate_heads` reads every head of a circuit with the readers of `circuits.reading` and keeps
the result on the circuit (`Circuit.node_info`), so circuit.json, the diagrams, the interactive
page and report.md can show it:

* ``role`` and ``role_score``: the head's label and its score in [0, 1]
  (`circuits.reading.roles.HeadRoles.labels`): a role only where the evidence is strong (a
  score of at least 0.4; for ``name-mover`` also a clean-minus-corrupted direct logit
  attribution of at least 5% of the metric's difference), ``"mixed"`` where two attention roles
  are within 0.1 of each other; a head no role describes has ``role`` ``""`` and no
  ``role_score``, so the diagrams show no role for it; ``roles``: every role's score;
* ``dla``: its direct logit attribution to the task metric, and ``dla_contrast``: the same on
  the clean minus the corrupted prompts (`circuits.reading.dla.direct_logit_attribution`);
* ``attention``: its attention pattern on one example prompt of the task, ``{"tokens": [...],
  "pattern": [[...]]}`` with ``pattern[i][j]`` the weight query position i gives key position j
  (`circuits.reading.attention.attention_patterns`).

Floats are rounded (`DIGITS`) to keep the files small. Where the readers do not apply (a model
they cannot read, readers not installed) the circuit is left as it was and a one-line warning
says why: a discovery is never lost to its annotations.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .reading.attention import attention_patterns
from .reading.dla import direct_logit_attribution
from .reading.roles import head_roles

if TYPE_CHECKING:
    from .circuit import Circuit
    from .model import Model
    from .task import Task

DIGITS = 3  # decimals kept of role scores and attention weights
ROLE_PROMPTS = 16  # synthetic prompts per role: enough to rank heads, a fraction of a second
EXAMPLE_CANDIDATES = 16  # the example prompt is the shortest of the task's first ones
_HEAD = re.compile(r"a(\d+)\.h(\d+)")


def circuit_heads(circuit: Circuit) -> list[tuple[int, int]]:
    """The (layer, head) pairs of the circuit's attention heads, in graph order.

    Examples
    --------
    >>> from circuits.graph import Graph
    >>> from circuits.circuit import Circuit
    >>> g = Graph(2, 2)
    >>> circuit_heads(Circuit(g, g.mask_from_edges(["input->a1.h0<q>", "a1.h0->logits"])))
    [(1, 0)]
    """
    return [(int(m[1]), int(m[2])) for name in circuit.nodes if (m := _HEAD.fullmatch(name))]


def head_info(model: Model, task: Task, heads: list[tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """Role, role scores, direct logit attribution and example attention of each head.

    Parameters
    ----------
    model : Model
    task : Task
        Its prompts give the roles' task-specific scores, the attribution and the example.
    heads : list of (layer, head)

    Returns
    -------
    dict
        ``{"a{l}.h{h}": {"role", "role_score", "roles", "dla", "dla_contrast", "attention"}}``
        (no ``role_score`` where ``role`` is ``""``).
    """
    roles = head_roles(model, task, n=ROLE_PROMPTS)
    labels = roles.labels()
    dla = direct_logit_attribution(model, task, contrast=True)
    ids, tokens = example_prompt(model, task)
    patterns = attention_patterns(model, ids, heads)[0]  # [n_heads_chosen, p, p]
    info = {}
    for k, (layer, head) in enumerate(heads):
        name = f"a{layer}.h{head}"
        label = labels[name]
        info[name] = {
            "role": label.role,
            **({"role_score": round(float(label.score), DIGITS)} if label.role else {}),
            "roles": {r: round(float(s[layer, head]), DIGITS) for r, s in roles.scores.items()},
            "dla": round(float(dla.clean.heads[layer, head]), 2 * DIGITS),
            "dla_contrast": round(float(dla.heads[layer, head]), 2 * DIGITS),
            "attention": {"tokens": tokens,
                          "pattern": patterns[k].float().cpu().numpy().round(DIGITS).tolist()},
        }
    return info


def example_prompt(model: Model, task: Task) -> tuple[Any, list[str]]:
    """The shortest of the task's first clean prompts: ids ``[1, p]`` and its tokens as text."""
    first = replace(task, examples=task.examples[:EXAMPLE_CANDIDATES])
    batch = first.batches(model.tokenizer, batch_size=1, device=model.device)[0]  # shortest
    ids = batch.clean[:1]  # [1, p]
    tokens = [model.tokenizer.decode([t]) for t in ids[0].tolist()]
    return ids, tokens


def annotate_heads(circuit: Circuit, model: Model, task: Task) -> list[str]:
    """Store what each head of `circuit` does in ``circuit.node_info`` (see `head_info`).

    Parameters
    ----------
    circuit : Circuit
        Found on `model`; changed in place.
    model : Model
    task : Task

    Returns
    -------
    list of str
        Warnings: one line when the heads could not be read (nothing is stored then); empty
        when they were, or when the circuit has no heads.
    """
    heads = circuit_heads(circuit)
    if not heads:
        return []
    try:
        info = head_info(model, task, heads)
    except ModuleNotFoundError as err:
        return [f"head roles skipped: the reader {err.name} is not installed"]
    except Exception as err:  # noqa: BLE001 - the discovery is worth more than its annotations
        text = " ".join(str(err).split()) or type(err).__name__
        return [f"head roles skipped: the readers do not apply to {model.name!r} ({text})"]
    for name, entry in info.items():
        circuit.node_info.setdefault(name, {}).update(entry)
    return []
