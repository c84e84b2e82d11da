"""Llama, Mistral and Qwen2: RMSNorm, rotary, gated MLP, grouped-query attention.

Qwen2's q/k/v biases and Mistral's (and Qwen2's optional) sliding window come from the config;
the key/value heads stay grouped, as in the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Adapter, Architecture, HeadWeights


def layer_windows(cfg: object, n_layers: int) -> tuple[int | None, ...]:
    """Per layer the sliding window: from ``layer_types`` where the config has them, else the
    config's ``sliding_window`` on every layer (Mistral), else none."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * n_layers


class LlamaAdapter(Adapter):
    """Adapter for `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM`."""

    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    def describe(self, cfg: object) -> Architecture:
        L, H, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
        dh = getattr(cfg, "head_dim", None) or d // H
        return Architecture(
            n_layers=L, n_heads=H, n_kv_heads=cfg.num_key_value_heads, d_model=d, d_head=dh,
            attn_scales=(self._scale(cfg, dh),) * L, windows=layer_windows(cfg, L),
            rotary_dim=2 * len(self.hf.model.rotary_emb.inv_freq), d_mlp=cfg.intermediate_size,
        )

    @staticmethod
    def _scale(cfg: object, d_head: int) -> float:
        return d_head**-0.5

    @property
    def _layers(self) -> torch.nn.ModuleList:
        return self.hf.model.layers

    def block(self, layer: int) -> torch.nn.Module:
        return self._layers[layer]

    def embed(self, ids: Tensor) -> Tensor:
        return self.hf.model.embed_tokens(ids)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.hf.model.norm(x)

    def rotary(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.hf.model.rotary_emb(like, positions[None])
        return cos[0], sin[0]

    def attn_norm(self, layer: int, x: Tensor) -> Tensor:
        return self._layers[layer].input_layernorm(x)

    def project(self, layer: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn, dh = self._layers[layer].self_attn, self.arch.d_head
        return tuple(proj(h).unflatten(-1, (-1, dh)).transpose(-3, -2)
                     for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def qkv_weights(self, layer: int) -> tuple[HeadWeights, HeadWeights, HeadWeights]:
        attn, dh = self._layers[layer].self_attn, self.arch.d_head
        return tuple(
            (proj.weight.unflatten(0, (-1, dh)),
             None if proj.bias is None else proj.bias.unflatten(0, (-1, dh)))
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )

    def out_weight(self, layer: int) -> Tensor:
        return self._layers[layer].self_attn.o_proj.weight.T.unflatten(0, (-1, self.arch.d_head))

    def out_bias(self, layer: int) -> Tensor | None:
        return self._layers[layer].self_attn.o_proj.bias

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        return self._layers[layer].self_attn.o_proj(z.transpose(-3, -2).flatten(-2))

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self._layers[layer]
        return block.mlp(block.post_attention_layernorm(x))
