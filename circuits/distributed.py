"""Data parallel over prompts on torch.distributed: who this process is, and how ranks combine.

Scores are sums over prompts, so a run under ``torchrun`` splits the prompts across the ranks
and adds the ranks' sums (`all_sum`, in float64); per-prompt values are gathered in prompt order
(`gather_rows`). Without a process group every helper is the one-process identity: rank 0 of 1.

Work that one rank does whole (a benchmark row, when the rows are what the ranks share) runs
inside `alone`: there this process is a job of one, so nothing in it splits or waits for peers.

The command line enters `process_group` around a command; the library only uses a group that
exists (its caller's), and never creates one itself (`patient_group` adds one to it).
``circuits COMMAND ... --ranks N`` starts the job itself (`run_ranks`), as torchrun would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

#: How long a rank waits for the others in one collective before the job fails.
TIMEOUT = timedelta(minutes=30)
#: How long a rank waits for the others' errors before it stops the job with its own.
ERROR_WAIT = timedelta(seconds=5)

_alone = 0  # depth of `alone` blocks this process is in
_errors = 0  # input errors settled in this process: each settles under keys of its own


def active() -> bool:
    """Whether this process works in a job of more than one rank (not inside `alone`)."""
    return _alone == 0 and _joined()


def _joined() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if active() else 0


def world() -> int:
    """How many ranks take part (1 without a process group)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process prints and writes: rank 0 of the job (also inside `alone`), or the
    only process."""
    return dist.get_rank() == 0 if _joined() else True


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process does its work by itself: it is rank 0 of 1, so a Setup
    is not sharded, a method's sums are not added over ranks and nothing waits for the other
    ranks. `is_main` still tells rank 0 of the job, which alone prints.

    Examples
    --------
    >>> with alone():
    ...     rank(), world(), shard(4)
    (0, 1, slice(0, 4, None))
    """
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


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


def run_ranks(argv: Sequence[str], ranks: int) -> int:
    """Run ``python -m circuits ARGV`` as a job of `ranks` processes on this machine and wait
    for it: what ``torchrun --standalone --nproc-per-node RANKS -m circuits -- ARGV`` does,
    through torch.distributed's own elastic agent, in this process.

    Returns
    -------
    int
        The status every rank ended with (0 when all succeeded, 2 after an input error, 130
        when the job was interrupted), 1 when they differ otherwise.
    """
    # the launcher and its agent are imported only here: the rest of the package never needs
    # them
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=ranks,
                          run_id=f"circuits-{os.getpid()}-{time.time_ns()}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    kept = {n: signal.getsignal(getattr(signal, n)) for n in names if hasattr(signal, n)}
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # each rank says what went wrong itself
    try:
        elastic_launch(config, sys.executable)("-m", "circuits", *argv)
        return 0
    except ChildFailedError as failed:
        statuses = {f.exitcode for f in failed.failures.values()}
        return statuses.pop() if len(statuses) == 1 and len(failed.failures) == ranks else (
            130 if 130 in statuses else 1)
    except SignalException:  # a Ctrl-C (or a stop) of this launcher: the agent stopped the job
        return 130
    finally:
        quiet.setLevel(level)
        for n, handler in kept.items():  # the agent's handlers end with the job
            signal.signal(getattr(signal, n), handler)


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


def share(items: Sequence[T]) -> list[T]:
    """This rank's items of `items` when the ranks share whole items: every `world`-th one,
    from the `rank`-th (items of different cost spread over the ranks).

    Examples
    --------
    >>> share(["a", "b", "c"])  # one process: all of them
    ['a', 'b', 'c']
    """
    return list(items[rank()::world()])


def gather_objects(value: T, group: dist.ProcessGroup | None = None) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order, on every rank.

    `group` is the group to wait in (`patient_group` for ranks that may finish far apart).

    Examples
    --------
    >>> gather_objects({"rows": 2})
    [{'rows': 2}]
    """
    if not active():
        return [value]
    parts: list[T] = [value] * world()
    dist.all_gather_object(parts, value, group=group)
    return parts


@contextlib.contextmanager
def patient_group(wait: timedelta = timedelta(days=7)) -> Iterator[dist.ProcessGroup | None]:
    """A gloo group of all ranks whose collectives wait up to `wait` (the default group's wait,
    `TIMEOUT`, is too short for ranks whose shares of the work take hours apart). Every rank
    must enter it at the same point; None in one process. Destroyed at the end.

    Examples
    --------
    >>> with patient_group() as group:
    ...     gather_objects("mine", group)
    ['mine']
    """
    if not active():
        yield None
        return
    group = dist.new_group(backend="gloo", timeout=wait)
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


def settle_error(message: str) -> bool:
    """After an input error, whether this rank prints it: rank 0 does; another rank only when
    rank 0 had no error or another one. Every rank waits (up to `ERROR_WAIT`) for the others'
    errors, so that the ranks stop together, each with its own status, before torchrun's agent
    stops the ranks still running. Uses the job's key-value store, never a collective: a rank
    still inside one (an error on some ranks only) cannot hold the others.

    Examples
    --------
    >>> settle_error("unknown task 'x'")  # one process: it says it
    True
    """
    global _errors
    if not active():
        return True
    _errors += 1
    store = dist.distributed_c10d._get_default_store()
    me, keys = rank(), [f"circuits/error/{_errors}/{r}" for r in range(world())]
    store.set(keys[me], message)
    with contextlib.suppress(RuntimeError):  # a rank without this error: it stops on its own
        store.wait(keys, ERROR_WAIT)
    if me == 0:
        return True
    with contextlib.suppress(RuntimeError):
        store.wait(keys[:1], timedelta(milliseconds=1))
        return store.get(keys[0]).decode() != message
    return True


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if active():
        dist.barrier()


def _wire_device() -> torch.device:
    """Where collectives take their tensors: this rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
