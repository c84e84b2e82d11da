"""Hand-built models whose circuit is known by construction, for testing discovery methods.

`induction_toy` builds a two-layer, two-head GPT-2 whose every weight is set by hand: a
previous-token head in layer 0 feeds, through the key input, an induction head in layer 1 that
copies the token which followed the earlier occurrence of the current token to the logits. Two
distractor heads are active (their outputs differ between clean and corrupted prompts) but write
into residual dimensions that nothing on the path to the logits reads, and the MLPs are zero.

How LayerNorm is tamed
----------------------
Every vector written into the residual stream is "one-hot minus sink": ``+1`` in one dimension of
a block reserved for its writer and ``-1`` in that block's sink dimension. Such vectors sum to zero,
so the residual's mean is exactly zero and LayerNorm only divides by the root mean square. Every
attention pattern is sharp (score margins of about 40 before the softmax), so every write has norm
``sqrt(2)`` and the root mean square of the residual is a known constant at each LayerNorm; the
LayerNorm gains are set to that constant, which makes each LayerNorm the identity on the prompts
the toy is made for. Replacing a write by the same writer's write on another prompt (resample
ablation) keeps the norm, so an edge whose destination ignores the writer's block has no effect
at all (up to float rounding), while edges on the circuit change the prediction completely.

Residual layout (``d_model = 64``; each block is ``V`` or ``P`` one-hot dimensions and a sink):

==========  ======================  =====================================
block       written by              read by
==========  ======================  =====================================
``TOK``     token embedding         a0.h0 value, a1.h0 query and value
``POS``     position embedding      a0.h0 and a0.h1/a1.h1 queries and keys
``PREV``    a0.h0 (previous token)  a1.h0 key
``JUNK0``   a0.h1 (current token)   a1.h1 value
``OUT``     a1.h0 (induction)       unembedding
``JUNK1``   a1.h1 (copy of JUNK0)   nothing
==========  ======================  =====================================
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .batch import Batch
from .errors import OptionError
from .model import Model

VOCAB = 8  # token 0 is BOS, tokens 1..7 fill the prompts
POSITIONS = 8
D_MODEL = 64
N_HEADS = 2
D_HEAD = D_MODEL // N_HEADS
_BLOCK = {"TOK": 0, "POS": 9, "PREV": 18, "JUNK0": 27, "OUT": 36, "JUNK1": 45}
_SINK = {"TOK": 8, "POS": 17, "PREV": 26, "JUNK0": 35, "OUT": 44, "JUNK1": 53}
SHARP = 40.0  # attention score margin (after GPT-2's 1/sqrt(d_head) scaling)
LOGIT_SCALE = 10.0  # logit of the copied token; the others stay at 0

#: The edges of the induction circuit under resample ablation. The previous-token head's query
#: and key read only positions, which clean and corrupted prompts share, so those edges carry
#: nothing that differs and are not part of the circuit a patching method can find.
INDUCTION_EDGES: frozenset[str] = frozenset({
    "input->a0.h0<v>",
    "a0.h0->a1.h0<k>",
    "input->a1.h0<q>",
    "input->a1.h0<v>",
    "a1.h0->logits",
})


def _dim(block: str, i: int) -> int:
    return _BLOCK[block] + i


def _one_hot_minus_sink(block: str, i: int) -> Tensor:
    v = torch.zeros(D_MODEL)
    v[_dim(block, i)] = 1.0
    v[_SINK[block]] = -1.0
    return v


def _copy(w: Tensor, src: str, dst_cols: slice | int, n: int, scale: float = 1.0,
          shift: int = 0, sink: bool = True) -> None:
    """Map one-hot ``i`` of block `src` (rows of a Conv1D weight) to column ``i + shift``."""
    start = dst_cols.start if isinstance(dst_cols, slice) else dst_cols
    for i in range(n):
        if 0 <= i + shift < n + 1:
            w[_dim(src, i), start + i + shift] = scale
    if sink:
        w[_SINK[src], start + n] = scale  # the sink maps to the destination's sink


def induction_model() -> Model:
    """The hand-built two-layer induction model (see the module docstring for its layout).

    Returns
    -------
    Model
        A `circuits.model.Model` wrapping a `transformers.GPT2LMHeadModel` (no tokenizer), named
        ``"toy-induction"``.

    Examples
    --------
    >>> import torch
    >>> model = induction_model()
    >>> ids = torch.tensor([[0, 3, 5, 2, 6, 5]])  # ... 5 2 ... 5 -> 2
    >>> int(model.hf(ids).logits[0, -1].argmax())
    2
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D_MODEL, n_layer=2, n_head=N_HEADS,
        n_inner=4 * D_MODEL, layer_norm_epsilon=1e-12, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    # GPT-2 divides attention scores by sqrt(d_head); fold that into the query weights.
    q_scale = SHARP * math.sqrt(D_HEAD)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        t = hf.transformer
        t.wte.weight.copy_(torch.stack([_one_hot_minus_sink("TOK", i) for i in range(VOCAB)]))
        t.wpe.weight.copy_(torch.stack([_one_hot_minus_sink("POS", i) for i in range(POSITIONS)]))

        # Each LayerNorm divides by the residual's rms; every write has squared norm 2, so with
        # k writers the rms is sqrt(2k / d) and a gain of that size makes the LayerNorm identity.
        def rms(writers: int) -> float:
            return math.sqrt(2 * writers / D_MODEL)

        for block, writers in zip(t.h, (2, 4), strict=True):
            block.ln_1.weight.fill_(rms(writers))
            block.ln_2.weight.fill_(1.0)  # the MLPs are zero whatever they read
        t.ln_f.weight.fill_(rms(6))

        # c_attn columns: q | k | v, each [head 0 | head 1] of D_HEAD.
        def cols(part: int, head: int) -> int:
            return part * D_MODEL + head * D_HEAD

        a0 = t.h[0].attn.c_attn.weight  # [d_model, 3 * d_model]
        # a0.h0, previous-token head: the query of position p matches the key of position p - 1
        # (the key is the position shifted by one); the value is the token.
        _copy(a0, "POS", cols(0, 0), POSITIONS, q_scale, sink=False)
        _copy(a0, "POS", cols(1, 0), POSITIONS, 1.0, shift=1, sink=False)
        _copy(a0, "TOK", cols(2, 0), VOCAB)
        # a0.h1, distractor: attends to its own position and copies the current token.
        _copy(a0, "POS", cols(0, 1), POSITIONS, q_scale, sink=False)
        _copy(a0, "POS", cols(1, 1), POSITIONS, 1.0, sink=False)
        _copy(a0, "TOK", cols(2, 1), VOCAB)
        o0 = t.h[0].attn.c_proj.weight  # [H * d_head, d_model]
        _copy_out(o0, 0, "PREV")
        _copy_out(o0, 1, "JUNK0")

        a1 = t.h[1].attn.c_attn.weight
        # a1.h1, distractor: attends to its own position and copies JUNK0 into JUNK1.
        _copy(a1, "POS", cols(0, 1), POSITIONS, q_scale, sink=False)
        _copy(a1, "POS", cols(1, 1), POSITIONS, 1.0, sink=False)
        _copy(a1, "JUNK0", cols(2, 1), VOCAB)
        # a1.h0, induction head: the query (current token) matches the key whose previous token
        # is the same; the value is the token there, i.e. the one that followed last time.
        _copy(a1, "TOK", cols(0, 0), VOCAB, q_scale, sink=False)
        _copy(a1, "PREV", cols(1, 0), VOCAB, 1.0, sink=False)
        _copy(a1, "TOK", cols(2, 0), VOCAB)
        o1 = t.h[1].attn.c_proj.weight
        _copy_out(o1, 0, "OUT")
        _copy_out(o1, 1, "JUNK1")

        # The unembedding reads only OUT: logit[t] = LOGIT_SCALE * (OUT has token t).
        for i in range(VOCAB):
            hf.lm_head.weight[i, _dim("OUT", i)] = LOGIT_SCALE
    return Model(hf=hf, tokenizer=None, name="toy-induction")


def _copy_out(w: Tensor, head: int, block: str) -> None:
    """Write head `head`'s value dims (one-hot + sink) into residual `block`."""
    for i in range(VOCAB):
        w[head * D_HEAD + i, _dim(block, i)] = 1.0
    w[head * D_HEAD + VOCAB, _SINK[block]] = 1.0


def induction_batches(
    n: int = 16, batch_size: int = 8, length: int = 6, seed: int = 0
) -> list[Batch]:
    """Induction prompts for `induction_model`, with resampled corrupted prompts.

    Each prompt is ``BOS t1 ... t_{L-2} t_i`` with distinct tokens ``t_j`` in ``1..VOCAB-1`` and
    ``1 <= i <= L-3``; the answer is ``t_{i+1}``, the wrong token ``t_i`` (the current one). The
    corrupted prompt is another prompt of the same form drawn independently, so the positions are
    shared and the tokens are not.

    Parameters
    ----------
    n : int
        Number of prompts.
    batch_size : int
        Prompts per batch (the last batch may be smaller).
    length : int
        Tokens per prompt, BOS included; between 4 and `POSITIONS`.
    seed : int
        Seed of the random prompts.

    Returns
    -------
    list[Batch]

    Examples
    --------
    >>> [b.size for b in induction_batches(n=10, batch_size=4)]
    [4, 4, 2]
    """
    if not 4 <= length <= POSITIONS or length - 2 > VOCAB - 1:
        raise OptionError(f"length must be between 4 and {POSITIONS}, got {length}")
    gen = torch.Generator().manual_seed(seed)

    def prompts(count: int) -> tuple[Tensor, Tensor, Tensor]:
        rows, answers, wrong = [], [], []
        for _ in range(count):
            tokens = (torch.randperm(VOCAB - 1, generator=gen)[: length - 2] + 1).tolist()
            i = int(torch.randint(1, length - 2, (1,), generator=gen))  # 1 <= i <= L-3
            rows.append([0, *tokens, tokens[i - 1]])
            answers.append([tokens[i]])
            wrong.append([tokens[i - 1]])
        return torch.tensor(rows), torch.tensor(answers), torch.tensor(wrong)

    clean, answers, wrong = prompts(n)
    corrupt, _, _ = prompts(n)
    return [
        Batch(clean[lo:lo + batch_size], corrupt[lo:lo + batch_size],
              answers[lo:lo + batch_size], wrong[lo:lo + batch_size])
        for lo in range(0, n, batch_size)
    ]


def induction_toy(
    n: int = 16, batch_size: int = 8, seed: int = 0
) -> tuple[Model, list[Batch], frozenset[str]]:
    """The induction toy: its model, prompts and the edges of its circuit.

    Parameters
    ----------
    n, batch_size, seed : int
        Passed to `induction_batches`.

    Returns
    -------
    model : Model
        `induction_model()`.
    batches : list[Batch]
        `induction_batches(n, batch_size, seed=seed)`.
    true_edges : frozenset[str]
        `INDUCTION_EDGES`: the edges whose resample ablation changes the output. Every other edge
        (41 of 46) has no effect, including those of the active distractor heads a0.h1 and a1.h1.

    Examples
    --------
    >>> model, batches, true_edges = induction_toy(n=4)
    >>> sorted(true_edges)[0]
    'a0.h0->a1.h0<k>'
    """
    return induction_model(), induction_batches(n, batch_size, seed=seed), INDUCTION_EDGES
