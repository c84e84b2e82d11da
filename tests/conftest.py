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


@pytest.fixture
def one_torch_thread():
    """torch on one thread during the test, the thread count restored after. Modules of tiny
    tensors, which a second thread only slows on a shared machine, use it for every test:
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """Under pytest-xdist each worker gets one CPU thread (and so do the programs the tests
    start), so that two workers on two cores do not each run two threads: oversubscribed
    cores make torch many times slower."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = "1"
        torch.set_num_threads(1)
