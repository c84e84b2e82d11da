"""The C heap keeps freed tensor memory for reuse, and hands it back when asked."""

from __future__ import annotations

import resource

import pytest
import torch

from circuits import heap


def faults_of_a_new_tensor() -> int:
    """Minor page faults of making (every page written) and freeing a 64 MiB tensor."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(2**24)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_memory_is_reused_until_released():
    if not heap.keep_freed_memory():
        pytest.skip("the C library is not glibc")
    # 64 MiB is 16,384 pages of 4 KiB: glibc's default maps and faults them all in every time.
    # Kept, the heap grows a few times (its free blocks are not always where the next tensor
    # fits) and then serves every tensor from pages it has.
    rounds = [faults_of_a_new_tensor() for _ in range(12)]
    assert max(rounds[6:]) < 500, rounds
    heap.release_free_memory()
    assert faults_of_a_new_tensor() > 8000  # handed back: faulted in anew


def test_the_settings_can_be_left_alone(monkeypatch):
    monkeypatch.setenv("CIRCUITS_KEEP_FREED_MEMORY", "0")
    heap.keep_freed_memory.cache_clear()
    try:
        assert heap.keep_freed_memory() is False
    finally:
        heap.keep_freed_memory.cache_clear()
