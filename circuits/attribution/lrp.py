"""Layer-wise relevance propagation for transformers with the AttnLRP rules (Achtibat et al.
2024), computed as gradient x input with modified backward passes.

AttnLRP's rules can each be written as a change of the backward pass only (the forward values
stay exactly the model's), after which gradient x input at the token embeddings is the
relevance. The rules, placed by hooks on the Hugging Face modules for the duration of a call:

* **norms** (identity rule through the normalisation): the scale ``1 / std`` of a LayerNorm
  (``nn.LayerNorm``), or the elementwise factor ``y / x`` of an RMS norm (any module whose
  class name ends in ``RMSNorm``, Gemma's ``1 + w`` included), is held constant, so relevance
  passes through the centring and the gain only;
* **elementwise nonlinearities** (identity rule): an activation module ``y = f(x)`` passes the
  gradient ``y / x``, so relevance goes through it unchanged;
* **gated MLPs** (uniform rule on the product ``act(gate) * up``): half of the relevance goes
  to each factor;
* **attention** (uniform rules on the two products): the values get half of the relevance of
  the output and the queries and keys a quarter each (half of the pattern's half), while the
  softmax in between is differentiated as it is, which is AttnLRP's softmax rule in gradient x
  input form. This wraps the model's attention function (``sdpa``, or its family's eager
  function) in Hugging Face's attention-function registry for the call.

Why not the ``lxt`` package: lxt 2.1 patches the ``transformers`` modules' classes and
functions process-wide, has patches for GPT-2, Llama, Qwen and Gemma-3 but not GPT-NeoX or
Gemma-2, and requires bitsandbytes, open_clip_torch, zennit and accelerate. These rules are the
same ones in a few hooks that work by module type on every family circuits supports.

Not covered: a family whose attention does not go through the registry, or whose gated MLP
does not use ``gate_proj``/``up_proj``/``down_proj`` modules, gets plain gradients there. The
soft-caps of Gemma-2 (``tanh``) are differentiated as they are. Biases absorb relevance, so the
scores do not sum exactly to the metric.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .core import Run, register
from .gradients import gradient_x_input

# Elementwise activations from torch (transformers' own live in transformers.activations).
_TORCH_ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.Softplus,
                      nn.LeakyReLU, nn.ELU)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def _pass_ratio(x: Tensor, y: Tensor) -> Tensor:
    """``y`` in value, with the backward of ``x -> (y / x) * x`` (the ratio held constant)."""
    ratio = torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, 1, x))
    return y.detach() + (x - x.detach()) * ratio.detach()


def _layer_norm_hook(module: nn.LayerNorm, args: tuple, output: Tensor) -> Tensor:
    """LayerNorm with its ``1 / std`` held constant in the backward pass."""
    x = args[0]
    mean = x.mean(-1, keepdim=True)
    std = (x.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
    y = (x - mean) / std.detach()
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return output.detach() + (y - y.detach())


def _ratio_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return _pass_ratio(args[0], output)


def _is_activation(module: nn.Module) -> bool:
    return (type(module).__module__ == "transformers.activations"
            or isinstance(module, _TORCH_ACTIVATIONS))


def _gated_hooks(mlp: nn.Module, stack: ExitStack) -> None:
    """Split the relevance of ``down_proj(act(gate_proj(x)) * up_proj(x))`` evenly between the
    two factors (the uniform rule)."""
    seen: dict[str, Tensor] = {}
    act = next((m for m in mlp.children() if _is_activation(m)), None)
    if act is None:
        return

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            seen[name] = output
        return hook

    def split(module: nn.Module, args: tuple) -> tuple[Tensor, ...] | None:
        a, u = seen.pop("act", None), seen.pop("up", None)
        if a is None or u is None or a.shape != args[0].shape:
            return None
        return (0.5 * (a * u.detach() + a.detach() * u), *args[1:])

    stack.enter_context(_hook(act.register_forward_hook(keep("act"))))
    stack.enter_context(_hook(mlp.up_proj.register_forward_hook(keep("up"))))
    stack.enter_context(_hook(mlp.down_proj.register_forward_pre_hook(split)))


@contextmanager
def _hook(handle: Any) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _attention_rule(hf: nn.Module) -> Iterator[None]:
    """Wrap the model's attention function so that the values get half and the queries and
    keys a quarter of the gradient (AttnLRP's uniform rules on ``q k^T`` and ``A v``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(hf.config, "_attn_implementation", None) or "eager"
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    before = local.get(name)
    base = None if name == "eager" else ALL_ATTENTION_FUNCTIONS[name]

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any,
                  **kwargs: Any) -> Any:
        fn = base or sys.modules[type(module).__module__].eager_attention_forward
        return fn(module, _ScaleGrad.apply(query, 0.25), _ScaleGrad.apply(key, 0.25),
                  _ScaleGrad.apply(value, 0.5), *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[name] = attention
    try:
        yield
    finally:
        if before is None:
            del ALL_ATTENTION_FUNCTIONS[name]
        else:
            ALL_ATTENTION_FUNCTIONS[name] = before


@contextmanager
def attnlrp_rules(hf: nn.Module) -> Iterator[None]:
    """Within the block, `hf`'s backward pass follows the AttnLRP rules (module docstring);
    its forward values are unchanged. Every hook is removed on exit, also on error."""
    with ExitStack() as stack:
        for module in hf.modules():
            if isinstance(module, nn.LayerNorm):
                stack.enter_context(_hook(module.register_forward_hook(_layer_norm_hook)))
            elif type(module).__name__.endswith("RMSNorm") or _is_activation(module):
                stack.enter_context(_hook(module.register_forward_hook(_ratio_hook)))
            if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
                _gated_hooks(module, stack)
        stack.enter_context(_attention_rule(hf))
        yield


@register("lrp", "AttnLRP relevance: gradient x input with the AttnLRP backward rules",
          gradient_at_clean=True, passes=lambda b, p, options: 3.0 * b, kind="backward")
def lrp(run: Run) -> Tensor:
    """AttnLRP relevance of each token: gradient x input at the token embeddings, the gradient
    taken with the AttnLRP rules (`attnlrp_rules`). One forward and one backward pass.

    Parameters
    ----------
    run : Run

    Returns
    -------
    Tensor
        ``[b, p]``.

    Examples
    --------
    >>> from circuits.attribution.methods import attribute
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> attribute(tiny_gpt2(), make_batch(b=2, p=3, vocab=32), "lrp").scores.shape
    torch.Size([2, 3])
    """
    with attnlrp_rules(run.hf):  # the rules change the backward pass only
        return gradient_x_input(run)
