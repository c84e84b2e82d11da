"""Family adapters for the edge-level engine, looked up by the model's class name.

Adding a family is one adapter file (its `Architecture` and module lookups) listed in `FAMILIES`,
plus its parity tests.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, Architecture
from .gemma2 import Gemma2Adapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .neox import NeoXAdapter

FAMILIES: tuple[type[Adapter], ...] = (GPT2Adapter, NeoXAdapter, LlamaAdapter, Gemma2Adapter)
ADAPTERS: dict[str, type[Adapter]] = {arch: cls for cls in FAMILIES for arch in cls.architectures}


def adapter_for(hf: nn.Module) -> Adapter:
    """The adapter of `hf`'s family, or an UnsupportedModelError naming the supported ones."""
    arch = type(hf).__name__
    cls = ADAPTERS.get(arch)
    if cls is None:
        raise UnsupportedModelError(
            f"{arch} has no edge-level adapter (the edge engine supports {', '.join(ADAPTERS)}), "
            "so edge-level circuits and every method but activation-patching do not run on it; "
            "node-level circuits do: use --level node --method activation-patching"
        )
    return cls(hf)


__all__ = ["ADAPTERS", "FAMILIES", "Adapter", "Architecture", "adapter_for"]
