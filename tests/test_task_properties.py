"""Property: whatever a task file holds, `Task.from_jsonl` loads it or raises a CircuitsError.

Hypothesis feeds the parser random bytes, random text and random JSON values, and, to reach
the code behind the JSON syntax, near-valid records: the right keys, with values that are
mostly of the right kind and sometimes of any JSON type. A file that loads must survive a
`to_jsonl` / `from_jsonl` round trip unchanged and is then tokenized, which also may fail only
with a CircuitsError. Run with ``--hypothesis-show-statistics`` to see how far examples got.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from circuits.errors import CircuitsError
from circuits.task import Example, Task

WORDS = "the cat sat on a mat dog ran to big red house Mary John Tom".split()
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer with an unknown token; 'doghouse' is unknown."""
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return core


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("properties")


scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
           | st.sampled_from(["\ud800", "x\udfff", "\u2028", "\x85", ""]))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6,
)
prompts = st.lists(st.sampled_from([*WORDS, "doghouse"]), max_size=6).map(" ".join)
tokens = st.sampled_from([*WORDS, "doghouse", "big-red", ""]).map(lambda w: " " + w)
token_lists = st.lists(tokens, min_size=1, max_size=3)


def mostly(right):
    """Nine times in ten a value of the right kind, else any JSON value."""
    return st.integers(0, 9).flatmap(lambda pick: json_values if pick == 9 else right)


@st.composite
def near_valid(draw):
    """A record with the right keys; the corrupted prompt usually differs in one word."""
    words = draw(st.lists(st.sampled_from([*WORDS, "doghouse"]), max_size=5))
    corrupt = list(words)
    if corrupt:
        corrupt[draw(st.integers(0, len(corrupt) - 1))] = draw(st.sampled_from(WORDS))
    record = {
        "clean": draw(mostly(st.just(" ".join(words)))),
        "corrupt": draw(mostly(st.just(" ".join(corrupt)) | prompts)),
        "answers": draw(mostly(token_lists | tokens)),
    }
    if draw(st.booleans()):
        record["wrong"] = draw(mostly(token_lists | tokens))
    if draw(st.integers(0, 4)) == 0:
        record["meta"] = draw(mostly(st.just({"k": 1})))
    return record


any_record = st.fixed_dictionaries({}, optional={
    key: json_values for key in ("clean", "corrupt", "answers", "answer", "wrong", "meta")})
lines = st.one_of(
    st.builds(lambda record, ascii_only: json.dumps(record, ensure_ascii=ascii_only),
              near_valid() | any_record, st.booleans()),
    json_values.map(json.dumps),
    st.text(max_size=30),
    st.just(""),
)


def _join(parts: list[str], end: str) -> bytes:
    return end.join(parts).encode("utf-8", "surrogatepass")


chaotic_files = st.one_of(
    st.builds(_join, st.lists(lines, max_size=4), st.sampled_from(["\n", "\r\n"])),
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
near_valid_files = st.builds(
    _join, st.lists(near_valid().map(json.dumps), min_size=1, max_size=4), st.just("\n"))


def _kind(exc: Exception) -> str:
    """The gist of an error message, without file, line or values, for the statistics."""
    text = re.sub(r"^.*?(: line \d+|\.jsonl)[: ]*", "", str(exc))
    return " ".join(text.split("(")[0].split()[:5])


def _check(path, data, tokenizer):
    """Load `data` from `path`; what loads must round-trip and tokenize or be refused."""
    path.write_bytes(data)
    try:
        task = Task.from_jsonl(path, name="t")
    except CircuitsError as exc:
        event(f"refused: {_kind(exc)}")
        return
    path.unlink()
    task.to_jsonl(path)
    assert Task.from_jsonl(path, name="t") == task
    try:
        batches = task.batches(tokenizer, batch_size=2, max_length=4)
    except CircuitsError as exc:
        event(f"loaded, not tokenized: {_kind(exc)}")
        return
    event("loaded and tokenized")
    assert sum(b.size for b in batches) == len(task)
    assert all(b.length <= 4 for b in batches)


@SETTINGS
@given(data=chaotic_files)
def test_any_file_loads_or_raises_a_circuits_error(folder, tokenizer, data):
    _check(folder / "chaotic.jsonl", data, tokenizer)


@SETTINGS
@given(data=near_valid_files)
def test_near_valid_records_load_or_raise_a_circuits_error(folder, tokenizer, data):
    _check(folder / "near.jsonl", data, tokenizer)


texts = st.text(max_size=12)


@SETTINGS
@given(rows=st.lists(st.tuples(texts, texts, st.lists(texts, min_size=1, max_size=2),
                               st.lists(texts, max_size=2)), min_size=1, max_size=4))
def test_any_valid_task_round_trips(folder, rows):
    examples = []
    for clean, corrupt, answers, wrong in rows:
        try:
            examples.append(Example(clean, corrupt, tuple(answers), tuple(wrong)))
        except CircuitsError:  # e.g. clean == corrupt or an answer also wrong
            continue
    if not examples:
        return
    task = Task("t", tuple(examples))
    task.to_jsonl(folder / "round.jsonl")
    assert Task.from_jsonl(folder / "round.jsonl", name="t") == task
