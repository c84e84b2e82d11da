"""Family adapters for the edge-level engine, looked up by the model's class name."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter
from .gpt2 import GPT2Adapter

ADAPTERS: dict[str, type[Adapter]] = {
    arch: cls for cls in (GPT2Adapter,) for arch in cls.architectures
}


def adapter_for(hf: nn.Module) -> Adapter:
    """The adapter of `hf`'s family, or an UnsupportedModelError that says what still works."""
    arch = type(hf).__name__
    cls = ADAPTERS.get(arch)
    if cls is None:
        raise UnsupportedModelError(
            f"the edge-level engine does not support {arch} yet (supported: "
            f"{', '.join(sorted(ADAPTERS))}); node-level methods such as activation patching "
            "still work on it"
        )
    return cls(hf)


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
