"""UGS (uniform gradient sampling): per-edge inclusion probabilities learned by sampling masks
(Li and Janson 2024, "Optimal ablations for interpretability").

Each edge has a logit ``theta`` and an inclusion probability ``p = sigmoid(theta)``. A partly
ablated edge (``z_e`` in [0, 1]) moves the model smoothly between dropping and keeping it, so

    L(z_e = 1) - L(z_e = 0) = E_{z_e ~ U(0, 1)}[dL / dz_e].

Each of a step's masks (``samples`` of them) draws each edge, with probability ``q``
(``share``), uniformly (``z_e ~ U(0, 1)``), and otherwise keeps it with probability ``p_e``
(``z_e`` is 0 or 1). The gradient of the loss with respect to the uniform edges' weights,
divided by ``q`` and times ``p (1 - p)``, then has the expectation ``dF / dtheta / (1 - q)``,
where F is the expected loss under that same sampling: as ``q`` falls, the expected loss of
random circuits whose edges are kept with probability ``p`` (less bias, more variance). The
expected share of edges kept is the mean of ``p``. Training is `circuits.methods.learned`'s; the
scores are ``p``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..setup import Setup
from . import Option, register
from .learned import MaskKind, train_mask, training_options


def _sampler(share: float) -> MaskKind:
    """UGS masks with a uniform `share` of the edges each step."""

    def sample(theta: Tensor, valid: Tensor, generator: torch.Generator) -> Tensor:
        shape = theta.shape
        uniform = (torch.rand(shape, generator=generator) < share).to(theta.device)
        u = torch.rand(shape, generator=generator).to(theta.device)
        coin = torch.rand(shape, generator=generator).to(theta.device)
        p = torch.sigmoid(theta)
        value = torch.where(uniform, u, (coin < p.detach()).to(u.dtype))
        # the value sampled, with the gradient d z / d theta = p (1 - p) / share on the
        # uniform edges and none elsewhere
        return value + (p - p.detach()) * uniform / share

    return MaskKind("ugs", sample, lambda t: torch.sigmoid(t).mean())


@register(
    "ugs",
    level="edge",
    description="uniform gradient sampling: learned edge inclusion probabilities",
    passes="steps x 1 forward-backward through the edge weights of one batch x samples",
    params=(*training_options(steps=300, lr=0.1, samples=4),
            Option("share", "float", "share of edges sampled uniformly each step", 0.25,
                   low=0.01, high=1.0)),
)
def ugs(setup: Setup, steps: int = 300, lr: float = 0.1, sparsity: float = 0.95,
        edges: int | None = None, init: str = "full", loss: str = "kl", seed: int = 0,
        share: float = 0.25, samples: int = 4) -> tuple[Tensor, dict[str, Any]]:
    """Learn every edge's inclusion probability by uniform gradient sampling (see the module
    docstring and `circuits.methods.learned`); the scores are the probabilities.

    Examples
    --------
    >>> from circuits.setup import Setup
    >>> from circuits.methods import run_method
    >>> from circuits.toys import induction_toy
    >>> model, batches, true_edges = induction_toy(n=8)
    >>> scores = run_method("ugs", Setup(model, batches, "logit-diff"), steps=20)
    >>> bool(((scores.values >= 0) & (scores.values <= 1)).all())
    True
    """
    theta, summary = train_mask(setup, _sampler(share), steps, lr, samples, sparsity, edges,
                                init, loss, seed)
    return torch.sigmoid(theta) * setup.graph.valid, {"training": summary}
