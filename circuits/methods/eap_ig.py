"""EAP with integrated gradients (EAP-IG), over the inputs or over the activations.

EAP's gradient is taken at the clean run only. EAP-IG averages it along a straight path from the
clean run to the ablated one, so each edge's score is ``delta_s . mean over alpha of
d m / d input_d`` — an integrated-gradients attribution whose scores add up to the metric change
of ablating everything, however curved the model is along the way.

- ``inputs``: the path interpolates the embeddings (``input`` source) and every later activation
  is recomputed from them.
- ``activations``: for each stage in turn, the inputs of that stage's destinations are
  interpolated between their clean and fully ablated values, and only their gradients are kept;
  one sweep per stage.

The path is sampled at the midpoints ``alpha = (k + 0.5) / steps``; all steps of a sweep run as
variants of the batch in one forward and one backward.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..errors import OptionError
from ..setup import Setup
from . import register


def _alphas(steps: int) -> Tensor:
    if steps < 1:
        raise OptionError(f"steps must be a positive integer, got {steps}")
    return (torch.arange(steps, dtype=torch.float32) + 0.5) / steps


def _sweeps(setup: Setup, over: str, steps: int
            ) -> list[tuple[Tensor, Tensor | None, int | None]]:
    """(ablate weights [steps, n_src, n_dst] on the model's device, moved there once rather than
    on every batch; destinations to score or None; the stage the run can restart at) per
    sweep."""
    g = setup.engine.graph
    device = setup.model.device
    alphas = _alphas(steps)
    if over == "inputs":
        w = torch.zeros(steps, g.n_sources, g.n_destinations)
        w[:, 0, :] = alphas[:, None]
        return [(w.to(device), None, None)]
    if over == "activations":
        sweeps = []
        for stage in sorted(set(g.dst_stage.tolist())):
            only = g.dst_stage == stage
            w = torch.zeros(steps, g.n_sources, g.n_destinations)
            w[:, :, only] = alphas[:, None, None]
            sweeps.append(((w * g.valid).to(device), only, stage))
        return sweeps
    raise OptionError(f"unknown EAP-IG variant {over!r}; use 'inputs' or 'activations'")


def _eap_ig(setup: Setup, over: str, steps: int) -> Tensor:
    engine = setup.engine
    g = engine.graph
    total = torch.zeros(g.n_sources, g.n_destinations)
    sweeps = _sweeps(setup, over, steps)
    for batch, ablated, weight in setup.items():
        trace = engine.trace(batch.clean, last_only=True)
        delta = ablated - trace.outs  # [n_src, b, p, d]
        for w, only, stage in sweeps:
            # upstream of the interpolated stage the run is the clean one: restart there
            change = engine.edge_attribution(
                batch.clean,
                lambda logits, batch=batch: setup.metric_mean(logits, batch),
                ablated,
                delta=delta,
                ablate=w,
                only=only,
                start=None if stage is None else (stage, trace),
            )
            # the metric is a mean over steps x prompts, so the summed gradient is already the
            # average over steps.
            total += weight * change
    return -setup.sign * total


@register(
    "eap-ig",
    level="edge",
    description="EAP with integrated gradients over the input embeddings (the default method)",
    passes="1 ablated forward + 1 clean forward + 1 forward-backward over steps x prompts",
)
def eap_ig(setup: Setup, steps: int = 5, over: Literal["inputs", "activations"] = "inputs"
           ) -> Tensor:
    """EAP-IG; `over` picks the interpolated quantity, `steps` the path samples."""
    return _eap_ig(setup, over, steps)


@register(
    "eap-ig-activations",
    level="edge",
    description="EAP-IG interpolating each stage's destination inputs in turn",
    passes="1 ablated + 1 clean forward + (2 x layers + 1) forward-backwards over steps x prompts",
)
def eap_ig_activations(setup: Setup, steps: int = 5) -> Tensor:
    """EAP-IG over activations (one sweep per stage)."""
    return _eap_ig(setup, "activations", steps)
