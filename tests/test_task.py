"""The Task API: JSONL reading and its errors, round trip, split, tokenizing and bucketing."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from circuits.errors import OptionError, TaskError
from circuits.task import Example, Task, TaskSpec, get_task, list_tasks, register_task

WORDS = "the cat sat on a mat dog ran to big red house Mary John Tom".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer; 'doghouse' is unknown and 'big-red' is three tokens."""
    vocab = {"<unk>": 0, "-": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return core


def _write(tmp_path, lines):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"clean": "the cat sat", "corrupt": "the dog sat", "answers": [" on"],
                   "wrong": [" to"]})


def test_jsonl_invalid_json_names_the_line(tmp_path):
    path = _write(tmp_path, [GOOD, '{"clean": "the cat"'])
    with pytest.raises(TaskError, match="line 2 is not valid JSON"):
        Task.from_jsonl(path)


def test_jsonl_missing_key_names_the_line_and_key(tmp_path):
    path = _write(tmp_path, [GOOD, json.dumps({"clean": "the cat", "answers": [" sat"]})])
    with pytest.raises(TaskError, match="line 2 is missing key.*corrupt"):
        Task.from_jsonl(path)


def test_jsonl_missing_answers(tmp_path):
    path = _write(tmp_path, [json.dumps({"clean": "a", "corrupt": "a"})])
    with pytest.raises(TaskError, match="line 1 is missing key.*answers"):
        Task.from_jsonl(path)


def test_jsonl_empty_file(tmp_path):
    path = _write(tmp_path, ["", "  "])
    with pytest.raises(TaskError, match="is empty"):
        Task.from_jsonl(path)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(TaskError, match="cannot read"):
        Task.from_jsonl(tmp_path / "nope.jsonl")


def test_jsonl_different_token_lengths_named_at_tokenize_time(tmp_path, tokenizer):
    bad = {"clean": "the cat sat", "corrupt": "the big red dog sat", "answer": " on",
           "wrong": " to"}
    task = Task.from_jsonl(_write(tmp_path, [GOOD, json.dumps(bad)]))
    with pytest.raises(TaskError, match="line 2: clean has 3 tokens but corrupt has 5"):
        task.batches(tokenizer)


def test_jsonl_answer_not_single_token(tmp_path, tokenizer):
    bad = {"clean": "the cat sat", "corrupt": "the dog sat", "answer": " big-red",
           "wrong": " to"}
    task = Task.from_jsonl(_write(tmp_path, [json.dumps(bad)]))
    with pytest.raises(TaskError, match="line 1: answers ' big-red' is 3 tokens"):
        task.batches(tokenizer)


def test_jsonl_wrong_not_single_token(tmp_path, tokenizer):
    bad = {"clean": "the cat sat", "corrupt": "the dog sat", "answer": " on",
           "wrong": [" to", " big red"]}
    task = Task.from_jsonl(_write(tmp_path, [json.dumps(bad)]))
    with pytest.raises(TaskError, match="line 1: wrong ' big red' is 2 tokens"):
        task.batches(tokenizer)


def test_jsonl_round_trip_is_lossless(tmp_path):
    task = Task.from_examples("t", [
        Example("the cat sat", "the dog sat", (" on", " to"), (" ran",)),
        {"clean": "Mary ran", "corrupt": "John ran", "answer": " to", "wrong": " on",
         "meta": {"subject": "Mary"}},
        Example("é ✓", "ü ✓", " x", ()),
    ])
    path = tmp_path / "out.jsonl"
    task.to_jsonl(path)
    again = Task.from_jsonl(path, name="t")
    assert again == task
    assert [e.meta for e in again.examples] == [e.meta for e in task.examples]
    assert again.examples[1].line == 2
    again.to_jsonl(tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()


def test_single_strings_accepted_for_answer_and_wrong():
    example = Example("a", "b", " c", " d")
    assert example.answers == (" c",) and example.wrong == (" d",)


def test_task_needs_examples_and_known_metric():
    with pytest.raises(TaskError, match="no examples"):
        Task("t", ())
    with pytest.raises(OptionError, match="unknown metric"):
        Task("t", (Example("a", "b", " c"),), metric="nope")
    with pytest.raises(TaskError, match="not an Example"):
        Task("t", ("a",))


def test_split_count_fraction_and_seed():
    task = Task("t", tuple(Example(f"p{i}", f"q{i}", " a") for i in range(10)))
    first, second = task.split(3, seed=1)
    assert (len(first), len(second)) == (3, 7)
    assert set(first.examples) | set(second.examples) == set(task.examples)
    assert not set(first.examples) & set(second.examples)
    assert first.name == "t/discovery" and second.name == "t/heldout"
    assert task.split(3, seed=1) == (first, second)
    assert task.split(3, seed=2) != (first, second)
    assert len(task.split(0.8)[0]) == 8
    with pytest.raises(TaskError, match="cannot split"):
        task.split(10)
    with pytest.raises(TaskError, match="cannot split"):
        task.split(0)


def test_mixed_lengths_are_bucketed(tokenizer):
    task = Task("t", (
        Example("the cat sat on a", "the dog sat on a", " mat", " house"),   # 5 tokens
        Example("the cat sat", "the dog sat", (" on",), (" to", " ran")),   # 3 tokens
        Example("Mary ran to", "John ran to", " Tom", ()),                  # 3 tokens
        Example("the dog ran", "the cat ran", " to", " on"),                # 3 tokens
    ))
    batches = task.batches(tokenizer, batch_size=2)
    assert [(b.size, b.length) for b in batches] == [(2, 3), (1, 3), (1, 5)]
    first = batches[0]
    vocab = tokenizer.get_vocab()
    assert first.clean[1].tolist() == [vocab["Mary"], vocab["ran"], vocab["to"]]
    assert first.answers.tolist() == [[vocab["on"]], [vocab["Tom"]]]
    # padding: a missing wrong token is -1, and an example with none is all -1
    assert first.wrong.tolist() == [[vocab["to"], vocab["ran"]], [-1, -1]]
    assert first.clean.dtype == torch.long
    assert task.batches(tokenizer, batch_size=2)[0].clean.equal(first.clean)  # deterministic


def test_registry_accepts_new_tasks():
    def build(tokenizer, n, seed):
        return Task("toy", tuple(Example(f"a{i}", f"b{i}", " c") for i in range(n)))

    register_task(TaskSpec("toy", "a toy task", build, default_n=3))
    assert ("toy", "a toy task") in list_tasks()
    assert len(get_task("toy")) == 3 and len(get_task("toy", n=5)) == 5
    with pytest.raises(OptionError, match="ioi"):
        get_task("no-such-task")
