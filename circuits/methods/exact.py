"""Exact edge patching: the true effect of ablating each edge alone.

The reference the approximate methods are judged by. All edges into one stage run together as
variants of the batch, restarting at that stage from the clean run's cached activations, so the
cost is far below one full forward per edge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..resume import resumable_items
from ..setup import Setup
from . import register


@register(
    "exact",
    level="edge",
    description="exact edge patching: each edge ablated alone (slow, the reference)",
    passes="per batch: one partial forward per edge, batched per destination stage",
    positions=True,
    additive=True,
)
def exact(setup: Setup) -> Tensor:
    """Score = sign * (m(clean) - m(edge ablated)), weighted over batches.

    With a `circuits.progress.Checkpoint` in ``setup.checkpoint`` the weighted sum of the
    batches done so far is saved after each batch, and a resumed run starts after the last
    saved batch (same scores, bit for bit).
    """
    engine = setup.engine
    total = setup.edge_zeros()
    for batch, ablated, weight in resumable_items(setup, "exact", {"total": total}, {}):
        b = batch.size
        columns, narrow = setup.narrow(batch)

        def per_variant(logits: Tensor, narrow=narrow, b=b) -> Tensor:
            return setup.metric_values(logits, narrow).view(-1, b).mean(1)

        clean = setup.metric_mean(batch.clean_logits, batch)
        effects = engine.edge_effects(batch.clean, ablated, per_variant, setup.prefix(batch),
                                      columns, **setup.at_positions(batch))
        total += weight * torch.nan_to_num(clean.cpu() - effects)
    return setup.sign * total * engine.graph.valid
