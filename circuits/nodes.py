"""Node-level reads and patches through nnsight, on any Hugging Face causal LM.

The edge engine needs a family adapter; node-level interventions do not. They only need to find,
in the model's own module tree, four kinds of hook sites, named like the graph's nodes:

``input``
    The residual stream entering the first decoder layer (token + position embeddings for GPT-2,
    token embeddings for rotary models): the first input of ``layers[0]``. ``[b, p, d]``.
``a{l}.h{h}``
    Head ``h`` of layer ``l``: slice ``h*dh:(h+1)*dh`` of the *input* of the attention output
    projection (``c_proj``, ``o_proj``, ``dense``, ``out_proj``), which concatenates the heads'
    outputs before they are mixed. ``[b, p, dh]``. With grouped-query attention that input still
    holds every query head. Replacing the slice changes the head's write ``z_h @ W_O[h]`` and
    nothing else, which is what the edge engine's head source is (the output bias belongs to no
    head) — except where a layer's heads share a post-norm (Gemma-2): the norm's scale comes
    from the sum of the heads' writes, so the slice moves every head of the layer, and the
    engine's ablated head differs (`shared_post_norm`).
``m{l}``
    The output of layer ``l``'s MLP module (``mlp``, ``feed_forward``, ...). ``[b, p, d]``. A
    layer that holds its MLP's linear layers itself, with no MLP module around them (OPT's
    ``fc1`` and ``fc2``), has its MLP output at its last direct linear child that writes the
    residual width (``fc2``).
``resid{l}``
    The output of decoder layer ``l``: the residual stream after the layer. ``[b, p, d]``.

Decoder layers return a tensor in transformers 5 and a tuple in older versions; either works.

Every read or patch of many nodes is one traced forward. `patch_each` runs many independent
patches in one forward by repeating the batch, variant-major (rows ``c*b:(c+1)*b`` belong to
variant ``c``), in chunks of at most ``chunk`` rows.

Circuits of node sets (kept nodes, the rest ablated) are built on top of these in
`circuits.node_circuits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .errors import OptionError, UnsupportedModelError
from .model import Model

SiteKind = Literal["input", "head", "mlp", "resid"]
Positions = int | Sequence[int] | Tensor | None

# Child names tried first, most common first; a class-name match is the fallback.
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
_OUT_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj", "wo", "out")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
# Execution order of the sites of one layer: attention output projection, MLP, layer output.
_RANK = {"input": 0, "head": 1, "mlp": 2, "resid": 3}


@dataclass(frozen=True)
class Site:
    """One node's hook point: a module path, which end of it, and which slice of the last dim.

    Attributes
    ----------
    name : str
        The node name (``a1.h0``, ``m1``, ``resid1``, ``input``).
    kind : "input", "head", "mlp" or "resid"
    layer : int
        -1 for ``input``.
    module : str
        Dotted path of the module in the Hugging Face model.
    port : "input" or "output"
        Whether the node is the module's first input or its (first) output.
    width : slice
        Slice of the last dimension that is the node (a head's ``dh`` columns; all otherwise).
    """

    name: str
    kind: SiteKind
    layer: int
    module: str
    port: Literal["input", "output"]
    width: slice

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: the order in which the model's forward reaches the site."""
        return (self.layer, _RANK[self.kind])


@dataclass(frozen=True)
class NodeSites:
    """The hook sites of a model's nodes, discovered from its module tree.

    Attributes
    ----------
    n_layers, n_heads, d_head, d_model : int
    layers : str
        Path of the ``nn.ModuleList`` of decoder layers.
    attn_out : tuple[str, ...]
        Per layer, the path of the attention output projection.
    mlp : tuple[str, ...]
        Per layer, the path of the MLP module (or of its output projection where the layer
        holds the MLP's linear layers itself).
    parallel : bool
        Whether attention and MLP of a layer read the same residual stream (see
        `is_parallel`).

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> sites = NodeSites.of(tiny_gpt2(n_layer=2, n_head=2, n_embd=16))
    >>> sites.attn_out[1], sites.mlp[0], sites.d_head
    ('transformer.h.1.attn.c_proj', 'transformer.h.0.mlp', 8)
    >>> sites.site("a1.h1").width
    slice(8, 16, None)
    >>> sites.parallel
    False
    """

    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    layers: str
    attn_out: tuple[str, ...]
    mlp: tuple[str, ...]
    parallel: bool = False

    @classmethod
    def of(cls, model: Model | nn.Module) -> NodeSites:
        """Discover the sites of a `Model` (or a bare Hugging Face module).

        Raises
        ------
        UnsupportedModelError
            The config lacks the layer or head count, or no decoder layer list, attention output
            projection or MLP module was found; the message names what is missing.
        """
        hf = model.hf if isinstance(model, Model) else model
        cfg = getattr(hf, "config", None)
        arch = type(hf).__name__
        n_layers = _config_int(cfg, ("num_hidden_layers", "n_layer", "num_layers"))
        n_heads = _config_int(cfg, ("num_attention_heads", "n_head", "num_heads"))
        d_model = _config_int(cfg, ("hidden_size", "n_embd", "d_model"))
        if n_layers is None or n_heads is None or d_model is None:
            raise UnsupportedModelError(
                f"{arch} has no config with the layer count, head count and hidden size "
                "(num_hidden_layers, num_attention_heads, hidden_size); node-level patching "
                "needs a Hugging Face model with such a config"
            )
        layers_path, layers = _find_layers(hf, n_layers, arch)
        attn_out, mlp, d_head = [], [], None
        for i, layer in enumerate(layers):
            prefix = f"{layers_path}.{i}"
            attn_name, attn = _find_child(layer, _ATTENTION_NAMES, "attention")
            if attn is None:
                raise UnsupportedModelError(
                    f"no attention module in decoder layer {prefix} of {arch} (looked for "
                    f"{', '.join(_ATTENTION_NAMES)} or a class named *Attention*)"
                )
            proj_name, proj = _find_out_proj(attn, n_heads)
            if proj is None:
                raise UnsupportedModelError(
                    f"no attention output projection in {prefix}.{attn_name} of {arch} (looked "
                    f"for a linear layer {', '.join(_OUT_PROJ_NAMES)} whose input width is a "
                    f"multiple of the {n_heads} heads)"
                )
            mlp_name, mlp_module = _find_mlp(layer, d_model)
            if mlp_module is None:
                raise UnsupportedModelError(
                    f"no MLP in decoder layer {prefix} of {arch} (looked for a module "
                    f"{', '.join(_MLP_NAMES)} or a class named *MLP*, else a linear layer of "
                    f"the decoder layer itself that writes the {d_model}-wide residual, as "
                    "OPT's fc2)"
                )
            d_head = _in_features(proj) // n_heads
            attn_out.append(f"{prefix}.{attn_name}.{proj_name}")
            mlp.append(f"{prefix}.{mlp_name}")
        assert d_head is not None  # n_layers >= 1, checked by _find_layers
        return cls(n_layers, n_heads, d_head, d_model, layers_path, tuple(attn_out), tuple(mlp),
                   is_parallel(cfg, layers[0]))

    @property
    def names(self) -> list[str]:
        """Every node: ``input``, then per layer its heads and MLP (the graph's sources), then
        ``resid0`` ... ``resid{L-1}``."""
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return out + [f"resid{layer}" for layer in range(self.n_layers)]

    def site(self, name: str) -> Site:
        """The hook site of node `name`.

        Raises
        ------
        OptionError
            `name` is not a node of this model.
        """
        every = slice(None)
        try:
            if name == "input":
                return Site(name, "input", -1, f"{self.layers}.0", "input", every)
            if name.startswith("resid"):
                layer = self._layer(name[5:])
                return Site(name, "resid", layer, f"{self.layers}.{layer}", "output", every)
            if name.startswith("m"):
                layer = self._layer(name[1:])
                return Site(name, "mlp", layer, self.mlp[layer], "output", every)
            if name.startswith("a") and ".h" in name:
                layer_text, head_text = name[1:].split(".h", 1)
                layer, head = self._layer(layer_text), int(head_text)
                if 0 <= head < self.n_heads:
                    cols = slice(head * self.d_head, (head + 1) * self.d_head)
                    return Site(name, "head", layer, self.attn_out[layer], "input", cols)
        except ValueError:
            pass
        raise OptionError(
            f"{name!r} is not a node of this model; use input, a{{layer}}.h{{head}}, m{{layer}} "
            f"or resid{{layer}} with layer < {self.n_layers} and head < {self.n_heads}"
        )

    def width_of(self, name: str) -> int:
        """Size of the last dimension of node `name`'s activation (``dh`` or ``d_model``)."""
        return self.d_head if self.site(name).kind == "head" else self.d_model

    def _layer(self, text: str) -> int:
        layer = int(text)
        if not 0 <= layer < self.n_layers:
            raise ValueError(text)
        return layer


# -- discovery helpers ------------------------------------------------------------------------
_PARALLEL_FLAGS = ("use_parallel_residual", "parallel_attn")


def is_parallel(cfg: Any, layer: nn.Module) -> bool:
    """Whether a decoder layer's attention and MLP read the same residual stream.

    A config that has a flag for it decides (GPT-NeoX and StableLM's ``use_parallel_residual``,
    Falcon's ``parallel_attn``). Otherwise the layer does: it is parallel when it holds a single
    normalisation module (a direct child whose class name contains "norm"). A sequential pre-norm
    block normalises once before the attention and once before the MLP (GPT-2's ``ln_1`` and
    ``ln_2``, Llama's ``input_layernorm`` and ``post_attention_layernorm``, Gemma-2's four),
    while a parallel block feeds one normalised stream to both (GPT-J's ``ln_1``, Phi's
    ``input_layernorm``, CodeGen, Cohere).
    """
    for flag in _PARALLEL_FLAGS:
        value = getattr(cfg, flag, None)
        if isinstance(value, bool):
            return value
    norms = [c for c in layer.children() if "norm" in type(c).__name__.lower()]
    return len(norms) == 1


def _config_int(cfg: Any, keys: tuple[str, ...]) -> int | None:
    """The first of `keys` the config sets to an int."""
    for key in keys:
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def _find_layers(hf: nn.Module, n_layers: int, arch: str) -> tuple[str, nn.ModuleList]:
    """The shallowest ModuleList of `n_layers` entries whose entries hold an attention module."""
    found = [
        (name, module) for name, module in hf.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0
        and _find_child(module[0], _ATTENTION_NAMES, "attention")[1] is not None
    ]
    if not found:
        raise UnsupportedModelError(
            f"no list of {n_layers} decoder layers (an nn.ModuleList whose layers hold an "
            f"attention module) in {arch}; node-level patching needs one"
        )
    return min(found, key=lambda item: item[0].count("."))


def _find_child(module: nn.Module, names: tuple[str, ...], kind: str) -> tuple[str, Any]:
    """A direct child called one of `names`, else the first child whose class name contains
    `kind` (case-insensitive); ``("", None)`` when there is none."""
    children = dict(module.named_children())
    for name in names:
        if name in children:
            return name, children[name]
    for name, child in children.items():
        if kind in type(child).__name__.lower():
            return name, child
    return "", None


def _find_mlp(layer: nn.Module, d_model: int) -> tuple[str, Any]:
    """The MLP module of a decoder layer; where there is none, the layer's last direct linear
    child of output width `d_model` (the MLP's output projection when the layer holds the MLP's
    linear layers itself, as OPT and XGLM do with ``fc1`` and ``fc2``)."""
    name, module = _find_child(layer, _MLP_NAMES, "mlp")
    if module is not None:
        return name, module
    # the attention's own projections live inside the attention module, not directly here
    writers = [(n, c) for n, c in layer.named_children() if _out_features(c) == d_model]
    return writers[-1] if writers else ("", None)


def _out_features(module: nn.Module) -> int:
    """Output width of a Linear or of GPT-2's Conv1D (weight ``[d_in, d_out]``); 0 otherwise."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[1])
    return 0


def _in_features(module: nn.Module) -> int:
    """Input width of a Linear or of GPT-2's Conv1D (weight ``[d_in, d_out]``); 0 otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0])
    return 0


def _find_out_proj(attn: nn.Module, n_heads: int) -> tuple[str, Any]:
    """The attention output projection: a known name with an input width divisible by heads."""
    children = dict(attn.named_children())
    for name in _OUT_PROJ_NAMES:
        width = _in_features(children[name]) if name in children else 0
        if width and width % n_heads == 0:
            return name, children[name]
    return "", None


# -- running ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Write:
    """Replace `site`'s activation on batch rows `rows` by `value` where `where` (``[p]`` bool,
    None = every position) is True."""

    site: Site
    rows: slice
    value: Tensor
    where: Tensor | None


def _envoy(root: Any, path: str) -> Any:
    """The nnsight Envoy of the module at dotted `path`."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _position_mask(positions: Positions, p: int, device: torch.device) -> Tensor | None:
    """``[p]`` bool mask of the patched positions (negative indices count from the end)."""
    if positions is None:
        return None
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.shape != (p,):
            raise OptionError(f"a boolean position mask needs shape ({p},), got "
                              f"{tuple(positions.shape)}")
        return positions.to(device)
    index = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    if index.numel() and (index.min() < -p or index.max() >= p):
        raise OptionError(f"positions {index.tolist()} are outside a prompt of {p} tokens")
    mask = torch.zeros(p, dtype=torch.bool)
    mask[index] = True
    return mask.to(device)


def _check_value(sites: NodeSites, name: str, value: Tensor, b: int, p: int) -> Tensor:
    """`value` as a ``[b|1, p|1, width]`` tensor, or an OptionError naming the wanted shape."""
    width = sites.width_of(name)
    v = value if value.dim() == 3 else value.reshape(*([1] * (3 - value.dim())), *value.shape)
    ok = v.dim() == 3 and v.shape[0] in (1, b) and v.shape[1] in (1, p) and v.shape[2] == width
    if not ok:
        raise OptionError(
            f"the value for {name} has shape {tuple(value.shape)}; it must broadcast to "
            f"[{b}, {p}, {width}] (batch, position, {'d_head' if width != sites.d_model else 'd'})"
        )
    return v


def _apply(x: Tensor, writes: list[_Write]) -> Tensor:
    """A copy of activation ``x`` ``[rows, p, width]`` with `writes` applied."""
    new = x.clone()
    for w in writes:
        old = x[w.rows, :, w.site.width]  # [b, p, w]
        value = w.value.to(dtype=x.dtype, device=x.device)
        if w.where is None:
            new[w.rows, :, w.site.width] = value.expand_as(old)
        else:
            new[w.rows, :, w.site.width] = torch.where(w.where[:, None], value, old)
    return new


def _run(
    model: Model,
    ids: Tensor,
    writes: list[_Write],
    reads: list[Site],
    logits: bool = True,
    last_only: bool = False,
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """One traced forward of `ids` that applies `writes` and reads `reads` (before any write to
    the same module); returns the logits (``[rows, p, V]`` or ``[rows, V]``) and the reads."""
    by_module: dict[tuple[str, str], tuple[tuple[int, int], list[Site], list[_Write]]] = {}
    for site in reads:
        by_module.setdefault((site.module, site.port), (site.order, [], []))[1].append(site)
    for w in writes:
        key = (w.site.module, w.site.port)
        by_module.setdefault(key, (w.site.order, [], []))[2].append(w)
    # nnsight hands out activations in the order the forward reaches them.
    plan = sorted(by_module.items(), key=lambda item: item[1][0])
    out: dict[str, Tensor] = {}
    envoy = model.envoy
    with torch.no_grad(), envoy.trace(ids):
        for (path, port), (_, site_reads, site_writes) in plan:
            _visit(_envoy(envoy, path), port, site_reads, site_writes, out, ids.shape[1])
        if logits:
            result = envoy.output
            final = result.logits if hasattr(result, "logits") else result[0]
            out["\0logits"] = final[:, -1] if last_only else final
    return out.pop("\0logits", None), out


def _visit(module: Any, port: str, reads: list[Site], writes: list[_Write],
           out: dict[str, Tensor], p: int) -> None:
    """Inside a trace: read and patch one module's first input or (first) output, of a forward
    of prompts `p` tokens long."""
    value = module.input if port == "input" else module.output
    packed = isinstance(value, tuple)  # layers of transformers < 5 and MoE MLPs return tuples
    x = value[0] if packed else value  # [rows, p, width]
    flat = x.dim() == 2  # OPT runs its MLP on [rows * p, width]
    if flat:
        x = x.view(-1, p, x.shape[-1])
    for site in reads:
        out[site.name] = x[:, :, site.width].clone()
    if not writes:
        return
    new = _apply(x, writes)
    if flat:
        new = new.reshape(-1, new.shape[-1])
    if packed:
        new = (new, *value[1:])
    if port == "input":
        module.input = new
    else:
        module.output = new


def collect(model: Model, ids: Tensor, nodes: Sequence[str]) -> dict[str, Tensor]:
    """The activations of `nodes` on prompts `ids`, from one forward without gradients.

    Parameters
    ----------
    model : Model
    ids : Tensor
        ``[b, p]`` token ids.
    nodes : sequence of str
        Node names (``input``, ``a{l}.h{h}``, ``m{l}``, ``resid{l}``).

    Returns
    -------
    dict[str, Tensor]
        ``[b, p, dh]`` for heads, ``[b, p, d]`` for the others.

    Examples
    --------
    >>> import torch
    >>> from circuits.testing import tiny_gpt2
    >>> acts = collect(tiny_gpt2(n_head=2, n_embd=16), torch.tensor([[1, 2, 3]]), ["a0.h1", "m1"])
    >>> tuple(acts["a0.h1"].shape), tuple(acts["m1"].shape)
    ((1, 3, 8), (1, 3, 16))
    """
    sites = NodeSites.of(model)
    reads = [sites.site(name) for name in nodes]
    return _run(model, ids, [], reads, logits=False)[1]


def patch(
    model: Model,
    ids: Tensor,
    values: dict[str, Tensor],
    positions: Positions = None,
    last_only: bool = False,
) -> Tensor:
    """Logits with each node's activation replaced by the given value, in one forward.

    Parameters
    ----------
    model : Model
    ids : Tensor
        ``[b, p]`` token ids.
    values : dict[str, Tensor]
        Node name -> replacement, broadcastable to that node's ``[b, p, width]`` (``width`` is
        ``dh`` for heads and ``d`` otherwise); e.g. the node's activation on other prompts
        (from `collect`), a mean ``[1, 1, width]`` or zeros.
    positions : int, sequence of int, bool Tensor ``[p]`` or None
        Patch only these token positions (all when None).
    last_only : bool
        Return only the last position's logits.

    Returns
    -------
    Tensor
        ``[b, p, vocab]`` (``[b, vocab]`` with `last_only`).

    Examples
    --------
    >>> import torch
    >>> from circuits.testing import tiny_gpt2
    >>> model, ids = tiny_gpt2(), torch.tensor([[1, 2, 3, 4]])
    >>> own = collect(model, ids, ["a1.h0"])
    >>> torch.allclose(patch(model, ids, own), model.hf(ids).logits, atol=1e-5)
    True
    """
    return patch_each(model, ids, [values], positions=[positions], last_only=last_only)


def patch_each(
    model: Model,
    ids: Tensor,
    variants: Sequence[dict[str, Tensor]],
    positions: Sequence[Positions] | None = None,
    chunk: int = 256,
    last_only: bool = False,
) -> Tensor:
    """Run many independent patches of the same prompts side by side.

    The prompts are repeated once per variant (rows variant-major: rows ``c*b:(c+1)*b`` are
    variant ``c``) so up to ``chunk`` rows share one traced forward.

    Parameters
    ----------
    model : Model
    ids : Tensor
        ``[b, p]`` token ids.
    variants : sequence of dict[str, Tensor]
        Per variant, the values to patch (as in `patch`).
    positions : sequence or None
        Per variant, the positions to patch (as in `patch`); all positions when None.
    chunk : int
        Most rows per forward (at least one variant runs per forward).
    last_only : bool
        Return only the last position's logits.

    Returns
    -------
    Tensor
        ``[len(variants) * b, p, vocab]`` (``[len(variants) * b, vocab]`` with `last_only`).
    """
    if positions is not None and len(positions) != len(variants):
        raise OptionError(f"got {len(positions)} position sets for {len(variants)} variants; "
                          "give one per variant (None for all positions)")
    sites = NodeSites.of(model)
    b, p = ids.shape
    per_run = max(1, chunk // b)
    pieces = []
    for start in range(0, len(variants), per_run):
        group = range(start, min(start + per_run, len(variants)))
        writes = []
        for row, c in enumerate(group):
            where = _position_mask(positions[c] if positions is not None else None, p, ids.device)
            rows = slice(row * b, (row + 1) * b)
            for name, value in variants[c].items():
                value = _check_value(sites, name, value, b, p)
                writes.append(_Write(sites.site(name), rows, value, where))
        batch_ids = ids.repeat(len(group), 1)  # [len(group) * b, p]
        pieces.append(_run(model, batch_ids, writes, [], last_only=last_only)[0])
    return torch.cat(pieces)
