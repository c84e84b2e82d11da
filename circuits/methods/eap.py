"""Edge attribution patching (EAP): every edge from one ablated run and one forward-backward.

The effect of ablating edge (s, d) is approximated to first order:
``m(ablated) - m(clean) ~ (ablated_s - clean_s) . d m / d input_d``. The gradient is taken at the
clean run alone, so metrics that are flat there (``kl``) are refused: use EAP-IG with them.
"""

from __future__ import annotations

from torch import Tensor

from ..setup import Setup
from . import register


@register(
    "eap",
    level="edge",
    description="edge attribution patching: first-order estimate of every edge's effect",
    passes="1 ablated forward + 1 forward-backward per batch",
    gradient_at_clean=True,
    positions=True,
    additive=True,
)
def eap(setup: Setup) -> Tensor:
    """Score every edge with EAP; positive = ablating the edge is estimated to lower the metric."""
    engine = setup.engine
    total = setup.edge_zeros()
    for batch, ablated, weight in setup.items():
        columns, narrow = setup.narrow(batch)
        change = engine.edge_attribution(
            batch.clean, lambda logits, narrow=narrow: setup.metric_mean(logits, narrow),
            ablated, columns=columns, **setup.at_positions(batch),
        )
        total += weight * change
    # change estimates m(ablated edge) - m(clean); carrying the behavior means a drop.
    return -setup.sign * total
