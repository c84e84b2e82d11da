"""Small random models for tests, doctests and benchmarks (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .batch import Batch
from .model import Model
from .zoo import find


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


def tiny_tokenizer(words: str = "abcdefghijklmnopqrstuvwxyz") -> object:
    """A word-level ``tokenizers`` tokenizer: one token per letter of `words` (split on
    whitespace, so ``" d"`` is one token), ids from 1, 0 for anything else."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def make_batch(b: int = 4, p: int = 6, vocab: int = 40, seed: int = 0) -> Batch:
    """Random clean and corrupt prompts with one answer and one (different) wrong token each."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (b, p), generator=gen)
    corrupt = torch.randint(0, vocab, (b, p), generator=gen)
    answers = torch.randint(0, vocab, (b, 1), generator=gen)
    wrong = (answers + 1 + torch.randint(0, vocab - 1, (b, 1), generator=gen)) % vocab
    return Batch(clean, corrupt, answers, wrong)


# Small configurations of each edge-level family: (transformers class, config class, defaults).
_FAMILIES: dict[str, tuple[str, str, dict[str, object]]] = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_layer=2, n_head=4, n_embd=32)),
    "neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
        rotary_pct=0.25, use_parallel_residual=True)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
        intermediate_size=64)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
        intermediate_size=64)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
        intermediate_size=64, sliding_window=4)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
        head_dim=8, intermediate_size=64, query_pre_attn_scalar=8, sliding_window=4,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
# Families without an edge adapter (node-level methods and circuits only), both with parallel
# attention and MLP blocks whose config has no flag saying so.
_NODE_FAMILIES: dict[str, tuple[str, str, dict[str, object]]] = {
    "phi": ("PhiForCausalLM", "PhiConfig", dict(
        num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64)),
    "gptj": ("GPTJForCausalLM", "GPTJConfig", dict(
        n_layer=2, n_head=4, n_embd=32, rotary_dim=4)),
}
NODE_FAMILIES: tuple[str, ...] = tuple(_NODE_FAMILIES)


def tiny_model(family: str, vocab_size: int = 50, seed: int = 0, **config: object) -> Model:
    """A randomly initialised `Model` (no tokenizer) of one family.

    `family` is one of `FAMILIES` (edge-level families) or `NODE_FAMILIES` (families without an
    edge adapter); `config` overrides the small default configuration (any field of the family's
    ``transformers`` config).

    Examples
    --------
    >>> tiny_model("llama", num_key_value_heads=1).hf.config.num_key_value_heads
    1
    >>> type(tiny_model("phi").hf).__name__
    'PhiForCausalLM'
    """
    import transformers

    cls, cfg_cls, defaults = {**_FAMILIES, **_NODE_FAMILIES}[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **{**defaults, **config}
    )
    hf = getattr(transformers, cls)(cfg).eval()
    return Model(hf=hf, tokenizer=None, name=f"tiny-{family}")


def model_folder(family: str, out: str | os.PathLike, reference: str = "ioi-gpt2-4l",
                 **config: object) -> Path:
    """Save a `tiny_model` of `family` into the folder `out` with the tokenizer of the shipped
    model `reference` (its vocabulary size, 64 positions), so commands can load it like any
    model folder; returns the folder.

    Examples
    --------
    >>> import tempfile
    >>> from circuits import load_model
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     type(load_model(model_folder("llama", tmp)).hf).__name__
    'LlamaForCausalLM'
    """
    import json
    import shutil

    source = find(reference)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    model = tiny_model(family, vocab_size=vocab, **{"max_position_embeddings": 64, **config})
    out = Path(out)
    model.hf.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    return out
