"""The built-in tasks give valid prompt pairs for the reference tokenizer and a GPT-2-style BPE."""

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer

from circuits import zoo
from circuits.task import get_task, list_tasks
from circuits.tasks import factual, induction, ioi

TASKS = ["ioi", "induction", "factual"]


@pytest.fixture(scope="module")
def reference_tokenizer():
    return AutoTokenizer.from_pretrained(zoo.find("ioi-gpt2-4l"))


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A GPT-2-style byte-level BPE trained here on text holding the task words."""
    text = []
    for module in (ioi, induction, factual):
        text += module.fragments() * 3
    text += [" ".join(ioi.NAMES), " ".join(induction.WORDS)] * 3
    tokenizer = ByteLevelBPETokenizer()
    # a smaller vocabulary leaves rarer words split, so the filters are exercised too
    tokenizer.train_from_iterator(text, vocab_size=1500, min_frequency=1, show_progress=False)
    return tokenizer


def _check_valid(task, tokenizer):
    batches = task.batches(tokenizer, batch_size=64)  # raises TaskError on any invalid pair
    assert sum(b.size for b in batches) == len(task)
    for batch in batches:
        assert batch.clean.shape == batch.corrupt.shape
        assert (batch.clean != batch.corrupt).any(dim=1).all()
        answers, wrong = batch.answers[:, :1], batch.wrong
        assert not (wrong == answers).any()


@pytest.mark.parametrize("name", TASKS)
def test_prompts_valid_for_reference_tokenizer(name, reference_tokenizer):
    task = get_task(name, reference_tokenizer, n=200, seed=3)
    assert task.name == name and len(task) == 200
    assert zoo.find(task.reference_model) is not None
    _check_valid(task, reference_tokenizer)


@pytest.mark.parametrize("name", TASKS)
def test_prompts_valid_for_bpe_tokenizer(name, bpe_tokenizer):
    task = get_task(name, bpe_tokenizer, n=200, seed=3)
    _check_valid(task, bpe_tokenizer)


def test_bpe_filters_leave_enough_words(bpe_tokenizer):
    names = ioi.usable_names(bpe_tokenizer)
    assert 3 <= len(names) <= len(ioi.NAMES)
    assert len(induction.usable_words(bpe_tokenizer)) >= 2 * induction.MAX_HALF
    assert len({f[2] for f in factual.facts(bpe_tokenizer)}) >= 5


def test_registry_lists_builtins():
    listed = dict(list_tasks())
    assert set(TASKS) <= set(listed)
    assert all(listed[name] for name in TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_seeds(name):
    assert get_task(name, n=20, seed=1) == get_task(name, n=20, seed=1)
    assert get_task(name, n=20, seed=1) != get_task(name, n=20, seed=2)


def test_ioi_structure():
    task = get_task("ioi", n=400, seed=0)
    orders = {e.meta["order"] for e in task.examples}
    assert orders == {"ABBA", "BABA"}
    assert len({e.clean.split(",")[0].split(".")[0][:6] for e in task.examples}) > 3
    for example in task.examples:
        io, s = example.answers[0].strip(), example.wrong[0].strip()
        words = example.clean.replace(",", " ").replace(".", " ").split()
        assert words.count(io) == 1 and words.count(s) == 2
        corrupt = example.corrupt.replace(",", " ").replace(".", " ").split()
        assert corrupt.count(io) == 1 and corrupt.count(s) == 1  # ABC: three distinct names
        assert len(set(corrupt) & set(ioi.NAMES)) == 3


def test_induction_structure():
    for example in get_task("induction", n=100, seed=0).examples:
        words = example.clean.split()
        half = example.meta["half"]
        first, repeat = words[:half], words[half:]
        assert first[: len(repeat)] == repeat
        assert example.answers == (" " + first[len(repeat)],)
        assert len(example.wrong) == half - 1
        assert not set(example.corrupt.split()[half:]) & set(first)


def test_factual_answer_never_in_prompt(reference_tokenizer):
    for example in get_task("factual", n=200, seed=0).examples:
        assert example.answers[0].strip() not in example.clean.split()
        assert example.answers != example.wrong
        assert example.meta["subject"] in example.clean
        assert example.meta["corrupt_subject"] in example.corrupt
        positions = factual.subject_positions(example, reference_tokenizer)
        assert len(positions) >= 2
        ids = reference_tokenizer.encode(example.clean, add_special_tokens=False)
        subject = reference_tokenizer.encode(" " + example.meta["subject"],
                                             add_special_tokens=False)
        assert [ids[p] for p in positions] == subject


def test_factual_subject_positions_bpe(bpe_tokenizer):
    example = get_task("factual", bpe_tokenizer, n=1, seed=0).examples[0]
    positions = factual.subject_positions(example, bpe_tokenizer)
    ids = bpe_tokenizer.encode(example.clean).ids
    subject = bpe_tokenizer.encode(" " + example.meta["subject"]).ids
    assert [ids[p] for p in positions] == subject
