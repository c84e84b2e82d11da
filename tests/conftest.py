"""Shared fixtures: tiny random GPT-2 models and hand-made batches (no download)."""

from __future__ import annotations

import pytest

from circuits.testing import make_batch, tiny_gpt2


@pytest.fixture
def tiny():
    return tiny_gpt2(n_layer=3, n_head=2, n_embd=16, vocab_size=40, seed=0)


@pytest.fixture
def batch():
    return make_batch()
