"""Training sparse autoencoders and transcoders: on a tensor of activations (`fit_tensor`) or on
activations streamed from a model at a site (`train_sae`).

Written here rather than taken from a library: eai-sparsify trains TopK SAEs only, from Hugging
Face datasets through its own hooks, and pulls datasets, accelerate, schedulefree and
simple-parsing; sae-lens pins transformer-lens below 4, which conflicts with this package's
stack. The recipes are the published ones:

``topk`` (Gao et al. 2024)
    ``||y - y_hat||^2`` plus the auxiliary loss AuxK (weight 1/32): the dead features' top
    pre-activations reconstruct the error that the live ones leave. Unit-norm decoder rows.
``relu`` (Anthropic, "Towards Monosemanticity" and its April 2024 update)
    ``||y - y_hat||^2 + l1 * sum_i f_i ||W_dec[i]||``; the decoder rows are free.
``jumprelu`` (Rajamanoharan et al. 2024)
    ``||y - y_hat||^2 + l1 * L0``; the step functions in JumpReLU and in the L0 count pass a
    gradient to the (learned, log-parametrised) thresholds through a straight-through estimator
    with a rectangle kernel of width `bandwidth`. Unit-norm decoder rows.

Activations are scaled by one number so that ``E ||x||^2 = d`` (measured on the first batch), which
makes the defaults of `l1`, `lr` and `bandwidth` independent of the model's activation scale; the
scale is folded back into the weights at the end, so the saved SAE reads and writes the model's
own activations. ``b_dec`` starts at the first batch's mean. Adam, with the learning rate warmed up
over the first 5% of the steps and decayed linearly to 0 over the last 20%, and the sparsity
penalty warmed up over the first 5%. Everything is deterministic given the seed, and no global
random state is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import OptionError
from ..files import write_atomic
from ..model import Model
from ..outputs import progress_bar, sigint_held
from ..progress import weights_key
from ..task import prefix_ids
from .corpus import token_batches
from .sae import SAE, check_kind
from .sites import FeatureSite, read_sites, site_of

#: The sparsity coefficient `l1` by kind when none is given, on activations scaled to
#: ``E ||x||^2 = d``: the L1 weight of a ReLU SAE (Anthropic's April 2024 recipe takes 5 for wide
#: dictionaries of large models; at 5 small ones explain little of the variance) and the L0 weight
#: of a JumpReLU SAE.
DEFAULT_L1 = {"relu": 1.0, "jumprelu": 0.5}
AUX_WEIGHT = 1 / 32  # AuxK's weight (Gao et al. 2024)
DEAD_TOKENS = 200_000  # a feature that has not fired for this many tokens is dead
PROGRESS = "sae.safetensors"  # the progress file inside the progress folder
_FORMAT = "circuits.sae-progress"


def default_lr(d_sae: int) -> float:
    """The learning rate by number of features when none is given: Gao et al.'s
    ``2e-4 / sqrt(d_sae / 2**14)``, kept within [2e-4, 2e-3] for small dictionaries.

    Examples
    --------
    >>> default_lr(2**14), default_lr(2048) == 2e-4 * 8 ** 0.5
    (0.0002, True)
    """
    return min(2e-3, max(2e-4, 2e-4 / math.sqrt(d_sae / 2**14)))


# -- JumpReLU's straight-through estimators -----------------------------------------------------
def _window(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """The rectangle kernel ``K((pre - threshold) / bandwidth) / bandwidth``."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``; d/d threshold = ``-threshold * K(...) / bandwidth``."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        d_pre = grad * (pre > threshold)
        d_threshold = -(threshold * _window(pre, threshold, ctx.bandwidth) * grad)
        return d_pre, d_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """``(pre > threshold)``; no gradient to `pre`, d/d threshold = ``-K(...) / bandwidth``."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        d_threshold = -(_window(pre, threshold, ctx.bandwidth) * grad)
        return None, d_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


# -- one optimiser step ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """What one step measured (on the scaled activations): loss, mean active features per token,
    explained variance, dead features."""

    loss: float
    l0: float
    explained: float
    dead: int

    def postfix(self) -> dict[str, str]:
        """The progress bar's postfix."""
        return {"loss": f"{self.loss:.4g}", "L0": f"{self.l0:.1f}",
                "EV": f"{self.explained:.3f}", "dead": str(self.dead)}


class Trainer:
    """An SAE being trained, its optimiser and counters: everything a resumed run needs.

    Parameters are those of `fit_tensor`, and

    bandwidth : float
        JumpReLU: the width of the straight-through estimator's rectangle kernel, on the scaled
        pre-activations (wider than the paper's, so that short runs move the thresholds).
    dead_tokens : int
        A feature is dead (and AuxK trains it) once it has not fired for this many tokens.
    **sae_kw
        ``site``, ``out_site``, ``d_out`` and ``b_dec_in``, as `SAE` takes them.
    """

    def __init__(self, d_in: int, d_sae: int, kind: str = "topk", k: int | None = None,
                 l1: float | None = None, lr: float | None = None, steps: int = 1000,
                 seed: int = 0, bandwidth: float = 0.05, dead_tokens: int = DEAD_TOKENS,
                 device: str | torch.device = "cpu", **sae_kw: Any) -> None:
        check_kind(kind, k, d_sae)
        check_numbers(l1, lr, steps)
        self.sae = SAE.init(d_in, d_sae, kind, k, seed=seed, **sae_kw).to(device)
        self.kind, self.steps, self.bandwidth = kind, steps, bandwidth
        self.l1 = DEFAULT_L1.get(kind, 0.0) if l1 is None else l1
        self.lr = default_lr(d_sae) if lr is None else lr
        self.dead_tokens = dead_tokens
        # JumpReLU's thresholds, learned in log space so they stay positive
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(0.1), device=device))
        params = list(self.sae.parameters()) + ([self.log_threshold] if kind == "jumprelu" else [])
        self.opt = torch.optim.Adam(params, lr=self.lr)
        self.since = torch.zeros(d_sae, dtype=torch.long, device=device)  # tokens since it fired
        self.step = 0
        self.tokens = 0
        self.scale = torch.ones(2, device=device)  # of the input and of the target
        self.started = False

    def start(self, x: Tensor, y: Tensor) -> None:
        """Measure the scales and set ``b_dec`` to the mean target, from the first batch."""
        with torch.no_grad():
            for i, rows in enumerate((x, y)):
                mean_sq = rows.float().pow(2).sum(-1).mean()
                self.scale[i] = math.sqrt(rows.shape[-1]) / mean_sq.clamp_min(1e-12).sqrt()
            self.sae.b_dec.copy_(y.float().mean(0) * self.scale[1])
        self.started = True

    def weights(self, step: int) -> tuple[float, float]:
        """The learning rate and sparsity weight at `step`: warmed up over the first 5% of the
        steps, the learning rate decayed linearly to 0 over the last 20%."""
        warm = max(1, self.steps // 20)
        rise = min(1.0, (step + 1) / warm)
        decay = min(1.0, (self.steps - step) / max(1, self.steps // 5))
        return self.lr * min(rise, decay), self.l1 * rise

    def train_step(self, x: Tensor, y: Tensor) -> Stats:
        """One Adam step on rows `x` ``[n, d_in]`` (inputs) and `y` ``[n, d_out]`` (targets)."""
        if not self.started:
            self.start(x, y)
        sae = self.sae
        x, y = x.float() * self.scale[0], y.float() * self.scale[1]
        lr, l1 = self.weights(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        pre = sae.pre(x)  # [n, d_sae]
        if self.kind == "jumprelu":
            threshold = self.log_threshold.exp()
            f = _JumpReLU.apply(pre, threshold, self.bandwidth)
            sparsity = _Step.apply(pre, threshold, self.bandwidth).sum(-1).mean()
        else:
            f = sae.activate(pre)
            sparsity = (f * sae.W_dec.norm(dim=1)).sum(-1).mean() if self.kind == "relu" else 0
        err = f @ sae.W_dec + sae.b_dec - y
        mse = err.pow(2).sum(-1).mean()
        loss = mse + l1 * sparsity
        dead = self.since >= self.dead_tokens
        if self.kind == "topk" and dead.any():
            loss = loss + AUX_WEIGHT * self._aux(pre, dead, err.detach())
        if not torch.isfinite(loss):
            raise OptionError(f"SAE training diverged: the loss is not finite at step "
                              f"{self.step + 1}; lower the learning rate (it was {self.lr:g})")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        fired = (f > 0).any(0)
        # a Ctrl-C waits until the step is whole, so the state saved on it is a step's end
        with sigint_held(), torch.no_grad():
            self.opt.step()
            if self.kind != "relu":
                sae.normalize_decoder()
            self.since += len(x)
            self.since[fired] = 0
            self.step += 1
            self.tokens += len(x)
        with torch.no_grad():
            total = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
            return Stats(float(loss), float((f > 0).float().sum(-1).mean()),
                         float(1 - err.pow(2).sum() / total), int(dead.sum()))

    def _aux(self, pre: Tensor, dead: Tensor, err: Tensor) -> Tensor:
        """AuxK: how well the dead features' top pre-activations reconstruct `err`."""
        k_aux = min(int(dead.sum()), max(1, self.sae.d_out // 2))
        masked = pre.masked_fill(~dead, float("-inf"))
        top = masked.topk(k_aux, dim=-1)
        f_aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        return (f_aux @ self.sae.W_dec - err).pow(2).sum(-1).mean()

    # -- results and progress --------------------------------------------------------------
    def result(self) -> SAE:
        """A copy of the SAE with the scales folded in: it reads and writes unscaled activations.

        Features are divided by the target's scale, which keeps the decoder rows as trained:
        ``W_enc * s_in / s_out``, ``b_enc / s_out``, ``b_dec / s_out``, ``threshold / s_out``.
        """
        sae = self.sae
        out = SAE(sae.d_in, sae.d_sae, sae.kind, sae.k, site=sae.site, out_site=sae.out_site,
                  d_out=sae.d_out, b_dec_in=sae.b_dec_in, meta=sae.meta)
        s_in, s_out = (float(s) for s in self.scale)
        with torch.no_grad():
            out.W_enc.copy_(sae.W_enc * (s_in / s_out))
            out.b_enc.copy_(sae.b_enc / s_out)
            out.W_dec.copy_(sae.W_dec)
            out.b_dec.copy_(sae.b_dec / s_out)
            if self.kind == "jumprelu":
                out.threshold.copy_(self.log_threshold.exp() / s_out)
        return out.to(sae.W_enc.device).eval()

    def tensors(self) -> dict[str, Tensor]:
        """The state to save: parameters, Adam's moments and step counts, counters."""
        out = {f"sae.{n}": p.detach() for n, p in self.sae.named_parameters()}
        out.update(log_threshold=self.log_threshold.detach(), since=self.since, scale=self.scale)
        for i, state in self.opt.state_dict()["state"].items():
            for key, value in state.items():
                out[f"adam.{i}.{key}"] = torch.as_tensor(value)
        return out

    def load(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Set everything `tensors` saves, and the step and token counters of `state`."""
        with torch.no_grad():
            for name, p in self.sae.named_parameters():
                p.copy_(tensors[f"sae.{name}"])
            for name in ("log_threshold", "since", "scale"):
                getattr(self, name).copy_(tensors[name])
        adam: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, i, name = key.split(".", 2)
                adam.setdefault(int(i), {})[name] = value.clone()
        saved = self.opt.state_dict()
        self.opt.load_state_dict({"state": adam, "param_groups": saved["param_groups"]})
        self.step, self.tokens, self.started = state["step"], state["tokens"], True


def check_numbers(l1: float | None, lr: float | None, steps: int) -> None:
    """One-line OptionErrors for a sparsity weight, learning rate or step count out of range."""
    if l1 is not None and not (math.isfinite(l1) and l1 >= 0):
        raise OptionError(f"the sparsity coefficient (--l1) must be a finite number >= 0, "
                          f"got {l1}")
    if lr is not None and not (math.isfinite(lr) and 0 < lr <= 1):
        raise OptionError(f"the learning rate (--lr) must be above 0 and at most 1, got {lr}")
    if steps < 1:
        raise OptionError(f"SAE training needs at least 1 step (--steps), got {steps}")


def fit_tensor(x: Tensor, d_sae: int, kind: str = "topk", k: int | None = None,
               l1: float | None = None, steps: int = 1000, batch_size: int = 256,
               lr: float | None = None, seed: int = 0, y: Tensor | None = None,
               **options: Any) -> SAE:
    """Train an SAE (or with `y` a transcoder) on the rows of a tensor.

    Parameters
    ----------
    x : Tensor
        ``[n, d_in]`` activations (the inputs).
    d_sae : int
        Number of features.
    kind : "topk", "relu" or "jumprelu"
    k : int, optional
        Active features per row (TopK; required there).
    l1 : float, optional
        Sparsity coefficient: the L1 weight (relu) or the L0 weight (jumprelu), on activations
        scaled to ``E ||x||^2 = d`` (default `DEFAULT_L1`).
    steps : int
        Adam steps, each on `batch_size` rows drawn without replacement (a fresh permutation
        of the rows for every pass).
    batch_size : int
    lr : float, optional
        Peak learning rate (default `default_lr`).
    seed : int
        Seeds the initialisation and the order of the rows.
    y : Tensor, optional
        ``[n, d_out]`` targets (a transcoder: predict `y` from `x`); `x` itself by default.
    **options
        ``bandwidth`` (JumpReLU, 0.05), ``dead_tokens``, ``site``, ``out_site``, ``b_dec_in``.

    Returns
    -------
    SAE
        In eval mode, on `x`'s device.

    Examples
    --------
    >>> gen = torch.Generator().manual_seed(0)
    >>> x = torch.randn(512, 8, generator=gen)
    >>> sae = fit_tensor(x, 16, "topk", k=4, steps=50)
    >>> tuple(sae.W_dec.shape), int((sae.encode(x) > 0).sum(-1).max())
    ((16, 8), 4)
    """
    target = x if y is None else y
    if x.dim() != 2 or target.dim() != 2 or len(x) != len(target) or len(x) == 0:
        raise OptionError(f"fit_tensor needs rows [n, d] of inputs (and as many targets), got "
                          f"{tuple(x.shape)} and {tuple(target.shape)}")
    if batch_size < 1:
        raise OptionError(f"batch_size must be at least 1, got {batch_size}")
    if y is not None:  # a transcoder's input is not a reconstruction target
        options = {"b_dec_in": False, **options}
    trainer = Trainer(x.shape[1], d_sae, kind, k, l1, lr, steps, seed, d_out=target.shape[1],
                      device=x.device, **options)
    trainer.start(x, target)  # the scales and the mean of all rows, not of one batch
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < min(batch_size, len(x)):
            order = torch.cat([order, torch.randperm(len(x), generator=gen)])
        rows, order = order[:batch_size].to(x.device), order[batch_size:]
        trainer.train_step(x[rows], target[rows])
    return trainer.result()


# -- training on a model's activations ----------------------------------------------------------
def train_sae(model: Model, texts: Sequence[str], site: str, d_sae: int, kind: str = "topk",
              k: int | None = None, l1: float | None = None, lr: float | None = None,
              steps: int | None = None, tokens: int = 2_000_000, batch_size: int = 32,
              context: int | None = None, transcoder: bool = False, seed: int = 0,
              bos: bool | None = None, progress: str | Path | None = None,
              resume: bool = False, every: float = 30.0,
              callback: Callable[[int, Stats], None] | None = None,
              show: bool | None = None, **options: Any) -> SAE:
    """Train an SAE (or a transcoder) on activations streamed from `model` at `site`.

    Each step reads one batch of token rows (`token_batches`) through the model, up to the site
    only (`read_sites`), and trains on its ``[rows * positions, width]`` activations; the row's
    prefix position (a BOS the tokenizer puts first) is left out, its activations being unlike
    any text's. The corpus is read again from the start when a run needs more tokens than it
    holds. Memory is bounded by one batch.

    Parameters
    ----------
    model : Model
    texts : sequence of str
        The corpus (`read_texts`).
    site : str
        ``resid.L``, ``attn.L`` or ``mlp.L``; with `transcoder`, ``mlp.L`` (or ``mlp_in.L``):
        the transcoder reads ``mlp_in.L`` and predicts ``mlp.L``.
    d_sae, kind, k, l1, lr, seed
        As `fit_tensor`.
    steps : int, optional
        Adam steps, one token batch each; by default enough for `tokens` tokens.
    tokens : int
        Training tokens when `steps` is not given.
    batch_size : int
        Token rows per step.
    context : int, optional
        Tokens per row (default: 128, or the model's context when shorter).
    transcoder : bool
    bos : bool or None
        The rows' prefix (`token_batches`): None the tokenizer's convention, True its BOS,
        False nothing.
    progress : path, optional
        A folder for the progress file (``sae.safetensors``), written every `every` seconds and
        when Ctrl-C stops the run; None keeps no progress.
    resume : bool
        Continue from the progress in `progress`, if it is of this same run: the result is that
        of an uninterrupted run.
    every : float
        Seconds between two progress writes.
    callback : callable, optional
        Called as ``callback(step, stats)`` after each step.
    show : bool, optional
        Show the progress bar (default: on a terminal).
    **options
        ``bandwidth`` and ``dead_tokens`` (see `Trainer`).

    Returns
    -------
    SAE
        Reading the model's activations, with ``meta`` recording the model, its fingerprint and
        the training settings.

    Raises
    ------
    OptionError
        A bad site, kind, k or number; a context longer than the model reads; a corpus shorter
        than one row; progress of another run with `resume`.
    KeyboardInterrupt
        After writing the progress (with `progress`).

    Examples
    --------
    >>> from circuits import load_model
    >>> from circuits.features.corpus import read_texts
    >>> model = load_model("ioi-gpt2-4l")
    >>> sae = train_sae(model, read_texts("ioi", n=64), "resid.1", 256, k=8, steps=5,
    ...                 batch_size=4, context=32)
    >>> sae.site, sae.d_in, sae.meta["steps"], sae.meta["tokens"]
    ('resid.1', 128, 5, 640)
    """
    sites = training_sites(model, site, transcoder)
    prefix = len(prefix_ids(model.tokenizer, bos))
    context = check_context(model, context, prefix)
    rows = batch_size * (context - prefix)
    steps = steps if steps is not None else max(1, math.ceil(tokens / max(1, rows)))
    if batch_size < 1:
        raise OptionError(f"batch_size must be at least 1, got {batch_size}")
    trainer = Trainer(sites[0].width, d_sae, kind, k, l1, lr, steps, seed,
                      device=model.device, site=sites[0].name, out_site=sites[-1].name,
                      b_dec_in=not transcoder, **options)
    run = dict(command="sae train", site=sites[-1].name, transcoder=transcoder, kind=kind,
               d_sae=d_sae, k=k, l1=trainer.l1, lr=trainer.lr, steps=steps,
               batch_size=batch_size, context=context, seed=seed, bos=bos,
               corpus=corpus_digest(texts),
               **{n: v for n, v in options.items() if isinstance(v, (int, float))},
               **weights_key(model))
    folder = None if progress is None else Path(progress)
    if folder is not None and resume:
        saved = load_progress(folder, run)
        if saved is not None:
            trainer.load(*saved)
    batches = _cycle(model, texts, context, batch_size, bos, trainer.step)
    with progress_bar(steps, f"training {kind} SAE at {sites[-1].name}", "step",
                      enabled=show) as bar:
        bar.update(trainer.step)
        saved_at = time.monotonic()
        try:
            while trainer.step < steps:
                acts = read_sites(model, next(batches), sites)
                x = acts[sites[0].name][:, prefix:].reshape(-1, sites[0].width)
                y = acts[sites[-1].name][:, prefix:].reshape(-1, sites[-1].width)
                stats = trainer.train_step(x, y)
                bar.update(1)
                bar.set_postfix(stats.postfix(), refresh=False)
                if folder is not None and time.monotonic() - saved_at >= every:
                    save_progress(folder, run, trainer)
                    saved_at = time.monotonic()
                if callback is not None:
                    callback(trainer.step, stats)
        except KeyboardInterrupt:
            if folder is not None and trainer.step > 0:
                save_progress(folder, run, trainer)
            raise
    sae = trainer.result()
    sae.meta.update(model=model.name, fingerprint=model.fingerprint, site=sae.site,
                    out_site=sae.out_site, kind=kind, d_sae=d_sae, k=k,
                    l1=None if kind == "topk" else trainer.l1,
                    lr=trainer.lr, steps=steps, tokens=trainer.tokens, batch_size=batch_size,
                    context=context, seed=seed, bos=bos, scale=[float(s) for s in trainer.scale])
    return sae


def training_sites(model: Model, site: str, transcoder: bool) -> list[FeatureSite]:
    """The sites a training run reads: ``[site]``, or a transcoder's ``[mlp_in.L, mlp.L]``."""
    found = site_of(model, site)
    if transcoder:
        if found.kind not in ("mlp", "mlp_in"):
            raise OptionError(f"a transcoder reads mlp_in.L and predicts mlp.L; pass --site "
                              f"mlp.{found.layer}, not {found.name}")
        return [site_of(model, f"mlp_in.{found.layer}"), site_of(model, f"mlp.{found.layer}")]
    if found.kind == "mlp_in":
        raise OptionError(f"{found.name} is a transcoder's input (the MLP's normed input), where "
                          f"an SAE cannot be spliced in; pass --transcoder, or resid.L, attn.L "
                          f"or mlp.L")
    return [found]


def check_context(model: Model, context: int | None, prefix: int) -> int:
    """The row length: `context`, or 128 cut to the model's context; checked against both."""
    longest = model.context_length
    if context is None:
        context = min(128, longest) if longest else 128
    if context <= prefix or (longest is not None and context > longest):
        raise OptionError(f"--context must be from {prefix + 1} to {longest or 'any'} tokens "
                          f"for {model.name}, got {context}")
    return context


def corpus_digest(texts: Iterable[str]) -> str:
    """16 hex characters of sha256 over the texts: the corpus a progress file belongs to."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:16]


def _cycle(model: Model, texts: Sequence[str], context: int, batch_size: int,
           bos: bool | None, skip: int) -> Iterator[Tensor]:
    """Token batches of the corpus, read again from its start as often as needed, the first
    `skip` batches left out (tokenised, not run: how a resumed run finds its place)."""
    done = 0
    while True:
        empty = True
        for batch in token_batches(model, texts, context, batch_size, bos):
            empty = False
            done += 1
            if done > skip:
                yield batch
        if empty:
            raise OptionError(f"the corpus holds fewer tokens than one row of {context}; "
                              "give more text or a shorter --context")


# -- progress files -----------------------------------------------------------------------------
def save_progress(folder: Path, run: dict[str, Any], trainer: Trainer) -> Path:
    """Write the trainer's state to ``folder/sae.safetensors`` atomically, Ctrl-C held back."""
    from safetensors.torch import save

    tensors = {n: t.detach().cpu().contiguous() for n, t in trainer.tensors().items()}
    meta = {"format": _FORMAT, "run": json.dumps(run, sort_keys=True),
            "state": json.dumps({"step": trainer.step, "tokens": trainer.tokens})}
    path = folder / PROGRESS
    with sigint_held():
        write_atomic(path, save(tensors, metadata=meta))
    return path


def load_progress(folder: Path, run: dict[str, Any]
                  ) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The tensors and counters saved in `folder` by this same `run`, or None when there are
    none; an OptionError when they are of another run or unreadable."""
    from safetensors import safe_open

    path = folder / PROGRESS
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        saved = json.loads(meta["run"]) if meta.get("format") == _FORMAT else None
        state = json.loads(meta["state"])
    except Exception as err:  # noqa: BLE001 - a damaged file is one line for the user
        raise OptionError(f"{path} is not readable SAE progress ({type(err).__name__}); drop "
                          "--resume to start over") from None
    wanted = json.loads(json.dumps(run, sort_keys=True))
    if saved != wanted:
        field = next((key for key in sorted(set(wanted) | set(saved or {}))
                      if (saved or {}).get(key) != wanted.get(key)), "format")
        there = (saved or {}).get(field)
        raise OptionError(f"{path} is the progress of a different run: it differs in {field} "
                          f"(there {there}, now {wanted.get(field)}); drop --resume to start "
                          "over")
    return tensors, state


def clear_progress(folder: str | Path) -> None:
    """Remove the progress file (and the folder, when that leaves it empty)."""
    folder = Path(folder)
    (folder / PROGRESS).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
