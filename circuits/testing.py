"""Small random models for tests, doctests and benchmarks (no download)."""

from __future__ import annotations

import torch

from .batch import Batch
from .model import Model


def tiny_gpt2(
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 16,
    vocab_size: int = 32,
    n_positions: int = 64,
    seed: int = 0,
    **config: object,
) -> Model:
    """A randomly initialised GPT-2 `Model` (no tokenizer) of the given shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
        n_positions=n_positions, bos_token_id=0, eos_token_id=0, **config,
    )
    hf = GPT2LMHeadModel(cfg).eval()
    return Model(hf=hf, tokenizer=None, name=f"tiny-gpt2-{n_layer}l{n_head}h{n_embd}d")


def make_batch(b: int = 4, p: int = 6, vocab: int = 40, seed: int = 0) -> Batch:
    """Random clean and corrupt prompts with one answer and one (different) wrong token each."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (b, p), generator=gen)
    corrupt = torch.randint(0, vocab, (b, p), generator=gen)
    answers = torch.randint(0, vocab, (b, 1), generator=gen)
    wrong = (answers + 1 + torch.randint(0, vocab - 1, (b, 1), generator=gen)) % vocab
    return Batch(clean, corrupt, answers, wrong)
