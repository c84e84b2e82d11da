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


# The files that take longest (minutes on one core), longest first. Under `--dist loadfile`
# a file is one unit of work that one worker runs to the end; pytest-xdist hands out the files
# with the most tests first, which put the README test (two tests, six minutes) near the end of
# the queue and left the other worker idle for minutes at the end. Handed out first instead,
# they run while the many short files fill in around them.
LONGEST_FIRST = ("tests/test_readme.py", "tests/test_distributed.py", "tests/test_editing.py",
                 "tests/test_notebooks.py", "tests/test_device_map.py")


def pytest_configure(config):
    """Under pytest-xdist each worker gets one CPU thread (and so do the programs the tests
    start), so that two workers on two cores do not each run two threads: oversubscribed
    cores make torch many times slower. The controller keeps the file order that
    `pytest_collection_modifyitems` makes."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[name] = "1"
        torch.set_num_threads(1)
    elif getattr(config.option, "dist", "no") in ("loadfile", "loadscope"):
        # xdist's own reordering (most tests first) would undo the longest-first order
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the files of LONGEST_FIRST first, then those with a test marked
    slow, then the rest with the most tests first (xdist's own rule); a file's tests stay
    together and in their order."""
    import os

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def rank(name: str) -> tuple[int, int, int]:
        first = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        slow = any(item.get_closest_marker("slow") for item in files[name])
        return first, 0 if slow else 1, -len(files[name])

    items[:] = [item for name in sorted(files, key=rank) for item in files[name]]
