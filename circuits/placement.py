"""Models placed by a device map: the device each stage runs on, and offloaded weights brought
in for the stage that reads them.

A model loaded with a device map (`circuits.load_model`'s ``device_map``, accelerate's big-model
loading inside transformers) has its layers on several devices, or some of them offloaded: their
parameters sit on the meta device and accelerate's hooks fill them from the CPU or from the
safetensors files on disk around each module's forward. The edge engine reads weights directly
(per-head projections), not only through forwards, so it brings a stage's weights in itself:
`Placement.holding` fills every offloaded module of one layer (or of the embedding and
unembedding) for as long as the stage runs and empties them after, with the hooks' own loading,
and says which device the stage runs on. A model loaded without a map has no `Placement`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .devices import resolve_device
from .errors import OptionError

#: The part of a model outside its layers (embedding, final norm, unembedding).
OUTER = "outer"


def is_placed(hf: nn.Module) -> bool:
    """`hf` was loaded with a device map (accelerate's hooks dispatch it)."""
    return bool(getattr(hf, "hf_device_map", None))


def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on `module` itself (a sequential hook holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", (hook,)))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module`'s forward runs: its hook's execution device, else its first parameter's
    device (the CPU for a module without parameters or with only offloaded ones)."""
    for sub in module.modules():
        for hook in _hooks(sub):
            dev = getattr(hook, "execution_device", None)
            if dev is not None:
                return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
        for p in sub.parameters(recurse=False):
            if p.device.type != "meta":
                return p.device
    return torch.device("cpu")


class Placement:
    """Where each part of a dispatched model runs, and which of its modules are offloaded.

    Parts are the layer indices and `OUTER` (everything outside the layers).
    """

    def __init__(self, hf: nn.Module, blocks: Sequence[nn.Module]) -> None:
        self.devices: dict[int | str, torch.device] = {
            i: execution_device(block) for i, block in enumerate(blocks)}
        self.offloaded: dict[int | str, list[tuple[nn.Module, Any]]] = {
            i: _offloaded(block.modules()) for i, block in enumerate(blocks)}
        self.offloaded[OUTER] = _offloaded_outside(hf, blocks)
        self.embed_device = execution_device(hf.get_input_embeddings())
        self.unembed_device = execution_device(hf.get_output_embeddings())
        self.devices[OUTER] = self.embed_device
        self._depth: dict[int | str, int] = {}

    @contextmanager
    def holding(self, part: int | str) -> Iterator[torch.device]:
        """Bring `part`'s offloaded weights onto its execution device for the duration; yields
        that device.

        The module's forwards inside (the engine runs some through the model's own modules)
        neither load nor drop the weights again: each hook is told they are in place until the
        part is done. Holding a part already held (a run started inside another's stage) does
        nothing more.
        """
        depth = self._depth.get(part, 0)
        self._depth[part] = depth + 1
        if depth:
            try:
                yield self.devices[part]
            finally:
                self._depth[part] -= 1
            return
        held: list[tuple[nn.Module, Any]] = []
        try:
            for module, hook in self.offloaded[part]:
                hook.pre_forward(module)
                hook.offload = False  # its forward must not reload them, nor empty them after
                held.append((module, hook))
            if not held:
                yield self.devices[part]
                return
            with _Reloaded(held):
                yield self.devices[part]
        finally:
            self._depth[part] = 0
            for module, hook in reversed(held):
                hook.offload = True
                hook.post_forward(module, None)


def outer_offloaded(hf: nn.Module) -> bool:
    """Some module outside the layers of a placed model holds offloaded weights (nnsight's
    traces then fail inside accelerate's hooks; a model whose layers alone are offloaded runs).
    """
    layers = [block for m in hf.modules() if isinstance(m, nn.ModuleList) for block in m]
    return bool(_offloaded_outside(hf, layers))


def _offloaded_outside(hf: nn.Module, blocks: Sequence[nn.Module]) -> list[tuple[nn.Module, Any]]:
    """`_offloaded` of the modules of `hf` outside `blocks` (its layers)."""
    inside = {id(m) for block in blocks for m in block.modules()}
    return _offloaded(m for m in hf.modules() if id(m) not in inside)


def offloaded_value(hf: nn.Module, name: str) -> torch.Tensor:
    """The stored value of parameter `name` of a model placed by a device map, whose module
    holds it offloaded (a meta tensor) until its forward."""
    module_name, _, leaf = name.rpartition(".")
    module = hf.get_submodule(module_name)
    for hook in _hooks(module):
        weights = getattr(hook, "weights_map", None)
        if weights is not None and leaf in weights:
            return weights[leaf]
    raise ValueError(f"{name} is on the meta device and no offloading hook holds it")


class _Reloaded(torch.autograd.graph.saved_tensors_hooks):
    """While a part's offloaded weights are in place: autograd keeps, for the backward, not the
    weights themselves (or views of them) but where to read them again, so a run with gradients
    holds one part's weights at a time, not every layer's until its backward.

    Each saved tensor whose storage is one of the held parameters' is packed as (the hook's
    weights map, the parameter's name, device, dtype, the view's size, stride and offset), and
    unpacked by reading the parameter again (from the CPU or the disk) and taking the same view.
    """

    def __init__(self, held: list[tuple[nn.Module, Any]]) -> None:
        stored: dict[int, tuple[Any, str]] = {}
        for module, hook in held:
            for name, param in module.named_parameters(recurse=False):
                if param.device.type != "meta" and name in hook.weights_map:
                    stored[param.untyped_storage().data_ptr()] = (hook.weights_map, name)

        def pack(t: torch.Tensor) -> Any:
            if t.device.type == "meta":
                return t
            where = stored.get(t.untyped_storage().data_ptr())
            if where is None:
                return t
            return _Stored(*where, t.device, t.dtype, t.size(), t.stride(), t.storage_offset())

        def unpack(x: Any) -> torch.Tensor:
            if not isinstance(x, _Stored):
                return x
            base = x.weights[x.name].to(x.device, x.dtype)
            return base.as_strided(x.size, x.stride, x.offset)

        super().__init__(pack, unpack)


@dataclass(frozen=True)
class _Stored:
    """Where a saved tensor that views an offloaded parameter is read again (see `_Reloaded`)."""

    weights: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _offloaded(modules: Any) -> list[tuple[nn.Module, Any]]:
    """(module, hook) of every module whose hook offloads its weights."""
    return [(m, h) for m in modules for h in _hooks(m) if getattr(h, "offload", False)]


#: Device maps accelerate computes from the devices' free memory.
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str | os.PathLike | dict | None) -> str | dict[str, Any] | None:
    """A device map as `circuits.load_model` takes it: one of `AUTO_MAPS`, a JSON file or a
    dict mapping module names (``"transformer.h.0"``, ``"model.layers.3"``, ...) to a device
    (``"cpu"``, ``"disk"``, ``"cuda:1"``, ``"mps"`` or a GPU number); None: no map. Checks the
    form only (`load_model` checks the devices exist).

    Examples
    --------
    >>> parse_device_map("auto")
    'auto'
    >>> parse_device_map({"transformer.h.0": 0, "lm_head": "disk"})
    {'transformer.h.0': 'cuda:0', 'lm_head': 'disk'}
    >>> parse_device_map({"transformer.h.0": "gpu"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: device map: 'transformer.h.0' is placed on 'gpu'; a place is ...
    """
    if spec is None or isinstance(spec, dict):
        mapping = spec
    elif str(spec) in AUTO_MAPS:
        return str(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise OptionError(f"device map {str(spec)!r} is neither one of {', '.join(AUTO_MAPS)} "
                              "nor a JSON file; pass auto or a file mapping module names to "
                              "devices")
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise OptionError(f"device map {path}: not readable JSON ({err}); write an object "
                              'such as {"transformer.h.0": "cuda:0", "lm_head": "disk"}') from None
        if not isinstance(mapping, dict) or not mapping:
            raise OptionError(f"device map {path}: holds no object of module names to devices; "
                              'write one such as {"transformer.h.0": "cuda:0", "lm_head": "disk"}')
    if mapping is None:
        return None
    out: dict[str, Any] = {}
    for name, place in mapping.items():
        out[str(name)] = _place(str(name), place)
    return out


def _place(name: str, place: Any) -> str:
    """One entry of a device map, spelled as torch and accelerate read it."""
    if isinstance(place, int) and not isinstance(place, bool) and place >= 0:
        return f"cuda:{place}"
    if isinstance(place, str):
        p = place.strip().lower()
        if p.isdigit():
            return f"cuda:{p}"
        if p in ("cpu", "disk", "mps", "cuda") or (p.startswith("cuda:") and p[5:].isdigit()):
            return p
    raise OptionError(f"device map: {name!r} is placed on {place!r}; a place is cpu, disk, cuda, "
                      "cuda:N, mps or a GPU number N")


def parse_memory(spec: str | dict | None) -> dict[Any, str] | None:
    """``--max-memory`` as accelerate takes it: ``"0=20GiB,cpu=60GiB"`` (or a dict) -> ``{0:
    "20GiB", "cpu": "60GiB"}``; the most each device may hold of the model's weights when a map
    is computed (``auto``).

    Examples
    --------
    >>> parse_memory("0=20GiB, cpu=64GiB")
    {0: '20GiB', 'cpu': '64GiB'}
    >>> parse_memory("cpu")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: --max-memory 'cpu': write DEVICE=SIZE pairs separated by ...
    """
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict[Any, str] = {}
    for part in str(spec).split(","):
        key, eq, size = part.strip().partition("=")
        key, size = key.strip().lower(), size.strip()
        if not eq or not key or not _SIZE.fullmatch(size):
            raise OptionError(f"--max-memory {spec!r}: write DEVICE=SIZE pairs separated by "
                              "commas, e.g. 0=20GiB,cpu=64GiB")
        out[int(key) if key.isdigit() else key] = size
    return out


_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?B)?", re.IGNORECASE)


def check_placing(device: torch.device, device_map: Any, max_memory: Any,
                  offload_folder: Any) -> tuple[str | dict[str, Any] | None, dict | None]:
    """The device map and memory limits, checked before any work: the map's form and devices,
    accelerate installed, no device given besides the map, limits and an offload folder only
    with a map."""
    device_map, max_memory = parse_device_map(device_map), parse_memory(max_memory)
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise OptionError("--max-memory and --offload-folder go with --device-map; add "
                              "--device-map auto (or a map file)")
        return None, None
    if device.type != "cpu":
        raise OptionError(f"both a device ({device}) and a device map place the model; give "
                          "one of them (the map's devices, e.g. cuda:0 and cuda:1)")
    if isinstance(device_map, dict):
        for place in set(device_map.values()) - {"disk"}:
            resolve_device(place)
    if offload_folder is not None and Path(offload_folder).exists() and not Path(
            offload_folder).is_dir():
        raise OptionError(f"--offload-folder {offload_folder}: a file is there, not a folder; "
                          "name a folder (it is created if missing)")
    try:
        import accelerate  # noqa: F401  (transformers places the model with it)
    except ImportError:
        raise OptionError("a device map needs the accelerate package: pip install "
                          "accelerate") from None
    return device_map, max_memory


def placing_arguments(device: torch.device, device_map: Any, max_memory: Any,
                      offload_folder: Any) -> dict[str, Any]:
    """from_pretrained's arguments that place a model by a device map (none without one; see
    `check_placing`); the offload folder is a new temporary one unless given."""
    device_map, max_memory = check_placing(device, device_map, max_memory, offload_folder)
    if device_map is None:
        return {}
    folder = (Path(offload_folder) if offload_folder is not None
              else Path(tempfile.mkdtemp(prefix="circuits-offload-")))
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": str(folder)}
