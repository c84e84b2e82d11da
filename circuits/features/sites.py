"""Where a sparse autoencoder reads and writes: named activation sites of any Hugging Face LM.

A site is one activation of every token, ``[batch, position, width]``:

``resid.L``
    The residual stream after decoder layer ``L`` (the layer's output).
``attn.L``
    The output of layer ``L``'s attention output projection (for Gemma-2, before the
    post-attention norm).
``mlp.L``
    The output of layer ``L``'s MLP module (for Gemma-2, before the post-feedforward norm).
``mlp_in.L``
    The input of layer ``L``'s MLP module (the normed residual): a transcoder's input site.

The module paths come from `circuits.nodes.NodeSites`, which finds them in the module tree, so
every family circuits loads has these sites. Reading and replacing go through plain forward
hooks, removed when the call (or the ``with`` block of `spliced`) ends: an SAE spliced into the
model is then part of an ordinary autograd graph, which the feature attributions need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import OptionError
from ..model import Model
from ..nodes import NodeSites

KINDS = ("attn", "mlp_in", "mlp", "resid")  # in the order a layer's forward reaches them
#: How each kind of site was written by the TransformerLens hook names sae-lens files record.
HOOK_NAMES = {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out",
              "mlp_in": "ln2.hook_normalized"}


@dataclass(frozen=True)
class FeatureSite:
    """One activation site of a model (see the module docstring for the names).

    Attributes
    ----------
    name : str
        ``resid.3``, ``attn.0``, ``mlp.1``, ``mlp_in.1``.
    kind : "resid", "attn", "mlp" or "mlp_in"
    layer : int
    module : str
        Dotted path of the module whose input or output is the activation.
    port : "input" or "output"
    width : int
        Size of the activation's last dimension.
    """

    name: str
    kind: str
    layer: int
    module: str
    port: str
    width: int

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: where the forward reaches the site (a layer's attention output, its MLP's
        input and output, its residual)."""
        return (self.layer, KINDS.index(self.kind))


def parse_site(name: str) -> tuple[str, int]:
    """``(kind, layer)`` of a site name, or an OptionError naming the accepted forms.

    Examples
    --------
    >>> parse_site("resid.3")
    ('resid', 3)
    >>> parse_site("blocks.2.hook_mlp_out")  # a TransformerLens hook name, as sae-lens writes
    ('mlp', 2)
    """
    text = str(name).strip()
    if text.startswith("blocks."):
        _, layer, hook = text.split(".", 2) if text.count(".") >= 2 else (text, "", "")
        kind = next((k for k, h in HOOK_NAMES.items() if h == hook), None)
        if kind is not None and layer.isdigit():
            return kind, int(layer)
    kind, dot, layer = text.rpartition(".")
    if dot and kind in KINDS and layer.isdigit():
        return kind, int(layer)
    raise OptionError(f"{name!r} is not an activation site; use resid.L, attn.L, mlp.L or "
                      f"mlp_in.L with a layer number L (e.g. resid.3)")


def site_of(model: Model, name: str) -> FeatureSite:
    """The site `name` of `model`.

    Raises
    ------
    OptionError
        The name is not a site, or its layer is not one of the model's.

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> site_of(tiny_gpt2(n_layer=2, n_embd=16), "mlp_in.1")
    FeatureSite(name='mlp_in.1', kind='mlp_in', layer=1, module='transformer.h.1.mlp', \
port='input', width=16)
    """
    kind, layer = parse_site(name)
    nodes = NodeSites.of(model)
    if layer >= nodes.n_layers:
        raise OptionError(f"site {name!r}: the model has layers 0 to {nodes.n_layers - 1}; "
                          f"use a layer in that range")
    module = {"resid": f"{nodes.layers}.{layer}", "attn": nodes.attn_out[layer],
              "mlp": nodes.mlp[layer], "mlp_in": nodes.mlp[layer]}[kind]
    port = "input" if kind == "mlp_in" else "output"
    return FeatureSite(f"{kind}.{layer}", kind, layer, module, port, nodes.d_model)


class _Stop(Exception):
    """Raised from a hook to end a forward once every wanted site has been read."""


def _unpack(value: Any) -> Tensor:
    """The activation tensor of a module's input or output (first element of a tuple)."""
    return value[0] if isinstance(value, tuple) else value


def read_sites(model: Model, ids: Tensor, sites: Sequence[FeatureSite],
               stop: bool = True) -> dict[str, Tensor]:
    """The activations at `sites` on prompts `ids`, from one forward without gradients.

    Parameters
    ----------
    model : Model
    ids : Tensor
        ``[b, p]`` token ids.
    sites : sequence of FeatureSite
    stop : bool
        End the forward once the last site is read (the later layers and the unembedding are
        not run).

    Returns
    -------
    dict[str, Tensor]
        ``{site.name: [b, p, width]}`` float32 on the model's device.

    Examples
    --------
    >>> import torch
    >>> from circuits.testing import tiny_gpt2
    >>> m = tiny_gpt2(n_layer=2, n_embd=16)
    >>> acts = read_sites(m, torch.tensor([[1, 2, 3]]), [site_of(m, "resid.0")])
    >>> tuple(acts["resid.0"].shape)
    (1, 3, 16)
    """
    out: dict[str, Tensor] = {}
    wanted = {s.name for s in sites}

    def reader(site: FeatureSite) -> Callable[..., None]:
        def hook(module: Any, args: tuple, output: Any) -> None:
            value = args[0] if site.port == "input" else _unpack(output)
            out[site.name] = value.detach().float()
            if stop and wanted <= out.keys():
                raise _Stop
        return hook

    handles = [_module(model, s.module).register_forward_hook(reader(s)) for s in sites]
    try:
        with torch.no_grad(), contextlib.suppress(_Stop):
            ids = ids.to(model.device)
            model.hf(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    return out


@contextlib.contextmanager
def spliced(model: Model, fns: Mapping[FeatureSite, Callable[[Tensor, Tensor], Tensor]]
            ) -> Iterator[None]:
    """Inside the block, each site's module output is replaced by ``fn(input, output)``.

    `input` is the module's first input and `output` its (first) output, each ``[b, p,
    width]``; ``fn`` returns the new output. A transcoder is keyed by its ``mlp.L`` site and
    reads ``mlp_in.L`` as `input`. The hooks are removed on leaving the block, also on an error.

    Examples
    --------
    >>> import torch
    >>> from circuits.testing import tiny_gpt2
    >>> m = tiny_gpt2(n_layer=1, n_embd=16)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with spliced(m, {site_of(m, "mlp.0"): lambda x, y: torch.zeros_like(y)}):
    ...     zeroed = m.hf(input_ids=ids).logits
    >>> bool((zeroed != m.hf(input_ids=ids).logits).any())
    True
    """
    def hooker(site: FeatureSite, fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Any]:
        if site.port != "output":
            raise OptionError(f"site {site.name} is a module input; splice at an output site "
                              f"(resid, attn or mlp)")

        def hook(module: Any, args: tuple, output: Any) -> Any:
            y = _unpack(output)
            new = fn(args[0] if args else y, y).to(y.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    handles = []
    try:
        for site, fn in fns.items():
            handles.append(_module(model, site.module).register_forward_hook(hooker(site, fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def _module(model: Model, path: str) -> torch.nn.Module:
    """The submodule of ``model.hf`` at dotted `path`."""
    return model.hf.get_submodule(path)
