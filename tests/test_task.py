"""The Task API: JSONL reading and its errors, round trip, split, tokenizing and bucketing."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import circuits.task as task_module
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


def test_registry_accepts_new_tasks(monkeypatch):
    # a registry of the test's own: "toy" has no reference model, and later tests walk every task
    monkeypatch.setattr(task_module, "_REGISTRY", dict(task_module._REGISTRY))

    def build(tokenizer, n, seed):
        return Task("toy", tuple(Example(f"a{i}", f"b{i}", " c") for i in range(n)))

    register_task(TaskSpec("toy", "a toy task", build, default_n=3))
    assert ("toy", "a toy task") in list_tasks()
    assert len(get_task("toy")) == 3 and len(get_task("toy", n=5)) == 5
    with pytest.raises(OptionError, match="ioi"):
        get_task("no-such-task")


# -- wrong types, encodings and odd files: always a TaskError that names file and line --------
def _record(**fields):
    record = {"clean": "the cat sat", "corrupt": "the dog sat", "answers": [" on"],
              "wrong": [" to"]}
    record.update(fields)
    return json.dumps(record)


@pytest.mark.parametrize("fields, message", [
    ({"answers": 5}, "answers must be a string or a list of strings, got 5 (a number)"),
    ({"answers": None}, "answers must be a string or a list of strings, got None (null)"),
    ({"answers": {"a": 1}}, "answers must be a string or a list of strings, got {'a': 1} (an"),
    ({"answers": [" on", 3]}, "answers must be strings, but one is 3 (a number)"),
    ({"answers": []}, "no answers"),
    ({"wrong": 5}, "wrong must be a string or a list of strings, got 5"),
    ({"wrong": True}, "wrong must be a string or a list of strings, got True (a boolean)"),
    ({"wrong": [None]}, "wrong must be strings, but one is None"),
    ({"clean": 5}, "clean must be a string, got 5 (a number)"),
    ({"corrupt": ["the dog sat"]}, "corrupt must be a string, got ['the dog sat'] (a list)"),
    ({"meta": 5}, "meta must be a JSON object, got 5"),
    ({"answers": ["\ud800"]}, "answers holds '\\ud800', half of a surrogate pair"),
])
def test_jsonl_wrong_types_name_file_line_and_fix(tmp_path, fields, message):
    path = _write(tmp_path, [GOOD, _record(**fields)])
    with pytest.raises(TaskError) as info:
        Task.from_jsonl(path)
    assert f"task.jsonl: line 2: {message}" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [
    "Héllo wörld".encode("latin-1"),
    bytes(range(256)),
    b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.",  # a pickle
])
def test_non_utf8_file_is_a_task_error(tmp_path, content):
    path = tmp_path / "task.jsonl"
    path.write_bytes(content)
    message = r"task.jsonl is not UTF-8 text \(byte 0x.. on line \d\); save it as UTF-8"
    with pytest.raises(TaskError, match=message):
        Task.from_jsonl(path)


def test_non_utf8_byte_names_its_line(tmp_path):
    path = tmp_path / "task.jsonl"
    latin1 = GOOD.replace("the cat", "the caf\u00e9").encode("latin-1")
    path.write_bytes(GOOD.encode() + b"\n" + latin1 + b"\n")
    with pytest.raises(TaskError, match=r"byte 0xe9 on line 2"):
        Task.from_jsonl(path)


def test_directory_and_non_path_are_task_errors(tmp_path):
    with pytest.raises(TaskError, match="is a directory; pass a JSONL file"):
        Task.from_jsonl(tmp_path)
    with pytest.raises(TaskError, match="must be a path, got None"):
        Task.from_jsonl(None)


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", r"line 1 is \[1, 2\] \(a list\), not a JSON object"),
    ("5", r"line 1 is 5 \(a number\), not a JSON object"),
    ('"text"', r"line 1 is 'text' \(a string\), not a JSON object"),
    ("null", r"line 1 is None \(null\), not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "line 1 nests JSON lists or objects too deeply"),
    ('{"clean": ' + "1" * 5000 + "}", "line 1 is not valid JSON"),
])
def test_json_that_is_not_a_record(tmp_path, line, message):
    with pytest.raises(TaskError, match=message):
        Task.from_jsonl(_write(tmp_path, [line]))


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n")
    assert len(Task.from_jsonl(path)) == 2


def test_line_separators_inside_strings_round_trip(tmp_path):
    # U+2028 and U+0085 are written unescaped by to_jsonl; they must not end a line
    task = Task("t", (Example("a\u2028b", "c\x85d", " x\x1c", " y"),))
    task.to_jsonl(tmp_path / "t.jsonl")
    assert Task.from_jsonl(tmp_path / "t.jsonl") == task


# -- examples the metric cannot use -------------------------------------------------------------
def test_answer_that_is_also_wrong_is_refused(tmp_path):
    path = _write(tmp_path, [GOOD, _record(answers=[" on", " to"], wrong=[" ran", " to"])])
    with pytest.raises(TaskError, match="line 2: ' to' is both an answer and a wrong answer"):
        Task.from_jsonl(path)
    with pytest.raises(TaskError, match="example 'a': ' c' is both an answer and a wrong"):
        Example("a", "b", " c", (" d", " c"))


def test_same_clean_and_corrupt_is_refused(tmp_path):
    path = _write(tmp_path, [_record(corrupt="the cat sat")])
    with pytest.raises(TaskError, match="line 1: the clean and corrupted prompts are the same"):
        Task.from_jsonl(path)


def test_same_tokens_are_refused_at_tokenize_time(tokenizer):
    # different strings, but both unknown words become <unk>: the same token ids
    task = Task("t", (Example("the doghouse sat", "the cathouse sat", " on", " to"),))
    with pytest.raises(TaskError, match="prompts are the same tokens for this tokenizer"):
        task.batches(tokenizer)
    # " on" and "on" are one word-level token
    task = Task("t", (Example("the cat sat", "the dog sat", " on", "on"),))
    with pytest.raises(TaskError, match="answer ' on' and wrong answer 'on' are the same token"):
        task.batches(tokenizer)


@pytest.mark.parametrize("kind", ["answers", "wrong"])
def test_unknown_answer_token_is_refused(tmp_path, tokenizer, kind):
    fields = {kind: [" doghouse"]}
    task = Task.from_jsonl(_write(tmp_path, [_record(**fields)]))
    with pytest.raises(TaskError, match=f"line 1: {kind} ' doghouse' is not in this tokenizer's "
                                        "vocabulary .*unknown token '<unk>'"):
        task.batches(tokenizer)


def test_unknown_answer_with_a_transformers_tokenizer():
    from transformers import AutoTokenizer

    from circuits.zoo import find

    hf_tokenizer = AutoTokenizer.from_pretrained(find("ioi-gpt2-4l"))
    good = Task("t", (Example("When Mary and John", "When Anna and John", " Mary", " John"),))
    assert good.batches(hf_tokenizer)[0].answers.shape == (1, 1)
    bad = Task("t", (Example("When Mary and John", "When Anna and John", " Zzyzx", " John"),))
    with pytest.raises(TaskError, match="' Zzyzx' is not in this tokenizer's vocabulary"):
        bad.batches(hf_tokenizer)


class _NoUnknownTokenizer:
    """Maps each character to its code point; has no unknown token."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_no_unknown_check_without_an_unknown_token():
    task = Task("t", (Example("ab", "cb", "\x00", "x"),))  # id 0 is not special here
    assert task.batches(_NoUnknownTokenizer())[0].answers.tolist() == [[0]]


def test_batches_without_a_tokenizer_is_a_task_error():
    with pytest.raises(TaskError, match="needs a tokenizer, got None"):
        Task("t", (Example("a", "b", " c"),)).batches(None)


@pytest.mark.parametrize("batch_size", [0, -1, "4", 2.0, True])
def test_bad_batch_size_is_an_option_error(tokenizer, batch_size):
    with pytest.raises(OptionError, match="batch_size must be a whole number"):
        Task("t", (Example("the cat", "the dog", " sat"),)).batches(tokenizer, batch_size)


# -- prompts longer than the model's context ----------------------------------------------------
def test_max_length_refuses_long_prompts_naming_both_lengths(tmp_path, tokenizer):
    long = _record(clean="the cat sat on a mat", corrupt="the dog sat on a mat")
    task = Task.from_jsonl(_write(tmp_path, [GOOD, long]))
    assert [b.length for b in task.batches(tokenizer, max_length=6)] == [3, 6]
    assert len(task.batches(tokenizer)) == 2  # None checks nothing
    message = "task.jsonl: line 2: the prompts are 6 tokens but the model reads at most 5 "
    with pytest.raises(TaskError, match=message + ".*context length"):
        task.batches(tokenizer, max_length=5)


@pytest.mark.parametrize("max_length", [0, -3, "64", 6.5, True])
def test_bad_max_length_is_an_option_error(tokenizer, max_length):
    task = Task("t", (Example("the cat", "the dog", " sat"),))
    with pytest.raises(OptionError, match="max_length must be a whole number"):
        task.batches(tokenizer, max_length=max_length)


def test_prompt_longer_than_a_shipped_model_context():
    import circuits

    model = circuits.load_model("ioi-gpt2-4l")
    words = " Mary and John" * 30
    task = Task("t", (Example("When" + words, "When" + words.replace("Mary", "Anna"), " Mary",
                              " John"),))
    with pytest.raises(TaskError, match="the prompts are 91 tokens but the model reads at most 64"):
        task.batches(model.tokenizer, max_length=model.context_length)


# -- what the constructors accept ---------------------------------------------------------------
@pytest.mark.parametrize("examples", [5, "abc", Example("a", "b", " c"), {"clean": "a"}, None])
def test_from_examples_needs_a_list(examples):
    with pytest.raises(TaskError, match="examples must be a list of Example objects or dicts"):
        Task.from_examples("t", examples)


def test_from_examples_names_the_bad_item():
    with pytest.raises(TaskError, match=r"examples\[1\] is missing key\(s\) corrupt"):
        Task.from_examples("t", [Example("a", "b", " c"), {"clean": "a", "answer": " c"}])
    with pytest.raises(TaskError, match=r"examples\[0\]: meta must be a JSON object"):
        Task.from_examples("t", [{"clean": "a", "corrupt": "b", "answer": " c", "meta": [1]}])
    with pytest.raises(TaskError, match=r"example 'a': answers must be a string"):
        Task.from_examples("t", [{"clean": "a", "corrupt": "b", "answers": 5}])


def test_task_name_must_be_a_string():
    with pytest.raises(TaskError, match="task name must be a string, got 5"):
        Task(5, (Example("a", "b", " c"),))


# -- split and get_task options ------------------------------------------------------------------
TEN = Task("t", tuple(Example(f"p{i}", f"q{i}", " a") for i in range(10)))


@pytest.mark.parametrize("value", [1.5, 0, -1, 10, 0.0, 1.0, float("nan"), 0.01, 0.99])
def test_split_out_of_range_is_a_task_error(value):
    with pytest.raises(TaskError, match="cannot split 10 examples .*leaves a part empty"):
        TEN.split(value)


@pytest.mark.parametrize("value", ["x", True, None, [3]])
def test_split_of_a_non_number_is_an_option_error(value):
    with pytest.raises(OptionError, match="split takes a count .* or a fraction"):
        TEN.split(value)


def test_split_of_one_example_and_bad_seeds():
    with pytest.raises(TaskError, match="has 1 example and cannot be split"):
        Task("t", (Example("a", "b", " c"),)).split(0.5)
    with pytest.raises(OptionError, match="seed must be a whole number"):
        TEN.split(3, seed="x")
    assert [len(part) for part in TEN.split(0.25)] == [2, 8]


def _toy_build(tokenizer, n, seed):
    return Task("toy-n", tuple(Example(f"a{i}", f"b{i}", " c") for i in range(n)))


@pytest.fixture
def toy_n(monkeypatch):
    """"toy-n" in a registry of the test's own (it has no reference model, and other tests
    walk every registered task, in whatever order the tests run)."""
    monkeypatch.setattr(task_module, "_REGISTRY", dict(task_module._REGISTRY))
    register_task(TaskSpec("toy-n", "toy", _toy_build, default_n=2))


@pytest.mark.parametrize("n", ["5", 2.5, True, 0, -3, 100_001, 10**12])
def test_get_task_bad_n_is_an_option_error(n, toy_n):
    with pytest.raises(OptionError, match=r"^n(=| must)") as info:
        get_task("toy-n", n=n)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        assert "at most 100000 prompts" in str(info.value)


@pytest.mark.parametrize("seed", ["x", -1, 2**32, True, 1.0])
def test_get_task_bad_seed_is_an_option_error(seed):
    with pytest.raises(OptionError, match="seed must be a whole number from 0 to 4294967295"):
        get_task("ioi", n=2, seed=seed)


def test_get_task_bounds_and_numpy_integers(toy_n):
    import numpy as np

    assert len(get_task("toy-n", n=100_000, seed=2**32 - 1)) == 100_000
    assert len(get_task("ioi", n=np.int64(3), seed=np.int64(1))) == 3
    with pytest.raises(OptionError, match="task name must be a string"):
        get_task(["ioi"])


def test_to_jsonl_errors_are_task_errors(tmp_path):
    task = Task("t", (Example("a", "b", " c", meta={"when": {1, 2}}),))
    with pytest.raises(TaskError, match="example 'a': meta cannot be written as JSON"):
        task.to_jsonl(tmp_path / "t.jsonl")
    assert not (tmp_path / "t.jsonl").exists()
    with pytest.raises(TaskError, match="cannot write task file"):
        Task("t", (Example("a", "b", " c"),)).to_jsonl(tmp_path / "no" / "t.jsonl")
