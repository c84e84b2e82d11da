"""What a discovery run will need, worked out from the model's config alone.

`read_config` finds a config (a model folder, a shipped model, or a hub name whose config is in
the local Hugging Face cache: nothing is downloaded), `model_sizes` builds the model on the meta
device (no weight is read or allocated) to count its parameters and to get the family adapter's
shape and the edge graph, and `plan_run` adds up what a method's run of ``n`` prompts of ``p``
tokens in batches of ``b`` holds at once on the device the model runs on:

weights
    The parameters, in the run's dtype.
buffers
    The tensors of source outputs kept for a whole batch: the ablated (corrupted) outputs, the
    clean trace and their difference, ``[n_sources, b, p, d]`` each, and EAP-IG-activations'
    fixed outputs of a chunk of steps.
activations
    What the method's runs hold at their peak: the activations a gradient run keeps for its
    backward pass over the rows it runs at once (``b`` for EAP, ``b`` times the steps of a
    chunk for EAP-IG, as `circuits.setup.Setup.step_chunks` chunks them), or the rows exact
    patching runs side by side (at most the engine's chunk of 512 rows) and the residuals
    of the later layers they keep.
scores
    The dense ``[n_sources, n_destinations]`` float32 score matrices (on the device and the
    running total on the host).

Activations and buffers are sums of tensor sizes in a few units (one residual-sized tensor of
the batch, one MLP-sized, one layer's attention weights, one layer's query/key/value weights,
times the sources, destinations or layers), with coefficients *fitted* to the peaks
`circuits.cost.measure` measured on 13 small GPT-2 and Llama models of 2 to 4 layers, 4 to 8
heads, widths 256 and 512, batches of 8 to 32 prompts of 16 to 64 tokens
(``benchmarks/plan_memory.py`` measures them again and prints the estimate next to each peak).
The peaks were measured with glibc's mmap threshold held at 128 KiB, so that resident memory
follows the tensors alive at once (what CUDA's allocator counts) rather than what the heap kept
from earlier runs. The engine's exact allocations are not reproduced: over those models the
estimate is within 15% of the measured peak for EAP, EAP-IG and EAP-IG-activations and within
35% for exact patching (``tests/test_plan.py`` checks EAP, EAP-IG and exact patching to 25% on
one model of each family). Models far larger than those are extrapolated.
Methods without such a model are refused by name (`MEMORY_METHODS` lists those that have one).

Passes are forward-equivalents per prompt (`circuits.cost.Cost`), counted as the engine counts
them. A time is estimated only where a speed is known for this machine: the multiply-adds a
second one forward pass sustained, saved by ``circuits plan --measure-speed`` (`measure_speed`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import OptionError
from .graph import Graph
from .setup import DEFAULT_RUN_MEMORY

CHUNK = 512  # rows exact patching runs at once (`circuits.engine.Engine`'s default)
IG_STEPS = 5  # EAP-IG's default steps
GiB = 2**30


@dataclass(frozen=True)
class ModelSizes:
    """A model's sizes, read from its config on the meta device.

    Attributes
    ----------
    name : str
    architecture : str
        The transformers class (``LlamaForCausalLM``).
    n_layers, n_heads, n_kv_heads, d_model, d_head, d_mlp, vocab : int
    n_params : int
        Parameters (tied ones once).
    dtype : str
        The run's dtype (``bfloat16``).
    itemsize : int
        Bytes of one parameter (and activation) in it.
    graph : Graph
        The edge graph.
    layer_params : int
        Parameters of one layer (the largest); the rest (embeddings, final norm, unembedding)
        are outside the layers.
    """

    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab: int
    n_params: int
    dtype: str
    itemsize: int
    graph: Graph
    layer_params: int = 0

    @property
    def weight_bytes(self) -> int:
        return self.n_params * self.itemsize

    def weights_on_first(self, devices: int = 1, offload: bool = False) -> int:
        """Bytes of weights on the device a run's activations are on (the first of a device
        map's): all of them on one device; with `devices` GPUs sharing the layers evenly, its
        share of the layers and everything outside them; with `offload` (layers streamed in
        from the CPU or disk, `circuits.placement`), the outside and two layers (a stage of
        exact patching holds its layer while the run of the later ones holds theirs).

        Examples
        --------
        >>> from transformers import GPT2Config
        >>> s = model_sizes(GPT2Config())  # 39.4 M parameters outside the layers, 7.09 M each
        >>> [round(s.weights_on_first(*a) / 2**20) for a in ((1,), (2,), (4,), (1, True))]
        [475, 312, 231, 204]
        """
        outside = self.n_params - self.n_layers * self.layer_params
        if offload:
            layers = min(2, self.n_layers)
        else:
            layers = -(-self.n_layers // max(1, devices))
        return (outside + layers * self.layer_params) * self.itemsize


def read_config(name: str | os.PathLike) -> Any:
    """The transformers config of a model folder (its config.json), a shipped model, or a hub
    name whose config is in the local Hugging Face cache; an OptionError saying what is missing
    otherwise. Nothing is downloaded."""
    from transformers import AutoConfig

    from .zoo import find

    text = str(name)
    if not text.strip():
        raise OptionError("MODEL must be a model folder or a hub name, got an empty string")
    folder = Path(text).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise OptionError(f"{text!r} is a folder without config.json; plan reads the model's "
                          "config: give the folder of a Hugging Face model")
    if not folder.is_dir():
        shipped = find(text)
        folder = shipped if shipped is not None else folder
    try:
        if folder.is_dir():
            return AutoConfig.from_pretrained(folder, local_files_only=True)
        return AutoConfig.from_pretrained(text, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        if folder.is_dir():
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OptionError(f"{text!r}: config.json cannot be read ({first})") from None
        raise OptionError(f"{text!r} is not a folder and its config is not in the local Hugging "
                          "Face cache; plan needs only the config: download config.json into a "
                          "folder (or the cache) and give that") from None


def model_sizes(config: Any, dtype: torch.dtype = torch.float32, name: str = "") -> ModelSizes:
    """`config`'s model built on the meta device: its sizes, parameters and graph.

    Examples
    --------
    >>> from transformers import GPT2Config
    >>> sizes = model_sizes(GPT2Config())  # GPT-2 small
    >>> sizes.n_params, sizes.graph.n_edges
    (124439808, 32491)
    """
    from transformers import AutoModelForCausalLM

    from .adapters import adapter_for

    try:
        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError) as err:
        raise OptionError(f"{name or 'the config'} does not describe a causal language model "
                          f"transformers can build ({err})") from None
    adapter = adapter_for(hf)
    a = adapter.arch
    d_mlp = a.d_mlp or 4 * a.d_model
    return ModelSizes(
        name=name or getattr(config, "_name_or_path", "") or type(hf).__name__,
        architecture=type(hf).__name__, n_layers=a.n_layers, n_heads=a.n_heads,
        n_kv_heads=a.n_kv_heads, d_model=a.d_model, d_head=a.d_head, d_mlp=d_mlp,
        vocab=hf.get_input_embeddings().weight.shape[0],
        n_params=sum(p.numel() for p in hf.parameters()),
        dtype=str(dtype).removeprefix("torch."),
        itemsize=torch.empty((), dtype=dtype).element_size(),
        graph=Graph(a.n_layers, a.n_heads, a.parallel, a.n_kv_heads),
        layer_params=max(sum(p.numel() for p in adapter.block(i).parameters())
                         for i in range(a.n_layers)))


# -- memory ---------------------------------------------------------------------------------------
def _units(s: ModelSizes, b: int, p: int) -> dict[str, float]:
    """The sizes the memory models count in, bytes: R one residual-sized tensor of the batch
    ``[b, p, d]``, M one MLP-sized ``[b, p, d_mlp]``, A one layer's attention weights ``[b, H, p,
    p]``, Q one layer's query, key and value weights, S the sources, D the destinations, L the
    layers."""
    g = s.graph
    return {"R": b * p * s.d_model * s.itemsize, "M": b * p * s.d_mlp * s.itemsize,
            "A": b * s.n_heads * p * p * s.itemsize,
            "Q": (s.n_heads + 2 * s.n_kv_heads) * s.d_head * s.d_model * s.itemsize,
            "S": g.n_sources, "D": g.n_destinations, "L": s.n_layers}


def ig_chunk(s: ModelSizes, b: int, p: int, steps: int, run_memory: int = DEFAULT_RUN_MEMORY
             ) -> int:
    """Steps of EAP-IG run side by side, as `circuits.setup.Setup.step_chunks` chunks them (by
    `circuits.engine.Engine.gradient_bytes`)."""
    width = 8 * s.d_model + 6 * s.d_mlp + 2 * s.n_heads * p
    per_step = b * p * s.n_layers * width * s.itemsize
    return max(1, min(steps, run_memory // max(per_step, 1)))


def exact_rows(s: ModelSizes, b: int) -> tuple[int, int]:
    """Exact patching's variants at once, in batches of rows: the most a layer runs (a chunk
    of upstream sources times its heads, `circuits.runs.run_single_edges`), and the most times
    the layers they then run through (each keeps its residual until the run ends)."""
    g, most, reach = s.graph, 1, 1
    for layer in range(s.n_layers):
        n_up = g.n_sources_before(g.attn_stage(layer))
        rows = min(n_up, max(1, CHUNK // (s.n_heads * b))) * s.n_heads
        most, reach = max(most, rows), max(reach, rows * (s.n_layers - layer))
    return most, reach


def _eap(u: dict[str, float], s: ModelSizes, b: int, p: int, steps: int) -> tuple[float, float]:
    """(buffers, activations) of EAP: the ablated outputs, the clean trace and the deltas; one
    forward-backward over the batch."""
    S, D, R, L = u["S"], u["D"], u["R"], u["L"]
    return 3 * S * R, (2.16 * S * R + 0.63 * D * R + 2.97 * L * u["M"] + 5.15 * L * u["A"]
                       + 0.71 * L * u["Q"])


def _eap_ig(u: dict[str, float], s: ModelSizes, b: int, p: int, steps: int
            ) -> tuple[float, float]:
    """(buffers, activations) of EAP-IG: EAP's buffers; a forward-backward over the steps of a
    chunk side by side."""
    S, D, R, L = u["S"], u["D"], u["R"], u["L"]
    k = ig_chunk(s, b, p, steps)
    step = 1.70 * S * R + 0.96 * D * R + 2.04 * L * u["M"] + 5.19 * L * u["A"]
    return 3 * S * R, k * step + 0.95 * L * u["Q"]


def _eap_ig_activations(u: dict[str, float], s: ModelSizes, b: int, p: int, steps: int
                        ) -> tuple[float, float]:
    """(buffers, activations) of EAP-IG-activations: EAP's buffers and a chunk's fixed outputs;
    a forward-backward over the steps of a chunk."""
    S, D, R, L = u["S"], u["D"], u["R"], u["L"]
    k = ig_chunk(s, b, p, steps)
    step = 1.70 * S * R + 0.95 * D * R + 2.03 * L * u["M"] + 5.35 * L * u["A"]
    return (3 + k) * S * R, k * step + 1.05 * L * u["Q"]


def _exact(u: dict[str, float], s: ModelSizes, b: int, p: int, steps: int
           ) -> tuple[float, float]:
    """(buffers, activations) of exact patching: the clean trace and the deltas; the variants
    of a chunk through the later layers, whose residuals a run keeps, and an MLP's
    intermediates."""
    rows, reach = exact_rows(s, b)
    return 0.62 * u["S"] * u["R"], 4.6 * reach * u["R"] + 1.18 * rows * u["M"]


MEMORY_METHODS = {"eap": _eap, "eap-ig": _eap_ig, "eap-ig-activations": _eap_ig_activations,
                  "exact": _exact}


@dataclass(frozen=True)
class Memory:
    """Bytes a run holds at its peak on its device (weights, buffers, activations, the device's
    score matrix) and on the host (the running total of the scores)."""

    weights: int
    buffers: int
    activations: int
    scores: int
    host: int

    @property
    def run(self) -> int:
        """What the method adds on top of the loaded model (what `circuits.cost.measure`
        measures; on a CPU the host's share is in the same memory)."""
        return self.buffers + self.activations + self.scores + self.host

    @property
    def device(self) -> int:
        return self.weights + self.buffers + self.activations + self.scores


def memory(s: ModelSizes, method: str, b: int, p: int, steps: int = IG_STEPS,
           devices: int = 1, offload: bool = False) -> Memory:
    """The memory of `method` on batches of `b` prompts of `p` tokens, on the device its
    activations are on (see `ModelSizes.weights_on_first` for `devices` and `offload`).

    Examples
    --------
    >>> from transformers import GPT2Config
    >>> m = memory(model_sizes(GPT2Config()), "eap", b=20, p=32)
    >>> round(m.weights / 2**20), round(m.run / 2**20)
    (475, 2428)
    """
    if method not in MEMORY_METHODS:
        raise OptionError(f"plan has no memory model for {method!r}; it has one for "
                          f"{', '.join(MEMORY_METHODS)}")
    u = _units(s, b, p)
    buffers, activations = MEMORY_METHODS[method](u, s, b, p, steps)
    score = s.graph.n_sources * s.graph.n_destinations * 4
    return Memory(s.weights_on_first(devices, offload), int(buffers), int(activations), score,
                  2 * score)


# -- passes ---------------------------------------------------------------------------------------
def passes(s: ModelSizes, method: str, b: int, steps: int = IG_STEPS) -> tuple[float, float]:
    """(forward, backward) passes per prompt, counted as the engine counts them (the ablated run
    of the corrupted prompts included; no prefix shared by clean and corrupted prompts).

    Examples
    --------
    >>> from transformers import GPT2Config
    >>> passes(model_sizes(GPT2Config()), "eap-ig", b=20)
    (7.0, 5.0)
    """
    if method == "eap":
        return 2.0, 1.0
    if method == "eap-ig":
        return 2.0 + steps, float(steps)
    if method == "eap-ig-activations":
        sweeps = 2 * s.n_layers + 1
        return 2.0 + steps * sweeps, float(steps * sweeps)
    if method == "exact":
        return 2.0 + _exact_forwards(s), 0.0
    raise OptionError(f"plan has no pass count for {method!r}; it has one for "
                      f"{', '.join(MEMORY_METHODS)}")


def _exact_forwards(s: ModelSizes) -> float:
    """Forward-equivalents per prompt of `circuits.runs.run_single_edges` after its clean trace:
    per layer, every upstream source's delta through the attention's projections and the rest
    of the model for each query, key and value head, then through the MLP and the rest; every
    source into the logits."""
    g = s.graph
    stages = g.logits_stage + 1
    total = 0.0
    for layer in range(s.n_layers):
        a, m = g.attn_stage(layer), g.mlp_stage(layer)
        n_up = g.n_sources_before(a)
        total += n_up * (3 + (s.n_heads + 2 * s.n_kv_heads) * (stages - a - 1)) / stages
        n_up = g.n_sources_before(m)
        total += n_up * (1 + (stages - m - 1)) / stages
    return total + g.n_sources / stages


# -- time -----------------------------------------------------------------------------------------
def speed_file() -> Path:
    """Where measured speeds are kept: ``$CIRCUITS_CACHE/speed.json`` (by default under
    ``~/.cache/circuits``)."""
    root = os.environ.get("CIRCUITS_CACHE") or Path.home() / ".cache" / "circuits"
    return Path(root) / "speed.json"


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a speed is known for: the processor (or GPU), the torch threads, the dtype."""
    if device.type == "cuda":
        present = torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
        where = torch.cuda.get_device_name(device) if present else "a GPU not on this machine"
    else:
        n = torch.get_num_threads()
        where = f"{_cpu_name()}, {n} thread{'' if n == 1 else 's'}"
    return f"{device.type}: {where}, {str(dtype).removeprefix('torch.')}"


def _cpu_name() -> str:
    """The processor's model name (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.machine() or "cpu"


def known_speed(device: torch.device, dtype: torch.dtype) -> float | None:
    """Multiply-adds a second saved for this machine by `measure_speed`, or None."""
    try:
        saved = json.loads(speed_file().read_text())
    except (OSError, ValueError):
        return None
    value = saved.get(machine_key(device, dtype)) if isinstance(saved, dict) else None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def measure_speed(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Time plain forward passes of a random GPT-2-shaped model (6 layers, width 512, batches of
    8 x 64 tokens) on `device` for about `seconds`, save the multiply-adds a second (parameters x
    tokens) in `speed_file` and return it."""
    from .testing import tiny_gpt2

    model = tiny_gpt2(n_layer=6, n_head=8, n_embd=512, vocab_size=1024, n_positions=64)
    hf = model.hf.to(device=device, dtype=dtype)
    ids = torch.randint(0, 1024, (8, 64), device=device)
    n_params = sum(p.numel() for p in hf.parameters())
    with torch.no_grad():
        hf(ids)  # warm-up
        runs, t0 = 0, time.perf_counter()
        while runs < 2 or time.perf_counter() - t0 < seconds:
            hf(ids)
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = runs * ids.numel() * n_params / (time.perf_counter() - t0)
    path = speed_file()
    try:
        saved = json.loads(path.read_text())
        saved = saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        saved = {}
    saved[machine_key(device, dtype)] = rate
    path.parent.mkdir(parents=True, exist_ok=True)
    from .io import write_atomic

    write_atomic(path, (json.dumps(saved, indent=1, sort_keys=True) + "\n").encode())
    return rate


# -- the plan -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunEstimate:
    """What `plan_run` works out: the model's sizes, the method's memory per device, its passes,
    the time where a speed is known, and the largest batch that fits `capacity`."""

    sizes: ModelSizes
    method: str
    n: int
    batch: int
    positions: int
    steps: int
    memory: Memory
    forward: float
    backward: float
    seconds: float | None
    capacity: int | None
    largest_batch: int | None

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.memory.device <= self.capacity


def largest_batch(s: ModelSizes, method: str, p: int, capacity: int, n: int,
                  steps: int = IG_STEPS, devices: int = 1, offload: bool = False) -> int:
    """The largest batch (at most `n`) whose run fits `capacity` bytes on the device; 0 when
    not even one prompt does."""
    def fits(b: int) -> bool:
        return memory(s, method, b, p, steps, devices, offload).device <= capacity

    if not fits(1):
        return 0
    low, high = 1, n
    while low < high:  # fits(low) holds; the answer is in low..high
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def plan_run(s: ModelSizes, method: str, n: int, b: int, p: int, steps: int = IG_STEPS,
             capacity: int | None = None, speed: float | None = None, devices: int = 1,
             offload: bool = False) -> RunEstimate:
    """Memory, passes, time and the largest batch of `method` on `n` prompts of `p` tokens in
    batches of `b`; `capacity` the device's memory in bytes, `speed` multiply-adds a second;
    `devices` GPUs a device map spreads the layers over, `offload` the layers streamed in from
    the CPU or disk (the memory is the first device's, where the activations are).

    Examples
    --------
    >>> from transformers import GPT2Config
    >>> run = plan_run(model_sizes(GPT2Config()), "eap-ig", n=100, b=20, p=32, capacity=4 * 2**30)
    >>> run.forward, run.fits, run.largest_batch
    (7.0, False, 8)
    """
    b = min(b, n)
    m = memory(s, method, b, p, steps, devices, offload)
    forward, backward = passes(s, method, b, steps)
    seconds = None
    if speed:
        seconds = (forward + 2 * backward) * n * p * s.n_params / speed
    top = (None if capacity is None
           else largest_batch(s, method, p, capacity, n, steps, devices, offload))
    return RunEstimate(s, method, n, b, p, steps, m, forward, backward, seconds, capacity, top)
