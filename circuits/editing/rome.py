"""ROME: write one fact with a rank-one change of one MLP's output projection (Meng et al.,
2022, "Locating and Editing Factual Associations in GPT").

The projection maps keys ``k`` (MLP hidden activations) to values. The key of the edit, ``k*``,
is the key at the subject's last token, averaged over the prompt after a few context prefixes;
the value change ``δ`` is optimised so that adding it to the MLP output there makes the model
continue the prompt with the new target. The smallest change of ``W`` (in the metric of the key
covariance ``C``) that maps ``k*`` to ``W k* + δ`` is rank one:
``ΔW = δ (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from circuits.editing.edits import (
    Edit,
    Rows,
    check_edits,
    contexts,
    key_text,
    neutral_contexts,
    rows,
)
from circuits.editing.stats import Projection, capture_keys, key_covariance, projection
from circuits.errors import OptionError
from circuits.model import Model
from circuits.nodes import NodeSites

__all__ = ["ValueOptions", "REFERENCE_OPTIONS", "options_for", "rank_one_update", "rome",
           "covariance", "optimise_value", "keys_at"]


@dataclass(frozen=True)
class ValueOptions:
    """How the value change ``δ`` is optimised (defaults follow the ROME paper's GPT-2 runs).

    Attributes
    ----------
    steps : int
        Adam steps at most (stops early once the target's loss is below 0.05).
    lr : float
    kl_weight : float
        Weight of the KL divergence keeping ``"{subject} is a"`` predictions as they were.
    weight_decay : float
        Weight of ``|δ|² / |v|²`` (``v`` the original output at the subject).
    clamp : float
        ``|δ|`` is kept at most ``clamp * |v|``.
    n_contexts, context_tokens, seed : int
        Context prefixes sampled from the model (`circuits.editing.edits.contexts`); those
        that change the model's answer to the prompt are dropped
        (`circuits.editing.edits.neutral_contexts`).
    restarts : int
        Further tries from seeded random starts (of the norm of the original output) when the
        start from zero ends with the target's loss above `STUCK`: from zero, Adam can settle
        where the target's loss stays high; the try with the lowest loss is kept.
    """

    steps: int = 25
    lr: float = 0.5
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    n_contexts: int = 4
    context_tokens: int = 5
    seed: int = 0
    restarts: int = 3


# The shipped reference models (`circuits.zoo`) have 4 layers of width 128 and were trained on
# one sentence per row: a sampled prefix is outside what they saw (it changes their answers), and
# their early MLPs write little next to the residual stream, so the value needs more room than
# the paper's clamp of 4 times the MLP's output and a lighter weight decay.
REFERENCE_OPTIONS = ValueOptions(lr=0.1, kl_weight=0.0, weight_decay=0.1, clamp=100, steps=100,
                                 n_contexts=0, restarts=6)


def options_for(model: Model) -> ValueOptions:
    """`REFERENCE_OPTIONS` for a shipped reference model, else the paper's `ValueOptions()`.

    Examples
    --------
    >>> from circuits import load_model
    >>> from circuits.testing import tiny_model
    >>> options_for(load_model("factual-gpt2-4l")).n_contexts, options_for(tiny_model("gpt2")).lr
    (0, 0.5)
    """
    from circuits.zoo import models_dir

    shipped = models_dir().resolve()
    files = getattr(model, "_files", ()) or ()
    if any(Path(f).resolve().parent.parent == shipped for f in files):
        return REFERENCE_OPTIONS
    return ValueOptions()


# the target's mean negative log-likelihood above which the value's optimisation is retried
# (p(target) below about 0.5)
STUCK = 0.7


def rank_one_update(weight: Tensor, key: Tensor, value: Tensor, cov: Tensor,
                    ridge: float = 1e-6) -> Tensor:
    """``ΔW = (v − W k) (C⁻¹k)ᵀ / ((C⁻¹k)ᵀ k)``: the change of `weight` ``[out, in]`` that maps
    `key` to `value` and changes ``W x`` least on average over keys of covariance `cov`.

    `ridge` times the mean diagonal of `cov` is added to it before solving, so a covariance
    estimated from fewer tokens than it has rows can still be inverted.

    Examples
    --------
    >>> w, c = torch.zeros(2, 2), torch.eye(2)
    >>> rank_one_update(w, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 4.0]), c, ridge=0)
    tensor([[3., 0.],
            [4., 0.]])
    """
    weight, key, value = weight.double(), key.double(), value.double()
    u = solve(cov, key, ridge)  # [in]
    return (torch.outer(value - weight @ key, u) / (u @ key)).float()


def solve(cov: Tensor, rhs: Tensor, ridge: float = 1e-6) -> Tensor:
    """``(C + ridge * mean(diag C) * I)⁻¹ rhs`` in float64."""
    cov = cov.double()
    eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    return torch.linalg.solve(cov + ridge * cov.diagonal().mean() * eye, rhs.double())


def rome(model: Model, edit: Edit, layer: int, sample: Sequence[str] | Tensor,
         options: ValueOptions | None = None, cache: str | os.PathLike | None = None,
         keep: Sequence[Edit] = ()) -> dict[str, Tensor]:
    """The weight change that writes `edit` into the MLP of `layer`.

    Parameters
    ----------
    model : Model
    edit : Edit
    layer : int
        The layer whose MLP output projection changes (one where causal tracing finds the
        subject recalled: ``circuits trace``).
    sample : sequence of str or Tensor
        Texts for the key covariance (`circuits.editing.stats.key_covariance`, cached), or the
        covariance ``[d_ff, d_ff]`` itself.
    options : ValueOptions, optional
        How the value is optimised (`options_for` the model when None).
    cache : path-like, optional
        The covariance cache folder.
    keep : sequence of Edit
        Edits already written (when writing several facts one after another). Those with the
        same key as `edit` (`circuits.editing.edits.key_text`: another fact about the same
        subject) share its value, which is then optimised to keep predicting their targets
        too. The others have other keys; holding their outputs fixed exactly as well was
        tried and rejected: on the factual model it kept every edit but cost far more of the
        neighbourhood and the neutral loss than it saved.

    Returns
    -------
    dict of str to Tensor
        Parameter name -> change, in the parameter's layout and dtype (apply with
        `circuits.editing.edits.applied` or `~circuits.editing.edits.edited`).

    Raises
    ------
    OptionError
        A bad edit (`circuits.editing.edits.check_edits`), a layer out of range, a covariance
        of the wrong shape, or an update that is not finite.

    Examples
    --------
    >>> import tempfile
    >>> from circuits import load_model
    >>> from circuits.editing.edits import applied
    >>> from circuits.tasks.factual import sentences
    >>> model = load_model("factual-gpt2-4l")
    >>> prompt = "The landmark Big Ben is located in the city of"
    >>> edit = Edit("Big Ben", prompt, "Rome")
    >>> deltas = rome(model, edit, 0, sentences(), cache=tempfile.mkdtemp())
    >>> ids = model.tokenize([prompt])
    >>> with applied(model, deltas):
    ...     model.tokenizer.decode(model.hf(ids).logits[0, -1].argmax())
    'Rome'
    """
    (target,) = check_edits(model, [edit])
    shared = [k for k in keep if key_text(k) == key_text(edit) and k != edit]
    kept_targets = check_edits(model, shared) if shared else []
    options = options_for(model) if options is None else options
    proj = projection(model, layer)
    cov = covariance(model, layer, sample, proj, cache)
    templates = contexts(model, options.n_contexts, options.context_tokens, options.seed)
    r = edit_rows(model, edit, target, templates)
    parts = [(r, target)] + [(edit_rows(model, k, t, templates), t)
                             for k, t in zip(shared, kept_targets, strict=True)]
    key = keys_at(model, proj, r).mean(0)  # [d_ff]
    mlp = model.hf.get_submodule(NodeSites.of(model).mlp[layer])
    delta = optimise_value(model, mlp, edit, parts, options)
    weight = proj.weight()
    change = rank_one_update(weight, key, weight @ key + delta, cov)
    return {proj.param: proj.stored(finite(change, edit.subject))}


def finite(change: Tensor, what: str) -> Tensor:
    """`change`, or one line when it holds a NaN or infinity."""
    if not bool(torch.isfinite(change).all()):
        raise OptionError(f"the weight change for {what} is not finite; use a larger or more "
                          "varied text sample for the key covariance, or another layer")
    return change


def covariance(model: Model, layer: int, sample: Sequence[str] | Tensor, proj: Projection,
                cache: str | os.PathLike | None) -> Tensor:
    """The key covariance of `layer`: given (its shape checked), or computed from texts (and
    cached: `circuits.editing.stats.key_covariance`)."""
    d_ff = proj.weight().shape[1]
    if not isinstance(sample, Tensor):
        return key_covariance(model, layer, sample, cache=cache)
    if tuple(sample.shape) != (d_ff, d_ff):
        raise OptionError(f"the key covariance of layer {layer} must be [{d_ff}, {d_ff}], got "
                          f"{list(sample.shape)}; compute it with key_covariance")
    return sample


def keys_at(model: Model, proj: Projection, r: Rows) -> Tensor:
    """The keys ``[rows, d_ff]`` at each row's subject position."""
    with torch.no_grad(), capture_keys(proj) as keys:
        model.hf(r.ids, attention_mask=r.mask)
    return keys[0][torch.arange(len(r.ids)), r.subject].float()


def outputs_at(model: Model, module: nn.Module, r: Rows) -> Tensor:
    """What `module` outputs ``[rows, d_model]`` at each row's subject position."""
    seen: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(_hidden(out)))
    try:
        with torch.no_grad():
            model.hf(r.ids, attention_mask=r.mask)
    finally:
        handle.remove()
    return seen[0][torch.arange(len(r.ids)), r.subject].float()


def _hidden(out: Tensor | tuple) -> Tensor:
    """The hidden states of a module's output (decoder layers may return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _adding(module: nn.Module, delta: Tensor, r: Rows) -> Iterator[None]:
    """Add `delta` to `module`'s output at each row's subject position for the block."""
    def hook(_m: nn.Module, _a: tuple, out: Tensor | tuple) -> Tensor | tuple:
        hidden = _hidden(out)
        at = (torch.arange(len(hidden), device=hidden.device), r.subject)
        new = hidden.index_put(at, hidden[at] + delta.to(hidden.dtype))
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def edit_rows(model: Model, edit: Edit, target: Sequence[int], templates: Sequence[str]) -> Rows:
    """The rows of `edit`'s prompt after each of `templates` that leaves the model's answer to
    it as it was (`circuits.editing.edits.neutral_contexts`)."""
    kept = neutral_contexts(model, templates, edit.prompt)
    return rows(model, [t.format(edit.prompt) for t in kept], edit.subject, target)


def optimise_value(model: Model, module: nn.Module, edit: Edit,
                   parts: Sequence[tuple[Rows, Sequence[int]]], options: ValueOptions) -> Tensor:
    """The change ``δ`` ``[d_model]`` of `module`'s output at the subject that makes the model
    continue the rows of each part with its target (the mean of the parts' losses), while
    ``"{subject} is a"`` keeps its prediction and ``|δ|`` stays small. Several parts are
    several facts about one subject, whose key is the same: one value must carry them all.

    Adam from zero; when that ends with the target's loss above `STUCK`, up to
    ``options.restarts`` more tries from seeded random starts, keeping the lowest loss.
    """
    kl_rows = rows(model, [f"{edit.subject} is a"], edit.subject)
    base = outputs_at(model, module, parts[0][0])[0]  # [d_model]: the output at the prompt
    with torch.no_grad():
        before = _last_logprobs(model, kl_rows)
    targets = [torch.tensor(list(t), device=r.ids.device) for r, t in parts]
    limit = options.clamp * base.norm()
    gen = torch.Generator().manual_seed(options.seed)

    def loss_of(delta: Tensor) -> tuple[Tensor, float]:
        nll = torch.zeros((), device=delta.device)
        for (r, _), target in zip(parts, targets, strict=True):
            with _adding(module, delta, r):
                nll = nll + _target_nll(model, r, target) / len(parts)
        loss = nll + options.weight_decay * delta.pow(2).sum() / base.pow(2).sum()
        if options.kl_weight:
            with _adding(module, delta, kl_rows):
                after = _last_logprobs(model, kl_rows)
            loss = loss + options.kl_weight * F.kl_div(after, before, log_target=True,
                                                       reduction="batchmean")
        return loss, float(nll.detach())

    best: tuple[float, Tensor] | None = None
    for attempt in range(1 + max(0, options.restarts)):
        start = torch.zeros_like(base) if attempt == 0 else \
            torch.randn(base.shape, generator=gen).to(base) * base.norm() / base.numel() ** 0.5
        delta = start.clone().requires_grad_(True)
        adam = torch.optim.Adam([delta], lr=options.lr)
        for _ in range(options.steps):
            loss, nll = loss_of(delta)
            if nll < 0.05:
                break
            (delta.grad,) = torch.autograd.grad(loss, [delta])  # no grads land on the weights
            adam.step()
            with torch.no_grad():
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
        with torch.no_grad():
            loss, nll = loss_of(delta)
        if best is None or float(loss) < best[0]:
            best = (float(loss), delta.detach())
        if nll <= STUCK:
            break
    return best[1]


def _target_nll(model: Model, r: Rows, target: Tensor) -> Tensor:
    """Mean negative log-likelihood of `target` after each row's prompt."""
    logp = model.hf(r.ids, attention_mask=r.mask).logits.float().log_softmax(-1)
    rows_i = torch.arange(len(r.ids), device=r.ids.device)[:, None]
    where = r.answer[:, None] + torch.arange(len(target), device=r.ids.device)  # [rows, tgt]
    return -logp[rows_i, where, target].mean()


def _last_logprobs(model: Model, r: Rows) -> Tensor:
    """Log-probabilities ``[rows, vocab]`` of the next token after each row."""
    logits = model.hf(r.ids, attention_mask=r.mask).logits.float()
    return logits[torch.arange(len(r.ids)), r.answer].log_softmax(-1)
