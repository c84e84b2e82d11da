"""Where an edit writes (the MLP output projection of a layer) and the statistics of its keys.

A layer's MLP output projection is a linear associative memory (Meng et al., 2022): its input,
the MLP's hidden activation after the nonlinearity, is the *key* ``k``; its output the *value*
``W k``. ROME and MEMIT change ``W`` so that chosen keys map to new values while keys in
general move as little as possible, measured by the key covariance ``C = E[k kᵀ]`` over a text
sample. Computing ``C`` takes a pass over the sample, so it is cached on disk, keyed by the
model's fingerprint, the layer and the sample.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from circuits.errors import OptionError
from circuits.features.corpus import token_batches
from circuits.files import write_atomic
from circuits.model import Model
from circuits.nodes import NodeSites

__all__ = ["Projection", "projection", "key_covariance", "stats_folder", "capture_keys"]

# names of the MLP output projection in the families circuits supports
# (GPT-2, Llama/Qwen2/Mistral/Gemma-2, GPT-NeoX, OPT/Phi, GPT-J)
_OUT_NAMES = ("c_proj", "down_proj", "dense_4h_to_h", "fc2", "fc_out")
STATS_ENV = "CIRCUITS_STATS_DIR"


@dataclass(frozen=True)
class Projection:
    """The MLP output projection of one layer.

    Attributes
    ----------
    layer : int
    path : str
        Module path, e.g. ``"transformer.h.1.mlp.c_proj"``.
    module : nn.Module
    transposed : bool
        Whether the weight is stored ``[in, out]`` (GPT-2's ``Conv1D``) rather than
        ``[out, in]`` (``nn.Linear``).
    """

    layer: int
    path: str
    module: nn.Module
    transposed: bool

    @property
    def param(self) -> str:
        """The weight's parameter name in the model."""
        return f"{self.path}.weight"

    def weight(self) -> Tensor:
        """The weight as ``[out, in]`` (``[d_model, d_ff]``), float32, detached."""
        w = self.module.weight.detach().float()
        return w.T if self.transposed else w

    def stored(self, delta: Tensor) -> Tensor:
        """An ``[out, in]`` change of the weight in the layout and dtype the weight is stored in."""
        delta = delta.T if self.transposed else delta
        return delta.contiguous().to(self.module.weight.dtype)


def projection(model: Model, layer: int) -> Projection:
    """Find the MLP output projection of `layer`.

    Raises
    ------
    OptionError
        The layer is out of range or its MLP has no linear output projection.

    Examples
    --------
    >>> from circuits.testing import tiny_model
    >>> p = projection(tiny_model("gpt2"), 1)
    >>> p.path, p.transposed
    ('transformer.h.1.mlp.c_proj', True)
    >>> projection(tiny_model("llama"), 0).path
    'model.layers.0.mlp.down_proj'
    """
    sites = NodeSites.of(model)
    if not isinstance(layer, int) or not 0 <= layer < sites.n_layers:
        raise OptionError(f"layer {layer} is out of range; {model.name} has layers 0 to "
                          f"{sites.n_layers - 1}")
    path = sites.mlp[layer]
    mlp = model.hf.get_submodule(path)
    if not _is_linear(mlp):
        name = next((n for n in _OUT_NAMES if _is_linear(getattr(mlp, n, None))), None)
        if name is None:
            raise OptionError(f"the MLP {path} of {model.name} has no output projection named "
                              f"{', '.join(_OUT_NAMES)}; editing needs one")
        path, mlp = f"{path}.{name}", getattr(mlp, name)
    transposed = not isinstance(mlp, nn.Linear)  # Conv1D keeps its weight [in, out]
    return Projection(layer, path, mlp, transposed)


def _is_linear(module: object) -> bool:
    """Whether `module` is an ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@contextlib.contextmanager
def capture_keys(proj: Projection) -> Iterator[list[Tensor]]:
    """Collect the keys (inputs ``[batch, pos, d_ff]``) the projection reads while in the block.

    Examples
    --------
    >>> from circuits.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> with capture_keys(projection(model, 0)) as keys:
    ...     _ = model.hf(torch.zeros(1, 3, dtype=torch.long))
    >>> tuple(keys[0].shape)
    (1, 3, 128)
    """
    keys: list[Tensor] = []
    handle = proj.module.register_forward_pre_hook(lambda _m, args: keys.append(args[0]))
    try:
        yield keys
    finally:
        handle.remove()


def stats_folder(cache: str | os.PathLike | None = None) -> Path:
    """The folder of cached key statistics: `cache`, else ``$CIRCUITS_STATS_DIR``, else
    ``~/.cache/circuits/stats``.

    Examples
    --------
    >>> stats_folder("/tmp/x")
    PosixPath('/tmp/x')
    """
    if cache is not None:
        return Path(cache)
    return Path(os.environ.get(STATS_ENV) or Path.home() / ".cache" / "circuits" / "stats")


def key_covariance(model: Model, layer: int, texts: Sequence[str], context: int = 64,
                   max_tokens: int = 20_000, batch_size: int = 16,
                   cache: str | os.PathLike | None = None) -> Tensor:
    """The uncentred key covariance ``C = E[k kᵀ]`` ``[d_ff, d_ff]`` of `layer` over `texts`.

    The texts are streamed in rows of `context` tokens (`circuits.features.corpus
    .token_batches`) until `max_tokens` keys are seen. The result is cached in `cache`
    (`stats_folder`) under the model's fingerprint, the layer and a hash of the texts and the
    token counts, and read back on the next call with the same arguments; a cache file that
    cannot be read, or holds a wrong shape or non-finite numbers, is recomputed (with a
    warning) and replaced. Files are written atomically.

    Parameters
    ----------
    model : Model
    layer : int
    texts : sequence of str
        The sample (e.g. `circuits.features.corpus.read_texts`).
    context, max_tokens, batch_size : int
        Tokens per row, keys in all, rows per forward.
    cache : path-like, optional
        The cache folder.

    Returns
    -------
    Tensor
        float32, on the model's device.

    Raises
    ------
    OptionError
        The layer is out of range or the texts give no full row of tokens.

    Examples
    --------
    >>> import tempfile
    >>> from circuits import load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> texts = ["The landmark Big Ben is located in the city of London"] * 8
    >>> c = key_covariance(model, 1, texts, context=16, cache=tempfile.mkdtemp())
    >>> tuple(c.shape), bool(torch.allclose(c, c.T))
    ((512, 512), True)
    """
    proj = projection(model, layer)
    texts = list(texts)
    sample = hashlib.sha256(repr((texts, context, max_tokens)).encode()).hexdigest()[:16]
    file = stats_folder(cache) / f"{model.fingerprint}-{proj.path}-{sample}.safetensors"
    d_ff = proj.weight().shape[1]
    cov = _read_cache(file, d_ff)
    if cov is None:
        cov = _covariance(model, proj, texts, context, max_tokens, batch_size)
        _write_cache(file, cov, model.fingerprint, layer, sample)
    return cov.to(model.device)


def _covariance(model: Model, proj: Projection, texts: list[str], context: int,
                max_tokens: int, batch_size: int) -> Tensor:
    """Stream the texts through the model and average ``k kᵀ`` (in float64)."""
    d_ff = proj.weight().shape[1]
    total = torch.zeros(d_ff, d_ff, dtype=torch.float64, device=model.device)
    count = 0
    with torch.no_grad(), capture_keys(proj) as keys:
        for ids in token_batches(model, texts, context, batch_size):
            model.hf(ids, attention_mask=torch.ones_like(ids))
            k = keys.pop().reshape(-1, d_ff)[: max_tokens - count].double()  # [tokens, d_ff]
            total += k.T @ k
            count += len(k)
            if count >= max_tokens:
                break
    if count == 0:
        raise OptionError(f"the text sample gives no row of {context} tokens; pass more text "
                          "or a shorter context")
    return (total / count).float()


def _read_cache(file: Path, d_ff: int) -> Tensor | None:
    """The cached covariance in `file`, or None when absent or unusable (with a warning)."""
    if not file.exists():
        return None
    from safetensors.torch import load  # heavy-ish optional reader, only when a cache exists

    try:
        cov = load(file.read_bytes())["cov"]
    except Exception:  # any damage: truncated header, missing tensor, bad bytes
        cov = None
    if cov is None or tuple(cov.shape) != (d_ff, d_ff) or not bool(torch.isfinite(cov).all()):
        warnings.warn(f"key statistics {file} are damaged; recomputing them", stacklevel=3)
        return None
    return cov


def _write_cache(file: Path, cov: Tensor, fingerprint: str, layer: int, sample: str) -> None:
    """Write the covariance to `file` atomically."""
    from safetensors.torch import save

    meta = {"fingerprint": fingerprint, "layer": str(layer), "sample": sample}
    write_atomic(file, save({"cov": cov.detach().cpu().contiguous()}, metadata=meta))
