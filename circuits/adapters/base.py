"""What the edge-level engine needs from a model family."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class Adapter(ABC):
    """Runs one family's Hugging Face modules piece by piece.

    Residual tensors are ``[..., b, p, d]``; per-head tensors ``[..., b, H, p, dh]``.
    """

    architectures: tuple[str, ...] = ()
    n_layers: int
    n_heads: int
    d_model: int
    parallel: bool

    @abstractmethod
    def __init__(self, hf: nn.Module) -> None: ...

    @abstractmethod
    def embed(self, ids: Tensor) -> Tensor: ...

    @abstractmethod
    def unembed(self, x: Tensor) -> Tensor: ...

    @abstractmethod
    def qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]: ...

    @abstractmethod
    def qkv_heads(self, layer: int, x: Tensor, ports: Tensor, heads: Tensor) -> Tensor: ...

    @abstractmethod
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, causal: bool = True
               ) -> Tensor: ...

    @abstractmethod
    def head_outputs(self, layer: int, z: Tensor) -> Tensor: ...

    @abstractmethod
    def attn_output(self, layer: int, z: Tensor) -> Tensor: ...

    @abstractmethod
    def attn_bias(self, layer: int) -> Tensor: ...

    @abstractmethod
    def mlp(self, layer: int, x: Tensor) -> Tensor: ...
