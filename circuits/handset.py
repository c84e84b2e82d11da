"""Hand-set GPT-2 weights: every activation known exactly on the prompts a model is built for.

`Canvas` sets a GPT-2's weights head by head and MLP by MLP; the planted models of
`circuits.planted` are drawn on it.

How a hand-set model stays exact
--------------------------------
The residual stream is cut into blocks, one per writer (token embedding, position embedding,
each head, each MLP). Every write is "one-hot minus sink": ``+1`` in one dimension of the
writer's block and ``-1`` in the block's sink dimension. So

* the residual always has mean zero and squared norm ``2 x (writers so far)`` plus a constant
  "ballast" written by the position embedding: LayerNorm only divides by a known root mean
  square, and its gain is set to that value (to the last float bit), which makes every
  LayerNorm the identity on the prompts the model is built for;
* resample ablation swaps a writer's one-hot for another of its one-hots and keeps the norm, so
  an edge into a destination that ignores the writer's block changes nothing, not even through
  LayerNorm;
* the ballast (squared norm ``2 x BALLAST^2``, far above the writes') keeps LayerNorm's scale
  nearly constant off those prompts too, so gradient methods, which see LayerNorm's first-order
  response to a write's norm, see only a small leak through it;
* every attention pattern is sharp (score margins of at least ``SHARP / 4`` after GPT-2's
  ``1/sqrt(d_head)`` scaling, with a fallback to the first token when nothing matches), so head
  outputs are one-hots too, on clean and corrupted prompts alike;
* each MLP neuron is an AND of one-hot inputs, ``relu(sum - (k - 1))``: exactly one neuron
  fires, with value 1, so MLP outputs are one-hots.

The answer's logit is ``LOGIT_SCALE``, every other logit 0, so a working circuit gives a logit
difference of ``LOGIT_SCALE`` (10) and each circuit edge, ablated alone, moves it by several
units, while every other edge moves it by float rounding (< 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .model import Model

SHARP = 40.0  # attention score of a full match, after GPT-2's 1/sqrt(d_head) scaling
LOGIT_SCALE = 10.0  # the answer's logit; every other logit is 0
BALLAST = 16.0  # size of the constant write that keeps every LayerNorm's scale nearly fixed
EOS, UNK = "<|endoftext|>", "<unk>"

#: A head's value: (block it reads, block it writes, index map from the first to the second).
Value = tuple[str, str, Callable[[int], int]]


class Canvas:
    """Allocates residual blocks and sets a GPT-2's weights head by head and MLP by MLP.

    Parameters
    ----------
    vocab : sequence of str
        The words of the word-level tokenizer; the first is the end-of-text token.
    n_positions : int
        Prompt length the model is built for (one position one-hot each).
    n_layers, n_heads : int
        GPT-2 shape; heads and MLPs not declared stay zero.
    blocks : dict of str to int
        The writers' blocks after ``TOK``, ``POS`` and ``BAL``: name -> number of one-hot
        dimensions (each block gets one more, its sink).

    Examples
    --------
    A one-layer model whose head copies the previous token into ``OUT``, which the logits read:

    >>> c = Canvas([EOS, UNK, "a", "b"], n_positions=2, n_layers=1, n_heads=1,
    ...            blocks={"OUT": 4})
    >>> c.head(0, 0, [("pairs", "POS", "POS", shift_pairs(2), SHARP)], ("TOK", "OUT", identity))
    >>> model = c.build("copy-previous", "OUT")
    >>> logits = model.hf(model.tokenize(["b a"])).logits[0, -1].detach()
    >>> model.tokenizer.decode(int(logits.argmax())), float(logits.max()) == LOGIT_SCALE
    ('b', True)
    """

    def __init__(self, vocab: Sequence[str], n_positions: int, n_layers: int, n_heads: int,
                 blocks: dict[str, int]) -> None:
        self.vocab = list(vocab)
        self.token = {w: i for i, w in enumerate(self.vocab)}
        self.n_positions, self.n_layers, self.n_heads = n_positions, n_layers, n_heads
        # block name -> (first dimension, number of one-hot dimensions); the sink follows them
        self.blocks: dict[str, tuple[int, int]] = {}
        start = 0
        layout = {"TOK": len(self.vocab), "POS": n_positions, "BAL": 1, **blocks}
        for name, size in layout.items():
            self.blocks[name] = (start, size)
            start += size + 1
        self.d_model = -(-start // n_heads) * n_heads
        self.d_head = self.d_model // n_heads
        self.writers: dict[str, str] = {}  # source name -> block it writes
        self._neurons: dict[int, list[tuple[list[tuple[str, int]], str, int]]] = {}
        self._heads: dict[tuple[int, int], tuple[list, Value]] = {}

    def dim(self, block: str, i: int) -> int:
        start, size = self.blocks[block]
        if not 0 <= i < size:
            raise IndexError(f"index {i} outside block {block} of size {size}")
        return start + i

    def sink(self, block: str) -> int:
        start, size = self.blocks[block]
        return start + size

    def head(self, layer: int, head: int, terms: list[tuple], value: Value) -> None:
        """Declare a head: its attention-score terms and its value map ``src -> out``.

        Terms are ``("pairs", q_block, k_block, [(i_q, i_k), ...], weight)`` (score ``weight``
        when the query has ``i_q`` and the key ``i_k``) or ``("const", k_block, [i, ...],
        weight)`` (score ``weight`` for keys holding any of the indices).
        """
        self._heads[(layer, head)] = (terms, value)
        self.writers[f"a{layer}.h{head}"] = value[1]

    def mlp(self, layer: int, inputs: list[str], table: Callable[..., int], out: str) -> None:
        """Declare an MLP that writes ``table(i, j, ...)`` of its input blocks' one-hots."""
        sizes = [self.blocks[b][1] for b in inputs]
        combos = [()]
        for size in sizes:
            combos = [c + (i,) for c in combos for i in range(size)]
        self._neurons[layer] = [(list(zip(inputs, c, strict=True)), out, table(*c))
                                for c in combos]
        self.writers[f"m{layer}"] = out

    def build(self, name: str, readout: str) -> Model:
        """Create the GPT-2 with every weight zero but those declared, and its tokenizer."""
        from transformers import GPT2Config, GPT2LMHeadModel

        n_inner = max((len(v) for v in self._neurons.values()), default=1)
        cfg = GPT2Config(
            vocab_size=len(self.vocab), n_positions=self.n_positions, n_embd=self.d_model,
            n_layer=self.n_layers, n_head=self.n_heads, n_inner=n_inner,
            activation_function="relu", layer_norm_epsilon=1e-12, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        hf = GPT2LMHeadModel(cfg).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.zero_()
            t = hf.transformer
            for i in range(len(self.vocab)):
                self._write(t.wte.weight[i], "TOK", i)
            for i in range(self.n_positions):
                self._write(t.wpe.weight[i], "POS", i)
                self._write(t.wpe.weight[i], "BAL", 0, BALLAST)
            writers = 2  # token and position embeddings
            for layer, block in enumerate(t.h):
                block.ln_1.weight.fill_(self._gain(writers))
                for h in range(self.n_heads):
                    if (layer, h) in self._heads:
                        self._set_head(block.attn, h, *self._heads[(layer, h)])
                        writers += 1
                block.ln_2.weight.fill_(self._gain(writers))
                if layer in self._neurons:
                    self._set_mlp(block.mlp, self._neurons[layer])
                    writers += 1
            t.ln_f.weight.fill_(self._gain(writers))
            start, size = self.blocks[readout]
            for i in range(min(size, len(self.vocab))):
                hf.lm_head.weight[i, start + i] = LOGIT_SCALE
        return Model(hf=hf, tokenizer=word_tokenizer(self.vocab), name=name)

    def _gain(self, writers: int) -> float:
        """The LayerNorm gain that maps this residual's ``+-1`` entries to exactly ``+-1``.

        Each write has squared norm 2 and they are orthogonal, so the residual's rms is
        ``sqrt((2 writers + 2 BALLAST^2) / d)``; the gain is that, nudged by a few float steps
        until float32 LayerNorm returns 1.0 exactly (so sums stay exact downstream).
        """
        d = self.d_model
        x = torch.zeros(d)
        x[:writers], x[writers:2 * writers] = 1.0, -1.0
        x[-2:] = torch.tensor([BALLAST, -BALLAST])
        gain = torch.tensor(math.sqrt(float(x.square().sum()) / d))
        for _ in range(16):
            y = torch.nn.functional.layer_norm(x, (d,), gain.expand(d), None, eps=1e-12)
            if y[0] == 1.0:
                break
            gain = torch.nextafter(gain, gain * (2.0 if y[0] < 1.0 else 0.5))
        return float(gain)

    def _write(self, row: torch.Tensor, block: str, i: int, size: float = 1.0) -> None:
        row[self.dim(block, i)] += size
        row[self.sink(block)] -= size

    def _set_head(self, attn: torch.nn.Module, h: int, terms: list[tuple], value: Value
                  ) -> None:
        w, b = attn.c_attn.weight, attn.c_attn.bias  # [d, 3d] Conv1D: q | k | v, heads inside
        q0, k0, v0 = (part * self.d_model + h * self.d_head for part in range(3))
        scale = math.sqrt(self.d_head)  # undo GPT-2's 1/sqrt(d_head)
        col = 0
        for term in terms:
            if term[0] == "pairs":
                _, qb, kb, pairs, weight = term
                for iq, ik in pairs:
                    w[self.dim(qb, iq), q0 + col] = weight * scale
                    w[self.dim(kb, ik), k0 + col] = 1.0
                    col += 1
            else:
                _, kb, indices, weight = term
                b[q0 + col] = weight * scale
                for i in indices:
                    w[self.dim(kb, i), k0 + col] = 1.0
                col += 1
        if col > self.d_head:
            raise ValueError(f"head {h}: {col} query/key dimensions exceed d_head={self.d_head}")
        src, out, fn = value
        for i in range(self.blocks[src][1]):
            w[self.dim(src, i), v0 + fn(i)] = 1.0
        n_out = self.blocks[out][1]
        w[self.sink(src), v0 + n_out] = 1.0  # the sink's -1 carries over to the output sink
        proj = attn.c_proj.weight  # [H * d_head, d]
        for j in range(n_out):
            proj[h * self.d_head + j, self.dim(out, j)] = 1.0
        proj[h * self.d_head + n_out, self.sink(out)] = 1.0

    def _set_mlp(self, mlp: torch.nn.Module,
                 neurons: list[tuple[list[tuple[str, int]], str, int]]) -> None:
        fc, fc_b, proj = mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight
        for n, (reads, out, j) in enumerate(neurons):
            # an AND of one-hot inputs: relu(sum - (k - 1)) is 1 when all k inputs are on and 0
            # otherwise, so exactly one neuron fires and the output is a one-hot.
            for block, i in reads:
                fc[self.dim(block, i), n] = 1.0
            fc_b[n] = -(len(reads) - 1.0)
            proj[n, self.dim(out, j)] = 1.0
            proj[n, self.sink(out)] = -1.0


def word_tokenizer(vocab: Sequence[str]):
    """A word-level tokenizer over `vocab` (words split on whitespace and punctuation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS,
                                   unk_token=UNK, pad_token=EOS)


def shift_pairs(n: int) -> list[tuple[int, int]]:
    """Query position p matches key position p - 1 (and position 0 itself).

    Examples
    --------
    >>> shift_pairs(3)
    [(0, 0), (1, 0), (2, 1)]
    """
    return [(0, 0)] + [(p, p - 1) for p in range(1, n)]


def same_pairs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Query index i matches key index i, for each of `indices`.

    Examples
    --------
    >>> same_pairs([2, 5])
    [(2, 2), (5, 5)]
    """
    return [(i, i) for i in indices]


def identity(i: int) -> int:
    """The value map of a head that copies its source's one-hot unchanged."""
    return i
