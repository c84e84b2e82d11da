"""Path patching (Wang et al. 2022): the effect of senders on receivers through direct paths.

Sender outputs are ablated only along their edges into the receivers (heads' q/k/v inputs, MLP
inputs, logits); every other path keeps its clean value. In the edge graph this is exactly
ablating the edges ``senders x receivers``, so one patched forward measures it. The classic use,
"which heads affect the name movers' queries", scores every sender against receivers like
``["a3.h0<q>", "a3.h2<q>"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine import Engine
from ..errors import OptionError, UnsupportedModelError
from ..graph import Graph
from ..setup import Setup
from . import Option, register


def _engine(setup: Setup) -> Engine:
    """The setup's edge engine; path patching ablates edges, so it cannot do without one."""
    try:
        return setup.engine
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"path-patching ablates edges (senders into receivers) "
                                    f"with the edge engine: {err}") from None


def receiver_columns(graph: Graph, receivers: Sequence[str]) -> list[int]:
    """Destination indices of receivers given as destinations (``a3.h0<q>``), nodes (``a3.h0``:
    its q, k and v) or ``logits``."""
    cols: list[int] = []
    for name in receivers:
        if name in graph.dst_index:
            cols.append(graph.dst_index[name])
            continue
        found = graph.destinations_of(name)
        if not found:
            raise OptionError(
                f"unknown receiver {name!r}; use a destination like 'a1.h0<q>', a node like "
                "'a1.h0' or 'm1', or 'logits'"
            )
        cols += found
    return sorted(set(cols))


def path_effects(setup: Setup, senders: Sequence[Sequence[str]], receivers: Sequence[str],
                 chunk: int = 64) -> Tensor:
    """``sign * (m(clean) - m(patched))`` for each group of senders, ``[n_groups]``."""
    engine = _engine(setup)
    g = engine.graph
    device = setup.model.device
    cols = receiver_columns(g, receivers)
    masks = []
    for group in senders:
        w = torch.zeros(g.n_sources, g.n_destinations)
        for s in group:
            if s not in g.src_index:
                raise OptionError(f"unknown sender {s!r}; senders are sources like 'a0.h1'")
            w[g.src_index[s], cols] = 1.0
        masks.append((w * g.valid).to(device))
    # the effects stay on the model's device until the end: no batch waits on a copy
    out = torch.zeros(len(masks), device=device)
    for batch, ablated, weight in setup.items():
        clean = setup.metric_mean(batch.clean_logits, batch)
        for lo in range(0, len(masks), chunk):
            ws = torch.stack(masks[lo:lo + chunk])
            logits = engine.patched_logits(batch.clean, ws, ablated)
            patched = setup.metric_values(logits, batch).view(len(ws), -1).mean(1)
            out[lo:lo + len(ws)] += weight * (clean - patched)
    return setup.sign * out.cpu()


@register(
    "path-patching",
    level="node",
    description="path patching: each sender's effect on the receivers through direct edges",
    passes="1 ablated forward + 1 patched forward per sender (batched) per batch",
    params=(
        Option("receivers", "names", "destinations the senders' effect is measured through, "
               "e.g. logits or a2.h0<q>,a2.h0<k>", ("logits",)),
        Option("senders", "names", "sources to score, e.g. a0.h1,m0 (default: every source "
               "upstream of a receiver)"),
    ),
    additive=True,
)
def path_patching(
    setup: Setup,
    receivers: Sequence[str] = ("logits",),
    senders: Sequence[str] | None = None,
) -> tuple[Tensor, dict]:
    """Score every sender (default: every source upstream of a receiver) against `receivers`.

    Returns node scores ``[n_sources]`` (0 for sources that were not senders) and, in extra,
    ``{"receivers": [...], "senders": [...]}``.
    """
    g = _engine(setup).graph
    cols = receiver_columns(g, receivers)
    if senders is None:
        upstream = g.valid[:, cols].any(1)
        senders = [s for i, s in enumerate(g.sources) if upstream[i]]
    effects = path_effects(setup, [[s] for s in senders], receivers)
    values = torch.zeros(g.n_sources)
    for s, e in zip(senders, effects, strict=True):
        values[g.src_index[s]] = e
    return values, {"receivers": list(receivers), "senders": list(senders)}
