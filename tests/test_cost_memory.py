"""Peak memory from `circuits.cost.measure`: real figures, never hidden by memory the allocator
reuses, growing with the batch and the model."""

from __future__ import annotations

import gc
import math
import os
import platform
import sys

import pytest
import torch

from circuits.cost import PassCounter, measure
from circuits.methods import available, run_method
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_gpt2

MiB = 2**20
#: The kernel sums each CPU's count of resident pages lazily (32 pages a CPU here), so its
#: figures can be off by a few hundred KiB.
SLACK = 1.0
linux_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="CPU memory is measured from /proc/self and glibc's allocator",
)


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def ones_mib(mib: float) -> torch.Tensor:
    """A tensor of `mib` MiB, every page of it written."""
    return torch.ones(int(mib * MiB) // 4)


@pytest.fixture
def one_thread():
    """One thread kept on one CPU, and the code that writes a tensor already paged in (a first
    call in the process brings in megabytes of it, which count).

    Where the kernel reads its count without adding up the CPUs' shares, the count lags by up
    to a batch of pages (32, or twice the number of CPUs if more) for each CPU the process
    touched memory on, and a busy machine moves a thread between CPUs often. Held on one CPU,
    the lag stays within one batch however loaded the machine is."""
    threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {min(cpus)})
    ones_mib(1)
    yield
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)


@pytest.fixture
def eap_ran(one_thread):
    """EAP run once on the smallest shape measured, so that the code it runs for the first time
    in the process is paged in there, not in a measured run: how many pages of a library that
    brings in depends on what the page cache holds (the kernel maps the cached pages around each
    one faulted in), so on what else runs on the machine."""
    peak_of("eap")


def about(mib: float, expected: float) -> bool:
    return expected - SLACK <= mib < expected + SLACK


def peak_of(method: str, b: int = 16, p: int = 16, **shape: int) -> float:
    """Peak memory of `method` on one batch of `b` random prompts of `p` tokens."""
    shape = {"n_layer": 2, "n_head": 4, "n_embd": 64} | shape
    model = tiny_gpt2(vocab_size=50, n_positions=p, **shape)
    setup = Setup(model, [make_batch(b=b, p=p, vocab=50, seed=0)], "logit-diff")
    gc.collect()
    return run_method(method, setup).cost.peak_memory_mb


#: Run in a fresh process: whether freed memory stays with the C allocator depends on the
#: process's history (glibc's mmap threshold rises with the sizes freed, and a process that
#: ever set it, as `circuits.heap.keep_freed_memory` does, keeps it fixed), and under pytest's
#: workers other tests run first in the same process.
REUSE_SCRIPT = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
from test_cost_memory import ones_mib, resident_mib
from circuits.cost import PassCounter, measure
torch.set_num_threads(1)
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
ones_mib(1)
ones_mib(30)  # freed mmap'ed block: glibc serves blocks up to 30 MiB from its heap after it
ones_mib(20)
before = resident_mib()
x = ones_mib(16)
grew = resident_mib() - before
del x
peaks = []
for _ in range(3):
    with measure(PassCounter()) as cost:
        ones_mib(16)
    peaks.append(cost.peak_memory_mb)
print(json.dumps({{"grew": grew, "peaks": peaks}}))
"""


@linux_glibc
def test_measure_sees_memory_the_allocator_reuses():
    """20 MiB allocated and freed stay with the C allocator, and a 16 MiB tensor made after fits
    into them without touching a new page: a difference of resident memory sees nothing.
    `measure` reports the 16 MiB all the same, every time."""
    import json
    import subprocess

    code = REUSE_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, CIRCUITS_KEEP_FREED_MEMORY="0"))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["grew"] < 1, "the 16 MiB should reuse freed memory"
    for peak in result["peaks"]:
        assert about(peak, 16), peak


@linux_glibc
def test_measure_reports_the_peak_not_what_is_left(one_thread):
    with measure(PassCounter()) as cost:
        kept = ones_mib(4)
        ones_mib(24)
    assert about(cost.peak_memory_mb, 28), cost.peak_memory_mb
    del kept


@linux_glibc
def test_measures_nest(one_thread):
    """An inner measurement restarts the peak; the outer one keeps what it saw before, and what
    it holds while the inner one runs."""
    with measure(PassCounter()) as outer:
        # held first: memory freed before it could be kept by the heap (see circuits.heap)
        held = ones_mib(8)
        ones_mib(32)
        with measure(PassCounter()) as inner:
            ones_mib(12)
        del held
    assert about(inner.peak_memory_mb, 12) and about(outer.peak_memory_mb, 40)
    with measure(PassCounter()) as outer:
        held = ones_mib(8)
        with measure(PassCounter()) as inner:
            ones_mib(30)
        del held
    assert about(inner.peak_memory_mb, 30) and about(outer.peak_memory_mb, 38)


@linux_glibc
def test_eap_memory_grows_with_the_prompts_in_one_batch(eap_ran):
    """4x the prompts in one batch: EAP's activations, gradients and ablated outputs are 4x as
    large. Measured small, large, small again: the second small run still reports its own need,
    though the allocator holds enough memory freed by the large one to run it without a new
    page."""
    small, large, again = peak_of("eap", b=16), peak_of("eap", b=64), peak_of("eap", b=16)
    assert small > 1 and again > 1
    assert large > 2 * max(small, again), (small, large, again)


@linux_glibc
@pytest.mark.parametrize("bigger", [{"n_embd": 256}, {"n_layer": 8}])
def test_memory_grows_with_the_model(bigger, eap_ran):
    base, big = peak_of("eap"), peak_of("eap", **bigger)
    assert big > 2 * base, (base, big)


@linux_glibc
def test_every_edge_method_that_runs_the_model_reports_memory():
    """Even on a tiny model and after other methods ran. Random scores run nothing: their few
    KiB are below what resident memory resolves."""
    model = tiny_gpt2(n_layer=2, n_head=2, vocab_size=40)
    batches = [make_batch(b=4, p=6, vocab=40, seed=s) for s in range(2)]
    for name, spec in available().items():
        if spec.level != "edge":
            continue
        setup = Setup(model, batches, "logit-diff")
        options = {"threshold": 0.01, "progress": False} if name == "acdc" else {}
        gc.collect()
        memory = run_method(name, setup, **options).cost.peak_memory_mb
        assert (0 <= memory < SLACK) if name == "random" else (memory > 0), (name, memory)


def test_memory_elsewhere_is_not_measured():
    with measure(PassCounter(), torch.device("meta")) as cost:
        torch.ones(4, device="meta")
    assert math.isnan(cost.peak_memory_mb) and cost.as_dict()["peak_memory_mb"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measure_sees_memory_the_caching_allocator_reuses():
    device = torch.device("cuda")
    torch.ones(16 * MiB, device=device)  # 64 MiB, freed: the caching allocator keeps the block
    with measure(PassCounter(), device) as cost:
        torch.ones(16 * MiB, device=device)  # reuses it
    assert cost.peak_memory_mb == 64
