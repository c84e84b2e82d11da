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
    """Passes are forward-equivalents over the prompt set: the rows run through the model's
    stages, divided by (prompts x stages). One plain forward over every prompt is 1; a run of C
    variants of every prompt that starts halfway through the model is C / 2."""

    forward: float = 0.0
    backward: float = 0.0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "forward": round(self.forward, 3),
            "backward": round(self.backward, 3),
            "seconds": round(self.seconds, 4),
            "peak_memory_mb": round(self.peak_memory_mb, 1),
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
def measure(counter: PassCounter, device: torch.device | None = None, prompts: int = 1
            ) -> Iterator[Cost]:
    """Fill a Cost with the passes added to `counter` (divided by the `prompts` they ran over),
    the wall time and the peak memory above the starting point while the block runs."""
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
        if cuda:
            # CUDA runs asynchronously: without this, kernels still queued escape the time
            torch.cuda.synchronize(device)
        cost.seconds = time.perf_counter() - t0
        cost.forward = (counter.forward - f0) / prompts
        cost.backward = (counter.backward - b0) / prompts
        if cuda:
            cost.peak_memory_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            sampler.stop.set()
            thread.join()
            cost.peak_memory_mb = max(sampler.peak, _rss_mb()) - base
