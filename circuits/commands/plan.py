"""``circuits plan``: what a discovery run will need, from the model's config alone."""

from __future__ import annotations

import argparse
import re

import torch

from ..methods import available
from ..model import resolve_device, resolve_dtype
from ..sizing import (
    IG_STEPS,
    MEMORY_METHODS,
    RunEstimate,
    ig_chunk,
    known_speed,
    machine_key,
    measure_speed,
    model_sizes,
    plan_run,
    read_config,
)
from ..task import MAX_PROMPTS
from .common import add_model_argument, fail

HELP_EXAMPLES = """examples:
  circuits plan gpt2 --method eap-ig --n 1000 --batch-size 20
  circuits plan path/to/llama-folder --method eap --dtype bfloat16 --memory 80GiB
  circuits plan gpt2 --measure-speed   # once per machine: then plans show a time
  circuits plan llama-70b-folder --method eap --dtype bfloat16 --memory 80GiB --devices 4
  circuits plan llama-8b-folder --method eap --dtype bfloat16 --memory 24GiB --offload"""

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
         "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
         "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``80GiB``, ``512MB`` or ``1e9``; an OptionError otherwise.

    Examples
    --------
    >>> parse_size("80GiB"), parse_size("1.5 GB")
    (85899345920, 1500000000)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in UNITS or float(match.group(1)) <= 0:
        fail(f"--memory must be a positive size such as 80GiB, 512MiB or 24GB, got {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, " (only its config.json is read)")
    parser.add_argument("--method", default="eap-ig", help="the discovery method (default: "
                        f"%(default)s; plan knows {', '.join(MEMORY_METHODS)})")
    parser.add_argument("--n", type=int, default=100, help="prompts (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="prompts a batch (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=32, metavar="P",
                        help="tokens a prompt (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=IG_STEPS,
                        help="EAP-IG's integration steps (default: %(default)s)")
    parser.add_argument("--device", default="cpu", metavar="DEV",
                        help="where the run would go: its memory and speed are read (default: "
                        "%(default)s)")
    parser.add_argument("--dtype", default="float32", metavar="DTYPE",
                        help="parameter dtype: float32, bfloat16 or float16 (default: "
                        "%(default)s)")
    parser.add_argument("--memory", metavar="SIZE",
                        help="the device's memory, e.g. 80GiB (default: what is free on --device)")
    parser.add_argument("--devices", type=int, default=1, metavar="N",
                        help="GPUs a device map spreads the layers over (discover --device-map "
                        "auto); the memory shown is the first one's, which also holds the "
                        "activations (default: %(default)s)")
    parser.add_argument("--offload", action="store_true",
                        help="the layers offloaded to the CPU or disk (discover --device-map "
                        "with cpu or disk places) and brought in one stage at a time")
    parser.add_argument("--measure-speed", action="store_true",
                        help="time plain forward passes on --device first and keep the speed "
                        "for this machine's later plans")


def _check(args: argparse.Namespace) -> None:
    """Every mistake in the flags, before the config is read."""
    if args.method not in MEMORY_METHODS:
        what = ("has no memory model in plan" if args.method in available()
                else "is not a method (`circuits methods` lists them)")
        fail(f"--method {args.method!r} {what}; plan knows {', '.join(MEMORY_METHODS)}")
    if not 1 <= args.n <= MAX_PROMPTS:
        fail(f"--n must be between 1 and {MAX_PROMPTS}, got {args.n}")
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 1 <= args.tokens <= 2**20:
        fail(f"--tokens must be between 1 and {2**20}, got {args.tokens}")
    if not 1 <= args.steps <= 1000:
        fail(f"--steps must be between 1 and 1000, got {args.steps}")
    if not 1 <= args.devices <= 1024:
        fail(f"--devices must be between 1 and 1024, got {args.devices}")
    if args.offload and args.devices > 1:
        fail("--offload and --devices each place the layers; give one of them")


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def report(run: RunEstimate, where: str, speed_key: str, devices: int = 1,
           offload: bool = False) -> str:
    """The plan as text lines: model, graph, run, memory, passes, time, fit."""
    s, m, g = run.sizes, run.memory, run.sizes.graph
    kv = "" if s.n_kv_heads == s.n_heads else f" ({s.n_kv_heads} key/value)"
    steps = ""
    if run.method in ("eap-ig", "eap-ig-activations"):
        k = ig_chunk(s, run.batch, run.positions, run.steps)
        steps = f", {run.steps} steps ({k} at once)"
    total = (run.forward + 2 * run.backward) * run.n
    if devices > 1:
        rest = s.weight_bytes - s.weights_on_first(devices)
        where += (f" (the first of {devices} devices; the others hold "
                  f"{_gib(rest / (devices - 1))} of weights each)")
    elif offload:
        where += (f" (layers offloaded: {_gib(s.weight_bytes - m.weights)} of weights on the "
                  "CPU or disk, read in a stage at a time)")
    lines = [
        f"model    {s.name} ({s.architecture}): {s.n_layers} layers, {s.n_heads} heads{kv}, "
        f"width {s.d_model}, MLP {s.d_mlp}, {s.n_params / 1e6:,.1f} M parameters in {s.dtype}",
        f"graph    {g.n_sources:,} sources, {g.n_destinations:,} destinations, "
        f"{g.n_edges:,} edges",
        f"run      {run.method} on {run.n} prompts of {run.positions} tokens in batches of "
        f"{run.batch}{steps}",
        f"memory   on {where}: weights {_gib(m.weights)} + buffers {_gib(m.buffers)} + "
        f"activations {_gib(m.activations)} + scores {_gib(m.scores)} = {_gib(m.device)}; "
        f"host: scores {_gib(m.host)}",
        f"passes   {run.forward:g} forward + {run.backward:g} backward per prompt: "
        f"{total:,.0f} forward-equivalents in all (a backward counted as 2)",
    ]
    if run.seconds is None:
        lines.append(f"time     unknown: no speed measured for {speed_key} (run `circuits plan "
                     "MODEL --measure-speed` once)")
    else:
        lines.append(f"time     about {_duration(run.seconds)} at the speed measured for "
                     f"{speed_key}")
    if run.capacity is None:
        lines.append(f"fits     unknown: the memory of {where} is not known (give --memory)")
    else:
        verdict = "yes" if run.fits else "no"
        top = (f"largest batch that fits: {run.largest_batch}" if run.largest_batch
               else "not even a batch of one fits")
        lines.append(f"fits     {verdict}: {_gib(m.device)} of {_gib(run.capacity)}; {top}")
    return "\n".join(lines)


def _device_name(text: str) -> torch.device:
    """The torch device `text` names, whether or not this machine has it."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        fail(f"--device must be cpu, cuda, cuda:N or mps, got {text!r}")
    if device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device must be cpu, cuda, cuda:N or mps, got {text!r}")
    return device


def run(args: argparse.Namespace) -> int:
    """Read the config, build the model on the meta device, print the plan."""
    from ..attribution.plan import free_memory

    _check(args)
    dtype = resolve_dtype(args.dtype)
    capacity = parse_size(args.memory) if args.memory is not None else None
    # with --memory the device may be one this machine lacks (planning for another machine)
    device = (resolve_device(args.device) if capacity is None or args.measure_speed
              else _device_name(args.device))
    sizes = model_sizes(read_config(args.model), dtype, args.model)
    if args.measure_speed:
        measure_speed(device, dtype)
    if capacity is None:
        capacity = free_memory(device)
    speed = known_speed(device, dtype)
    estimate = plan_run(sizes, args.method, args.n, args.batch_size, args.tokens, args.steps,
                        capacity, speed, args.devices, args.offload)
    print(report(estimate, str(device), machine_key(device, dtype), args.devices, args.offload))
    return 0
