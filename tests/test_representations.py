"""Labelled sets, reading hidden states, and measuring edits (circuits.representations)."""

from __future__ import annotations

import json

import pytest
import torch

from circuits.errors import OptionError, TaskError
from circuits.features.sites import read_sites, site_of
from circuits.representations.activations import (
    hidden_states,
    parse_layers,
    read_tokens,
    reading_spans,
)
from circuits.representations.effects import (
    NeutralMeter,
    TaskMeter,
    add_direction,
    at_layer,
)
from circuits.representations.labels import Labeled, builtin_labeled, labeled_set, read_labeled
from circuits.representations.planted import planted_direction
from circuits.testing import tiny_model


@pytest.fixture(scope="module")
def planted():
    return planted_direction()


def write(tmp_path, rows):
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_labels_file_reads_positions_as_specs_and_marks(tmp_path, planted):
    path = write(tmp_path, [
        {"text": "the word is ant", "label": 1},
        {"text": "the word is cup", "label": 0, "position": 1},
        {"text": "a word is cat", "label": True, "position": [0, 2]},
        {"text": "the new word is jar", "label": "x", "position": "new", "word": "w"},
    ])
    data = read_labeled(path)
    assert data.labels == ("1", "0", "true", "x")
    assert data.positions == ("last", "1", "0:2", "position")
    assert data.marks[3] == {"position": (4, 7)}
    assert data.words == ("", "", "", "w")
    # the tokens read: word-level tokens, so each is a word of the text
    assert read_tokens(planted.model, data) == ["ant", "word", "a word", "new"]


@pytest.mark.parametrize("line, words", [
    ("[1, 2]", "not a JSON object"),
    ('{"text": "", "label": 1}', "non-empty string"),
    ('{"text": "a", "label": null}', '"label" must be'),
    ('{"text": "a", "label": 1, "colour": 2}', "unknown key 'colour'"),
    ('{"text": "a b", "label": 1, "position": "zebra"}', "does not occur in the text"),
    ('{"text": "a b", "label": 1, "position": 1.5}', '"position" must be'),
    ('{"text": "a", "label": 1', "not valid JSON"),
])
def test_a_bad_labels_line_is_one_line_naming_it(tmp_path, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": 0}\n' + line + "\n")
    with pytest.raises(TaskError) as err:
        read_labeled(path)
    assert words in str(err.value) and "line 2" in str(err.value)
    assert "\n" not in str(err.value)


def test_empty_files_folders_and_unknown_sets_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="is empty"):
        read_labeled(tmp_path / "empty.jsonl")
    with pytest.raises(TaskError, match="is a directory"):
        read_labeled(tmp_path)
    with pytest.raises(TaskError, match="not a regular file"):
        read_labeled("/dev/zero")
    with pytest.raises(OptionError, match="no label set or file 'iio'"):
        labeled_set("iio")


def test_builtin_ioi_labels_are_the_indirect_object_and_control_on_the_subject():
    data = builtin_labeled("ioi", n=60, seed=3)
    for text, label, marks, word in zip(data.texts, data.labels, data.marks, data.words,
                                        strict=True):
        io, s1, s2 = marks["io"], marks["s1"], marks["s2"]
        assert text[io[0]:io[1]] == label  # the answer, mentioned once
        assert text[s1[0]:s1[1]] == text[s2[0]:s2[1]] == word != label  # the subject, twice
        assert s1[0] < s2[0] and text.count(label) == 1
    assert sorted(data.labels.count(c) for c in data.classes) == [10] * 6


def test_builtin_factual_labels_are_the_objects_read_at_the_subject():
    data = builtin_labeled("factual", n=20, seed=0)
    task_answers = [e.answers[0].strip() for e in labeled_and_task("factual")]
    assert list(data.labels) == task_answers
    assert all(t[m["subject"][0]:m["subject"][1]] == w
               for t, m, w in zip(data.texts, data.marks, data.words, strict=True))


def labeled_and_task(name):
    from circuits.task import get_task
    return get_task(name, n=20, seed=0).examples


def test_marks_become_the_tokens_they_cover(planted):
    data = Labeled("m", ("the new word is jar",), ("x",), marks=({"w": (4, 12)},))
    ids, spans = reading_spans(planted.model, data, "w:mean")
    assert spans == [(1, 3)]  # "new word"
    assert reading_spans(planted.model, data, "w")[1] == [(2, 3)]
    assert reading_spans(planted.model, data, "-2")[1] == [(3, 4)]
    with pytest.raises(TaskError, match="no mark 'subject'"):
        reading_spans(planted.model, data, "subject")
    with pytest.raises(TaskError, match="outside its 5 tokens"):
        reading_spans(planted.model, data, "7")
    with pytest.raises(OptionError, match="not understood"):
        reading_spans(planted.model, data, "3:x")


def test_layers_specs_and_their_errors():
    assert parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("0-1,2", 3) == [0, 1, 2]
    assert parse_layers(-1, 3) == [2]
    for bad, words in (("5", "out of range"), ("a", "not understood"), ([], "names no layer")):
        with pytest.raises(OptionError, match=words):
            parse_layers(bad, 3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hidden_states_are_the_residual_read_one_text_at_a_time(family, planted):
    """Right padding in a batch changes nothing read: each state equals the residual read from
    that text alone, and resid.L is HF's hidden state after layer L."""
    model = tiny_model(family, vocab_size=len(planted.model.tokenizer))
    model.tokenizer = planted.model.tokenizer
    data = Labeled("t", ("the word is ant", "a new word is a cup", "is"), ("a", "b", "a"),
                   ("last", "mean", "0"))
    states = hidden_states(model, data, [0, 1], batch_size=3)
    ids, spans = reading_spans(model, data)
    for i, (x, (s, e)) in enumerate(zip(ids, spans, strict=True)):
        hf = model.hf(torch.tensor([x]), output_hidden_states=True).hidden_states
        alone = read_sites(model, torch.tensor([x]), [site_of(model, "resid.0")])["resid.0"]
        torch.testing.assert_close(states[0, i], alone[0, s:e].mean(0))
        torch.testing.assert_close(states[0, i], hf[1][0, s:e].mean(0).detach())


def test_the_task_meter_reads_the_metric_and_kl_of_an_edit(planted):
    """The planted model's logit difference is 2 beta v . ln_f(h): adding c v to the final
    residual changes it to what that formula gives for h + c v, by hand."""
    model, v = planted.model, planted.direction
    meter = TaskMeter(model, planted.task)
    c = 3.0
    edited = meter(at_layer(model, 1, add_direction(v, c)))
    batch = meter.batches[0]
    h = read_sites(model, batch.clean, [site_of(model, "resid.1")], stop=False)["resid.1"]
    ln = model.hf.transformer.ln_f
    with torch.no_grad():
        by_hand = 2 * planted.beta * (ln(h[:, -1] + c * v) @ v)
        unedited = 2 * planted.beta * (ln(h[:, -1]) @ v)
    torch.testing.assert_close(edited.metric_per.float(), by_hand, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(meter.base.metric_per.float(), unedited, atol=1e-4, rtol=1e-4)
    assert meter.base.kl == 0.0 and edited.kl > 0
    assert meter(at_layer(model, 1, add_direction(v, 0.0))).metric == meter.base.metric


def test_the_neutral_meter_loss_is_the_models_own_loss(planted):
    model = planted.model
    texts = ["the word is ant a new word is cup", "the word is jar"] * 3
    meter = NeutralMeter(model, texts, context=8, max_rows=4, batch_size=2)
    ids = torch.cat(meter.rows)
    with torch.no_grad():
        hf_loss = model.hf(input_ids=ids, labels=ids).loss
    assert meter.base.loss == pytest.approx(float(hf_loss), rel=1e-5)
    assert meter.base.kl == 0.0
    shifted = meter(at_layer(model, 0, add_direction(planted.direction, 5.0)))
    assert shifted.kl > 0 and shifted.loss != meter.base.loss


def test_the_years_set_needs_digits_and_the_planted_state_is_the_global_one():
    state = torch.random.get_rng_state()
    planted_direction(seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    from circuits.handset import word_tokenizer
    from circuits.representations.planted import VOCAB
    with pytest.raises(OptionError, match="needs a tokenizer with digits"):
        builtin_labeled("years", word_tokenizer(VOCAB))
