"""Direct logit attribution: what each head and MLP writes, directly, to the task metric.

The residual stream at the last position is a sum of writes: the embeddings (``input``), each
head's ``z_h W_O^h``, each attention output bias, each MLP's output. The final norm is affine
once its scale (LayerNorm's ``1 / sigma``, RMSNorm's ``1 / rms``) is frozen at its value on the
real residual, the unembedding is linear, and a metric linear in the logits (logit difference)
is linear in the logits; so the metric splits exactly into one term per write plus constants
(attention biases, the final norm's bias, the unembedding's bias, the metric's own offset).
A final logit soft-cap (Gemma-2) is frozen the same way: each logit's factor
``cap * tanh(z / cap) / z`` is taken from the real run. Terms and constants add up to the
metric of the model's own logits.

Writes are read through nnsight at the node sites of `circuits.nodes` (the residual entering
layer 0 and after each layer, and each head's slice of the attention output projection's input),
so this runs on any Hugging Face causal LM whose blocks add attention and MLP outputs to the
residual. Heads' writes come from the family adapter where there is one (which also applies
Gemma-2's post-attention norm, its scale frozen); otherwise from the output projection's weight
columns, and the MLP write, taken as the layer's residual update minus its attention write, is
checked against the MLP module's output.

Contrastive attribution (``contrast=True``) runs the same split on the corrupted prompts too and
reports each term's clean value minus its corrupted value: what a component writes *because of*
the difference between the prompts. A head that pushes the answer on every prompt (a prior, a
positional copy) has a large plain term and a small contrastive one. Each run freezes its own
norm scale, so the contrastive terms and constants add up to ``metric(clean) -
metric(corrupted)`` exactly, as the plain ones add up to ``metric(clean)``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import outputs  # outputs.progress_bar: tests replace it there
from ..adapters import Adapter, adapter_for
from ..batch import Batch
from ..errors import OptionError, UnsupportedModelError
from ..io import write_atomic
from ..metrics import Metric
from ..model import Model
from ..nodes import NodeSites, collect
from ..tables import text_table
from ..task import Task
from .lens import HALF, Data, Unembedding, batches_of, metric_of, save_json

CONSTANTS = ("attention biases", "final-norm bias", "unembedding bias", "metric offset")


# -- the final norm, frozen -----------------------------------------------------------------------
@dataclass(frozen=True)
class FrozenNorm:
    """A LayerNorm or RMSNorm with its scale fixed: ``v -> P(v) * scale * gain + bias``, with
    ``P`` the centring (LayerNorm) or the identity (RMSNorm).

    Attributes
    ----------
    center : bool
    scale : Tensor
        ``[b, 1]`` per prompt, from the real residual.
    gain, bias : Tensor
        ``[d]``.
    """

    center: bool
    scale: Tensor
    gain: Tensor
    bias: Tensor

    def __call__(self, v: Tensor) -> Tensor:
        """``[b, d]`` -> ``[b, d]``: the norm with its scale frozen."""
        return self.linear(v) + self.bias

    def linear(self, v: Tensor) -> Tensor:
        """The linear part ``P(v) * scale * gain`` of ``[..., b, d]``."""
        if self.center:
            v = v - v.mean(-1, keepdim=True)
        return v * self.scale * self.gain

    def read(self, u: Tensor) -> Tensor:
        """``r`` ``[b, d]`` with ``r . v == u . linear(v)`` for every ``v`` (``P`` is
        symmetric)."""
        r = u * self.scale * self.gain
        return r - r.mean(-1, keepdim=True) if self.center else r


def freeze_norm(norm: nn.Module, x: Tensor) -> FrozenNorm:
    """The final norm `norm` with its scale frozen at residuals `x` ``[b, d]``, in float64.

    The norm's kind is found by which of LayerNorm, RMSNorm and RMSNorm with a ``1 + w`` gain
    (Gemma) reproduces its output on `x`.

    Raises
    ------
    UnsupportedModelError
        None of them does.

    Examples
    --------
    >>> import torch
    >>> norm, x = torch.nn.LayerNorm(4), torch.randn(2, 4)
    >>> frozen = freeze_norm(norm, x)
    >>> frozen.center, torch.allclose(frozen(x.double()).float(), norm(x), atol=1e-6)
    (True, True)
    """
    d = x.shape[-1]
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 0.0
    gain = torch.ones(d, dtype=torch.float64, device=x.device) if weight is None else (
        weight.detach().double())
    shift = torch.zeros_like(gain) if bias is None else bias.detach().double()
    with torch.no_grad():
        real = norm(x).double()  # [b, d]
    xs = x.double()
    tol = (2e-2 if x.dtype in HALF else 1e-4) * (1.0 + float(real.abs().max()))
    for center, offset in ((True, 0.0), (False, 0.0), (False, 1.0)):
        xc = xs - xs.mean(-1, keepdim=True) if center else xs
        scale = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)  # [b, 1]
        frozen = FrozenNorm(center, scale, gain + offset, shift)
        if float((frozen(xs) - real).abs().max()) <= tol:
            return frozen
    raise UnsupportedModelError(
        f"the final norm {type(norm).__name__} is neither a LayerNorm nor an RMSNorm (with a w or "
        "1 + w gain), so its scale cannot be frozen for direct logit attribution")


def linear_metric(fn: Metric, batch: Batch, logits: Tensor) -> tuple[Tensor, Tensor]:
    """The gradient ``g`` ``[b, V]`` and offset ``m0`` ``[b]`` of a metric that is linear in the
    logits (``fn(L) = g . L + m0``), checked at `logits` ``[b, V]`` (float64).

    Raises
    ------
    OptionError
        The metric is not linear in the logits.
    """
    zero = torch.zeros_like(logits, requires_grad=True)
    with torch.enable_grad():
        m0 = fn(zero, batch)  # [b]
        (g,) = torch.autograd.grad(m0.sum(), zero, allow_unused=True)
    g = torch.zeros_like(logits) if g is None else g
    m0 = m0.detach()
    # a fixed probe from a generator of its own: the caller's random state is left alone
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    probe = logits + noise.to(logits)
    for point in (logits, probe):
        want = fn(point, batch).double()
        got = (g * point).sum(-1) + m0
        if float((want - got).abs().max()) > 1e-6 * (1.0 + float(want.abs().max())):
            raise OptionError(
                f"direct logit attribution splits a metric that is linear in the logits, and "
                f"{fn.name!r} is not; use metric='logit-diff'")
    return g, m0


# -- the result -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DLA:
    """Each component's direct contribution to the metric, averaged over the prompts.

    ``embed + heads.sum() + mlps.sum() + constant == total``. With ``contrast`` every value is
    the clean prompts' minus the corrupted prompts' (``total`` is ``metric(clean) -
    metric(corrupted)``), and `clean` and `corrupt` hold the two plain attributions.

    Attributes
    ----------
    heads : Tensor
        ``[n_layers, n_heads]`` float64.
    mlps : Tensor
        ``[n_layers]`` float64.
    embed : float
        The embeddings' (``input``) direct term.
    constant : float
        The sum of `constants`.
    constants : dict[str, float]
        Attention output biases, the final norm's bias, the unembedding's bias and the metric's
        offset (the metric of all-zero logits), each through the frozen scale.
    total : float
        The metric of the model's own logits.
    metric, model, task : str
    n_prompts : int
    contrast : bool
        Whether the values are clean minus corrupted.
    clean, corrupt : DLA or None
        With ``contrast``: the plain attribution on the clean and on the corrupted prompts.
    """

    heads: Tensor
    mlps: Tensor
    embed: float
    constant: float
    constants: dict[str, float]
    total: float
    metric: str
    model: str
    task: str
    n_prompts: int
    contrast: bool = False
    clean: DLA | None = field(default=None, compare=False, repr=False)
    corrupt: DLA | None = field(default=None, compare=False, repr=False)

    @property
    def error(self) -> float:
        """``total`` minus the sum of every term (rounding only: ~1e-6)."""
        parts = self.embed + float(self.heads.sum()) + float(self.mlps.sum()) + self.constant
        return self.total - parts

    def by_node(self) -> dict[str, float]:
        """Node name (``input``, ``a{l}.h{h}``, ``m{l}``, as in the graph) -> direct term."""
        out = {"input": self.embed}
        for layer, row in enumerate(self.heads.tolist()):
            out.update({f"a{layer}.h{h}": v for h, v in enumerate(row)})
            out[f"m{layer}"] = float(self.mlps[layer])
        return out

    def table(self) -> str:
        """A layer x (heads, MLP) grid of the terms, then the embeddings, constants and total.

        Examples
        --------
        >>> from circuits.testing import make_batch, tiny_gpt2
        >>> print(direct_logit_attribution(tiny_gpt2(), make_batch(vocab=32)).table())
        ... # doctest: +ELLIPSIS
        direct logit attribution, tiny-gpt2-2l2h16d, 4 prompts, metric logit-diff
        layer  h0 ... mlp
        ...
        total (model's metric)  ...
        """
        grid = [(str(layer), *(f"{v:+.4f}" for v in row), f"{float(self.mlps[layer]):+.4f}")
                for layer, row in enumerate(self.heads.tolist())]
        header = ("layer", *(f"h{h}" for h in range(self.heads.shape[1])), "mlp")
        summary = [("input (embeddings)", f"{self.embed:+.4f}")]
        summary += [(name, f"{value:+.4f}") for name, value in self.constants.items()]
        if self.contrast and self.clean is not None and self.corrupt is not None:
            summary += [("model's metric, clean prompts", f"{self.clean.total:+.4f}"),
                        ("model's metric, corrupted prompts", f"{self.corrupt.total:+.4f}"),
                        ("total (clean - corrupted)", f"{self.total:+.4f}")]
        else:
            summary.append(("total (model's metric)", f"{self.total:+.4f}"))
        summary.append(("sum of terms - total", f"{-self.error:+.2e}"))
        kind = "contrastive direct logit attribution (clean - corrupted)" if self.contrast else (
            "direct logit attribution")
        return (f"{kind}, {self.model}, {self.n_prompts} prompts, metric {self.metric}\n"
                f"{text_table(grid, header=header)}\n\n{text_table(summary)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: heads as a list of rows, MLPs, embeddings, constants, total; with
        ``contrast``, also ``clean`` and ``corrupt``, the two plain attributions."""
        out = dict(model=self.model, task=self.task, metric=self.metric,
                   n_prompts=self.n_prompts, contrast=self.contrast, heads=self.heads.tolist(),
                   mlps=self.mlps.tolist(), embed=self.embed, constant=self.constant,
                   constants=dict(self.constants), total=self.total, error=self.error)
        if self.clean is not None and self.corrupt is not None:
            out.update(clean=self.clean.to_dict(), corrupt=self.corrupt.to_dict())
        return out

    def save_json(self, path: str | Path) -> Path:
        """`to_dict` as JSON, written atomically."""
        return save_json(self.to_dict(), path)

    def plot(self, path: str | Path) -> Path:
        """The layer x head heatmap with the MLPs as a last column (blue positive, red
        negative), as a PNG written atomically.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> from circuits.testing import make_batch, tiny_gpt2
        >>> dla = direct_logit_attribution(tiny_gpt2(), make_batch(vocab=32))
        >>> dla.plot(pathlib.Path(tempfile.mkdtemp()) / "dla.png").read_bytes()[:4]
        b'\\x89PNG'
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        L, H = self.heads.shape
        grid = torch.cat([self.heads, self.mlps[:, None]], 1).numpy()  # [L, H + 1]
        limit = float(abs(grid).max()) or 1.0
        fig, ax = plt.subplots(figsize=(1.2 + 0.55 * (H + 1), 1.4 + 0.45 * L))
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.axvline(H - 0.5, color="black", linewidth=1.5)
        ax.set_xticks(range(H + 1), [f"h{h}" for h in range(H)] + ["MLP"], fontsize=8)
        ax.set_yticks(range(L), [str(layer) for layer in range(L)], fontsize=8)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        if L * (H + 1) <= 256:
            for (row, col), value in zip(
                    ((r, c) for r in range(L) for c in range(H + 1)), grid.flatten(),
                    strict=True):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(value) > 0.6 * limit else "black")
        what = "clean - corrupted " if self.contrast else ""
        fig.colorbar(image, ax=ax, label=f"{what}direct effect on {self.metric}")
        ax.set_title(f"{self.task} on {self.model}{', clean - corrupted' if self.contrast else ''}"
                     f"\nembeddings {self.embed:+.2f}, constants {self.constant:+.2f}, total "
                     f"{self.total:+.2f}", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format="png")
        plt.close(fig)
        path = Path(path)
        write_atomic(path, buf.getvalue())
        return path


# -- running --------------------------------------------------------------------------------------
class _Writes:
    """Each head's write to the residual at the last position, and the layer's constant write,
    from the heads' ``z`` (through the family adapter, or the output projection's columns)."""

    def __init__(self, model: Model, sites: NodeSites) -> None:
        self.sites = sites
        self.hf = model.hf
        try:
            self.adapter: Adapter | None = adapter_for(model.hf)
        except UnsupportedModelError:
            self.adapter = None

    def __call__(self, layer: int, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """``z`` ``[b, H, dh]`` -> writes ``[H, b, d]`` and the constant ``[b, d]`` or None,
        in float64."""
        b, d = z.shape[0], self.sites.d_model
        if self.adapter is not None:
            writes, bias = self.adapter.attn_sources(layer, z[:, :, None])  # [H, b, 1, d]
            writes = writes[:, :, 0]
        else:
            proj = self.hf.get_submodule(self.sites.attn_out[layer])
            w = proj.weight if type(proj).__name__ == "Conv1D" else proj.weight.T  # [H*dh, d]
            w_o = w.reshape(self.sites.n_heads, self.sites.d_head, d)  # [H, dh, d]
            writes = torch.einsum("bhe,hed->hbd", z, w_o)
            bias = proj.bias
        if bias is not None:
            bias = torch.broadcast_to(bias, (b, 1, d))[:, 0].double()
        return writes.double(), bias


def direct_logit_attribution(
    model: Model,
    data: Data,
    *,
    metric: str | Metric | Callable | None = None,
    batch_size: int = 32,
    contrast: bool = False,
) -> DLA:
    """Each head's and MLP's direct contribution to the metric through the unembedding, with the
    final norm's scale frozen, so the terms and constants add up to the metric.

    Parameters
    ----------
    model : Model
        Any Hugging Face causal LM whose layers add an attention output and an MLP output to
        the residual (every family with an adapter, and e.g. Phi and GPT-J).
    data : Task, Batch or list of Batch
        The prompts; the metric reads the last position of the clean prompts.
    metric : str, Metric or callable, optional
        A metric linear in the logits (default: the task's, logit difference for batches).
    batch_size : int
        Prompts per forward when `data` is a task.
    contrast : bool
        Attribute ``metric(clean) - metric(corrupted)`` instead: every term is the clean
        prompts' minus the corrupted prompts' (same answers), each run with its own norm scale.

    Returns
    -------
    DLA
        Mean over the prompts of each term; ``embed + heads.sum() + mlps.sum() + constant``
        equals ``total``, the metric of the model's logits (with `contrast`: its clean minus
        corrupted difference, the two plain attributions in ``clean`` and ``corrupt``).

    Raises
    ------
    OptionError
        The metric is not linear in the logits, or `data` is not prompts.
    UnsupportedModelError
        The final norm, unembedding or the blocks are not of a kind this reads.

    Examples
    --------
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> dla = direct_logit_attribution(tiny_gpt2(), make_batch(vocab=32))
    >>> tuple(dla.heads.shape), tuple(dla.mlps.shape), abs(dla.error) < 1e-5
    ((2, 2), (2,), True)
    >>> both = direct_logit_attribution(tiny_gpt2(), make_batch(vocab=32), contrast=True)
    >>> abs(both.total - (both.clean.total - both.corrupt.total)) < 1e-9, abs(both.error) < 1e-5
    (True, True)
    """
    fn = metric_of(data, metric)
    batches = batches_of(model, data, batch_size)
    sites = NodeSites.of(model)
    unembed = Unembedding.of(model)
    head = unembed.head
    if not isinstance(getattr(head, "weight", None), Tensor) or head.weight.dim() != 2:
        raise UnsupportedModelError(f"the unembedding of {type(model.hf).__name__} is not a "
                                    "linear layer; direct logit attribution needs one")
    writes_of = _Writes(model, sites)
    L = sites.n_layers
    names = ["input", *(f"resid{layer}" for layer in range(L)),
             *(f"a{layer}.h{h}" for layer in range(L) for h in range(sites.n_heads)),
             *((f"m{layer}" for layer in range(L)) if writes_of.adapter is None else ())]
    runs = ("clean", "corrupt") if contrast else ("clean",)
    sums = {run: _Sums(L, sites.n_heads) for run in runs}

    total = sum(b.size for b in batches)
    with torch.no_grad(), outputs.progress_bar(total, "direct logit attribution", "prompt") as bar:
        for i, batch in enumerate(batches):
            reference = None
            for run in runs:
                acts = collect(model, getattr(batch, run), names)
                last = {name: act[:, -1] for name, act in acts.items()}  # [b, d] or [b, dh]
                if i == 0 and run == "clean":
                    ids = batch.clean[:8]
                    unembed.check(model, ids, last[f"resid{L - 1}"][:8])
                terms, logits = _batch_terms(model, batch, fn, last, writes_of, unembed,
                                             reference)
                reference = logits if reference is None else reference  # the clean logits
                sums[run].add(terms, batch.size)
            bar.update(batch.size)
    task = data.name if isinstance(data, Task) else "batches"
    plain = {run: s.result(fn.name, model.name, task) for run, s in sums.items()}
    if not contrast:
        return plain["clean"]
    clean, corrupt = plain["clean"], plain["corrupt"]
    constants = {k: clean.constants[k] - corrupt.constants[k] for k in CONSTANTS}
    return DLA(heads=clean.heads - corrupt.heads, mlps=clean.mlps - corrupt.mlps,
               embed=clean.embed - corrupt.embed, constant=sum(constants.values()),
               constants=constants, total=clean.total - corrupt.total, metric=fn.name,
               model=model.name, task=task, n_prompts=clean.n_prompts, contrast=True,
               clean=clean, corrupt=corrupt)


class _Sums:
    """Running sums of one run's per-prompt terms, and their means as a `DLA`."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        f64 = torch.float64
        self.sums: dict[str, Any] = dict(
            heads=torch.zeros(n_layers, n_heads, dtype=f64), mlps=torch.zeros(n_layers, dtype=f64),
            embed=0.0, total=0.0, **{name: 0.0 for name in CONSTANTS})
        self.n = 0

    def add(self, terms: dict[str, Tensor], size: int) -> None:
        """Add one batch's ``[b, ...]`` terms."""
        for key, value in terms.items():
            self.sums[key] = self.sums[key] + value.sum(0).cpu()
        self.n += size

    def result(self, metric: str, model: str, task: str) -> DLA:
        """The means over the prompts added."""
        s, n = self.sums, self.n
        constants = {name: float(s[name]) / n for name in CONSTANTS}
        return DLA(heads=s["heads"] / n, mlps=s["mlps"] / n, embed=float(s["embed"]) / n,
                   constant=sum(constants.values()), constants=constants,
                   total=float(s["total"]) / n, metric=metric, model=model, task=task,
                   n_prompts=n)


def _batch_terms(model: Model, batch: Batch, fn: Metric, last: dict[str, Tensor],
                 writes_of: _Writes, unembed: Unembedding, reference: Tensor | None = None
                 ) -> tuple[dict[str, Tensor], Tensor]:
    """Per prompt (first dimension ``b``): every term of one run of a batch, in float64, and
    the run's logits ``[b, V]``. `reference` is the clean run's logits (a metric that compares
    with them reads them; default: this run's own)."""
    sites = writes_of.sites
    L, H = sites.n_layers, sites.n_heads
    x_last = last[f"resid{L - 1}"]  # [b, d], model dtype
    real = unembed(x_last).float()  # [b, V]: the model's own logits
    batch = batch.with_clean_logits(real if reference is None else reference)
    g, m0 = linear_metric(fn, batch, real.double())  # [b, V], [b]
    frozen = freeze_norm(unembed.norm, x_last)
    if unembed.softcap is None:
        factor = torch.ones_like(g)
    else:  # each logit's soft-cap factor, frozen at the real pre-cap logit
        pre = unembed.head(unembed.norm(x_last)).double()
        cap = unembed.softcap
        safe = torch.where(pre == 0, torch.ones_like(pre), pre)
        factor = torch.where(pre == 0, torch.ones_like(pre), torch.tanh(safe / cap) * cap / safe)
    gf = g * factor  # [b, V]: d metric / d pre-cap logit
    cols = gf.abs().sum(0).nonzero().squeeze(1)
    head = unembed.head
    u = gf[:, cols] @ head.weight[cols].double()  # [b, d]: direction before the unembedding
    r = frozen.read(u)  # [b, d]: direction on the residual
    unembed_bias = torch.zeros_like(m0) if getattr(head, "bias", None) is None else (
        gf[:, cols] * head.bias[cols].double()).sum(-1)
    prev = last["input"].double()
    heads = torch.zeros(len(r), L, H, dtype=torch.float64, device=r.device)
    mlps = torch.zeros(len(r), L, dtype=torch.float64, device=r.device)
    attn_bias = torch.zeros_like(m0)
    for layer in range(L):
        z = torch.stack([last[f"a{layer}.h{h}"] for h in range(H)], 1)  # [b, H, dh]
        writes, bias = writes_of(layer, z)  # [H, b, d], [b, d] | None
        attn = writes.sum(0) + (0 if bias is None else bias)
        resid = last[f"resid{layer}"].double()
        mlp = resid - prev - attn  # [b, d]: the rest of the layer's update
        if writes_of.adapter is None:
            _check_mlp(model, layer, mlp, last[f"m{layer}"])
        heads[:, layer] = torch.einsum("hbd,bd->bh", writes, r)
        mlps[:, layer] = (mlp * r).sum(-1)
        if bias is not None:
            attn_bias = attn_bias + (bias * r).sum(-1)
        prev = resid
    return {"heads": heads, "mlps": mlps, "embed": (last["input"].double() * r).sum(-1),
            "total": fn(real, batch).double(), "attention biases": attn_bias,
            "final-norm bias": (u * frozen.bias).sum(-1), "unembedding bias": unembed_bias,
            "metric offset": m0}, real


def _check_mlp(model: Model, layer: int, mlp: Tensor, out: Tensor) -> None:
    """Refuse a block whose residual update is not its attention write plus its MLP output."""
    tol = (2e-2 if model.dtype in HALF else 1e-3) * (1.0 + float(out.abs().max()))
    if float((mlp - out.double()).abs().max()) > tol:
        raise UnsupportedModelError(
            f"layer {layer} of {type(model.hf).__name__} adds more to the residual than its "
            "attention output and MLP output (a norm after them?); direct logit attribution "
            "supports such blocks only through a family adapter")
