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
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..batch import Batch
from ..errors import OptionError
from ..metrics import Metric
from ..model import Model, dtype_name
from ..nodes import NodeSites
from ..task import Task
from .lens import Data, LensResult, Unembedding, batches_of, read_residuals, run_lens

FORMAT = "circuits.tuned-lens"
VERSION = "1"
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

        from ..io import write_atomic

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
            Accept translators trained on other weights of the same shape (refused by default:
            the model's fingerprint is saved with them and compared when the dtype is the same).

        Raises
        ------
        OptionError
            The file is missing, is not a tuned lens, or does not fit the model.
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
        same_dtype = meta.get("dtype") == dtype_name(model.dtype)
        if (not any_model and same_dtype and meta.get("fingerprint")
                and meta["fingerprint"] != model.fingerprint):
            raise OptionError(f"{path} was trained on {meta.get('model')!r} (weights "
                              f"{meta['fingerprint']}), but {model.name!r} has other weights "
                              f"({model.fingerprint}); train a tuned lens for this model, or "
                              "pass any_model=True")
        lens = cls(sites.n_layers, sites.d_model)
        try:
            lens.load_state_dict(tensors)
        except RuntimeError as err:
            raise OptionError(f"{path} does not hold the expected translator tensors "
                              f"({' '.join(str(err).split())[:200]})") from err
        lens.info = {k: v for k, v in meta.items()
                     if k not in ("format", "version", "n_layers", "d_model")}
        return lens.to(model.device)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


# -- training -----------------------------------------------------------------------------------
def _sequences(model: Model, data: Texts, batch_size: int) -> list[Tensor]:
    """Token id tensors ``[b, p]`` to train on: a task's clean and corrupted prompts, a batch
    list's, or texts tokenized one by one (grouped by length, cut at the context length)."""
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
    by_length: dict[int, list[list[int]]] = {}
    for text in texts:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][:limit]
        if ids:
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
        Optimiser steps: SGD with Nesterov momentum 0.9, as in the paper, the learning rate
        decayed linearly to zero. (Adam would turn the rounding noise of a translator that
        already fits into steps of full size; with SGD a zero gradient moves nothing.)
    lr : float
        The starting learning rate.
    seed : int
        Seeds which tokens are kept (beyond `max_tokens`) and each step's sample.
    batch_tokens : int
        Token positions per step.
    max_tokens : int
        Most token positions whose residuals are kept (a random subset beyond that).
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
        A setting out of range, or no text to train on.

    Examples
    --------
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> lens = train_tuned_lens(tiny_gpt2(), make_batch(vocab=32), steps=5)
    >>> lens.n_layers, lens.info["steps"]
    (2, '5')
    """
    for name, value, low in (("steps", steps, 1), ("batch_tokens", batch_tokens, 1),
                             ("max_tokens", max_tokens, 1)):
        if not isinstance(value, int) or value < low:
            raise OptionError(f"{name} must be a whole number of at least {low}, got {value!r}")
    if not lr > 0:
        raise OptionError(f"lr must be a positive learning rate, got {lr!r}")
    t0 = time.perf_counter()
    unembed = Unembedding.of(model)
    gen = torch.Generator().manual_seed(seed)
    sequences = _sequences(model, data, batch_size)
    order = torch.randperm(len(sequences), generator=gen).tolist()
    states, kept = [], 0
    with torch.no_grad():
        for i in order:
            if kept >= max_tokens:
                break
            h = read_residuals(model, sequences[i], slice(None))  # [L + 1, b, p, d]
            h = h.flatten(1, 2).transpose(0, 1)  # [b * p, L + 1, d]
            states.append(h)
            kept += len(h)
        first = sequences[order[0]][:8]
        unembed.check(model, first, read_residuals(model, first)[-1])
    h = torch.cat(states)  # [N, L + 1, d]
    if len(h) > max_tokens:
        h = h[torch.randperm(len(h), generator=gen)[:max_tokens].to(h.device)]
    lens = lens if lens is not None else TunedLens.for_model(model)
    if lens.n_layers != h.shape[1] - 1 or lens.d_model != h.shape[2]:
        raise OptionError(f"the translators are for {lens.n_layers} layers of width "
                          f"{lens.d_model}; {model.name!r} has {h.shape[1] - 1} of width "
                          f"{h.shape[2]}")
    lens.train()
    optimizer = torch.optim.SGD(lens.parameters(), lr=lr, momentum=0.9, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    n = h.shape[1] - 1
    with _frozen(model.hf):
        for _ in range(steps):
            rows = torch.randint(len(h), (min(batch_tokens, len(h)),), generator=gen)
            sample = h[rows.to(h.device)]  # [t, L + 1, d]
            with torch.no_grad():
                target = unembed(sample[:, -1]).float().log_softmax(-1)  # [t, V]
            x = sample[:, :n].float()  # [t, L, d]
            weights = torch.stack([t.weight for t in lens.translators])  # [L, d, d]
            biases = torch.stack([t.bias for t in lens.translators])  # [L, d]
            moved = x + torch.einsum("tld,led->tle", x, weights) + biases
            guess = unembed(moved.to(sample.dtype)).float().log_softmax(-1)  # [t, L, V]
            kl = (target.exp()[:, None] * (target[:, None] - guess)).sum(-1)  # [t, L]
            loss = kl.mean(0).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
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
