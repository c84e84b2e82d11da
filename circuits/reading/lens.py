"""Logit lens: what the residual stream already predicts after each layer.

The residual stream entering the first layer (``input``) and after every decoder layer
(``resid0`` ... ``resid{L-1}``) is read at the last position through nnsight (the hook sites of
`circuits.nodes`, so any Hugging Face causal LM works) and decoded as the model decodes its last
residual: final norm, unembedding, soft-cap (`Unembedding`). Per layer the result holds the task
metric of those logits, the answer's rank (mean and median), top-1 accuracy and the KL divergence
from the model's own next-token distribution. After the last layer the lens *is* the model.

`circuits.reading.tuned_lens` runs the same readout with a learned affine translator per layer.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import outputs  # outputs.progress_bar: tests replace it there
from ..batch import Batch
from ..errors import OptionError, UnsupportedModelError
from ..io import dumps, write_atomic
from ..metrics import Metric, get_metric
from ..model import Model
from ..nodes import NodeSites, collect
from ..tables import text_table
from ..task import Task

Data = Task | Batch | Sequence[Batch]
# translate(index, h): the residual at hidden state `index` (0 = input) as the lens reads it
Translate = Callable[[int, Tensor], Tensor]
HALF = (torch.float16, torch.bfloat16)


# -- decoding a residual ------------------------------------------------------------------------
@dataclass(frozen=True)
class Unembedding:
    """How a model turns its last residual into logits: final norm, unembedding, soft-cap.

    Found in any Hugging Face causal LM: the norm is the last direct child of the base model
    whose class name contains "norm" (GPT-2's ``ln_f``, Llama's ``norm``, NeoX's
    ``final_layer_norm``, Phi's ``final_layernorm``), the unembedding is the output embedding,
    and ``final_logit_softcapping`` in the config gives the soft-cap (Gemma-2). `check` compares
    the result with the model's own logits, so a model that decodes otherwise is refused rather
    than misread.

    Attributes
    ----------
    norm : nn.Module
    head : nn.Module
        The unembedding (``lm_head``).
    softcap : float or None
        ``cap * tanh(logits / cap)`` on the logits.

    Examples
    --------
    >>> import torch
    >>> from circuits.testing import tiny_gpt2
    >>> model = tiny_gpt2()
    >>> unembed = Unembedding.of(model)
    >>> type(unembed.norm).__name__, unembed.softcap
    ('LayerNorm', None)
    >>> h = model.hf(torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states[-1]
    >>> tuple(unembed(h[:, -1]).shape)
    (1, 32)
    """

    norm: nn.Module
    head: nn.Module
    softcap: float | None = None

    @classmethod
    def of(cls, model: Model) -> Unembedding:
        """The final norm, unembedding and soft-cap of `model`.

        Raises
        ------
        UnsupportedModelError
            The model has no output embedding or no final norm module.
        """
        hf = model.hf
        head = hf.get_output_embeddings()
        base = getattr(hf, "base_model", None)
        norms = [] if base is None else [
            child for child in base.children() if "norm" in type(child).__name__.lower()]
        if head is None or not norms:
            raise UnsupportedModelError(
                f"found no {'output embedding' if head is None else 'final norm'} in "
                f"{type(hf).__name__}; the lens decodes residuals through the model's final "
                "norm and unembedding (a direct child of the base model named *Norm*, and "
                "get_output_embeddings())")
        cap = getattr(hf.config, "final_logit_softcapping", None)
        return cls(norms[-1], head, float(cap) if cap else None)

    def __call__(self, x: Tensor) -> Tensor:
        """``[..., d]`` residual -> ``[..., vocab]`` logits."""
        logits = self.head(self.norm(x))
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def check(self, model: Model, ids: Tensor, last: Tensor) -> None:
        """Refuse to go on when decoding the last layer's residual `last` ``[b, d]`` (at the
        last position of `ids` ``[b, p]``) does not give the model's own logits."""
        with torch.no_grad():
            real = model.hf(ids).logits[:, -1].float()  # [b, V]
            mine = self(last).float()
        tol = (2e-2 if model.dtype in HALF else 1e-4) * (1.0 + float(real.abs().max()))
        if float((mine - real).abs().max()) > tol:
            raise UnsupportedModelError(
                f"decoding the last residual of {type(model.hf).__name__} through "
                f"{type(self.norm).__name__} and the output embedding does not give the model's "
                "logits (the model rescales or post-processes them); the lens and direct logit "
                "attribution do not support it")


# -- inputs -------------------------------------------------------------------------------------
def batches_of(model: Model, data: Data, batch_size: int = 32) -> list[Batch]:
    """A Task tokenized for `model`, a Batch or a list of Batches, as a list on the model's
    device.

    Raises
    ------
    OptionError
        `data` is none of those, or holds no prompts.
    """
    if isinstance(data, Task):
        return data.batches(model.tokenizer, batch_size=batch_size, device=model.device,
                            max_length=model.context_length)
    items = [data] if isinstance(data, Batch) else list(data) if isinstance(data, Sequence) else []
    if not items or not all(isinstance(b, Batch) for b in items):
        raise OptionError(f"expected a Task, a Batch or a non-empty list of Batches, got "
                          f"{type(data).__name__}; build batches with task.batches(tokenizer)")
    return [b.to(model.device) for b in items]


def metric_of(data: Data, metric: str | Metric | Callable | None) -> Metric:
    """The metric asked for, else the task's, else logit difference."""
    if metric is not None:
        return get_metric(metric)
    return data.metric_fn if isinstance(data, Task) else get_metric("logit-diff")


def read_residuals(model: Model, ids: Tensor, positions: slice | int = -1) -> Tensor:
    """The residual stream entering layer 0 and after each layer, ``[L + 1, b, d]`` at one
    position (``[L + 1, b, p', d]`` for a slice of positions), from one traced forward."""
    sites = NodeSites.of(model)
    names = ["input"] + [f"resid{layer}" for layer in range(sites.n_layers)]
    acts = collect(model, ids, names)  # name -> [b, p, d]
    return torch.stack([acts[name][:, positions] for name in names])


def answer_rank(logits: Tensor, answers: Tensor) -> Tensor:
    """``[b]`` rank (1 = top) of the best-ranked answer among ``answers`` ``[b, n]`` (-1 pads):
    one plus the number of tokens whose logit is strictly higher.

    Non-finite logits never make a rank look good: a NaN logit of another token counts as
    higher than the answer's, and an answer whose own logit is NaN or infinite gets the worst
    rank, the vocabulary size.

    >>> answer_rank(torch.tensor([[0.5, 2.0, 1.0]]), torch.tensor([[2, -1]]))
    tensor([2])
    >>> nan = float("nan")
    >>> answer_rank(torch.tensor([[nan, 0.0, 1.0], [nan, nan, nan]]), torch.tensor([[2], [0]]))
    tensor([2, 3])
    """
    vocab = logits.shape[-1]
    picked = logits.gather(-1, answers.clamp(min=0))  # [b, n]
    # every comparison with NaN is false: count NaN logits as higher explicitly
    higher = (logits[:, None, :] > picked[:, :, None]) | logits.isnan()[:, None, :]  # [b, n, V]
    above = (higher.sum(-1) + 1).clamp(max=vocab)
    above = torch.where(picked.isfinite(), above, vocab)  # [b, n]
    return above.masked_fill(answers < 0, vocab + 1).min(-1).values


# -- the result ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LensResult:
    """What each layer's residual predicts at the last position, averaged over the prompts.

    Every per-layer tensor has ``L + 1`` entries: the residual entering layer 0 (``input``, the
    embeddings) and the residual after each layer.

    Attributes
    ----------
    kind : "logit" or "tuned"
    model, task : str
    metric : str
        The metric's name.
    layers : tuple[str, ...]
        ``("input", "resid0", ..., "resid{L-1}")``.
    values : Tensor
        ``[L + 1]`` mean metric of the lens logits.
    mean_rank, median_rank : Tensor
        ``[L + 1]`` rank of the answer (1 = top; the best-ranked one when there are several).
    top1 : Tensor
        ``[L + 1]`` fraction of prompts whose top token is an answer.
    kl : Tensor
        ``[L + 1]`` mean KL(model || lens) of the next-token distributions, in nats.
    model_value : float
        The metric of the model's own logits.
    n_prompts : int
    lens : TunedLens or None
        The translators of a tuned lens.
    nonfinite : Tensor or None
        ``[L + 1]`` prompts whose lens logits were not all finite at that layer (ranked last,
        see `answer_rank`; their metric and KL are NaN, written as null in JSON).
    """

    kind: str
    model: str
    task: str
    metric: str
    layers: tuple[str, ...]
    values: Tensor
    mean_rank: Tensor
    median_rank: Tensor
    top1: Tensor
    kl: Tensor
    model_value: float
    n_prompts: int
    lens: nn.Module | None = field(default=None, compare=False, repr=False)  # a TunedLens
    nonfinite: Tensor | None = field(default=None, compare=False)

    def rows(self) -> list[tuple[str, ...]]:
        """One row of formatted cells per layer."""
        return [(name, f"{v:.4f}", f"{mr:.1f}", f"{md:.1f}", f"{t:.1%}", f"{k:.4f}")
                for name, v, mr, md, t, k in zip(
                    self.layers, self.values.tolist(), self.mean_rank.tolist(),
                    self.median_rank.tolist(), self.top1.tolist(), self.kl.tolist(),
                    strict=True)]

    def table(self) -> str:
        """The per-layer table as aligned text.

        Examples
        --------
        >>> from circuits.testing import make_batch, tiny_gpt2
        >>> print(logit_lens(tiny_gpt2(), make_batch(vocab=32)).table())  # doctest: +ELLIPSIS
        logit lens, tiny-gpt2-2l2h16d, 4 prompts, metric logit-diff (model: ...)
        layer   logit-diff  mean rank  median rank  top-1  KL(model||lens)
        ...
        resid1  ...
        """
        head = (f"{self.kind} lens, {self.model}, {self.n_prompts} prompts, metric "
                f"{self.metric} (model: {self.model_value:.4f})")
        table = head + "\n" + text_table(
            self.rows(), header=("layer", self.metric, "mean rank", "median rank", "top-1",
                                 "KL(model||lens)"))
        bad = [] if self.nonfinite is None else [
            f"{name} ({int(k)})" for name, k in zip(self.layers, self.nonfinite.tolist(),
                                                    strict=True) if k]
        if bad:
            table += ("\nnon-finite lens logits, prompts ranked last: " + ", ".join(bad))
        return table

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the settings and one list per quantity, in layer order."""
        out = dict(
            kind=self.kind, model=self.model, task=self.task, metric=self.metric,
            n_prompts=self.n_prompts, model_value=self.model_value, layers=list(self.layers),
            values=self.values.tolist(), mean_rank=self.mean_rank.tolist(),
            median_rank=self.median_rank.tolist(), top1=self.top1.tolist(), kl=self.kl.tolist())
        if self.nonfinite is not None:
            out["nonfinite"] = [int(k) for k in self.nonfinite.tolist()]
        return out

    def plot(self, path: str | Path) -> Path:
        """Write the per-layer plot (metric, answer rank, KL) as a PNG; see `plot_lenses`."""
        return plot_lenses([self], path)


def plot_lenses(results: Sequence[LensResult], path: str | Path) -> Path:
    """Metric, answer rank and KL per layer of one or more lenses on the same prompts, as a PNG
    with three panels (one line per lens), written atomically.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> result = logit_lens(tiny_gpt2(), make_batch(vocab=32))
    >>> out = plot_lenses([result], pathlib.Path(tempfile.mkdtemp()) / "lens.png")
    >>> out.read_bytes()[:4]
    b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = results[0]
    x = list(range(len(first.layers)))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, r in enumerate(results):
        color = f"C{i}"
        axes[0].plot(x, r.values.tolist(), marker="o", color=color, label=f"{r.kind} lens")
        axes[1].plot(x, r.median_rank.tolist(), marker="o", color=color,
                     label=f"{r.kind} lens, median")
        axes[1].plot(x, r.mean_rank.tolist(), marker=".", linestyle=":", color=color,
                     label=f"{r.kind} lens, mean")
        axes[2].plot(x, r.kl.tolist(), marker="o", color=color, label=f"{r.kind} lens")
    axes[0].axhline(first.model_value, color="grey", linestyle="--", label="model")
    axes[0].set_ylabel(first.metric)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("answer rank (1 = top)")
    axes[2].set_ylabel("KL(model || lens), nats")
    for ax in axes:
        ax.set_xticks(x, first.layers, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("residual stream")
        ax.legend(fontsize=7)
    fig.suptitle(f"{first.task} on {first.model} ({first.n_prompts} prompts)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    path = Path(path)
    write_atomic(path, buf.getvalue())
    return path


def save_json(results: dict[str, Any], path: str | Path) -> Path:
    """`results` as indented strict JSON (a NaN or infinite number written as null), written
    atomically.

    Examples
    --------
    >>> import json, tempfile, pathlib
    >>> path = save_json({"kl": [0.5, float("nan")]}, pathlib.Path(tempfile.mkdtemp()) / "a.json")
    >>> json.loads(path.read_text())
    {'kl': [0.5, None]}
    """
    path = Path(path)
    write_atomic(path, (dumps(results, indent=2) + "\n").encode("utf-8"))
    return path


# -- running ------------------------------------------------------------------------------------
def run_lens(model: Model, data: Data, *, kind: str, translate: Translate | None = None,
             metric: str | Metric | Callable | None = None, batch_size: int = 32,
             lens: nn.Module | None = None) -> LensResult:
    """Read every layer's last-position residual, `translate` it (identity for the logit lens;
    the last layer is never translated), decode it and summarise per layer."""
    fn = metric_of(data, metric)
    batches = batches_of(model, data, batch_size)
    unembed = Unembedding.of(model)
    per: dict[str, list[Tensor]] = {"values": [], "ranks": [], "kl": [], "model": [], "bad": []}
    with torch.no_grad(), outputs.progress_bar(sum(b.size for b in batches), f"{kind} lens",
                                       "prompt") as bar:
        for i, batch in enumerate(batches):
            states = read_residuals(model, batch.clean)  # [L + 1, b, d]
            if i == 0:
                unembed.check(model, batch.clean[:8], states[-1, :8])
            final = unembed(states[-1]).float()  # [b, V]
            batch = batch.with_clean_logits(final)
            target = final.log_softmax(-1)
            n = len(states) - 1
            values, ranks, kl, bad = [], [], [], []
            for index, h in enumerate(states):
                if translate is not None and index < n:
                    h = translate(index, h)
                logits = unembed(h).float()  # [b, V]
                values.append(fn(logits, batch).double())
                ranks.append(answer_rank(logits, batch.answers))
                kl.append((target.exp() * (target - logits.log_softmax(-1))).sum(-1).double())
                bad.append(~logits.isfinite().all(-1))
            per["values"].append(torch.stack(values, 1))  # [b, L + 1]
            per["ranks"].append(torch.stack(ranks, 1).double())
            per["kl"].append(torch.stack(kl, 1))
            per["bad"].append(torch.stack(bad, 1))
            per["model"].append(fn(final, batch).double())
            bar.update(batch.size)
    values, ranks, kl = (torch.cat(per[k]).cpu() for k in ("values", "ranks", "kl"))
    task = data.name if isinstance(data, Task) else "batches"
    return LensResult(
        kind=kind, model=model.name, task=task, metric=fn.name,
        layers=("input", *(f"resid{layer}" for layer in range(len(values[0]) - 1))),
        values=values.mean(0), mean_rank=ranks.mean(0), median_rank=ranks.quantile(0.5, dim=0),
        top1=(ranks == 1).double().mean(0), kl=kl.mean(0),
        model_value=float(torch.cat(per["model"]).mean()), n_prompts=len(values), lens=lens,
        nonfinite=torch.cat(per["bad"]).sum(0).cpu())


def logit_lens(model: Model, data: Data, *, metric: str | Metric | Callable | None = None,
               batch_size: int = 32) -> LensResult:
    """The logit lens: each layer's residual decoded by the model's final norm and unembedding.

    Parameters
    ----------
    model : Model
        Any Hugging Face causal LM (the residual is read through nnsight).
    data : Task, Batch or list of Batch
        The prompts (a task is tokenized with the model's tokenizer); the lens reads the last
        position of the clean prompts.
    metric : str, Metric or callable, optional
        The metric per layer (default: the task's, logit difference for batches). ``kl``
        compares with the model's own distribution.
    batch_size : int
        Prompts per forward when `data` is a task.

    Returns
    -------
    LensResult
        Per layer (``input``, then after each layer): mean metric, mean and median answer rank,
        top-1 accuracy, KL from the model. The last layer's lens logits are the model's.

    Raises
    ------
    UnsupportedModelError
        No final norm or unembedding was found, or decoding the last residual does not give the
        model's logits.

    Examples
    --------
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> result = logit_lens(tiny_gpt2(), make_batch(vocab=32))
    >>> result.layers
    ('input', 'resid0', 'resid1')
    >>> abs(float(result.values[-1]) - result.model_value) < 1e-5, float(result.kl[-1]) < 1e-6
    (True, True)
    """
    return run_lens(model, data, kind="logit", metric=metric, batch_size=batch_size)
