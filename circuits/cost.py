"""What a method cost: passes, wall time and peak memory."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Cost:
    """Passes are counted in batch-forward equivalents: a run over C variants of a batch that
    starts halfway through the model counts C / 2."""

    forward: float = 0.0
    backward: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "forward": round(self.forward, 3),
            "backward": self.backward,
            "seconds": round(self.seconds, 4),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
        }


@dataclass
class PassCounter:
    """Running totals the engine adds to."""

    forward: float = 0.0
    backward: int = 0


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


@dataclass
class _Sampler:
    """Samples resident memory in a background thread (CPU has no allocator peak counter)."""

    peak: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())


@contextlib.contextmanager
def measure(counter: PassCounter, device: torch.device | None = None) -> Iterator[Cost]:
    """Fill a Cost with the passes added to `counter`, the wall time and the peak memory above
    the starting point while the block runs."""
    cost = Cost()
    f0, b0 = counter.forward, counter.backward
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_mb()
        sampler = _Sampler(peak=base)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - t0
        cost.forward = counter.forward - f0
        cost.backward = counter.backward - b0
        if cuda:
            cost.peak_memory_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            sampler.stop.set()
            thread.join()
            cost.peak_memory_mb = max(sampler.peak, _rss_mb()) - base
