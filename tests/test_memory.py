"""Memory bounded by the batch: the spilling store, streamed and kept ablated outputs, and peak
memory of EAP-IG that does not grow with the number of prompts."""

from __future__ import annotations

import doctest
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import circuits.store
from circuits.errors import OptionError
from circuits.evaluate import metric_of_masks
from circuits.methods import run_method
from circuits.setup import Setup
from circuits.store import Store
from circuits.testing import make_batch, tiny_gpt2

PROBE = Path(__file__).with_name("memory_probe.py")


@pytest.fixture
def tmp_tempdir(tmp_path, monkeypatch) -> Path:
    """Temporary directories (spilled stores) go under tmp_path for the test's duration."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def stores_in(path: Path) -> list[Path]:
    return list(path.glob("circuits-store-*"))


def setup_of(ablation: str = "resample", budget: int | None = None, n_batches: int = 3) -> Setup:
    model = tiny_gpt2(n_layer=2, n_head=2, vocab_size=40)
    batches = [make_batch(b=3, p=5, vocab=40, seed=s) for s in range(n_batches)]
    options = {} if budget is None else {"memory_budget": budget}
    return Setup(model, batches, "logit-diff", ablation=ablation, **options)


# -- the store -----------------------------------------------------------------------------------
def test_store_keeps_values_in_memory_under_the_budget(tmp_tempdir):
    values = [torch.randn(4, 8) for _ in range(3)]  # 128 bytes each
    with Store(budget=3 * 128) as store:
        for v in values:
            store.append(v)
        assert (store.in_memory, store.on_disk, store.nbytes) == (3, 0, 3 * 128)
        assert all(store[i] is v for i, v in enumerate(values))
    assert not stores_in(tmp_tempdir)


def test_store_spills_beyond_the_budget_and_round_trips_exactly(tmp_tempdir):
    gen = torch.Generator().manual_seed(0)
    outs = torch.randn(5, 2, 3, 4, generator=gen, dtype=torch.float64)
    trace = {"outs": outs, "resid": {0: outs[0], 3: torch.randn(2, 3, 4, generator=gen)},
             "logits": torch.randn(2, 7, generator=gen).half()}
    values = [torch.randn(6, generator=gen), trace, torch.arange(10)]
    store = Store(budget=100)
    for v in values:
        store.append(v)
    assert (len(store), store.in_memory, store.on_disk) == (3, 1, 2)  # 24 bytes fit, the rest not
    assert len(list(stores_in(tmp_tempdir)[0].iterdir())) == 2
    assert torch.equal(store[0], values[0])
    got = store[1]
    assert set(got) == {"outs", "resid", "logits"} and set(got["resid"]) == {0, 3}
    for new, old in [(got["outs"], outs), (got["resid"][0], outs[0]),
                     (got["resid"][3], trace["resid"][3]), (got["logits"], trace["logits"])]:
        assert new.dtype == old.dtype and torch.equal(new, old)
    assert torch.equal(store[2], values[2]) and torch.equal(list(store)[2], values[2])
    store.close()
    assert not stores_in(tmp_tempdir) and len(store) == 0


def test_store_files_are_deleted_when_it_is_garbage_collected(tmp_tempdir):
    store = Store(budget=0)
    store.append(torch.ones(3))
    assert len(stores_in(tmp_tempdir)) == 1
    del store
    gc.collect()
    assert not stores_in(tmp_tempdir)


def test_a_negative_budget_is_an_option_error():
    with pytest.raises(OptionError, match="memory budget"):
        Store(budget=-1)
    with pytest.raises(OptionError, match="memory budget"):
        setup_of(budget=-1)


def test_store_docstring_example_runs():
    assert doctest.testmod(circuits.store).failed == 0


# -- the setup's items ---------------------------------------------------------------------------
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
@pytest.mark.parametrize("budget", [None, 0])
def test_streamed_and_kept_items_equal_the_ablated_outputs(ablation, budget, tmp_tempdir):
    """What `items` yields, streamed or kept (in memory or on disk), is bit for bit what the
    engine computes for each batch (what the Setup used to hold for every batch at once)."""
    setup = setup_of(ablation, budget)
    engine = setup.engine
    expected = [engine.ablated_outputs(b.clean, ablation, corrupt=b.corrupt, mean=setup.mean)
                for b in setup.batches]
    for reuse in (False, True, True, False):
        got = list(setup.items(reuse=reuse))
        assert [b for b, _, _ in got] == setup.batches
        assert [w for _, _, w in got] == setup.weights
        assert all(torch.equal(a, e) for (_, a, _), e in zip(got, expected, strict=True))
    setup.close()
    assert not stores_in(tmp_tempdir)


def forwards_of(setup: Setup, reuse: bool, stop: int | None = None) -> float:
    """The forward passes the engine counts for a pass over `items` (the first `stop` only)."""
    before = setup.engine.passes.forward
    for i, _ in enumerate(setup.items(reuse=reuse)):
        if i + 1 == stop:
            break
    return setup.engine.passes.forward - before


def test_streamed_items_rerun_the_corrupted_forward_and_kept_ones_do_not():
    setup = setup_of("resample", n_batches=2)
    once = forwards_of(setup, False)  # the corrupted forward of every batch
    assert once > 0 and forwards_of(setup, False) == once
    assert forwards_of(setup, True) == once
    assert forwards_of(setup, True) == 0 and forwards_of(setup, False) == 0
    setup.close()
    assert forwards_of(setup, False) == once


def test_kept_items_resume_after_a_partial_pass():
    setup = setup_of("resample", budget=0)
    all_three = forwards_of(setup, False)
    assert forwards_of(setup, True, stop=1) == all_three / 3
    assert forwards_of(setup, True) == 2 * all_three / 3  # batches 2 and 3 only
    assert forwards_of(setup, True) == 0


def test_results_do_not_depend_on_the_memory_budget(tmp_tempdir):
    """ACDC (clean traces and ablated outputs kept) and repeated mask evaluation give the same
    values bit for bit whether everything stays in memory or everything is spilled to disk."""
    results = []
    for budget in (None, 0):
        setup = setup_of("resample", budget)
        g = setup.graph
        acdc = run_method("acdc", setup, threshold=0.001, progress=False)
        masks = torch.rand(4, *g.valid.shape, generator=torch.Generator().manual_seed(0)) > 0.5
        results.append((acdc.values, acdc.extra["kept"], metric_of_masks(setup, masks),
                        metric_of_masks(setup, masks)))
        setup.close()
    same = [torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
            for a, b in zip(*results, strict=True)]  # ACDC's never-evaluated edges are NaN
    assert all(same)
    assert torch.equal(results[0][2], results[0][3])
    assert not stores_in(tmp_tempdir)


# -- peak memory ---------------------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_eap_ig_peak_memory_does_not_grow_with_the_number_of_prompts():
    """EAP-IG on 4x the prompts, same batch size, each in a fresh process: the peak memory the
    run adds grows by less than six batches' ablated outputs. One batch's are 37 sources x 8
    prompts x 64 positions x 256 x 4 bytes = 18.5 MiB; keeping every batch's, as the Setup used
    to, would hold 24 more of them with 256 prompts than with 64 (444 MiB), four times the
    bound. The runs start at 64 prompts: below that, which allocations the heap can reuse varies
    by tens of MiB, the size of the whole run's peak (about 200 MiB). At 64 and 256 prompts each
    figure still spreads over up to 45 MiB from run to run, hence six batches (111 MiB)."""
    batch_mib = 37 * 8 * 64 * 256 * 4 / 2**20
    runs = [subprocess.Popen([sys.executable, str(PROBE), str(n), "8", "64"],
                             stdout=subprocess.PIPE, text=True) for n in (64, 256)]
    # a guard against a hung probe, not a time limit: on a loaded machine each takes minutes
    small, large = [json.loads(run.communicate(timeout=1800)[0]) for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert large["growth_mib"] - small["growth_mib"] < 6 * batch_mib, (small, large)
