"""The residual stream of labelled texts at chosen layers and positions.

A position spec says which tokens of a text are read (their mean when several):

``last``
    The text's last token (the default).
``mean``
    Every token of the text (not the BOS a model puts before it).
an integer, e.g. ``-2`` or ``3``
    That token of the text's own tokens (negative from the end).
``S:E``
    The tokens ``S`` to ``E - 1`` of the text's own tokens.
a mark name, e.g. ``subject``
    The last token of that marked span of the text (`Labeled.marks`); ``subject:mean`` reads
    the mean over the mark's tokens.

Texts of different lengths are batched with padding on the right: a causal model's states at a
position never see later tokens, so the padding changes nothing that is read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import OptionError, TaskError
from ..features.sites import read_sites, site_of
from ..model import Model
from ..nodes import NodeSites
from ..task_tokens import prefix_ids
from .labels import INDEX_RE, MARK_RE, SPAN_RE, Labeled, check_position


def parse_layers(spec: str | int | Sequence[int] | None, n_layers: int) -> list[int]:
    """The layers a spec names: ``all`` (or None), ``3``, ``0-5``, ``0,2,4``; negative numbers
    count from the end.

    Examples
    --------
    >>> parse_layers("1-3", 4), parse_layers("0,-1", 4), parse_layers(None, 2)
    ([1, 2, 3], [0, 3], [0, 1])
    """
    if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
        return list(range(n_layers))
    if isinstance(spec, int):
        items: list[Any] = [spec]
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            part = part.strip()
            ends = re.fullmatch(r"(\d+)-(\d+)", part)
            if ends:
                items.extend(range(int(ends[1]), int(ends[2]) + 1))
            elif INDEX_RE.fullmatch(part):
                items.append(int(part))
            else:
                raise OptionError(f"layers {spec!r} not understood; use all, a layer (3), a "
                                  f"range (0-5) or a list (0,2,4)")
    else:
        items = list(spec)
    layers = []
    for layer in items:
        if isinstance(layer, bool) or not isinstance(layer, int) \
                or not -n_layers <= layer < n_layers:
            raise OptionError(f"layer {layer} is out of range: the model has layers 0 to "
                              f"{n_layers - 1}")
        layers.append(layer % n_layers)
    if not layers:
        raise OptionError(f"layers {spec!r} names no layer; use all, a layer or a range")
    return list(dict.fromkeys(layers))


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no special tokens) and each token's character span."""
    if hasattr(tokenizer, "encode") and not callable(getattr(tokenizer, "batch_decode", None)):
        out = tokenizer.encode(text, add_special_tokens=False)  # a `tokenizers` Tokenizer
        return list(out.ids), [tuple(o) for o in out.offsets]
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]


def _span(spec: str, n: int, offsets: list[tuple[int, int]], marks: dict, where: str
          ) -> tuple[int, int]:
    """The ``[start, end)`` span of the text's own `n` tokens that `spec` reads."""
    if spec == "last":
        return n - 1, n
    if spec == "mean":
        return 0, n
    if INDEX_RE.fullmatch(spec):
        i = int(spec)
        if not -n <= i < n:
            raise TaskError(f"{where}: position {i} is outside its {n} tokens; use an index "
                            f"from {-n} to {n - 1}")
        return i % n, i % n + 1
    span = SPAN_RE.fullmatch(spec)
    if span:
        start, end = (int(v) % n if int(v) < 0 else int(v) for v in span.groups())
        if not 0 <= start < end <= n:
            raise TaskError(f"{where}: span {spec} is not a non-empty span of its {n} tokens")
        return start, end
    name, mean = MARK_RE.fullmatch(spec).groups()
    if name not in marks:
        known = ", ".join(marks) or "none"
        raise TaskError(f"{where}: no mark {name!r} (its marks: {known}); use last, mean, a "
                        f"token index, a span S:E or one of its marks")
    a, b = marks[name]
    hit = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
    if not hit:
        raise TaskError(f"{where}: mark {name!r} covers no token")
    return (hit[0], hit[-1] + 1) if mean else (hit[-1], hit[-1] + 1)


def reading_spans(model: Model, labeled: Labeled, position: str | int | None = None
                  ) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Each text's token ids (after the model's BOS prefix) and the span of them to read.

    Parameters
    ----------
    model : Model
        Its tokenizer tokenizes the texts.
    labeled : Labeled
    position : str or int, optional
        A position spec (module docstring) for every text; by default each text's own.

    Returns
    -------
    (list of list of int, list of (int, int))
        Token ids and ``[start, end)`` spans in those ids (the prefix counted).

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> ids, spans = reading_spans(p.model, p.labeled.subset([0]))
    >>> spans[0] == (len(ids[0]) - 1, len(ids[0]))
    True
    """
    if model.tokenizer is None:
        raise OptionError("the model has no tokenizer; load it from a folder that has one")
    position = check_position(position)
    prefix = prefix_ids(model.tokenizer)
    limit = model.context_length
    ids, spans = [], []
    for i, text in enumerate(labeled.texts):
        where = f"{labeled.name}: text {i + 1}"
        tokens, offsets = _encode(model.tokenizer, text)
        if not tokens:
            raise TaskError(f"{where} is no tokens for this tokenizer; give a text")
        if limit is not None and len(prefix) + len(tokens) > limit:
            raise TaskError(f"{where} is {len(prefix) + len(tokens)} tokens but the model reads "
                            f"at most {limit}; shorten it")
        start, end = _span(position or labeled.positions[i], len(tokens), offsets,
                           labeled.marks[i], where)
        ids.append(prefix + tokens)
        spans.append((start + len(prefix), end + len(prefix)))
    return ids, spans


def padded(ids: Sequence[Sequence[int]], pad: int = 0) -> Tensor:
    """``[b, longest]`` ids padded on the right with `pad` (see the module docstring)."""
    width = max(len(x) for x in ids)
    return torch.tensor([list(x) + [pad] * (width - len(x)) for x in ids], dtype=torch.long)


def hidden_states(model: Model, labeled: Labeled, layers: Sequence[int] | str | None = None,
                  position: str | int | None = None, batch_size: int = 32) -> Tensor:
    """The residual stream after each of `layers`, read where each text says.

    Parameters
    ----------
    model : Model
    labeled : Labeled
    layers : sequence of int or str, optional
        Decoder layers (`parse_layers`); all by default.
    position : str or int, optional
        A position spec overriding the texts' own.
    batch_size : int

    Returns
    -------
    Tensor
        ``[len(layers), n, d_model]`` float32 on the CPU: the mean over each text's span.

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> tuple(hidden_states(p.model, p.labeled.subset(range(3)), [0, 1]).shape)
    (2, 3, 32)
    """
    layers = parse_layers(layers, NodeSites.of(model).n_layers)
    ids, spans = reading_spans(model, labeled, position)
    sites = [site_of(model, f"resid.{layer}") for layer in layers]
    out = torch.empty(len(layers), len(ids), sites[0].width)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths batch together
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        acts = read_sites(model, padded([ids[i] for i in chunk]), sites)
        for j, site in enumerate(sites):
            for row, i in enumerate(chunk):
                start, end = spans[i]
                out[j, i] = acts[site.name][row, start:end].mean(0).cpu()
    return out


def read_tokens(model: Model, labeled: Labeled, position: str | int | None = None) -> list[str]:
    """The text of the tokens each example is read at: the default control-task word.

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> read_tokens(p.model, p.labeled.subset([0]))[0] == p.labeled.texts[0].split()[-1]
    True
    """
    ids, spans = reading_spans(model, labeled, position)
    return [model.tokenizer.decode(x[s:e]).strip() for x, (s, e) in zip(ids, spans, strict=True)]


def control_words(model: Model, labeled: Labeled, position: str | int | None = None
                  ) -> list[str]:
    """Each example's control-task word type: its own `Labeled.words` entry, or else the text of
    the tokens read."""
    read = None
    words = []
    for i, word in enumerate(labeled.words):
        if not word:
            read = read or read_tokens(model, labeled, position)
            word = read[i]
        words.append(word)
    return words
