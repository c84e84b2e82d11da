"""The C heap keeps freed tensor memory for reuse, and hands it back when asked; only the program
and the benchmarks make that setting, never a library call."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuits import heap


def backed(x: torch.Tensor, table: bytearray) -> tuple[int, int]:
    """(pages under `x` that hold memory, pages under `x`), from the kernel's page table of this
    process (/proc/self/pagemap: bit 63 present, bit 62 swapped out or being moved). Read into
    `table`, made beforehand: memory taken from the heap while `x` lives would change where the
    next tensor goes."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, end = -(-x.data_ptr() // page), (x.data_ptr() + x.nbytes) // page
    entries = memoryview(table)[: (end - first) * 8]
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        f.seek(first * 8)
        f.readinto(entries)
    return sum(entry >> 62 != 0 for entry in entries.cast("Q")), end - first


def backed_before_written(table: bytearray) -> float:
    """The share of a new 64 MiB tensor's pages that hold memory before it is written (each
    page not holding any is faulted in and zeroed by the kernel when written); the tensor is
    then written and freed."""
    x = torch.empty(2**24)
    held, pages = backed(x, table)
    x.fill_(1.0)
    del x
    return held / pages


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="reads /proc/self/pagemap")
def test_freed_memory_is_reused_until_released():
    """Read from the page table of this process, which says exactly which pages a new tensor
    finds in place. A count of page faults would also count faults the kernel makes on its own
    (NUMA balancing, pages moved to compact memory), more of them the busier the machine."""
    if not heap.keep_freed_memory():
        pytest.skip("the C library is not glibc")
    # 64 MiB is above glibc's largest default mmap threshold (32 MiB): by default every such
    # tensor is a fresh mapping with no page in it. Kept, the heap can grow for a few rounds
    # before it serves every tensor from pages it holds: glibc cuts a few bytes off a block to
    # align it, and its thread cache holds up to 7 such pieces of a size without merging them
    # back, so until that cache is full a freed block can be a few bytes short of the next
    # tensor. How many rounds that takes depends on what the process did before, so the rounds
    # go on until 3 in a row find their pages in place, 16 at most. The bounds leave a tenth
    # either way.
    table = bytearray(8 * 2**14)  # a pagemap entry for each of its 16,384 pages
    rounds: list[float] = []
    while len(rounds) < 16 and not (len(rounds) >= 3 and min(rounds[-3:]) > 0.9):
        rounds.append(backed_before_written(table))
    assert min(rounds[-3:]) > 0.9, rounds
    heap.release_free_memory()
    after = backed_before_written(table)
    assert after < 0.1, after  # handed back: the pages are faulted in anew


def test_the_settings_can_be_left_alone(monkeypatch):
    monkeypatch.setenv("CIRCUITS_KEEP_FREED_MEMORY", "0")
    heap.keep_freed_memory.cache_clear()
    try:
        assert heap.keep_freed_memory() is False
    finally:
        heap.keep_freed_memory.cache_clear()


# -- who makes the settings ----------------------------------------------------------------------
# Whether a 64 MiB tensor is a mapping of its own, read from glibc's own count of mapped bytes
# (mallinfo2's hblkhd) while the tensor lives: by default every request above 32 MiB (the
# largest threshold glibc's defaults reach) is mapped, while with the settings made it comes
# from the heap. A count, not a time or a resident size: the machine's load cannot move it.
MAPPED = """
import ctypes

import torch

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost").split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def mapped_mib():
    before = libc.mallinfo2().hblkhd
    x = torch.empty(2**24)  # 64 MiB
    during = libc.mallinfo2().hblkhd
    del x
    return (during - before) / 2**20
"""


def run_python(code: str, **env: str) -> list[str]:
    """Run `code` in a fresh interpreter from the repository root; its stdout lines."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", MAPPED + code], capture_output=True, text=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root), **env},
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


glibc = pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"),
                           reason="reads glibc's mallinfo2 (glibc 2.33 or later)")


@glibc
def test_a_library_call_leaves_the_allocator_as_it_was():
    """Building an Engine and running methods through the API change no setting: a freed large
    tensor still goes back to the system at once."""
    lines = run_python("""
import circuits
from circuits.testing import tiny_gpt2
print(mapped_mib())
circuits.Engine(tiny_gpt2(n_layer=2, n_head=2))
circuits.score("planted-mlp", method="eap-ig", steps=2)
circuits.discover("planted-mlp", method="eap", n=16, annotate=False)
print(mapped_mib())
""")
    before, after = map(float, lines[-2:])
    assert before >= 64 and after >= 64, lines


@glibc
@pytest.mark.parametrize(("keep", "want_mapped"), [("1", False), ("0", True)])
def test_the_program_keeps_freed_memory_unless_told_not_to(keep, want_mapped):
    """The ``circuits`` program makes the settings as it starts (measured as it exits);
    ``CIRCUITS_KEEP_FREED_MEMORY=0`` leaves glibc's defaults."""
    lines = run_python("""
import atexit, sys
import circuits_entry
atexit.register(lambda: print(mapped_mib()))
sys.argv = ["circuits", "methods"]
circuits_entry.entry()
""", CIRCUITS_KEEP_FREED_MEMORY=keep)
    assert (float(lines[-1]) >= 64) is want_mapped, lines
