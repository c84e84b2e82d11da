"""What a method costs: passes as forward-equivalents over the prompt set, counted by the
executors in one PassCounter and reported per prompt by `measure` (peak memory is checked in
test_cost_memory.py).

A pass is the rows run through the model's stages divided by (prompts x stages): one plain
forward of every prompt is 1, C variants of every prompt run from the middle of the model are
C / 2. With S stages (embedding, attention and MLP of each layer, unembedding), a run that
starts at stage s goes through (S - s) / S of the model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from circuits.batch import Batch
from circuits.cost import Cost, PassCounter, measure
from circuits.methods import run_method
from circuits.setup import Setup
from circuits.testing import tiny_gpt2


def float64_setup(sizes: tuple[int, ...] = (3, 2)) -> Setup:
    """A 2-layer, 2-head random GPT-2 in float64 (so that runs batched differently agree to the
    last float32 bit) with batches of these sizes; weights 10x GPT-2's init so that edges
    matter."""
    model = tiny_gpt2(n_layer=2, n_head=2, vocab_size=24, initializer_range=0.2)
    model.hf.double()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b in sizes:
        clean = torch.randint(0, 24, (b, 5), generator=gen)
        corrupt = torch.randint(0, 24, (b, 5), generator=gen)
        answers = torch.randint(0, 24, (b, 1), generator=gen)
        batches.append(Batch(clean, corrupt, answers, (answers + 1) % 24))
    return Setup(model, batches, "logit-diff")


PROMPTS = 5


def n_stages(setup: Setup) -> int:
    return setup.graph.logits_stage + 1


def from_each_destination(setup: Setup, after: bool) -> float:
    """Sum over the graph's edges of the share of the model from the edge's destination stage
    on (or from just after it, with `after`)."""
    g, S = setup.graph, n_stages(setup)
    stages = g.dst_stage[None, :].expand_as(g.valid)[g.valid].double()
    return float(((S - stages - (1 if after else 0)) / S).sum())


# -- Cost, PassCounter, measure -----------------------------------------------------------------
def test_counter_adds_rows_times_the_share_of_the_model():
    counter = PassCounter()
    counter.add_forward(6)
    counter.add_forward(4, fraction=0.25)
    counter.add_backward(3, fraction=0.5)
    assert (counter.forward, counter.backward) == (7.0, 1.5)


def test_measure_counts_only_its_block_per_prompt():
    counter = PassCounter(forward=100.0, backward=10.0)  # runs before the block don't count
    with measure(counter, prompts=4) as cost:
        counter.add_forward(8, fraction=0.5)
        counter.add_backward(4)
    counter.add_forward(50)  # nor runs after it
    assert (cost.forward, cost.backward) == (1.0, 1.0)
    assert cost.seconds > 0


def test_measure_fills_the_cost_when_the_block_fails():
    counter = PassCounter()
    with pytest.raises(RuntimeError), measure(counter, prompts=2) as cost:
        counter.add_forward(2)
        raise RuntimeError("the method broke")
    assert cost.forward == 1.0


def test_cost_as_dict_is_plain_json():
    # scores.json and the bench CSV carry it: no NaN (invalid JSON) even when memory was not
    # measured
    cost = Cost(forward=1 / 3, backward=2.0, seconds=0.123456, peak_memory_mb=math.nan)
    doc = json.loads(json.dumps(cost.as_dict(), allow_nan=False))
    assert doc["forward"] == pytest.approx(1 / 3, abs=1e-3) and doc["backward"] == 2.0
    assert doc["seconds"] == pytest.approx(0.123456, abs=1e-4)


# -- what the runs count ------------------------------------------------------------------------
def test_one_plain_trace_of_every_prompt_counts_one():
    setup = float64_setup()
    engine = setup.engine
    with measure(engine.passes, prompts=PROMPTS) as cost:
        for batch in setup.batches:
            engine.trace(batch.clean)
    assert (cost.forward, cost.backward) == (1.0, 0.0)


def test_a_restart_counts_the_share_of_the_model_it_runs():
    setup = float64_setup()
    engine, g = setup.engine, setup.graph
    stage = g.attn_stage(1)  # 2 layers: S = 6 stages; attention of layer 1 is stage 3
    assert (n_stages(setup), stage) == (6, 3)
    C = 4
    ablate = torch.zeros(C, g.n_sources, g.n_destinations)
    ablate[:, 0, g.dst_index["a1.h0<q>"]] = torch.linspace(0.25, 1, C)
    with measure(engine.passes, prompts=PROMPTS) as cost:
        for batch, ablated, _ in setup.items(reuse=True):
            trace = engine.trace(batch.clean)  # 1
            engine.patched_logits(batch.clean, ablate, ablated, start=(stage, trace))
    # 1 corrupted trace for the ablated outputs, 1 clean trace, then C variants of every
    # prompt through stages 3, 4, 5: C * 3 / 6
    assert cost.forward == pytest.approx(2 + C * 3 / 6)


def test_eap_counts_one_ablated_forward_and_one_forward_backward():
    setup = float64_setup()
    first = run_method("eap", setup).cost
    assert (first.forward, first.backward) == (2.0, 1.0)
    for _ in setup.items(reuse=True):  # keep the ablated outputs, as the benchmark does
        pass
    kept = run_method("eap", setup).cost
    assert (kept.forward, kept.backward) == (1.0, 1.0)


@pytest.mark.parametrize("steps", [1, 3])
def test_eap_ig_counts_its_steps(steps):
    # the ablated forward, the clean trace, and one forward-backward of steps x prompts rows
    cost = run_method("eap-ig", float64_setup(), steps=steps).cost
    assert (cost.forward, cost.backward) == (2.0 + steps, float(steps))


def test_exact_passes_and_scores_do_not_depend_on_the_chunk():
    runs = []
    # all variants into a stage at once, or (3 and 2 prompts, 2 heads) one upstream source at
    # a time
    for chunk in (512, 3):
        setup = float64_setup()
        setup.engine.chunk = chunk
        runs.append(run_method("exact", setup))
    for other in runs[1:]:
        assert other.cost.forward == pytest.approx(runs[0].cost.forward, rel=1e-12)
        assert other.cost.backward == 0
        assert torch.equal(other.values, runs[0].values)


def test_exact_runs_each_edge_from_its_destination_on():
    # Besides its two traces (clean and corrupted), exact patching runs every edge's variant
    # from just after the edge's destination stage to the logits, and computes the
    # destination stage itself for a share of it (queries, keys and values of one upstream
    # change are computed once for all heads): between the two sums below.
    setup = float64_setup()
    cost = run_method("exact", setup).cost
    low = 2 + from_each_destination(setup, after=True)
    high = 2 + from_each_destination(setup, after=False)
    assert low <= cost.forward <= high, (low, cost.forward, high)


def acdc_passes(setup: Setup, scores) -> float:
    """ACDC's passes from its own account: the corrupted and the clean trace, the full
    circuit's loss (one variant at the logits stage), then every variant it evaluated into a
    destination, run from that destination's stage on."""
    g, S = setup.graph, n_stages(setup)
    variants = sum(v["evaluated"] * (S - int(g.dst_stage[g.dst_index[v["destination"]]])) / S
                   for v in scores.extra["visits"])
    return 2 + 1 / S + variants


@pytest.mark.parametrize("threshold, chunk", [(0.0, 8), (0.05, 1), (0.05, 8), (1e9, 8)])
def test_acdc_passes_are_the_variants_it_evaluated(threshold, chunk):
    setup = float64_setup((3,))
    scores = run_method("acdc", setup, threshold=threshold, metric="task", chunk=chunk)
    assert scores.cost.forward == pytest.approx(acdc_passes(setup, scores), rel=1e-12)
    if chunk == 1:  # no speculation: every edge tried is evaluated once
        tried = sum(v["edges"] for v in scores.extra["visits"] if not v["skipped"])
        assert scores.extra["summary"]["evaluated"] == tried


def test_acdc_costs_less_than_exact_only_when_it_prunes():
    """ACDC runs each candidate from its destination's stage on, so trying every edge costs it
    more than exact patching; it saves passes by skipping destinations left without a path to
    the logits."""
    exact = run_method("exact", float64_setup((3,))).cost.forward
    setup = float64_setup((3,))
    everything = run_method("acdc", setup, threshold=1e9, metric="task")
    # every edge into the logits is removed, then every other destination is skipped
    assert everything.extra["summary"]["evaluated"] == setup.graph.n_sources
    assert everything.cost.forward < exact
    setup = float64_setup((3,))
    # |change| < 0 never holds: every edge is tried and kept, no destination is skipped
    nothing = run_method("acdc", setup, threshold=0.0, metric="task", absolute=True)
    assert nothing.extra["summary"]["kept"] == setup.graph.n_edges
    # each edge at least once from its stage on: at least exact's upper bound above
    assert nothing.cost.forward >= 2 + from_each_destination(setup, after=False) >= exact
