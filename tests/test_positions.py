"""Circuits at positions: the per-position engine against the reference run and a hand patch
through nnsight, position-resolved EAP / EAP-IG / exact patching against their component-level
sums, span aggregation over prompt lengths, and the position graph's files and pruning."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import one_error_line, run

import circuits
from circuits import Batch
from circuits.api import make_setup, task_positions
from circuits.circuit import Circuit, select
from circuits.errors import OptionError, TaskError
from circuits.graph import Graph
from circuits.io import load_circuit
from circuits.methods import run_method
from circuits.positions import PositionGraph, Positions
from circuits.reference import reference_logits
from circuits.setup import Setup
from circuits.task import Example, Task
from circuits.testing import tiny_gpt2, tiny_model, tiny_tokenizer

FAMILIES = {"gpt2": lambda: tiny_gpt2(n_layer=2, n_head=2, vocab_size=32, seed=1),
            "llama-gqa": lambda: tiny_model("llama", vocab_size=32, num_key_value_heads=1),
            "gemma2": lambda: tiny_model("gemma2", vocab_size=32)}
WHERE = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2], [0, 0, 0, 1, 2]])  # 3 positions


def _ids(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 32, (3, 5), generator=g), torch.randint(1, 32, (3, 5), generator=g)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_position_weights_are_the_reference_run(family: str) -> None:
    """Random per-position weights, two variants: the engine's logits are the reference run's,
    which applies each token's weights by their definition."""
    engine = circuits.Engine(FAMILIES[family]())
    g = engine.graph
    ids, corrupt = _ids(0)
    ablated = engine.ablated_outputs(ids, "resample", corrupt=corrupt)
    w = torch.rand(2, 3, g.n_sources, g.n_destinations, generator=torch.Generator().manual_seed(1))
    got = engine.patched_logits(ids, w, ablated, last_only=False, where=WHERE)
    with torch.no_grad():
        want = reference_logits(engine.adapter, g, ids, w, ablated, WHERE)
    assert (got - want).abs().max() < 1e-5 * max(1.0, float(want.abs().max()))
    # the same weights at every position are the ordinary run
    same = engine.patched_logits(ids, w[0, :1].expand(3, -1, -1), ablated, where=WHERE)
    assert torch.allclose(same, engine.patched_logits(ids, w[0, 0], ablated), atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_eap_at_positions_is_the_gradient_and_sums_to_eap(family: str) -> None:
    """Per-position EAP is the gradient of the metric with respect to per-position weights at
    zero (autograd through the reference run), and its sum over positions is ordinary EAP."""
    engine = circuits.Engine(FAMILIES[family]())
    g = engine.graph
    ids, corrupt = _ids(2)
    ablated = engine.ablated_outputs(ids, "resample", corrupt=corrupt)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 3].mean() - logits[:, 5].mean()

    per = engine.edge_attribution(ids, metric, ablated, where=WHERE, n_positions=3)
    w = torch.zeros(3, g.n_sources, g.n_destinations, requires_grad=True)
    metric(reference_logits(engine.adapter, g, ids, w, ablated, WHERE).view(3, 5, -1)[:, -1]
           ).backward()
    assert torch.allclose(per, w.grad * g.valid, atol=1e-6)
    assert torch.allclose(per.sum(0), engine.edge_attribution(ids, metric, ablated), atol=1e-6)


def _hand_patch_last_mlp(model: circuits.Model, clean: torch.Tensor, corrupt: torch.Tensor,
                         position: int, layer: int) -> torch.Tensor:
    """Last-position logits with MLP `layer`'s output at `position` replaced by the corrupted
    run's, patched by hand through nnsight."""
    envoy = model.envoy
    with torch.no_grad():
        with envoy.trace(corrupt):
            donor = envoy.transformer.h[layer].mlp.output.save()
        with envoy.trace(clean):
            envoy.transformer.h[layer].mlp.output[:, position] = donor[:, position]
            logits = envoy.lm_head.output.save()
    return logits[:, -1]


def test_position_patches_equal_hand_patches_through_nnsight() -> None:
    """Exact patching of the edge (last MLP at the last token -> logits) equals patching that
    MLP's output at the last token through nnsight; ablating every edge out of the first MLP at
    one token (per-position weights) equals patching its output at that token."""
    model = FAMILIES["gpt2"]()
    engine = circuits.Engine(model)
    g = engine.graph
    ids, corrupt = _ids(3)
    where = torch.arange(5).expand(3, 5)
    ablated = engine.ablated_outputs(ids, "resample", corrupt=corrupt)

    def per_variant(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 7].view(-1, 3).mean(1)

    effects = engine.edge_effects(ids, ablated, per_variant, where=where, n_positions=5)
    last = g.mlp_source(1)
    hand = _hand_patch_last_mlp(model, ids, corrupt, 4, 1)[:, 7].mean()
    assert torch.allclose(effects[4, last, -1], hand, atol=1e-5)
    # earlier tokens' edges into the logits change nothing (the metric reads the last token)
    assert torch.allclose(effects[:4, last, -1], per_variant(engine.logits(ids, True)), atol=1e-5)
    for position in (1, 3):
        w = torch.zeros(5, g.n_sources, g.n_destinations)
        w[position, g.mlp_source(0)] = 1.0
        got = engine.patched_logits(ids, w, ablated, where=where)
        want = _hand_patch_last_mlp(model, ids, corrupt, position, 0)
        assert torch.allclose(got, want, atol=1e-5)


def test_exact_at_positions_is_each_edge_at_one_position() -> None:
    """Exact patching at positions: an interior edge at a position equals the metric with that
    edge alone ablated at that position (per-position weights), and positions without tokens
    change nothing."""
    engine = circuits.Engine(FAMILIES["llama-gqa"]())
    g = engine.graph
    ids, corrupt = _ids(4)
    ablated = engine.ablated_outputs(ids, "resample", corrupt=corrupt)
    where = WHERE.clone()
    where[where == 1] = 3  # position 1 has no token; 4 positions

    def per_variant(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 7].view(-1, 3).mean(1)

    effects = engine.edge_effects(ids, ablated, per_variant, where=where, n_positions=4)
    clean = per_variant(engine.logits(ids, True))
    assert torch.allclose(effects[1][g.valid], clean.expand(g.n_edges), atol=1e-6)
    for edge in ("input->a1.kv0<k>", "a0.h1->a1.h0<q>", "m0->a1.kv0<v>", "a0.h0->logits"):
        s, d = g.edge_index(edge)
        for k in (0, 2, 3):
            w = torch.zeros(4, g.n_sources, g.n_destinations)
            w[k, s, d] = 1.0
            want = per_variant(engine.patched_logits(ids, w, ablated, where=where))
            assert torch.allclose(effects[k, s, d], want, atol=1e-5), (edge, k)


@pytest.fixture(scope="module")
def ioi() -> tuple[circuits.Model, Task]:
    model = circuits.load_model("ioi-gpt2-4l")
    return model, circuits.get_task("ioi", model.tokenizer, n=12, seed=3)


@pytest.mark.parametrize("method", ["eap", "eap-ig", "eap-ig-activations"])
def test_methods_at_spans_sum_to_the_component_scores(ioi, method: str) -> None:
    """On IOI's spans (IO, S1, S2, END, other), an attribution's scores at positions summed over
    the positions are its component-level scores (each is a sum of per-token products; exact
    patching is not additive over positions, and is checked edge by edge above)."""
    model, task = ioi
    positions = task_positions(task, model)
    assert positions.labels == ("IO", "S1", "S2", "END", "other")
    options = {} if method == "eap" else {"steps": 3}
    at = run_method(method, make_setup(model, task, positions=positions), **options)
    plain = run_method(method, make_setup(model, task), **options)
    g = at.graph
    assert isinstance(g, PositionGraph) and at.values.shape == g.valid.shape
    summed = g.blocks(at.values).sum(0)
    scale = float(plain.values.abs().max())
    assert (summed - plain.values).abs().max() < 1e-5 * scale


@pytest.mark.parametrize("method", ["eap", "exact"])
def test_span_aggregation_over_two_lengths_adds_the_lengths(ioi, method: str) -> None:
    """Prompts of different lengths aggregate at spans: the scores of the whole task are the
    scores of each length's prompts alone, weighted by their share of the prompts."""
    model, task = ioi
    positions = task_positions(task, model)
    lengths: dict[int, list[Example]] = {}
    for ex in task.examples:
        lengths.setdefault(len(model.tokenizer.encode(ex.clean)), []).append(ex)
    assert len(lengths) >= 2
    whole = run_method(method, make_setup(model, task, positions=positions)).values
    parts = torch.zeros_like(whole)
    for examples in lengths.values():
        part = Task("part", examples, task.metric)
        parts += len(examples) / len(task) * run_method(
            method, make_setup(model, part, positions=positions)).values
    assert (whole - parts).abs().max() < 1e-5 * float(whole.abs().max())


def test_circuit_at_positions_evaluates_saves_and_loads(ioi, tmp_path) -> None:
    """A circuit at spans: the whole graph is faithful 1, the empty one 0; selection prunes to
    input -> logits paths (an input token at any position starts one); the file records the
    positions and reads back the same; MIB's format refuses positions."""
    model, task = ioi
    setup = make_setup(model, task, positions=task_positions(task, model))
    scores = run_method("eap", setup)
    g = scores.graph
    assert g.n_edges == (Graph.edge_count(4, 4) - g.base.n_sources) * 5 + g.base.n_sources
    assert Circuit(g, g.valid).evaluate(setup)["faithfulness"] == pytest.approx(1.0)
    c = select(scores, top_k=60)
    assert 0 < c.n_edges <= 60
    assert all("@" in e.source for e in c.edges())
    assert any(not e.source.startswith("input@IO") for e in c.edges() if
               e.source.startswith("input"))
    path = c.save(tmp_path / "c.json")
    doc = json.loads(path.read_text("utf-8"))
    assert doc["graph"]["positions"]["labels"] == ["IO", "S1", "S2", "END", "other"]
    back = load_circuit(path)
    assert torch.equal(back.mask, c.mask) and torch.equal(back.values, c.values)
    assert back.graph.positions.labels == g.positions.labels
    with pytest.raises(OptionError, match="no positions"):
        c.export(tmp_path / "c.mib.json", format="mib", d_model=64)


def test_pruning_follows_attention_across_positions() -> None:
    """A key input at an earlier position lies on a path to the logits through the same head
    at a later position; a query input at that earlier position does not."""
    base = Graph(1, 1)
    p = Positions(("0", "1"), "tokens", torch.ones(2, 2).triu().bool(),
                  torch.tensor([False, True]))
    g = PositionGraph(base, p)
    kept = Circuit(g, g.mask_from_edges(["input@0->a0.h0@0<k>", "a0.h0@1->logits",
                                         "input@1->a0.h0@1<q>"]))
    assert kept.n_edges == 3
    dropped = Circuit(g, g.mask_from_edges(["input@0->a0.h0@0<q>", "a0.h0@1->logits",
                                            "input@1->a0.h0@1<q>"]))
    assert dropped.n_edges == 2
    values = torch.randn(2, base.n_sources, base.n_destinations) * base.valid
    values[0, :, -1] = 0  # the logits are read at the last position only
    assert torch.equal(g.blocks(g.expand(values)), values)


def test_positions_need_one_length_or_spans() -> None:
    tok = tiny_tokenizer()
    mixed = Task("t", [Example("a b c", "c b a", " d", " e"), Example("a b", "b a", " d", " e")])
    with pytest.raises(TaskError, match="one length"):
        Positions.tokens(mixed, tok)
    spans = Task("t", [Example("a b c", "c b a", " d", " e", spans={"X": (0, 1)}),
                       Example("a b", "b a", " d", " e", spans={"X": (1, 2)})])
    p = Positions.spans(spans, tok)
    assert p.labels == ("X", "other")
    # X is at token 0 in one prompt and token 1 in the other; other tokens come before and after
    assert p.reach.tolist() == [[True, True], [True, True]]
    batches = spans.batches(tok, positions=p)
    assert [b.where.tolist() for b in batches] == [[[1, 0]], [[0, 1, 1]]]
    with pytest.raises(OptionError, match="does not score edges at positions"):
        run_method("acdc", Setup(tiny_gpt2(vocab_size=32), [Batch(
            torch.tensor([[1, 2, 3]]), torch.tensor([[3, 2, 1]]), torch.tensor([[4]]),
            torch.tensor([[5]]), where=torch.tensor([[0, 1, 1]]))], "logit-diff", positions=p))


def test_discover_positions_writes_circuit_page_and_diagram(tmp_path, capsys) -> None:
    """``circuits discover ioi --positions``: the files name components at spans, the page and
    the diagram show them, and ``circuits evaluate`` evaluates the circuit at its positions."""
    out = tmp_path / "out"
    code, _, err = run(["discover", "ioi", "--method", "eap", "--positions", "--n", "24",
                        "--out", str(out)], capsys)
    assert code == 0, err
    doc = json.loads((out / "circuit.json").read_text("utf-8"))
    assert doc["graph"]["positions"]["kind"] == "spans"
    kept = [name for name, e in doc["edges"].items() if e["in_circuit"]]
    assert kept and all("@" in name.split("->")[0] for name in kept)
    page = (out / "circuit.html").read_text("utf-8")
    assert "@END" in page and '"positions": true' in page.replace('"positions":true',
                                                                  '"positions": true')
    assert "@END" in (out / "circuit.svg").read_text("utf-8")
    code, text, err = run(["evaluate", str(out / "circuit.json"), "--n", "24"], capsys)
    assert code == 0, err
    assert "faithfulness" in text
    # another selection from the saved scores, at the same positions
    code, _, err = run(["select", str(out / "scores.json"), "--select", "topk:20", "--out",
                        str(tmp_path / "sel")], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "sel" / "circuit.json").read_text("utf-8"))
    assert again["graph"] == doc["graph"]
    assert 0 < sum(e["in_circuit"] for e in again["edges"].values()) <= 20
    code, _, err = run(["mib-score", str(out / "scores.json"), "--n", "8"], capsys)
    assert code == 2
    one_error_line(err, "at positions", "without --positions")


def test_spans_are_kept_in_task_files_and_digests(tmp_path) -> None:
    """Spans survive a task file's round trip; the prompts' digest covers them only for runs at
    positions, so files saved before spans existed still match their prompts."""
    from circuits.commands.common import prompts_digest

    ex = Example("a b c", "c b a", " d", " e", spans={"X": (1, 2)})
    task = Task("t", [ex])
    task.to_jsonl(tmp_path / "t.jsonl")
    back = Task.from_jsonl(tmp_path / "t.jsonl")
    assert back.examples[0].spans == {"X": (1, 2)}
    bare = Task("t", [Example("a b c", "c b a", " d", " e")])
    assert prompts_digest(task) == prompts_digest(bare)
    assert prompts_digest(task, spans=True) != prompts_digest(bare, spans=True)


def test_evaluation_at_positions_skips_only_what_is_clean(ioi) -> None:
    """Faithfulness runs share the prompts' clean prefix and read only the answer columns; a
    random circuit at spans gives the metric of one plain per-position patched run."""
    from circuits.faithfulness import metric_of_masks

    model, task = ioi
    setup = make_setup(model, task, positions=task_positions(task, model))
    g = setup.graph
    mask = g.valid & (torch.rand(g.valid.shape, generator=torch.Generator().manual_seed(0)) < 0.7)
    got = metric_of_masks(setup, mask[None], per_prompt=True)[0]
    want = []
    for batch, ablated, _ in setup.items(reuse=True):
        assert setup.prefix(batch) > 0  # the shortcut is taken
        ablate = g.blocks(g.valid & ~mask).float()
        logits = setup.engine.patched_logits(batch.clean, ablate, ablated, where=batch.where)
        want.append(setup.metric_values(logits, batch).double())
    assert torch.allclose(got, torch.cat(want), atol=1e-4)
