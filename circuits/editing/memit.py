"""MEMIT: write many facts at once, spread over the MLPs of a range of layers (Meng et al., 2023,
"Mass-Editing Memory in a Transformer").

For each edit a residual-stream change at the subject's last token is optimised at the top
layer of the range (as ROME optimises its value), giving a target ``z*``. The layers are then
updated in order: at each, the keys ``K`` ``[d_ff, edits]`` are read with the earlier layers
already changed, the part of ``z* − z`` left for this layer is ``R = (z* − z) / (layers left)``,
and the least-squares change that maps ``K`` to ``R`` while keeping other keys' values, weighted
by ``λ C``, is ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from circuits.editing.edits import Edit, Rows, applied, check_edits, contexts, key_text
from circuits.editing.layer import check_layers
from circuits.editing.rome import (
    REFERENCE_OPTIONS,
    ValueOptions,
    covariance,
    edit_rows,
    finite,
    keys_at,
    optimise_value,
    options_for,
    outputs_at,
    solve,
)
from circuits.editing.stats import projection
from circuits.errors import OptionError
from circuits.model import Model
from circuits.nodes import NodeSites

__all__ = ["MEMIT_OPTIONS", "MEMIT_WEIGHT", "memit_defaults", "memit_update", "memit"]

# MEMIT's value options for GPT-2: the residual target is clamped harder than ROME's MLP value
MEMIT_OPTIONS = ValueOptions(clamp=0.75)
MEMIT_WEIGHT = 15_000.0  # the paper's λ for GPT-J
REFERENCE_WEIGHT = 10.0  # the shipped reference models' (benchmarks/editing.py)


def memit_defaults(model: Model) -> tuple[ValueOptions, float]:
    """The value options and covariance weight `memit` uses when given none: the paper's, or
    for a shipped reference model (`circuits.editing.rome.options_for`) that model's options
    and `REFERENCE_WEIGHT`."""
    options = options_for(model)
    if options is REFERENCE_OPTIONS:
        return REFERENCE_OPTIONS, REFERENCE_WEIGHT
    return MEMIT_OPTIONS, MEMIT_WEIGHT


def memit_update(keys: Tensor, residuals: Tensor, cov: Tensor, weight: float,
                 ridge: float = 0.0) -> Tensor:
    """``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` ``[out, in]`` for keys ``K`` ``[in, n]`` and residuals
    ``R`` ``[out, n]``: the change minimising ``|ΔW K − R|² + λ E|ΔW k|²`` over keys ``k`` of
    covariance ``C``.

    Examples
    --------
    >>> k, r = torch.eye(2), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> memit_update(k, r, torch.eye(2), weight=1.0)
    tensor([[0.5000, 1.0000],
            [1.5000, 2.0000]])
    """
    keys, residuals = keys.double(), residuals.double()
    system = weight * cov.double() + keys @ keys.T  # [in, in], symmetric
    return solve(system, keys @ residuals.T, ridge).T.float()


def memit(model: Model, edits: Sequence[Edit], layers: Sequence[int],
          sample: Sequence[str] | Sequence[Tensor], weight: float | None = None,
          options: ValueOptions | None = None, cache: str | os.PathLike | None = None
          ) -> dict[str, Tensor]:
    """The weight changes that write all `edits` into the MLPs of `layers`.

    Parameters
    ----------
    model : Model
    edits : sequence of Edit
    layers : sequence of int
        Consecutive or not, in any order (sorted here); the last is where ``z*`` is set.
    sample : sequence of str, or of Tensor
        Texts for the key covariances (cached, `circuits.editing.stats.key_covariance`), or one
        covariance per layer.
    weight : float, optional
        ``λ``, how much the covariance (the keys of ordinary text) weighs against the edits
        (`memit_defaults` when None: the paper's 15,000 for GPT-J).
    options : ValueOptions, optional
        How each value is optimised (`memit_defaults` when None). Edits whose prompts reach
        the same key (`circuits.editing.edits.key_text`: facts about one subject) share one
        value, optimised for all their targets.
    cache : path-like, optional

    Returns
    -------
    dict of str to Tensor
        Parameter name -> change, as `circuits.editing.rome.rome` returns.

    Raises
    ------
    OptionError
        A bad edit, a layer out of range, no layers, or an update that is not finite.

    Examples
    --------
    >>> import tempfile
    >>> from circuits import load_model
    >>> from circuits.editing.edits import applied
    >>> from circuits.tasks.factual import sentences
    >>> model = load_model("factual-gpt2-4l")
    >>> prompt = "The landmark Big Ben is located in the city of"
    >>> edits = [Edit("Big Ben", prompt, "Rome"), Edit("Big Ben", prompt.replace("city",
    ...                "country"), "Italy")]  # one subject: one value carries both
    >>> deltas = memit(model, edits, [0], sentences(), cache=tempfile.mkdtemp())
    >>> sorted(deltas)
    ['transformer.h.0.mlp.c_proj.weight']
    >>> with applied(model, deltas):
    ...     [model.tokenizer.decode(model.hf(model.tokenize([e.prompt])).logits[0, -1].argmax())
    ...      for e in edits]
    ['Rome', 'Italy']
    """
    targets = check_edits(model, edits)
    layers = check_layers(model, layers)
    default_options, default_weight = memit_defaults(model)
    options = default_options if options is None else options
    weight = default_weight if weight is None else weight
    projs = [projection(model, layer) for layer in layers]
    covs = _covariances(model, layers, sample, cache)
    top = model.hf.get_submodule(f"{NodeSites.of(model).layers}.{layers[-1]}")
    templates = contexts(model, options.n_contexts, options.context_tokens, options.seed)
    # facts about one subject share a key (the same text up to the subject): one value each
    groups: dict[str, list[int]] = {}
    for i, edit in enumerate(edits):
        groups.setdefault(key_text(edit), []).append(i)
    parts = [[(edit_rows(model, edits[i], targets[i], templates), targets[i]) for i in group]
             for group in groups.values()]
    all_rows = [group[0][0] for group in parts]
    wanted = torch.stack([outputs_at(model, top, group[0][0])[0]
                          + optimise_value(model, top, edits[members[0]], group, options)
                          for members, group in zip(groups.values(), parts, strict=True)], 1)
    deltas: dict[str, Tensor] = {}
    for i, (proj, cov) in enumerate(zip(projs, covs, strict=True)):
        with applied(model, deltas):
            keys = torch.stack([keys_at(model, proj, r).mean(0) for r in all_rows], 1)
            now = _plain_outputs(model, top, all_rows)  # [d_model, n]
        residuals = (wanted - now) / (len(projs) - i)
        change = finite(memit_update(keys, residuals, cov, weight), f"layer {proj.layer}")
        deltas[proj.param] = proj.stored(change)
    return deltas


def _covariances(model: Model, layers: list[int], sample: Sequence[str] | Sequence[Tensor],
                 cache: str | os.PathLike | None) -> list[Tensor]:
    """One key covariance per layer: given, or computed from the texts (cached)."""
    given = len(sample) > 0 and isinstance(sample[0], Tensor)
    if given and len(sample) != len(layers):
        raise OptionError(f"{len(sample)} covariances for {len(layers)} layers; pass one per "
                          "layer, or texts")
    return [covariance(model, layer, sample[i] if given else sample, projection(model, layer),
                        cache) for i, layer in enumerate(layers)]


def _plain_outputs(model: Model, module: torch.nn.Module, all_rows: list[Rows]) -> Tensor:
    """`module`'s output ``[d_model, edits]`` at each edit's subject in its plain prompt."""
    return torch.stack([outputs_at(model, module, r)[0] for r in all_rows], 1)
