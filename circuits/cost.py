"""What a method cost: passes, wall time and peak memory.

Peak memory
    `measure` reports the most memory the block held at once *on top of* what was in use when it
    began (the model, the prompts, anything already kept), in MiB (2**20 bytes):

    CUDA
        ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, less
        ``memory_allocated`` at the start: bytes of live tensors in torch's caching allocator
        (not what the allocator reserved from the driver).
    CPU, on Linux
        The growth of the process's peak resident memory. When the block begins, heap memory
        that the C allocator holds freed is handed back to the system (glibc's
        ``malloc_trim(0)``), and the kernel's high-water mark of resident memory (``VmHWM`` in
        ``/proc/self/status``) is restarted from the current resident memory (writing ``5`` to
        ``/proc/self/clear_refs``, see the kernel's ``Documentation/filesystems/proc.rst``); the
        figure is the high-water mark when the block ends less the resident memory at its start.
        The trim matters: without it, a block that reuses memory freed by an earlier run (a
        warm-up, the previous method) touches no new page and seems to need nothing. The kernel
        keeps the mark at no cost while the block runs (no sampling that could miss a short
        peak) and counts everything the process touches: tensors, Python objects, library
        buffers, memory-mapped files read in, library code run for the first time, in all its
        threads (so other work in the process during the block counts too). It counts pages (4
        KiB) per CPU and adds the counts up lazily, so the figure can be off by some pages per
        CPU the process ran on (a few hundred KiB on a few cores). The page faults of touching
        memory anew fall in the block's time, as in a fresh process.

        So a block that allocates only a few KiB (the ``random`` baseline's score matrix) can
        read 0 or a page or two: below what resident memory resolves.
    Anywhere else (no ``/proc/self/clear_refs``; devices other than CPU and CUDA)
        NaN: not measured.

    torch keeps no allocator statistics for the CPU. Its profiler can report every CPU
    allocation (``torch.profiler.profile(profile_memory=True)``), but it also records every
    operator, which made the timed methods 5-45% slower on the IOI reference model.

    Measurements nest: a block inside another restarts the high-water mark, so the outer one
    first takes the mark reached so far into its own peak.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .heap import release_free_memory


@dataclass
class Cost:
    """Passes, wall time and peak memory of one block (a method run).

    Passes are forward-equivalents over the prompt set: the rows run through the model's
    stages, divided by (prompts x stages). One plain forward over every prompt is 1; a run of C
    variants of every prompt that starts halfway through the model is C / 2. `peak_memory_mb`
    is the memory the block added at its peak, in MiB (see the module notes); NaN where it was
    not measured.
    """

    forward: float = 0.0
    backward: float = 0.0
    seconds: float = 0.0
    peak_memory_mb: float = math.nan

    def as_dict(self) -> dict[str, float | None]:
        """The figures rounded for display; an unmeasured peak memory is None."""
        memory = self.peak_memory_mb
        return {
            "forward": round(self.forward, 3),
            "backward": round(self.backward, 3),
            "seconds": round(self.seconds, 4),
            "peak_memory_mb": None if math.isnan(memory) else round(memory, 3),
        }


@dataclass
class PassCounter:
    """Running totals, in prompt-forwards: rows (prompts x variants) times the share of the
    model's stages they went through. Every executor counts here and nowhere else."""

    forward: float = 0.0
    backward: float = 0.0

    def add_forward(self, rows: int, fraction: float = 1.0) -> None:
        self.forward += rows * fraction

    def add_backward(self, rows: int, fraction: float = 1.0) -> None:
        self.backward += rows * fraction


# -- memory meters, in MiB --------------------------------------------------------------------
def _status_mib(field: str) -> float:
    """One ``Vm...`` line of /proc/self/status (kB) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def _meter_key(device: torch.device | None) -> str | None:
    """Which memory a block on `device` is measured in: "cpu" (the whole process), one CUDA
    device ("cuda:0"), or None where it is not measured."""
    if device is None or device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return None


def _high_water(key: str) -> float:
    """The peak since the last restart."""
    if key == "cpu":
        return _status_mib("VmHWM")
    return torch.cuda.max_memory_allocated(key) / 2**20


def _restart(key: str) -> float:
    """Restart the peak from the level now and return that level (on the CPU, after handing
    freed heap memory back to the system)."""
    if key == "cpu":
        release_free_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mib("VmRSS")
    torch.cuda.reset_peak_memory_stats(key)
    return torch.cuda.memory_allocated(key) / 2**20


@dataclass(eq=False)  # told apart by identity: two may hold equal numbers
class _Open:
    """A measurement under way: its meter, the level it started at, the highest mark seen so
    far."""

    key: str
    base: float
    top: float


_OPEN: list[_Open] = []
_LOCK = threading.Lock()


def _start(device: torch.device | None) -> _Open | None:
    """Begin measuring: fold the peak so far into the measurements under way on the same
    meter (a restart would lose it), then restart it. None where memory is not measured."""
    key = _meter_key(device)
    if key is None:
        return None
    with _LOCK:
        try:
            now = _high_water(key)
            for m in _OPEN:
                if m.key == key:
                    m.top = max(m.top, now)
            base = _restart(key)
        except OSError:
            return None
        m = _Open(key, base, base)
        _OPEN.append(m)
    return m


def _stop(m: _Open | None) -> float:
    """The most memory the block added at once, in MiB (NaN when it was not measured)."""
    if m is None:
        return math.nan
    with _LOCK:
        _OPEN.remove(m)
        try:
            m.top = max(m.top, _high_water(m.key))
        except OSError:
            return math.nan
    return max(m.top - m.base, 0.0)


@contextlib.contextmanager
def measure(counter: PassCounter, device: torch.device | None = None, prompts: int = 1
            ) -> Iterator[Cost]:
    """Measure a block: passes, wall time and peak memory.

    Parameters
    ----------
    counter : PassCounter
        The counter the block's runs add to.
    device : torch.device, optional
        Where the block runs (CPU when None): which memory is measured and, on CUDA, what is
        synchronized before the clock stops.
    prompts : int
        The prompts the passes ran over; the passes are divided by it.

    Yields
    ------
    Cost
        Filled in when the block ends: the passes added to `counter` per prompt, the wall time,
        and the most memory the block held at once on top of what was in use when it began (see
        the module notes for how, and where it is NaN).

    Examples
    --------
    >>> import torch
    >>> counter = PassCounter()
    >>> with measure(counter, prompts=4) as cost:
    ...     counter.add_forward(8, fraction=0.5)  # 8 rows through half of the model
    ...     x = torch.ones(2**24)  # 64 MiB, every page written
    ...     del x
    >>> cost.forward, bool(cost.peak_memory_mb > 63)  # on Linux
    (1.0, True)
    """
    cost = Cost()
    f0, b0 = counter.forward, counter.backward
    cuda = device is not None and device.type == "cuda"
    memory = _start(device)
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        if cuda:
            # CUDA runs asynchronously: without this, kernels still queued escape the time
            torch.cuda.synchronize(device)
        cost.seconds = time.perf_counter() - t0
        cost.forward = (counter.forward - f0) / prompts
        cost.backward = (counter.backward - b0) / prompts
        cost.peak_memory_mb = _stop(memory)
        if memory is not None and memory.key == "cpu":
            release_free_memory()  # what the block freed, kept by the heap (see circuits.heap)
