"""How good is a circuit: its faithfulness with a bootstrap interval (`evaluate`), the smallest
faithful prefix of a ranking (`smallest_faithful`, the Circuit of `circuits.smallest`'s
search), and whether the model shows the behavior at all (`behavior`, judged by
`circuits.behavior`, whose names are also importable from here). How well scores recover a
known circuit (ROC, precision/recall) is `circuits.recovery`.

Faithfulness of a circuit C is ``f(C) = (m(C) - m(empty)) / (m(model) - m(empty))`` where m is
the task metric averaged over the prompts (weighted by batch size) with every edge outside C
ablated. m(model) and m(empty) are evaluated in the same batched forward as the circuits
themselves (the full mask and the empty mask are two more variants), so f(full) = 1 and
f(empty) = 0 hold exactly, not up to rounding.

The measurements live in `circuits.faithfulness` (running circuits, the ratio, the bootstrap)
and the faithfulness curves (CPR, CMD on MIB's grid) in `circuits.curves`; their names are
importable from here too.
"""

from __future__ import annotations

import torch
from torch import Tensor

# the behavior's judgement, the curves, the measurements and the smallest faithful circuit live
# in their own modules; their names stay importable here
from .behavior import FEW_PROMPTS as FEW_PROMPTS
from .behavior import MIN_EFFECT_RATIO as MIN_EFFECT_RATIO
from .behavior import MIN_T as MIN_T
from .behavior import Behavior
from .behavior import few_prompts as few_prompts
from .circuit import Circuit
from .circuit import smallest_faithful as smallest_faithful
from .curves import MIB_FRACTIONS as MIB_FRACTIONS
from .curves import Curve as Curve
from .curves import area as area
from .curves import cmd as cmd
from .curves import cpr as cpr
from .curves import faithfulness_curve as faithfulness_curve
from .curves import fine_fractions as fine_fractions
from .faithfulness import Baseline as Baseline
from .faithfulness import Evaluation as Evaluation
from .faithfulness import bootstrap_faithfulness as bootstrap_faithfulness
from .faithfulness import default_chunk as default_chunk
from .faithfulness import evaluate_mask, metric_of_masks
from .faithfulness import faithfulness_of_masks as faithfulness_of_masks
from .faithfulness import ratio as ratio
from .setup import Setup
from .smallest import MAX_SCAN as MAX_SCAN


def evaluate(
    circuit: Circuit | Tensor,
    setup: Setup,
    chunk: int | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Faithfulness of a circuit (or a bool edge mask) on a setup's prompts, with a bootstrap
    interval.

    Node-level circuits evaluate on any causal LM (see `metric_of_masks`).

    Parameters
    ----------
    circuit : Circuit or Tensor
        A Circuit, or a ``[n_src, n_dst]`` bool mask (True = edge kept; not pruned here).
    setup : Setup
        Prompts to evaluate on: the discovery Setup, or one built on held-out prompts.
    chunk : int, optional
        Most circuits run side by side per forward.
    n_resamples, seed : int
        Bootstrap resamples of the prompts and the seed of their draws
        (`bootstrap_faithfulness`, 95% interval).

    Returns
    -------
    Evaluation
        ``faithfulness``, ``metric_circuit`` m(C), ``metric_model`` m(model), ``metric_empty``
        m(empty), the circuit's size and ``faithfulness_ci``.
    """
    mask = circuit.mask if isinstance(circuit, Circuit) else circuit
    return evaluate_mask(setup, mask, chunk, n_resamples, seed)


# -- behavior strength ------------------------------------------------------------------------
def behavior(setup: Setup, chunk: int | None = None) -> Behavior:
    """Whether the model shows the behavior at all on a setup's prompts.

    Per prompt, ``d_i = sign * (m_i(model) - m_i(empty))``, where the empty circuit has every
    edge (node) ablated: for resample ablation the run on the corrupted prompt, for mean and
    zero ablation every source at its mean or zero. ``sign`` is `Setup.sign` (+1, -1 for
    ``kl``), so d > 0 means the model does what the task measures and ablation takes it away.
    A circuit's faithfulness divides by the mean of d: when d is small against its spread,
    faithfulness is noise.

    The behavior is *weak* when its effect is not clearly positive against its spread:

    * ``effect / spread < 0.5`` (`MIN_EFFECT_RATIO`): prompts disagree about as much as they
      agree, or
    * ``t = effect / (spread / sqrt(n)) < 3`` (`MIN_T`): the mean is within three standard
      errors of zero (or below it),

    and with fewer than two prompts (no spread to compare with). A spread of zero with a
    positive effect is not weak. `Behavior.of` applies the rule to given effects.

    Parameters
    ----------
    setup : Setup
        Runs on any causal LM: without an edge adapter the empty circuit runs by node patching.
    chunk : int, optional
        As in `metric_of_masks`.

    Returns
    -------
    Behavior

    Examples
    --------
    >>> import circuits
    >>> model = circuits.load_model("induction-gpt2-2l")
    >>> task = circuits.get_task("induction", model.tokenizer, n=16)
    >>> found = behavior(circuits.Setup(model, task.batches(model.tokenizer), task.metric))
    >>> found.weak, found.n
    (False, 16)
    """
    g = setup.graph
    per = metric_of_masks(setup, torch.stack([g.valid, torch.zeros_like(g.valid)]), chunk,
                          per_prompt=True)  # [2, n_prompts]
    return Behavior.of(setup.sign * (per[0] - per[1]))
