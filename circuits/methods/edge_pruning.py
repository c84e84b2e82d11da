"""Edge pruning: a hard-concrete (L0) mask per edge, trained to keep the model's output while
reaching a target sparsity (Bhaskar et al. 2024, "Finding Transformer Circuits with Edge
Pruning").

Each edge has a logit ``theta``. A step draws ``u ~ U(0, 1)`` per edge and mask (``samples`` masks
a step) and keeps the edge by

    z = clamp(sigmoid((log u - log(1 - u) + theta) / beta) * (r - l) + l, 0, 1)

(``beta = 2/3``, stretched to ``(l, r) = (-0.1, 1.1)`` so that exact 0 and 1 have positive
probability); the gradient flows through the sample. The expected share of edges kept is the
mean of ``P(z > 0) = sigmoid(theta - beta log(-l / r))``. Training is `circuits.methods.learned`'s.
The circuit is the largest pruned set ``theta >= t`` with at most the target number of edges,
`t` found by bisection; the scores are ``P(z > 0)``, a monotone map of the logits that is
positive, so rankings by score and by |score| both rank edges as the logits do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..setup import Setup
from . import register
from .learned import MaskKind, target_density, threshold_circuit, train_mask, training_options

BETA, LEFT, RIGHT = 2 / 3, -0.1, 1.1
SHIFT = BETA * math.log(-LEFT / RIGHT)  # P(z > 0) = sigmoid(theta - SHIFT)
EPS = 1e-6  # u stays inside (0, 1), where the logistic noise is finite


def _sample(theta: Tensor, valid: Tensor, generator: torch.Generator) -> Tensor:
    """A hard-concrete sample of every edge's mask, differentiable in `theta`."""
    u = torch.rand(theta.shape, generator=generator).clamp(EPS, 1 - EPS).to(theta.device)
    s = torch.sigmoid((u.log() - (-u).log1p() + theta) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0, 1)


def keep_probability(theta: Tensor) -> Tensor:
    """``P(z > 0)`` of hard-concrete masks with logits `theta`."""
    return torch.sigmoid(theta - SHIFT)


HARD_CONCRETE = MaskKind("edge-pruning", _sample, lambda t: keep_probability(t).mean())


@register(
    "edge-pruning",
    level="edge",
    description="learned hard-concrete edge mask at a target sparsity (its own circuit)",
    passes="steps x 1 forward-backward through the edge weights of one batch x samples",
    decides_circuit=True,
    params=training_options(steps=300, lr=0.1, samples=4),
)
def edge_pruning(setup: Setup, steps: int = 300, lr: float = 0.1, sparsity: float = 0.95,
                 edges: int | None = None, init: str = "full", loss: str = "kl",
                 seed: int = 0, samples: int = 4) -> tuple[Tensor, dict[str, Any]]:
    """Train a hard-concrete mask and cut its circuit at the target edge count (see the module
    docstring and `circuits.methods.learned`).

    Examples
    --------
    >>> from circuits.setup import Setup
    >>> from circuits.methods import run_method
    >>> from circuits.toys import induction_toy
    >>> model, batches, true_edges = induction_toy(n=8)
    >>> scores = run_method("edge-pruning", Setup(model, batches, "logit-diff"), steps=20,
    ...                     edges=4)
    >>> int(scores.circuit.sum()) <= 4
    True
    """
    g = setup.graph
    theta, summary = train_mask(setup, HARD_CONCRETE, steps, lr, samples, sparsity, edges, init,
                                loss, seed)
    k = edges if edges is not None else max(1, round(target_density(g, sparsity, None) * g.n_edges))
    circuit, threshold = threshold_circuit(g, theta, k)
    summary.update(edges=k, threshold=threshold)
    return keep_probability(theta) * g.valid, {"circuit": circuit, "training": summary}
