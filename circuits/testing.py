"""Small random models for tests, doctests and benchmarks (no download)."""

from __future__ import annotations

import torch

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
