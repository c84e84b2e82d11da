"""EAP with integrated gradients (EAP-IG): over the inputs, over each stage, or over activations.

EAP's gradient is taken at the clean run only. EAP-IG averages it along a straight path from the
clean run towards the ablated one, so each edge's score is ``delta_s . mean over alpha of
d m / d input_d`` with ``delta_s = ablated_s - clean_s``. Three paths are offered:

- ``eap-ig`` (the reference's ``EAP-IG-inputs``): the embeddings (``input`` source) are
  interpolated and every later activation is recomputed from them; one sweep. Its scores add up
  to the metric change of ablating the input, however curved the model is along the way.
- ``eap-ig-activations`` (the reference's ``EAP-IG-activations``): one sweep per source layer
  (the input, each layer's heads together, each MLP). The layer's outputs are replaced by the
  fixed values ``clean + alpha * delta`` (nothing upstream reaches the metric through them any
  more), the rest of the model is recomputed, the gradient is taken at every destination, and
  the scores are averaged over the sweeps.
- ``eap-ig-stages`` (this package's variant): one sweep per stage; the inputs of that stage's
  destinations are interpolated between their clean and fully ablated values, and only their
  gradients are kept. Each destination gets integrated gradients of its own inputs, so its
  incoming scores add up to the effect of ablating all of them; the benchmark tables up to now
  were computed with it (under the name ``eap-ig-activations``).

The path is sampled at the midpoints ``alpha = (k + 0.5) / steps``, k = 0 .. steps - 1, alpha
being the distance from the clean run (0) towards the ablated one (1): the scores then add up
to the metric change with an error of order 1 / steps², against 1 / steps for the reference's
end points. With ``points="reference"`` (``--ig-points reference``) ``eap-ig`` and
``eap-ig-activations`` sample the reference's points, reproducing its scores (and MIB's):
``alpha = (k + 1) / steps`` for EAP-IG-inputs (its input ``corrupted + k / steps * (clean -
corrupted)``, k = 0 .. steps - 1, starts at the ablated end) and ``alpha = k / steps`` for
EAP-IG-activations (its output ``k / steps * clean + (1 - k / steps) * corrupted``, k = 1 ..
steps, ends at the clean run). The steps of a sweep run in one forward and one backward, as
variants of the batch or as repeats of its prompts, in as few chunks as the setup's
``run_memory`` allows (`Setup.step_chunks`). Positions the clean and corrupted prompts share
are clean on the whole path and are not rerun.

Every variant adds up its scores batch by batch; with a `circuits.progress.Checkpoint` in
``setup.checkpoint`` the sum so far is saved after each batch and a resumed run continues after
the last saved batch (same scores, bit for bit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..batch import Batch
from ..errors import OptionError
from ..graph import Graph
from ..resume import resumable_items
from ..setup import Setup
from . import MAX_STEPS, Option, register

POINTS = ("midpoint", "reference")
# where the reference's samples lie within each of the steps, as a share of a step (see the
# module notes): EAP-IG-inputs at the ends towards the ablated run, EAP-IG-activations at the
# ends towards the clean one
_REFERENCE_SHIFT = {"eap-ig": 1.0, "eap-ig-activations": 0.0}


def _points_option() -> Option:
    """The ``points`` option of the variants the reference defines."""
    return Option("points", "choice", "where the path is sampled: midpoint (more accurate) or "
                  "reference (the EAP-IG reference's and MIB's points)", "midpoint",
                  choices=POINTS, flag="--ig-points")


def _alphas(steps: int, points: str = "midpoint", method: str = "eap-ig") -> Tensor:
    """The path's sample points ``[steps]``: the midpoints of `steps` equal steps, or the
    points the reference samples for `method` (``points="reference"``)."""
    if steps < 1:
        raise OptionError(f"steps must be a positive integer, got {steps}")
    if points not in POINTS:
        raise OptionError(f"points must be one of {', '.join(POINTS)}, got {points!r}")
    shift = 0.5 if points == "midpoint" else _REFERENCE_SHIFT[method]
    return (torch.arange(steps, dtype=torch.float32) + shift) / steps


def _saved(steps: int, points: str) -> dict[str, Any]:
    """The options a run's saved progress depends on (the default points left out, so that
    progress saved before the option existed still resumes)."""
    return {"steps": steps} if points == "midpoint" else {"steps": steps, "points": points}


def _run(setup: Setup, batch: Batch) -> dict[str, Any]:
    """What every gradient run of a batch passes the engine: the batch's mean metric of
    last-position logits (rows may repeat the batch) read from the columns `Setup.narrow` picks,
    those columns, and the shared prefix that is not rerun."""
    columns, narrow = setup.narrow(batch)

    def metric(logits: Tensor) -> Tensor:
        return setup.metric_mean(logits, narrow)

    return {"metric": metric, "columns": columns, "first": setup.prefix(batch),
            **setup.at_positions(batch)}


@register(
    "eap-ig",
    level="edge",
    description="EAP with integrated gradients over the input embeddings (the default method)",
    passes="1 ablated forward + 1 clean forward + 1 forward-backward over steps x prompts",
    params=(Option("steps", "int", "integration steps", 5, low=1, high=MAX_STEPS),
            _points_option()),
    positions=True,
    additive=True,
)
def eap_ig(setup: Setup, steps: int = 5, points: str = "midpoint") -> Tensor:
    """EAP-IG over the inputs: the ``input`` source's edges interpolated, `steps` path samples
    (at `points`, see the module notes)."""
    engine = setup.engine
    g = engine.graph
    alphas = _alphas(steps, points, "eap-ig")
    w = torch.zeros(steps, g.n_sources, g.n_destinations)
    w[:, 0, :] = alphas[:, None]
    w = w.to(setup.model.device)  # once, not on every batch
    total = setup.edge_zeros()
    for batch, ablated, weight in resumable_items(setup, "eap-ig", {"total": total},
                                                  _saved(steps, points)):
        trace = engine.trace(batch.clean, last_only=True)
        delta = ablated - trace.outs  # [n_src, b, p, d]
        # the metric is a mean over a chunk's steps x prompts, so the summed gradient is the
        # chunk's average over steps; the shared prefix of the prompts is not interpolated
        run = _run(setup, batch)
        for part in setup.step_chunks(steps, batch):
            share = (part.stop - part.start) / steps
            total += weight * share * engine.edge_attribution(
                batch.clean, ablated=ablated, delta=delta, ablate=w[part], start=(0, trace),
                **run)
    return -setup.sign * total


@register(
    "eap-ig-stages",
    level="edge",
    description="EAP-IG interpolating each stage's destination inputs in turn",
    passes="1 ablated + 1 clean forward + (2 x layers + 1) partial forward-backwards over "
           "steps x prompts",
    params=(Option("steps", "int", "integration steps", 5, low=1, high=MAX_STEPS),),
    positions=True,
    additive=True,
)
def eap_ig_stages(setup: Setup, steps: int = 5) -> Tensor:
    """EAP-IG with one sweep per stage, each interpolating that stage's destination inputs."""
    engine = setup.engine
    g = engine.graph
    alphas = _alphas(steps)
    sweeps = []  # (weights [steps, n_src, n_dst] on the model's device, destinations, stage)
    for stage in sorted(set(g.dst_stage.tolist())):
        only = g.dst_stage == stage
        w = torch.zeros(steps, g.n_sources, g.n_destinations)
        w[:, :, only] = alphas[:, None, None]
        sweeps.append(((w * g.valid).to(setup.model.device), only, stage))
    total = setup.edge_zeros()
    for batch, ablated, weight in resumable_items(setup, "eap-ig-stages", {"total": total},
                                                  {"steps": steps}):
        trace = engine.trace(batch.clean, last_only=True)
        delta = ablated - trace.outs  # [n_src, b, p, d]
        chunks, run = setup.step_chunks(steps, batch), _run(setup, batch)
        for w, only, stage in sweeps:
            # upstream of the interpolated stage the run is the clean one: restart there
            for part in chunks:
                share = (part.stop - part.start) / steps
                total += weight * share * engine.edge_attribution(
                    batch.clean, ablated=ablated, delta=delta, ablate=w[part], only=only,
                    start=(stage, trace), **run,
                )
    return -setup.sign * total


def _source_layers(g: Graph) -> list[list[int]]:
    """The sources EAP-IG-activations interpolates together: the input, then each layer's heads
    and its MLP."""
    groups = [[0]]
    for layer in range(g.n_layers):
        heads = g.head_sources(layer)
        groups += [list(range(heads.start, heads.stop)), [g.mlp_source(layer)]]
    return groups


@register(
    "eap-ig-activations",
    level="edge",
    description="EAP-IG interpolating each source layer's outputs in turn (the reference's "
                "EAP-IG-activations)",
    passes="1 ablated + 1 clean forward + (2 x layers + 1) forward-backwards over steps x "
           "prompts",
    params=(Option("steps", "int", "integration steps", 5, low=1, high=MAX_STEPS),
            _points_option()),
    positions=True,
    additive=True,
)
def eap_ig_activations(setup: Setup, steps: int = 5, points: str = "midpoint") -> Tensor:
    """EAP-IG as the reference's ``EAP-IG-activations`` defines it (see the module notes).

    A layer's outputs are set to the fixed ``clean + alpha * delta`` by ablating its edges fully
    (weight 1) towards those values: a destination then reads ``resid + (fixed - out)``, whose
    gradient through ``out`` cancels. The steps run as repeats of the prompts, each with its own
    fixed values; `points` as for `eap_ig`.
    """
    engine = setup.engine
    g = engine.graph
    alphas = _alphas(steps, points, "eap-ig-activations")
    groups = _source_layers(g)
    sweeps = []  # weights [n_src, n_dst] on the model's device: 1 out of one source layer
    for sources in groups:
        w = torch.zeros(g.n_sources, g.n_destinations)
        w[sources] = 1.0
        sweeps.append((w * g.valid).to(setup.model.device))
    total = setup.edge_zeros()
    for batch, ablated, weight in resumable_items(setup, "eap-ig-activations", {"total": total},
                                                  _saved(steps, points)):
        trace = engine.trace(batch.clean, last_only=True)
        clean = trace.outs  # [n_src, b, p, d]
        delta = ablated - clean
        run = _run(setup, batch)
        for part in setup.step_chunks(steps, batch):
            k = part.stop - part.start
            a = alphas[part].to(device=delta.device, dtype=delta.dtype)[None, :, None, None, None]
            # the chunk's fixed outputs, steps folded into the batch step-major: [n_src, k*b, p, d]
            fixed = (clean[:, None] + a * delta[:, None]).flatten(1, 2)
            ids = batch.clean.repeat(k, 1)  # [k*b, p]
            for w in sweeps:
                # the metric is a mean over the chunk's steps x prompts: the summed gradient is
                # the chunk's average over steps
                total += weight * k / steps * engine.edge_attribution(
                    ids, ablated=fixed, delta=delta, ablate=w, start=(0, trace), **run)
    return -setup.sign * total / len(groups)
