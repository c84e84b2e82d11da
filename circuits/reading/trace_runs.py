"""The runs of a causal trace: subject-noised forwards with clean states restored, batched.

`circuits.reading.tracing` says what is traced (options, subjects, the token groups and the
result); this module runs it. Each forward is one nnsight trace of ``c x samples x b`` rows,
variant-major: a variant restores the clean output of the sites its mask selects (at one position,
in a window of layers) in a run whose subject embeddings carry noise. The hook sites come from
`circuits.nodes.NodeSites`, so any Hugging Face causal LM works.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..model import Model
from ..nodes import NodeSites

KINDS = ("hidden", "mlp", "attn")


@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt: its index in the task, ids ``[p]``, answer ids ``[n]`` (-1 pads) and
    subject positions."""

    index: int
    ids: Tensor
    answers: Tensor
    subject: list[int]


@dataclass(frozen=True)
class Sites:
    """Module paths: the input embedding, and per layer the attention output projection, the MLP
    and the decoder layer."""

    n_layers: int
    embed: str
    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    hidden: tuple[str, ...]

    @classmethod
    def of(cls, model: Model) -> Sites:
        nodes = NodeSites.of(model)
        embedding = model.hf.get_input_embeddings()
        embed = next(name for name, module in model.hf.named_modules() if module is embedding)
        hidden = tuple(f"{nodes.layers}.{layer}" for layer in range(nodes.n_layers))
        return cls(nodes.n_layers, embed, nodes.attn_out, nodes.mlp, hidden)

    def order(self) -> list[tuple[str, int, str]]:
        """``(kind, layer, path)`` of every restorable site, in the order the forward runs."""
        return [(kind, layer, getattr(self, kind)[layer])
                for layer in range(self.n_layers) for kind in ("attn", "mlp", "hidden")]


@dataclass(frozen=True)
class Plan:
    """The restorations at one position: key (``hidden``, ``mlp``, ``mlp/1``, ...), kind, and
    the layers ``[lo, hi)`` restored, one row per (key, layer)."""

    keys: tuple[str, ...]
    kind: Tensor  # [v] index into KINDS
    lo: Tensor  # [v]
    hi: Tensor  # [v]
    n_layers: int

    @classmethod
    def of(cls, kinds: tuple[str, ...], n_layers: int, window: int) -> Plan:
        entries = []
        for kind in kinds:
            sizes = [1] if kind == "hidden" else [window] + ([1] if window > 1 else [])
            for size in sizes:
                key = kind if size == window or kind == "hidden" else f"{kind}/1"
                entries += [(key, KINDS.index(kind), max(0, layer - size // 2),
                             min(n_layers, layer - (-size // 2))) for layer in range(n_layers)]
        keys, kind, lo, hi = zip(*entries, strict=True)
        return cls(tuple(dict.fromkeys(keys)), torch.tensor(kind), torch.tensor(lo),
                   torch.tensor(hi), n_layers)


def noise_draws(seed: int, index: int, samples: int, n: int, d: int) -> Tensor:
    """The standard normal draws ``[samples, n, d]`` for the `n` subject tokens of prompt number
    `index`: the same on every device and however the prompts are grouped."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return torch.randn(samples, n, d, generator=torch.Generator().manual_seed(state))


def variants(plan: Plan, group: list[Prompt]) -> tuple[Tensor, ...]:
    """The runs of a group of prompts of one length: per variant its kind (-1: restore
    nothing, the corrupted run), layers ``[lo, hi)`` and position, then the position `t` and
    plan row `j` of every restoring variant."""
    p = len(group[0].ids)
    # Positions before every subject are clean in the noised run, and the last layer's outputs
    # are read only at the last position: restoring those changes nothing (effect 0, not run).
    start = min(q.subject[0] for q in group)
    t = torch.arange(start, p).repeat_interleave(len(plan.kind))  # [(p - start) * v]
    j = torch.arange(len(plan.kind)).repeat(p - start)
    live = (t == p - 1) | (plan.lo[j] < plan.n_layers - 1)
    t, j = t[live], j[live]
    # variant 0 restores nothing: the corrupted run
    kind = torch.cat([torch.tensor([-1]), plan.kind[j]])
    lo, hi = torch.cat([torch.tensor([0]), plan.lo[j]]), torch.cat([torch.tensor([0]), plan.hi[j]])
    pos = torch.cat([torch.tensor([-1]), t])
    return kind, lo, hi, pos, t, j


def trace_group(model: Model, sites: Sites, group: list[Prompt], plan: Plan, samples: int,
                 noise_std: float, seed: int, rows: int, step: Callable[[int], Any]
                 ) -> list[tuple[dict[str, Tensor], float, float]]:
    """Per prompt of one token length: its ``[n_layers, p]`` grids, p_clean and p_corrupt;
    `step(k)` after each forward of ``k`` noised runs."""
    b, p = len(group), len(group[0].ids)
    ids = torch.stack([q.ids for q in group])  # [b, p]
    answers = torch.stack([_pad(q.answers, group) for q in group])  # [b, n]
    clean, p_clean = clean_run(model, sites, ids, answers)
    d = clean[("hidden", 0)].shape[-1]
    noise = torch.zeros(samples, b, p, d)
    for i, q in enumerate(group):
        noise[:, i, q.subject] = noise_draws(seed, q.index, samples, len(q.subject), d)
    noise = (noise * noise_std).view(samples * b, p, d).to(model.device, model.dtype)
    kind, lo, hi, pos, t, j = variants(plan, group)
    base = samples * b
    per_run = max(1, rows // base)
    probs = []
    for first in range(0, len(pos), per_run):
        part = slice(first, first + per_run)
        masks = _masks(sites, kind[part], lo[part], hi[part], pos[part], p, model.device)
        probs.append(noised_run(model, sites, ids, answers, noise, clean, masks))
        step(len(pos[part]) * base)
    prob = torch.cat(probs).view(len(pos), samples, b).mean(1).double().cpu()  # [V, b]
    effect = torch.zeros(len(plan.kind), p, b, dtype=torch.float64)  # [v, p, b]
    effect[j, t] = prob[1:] - prob[:1]
    keys = [key for key in plan.keys for _ in range(plan.n_layers)]  # per plan row
    out = []
    for i in range(b):
        grids = {key: effect[[r for r, k in enumerate(keys) if k == key], :, i]
                 for key in plan.keys}  # [n_layers, p]
        out.append((grids, float(p_clean[i]), float(prob[0, i])))
    return out


def _pad(answers: Tensor, group: list[Prompt]) -> Tensor:
    """Answer ids padded with -1 to the widest of the group."""
    width = max(len(q.answers) for q in group)
    return torch.cat([answers, answers.new_full((width - len(answers),), -1)])


def _masks(sites: Sites, kind: Tensor, lo: Tensor, hi: Tensor, pos: Tensor, p: int,
           device: torch.device) -> dict[tuple[str, int], Tensor]:
    """Per restorable site, the ``[c, p]`` positions each variant restores (sites no variant
    touches are left out)."""
    at = pos[:, None] == torch.arange(p)[None]  # [c, p]
    masks = {}
    for name, layer, _ in sites.order():
        chosen = (kind == KINDS.index(name)) & (lo <= layer) & (layer < hi)  # [c]
        if bool(chosen.any()):
            masks[(name, layer)] = (at & chosen[:, None]).to(device)
    return masks


def _module(envoy: Any, path: str) -> Any:
    for part in path.split("."):
        envoy = getattr(envoy, part)
    return envoy


def _last_logits_only(model: Model) -> dict[str, int]:
    """``logits_to_keep=1`` where the model's forward takes it (no unembedding of the positions
    the metric does not read)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(
        model.hf.forward).parameters else {}


def _answer_prob(logits: Tensor, answers: Tensor) -> Tensor:
    """``[rows]`` probability of the answers (summed) from last-position logits ``[rows, V]``;
    `answers` ``[rows, n]`` padded with -1."""
    probs = torch.softmax(logits.float(), -1)
    picked = probs.gather(1, answers.clamp(min=0))
    return (picked * (answers >= 0)).sum(1)


def clean_run(model: Model, sites: Sites, ids: Tensor, answers: Tensor
               ) -> tuple[dict[tuple[str, int], Tensor], Tensor]:
    """Every restorable site's clean output ``[b, p, d]`` and the clean answer probability."""
    envoy = model.envoy
    acts: dict[tuple[str, int], Tensor] = {}
    with torch.no_grad(), envoy.trace(ids, **_last_logits_only(model)):
        for name, layer, path in sites.order():
            value = _module(envoy, path).output
            x = value[0] if isinstance(value, tuple) else value
            # OPT runs its MLP on [b * p, d]
            acts[(name, layer)] = x.reshape(*ids.shape, x.shape[-1]).clone()
        result = envoy.output
        acts[("logits", -1)] = (result.logits if hasattr(result, "logits") else result[0])[:, -1]
    return acts, _answer_prob(acts.pop(("logits", -1)), answers)


def noised_run(model: Model, sites: Sites, ids: Tensor, answers: Tensor, noise: Tensor,
                clean: dict[tuple[str, int], Tensor], masks: dict[tuple[str, int], Tensor]
                ) -> Tensor:
    """Answer probabilities ``[c * samples * b]`` of the subject-noised prompts, variant-major,
    each variant restoring the clean outputs its masks ``[c, p]`` select."""
    c = next(iter(masks.values())).shape[0] if masks else 1
    base = noise.shape[0]  # samples * b rows, sample-major
    b = ids.shape[0]
    envoy = model.envoy
    out: dict[str, Tensor] = {}  # assignments inside a trace do not leave it; a dict's items do
    with torch.no_grad(), envoy.trace(ids.repeat(c * base // b, 1), **_last_logits_only(model)):
        embedding = _module(envoy, sites.embed)
        x = embedding.output  # [c * base, p, d]
        embedding.output = (x.view(c, base, *x.shape[1:]) + noise).view_as(x)
        for name, layer, path in sites.order():
            if (name, layer) not in masks:
                continue
            module = _module(envoy, path)
            value = module.output
            packed = isinstance(value, tuple)
            x = value[0] if packed else value
            old = x.view(c, -1, b, ids.shape[1], x.shape[-1])  # [c, samples, b, p, d]
            mask = masks[(name, layer)][:, None, None, :, None]  # [c, 1, 1, p, 1]
            new = torch.where(mask, clean[(name, layer)][None, None].to(x.dtype), old).view_as(x)
            module.output = (new, *value[1:]) if packed else new
        result = envoy.output
        out["logits"] = (result.logits if hasattr(result, "logits") else result[0])[:, -1]
    return _answer_prob(out["logits"], answers.repeat(c * base // b, 1))
