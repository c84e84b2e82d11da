"""Tuned lens (Belrose et al. 2023): the logit lens with a learned affine translator per layer.

Translator ``l`` maps the residual after layer ``l`` (``input`` for the first one) to
``h + A_l h + b_l``, starting at the identity (``A = 0``, ``b = 0``), and is trained to minimise
KL(model || lens): the divergence of the lens's next-token distribution from the model's final
one, at every token position of a text set, summed over layers, with the model frozen, by SGD
with Nesterov momentum as in the paper. The final norm makes the gradient of ``A`` independent
of the residual's scale, so one learning rate suits models of any width. The last
layer's residual is what the model decodes, so it has no translator.

Written here rather than taken from the ``tuned-lens`` package (0.2.0): that package finds the
final norm from a fixed list of model classes (Llama, GPT-2, NeoX, OPT, BLOOM, GPT-J; not Qwen2,
Mistral or Gemma-2), ignores Gemma-2's logit soft-cap, saves translators with ``torch.save``
rather than safetensors, and pulls in wandb, datasets, torchdata and plotly. Its translator is
the same affine map, and this one decodes with `Unembedding` (any causal LM, checked against the
model's logits).

Residuals are read once, without gradients, and the translators train on the cached tensors, so
training costs a few forward passes of the model plus small matrix products per step.

Bounds
    The cached residuals hold at most `max_tokens` token positions and at most `CACHE_BYTES`
    (2 GiB) of activations (fewer positions for a wide, deep model); each step decodes its
    positions one layer and one chunk of `LOGITS_BUDGET` logits at a time, so a step's memory
    does not grow with the layer count or the vocabulary. `MAX_STEPS` (2000, eight times the
    paper's 250) and `MAX_LR` (10) bound the optimiser: on the reference models a rate of 2
    already ends at twice the loss of the default 0.5, and 10 at four times. Training that
    diverges (a loss that is not finite, or translator entries beyond `MAX_WEIGHT`) stops with
    an `OptionError` and returns nothing; `TunedLens.load` refuses files whose translators hold
    non-finite entries or entries beyond `MAX_WEIGHT`.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import outputs  # outputs.progress_bar: tests replace it there
from ..batch import Batch
from ..errors import OptionError
from ..io import write_atomic
from ..metrics import Metric
from ..model import Model, check_same_weights, dtype_name
from ..nodes import NodeSites
from ..task import Task, prefix_ids
from .lens import Data, LensResult, Unembedding, batches_of, read_residuals, run_lens

FORMAT = "circuits.tuned-lens"
VERSION = "1"
MAX_STEPS = 2000  # optimiser steps: 8x the paper's 250; the loss has long flattened by then
MAX_LR = 10.0  # 20x the default; larger rates only make the fit worse
# Translator entries: training at MAX_LR reaches ~60 on the reference models; 1e4 is far past
# anything training makes, and where a float16 model's translated residual overflows
MAX_WEIGHT = 1e4
CACHE_BYTES = 2**31  # most bytes of cached residuals
LOGITS_BUDGET = 2**25  # most logits a training step holds at once (128 MiB in float32)
Texts = Task | Batch | Sequence[Batch] | Sequence[str]


class TunedLens(nn.Module):
    """One affine translator ``h -> h + A h + b`` per hidden state but the last, in float32.

    Translator ``i`` reads hidden state ``i``: ``input`` for ``i = 0``, the residual after layer
    ``i - 1`` otherwise.

    Parameters
    ----------
    n_layers : int
        The model's layer count (one translator per layer).
    d_model : int
        The residual width.

    Attributes
    ----------
    translators : nn.ModuleList of nn.Linear
        ``weight`` is ``A`` ``[d, d]`` and ``bias`` is ``b`` ``[d]``, both zero at the start.
    info : dict[str, str]
        What the lens was trained on (model, fingerprint, dtype, steps, ...), saved with it.

    Examples
    --------
    >>> import torch
    >>> lens = TunedLens(n_layers=2, d_model=4)
    >>> h = torch.randn(3, 4)
    >>> torch.equal(lens(1, h), h)  # the identity before training
    True
    """

    def __init__(self, n_layers: int, d_model: int) -> None:
        super().__init__()
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        self.info: dict[str, str] = {}

    @classmethod
    def for_model(cls, model: Model) -> TunedLens:
        """Identity translators shaped for `model`, on its device."""
        sites = NodeSites.of(model)
        lens = cls(sites.n_layers, sites.d_model).to(model.device)
        lens.info = dict(model=model.name, fingerprint=model.fingerprint,
                         dtype=dtype_name(model.dtype))
        return lens

    @property
    def n_layers(self) -> int:
        return len(self.translators)

    @property
    def d_model(self) -> int:
        return int(self.translators[0].weight.shape[0])

    def forward(self, index: int, h: Tensor) -> Tensor:
        """Hidden state `index` ``[..., d]`` translated, in `h`'s dtype."""
        x = h.float()
        return (x + self.translators[index](x)).to(h.dtype)

    def save(self, path: str | Path) -> Path:
        """Write the translators as a safetensors file (``translators.{i}.weight`` and
        ``.bias``, with `info` as metadata), atomically.

        Examples
        --------
        >>> import tempfile, pathlib
        >>> from circuits.testing import tiny_gpt2
        >>> model = tiny_gpt2()
        >>> lens = TunedLens.for_model(model)
        >>> path = lens.save(pathlib.Path(tempfile.mkdtemp()) / "lens.safetensors")
        >>> TunedLens.load(path, model).n_layers
        2
        """
        from safetensors.torch import save

        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {**self.info, "format": FORMAT, "version": VERSION,
                "n_layers": str(self.n_layers), "d_model": str(self.d_model)}
        path = Path(path)
        write_atomic(path, save(tensors, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path, model: Model, any_model: bool = False) -> TunedLens:
        """Read translators saved by `save`, for `model`, on its device.

        Parameters
        ----------
        path : str or Path
        model : Model
        any_model : bool
            Accept translators trained on other weights of the same shape, or whose file
            records no fingerprint (refused by default: the model's fingerprint is saved with
            them and compared, `circuits.model.check_same_weights`; one saved before ``v2-``
            fingerprints is compared only in the dtype it was taken in, and otherwise accepted
            with a FutureWarning).

        Raises
        ------
        OptionError
            The file is missing, is not a tuned lens, or does not fit the model; or, unless
            `any_model`, it was trained on other weights or records no fingerprint.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = Path(path)
        try:
            data = path.read_bytes()
            tensors = load(data)
            meta = _metadata(data)
        except (OSError, SafetensorError, ValueError) as err:
            raise OptionError(f"cannot read tuned-lens translators from {path} ({err}); pass a "
                              "file written by `circuits lens --tuned` or TunedLens.save") from err
        if meta.get("format") != FORMAT:
            raise OptionError(f"{path} is a safetensors file but not a tuned lens (no "
                              f"format={FORMAT!r} in its metadata); pass translators saved by "
                              "`circuits lens --tuned` or TunedLens.save")
        sites = NodeSites.of(model)
        want = (str(sites.n_layers), str(sites.d_model))
        if (meta.get("n_layers"), meta.get("d_model")) != want:
            raise OptionError(f"{path} holds translators for {meta.get('n_layers')} layers of "
                              f"width {meta.get('d_model')}, but {model.name!r} has {want[0]} "
                              f"layers of width {want[1]}; train a tuned lens for this model")
        note = check_same_weights(model, meta.get("fingerprint"), meta.get("dtype"),
                                  f"{path} was trained on {meta.get('model')!r}",
                                  "train a tuned lens for this model, or pass --any-model "
                                  "(any_model=True) to use it anyway", any_model=any_model)
        if note is not None:
            warnings.warn(note, FutureWarning, stacklevel=2)
        lens = cls(sites.n_layers, sites.d_model)
        try:
            lens.load_state_dict(tensors)
        except RuntimeError as err:
            raise OptionError(f"{path} does not hold the expected translator tensors "
                              f"({' '.join(str(err).split())[:200]})") from err
        bad = _bad_weights(lens)
        if bad is not None:
            raise OptionError(f"{path}: {bad}; these translators cannot give a meaningful lens, "
                              "train new ones (`circuits lens --tuned`)")
        lens.info = {k: v for k, v in meta.items()
                     if k not in ("format", "version", "n_layers", "d_model")}
        return lens.to(model.device)


def _bad_weights(lens: TunedLens) -> str | None:
    """What is wrong with the translators' entries (not finite, or beyond `MAX_WEIGHT`), or
    None when nothing is."""
    for name, tensor in lens.state_dict().items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            return f"translator tensor {name} holds {int((~finite).sum())} non-finite entries"
        largest = float(tensor.abs().max()) if tensor.numel() else 0.0
        if largest > MAX_WEIGHT:
            return (f"translator tensor {name} holds an entry of size {largest:.3g}, beyond "
                    f"{MAX_WEIGHT:g}")
    return None


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


# -- training -----------------------------------------------------------------------------------
def _sequences(model: Model, data: Texts, batch_size: int) -> list[Tensor]:
    """Token id tensors ``[b, p]`` to train on: a task's clean and corrupted prompts, a batch
    list's, or texts tokenized one by one, each after what the tokenizer puts before a text
    (its BOS, `prefix_ids`), grouped by length and cut at the context length."""
    if isinstance(data, (Task, Batch)) or (
            isinstance(data, Sequence) and data and isinstance(data[0], Batch)):
        batches = batches_of(model, data, batch_size)
        return [ids for b in batches for ids in (b.clean, b.corrupt)]
    texts = list(data) if isinstance(data, Sequence) and not isinstance(data, str) else []
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise OptionError("train a tuned lens on a Task, Batches or a list of non-empty texts")
    if model.tokenizer is None:
        raise OptionError(f"{model.name!r} has no tokenizer to read texts with; pass a Task or "
                          "Batches of token ids")
    limit = model.context_length or 1024
    prefix = prefix_ids(model.tokenizer)  # what the tokenizer puts before a text (its BOS)
    by_length: dict[int, list[list[int]]] = {}
    for text in texts:
        ids = (prefix + model.tokenizer(text, add_special_tokens=False)["input_ids"])[:limit]
        if len(ids) > len(prefix):
            by_length.setdefault(len(ids), []).append(ids)
    return [torch.tensor(rows[i:i + batch_size], device=model.device)
            for rows in by_length.values() for i in range(0, len(rows), batch_size)]


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Turn off gradients of `module`'s parameters for a while (restored also on error)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _cached_residuals(model: Model, sequences: list[Tensor], max_tokens: int,
                      gen: torch.Generator) -> Tensor:
    """Every hidden state ``[N, L + 1, d]`` at up to `max_tokens` token positions (and at most
    `CACHE_BYTES` of them) of `sequences`, read in order, a random subset of the positions of
    the sequence that reaches the limit."""
    sites = NodeSites.of(model)
    per_token = (sites.n_layers + 1) * sites.d_model * torch.finfo(model.dtype).bits // 8
    limit = min(max_tokens, max(1, CACHE_BYTES // per_token))
    states, kept = [], 0
    bar_ = outputs.progress_bar(limit, "tuned lens: reading residuals", "token")
    with torch.no_grad(), bar_ as bar:
        for ids in sequences:
            if kept >= limit:
                break
            h = read_residuals(model, ids, slice(None))  # [L + 1, b, p, d]
            h = h.flatten(1, 2).transpose(0, 1)  # [b * p, L + 1, d]
            if kept + len(h) > limit:
                h = h[torch.randperm(len(h), generator=gen)[:limit - kept].to(h.device)]
            states.append(h)
            kept += len(h)
            bar.update(len(h))
    return torch.cat(states)


def _step_loss(lens: TunedLens, unembed: Unembedding, h: Tensor, rows: Tensor,
               chunk: int) -> Tensor:
    """Back-propagate one step's loss, KL(model || lens) summed over layers and averaged over
    the positions `rows` of `h`, one layer and `chunk` positions at a time; returns the loss,
    detached."""
    total = torch.zeros((), device=h.device)
    for lo in range(0, len(rows), chunk):
        sample = h[rows[lo:lo + chunk]]  # [c, L + 1, d]
        with torch.no_grad():
            target = unembed(sample[:, -1]).float().log_softmax(-1)  # [c, V]
            weight = target.exp()
        for layer in range(lens.n_layers):  # translators are independent: one graph per layer
            guess = unembed(lens(layer, sample[:, layer])).float().log_softmax(-1)  # [c, V]
            part = (weight * (target - guess)).sum() / len(rows)
            part.backward()
            total = total + part.detach()
    return total


def train_tuned_lens(
    model: Model,
    data: Texts,
    *,
    steps: int = 250,
    lr: float = 0.5,
    seed: int = 0,
    batch_tokens: int = 512,
    max_tokens: int = 32768,
    batch_size: int = 32,
    lens: TunedLens | None = None,
) -> TunedLens:
    """Train one affine translator per layer so that the lens matches the model's output.

    Parameters
    ----------
    model : Model
        Any Hugging Face causal LM; its weights are not changed.
    data : Task, Batch, list of Batch or list of str
        The text to train on: a task's clean and corrupted prompts, or texts (tokenized with
        the model's tokenizer). Every token position is a training example.
    steps : int
        Optimiser steps, 1 to `MAX_STEPS`: SGD with Nesterov momentum 0.9, as in the paper,
        the learning rate decayed linearly to zero. (Adam would turn the rounding noise of a
        translator that already fits into steps of full size; with SGD a zero gradient moves
        nothing.)
    lr : float
        The starting learning rate, above 0 and at most `MAX_LR`.
    seed : int
        Seeds which tokens are kept (beyond `max_tokens`) and each step's sample.
    batch_tokens : int
        Token positions per step.
    max_tokens : int
        Most token positions whose residuals are kept (fewer when they would take more than
        `CACHE_BYTES`).
    batch_size : int
        Prompts per forward when reading the residuals.
    lens : TunedLens, optional
        Translators to continue from (default: the identity).

    Returns
    -------
    TunedLens
        In eval mode on the model's device; `info` records the training settings and time.

    Raises
    ------
    OptionError
        A setting out of range, no text to train on, or training that diverged (a loss that
        is not finite, or translator entries beyond `MAX_WEIGHT`).

    Examples
    --------
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> lens = train_tuned_lens(tiny_gpt2(), make_batch(vocab=32), steps=5)
    >>> lens.n_layers, lens.info["steps"]
    (2, '5')
    """
    for name, value, low, high in (("steps", steps, 1, MAX_STEPS),
                                   ("batch_tokens", batch_tokens, 1, None),
                                   ("max_tokens", max_tokens, 1, None)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (
                high is not None and value > high):
            limit = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise OptionError(f"{name} must be a whole number {limit}, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= MAX_LR:
        raise OptionError(f"lr must be a learning rate above 0 and at most {MAX_LR:g} (the "
                          f"default is 0.5), got {lr!r}")

    t0 = time.perf_counter()
    unembed = Unembedding.of(model)
    gen = torch.Generator().manual_seed(seed)
    sequences = _sequences(model, data, batch_size)
    order = torch.randperm(len(sequences), generator=gen).tolist()
    with torch.no_grad():
        first = sequences[order[0]][:8]
        unembed.check(model, first, read_residuals(model, first)[-1])
    h = _cached_residuals(model, [sequences[i] for i in order], max_tokens, gen)  # [N, L+1, d]
    lens = (lens if lens is not None else TunedLens.for_model(model)).to(h.device)
    if lens.n_layers != h.shape[1] - 1 or lens.d_model != h.shape[2]:
        raise OptionError(f"the translators are for {lens.n_layers} layers of width "
                          f"{lens.d_model}; {model.name!r} has {h.shape[1] - 1} of width "
                          f"{h.shape[2]}")
    with torch.no_grad():  # positions per chunk: at most LOGITS_BUDGET logits alive
        chunk = max(1, LOGITS_BUDGET // unembed(h[:1, -1]).shape[-1])
    lens.train()
    optimizer = torch.optim.SGD(lens.parameters(), lr=lr, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    with _frozen(model.hf), outputs.progress_bar(steps, "tuned lens: training", "step") as bar:
        for step in range(steps):
            rows = torch.randint(len(h), (min(batch_tokens, len(h)),), generator=gen)
            optimizer.zero_grad(set_to_none=True)
            loss = _step_loss(lens, unembed, h, rows.to(h.device), chunk)
            if not bool(torch.isfinite(loss)):
                lens.eval()
                raise OptionError(f"tuned-lens training diverged at step {step + 1} of {steps} "
                                  f"(loss {float(loss)}); nothing was saved: train again with a "
                                  f"lower learning rate than {lr:g} (the default is 0.5)")
            optimizer.step()
            schedule.step()
            bar.update(1)
    bad = _bad_weights(lens)
    if bad is not None:
        lens.eval()
        raise OptionError(f"tuned-lens training diverged ({bad}); nothing was saved: train again "
                          f"with a lower learning rate than {lr:g} (the default is 0.5)")
    lens.eval()
    lens.info = {**lens.info, "steps": str(steps), "lr": str(lr), "seed": str(seed),
                 "tokens": str(len(h)), "seconds": f"{time.perf_counter() - t0:.2f}",
                 "final_loss": f"{float(loss.detach()):.6f}"}
    return lens


def tuned_lens(
    model: Model,
    data: Data,
    lens: TunedLens | None = None,
    *,
    metric: str | Metric | Callable | None = None,
    batch_size: int = 32,
    steps: int = 250,
    lr: float = 0.5,
    seed: int = 0,
) -> LensResult:
    """The tuned lens: each layer's residual, through its translator, decoded by the model's
    final norm and unembedding.

    Parameters
    ----------
    model : Model
    data : Task, Batch or list of Batch
        The prompts read (as in `logit_lens`).
    lens : TunedLens, optional
        Trained translators; when None they are trained on `data` first (`train_tuned_lens`
        with `steps`, `lr` and `seed`).
    metric, batch_size
        As in `logit_lens`.

    Returns
    -------
    LensResult
        ``kind="tuned"``, with the translators in ``lens``.

    Examples
    --------
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> result = tuned_lens(tiny_gpt2(), make_batch(vocab=32), steps=5)
    >>> result.kind, len(result.values), result.lens.n_layers
    ('tuned', 3, 2)
    """
    if lens is None:
        lens = train_tuned_lens(model, data, steps=steps, lr=lr, seed=seed,
                                batch_size=batch_size)
    sites = NodeSites.of(model)
    if (lens.n_layers, lens.d_model) != (sites.n_layers, sites.d_model):
        raise OptionError(f"the translators are for {lens.n_layers} layers of width "
                          f"{lens.d_model}; {model.name!r} has {sites.n_layers} of width "
                          f"{sites.d_model}")
    lens = lens.to(model.device)
    return run_lens(model, data, kind="tuned", translate=lens, metric=metric,
                    batch_size=batch_size, lens=lens)
