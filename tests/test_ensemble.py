"""Ensembles (``mean:eap,eap-ig``): the mean of the parts' scores, each divided by its largest
|score|, checked against the parts run separately and against hand-made scores."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from circuits import cli
from circuits.api import score
from circuits.errors import OptionError
from circuits.methods import METHODS, MethodSpec, Option, get_method, run_method
from circuits.progress import Checkpoint
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_gpt2


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=40, seed=0)
    return Setup(model, [make_batch(b=3, seed=0), make_batch(b=2, seed=1)], "logit-diff")


def by_hand(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Scores divided by the largest |score| on the graph's edges."""
    return values / values[valid].abs().max()


def test_two_methods_average_their_separately_normalised_scores(setup):
    eap = run_method("eap", setup)
    eap_ig = run_method("eap-ig", setup, steps=3)
    both = run_method("mean:eap,eap-ig", setup, steps=3)
    valid = setup.graph.valid
    expected = (by_hand(eap.values, valid) + by_hand(eap_ig.values, valid)) / 2
    torch.testing.assert_close(both.values, expected, rtol=1e-5, atol=1e-6)
    assert both.method == "mean:eap,eap-ig" and both.level == "edge"
    assert both.options["steps"] == 3
    parts = both.extra["parts"]
    assert list(parts) == ["eap", "eap-ig"]
    # --steps went to the part that takes it and not to the other
    assert parts["eap"]["options"] == {} and parts["eap-ig"]["options"] == {"steps": 3}
    assert parts["eap-ig"]["scale"] == pytest.approx(float(eap_ig.values[valid].abs().max()))
    # the passes are the parts' passes added up (each part ran once)
    assert both.cost.forward == pytest.approx(eap.cost.forward + eap_ig.cost.forward)
    assert both.cost.backward == pytest.approx(eap.cost.backward + eap_ig.cost.backward)


def test_one_part_is_that_method_normalised(setup):
    eap = run_method("eap", setup)
    alone = run_method("mean:eap", setup)
    torch.testing.assert_close(alone.values, by_hand(eap.values, setup.graph.valid))
    assert float(alone.values.abs().max()) == pytest.approx(1.0)


def _fixed(values: torch.Tensor):
    """A method returning `values` whatever it is given (and recording its option)."""
    seen: dict = {}

    def fn(setup, k: int = 1):
        seen["k"] = k
        return values.clone()

    return fn, seen


@pytest.fixture
def fakes(monkeypatch, setup):
    """Two registered edge methods with hand-made scores: 'fake-a' takes option k."""
    shape = setup.graph.valid.shape
    a = torch.zeros(shape)
    b = torch.zeros(shape)
    (i0, j0), (i1, j1), (i2, j2), (i3, j3) = setup.graph.valid.nonzero()[:4].tolist()
    a[i0, j0], a[i1, j1], a[i2, j2], a[i3, j3] = 2.0, -4.0, math.nan, math.nan
    b[i0, j0], b[i1, j1], b[i2, j2], b[i3, j3] = 10.0, math.nan, 5.0, math.nan
    fn_a, seen = _fixed(a)
    fn_b, _ = _fixed(b)
    for name, fn, params in (("fake-a", fn_a, (Option("k", "int", "k", 1, low=1),)),
                             ("fake-b", lambda setup: b.clone(), ())):
        monkeypatch.setitem(METHODS, name, MethodSpec(name, fn, "edge", name, "none",
                                                      params=params))
    return (i0, j0), (i1, j1), (i2, j2), (i3, j3), seen


def test_hand_made_scores_and_partial_nan(setup, fakes):
    e0, e1, e2, e3, seen = fakes
    mean = run_method("mean:fake-a,fake-b", setup, k=3)
    assert seen["k"] == 3  # the option reached the part that takes it
    # a is divided by 4, b by 10; where one part is NaN the other alone counts
    assert mean.values[e0].item() == pytest.approx((2 / 4 + 10 / 10) / 2)
    assert mean.values[e1].item() == pytest.approx(-4 / 4)
    assert mean.values[e2].item() == pytest.approx(5 / 10)
    assert math.isnan(mean.values[e3].item())  # NaN only where every part is
    assert int(mean.values.isnan().sum()) == 1
    assert not bool(mean.values[~setup.graph.valid].any())  # 0 off the graph's edges


@pytest.mark.parametrize("name, words", [
    ("mean:eap,activation-patching", ("mixes edge-level", "activation-patching")),
    ("mean:eap,eap-igg", ("unknown method 'eap-igg'", "eap-ig")),
    ("mean:eap,eap", ("twice",)),
    ("mean:", ("bad ensemble",)),
    ("mean:eap,,eap-ig", ("bad ensemble",)),
    ("mean:mean:eap", ("not ensembles",)),
])
def test_bad_ensembles_fail_in_one_line(name, words):
    with pytest.raises(OptionError) as err:
        get_method(name)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_api_checks_the_ensemble_and_its_options_before_loading():
    # the model name does not exist: the error must come before it is looked for
    with pytest.raises(OptionError, match="mixes edge-level"):
        score("ioi", "no-such-model", method="mean:eap,activation-patching")
    with pytest.raises(OptionError, match="has no option 'threshold'"):
        score("ioi", "no-such-model", method="mean:eap,eap-ig", threshold=0.1)
    with pytest.raises(OptionError, match="steps must be"):
        score("ioi", "no-such-model", method="mean:eap,eap-ig", steps=0)


def test_parts_resume_from_their_own_progress(setup, tmp_path):
    batches = setup.batches
    first = Setup(setup.model, batches, "logit-diff")
    first.checkpoint = Checkpoint(tmp_path, {"demo": 1}, every=0)
    done = run_method("mean:exact,eap-ig", first, steps=2)
    assert {p.name for p in tmp_path.glob("*.safetensors")} == {"exact.safetensors",
                                                                "eap-ig.safetensors"}
    again = Setup(setup.model, batches, "logit-diff")
    again.checkpoint = Checkpoint(tmp_path, {"demo": 1}, resume=True)
    resumed = run_method("mean:exact,eap-ig", again, steps=2)
    assert torch.equal(resumed.values, done.values)
    assert resumed.cost.forward < done.cost.forward  # the parts' finished sums were read back


def test_discover_writes_the_usual_files_for_an_ensemble(tmp_path):
    out = tmp_path / "ens"
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["discover", "ioi", "--n", "8", "--method", "mean:eap,eap-ig",
                         "--steps", "2", "--select", "topk:10", "--out", str(out)])
    assert code == 0
    assert {"circuit.json", "scores.json", "circuit.svg", "circuit.png", "circuit.html",
            "report.md"} <= {p.name for p in out.iterdir()}
    doc = json.loads((out / "scores.json").read_text("utf-8"))
    assert doc["method"] == "mean:eap,eap-ig" and doc["options"]["steps"] == 2
    finite = [v for v in doc["scores"].values() if v is not None]
    assert max(abs(v) for v in finite) <= 1.0 + 1e-6
