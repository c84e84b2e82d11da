"""Data parallel over prompts on torch.distributed: who this process is, and how ranks combine.

Scores are sums over prompts, so a run under ``torchrun`` splits the prompts across the ranks
and adds the ranks' sums (`all_sum`, in float64); per-prompt values are gathered in prompt order
(`gather_rows`). Without a process group every helper is the one-process identity: rank 0 of 1.

The command line enters `process_group` around a command; the library only uses a group that
exists (its caller's), and never creates one itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

#: How long a rank waits for the others in one collective before the job fails.
TIMEOUT = timedelta(minutes=30)


def active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """How many ranks take part (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process prints and writes: rank 0, or the only process."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: str | torch.device | None = None) -> Iterator[bool]:
    """Join the job torchrun started, for the time of the ``with`` block.

    Reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``;
    ``LOCAL_RANK`` picks the GPU) and initialises the default process group: NCCL when `device`
    is CUDA, gloo otherwise. The group is destroyed at the end, also on error. Nothing happens
    without torchrun's variables (one process) or when a group exists already (the caller's,
    left as it is).

    Parameters
    ----------
    device : str or torch.device, optional
        Where the model runs; ``cuda`` selects NCCL and this rank's GPU (``LOCAL_RANK``).

    Yields
    ------
    bool
        Whether this block created the group.

    Examples
    --------
    >>> with process_group() as created:  # not under torchrun: one process
    ...     created, rank(), world(), is_main()
    (False, 0, 1, True)
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        yield False
        return
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    try:
        yield True
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def stop_with_the_job(grace: float = 10.0) -> Iterator[None]:
    """For a program that owns its process: inside the block a stop of the job reaches this
    rank as a Ctrl-C (KeyboardInterrupt).

    When one rank stops (a Ctrl-C to it alone), torchrun's agent sends the others SIGTERM;
    here SIGTERM raises KeyboardInterrupt, so every rank ends as interrupted. A rank waiting in
    a collective sees it fail first (its peer is gone): it waits up to `grace` seconds for the
    agent's SIGTERM before letting the failure through. The previous handler is restored.
    """
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except RuntimeError:  # torch.distributed's errors are RuntimeErrors
        if active():
            time.sleep(grace)  # the SIGTERM, if the job is stopping, raises in here
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def shard(n: int) -> slice:
    """The rows of `n` that this rank works on: contiguous, near-even, the same on every run.

    Examples
    --------
    >>> shard(10)  # one process: everything
    slice(0, 10, None)
    """
    r, w = rank(), world()
    return slice(n * r // w, n * (r + 1) // w)


def all_sum(t: Tensor) -> Tensor:
    """The sum of `t` over all ranks, added in float64, in `t`'s dtype and device.

    Examples
    --------
    >>> all_sum(torch.tensor([1.5, 2.0])).tolist()
    [1.5, 2.0]
    """
    if not active():
        return t
    total = t.detach().to(_wire_device(), torch.float64).contiguous()
    dist.all_reduce(total)
    return total.to(t.device, t.dtype)


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows of `t` (its `shard`'s values), concatenated in rank order: the values
    of all prompts, in prompt order, on every rank.

    Examples
    --------
    >>> gather_rows(torch.tensor([1.0, 2.0])).tolist()
    [1.0, 2.0]
    """
    if not active():
        return t
    wire = _wire_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=wire) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.int64, device=wire))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *t.shape[1:], dtype=torch.float64, device=wire)
    padded[: t.shape[0]] = t.detach().to(wire, torch.float64)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    rows = [p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)]
    return torch.cat(rows).to(t.device, t.dtype)


def broadcast(value: T) -> T:
    """Rank 0's `value` (any picklable object) on every rank.

    Examples
    --------
    >>> broadcast({"position": 3})
    {'position': 3}
    """
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if active():
        dist.barrier()


def _wire_device() -> torch.device:
    """Where collectives take their tensors: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
