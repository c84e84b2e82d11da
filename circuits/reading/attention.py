"""Attention patterns of any Hugging Face causal LM, and heatmaps of them.

The probabilities are the model's own: one forward pass with ``output_attentions=True`` under
transformers' eager attention, which is the only implementation that materialises them (SDPA and
flash attention never form the matrix). The model's implementation is switched to eager for the
call and switched back afterwards, also on error, so nothing outside the call sees the change.
Masks, sliding windows, soft-caps and grouped key/value heads are whatever the model does; the
parity tests pin the result to the edge adapters' own attention (`Adapter.attend`).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DependencyError, OptionError, UnsupportedModelError
from ..io import write_atomic
from ..model import Model

MAX_PANELS = 64  # heatmaps in one figure; more would not be readable
COLUMNS = 4  # panels per row of `plot_attention`


def head_shape(model: Model) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of a model, from its config.

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> head_shape(tiny_gpt2(n_layer=3, n_head=2))
    (3, 2)
    """
    config = model.hf.config
    shape = []
    for keys in (("num_hidden_layers", "n_layer", "num_layers"),
                 ("num_attention_heads", "n_head", "num_heads")):
        value = next((v for k in keys if isinstance(v := getattr(config, k, None), int)), None)
        if value is None:
            raise UnsupportedModelError(f"{model.architecture}'s config gives no {keys[0]}; "
                                        "attention patterns need the layer and head counts")
        shape.append(value)
    return shape[0], shape[1]


def check_heads(model: Model, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """`heads` as a list of ``(layer, head)`` pairs, each checked to exist in `model`.

    Raises
    ------
    OptionError
        A pair is not two whole numbers, or names a layer or head the model does not have.
    """
    n_layers, n_heads = head_shape(model)
    out = []
    for pair in heads:
        ok = (isinstance(pair, (tuple, list)) and len(pair) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in pair))
        if not ok:
            raise OptionError(f"a head is a (layer, head) pair of whole numbers, got {pair!r}")
        layer, head = pair
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise OptionError(f"head a{layer}.h{head} does not exist: {model.name!r} has "
                              f"layers 0-{n_layers - 1} and heads 0-{n_heads - 1}")
        out.append((layer, head))
    if not out:
        raise OptionError("no heads given; name at least one (layer, head) pair, or None for all")
    return out


@contextlib.contextmanager
def eager_attention(hf: Any) -> Iterator[None]:
    """Run `hf` with transformers' eager attention inside the block; the implementation it had
    is restored on the way out, also on error."""
    before = getattr(hf.config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    switch = getattr(hf, "set_attn_implementation", None)
    if switch is None:
        raise DependencyError("reading attention patterns needs a transformers version whose "
                              "models have set_attn_implementation; upgrade transformers")
    switch("eager")
    try:
        yield
    finally:
        switch(before)


def attention_patterns(model: Model, ids: Tensor,
                       heads: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """The attention probabilities of chosen heads (or all of them) on token ids.

    Parameters
    ----------
    model : Model
        Any Hugging Face causal LM whose eager attention returns its weights (every family in
        transformers does).
    ids : Tensor
        ``[b, p]`` token ids, all of one length (no padding).
    heads : sequence of (layer, head), optional
        The heads to return, in this order; None for every head.

    Returns
    -------
    Tensor
        float32 on the model's device: ``[b, n_chosen, p, p]`` for chosen heads,
        ``[b, n_layers, n_heads, p, p]`` for all. Entry ``[..., i, j]`` is the weight query
        position ``i`` gives key position ``j``; each row sums to 1 and is 0 above the diagonal.
        With grouped key/value heads there is one pattern per query head.

    Raises
    ------
    OptionError
        `ids` is not a ``[b, p]`` tensor of token ids, is longer than the model's context, or a
        head does not exist.
    UnsupportedModelError
        The model returned no attention weights.

    Examples
    --------
    >>> import torch
    >>> from circuits.testing import tiny_gpt2
    >>> model = tiny_gpt2(n_layer=2, n_head=2)
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> attention_patterns(model, ids).shape
    torch.Size([1, 2, 2, 4, 4])
    >>> pattern = attention_patterns(model, ids, [(1, 0)])
    >>> pattern.shape, bool(torch.allclose(pattern.sum(-1), torch.ones(1, 1, 4)))
    (torch.Size([1, 1, 4, 4]), True)
    """
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise OptionError("ids must be a [batch, pos] tensor of token ids")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise OptionError(f"ids of shape {tuple(ids.shape)} hold no tokens")
    limit = model.context_length
    if limit is not None and ids.shape[1] > limit:
        raise OptionError(f"{ids.shape[1]} tokens are more than {model.name!r} reads "
                          f"({limit}); pass a shorter prompt")
    chosen = None if heads is None else check_heads(model, heads)
    n_layers, _ = head_shape(model)
    ids = ids.to(model.device)
    with eager_attention(model.hf), torch.no_grad():
        out = model.hf(ids, attention_mask=torch.ones_like(ids), output_attentions=True,
                       use_cache=False)
    weights = getattr(out, "attentions", None)
    if weights is None or len(weights) != n_layers or any(w is None for w in weights):
        raise UnsupportedModelError(f"{model.architecture} returned no attention weights with "
                                    "output_attentions=True under eager attention")
    if chosen is None:
        return torch.stack([w.float() for w in weights], dim=1)  # [b, L, H, p, p]
    return torch.stack([weights[layer][:, head].float() for layer, head in chosen], dim=1)


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token id as the text it stands for, made safe for matplotlib labels (``$`` would
    start math mode; line breaks are shown as ``\\n``).

    Examples
    --------
    >>> token_labels(None, [3, 7])
    ['3', '7']
    """
    if tokenizer is None:
        return [str(int(t)) for t in ids]
    out = []
    for t in ids:
        text = tokenizer.decode([int(t)])
        out.append(text.replace("\\", "\\\\").replace("$", r"\$").replace("\n", "\\n")
                   .replace("\r", "\\r").replace("\t", "\\t"))
    return out


def plot_attention(patterns: Tensor | Sequence[Tensor], tokens: Sequence[str] |
                   Sequence[Sequence[str]], titles: Sequence[str], path: str | Path) -> Path:
    """Draw attention patterns as heatmaps, one panel per pattern, to a PNG file.

    Parameters
    ----------
    patterns : Tensor or sequence of Tensor
        ``[n, p, p]``, or ``n`` square patterns of their own lengths (prompts of different
        lengths); query positions down, key positions across, weights in [0, 1].
    tokens : sequence of str, or sequence of sequences of str
        The token strings of the positions: one list shared by every panel, or one per panel.
    titles : sequence of str
        One title per panel, e.g. ``"a1.h2"``.
    path : str or Path
        The PNG file, written whole to a temporary name and moved into place.

    Returns
    -------
    Path

    Raises
    ------
    OptionError
        The counts or lengths do not match, or there are more than `MAX_PANELS` panels.

    Examples
    --------
    >>> import tempfile, torch
    >>> pattern = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     out = plot_attention(pattern[None], ["a", " b"], ["a0.h0"], f"{folder}/a.png")
    ...     out.stat().st_size > 0
    True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p.detach().float().cpu() for p in patterns]
    n = len(panels)
    if not 1 <= n <= MAX_PANELS:
        raise OptionError(f"{n} attention panels; draw between 1 and {MAX_PANELS} at a time")
    labels = [list(tokens)] * n if tokens and isinstance(tokens[0], str) else [
        list(t) for t in tokens]
    if len(labels) != n or len(titles) != n:
        raise OptionError(f"{n} patterns need {n} titles and {n} token lists (or one shared), "
                          f"got {len(titles)} and {len(labels)}")
    for pattern, words, title in zip(panels, labels, titles, strict=True):
        if pattern.dim() != 2 or not pattern.shape[0] == pattern.shape[1] == len(words):
            raise OptionError(f"panel {title!r}: a pattern must be [p, p] with p token labels, "
                              f"got {tuple(pattern.shape)} and {len(words)} labels")
    columns = min(n, COLUMNS)
    rows = math.ceil(n / columns)
    side = max(3.0, 0.28 * max(len(w) for w in labels) + 1.5)  # inches per panel
    fig = Figure(figsize=(columns * side + 1.0, rows * (side + 0.4)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_axis_off()
            continue
        words = labels[k]
        image = ax.imshow(panels[k].numpy(), vmin=0.0, vmax=1.0, cmap="Blues")
        ax.set_xticks(range(len(words)), words, rotation=90, fontsize=8)
        ax.set_yticks(range(len(words)), words, fontsize=8)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        ax.set_title(titles[k])
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out = Path(path)
    write_atomic(out, buf.getvalue())
    return out
