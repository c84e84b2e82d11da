"""What each attention head does: a score in [0, 1] per head for each of six known roles.

Four roles are read from attention patterns (`attention_patterns`, so they work on any Hugging
Face causal LM), measured on ``n`` repeated random sequences ``[BOS] x x``: ``x`` is ``T``
random tokens (distinct within a sequence when the vocabulary allows; special tokens left out),
BOS is the tokenizer's (else the config's) BOS token, left out when the model has none, and
``T = min(length, (context - bos) // 2)``. With ``s`` = 1 with BOS (else 0) and query positions
``i``:

``previous-token``
    mean over sequences and ``i >= 1`` of the attention from ``i`` to ``i - 1``;
``first-token``
    mean over ``i >= 1`` of the attention to position 0 (the attention sink);
``duplicate-token``
    mean over the second copy, ``s + T <= i < s + 2T``, of the attention from ``i`` to
    ``i - T``, the earlier occurrence of its own token;
``induction``
    mean over the second copy of the attention from ``i`` to ``i - T + 1``, the token that
    followed the earlier occurrence of its token.

Two roles read what a head writes, through the family's edge adapter (`circuits.adapters`);
they are absent for models without one:

``copying``
    does the head's OV circuit raise the logits of the tokens it attends to? For
    ``min(max(n, 64), 1024)`` random tokens ``t`` (distinct, special tokens left out; 1024
    tokens measure the fraction to within about 0.03): ``t``'s input
    embedding, minus the mean embedding of the sampled tokens (which removes any position
    embedding and the direction all tokens share), through the layer's attention norm, the
    head's value and output projections (and the post-norm, where the family has one), the
    final norm and the unembedding, with the unembedding of a zero write subtracted (the final
    norm's bias belongs to no head). The score is the fraction of ``t`` whose own logit is
    strictly above all but fewer than ``k`` of the other logits, i.e. ranks in the top
    ``k = clamp(vocab // 100, 1, 5)`` (top 5 of GPT-2's vocabulary, as in Wang et al. 2022; top
    1 of a toy's). A head that writes nothing ties every logit and scores 0. The weights alone
    decide it: where a head attends does not enter.
``name-mover``
    only with a task. On its first ``n`` clean prompts, at the final position: the head's
    attention to the positions (before the last) holding the first answer token, times 1 when
    the head's direct write there (its actual output ``W_O^h z_h``, through the final norm and
    unembedding as above) raises the first answer's logit above the first wrong token's (above
    0 when the prompt has no wrong token), else 0; minus its attention to the positions holding
    any wrong token; the mean over prompts, clipped to [0, 1]. A head that looks at the answer
    without promoting it, promotes it without looking, or reads a fixed position that holds
    the answer in some prompts and a wrong token in the others, scores low.

What the scores justify calling a head (its label) is `circuits.reading.role_labels`; the
names defined there stay importable from here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import outputs  # outputs.progress_bar: tests replace it there
from ..adapters import adapter_for
from ..errors import OptionError, UnsupportedModelError
from ..model import Model
from ..nodes import NodeSites
from ..placement import execution_device
from .attention import attention_patterns, head_shape
from .dla import direct_logit_attribution
from .role_labels import DLA_SHARE as DLA_SHARE  # re-exported with the other label names
from .role_labels import LABEL_MIN as LABEL_MIN
from .role_labels import MIXED_GAP as MIXED_GAP
from .role_labels import ROLES, HeadRoles
from .role_labels import SPECIFIC as SPECIFIC
from .role_labels import Label as Label
from .role_labels import plot_roles as plot_roles

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..task import Task

CHUNK = 8  # sequences or prompts per forward pass
COPY_TOKENS = 64  # `copying` reads at least this many tokens (n when larger)
COPY_TOKENS_MAX = 1024  # and at most this many: the fraction to within ~0.03, in bounded time
LOGITS_BUDGET = 2**25  # `copying`: most logits held at once (128 MiB in float32)
COPY_TOP_MAX = 5  # `copying`: the own logit must rank in the top k = clamp(vocab // 100, 1, 5)


def head_roles(model: Model, task: Task | None = None, *, n: int = 32, length: int = 20,
               seed: int = 0) -> HeadRoles:
    """Score every head of `model` in each role it can be measured in.

    Parameters
    ----------
    model : Model
        Any Hugging Face causal LM; ``copying`` and ``name-mover`` need an edge family
        (`circuits.adapters`).
    task : Task, optional
        Its clean prompts give the ``name-mover`` scores (absent without a task).
    n : int
        Random sequences for the attention roles, random tokens for ``copying`` (at least
        `COPY_TOKENS`), and task prompts (the first ``n``) for ``name-mover``.
    length : int
        ``T``, the length of each half of the repeated sequences (shortened to fit the model's
        context); at least 2.
    seed : int
        Seeds the random sequences and tokens.

    Returns
    -------
    HeadRoles

    Raises
    ------
    OptionError
        `n` or `length` below the minimum, or a model whose context or vocabulary is too
        small for repeated sequences.

    Examples
    --------
    >>> from circuits.toys import induction_model
    >>> roles = head_roles(induction_model(), n=4)
    >>> roles.best()["a1.h0"][0], roles.best()["a0.h0"][0]
    ('induction', 'previous-token')
    """
    for name, value, least in (("n", n, 1), ("length", length, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise OptionError(f"{name} must be a whole number of at least {least}, got {value!r}")

    ids, start, half = repeated_sequences(model, n, length, seed)
    adapter = _adapter(model)
    first = None if task is None else replace(task, examples=task.examples[:n])
    steps = math.ceil(n / CHUNK)  # forwards of the attention roles, then copying's layers ...
    if adapter is not None:
        steps += adapter.arch.n_layers
        if first is not None:  # ... name-mover's forwards and the attribution
            steps += math.ceil(len(first.examples) / CHUNK) + 1
    dla, dla_total = None, None
    with outputs.progress_bar(steps, "head roles", "step") as bar:
        scores = _attention_roles(model, ids, start, half, bar.update)
        if adapter is not None:
            tokens = sample_tokens(model, min(max(n, COPY_TOKENS), COPY_TOKENS_MAX), seed)
            scores["copying"] = _copying(adapter, tokens, bar.update)
            if first is not None:
                scores["name-mover"] = _name_mover(model, adapter, first, bar.update)
                dla, dla_total = _contrastive_dla(model, first)
                bar.update(1)
    return HeadRoles({r: scores[r] for r in ROLES if r in scores}, length=half, n=n, seed=seed,
                     task=None if task is None else task.name, dla=dla, dla_total=dla_total)


def _contrastive_dla(model: Model, task: Task) -> tuple[Tensor | None, float | None]:
    """Each head's clean-minus-corrupted direct logit attribution (logit difference) on the
    task's prompts, and the metric's difference; None where the model cannot be read so."""
    try:
        found = direct_logit_attribution(model, task, metric="logit-diff", batch_size=CHUNK,
                                         contrast=True)
    except UnsupportedModelError:
        return None, None
    return found.heads.float(), found.total


# -- inputs ------------------------------------------------------------------------------------
def _special_ids(model: Model) -> set[int]:
    """Token ids of special tokens (tokenizer's and config's BOS, EOS, PAD, UNK)."""
    special: set[int] = set()
    if model.tokenizer is not None:
        special |= set(getattr(model.tokenizer, "all_special_ids", ()) or ())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model.hf.config, key, None)
        special |= {v for v in (value if isinstance(value, list) else [value])
                    if isinstance(v, int)}
    return special


def _bos(model: Model) -> int | None:
    """The BOS token id: the tokenizer's, else the config's; None when the model has none."""
    bos = getattr(model.tokenizer, "bos_token_id", None) if model.tokenizer is not None else None
    bos = getattr(model.hf.config, "bos_token_id", None) if bos is None else bos
    return bos if isinstance(bos, int) else None


def usable_tokens(model: Model) -> Tensor:
    """Token ids random sequences draw from: the vocabulary both the tokenizer and the
    embedding know, without special tokens.

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> usable_tokens(tiny_gpt2(vocab_size=8)).tolist()  # 0 is BOS and EOS
    [1, 2, 3, 4, 5, 6, 7]
    """
    size = model.hf.get_input_embeddings().weight.shape[0]
    if model.tokenizer is not None:
        size = min(size, len(model.tokenizer))
    special = _special_ids(model)
    tokens = torch.tensor([t for t in range(size) if t not in special], dtype=torch.long)
    if len(tokens) < 2:
        raise OptionError(f"{model.name!r} has fewer than 2 ordinary tokens; head roles need "
                          "random sequences of them")
    return tokens


def sample_tokens(model: Model, n: int, seed: int) -> Tensor:
    """``min(n, usable)`` distinct random token ids ``[m]`` from `usable_tokens`."""
    tokens = usable_tokens(model)
    gen = torch.Generator().manual_seed(seed)
    return tokens[torch.randperm(len(tokens), generator=gen)[:n]]


def repeated_sequences(model: Model, n: int, length: int, seed: int
                       ) -> tuple[Tensor, int, int]:
    """``n`` sequences ``[BOS] x x`` of random tokens (see the module docstring).

    Returns
    -------
    ids : Tensor
        ``[n, s + 2T]`` token ids on the model's device.
    s : int
        1 when a BOS token leads, else 0.
    T : int
        Length of ``x``: `length`, shortened to fit the model's context.

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> ids, s, T = repeated_sequences(tiny_gpt2(n_positions=9), n=2, length=20, seed=0)
    >>> ids.shape, s, T, bool((ids[:, 1:5] == ids[:, 5:]).all())
    (torch.Size([2, 9]), 1, 4, True)
    """
    tokens = usable_tokens(model)
    bos = _bos(model)
    start = 0 if bos is None else 1
    context = model.context_length
    half = length if context is None else min(length, (context - start) // 2)
    if half < 2:
        raise OptionError(f"{model.name!r} reads {context} positions, too few for repeated "
                          "sequences of at least 2 tokens each")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        if len(tokens) >= half:
            x = tokens[torch.randperm(len(tokens), generator=gen)[:half]]
        else:
            x = tokens[torch.randint(len(tokens), (half,), generator=gen)]
        rows.append(torch.cat([torch.tensor([bos] * start, dtype=torch.long), x, x]))
    return torch.stack(rows).to(model.device), start, half


def _adapter(model: Model) -> Adapter | None:
    """The model's edge adapter, or None for a family without one."""
    try:
        return adapter_for(model.hf)
    except UnsupportedModelError:
        return None


# -- the roles ---------------------------------------------------------------------------------
def _attention_roles(model: Model, ids: Tensor, start: int, half: int,
                     step: Callable[[int], Any]) -> dict[str, Tensor]:
    """previous-token, duplicate-token, first-token and induction scores ``[L, H]``; `step(1)`
    after each forward."""
    n_layers, n_heads = head_shape(model)
    sums = {r: torch.zeros(n_layers, n_heads) for r in ROLES[:4]}
    for lo in range(0, len(ids), CHUNK):
        pattern = attention_patterns(model, ids[lo:lo + CHUNK]).cpu()  # [b, L, H, p, p]
        # diagonal(-k)[..., j] is the weight of query j + k on key j
        sums["previous-token"] += pattern.diagonal(-1, -2, -1).mean(-1).sum(0)
        sums["first-token"] += pattern[..., 1:, 0].mean(-1).sum(0)
        # second copy: queries start + half ... start + 2 half - 1
        sums["duplicate-token"] += pattern.diagonal(-half, -2, -1)[..., start:].mean(-1).sum(0)
        sums["induction"] += pattern.diagonal(1 - half, -2, -1)[..., start + 1:].mean(-1).sum(0)
        step(1)
    return {r: (s / len(ids)).clamp(0.0, 1.0) for r, s in sums.items()}


def _zero_logits(adapter: Adapter, like: Tensor, columns: Tensor | None = None) -> Tensor:
    """The logits of a zero write (the final norm's bias alone), to subtract from a head's."""
    return adapter.unembed(like.new_zeros(like.shape[-1]), columns)


def _copying(adapter: Adapter, tokens: Tensor, step: Callable[[int], Any]) -> Tensor:
    """``[L, H]``: the fraction of `tokens` each head's OV circuit maps to their own top-k
    logit (see the module docstring); `step(1)` after each layer."""
    arch = adapter.arch
    device = execution_device(adapter.hf.get_input_embeddings())  # as `Model.device`
    tokens = tokens.to(device)
    counts = torch.zeros(arch.n_layers, arch.n_heads)
    with torch.no_grad():
        x = adapter.embed(tokens[:, None])  # [m, 1, d]
        x = x - x.mean(0, keepdim=True)
        zero = _zero_logits(adapter, x).float()  # [V]
        top = min(COPY_TOP_MAX, max(1, zero.shape[-1] // 100))
        # chunks of heads and tokens whose logits stay within the budget
        rows = max(1, LOGITS_BUDGET // zero.shape[-1])  # (head, token) pairs at a time
        width = min(len(tokens), rows)  # tokens at a time
        height = max(1, rows // width)  # heads at a time
        for layer in range(arch.n_layers):
            _, _, v = adapter.qkv(layer, x)  # [m, K, 1, dh]
            z = v.repeat_interleave(arch.group_size, dim=-3)  # [m, H, 1, dh]: each head reads t
            writes = adapter.head_writes(layer, z)  # [H, m, 1, d]
            if arch.post_norm:
                writes = writes * adapter.attn_post_scale(layer, writes)
            for lo in range(0, arch.n_heads, height):
                for at in range(0, len(tokens), width):
                    chunk = writes[lo:lo + height, at:at + width, 0]  # [h, t, d]
                    logits = adapter.unembed(chunk).float() - zero  # [h, t, V]
                    own = logits.gather(-1, tokens[at:at + width].expand(len(chunk), -1)[..., None])
                    rivals = (logits >= own).sum(-1) - 1  # other tokens at or above the own logit
                    counts[layer, lo:lo + height] += (rivals < top).float().sum(-1).cpu()
            step(1)
    return counts / len(tokens)


def _name_mover(model: Model, adapter: Adapter, task: Task, step: Callable[[int], Any]
                ) -> Tensor:
    """``[L, H]`` on every prompt of `task`: attention from the last position to the answer,
    counted where the head's direct write promotes the answer over the wrong token, minus
    attention to the wrong tokens (see the module docstring); `step(1)` after each forward."""
    arch = adapter.arch
    batches = task.batches(model.tokenizer, batch_size=CHUNK, device=model.device,
                           max_length=model.context_length)
    total = torch.zeros(arch.n_layers, arch.n_heads)
    count = 0
    for batch in batches:
        ids, b = batch.clean, batch.size
        answer, wrong = batch.answers[:, 0], batch.wrong[:, 0]  # [b]; wrong is -1 when none
        with _last_head_outputs(model) as z:  # layer -> [b, H * dh], filled by the same pass
            last = attention_patterns(model, ids)[..., -1, :-1].cpu()  # [b, L, H, p - 1]
        at_answer = (ids[:, :-1] == answer[:, None]).cpu().float()  # [b, p - 1]
        wrongs = batch.wrong.cpu()  # [b, n], -1 pads
        at_wrong = ((ids[:, :-1, None].cpu() == wrongs[:, None]) & (wrongs[:, None] >= 0)
                    ).any(-1).float()  # [b, p - 1]
        to_answer = (last * at_answer[:, None, None]).sum(-1)  # [b, L, H]
        to_wrong = (last * at_wrong[:, None, None]).sum(-1)
        columns = torch.cat([answer, wrong.clamp(min=0)])  # [2b]
        rows = torch.arange(b, device=ids.device)
        with torch.no_grad():
            for layer in range(arch.n_layers):
                heads = z[layer].unflatten(-1, (arch.n_heads, -1))[:, :, None]  # [b, H, 1, dh]
                writes, _ = adapter.attn_sources(layer, heads)  # [H, b, 1, d]
                logits = (adapter.unembed(writes[:, :, 0], columns)
                          - _zero_logits(adapter, writes, columns)).float()  # [H, b, 2b]
                up = logits[:, rows, rows]  # the answer's logit, [H, b]
                down = torch.where(wrong >= 0, logits[:, rows, b + rows], 0.0)
                promotes = (up > down).float().cpu()  # [H, b]
                # attention to a wrong token always counts against the head: one that reads a
                # fixed position, holding the answer in some prompts and a wrong token in the
                # others, gains nothing
                total[layer] += (to_answer[:, layer] * promotes.T - to_wrong[:, layer]).sum(0)
        count += b
        step(1)
    return (total / max(count, 1)).clamp(0.0, 1.0)


@contextlib.contextmanager
def _last_head_outputs(model: Model) -> Iterator[dict[int, Tensor]]:
    """Inside the block, each forward pass records every layer's head outputs at the last
    position (the input of the attention output projection, heads side by side: ``[b, H *
    dh]``, the `circuits.nodes` head sites); the hooks are removed on the way out."""
    seen: dict[int, Tensor] = {}
    handles = []
    try:
        for layer, path in enumerate(NodeSites.of(model).attn_out):
            def keep(module: Any, args: tuple, layer: int = layer) -> None:
                seen[layer] = args[0][:, -1].detach()
            handles.append(model.hf.get_submodule(path).register_forward_pre_hook(keep))
        yield seen
    finally:
        for handle in handles:
            handle.remove()
