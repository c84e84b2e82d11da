"""Learned edge masks: the training that edge pruning and UGS share.

A mask ``z`` in [0, 1] per edge (1 = kept) runs the model with each edge moved ``1 - z`` of the
way to its ablated value (`Engine.patched_logits`, exact gradients with respect to the
weights). A parametrisation (`MaskKind`: hard-concrete for edge pruning, sampled Bernoulli with
uniform gradient sampling for UGS) turns one logit per edge, ``theta``, into a sampled mask and
an expected density (the share of edges kept). Training minimises, one batch a step::

    loss = D(z) / D(empty) + lambda_1 e + lambda_2 e^2,   e = max(0, density - target)

- ``D`` says how far the masked run is from the full model on the batch: ``kl`` is the mean
  KL(full || masked) of the last position's next-token distributions; ``task`` the mean squared
  change of the task metric per prompt. Dividing by the empty circuit's ``D`` (every edge
  ablated) makes 0 the full model and 1 the ablated one, whatever the task's scale.
- ``z`` is ``samples`` independent masks a step (run side by side as the engine's variants,
  like a batch that many times larger) and ``D(z)`` their mean. An edge that acts through a
  saturated attention pattern moves the output only where its mask crosses a narrow window
  (on ``planted-ioi`` the duplicate-token head's edges: the distance jumps by 0.375 between
  ``z = 0.475`` and ``0.5`` and is flat elsewhere), so its gradient is non-zero only in the
  rare samples that land there; one sample a step leaves such edges without signal while the
  sparsity target pushes them out with the edges that do nothing. Several samples a step see
  the window that many times more often and average the gradient's noise down (the
  optimal-ablation work's UGS draws 12 masks per prompt).
- ``target`` is the density asked for (``1 - sparsity``, or ``edges / n_edges``). From a cold
  start it falls linearly from 1 to that value over the first half of the steps (the mask is
  not forced sparse before it has learned anything); from a warm start it holds from step 0.
- ``lambda_1, lambda_2`` are Lagrange multipliers raised by gradient ascent, so the density is
  a constraint the training meets rather than a weight to tune. The constraint is one-sided
  (at most the target): once the density is below it nothing pushes further, so the mask does
  not overshoot into dropping edges the output needs, whose logits a hard-concrete mask could
  not bring back (a mask clamped at 0 passes no gradient).

``theta`` is updated with Adam (written out here so its state is saved and resumed exactly).
With a `circuits.progress.Checkpoint` in ``setup.checkpoint`` the state after each step
(``theta``, Adam's moments, the multipliers, the step, the sampler's generator) is kept there,
and a resumed run continues at the next step with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..batch import Batch
from ..errors import OptionError
from ..graph import Graph
from ..masks import prune
from ..metrics import kl_divergence
from ..outputs import progress_bar
from ..progress import RESTART
from ..resume import progress_key
from ..setup import Setup
from . import Option, run_method

#: The methods a mask may be warm-started from (their scores set the starting logits).
INIT_METHODS = ("full", "zeros", "eap", "eap-ig", "eap-ig-activations", "eap-ig-stages", "exact")
LOSSES = ("kl", "task")
WARMUP = 0.5  # share of the steps over which a cold start's target density falls to its goal
INIT_SCALE = 3.0  # largest |theta| of a warm start, and every theta of a start from the full model


@dataclass(frozen=True)
class MaskKind:
    """How logits ``theta`` become masks.

    Attributes
    ----------
    name : str
        The method's name (its progress is saved under it).
    sample : callable
        ``(theta, valid, generator) -> z``: independent masks in [0, 1] of `theta`'s shape
        (``[n_src, n_dst]``, or ``[samples, n_src, n_dst]`` for `theta` expanded to that), built
        from `theta` so that autograd gives the parametrisation's gradient estimate.
    density : callable
        ``theta_valid -> scalar``: the expected share of edges kept (differentiable).
    """

    name: str
    sample: Callable[[Tensor, Tensor, torch.Generator], Tensor]
    density: Callable[[Tensor], Tensor]


def training_options(steps: int, lr: float, samples: int) -> tuple[Option, ...]:
    """The options every learned mask takes (the method adds its own)."""
    return (
        Option("steps", "int", "training steps (one batch each)", steps, low=1, high=100_000),
        Option("lr", "float", "Adam learning rate of the mask logits", lr, low=1e-6, high=100),
        Option("sparsity", "float", "share of edges to remove", 0.95, low=0.0, high=0.9999),
        Option("edges", "int", "edges to keep (instead of --sparsity)", None, low=1),
        Option("init", "choice", "start from the full model (every logit high), zero logits, or "
               "another method's scores", "full", choices=INIT_METHODS),
        Option("loss", "choice", "distance from the full model: kl or the task metric", "kl",
               choices=LOSSES),
        Option("seed", "int", "seed of the mask samples", 0, low=0, high=2**63 - 1),
        Option("samples", "int", "masks drawn per step (run side by side: memory and time grow "
               "as for a batch that many times larger)", samples, low=1, high=1024),
    )


def target_density(graph: Graph, sparsity: float, edges: int | None) -> float:
    """The share of edges to keep: ``edges / n_edges``, else ``1 - sparsity``."""
    if edges is not None:
        if edges > graph.n_edges:
            raise OptionError(f"edges is {edges}, but the graph has {graph.n_edges}; ask for at "
                              "most that many")
        return edges / graph.n_edges
    return 1.0 - sparsity


@dataclass
class _State:
    """What a step changes: the logits, Adam's moments, the multipliers, the step."""

    theta: Tensor
    m: Tensor
    v: Tensor
    lam: Tensor  # [2]
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Reference:
    """A batch's fixed quantities: the vocabulary columns the loss reads and the batch renumbered
    into them (`Setup.narrow`; all columns for ``kl``), the full model's last-position logits
    (``kl``) or metric (``task``), and the empty circuit's distance."""

    columns: Tensor | None
    batch: Batch
    full: Tensor
    empty: float


def train_mask(setup: Setup, kind: MaskKind, steps: int, lr: float, samples: int,
               sparsity: float, edges: int | None, init: str, loss: str, seed: int
               ) -> tuple[Tensor, dict[str, Any]]:
    """Train a mask of `kind` on the setup's batches; returns the logits ``[n_src, n_dst]``
    (zero off the graph) and a summary of the training (see the module docstring)."""
    g = setup.graph
    goal = target_density(g, sparsity, edges)
    options = {"steps": steps, "lr": lr, "samples": samples, "sparsity": sparsity,
               "edges": edges, "init": init, "loss": loss, "seed": seed}
    device = setup.model.device
    valid = g.valid.to(device)
    header = (None if setup.checkpoint is None
              else progress_key(setup, kind.name, options))
    generator = torch.Generator().manual_seed(seed)
    state = _resume(setup, kind.name, header, generator) or _start(setup, init, goal, valid)
    cold = init in ("full", "zeros")
    n = len(setup.batches)
    refs: dict[int, _Reference] = {}
    with progress_bar(steps, kind.name, unit="step", initial=state.step) as bar:
        while state.step < steps:
            # one pass over the batches (their ablated outputs kept after the first), from the
            # batch the step is due on (a resumed run's may be any)
            for i, (batch, ablated, _) in enumerate(setup.items(reuse=True)):
                if state.step >= steps:
                    break
                if i != state.step % n:
                    continue
                if i not in refs:
                    refs[i] = _reference(setup, batch, ablated, loss)
                target = _scheduled(goal, state.step, steps) if cold else goal
                record = _step(setup, kind, state, ablated, refs[i], loss, target, lr, samples,
                               valid, generator)
                state.history.append(record)
                state.step += 1
                _save(setup, kind.name, header, state, generator, force=state.step == steps)
                bar.update(1)
                bar.set_postfix(loss=f"{record['distance']:.4f}",
                                kept=f"{record['density']:.3f}", refresh=False)
    theta = (state.theta.detach() * valid).cpu()
    last = state.history[-1] if state.history else {}
    summary = {"target_density": goal, "final_density": last.get("density", math.nan),
               "final_distance": last.get("distance", math.nan),
               "lambda": [float(x) for x in state.lam], "steps": state.step}
    return theta, summary


def _scheduled(goal: float, step: int, steps: int) -> float:
    """A cold start's target density at `step`: from 1 down to `goal` over the warm-up."""
    ramp = max(1, int(WARMUP * steps))
    return 1.0 - (1.0 - goal) * min(1.0, (step + 1) / ramp)


def _start(setup: Setup, init: str, goal: float, valid: Tensor) -> _State:
    """The state before the first step: logits from `init`, no moments, zero multipliers."""
    theta = torch.zeros(valid.shape, device=valid.device)
    if init == "full":
        theta += INIT_SCALE
    elif init != "zeros":
        theta = warm_logits(run_method(init, setup).values.to(valid.device), valid, goal)
    zeros = torch.zeros_like(theta)
    return _State(theta, zeros.clone(), zeros.clone(), torch.zeros(2, device=valid.device))


def warm_logits(scores: Tensor, valid: Tensor, goal: float) -> Tensor:
    """Starting logits from another method's scores: the edges whose |score| ranks in the top
    `goal` share start positive (kept), the others negative, linearly in rank from
    ``-INIT_SCALE`` to ``+INIT_SCALE`` on either side of that cut (NaN scores rank last).

    >>> valid = torch.ones(1, 4, dtype=torch.bool)
    >>> theta = warm_logits(torch.tensor([[0.1, -4.0, 2.0, 0.0]]), valid, 0.5)
    >>> [round(v, 4) for v in theta[0].tolist()]
    [-1.0, 3.0, 1.0, -3.0]
    """
    key = torch.nan_to_num(scores.abs().float(), nan=-1.0)[valid]
    n = key.numel()
    order = torch.argsort(torch.argsort(key, stable=True), stable=True).float()  # 0 = lowest
    q = order / max(1, n - 1)  # rank share in [0, 1]
    cut = 1.0 - goal
    below = INIT_SCALE * (q - cut) / max(cut, 1e-12)
    above = INIT_SCALE * (q - cut) / max(1.0 - cut, 1e-12)
    theta = torch.zeros(valid.shape, device=valid.device)
    theta[valid] = torch.where(q < cut, below, above).clamp(-INIT_SCALE, INIT_SCALE)
    return theta


def _reference(setup: Setup, batch: Batch, ablated: Tensor, loss: str) -> _Reference:
    """The batch's columns, full-model quantity and empty circuit's distance (no gradients);
    the full model's logits are those the Setup keeps with every batch."""
    columns, narrow = setup.narrow(batch) if loss == "task" else (None, batch)
    full_logits = batch.clean_logits
    assert full_logits is not None  # a Setup's batches carry them
    with torch.no_grad():
        empty_logits = setup.engine.patched_logits(batch.clean, setup.graph.valid.float(),
                                                   ablated, columns=columns)
        if loss == "kl":
            full = full_logits.float()
        else:
            full = setup.metric_values(_columns(full_logits, columns), narrow).float()
        empty = float(_distance(setup, narrow, empty_logits, full, loss))
    if not empty > 0:
        raise OptionError(
            "ablating every edge leaves this batch's output unchanged, so there is nothing for a "
            "mask to keep; check the corrupted prompts (or the ablation) of the task")
    return _Reference(columns, narrow, full, empty)


def _columns(logits: Tensor, columns: Tensor | None) -> Tensor:
    return logits if columns is None else logits[:, columns.to(logits.device)]


def _distance(setup: Setup, batch: Batch, logits: Tensor, full: Tensor, loss: str) -> Tensor:
    """D of a run's last-position logits ``[C * b, vocab]`` (C masks, variant-major), averaged
    over the masks (see the module docstring)."""
    if loss == "kl":
        return kl_divergence(full, logits.reshape(-1, *full.shape)).mean()
    values = setup.metric_values(logits, batch).float().reshape(-1, *full.shape)
    return (values - full).square().mean()


def _step(setup: Setup, kind: MaskKind, state: _State, ablated: Tensor, ref: _Reference,
          loss: str, target: float, lr: float, samples: int, valid: Tensor,
          generator: torch.Generator) -> dict[str, float]:
    """One training step on one batch: sample, run, backpropagate, update (in place)."""
    theta = state.theta.detach().requires_grad_(True)
    z = kind.sample(theta.expand(samples, *theta.shape), valid, generator)  # [C, n_src, n_dst]
    logits = setup.engine.patched_logits(ref.batch.clean, (1 - z) * valid, ablated,
                                         columns=ref.columns)
    distance = _distance(setup, ref.batch, logits, ref.full, loss) / ref.empty
    density = kind.density(theta[valid])
    excess = (density - target).clamp(min=0)
    total = distance + state.lam[0] * excess + state.lam[1] * excess.square()
    (grad,) = torch.autograd.grad(total, theta)
    _adam(state, grad * valid, lr)
    with torch.no_grad():  # the multipliers ascend the same loss
        state.lam += lr * torch.stack([excess.detach(), excess.detach().square()])
    return {"distance": distance.item(), "density": density.item(), "target": target}


def _adam(state: _State, grad: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8) -> None:
    """One Adam step on ``state.theta`` (the moments updated in place)."""
    b1, b2 = betas
    t = state.step + 1
    state.m.mul_(b1).add_(grad, alpha=1 - b1)
    state.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    m_hat = state.m / (1 - b1**t)
    v_hat = state.v / (1 - b2**t)
    state.theta = state.theta.detach() - lr * m_hat / (v_hat.sqrt() + eps)


def _save(setup: Setup, name: str, header: dict[str, Any] | None, state: _State,
          generator: torch.Generator, force: bool) -> None:
    """A safe point: keep the state in the checkpoint, if any (throttled unless forced)."""
    if setup.checkpoint is None:
        return
    setup.checkpoint.save(
        name,
        {"theta": state.theta.detach().cpu(), "m": state.m.cpu(), "v": state.v.cpu(),
         "lam": state.lam.cpu(), "generator": generator.get_state()},
        {"header": header, "step": state.step, "history": state.history},
        force=force,
    )


def _resume(setup: Setup, name: str, header: dict[str, Any] | None,
            generator: torch.Generator) -> _State | None:
    """The saved state of this very run, if the checkpoint holds one (the generator is set to
    where it was); an OptionError for progress saved with other settings."""
    ck = setup.checkpoint
    saved = None if ck is None else ck.load_for(name, header, name)
    if saved is None:
        return None
    tensors, meta = saved
    shape = tuple(setup.graph.valid.shape)
    if any(k not in tensors for k in ("theta", "m", "v", "lam", "generator")) or any(
            tuple(tensors[k].shape) != shape for k in ("theta", "m", "v")):
        raise OptionError(f"the {name} progress in {ck.folder} does not fit this graph; {RESTART}")
    generator.set_state(tensors["generator"])
    device = setup.model.device
    return _State(tensors["theta"].to(device), tensors["m"].to(device), tensors["v"].to(device),
                  tensors["lam"].to(device), int(meta["step"]), list(meta["history"]))


def threshold_circuit(graph: Graph, theta: Tensor, edges: int) -> tuple[Tensor, float]:
    """The largest circuit ``prune(theta >= t)`` with at most `edges` edges, and its threshold
    `t` (infinite when even the top logit's circuit is too large), found by bisection over the
    logits' distinct values: the pruned size only grows as `t` falls, since a path inside a
    smaller mask is inside every larger one.

    >>> from circuits.graph import Graph
    >>> g = Graph(1, 1)
    >>> theta = torch.zeros(g.valid.shape)
    >>> for name, v in (("input->a0.h0<v>", 3.0), ("a0.h0->logits", 2.0), ("input->m0", 1.0),
    ...                 ("m0->logits", 0.5)):
    ...     theta[g.edge_index(name)] = v
    >>> mask, t = threshold_circuit(g, theta, 2)
    >>> sorted(e.name for e in g.edges() if mask[g.edge_index(e)]), t
    (['a0.h0->logits', 'input->a0.h0<v>'], 1.0)
    """
    values = torch.unique(theta[graph.valid].float()).sort(descending=True).values.tolist()
    best, best_t = torch.zeros_like(graph.valid), math.inf
    lo, hi = 0, len(values)  # the k-th mask keeps theta >= values[k - 1]; sizes grow with k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        mask = prune(graph, (theta >= values[mid - 1]) & graph.valid)
        if int(mask.sum()) <= edges:
            best, best_t, lo = mask, values[mid - 1], mid
        else:
            hi = mid - 1
    return best, best_t
