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

Labels
    A score is a measurement; a label is a claim. `HeadRoles.labels` names a head by a role only
    where the evidence is strong (the thresholds are `LABEL_MIN`, `MIXED_GAP` and `DLA_SHARE`):

    * a role labels a head only at a score of at least ``LABEL_MIN = 0.4``: the role's pattern
      takes at least 40% of the head's attention (chance is about 0.03 to 0.1 on the repeated
      sequences), or 40% of tokens are copied;
    * ``name-mover`` also needs the head to raise the answer in direct logit attribution on the
      task: its contrastive term (clean minus corrupted prompts, `circuits.reading.dla`, logit
      difference) positive and at least ``DLA_SHARE = 5%`` of the metric's clean minus
      corrupted difference; a head whose direct effect is the same on both prompts pushes a
      prior, not the answer;
    * ``copying`` describes what a head's OV circuit does with whatever it attends to, which
      induction heads and name movers also do: it labels a head only when no attention role
      does;
    * two attention roles that both qualify and lie within ``MIXED_GAP = 0.1`` of each other
      give ``mixed``;
    * otherwise the head is unlabelled (role ``""``), however high its direct logit attribution:
      a weak attention role would describe it wrongly.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import OptionError, UnsupportedModelError
from ..model import Model
from .attention import attention_patterns, head_shape

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..task import Task

ROLES = ("previous-token", "duplicate-token", "first-token", "induction", "copying",
         "name-mover")
#: Roles from the most specific to the least: how `HeadRoles.best` breaks ties.
SPECIFIC = ("name-mover", "induction", "duplicate-token", "previous-token", "copying",
            "first-token")
CHUNK = 8  # sequences or prompts per forward pass
COPY_TOKENS = 64  # `copying` reads at least this many tokens (n when larger)
COPY_TOKENS_MAX = 1024  # and at most this many: the fraction to within ~0.03, in bounded time
LOGITS_BUDGET = 2**25  # `copying`: most logits held at once (128 MiB in float32)
COPY_TOP_MAX = 5  # `copying`: the own logit must rank in the top k = clamp(vocab // 100, 1, 5)
LABEL_MIN = 0.4  # a role labels a head only at this score or above
MIXED_GAP = 0.1  # two qualifying attention roles closer than this: "mixed"
DLA_SHARE = 0.05  # name-mover: contrastive DLA at least this share of the metric's difference


@dataclass(frozen=True)
class Label:
    """What `HeadRoles.labels` calls a head.

    Attributes
    ----------
    role : str
        A role of `ROLES`, ``"mixed"``, or ``""`` when no role is strong enough.
    score : float
        The role's score (the strongest of the mixed ones; the head's highest score when
        unlabelled).
    mixed : tuple of str
        With ``"mixed"``: the close roles, strongest first.
    """

    role: str
    score: float
    mixed: tuple[str, ...] = ()

    def __str__(self) -> str:
        """``"induction 0.93"``, ``"mixed (induction, previous-token) 0.62"`` or ``"-"``."""
        if not self.role:
            return "-"
        name = f"mixed ({', '.join(self.mixed)})" if self.mixed else self.role
        return f"{name} {self.score:.2f}"


@dataclass(frozen=True)
class HeadRoles:
    """Role scores of every head of a model (see the module docstring for the definitions).

    Attributes
    ----------
    scores : dict[str, Tensor]
        Role name -> ``[n_layers, n_heads]`` float32 scores in [0, 1], in `ROLES` order; a
        role the model or the call cannot measure is absent.
    length : int
        ``T``, the length of each half of the repeated random sequences as used.
    n : int
        Random sequences (and tokens, and task prompts) asked for.
    seed : int
    task : str or None
        The task's name, when name-mover scores were measured on one.
    dla : Tensor or None
        ``[n_layers, n_heads]``: each head's contrastive direct logit attribution (clean minus
        corrupted, logit difference) on the task's first ``n`` prompts; None without a task or
        where it cannot be read. `labels` needs it for ``name-mover``.
    dla_total : float or None
        The metric's clean minus corrupted difference on those prompts.
    """

    scores: dict[str, Tensor]
    length: int = 0
    n: int = 0
    seed: int = 0
    task: str | None = field(default=None)
    dla: Tensor | None = field(default=None, compare=False)
    dla_total: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, n_heads)``."""
        first = next(iter(self.scores.values()))
        return int(first.shape[0]), int(first.shape[1])

    def heads(self) -> Iterator[tuple[str, int, int]]:
        """``(name, layer, head)`` of every head, layer by layer."""
        n_layers, n_heads = self.shape
        for layer in range(n_layers):
            for head in range(n_heads):
                yield f"a{layer}.h{head}", layer, head

    def best(self) -> dict[str, tuple[str, float]]:
        """Each head's strongest role and its score, however weak: a measurement, not a label
        (`labels` says what a head can be called).

        Scores equal to two decimals (as the table shows them) go to the more specific role, in
        the order of `SPECIFIC`: name movers and induction heads also copy, and copying is a
        fraction that often reaches exactly 1. A head whose every score shows as 0.00 gets
        ``("none", its highest score)``.

        Returns
        -------
        dict
            ``"a{l}.h{h}"`` -> ``(role, score)``.

        Examples
        --------
        >>> import torch
        >>> roles = HeadRoles({"first-token": torch.tensor([[0.2, 0.9]]),
        ...                    "induction": torch.tensor([[0.7, 0.1]])})
        >>> roles.best()
        {'a0.h0': ('induction', 0.699999988079071), 'a0.h1': ('first-token', 0.8999999761581421)}
        """
        out = {}
        for name, layer, head in self.heads():
            def rank(role: str, layer: int = layer, head: int = head) -> tuple[float, int]:
                order = SPECIFIC.index(role) if role in SPECIFIC else len(SPECIFIC)
                return round(float(self.scores[role][layer, head]), 2), -order

            role = max(self.scores, key=rank)
            score = float(self.scores[role][layer, head])
            out[name] = (role if round(score, 2) > 0 else "none", score)
        return out

    def labels(self) -> dict[str, Label]:
        """What each head can be called: its role where the evidence is strong, ``"mixed"``
        where two are close, ``""`` otherwise (the rule is in the module docstring).

        Returns
        -------
        dict
            ``"a{l}.h{h}"`` -> `Label`.

        Examples
        --------
        >>> import torch
        >>> roles = HeadRoles({"previous-token": torch.tensor([[0.9, 0.5, 0.1]]),
        ...                    "first-token": torch.tensor([[0.0, 0.45, 0.12]])})
        >>> [str(label) for label in roles.labels().values()]
        ['previous-token 0.90', 'mixed (previous-token, first-token) 0.50', '-']
        """
        out = {}
        for name, layer, head in self.heads():
            scores = {r: float(s[layer, head]) for r, s in self.scores.items()}
            strong = [r for r, v in scores.items()
                      if v >= LABEL_MIN and self._backed(r, layer, head)]
            attention = [r for r in strong if r != "copying"]
            ranked = sorted(attention or strong, key=lambda r: (-round(scores[r], 2),
                                                                 SPECIFIC.index(r)))
            if not ranked:
                out[name] = Label("", max(scores.values(), default=0.0))
            elif len(ranked) > 1 and scores[ranked[0]] - scores[ranked[1]] < MIXED_GAP:
                close = tuple(r for r in ranked if scores[ranked[0]] - scores[r] < MIXED_GAP)
                out[name] = Label("mixed", scores[ranked[0]], close)
            else:
                out[name] = Label(ranked[0], scores[ranked[0]])
        return out

    def _backed(self, role: str, layer: int, head: int) -> bool:
        """Whether direct logit attribution backs `role` (only ``name-mover`` needs it)."""
        if role != "name-mover":
            return True
        if self.dla is None or self.dla_total is None:
            return False
        term = float(self.dla[layer, head])
        return term > 0 and term >= DLA_SHARE * abs(self.dla_total)

    def to_dict(self) -> dict[str, Any]:
        """The scores as plain JSON types: shape, settings, ``scores`` (role -> rows of
        layers), ``best`` (head -> its strongest role and score), ``labels`` (head -> `Label`
        as ``role``, ``score`` and ``mixed``), and with a task ``dla`` (rows of layers) and
        ``dla_total``.

        Examples
        --------
        >>> import torch
        >>> d = HeadRoles({"induction": torch.tensor([[0.5]])}, length=4, n=2).to_dict()
        >>> d["scores"], d["best"], d["labels"]
        ({'induction': [[0.5]]}, {'a0.h0': {'role': 'induction', 'score': 0.5}}, \
{'a0.h0': {'role': 'induction', 'score': 0.5, 'mixed': []}})
        """
        n_layers, n_heads = self.shape
        out = {
            "n_layers": n_layers, "n_heads": n_heads, "roles": list(self.scores),
            "length": self.length, "n": self.n, "seed": self.seed, "task": self.task,
            "scores": {r: [[round(float(x), 4) for x in row] for row in s.tolist()]
                       for r, s in self.scores.items()},
            "best": {name: {"role": role, "score": round(score, 4)}
                     for name, (role, score) in self.best().items()},
            "labels": {name: {"role": label.role, "score": round(label.score, 4),
                              "mixed": list(label.mixed)}
                       for name, label in self.labels().items()},
        }
        if self.dla is not None:
            out["dla"] = [[round(float(x), 6) for x in row] for row in self.dla.tolist()]
            out["dla_total"] = self.dla_total
        return out

    def table(self) -> str:
        """A text table: one row per head, its score in each role, its contrastive direct logit
        attribution (with a task) and its label (``-``: none).

        Examples
        --------
        >>> import torch
        >>> print(HeadRoles({"induction": torch.tensor([[0.5, 0.25]])}).table())
        head   induction  label
        -----  ---------  --------------
        a0.h0  0.50       induction 0.50
        a0.h1  0.25       -
        """
        from ..report import text_table

        labels = self.labels()
        dla = [] if self.dla is None else ["dla (clean - corrupted)"]
        rows = [(name, *(f"{float(s[layer, head]):.2f}" for s in self.scores.values()),
                 *([f"{float(self.dla[layer, head]):+.3f}"] if dla else []), str(labels[name]))
                for name, layer, head in self.heads()]
        return text_table(rows, header=("head", *self.scores, *dla, "label"))


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
    from ..outputs import progress_bar

    ids, start, half = repeated_sequences(model, n, length, seed)
    adapter = _adapter(model)
    first = None if task is None else replace(task, examples=task.examples[:n])
    steps = math.ceil(n / CHUNK)  # forwards of the attention roles, then copying's layers ...
    if adapter is not None:
        steps += adapter.arch.n_layers
        if first is not None:  # ... name-mover's forwards and the attribution
            steps += math.ceil(len(first.examples) / CHUNK) + 1
    dla, dla_total = None, None
    with progress_bar(steps, "head roles", "step") as bar:
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
    from .dla import direct_logit_attribution

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
    from ..adapters import adapter_for

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
    device = next(adapter.hf.parameters()).device
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
    from ..nodes import NodeSites

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


# -- the figure --------------------------------------------------------------------------------
def plot_roles(roles: HeadRoles, path: str | Path) -> Path:
    """Draw one heatmap per role (layers down, heads across, colour scale [0, 1]) to a PNG.

    Parameters
    ----------
    roles : HeadRoles
    path : str or Path
        The PNG file, written whole to a temporary name and moved into place.

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile, torch
    >>> roles = HeadRoles({"induction": torch.tensor([[0.1, 0.9]])})
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     plot_roles(roles, f"{folder}/heads.png").stat().st_size > 0
    True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io import write_atomic

    n_layers, n_heads = roles.shape
    columns = min(len(roles.scores), 3)
    rows = math.ceil(len(roles.scores) / columns)
    width = max(2.5, 0.45 * n_heads + 1.2)
    height = max(2.2, 0.4 * n_layers + 1.0)
    fig = Figure(figsize=(columns * width + 1.2, rows * height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    annotate = n_layers * n_heads <= 144  # values in the cells while they stay legible
    for ax, (role, scores) in zip(axes.flat, roles.scores.items(), strict=False):
        values = scores.float().numpy()
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(role)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        if annotate:
            for layer in range(n_layers):
                for head in range(n_heads):
                    value = values[layer, head]
                    ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if value > 0.6 else "white")
    for ax in list(axes.flat)[len(roles.scores):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.7, label="score")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out = Path(path)
    write_atomic(out, buf.getvalue())
    return out
