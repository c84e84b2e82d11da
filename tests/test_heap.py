"""The C heap keeps freed tensor memory for reuse, and hands it back when asked."""

from __future__ import annotations

import os
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
