"""Steering vectors: directions from contrastive pairs, the scale sweep, generation, ``circuits
steer``.

The planted-direction model (`circuits.representations.planted`) writes a known unit vector
``v`` for positive words and reads the logit difference ``yes - no`` as ``2 beta v . ln_f(h)``
off the final residual ``h``: difference of means and PCA must find ``v``, and steering at the
last layer must move the metric exactly as ``ln_f`` and the unembedding applied by hand to
``h + c v`` say. Generation through the KV cache is checked against a greedy loop that runs
the whole sequence every step (where a forward's positions are the tokens' positions).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import run

from circuits.errors import CircuitFileError, OptionError, TaskError
from circuits.features.sites import read_sites, site_of, spliced
from circuits.representations.effects import add_direction
from circuits.representations.planted import planted_direction
from circuits.representations.steer import (
    Direction,
    contrast_direction,
    find_direction,
    read_contrast,
    steering_edit,
)
from circuits.representations.steer_report import (
    SteerSweep,
    generate,
    parse_scales,
    steering_sweep,
)
from circuits.testing import model_folder, tiny_gpt2

#: tiny tensors: a second thread only adds contention on a shared machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted():
    return planted_direction()


NEUTRAL = ["the word is ant and the word is cup and a new word is fox"] * 8


# -- the direction math ---------------------------------------------------------------------------
def test_directions_of_a_hand_case():
    # pairs differ by (2, +-0.5): the mean difference is (2, 0); the differences' second moment
    # is diag(4, 0.25), so the first principal component is (1, 0) as well
    neg = torch.tensor([[0.0, 1.0], [3.0, -1.0], [1.0, 0.0], [5.0, 2.0]])
    pos = neg + torch.tensor([[2.0, 0.5], [2.0, -0.5], [2.0, 0.5], [2.0, -0.5]])
    for method in ("mean", "pca"):
        assert torch.allclose(contrast_direction(pos, neg, method), torch.tensor([1.0, 0.0]))
        # the sign follows the sides, not the order of the SVD
        assert torch.allclose(contrast_direction(neg, pos, method), torch.tensor([-1.0, 0.0]))
    # a pair-wise difference orthogonal to the mean one: PCA finds it, the mean does not
    skew = neg + torch.tensor([[1.0, 3.0], [1.0, -3.0], [1.0, 3.0], [1.0, -3.0]])
    assert torch.allclose(contrast_direction(skew, neg, "mean"), torch.tensor([1.0, 0.0]))
    # differences (0.1, +-3): their first principal component (0, 1) is orthogonal to the
    # mean difference (0.1, 0), so it cannot be signed
    with pytest.raises(OptionError, match="does not separate"):
        contrast_direction(skew - torch.tensor([0.9, 0.0]), neg, "pca")
    with pytest.raises(OptionError, match="do not differ"):
        contrast_direction(neg, neg.clone())
    with pytest.raises(OptionError, match="pairs need"):
        contrast_direction(pos[:3], neg)
    with pytest.raises(OptionError, match="finite"):
        contrast_direction(pos * float("nan"), neg)


@pytest.mark.parametrize("method", ["mean", "pca"])
def test_the_planted_direction_is_recovered(planted, method):
    labels = read_contrast(planted.labeled, classes=("pos", "neg"))
    task = read_contrast(planted.task)
    assert not labels.paired and task.paired
    for pairs in (labels, task):
        for layer in (0, 1):
            d = find_direction(planted.model, pairs, layer, method)
            assert float(d.vector @ planted.direction) >= 0.9, (pairs.name, layer)
            assert d.accuracy == 1.0 and d.separation > 0
    # the classes the other way round give the opposite direction
    flipped = find_direction(planted.model, read_contrast(planted.labeled, classes=("neg", "pos")),
                             1, method)
    assert float(flipped.vector @ planted.direction) <= -0.9


# -- the sweep ------------------------------------------------------------------------------------
def test_steering_moves_the_metric_as_the_construction_predicts(planted):
    model, layer = planted.model, 1  # the last layer: only ln_f and the unembedding follow
    d = find_direction(model, read_contrast(planted.labeled, classes=("pos", "neg")), layer)
    scales = (-3.0, 0.0, 2.0)
    sweep = steering_sweep(model, d, planted.task, scales, NEUTRAL, context=8)
    # by hand: the final residual of each clean prompt's last token, plus c * v, through ln_f
    # and the rows of yes and no
    wte = model.hf.transformer.wte.weight
    yes, no = (model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("yes", "no"))
    site = site_of(model, f"resid.{layer}")
    for i, scale in enumerate(scales):
        predicted = []
        for e in planted.task.examples:
            h = read_sites(model, model.tokenize([e.clean]), [site])[site.name][0, -1]
            with torch.no_grad():
                # scale 1 in the unit 'pairs' adds the separation along the unit vector
                normed = model.hf.transformer.ln_f(h + scale * d.separation * d.vector)
                predicted.append(float(normed @ (wte[yes] - wte[no])))
        assert sweep.metric[i] == pytest.approx(sum(predicted) / len(predicted), abs=1e-4)
    assert sweep.metric[0] < sweep.base_metric < sweep.metric[2]


def test_scale_zero_is_the_unsteered_model_and_kl_grows_with_the_scale(planted):
    d = find_direction(planted.model, read_contrast(planted.task), 0)
    sweep = steering_sweep(planted.model, d, planted.task, "-4:4:5", NEUTRAL, context=8)
    zero = sweep.scales.index(0.0)
    assert sweep.metric[zero] == sweep.base_metric and sweep.kl[zero] == 0.0
    assert sweep.neutral[zero] == sweep.base_neutral and sweep.neutral_kl[zero] == 0.0
    kl = sweep.kl
    assert 0 < kl[zero + 1] < kl[zero + 2] and 0 < kl[zero - 1] < kl[zero - 2]
    assert sweep.neutral_kl[zero + 1] < sweep.neutral_kl[zero + 2]
    data = sweep.to_dict()
    assert [row["scale"] for row in data["sweep"]] == [-4.0, -2.0, 0.0, 2.0, 4.0]
    assert data["sweep"][zero]["added_norm"] == 0.0


def test_scales_parse_and_refuse():
    assert parse_scales("-8,-4,0,4,8") == (-8.0, -4.0, 0.0, 4.0, 8.0)
    assert parse_scales("0:1:3") == (0.0, 0.5, 1.0)
    assert parse_scales("2,2,-1") == (-1.0, 2.0)
    for bad, words in (("", "no scale"), ("1,x", "not understood"), ("nan", "finite"),
                       ("0:1:1", "A:B:N"), ("0:1:x", "A:B:N"), ("0:1:1000", "A:B:N")):
        with pytest.raises(OptionError, match=words):
            parse_scales(bad)


# -- generation -----------------------------------------------------------------------------------
def greedy_without_cache(model, prompt, vector, start, tokens):
    """Greedy continuation that runs the whole sequence each step: a forward's own positions are
    then the tokens' positions, so add_direction from `start` is steering from `start` on."""
    ids = model.tokenize([prompt])
    edit = {site_of(model, "resid.0"): add_direction(vector, 1.0, start)}
    with torch.no_grad(), spliced(model, edit):
        for _ in range(tokens):
            nxt = model.hf(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[0]


def test_generation_steers_absolute_positions_through_the_kv_cache(planted):
    model = planted.model
    d = Direction(planted.direction, 0, "mean", 1.0, 1.0)
    prompt = "the word is ant"  # 4 tokens, no BOS: positions 0-3, generated from 4 on
    plain = generate(model, [prompt], tokens=6)[0]
    assert plain == generate(model, [prompt], d, 0.0, 6)[0] == "yes yes yes yes yes yes"
    zero = Direction(torch.zeros(32), 0, "mean", 1.0, 1.0)
    assert generate(model, [prompt], zero, 5.0, 6)[0] == plain
    for start, text in ((0, "no no no no no no"), (6, "yes yes yes no no no"),
                        (-1, "no no no no no no")):
        got = generate(model, [prompt], d, -8.0, 6, start=start)[0]
        # from position 6 on: the predictions made at positions 6, 7, 8 (the 4th to 6th new
        # tokens) are steered, those at 3, 4, 5 are not
        assert got == text
        at = start if start >= 0 else 4 + start
        reference = greedy_without_cache(model, prompt, d.steering(-8.0), at, 6)
        assert got == model.tokenizer.decode(reference[4:].tolist())


# -- files ----------------------------------------------------------------------------------------
def test_direction_file_round_trip_and_checks(planted, tmp_path):
    d = find_direction(planted.model, read_contrast(planted.task), 1, "pca")
    path = d.save(tmp_path / "direction.safetensors")
    back = Direction.load(path, planted.model)
    assert torch.equal(back.vector, d.vector)
    assert (back.layer, back.method, back.source, back.separation, back.n_positive) == \
        (1, "pca", "task:planted-direction", d.separation, len(planted.task))
    other = planted_direction(seed=1).model
    with pytest.raises(OptionError, match="other weights"):
        Direction.load(path, other)
    Direction.load(path, other, any_model=True)
    with pytest.raises(OptionError, match="width"):
        Direction.load(path, tiny_gpt2(n_embd=16), any_model=True)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(CircuitFileError, match="not a steering direction"):
        Direction.load(tmp_path / "bad.safetensors")


def test_pairs_come_from_files_of_three_kinds(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"positive": "I love it", "negative": "I hate it"}\n\n'
                     '{"positive": "great", "negative": "awful"}\n')
    c = read_contrast(pairs)
    assert c.paired and c.positive.texts == ("I love it", "great")
    task = tmp_path / "task.jsonl"
    task.write_text('{"clean": "a b", "corrupt": "c b", "answer": " x", "wrong": " y"}\n')
    assert read_contrast(task).negative.texts == ("c b",)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                              for t, lab in (("a", "x"), ("b", "y"), ("c", "z"))))
    with pytest.raises(OptionError, match="3 classes"):
        read_contrast(labels)
    assert read_contrast(labels, classes=("z", "x")).positive.texts == ("c",)
    one_side = tmp_path / "one.jsonl"
    one_side.write_text('{"positive": "I love it"}\n')
    with pytest.raises(TaskError, match="positive"):
        read_contrast(one_side)


def test_a_folder_named_like_a_task_does_not_hide_the_task(tmp_path, monkeypatch):
    """An output folder called ioi (as `circuits probe -o ioi` writes) leaves --pairs ioi the
    built-in task; another folder is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ioi").mkdir()
    (tmp_path / "stuff").mkdir()
    assert read_contrast("ioi", n=2).name == "task:ioi"
    with pytest.raises(OptionError, match="is a folder"):
        read_contrast("stuff")


# -- the command ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_cli_on_three_families(family, tmp_path, capsys):
    folder = model_folder(family, tmp_path / "model")
    out = tmp_path / "out"
    argv = ["steer", str(folder), "--pairs", "ioi", "--layer", "1", "--n", "6",
            "--scales=-2,0,2", "--generate", "2", "-o", str(out)]
    if family != "gpt2":  # the package's neutral sample on GPT-2, a text file on the others
        (tmp_path / "neutral.txt").write_text("\n\n".join(NEUTRAL))
        argv += ["--neutral", str(tmp_path / "neutral.txt"), "--method", "pca"]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert "scale" in stdout and "wrote" in stdout
    data = json.loads((out / "steer.json").read_text())
    zero = data["sweep"][1]
    assert zero["scale"] == 0 and zero["kl"] == 0 and zero["metric"] == data["base"]["metric"]
    assert all(math.isfinite(v) for row in data["sweep"] for v in row.values())
    assert data["task"] == "ioi/heldout" and data["direction"]["source"] == "task:ioi/discovery"
    assert len(data["generations"]) == 3 and data["generations"][0]["scales"] == [0, -2, 2]
    report = (out / "report.md").read_text()
    assert "## Generations" in report and "steer.png" in report
    assert (out / "steer.png").stat().st_size > 0
    if family == "gpt2":  # the saved direction, applied again, gives the same sweep
        again = tmp_path / "again"
        code, _, stderr = run(["steer", str(folder), "--direction",
                               str(out / "direction.safetensors"), "--task", "ioi", "--n", "6",
                               "--scales=-2,0,2", "-o", str(again)], capsys)
        assert code == 0, stderr
        rows = json.loads((again / "steer.json").read_text())["sweep"]
        assert rows[0]["added_norm"] == pytest.approx(data["sweep"][0]["added_norm"])


def test_steering_edit_adds_from_the_prompt_end():
    model = tiny_gpt2(n_layer=1, n_embd=16)
    d = Direction(torch.eye(16)[3], 0, "mean", 2.0, 1.0)
    fn = next(iter(steering_edit(model, d, 1.5, start=-2).values()))
    out = fn(None, torch.zeros(1, 4, 16))
    assert out[0, :2].abs().sum() == 0 and torch.equal(out[0, 2:, 3], torch.tensor([3.0, 3.0]))


def test_steering_from_the_prompt_end(planted):
    # at the last layer only the last position reaches the last position's logits, so steering
    # from -1 on moves the metric as steering everywhere; neutral text has no prompt end and is
    # steered throughout
    d = Direction(planted.direction, 1, "mean", 1.0, 1.0)
    every = steering_sweep(planted.model, d, planted.task, "0,4", NEUTRAL, context=8)
    last = steering_sweep(planted.model, d, planted.task, "0,4", NEUTRAL, start=-1, context=8)
    assert last.metric == pytest.approx(every.metric, abs=1e-5)
    assert last.neutral == every.neutral and last.neutral[1] != last.base_neutral
    # from position 2 on, the prompts' last token (position 3) is still steered
    later = steering_sweep(planted.model, d, planted.task, "0,4", NEUTRAL, start=2, context=8)
    assert later.metric == pytest.approx(every.metric, abs=1e-5)
    assert later.neutral[1] != every.neutral[1]


def test_the_report_keeps_generations_in_their_cells():
    d = Direction(torch.tensor([1.0, 0.0]), 0, "mean", 2.0, 4.0, source="task:t")
    sweep = SteerSweep(d, "t", "logit-diff", "pairs", 0, (0.0, 1.0), [1.0, 2.0], [1.0, 1.0],
                       [0.0, 0.1], [2.0, 2.1], [0.0, 0.1], 1.0, 1.0, 2.0, 2, 2)
    sweep.generations = [{"prompt": "a|b", "scales": [0.0, 1.0], "texts": ["<b>x\ny", ""]}]
    row = sweep.markdown().splitlines()[-1]
    assert row == "| a\\|b | &lt;b&gt;x ⏎ y | (nothing) |"
