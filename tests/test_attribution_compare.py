"""Comparing token attributions: deletion and insertion curves worked out by hand, rank
agreement, known tokens on the built-in tasks, the comparison table and plot, and the HTML
view in a headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from circuits import load_model
from circuits.attribution.compare import (
    RANDOM,
    area,
    compare,
    rank_agreement,
    replacement_curves,
)
from circuits.attribution.known import known_mask, known_token_accuracy
from circuits.attribution.methods import attribute
from circuits.attribution.view import PromptView, render_html, token_texts, write_html
from circuits.batch import Batch
from circuits.errors import OptionError
from circuits.task import Example, Task, get_task
from circuits.testing import FAMILIES, NODE_FAMILIES, make_batch, tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLEAN, CORRUPT = 1, 2  # the stand-in's token ids
WEIGHTS = torch.tensor([1.0, 2.0, 3.0, 4.0])  # what each kept clean token adds to the metric


def additive(weights: torch.Tensor, scale: float = 1.0, shift: float = 0.0):
    """A stand-in model: the answer's logit (id 0) is ``scale * sum of weights[i] over the
    positions i that hold the clean token + shift``, the wrong one's (id 1) is 0, so the logit
    difference is exactly that sum."""
    def logits(ids: torch.Tensor) -> torch.Tensor:
        kept = (ids == CLEAN).float() @ weights  # [n]
        return torch.stack([scale * kept + shift, torch.zeros(len(ids))], -1)

    return logits


def batch(p: int = 4, b: int = 1) -> Batch:
    return Batch(torch.full((b, p), CLEAN), torch.full((b, p), CORRUPT),
                 torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.long))


# -- deletion and insertion -----------------------------------------------------------------------
def test_curves_of_an_additive_model_by_hand():
    # Total 10. Perfect order (4, 3, 2, 1) deletes 4, then 3, ...: the metric keeps 10, 6, 3,
    # 1, 0, i.e. 1, .6, .3, .1, 0 of the gap; trapezoid with dx = 1/4:
    # (1/4) (1/2 + .6 + .3 + .1 + 0/2) = 0.375. Insertion restores 4, 3, 2, 1: 0, .4, .7, .9, 1
    # -> (1/4) (0 + .4 + .7 + .9 + 1/2) = 0.625. The reversed order swaps the two numbers.
    curves = replacement_curves(additive(WEIGHTS), batch(), WEIGHTS[None])
    assert curves.deletion[0].tolist() == pytest.approx([1, 0.6, 0.3, 0.1, 0])
    assert curves.insertion[0].tolist() == pytest.approx([0, 0.4, 0.7, 0.9, 1])
    assert curves.deletion_auc.item() == pytest.approx(0.375)
    assert curves.insertion_auc.item() == pytest.approx(0.625)
    assert (curves.clean.item(), curves.corrupt.item()) == (10.0, 0.0)
    reverse = replacement_curves(additive(WEIGHTS), batch(), -WEIGHTS[None])
    assert reverse.deletion_auc.item() == pytest.approx(0.625)
    assert reverse.insertion_auc.item() == pytest.approx(0.375)


def test_perfect_order_beats_every_other_order():
    # For an additive metric the deletion curve after k steps is 1 - (sum of the k weights
    # removed) / total, which no order makes lower than removing the largest first.
    weights = torch.tensor([0.5, 3.0, -1.0, 2.0, 0.25])
    best = replacement_curves(additive(weights), batch(5), weights[None]).deletion_auc.item()
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        other = replacement_curves(additive(weights), batch(5), torch.rand(1, 5, generator=gen))
        assert other.deletion_auc.item() >= best - 1e-12
        # for an additive metric, insertion in an order mirrors deletion in it
        assert (other.deletion + other.insertion)[0].tolist() == pytest.approx([1.0] * 6)


def test_curves_do_not_depend_on_the_metric_scale():
    scaled = replacement_curves(additive(WEIGHTS, scale=7.0, shift=-3.0), batch(), WEIGHTS[None])
    assert scaled.deletion_auc.item() == pytest.approx(0.375)
    assert scaled.clean.item() == pytest.approx(67.0)


def test_unchanged_positions_change_nothing_and_no_gap_gives_nan():
    b = batch()
    corrupt = b.corrupt.clone()
    corrupt[0, 3] = CLEAN  # the corruption leaves the heaviest token alone
    same_last = Batch(b.clean, corrupt, b.answers, b.wrong)
    # replacing position 3 first is a no-op: 1, 1, .5 (6 - 3 of the gap of 6), 1/6, 0
    curves = replacement_curves(additive(WEIGHTS), same_last, WEIGHTS[None])
    assert curves.deletion[0].tolist() == pytest.approx([1, 1, 0.5, 1 / 6, 0])
    flat = replacement_curves(additive(torch.zeros(4)), batch(), WEIGHTS[None])
    assert torch.isnan(flat.deletion).all() and torch.isnan(flat.deletion_auc).all()


def test_area_is_the_trapezoid_rule():
    assert area(torch.tensor([[0.0, 1.0], [1.0, 1.0]])).tolist() == [0.5, 1.0]


def test_curves_on_a_real_model_run_from_clean_to_corrupted():
    model = load_model("ioi-gpt2-4l")
    task = get_task("ioi", model.tokenizer, n=3)
    first = task.batches(model.tokenizer)[0]
    curves = replacement_curves(model, first, torch.randn(first.clean.shape))
    assert curves.deletion[:, 0].tolist() == pytest.approx([1.0] * first.size)
    assert curves.deletion[:, -1].tolist() == pytest.approx([0.0] * first.size, abs=1e-9)
    assert curves.insertion[:, -1].tolist() == pytest.approx([1.0] * first.size)
    logits = model.hf(first.clean).logits[:, -1]
    answers = logits.gather(1, first.answers) - logits.gather(1, first.wrong)
    assert curves.clean.tolist() == pytest.approx(answers[:, 0].tolist(), abs=1e-4)


# -- agreement and known tokens -------------------------------------------------------------------
def test_rank_agreement_of_identical_reversed_and_constant_rankings():
    x = torch.tensor([[0.3, -1.0, 2.0, 0.1], [5.0, 4.0, 3.0, 9.0]])
    assert rank_agreement(x, x.exp()) == pytest.approx(1.0)  # same order, other values
    assert rank_agreement(x, -x) == pytest.approx(-1.0)
    constant = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 4.0, 3.0, 9.0]])
    assert rank_agreement(constant, x) == pytest.approx(1.0)  # the constant row is left out
    assert np.isnan(rank_agreement(constant[:1], x[:1]))


def test_known_token_accuracy_ignores_the_last_position():
    known = torch.tensor([[False, True, False, False]] * 3 + [[False] * 4])
    scores = torch.tensor([[0.0, 2.0, 1.0, 9.0],   # the last token is not a candidate: found
                           [3.0, 2.0, 1.0, 0.0],   # another token on top: missed
                           [1.0, 1.0, 0.0, 0.0],   # a tie goes to the earlier token: missed
                           [1.0, 0.0, 0.0, 0.0]])  # nothing known
    hits = known_token_accuracy(scores, known)
    assert hits[:3].tolist() == [1.0, 0.0, 0.0] and hits[3].isnan()


@pytest.fixture(scope="module")
def ioi_model():
    return load_model("ioi-gpt2-4l")


def decoded(tokenizer, batch, mask, row):
    return tokenizer.decode(batch.clean[row][mask[row]].tolist())


def test_known_tokens_of_the_builtin_tasks():
    for name in ("ioi", "induction", "factual"):
        model = load_model(get_task(name, n=1).reference_model)
        tok = model.tokenizer
        task = get_task(name, tok, n=6, seed=2)
        for b in task.batches(tok, batch_size=6):
            mask = known_mask(task, tok, b)
            for r in range(b.size):
                ids = b.clean[r].tolist()
                where = mask[r].nonzero()[:, 0].tolist()
                example = next(e for e in task.examples if tok.encode(e.clean) == ids)
                if name == "ioi":  # the indirect object: the answer's one mention
                    assert [ids[i] for i in where] == [int(b.answers[r, 0])]
                    assert decoded(tok, b, mask, r).strip() == example.answers[0].strip()
                elif name == "induction":  # the answer, right after the last token's first use
                    assert len(where) == 1 and ids[where[0]] == int(b.answers[r, 0])
                    assert ids[where[0] - 1] == ids[-1]
                else:  # the subject's tokens
                    assert decoded(tok, b, mask, r).strip() == example.meta["subject"]
                    assert len(where) >= 2 and where == list(range(where[0], where[-1] + 1))


def test_known_tokens_given_by_the_user(ioi_model):
    tok = ioi_model.tokenizer
    examples = [
        Example("When Mary and John went to the store , John gave a drink to",
                "When Mary and John went to the store , Tom gave a drink to", " Mary", " John",
                {"known": "Mary"}),
        Example("When Anna and Paul went to the park , Paul gave a book to",
                "When Anna and Paul went to the park , Sam gave a book to", " Anna", " Paul",
                {"known": [1, -4]}),
        Example("When Kate and Mark went to the bank , Mark gave a key to",
                "When Kate and Mark went to the bank , Tony gave a key to", " Kate", " Mark"),
    ]
    task = Task("mine", examples)
    (b,) = task.batches(tok)
    mask = known_mask(task, tok, b)
    assert mask[0].nonzero()[:, 0].tolist() == [1]  # "Mary" is the second token
    assert mask[1].nonzero()[:, 0].tolist() == [1, b.length - 4]
    assert not mask[2].any()  # no "known" and no rule for a task named "mine"
    assert known_mask(Task("mine", examples[2:]), tok, b) is None
    for bad in ("Tuesday", [99], ["Mary"]):
        wrong = Task("mine", [Example(examples[0].clean, examples[0].corrupt, " Mary", " John",
                                      {"known": bad})])
        with pytest.raises(OptionError, match="meta\\['known'\\]"):
            known_mask(wrong, tok, wrong.batches(tok)[0])


# -- the comparison -------------------------------------------------------------------------------
class Found:
    def __init__(self, scores: torch.Tensor) -> None:
        self.scores, self.seconds = scores, 0.5


def stand_in(task: Task, tokenizer):
    """Methods whose scores are known: the known tokens on top, at the bottom, and one that
    refuses prompts longer than 15 tokens."""
    def attribute(model, batch, method, metric, **options):
        mask = known_mask(task, tokenizer, batch).float()  # [b, p]
        if method == "short-only" and batch.length > 15:
            raise OptionError("prompts too long for this stand-in")
        sign = -1.0 if method == "anti-oracle" else 1.0
        return Found(sign * (mask + 0.01 * torch.arange(batch.length)))

    return attribute


def test_compare_with_stand_in_methods(ioi_model, tmp_path):
    task = get_task("ioi", ioi_model.tokenizer, n=8, seed=1)
    lengths = [b.length for b in task.batches(ioi_model.tokenizer)]
    assert min(lengths) <= 15 < max(lengths)  # the seed gives both kinds of prompts
    methods = ["oracle", "anti-oracle", "short-only"]
    result = compare(task, ioi_model, methods, attribute=stand_in(task, ioi_model.tokenizer),
                     batch_size=4)
    rows = {r.method: r.summary() for r in result.results}
    assert [r.method for r in result.results] == [*methods, RANDOM]
    assert rows["oracle"]["accuracy"] == 1.0 and rows["anti-oracle"]["accuracy"] == 0.0
    n_batches = len(task.batches(ioi_model.tokenizer, batch_size=4))
    assert rows["oracle"]["seconds_per_prompt"] == pytest.approx(0.5 * n_batches / 8)
    short = result.results[2]
    assert 0 < short.measured < 8 and "too long" in short.note
    assert np.isnan(short.deletion_auc).sum() == 8 - short.measured
    # the oracle and the short-only method score alike; the anti-oracle is their reverse
    assert result.agreement[0, 0] == pytest.approx(1.0)
    assert result.agreement[0, 1] == pytest.approx(-1.0)
    assert result.agreement[0, 2] == pytest.approx(1.0)
    table = result.table()
    assert "known-token accuracy" in table and f"{short.measured}/8" in table
    assert "short-only:" in table  # the note
    record = json.loads(json.dumps(result.to_dict()))
    assert record["methods"][0]["accuracy"] == 1.0
    result.plot(tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the HTML view --------------------------------------------------------------------------------
def test_token_texts_read_as_the_prompt(ioi_model):
    text = "When Mary and John went to the store"
    ids = ioi_model.tokenizer.encode(text)
    assert "".join(token_texts(ioi_model.tokenizer, ids)) == ioi_model.tokenizer.decode(ids)


def test_page_escapes_and_shades():
    page = render_html([PromptView(["<b>", " x", " y"], {"m": [2.0, 0.0, -1.0]},
                                   [True, False, False], "note & more")], "t <1>")
    assert "&lt;b&gt;" in page and "<b>" not in page.split("<body>")[1]
    assert "rgba(220, 38, 38, 1.000)" in page and "rgba(37, 99, 235, 0.500)" in page
    assert page.count("background:transparent") == 1 and 'class="tok known"' in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_page_in_headless_chromium(tmp_path):
    prompts = [PromptView(["When", " Mary", " and", " John", " left"],
                          {"a": [0.0, 3.0, -0.5, 0.0, 1.0], "b": [1.0, 1.0, 1.0, 1.0, 1.0]},
                          [False, True, False, False, False])]
    path = write_html(tmp_path / "page.html", prompts, "test")
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120)
    state = re.search(r'<div id="state"[^>]*>', run.stdout)
    assert state, run.stderr[-2000:]
    counts = {k: int(v) for k, v in re.findall(r'data-([\w-]+)="(\d+)"', state[0])}
    # every token laid out with a box; shaded exactly where the score is not zero (3 + 5)
    assert counts == {"tokens": 10, "visible": 10, "shaded": 8}


@pytest.mark.parametrize("family", [*FAMILIES, *NODE_FAMILIES])
def test_curves_on_every_family(family):
    model = tiny_model(family)
    b = make_batch(b=2, p=5, vocab=50, seed=1)
    curves = replacement_curves(model, b, torch.randn(2, 5))
    logits = model.hf(b.clean).logits[:, -1]
    diff = (logits.gather(1, b.answers) - logits.gather(1, b.wrong))[:, 0]
    assert curves.clean.tolist() == pytest.approx(diff.tolist(), abs=1e-5)
    # a random model: the corruption may raise the logit difference, and such a prompt has
    # no curve (its fraction of clean - corrupted would flip sign)
    effect = curves.clean > curves.corrupt
    assert torch.isnan(curves.deletion).all(1).tolist() == (~effect).tolist()
    assert curves.deletion[effect, 0].tolist() == pytest.approx([1.0] * int(effect.sum()))
    assert curves.insertion[effect, -1].tolist() == pytest.approx([1.0] * int(effect.sum()))


# -- prompts where the corruption does nothing ----------------------------------------------------
WORDS = "a b c d x y"
WEIGHT = {"a": 1.0, "b": 0.0, "c": 2.0, "d": 0.0, "x": 0.0, "y": 0.0}


class SumLM(torch.nn.Module):
    """A causal LM whose last-position logit difference (answer ``x`` minus wrong ``y``) is the
    sum of one weight per token of the prompt (`WEIGHT`)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(len(WEIGHT), 2)
        self.readout = torch.nn.Linear(2, len(WEIGHT), bias=False)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[:, 0] = torch.tensor(list(WEIGHT.values()))
            self.readout.weight.zero_()
            self.readout.weight[WORDS.split().index("x"), 0] = 1.0
        self.config = None

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return type("Out", (), {"logits": self.readout(x.cumsum(1))})


def sum_model():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from circuits.model import Model

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS.split())}, "a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return Model(hf=SumLM().eval(), tokenizer=tok, name="sum-toy")


def test_prompts_the_corruption_does_not_lower_are_left_out_and_counted():
    # "a b b" -> "b b b" lowers the logit difference from 1 to 0: counted. "a b b" -> "c b b"
    # raises it to 2 and "b a b" -> "b a d" leaves it at 1: both left out. On the counted
    # prompt occlusion scores [1, 0, 0]; deleting in that order gives 1, 0, 0, 0 of the gap,
    # area (1/3) (1/2) = 1/6, and inserting 0, 1, 1, 1, area (1/3) (1 + 1 + 1/2) = 5/6. Kept,
    # the second prompt's flipped fraction (1, 1, 1, 0: area 5/6) would move the mean to 1/2.
    model = sum_model()
    examples = [Example("a b b", "b b b", " x", " y"), Example("a b b", "c b b", " x", " y"),
                Example("b a b", "b a d", " x", " y")]
    pages = []
    result = compare(Task("toy", examples), model, ["occlusion"], attribute=attribute,
                     on_batch=pages.append)
    occlusion = result.results[0]
    assert result.left_out == 2 and result.counted == 1
    assert occlusion.summary()["deletion_auc"] == pytest.approx(1 / 6)
    assert occlusion.summary()["insertion_auc"] == pytest.approx(5 / 6)
    assert occlusion.counted == 1 and occlusion.measured == 3
    assert np.isnan(occlusion.deletion_auc).sum() == 2
    assert sorted(result.gaps.tolist()) == pytest.approx([-1.0, 0.0, 1.0])
    record = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert record["left_out"]["prompts"] == 2 and "at least as well" in record["left_out"][
        "reason"]
    assert sorted(record["left_out"]["which"]) == sorted(
        i for i, gap in enumerate(result.gaps) if gap <= 0)
    assert "2 of 3 prompts left out" in result.table()
    assert [bool(v) for p in pages for v in p.effective] == [gap > 0 for gap in result.gaps]


def test_every_prompt_left_out_is_one_line():
    examples = [Example("a b b", "c b b", " x", " y"), Example("b a b", "b a d", " x", " y")]
    result = compare(Task("toy", examples), sum_model(), ["occlusion"], attribute=attribute)
    assert result.left_out == 2
    lines = result.table().splitlines()
    assert len(lines) == 1 and "no prompt to compare" in lines[0] and "nan" not in lines[0]
    assert result.report().splitlines()[-1] == lines[0]
    assert "rank agreement" not in result.report()


def test_refusal_reason_sits_next_to_its_nulls(ioi_model):
    task = get_task("ioi", ioi_model.tokenizer, n=8, seed=1)
    result = compare(task, ioi_model, ["oracle", "short-only"],
                     attribute=stand_in(task, ioi_model.tokenizer), batch_size=4)
    record = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    short = record["methods"][1]
    assert short["refused"] == {"prompts": result.results[1].refused,
                                "reason": "prompts too long for this stand-in"}
    assert short["per_prompt"]["deletion_auc"].count(None) == short["refused"]["prompts"] > 0
    assert record["methods"][0]["refused"] is None
    assert record["agreement"]["refused"] == {"short-only": "prompts too long for this stand-in"}


def test_known_masks_match_known_mask_and_encode_each_prompt_a_bounded_number_of_times(
        monkeypatch):
    # known_mask matches a batch against every example of the task: n / b batches x n
    # encodings; known_masks against the batch's own examples: about 2 n
    from circuits.attribution import known
    from circuits.attribution.known import known_masks

    model = load_model(get_task("ioi", n=1).reference_model)
    tok = model.tokenizer
    task = get_task("ioi", tok, n=48, seed=3)
    batches = task.batches(tok, batch_size=4)
    expected = [known_mask(task, tok, b) for b in batches]
    calls = []
    encode = known._encode
    monkeypatch.setattr(known, "_encode", lambda *a: calls.append(1) or encode(*a))
    found = list(known_masks(task, tok, batches, 4))
    assert all(torch.equal(a, b) for a, b in zip(found, expected, strict=True))
    assert len(calls) <= 2 * len(task)


def test_spearman_rows_matches_scipy():
    from scipy.stats import spearmanr

    from circuits.attribution.compare import spearman_rows

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (20, 7), generator=gen).float()  # ties
    b = torch.randn(20, 7, generator=gen)
    found = spearman_rows(a, b)
    for row, value in enumerate(found):
        if np.ptp(a[row].numpy()) == 0:
            assert np.isnan(value)
        else:
            assert value == pytest.approx(spearmanr(a[row], b[row]).statistic)
