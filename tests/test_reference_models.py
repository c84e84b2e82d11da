"""The shipped reference models load offline and do their task on fresh held-out prompts."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import circuits.tasks
from circuits import zoo
from circuits.metrics import answer_accuracy, logit_diff
from circuits.task import get_task

MODELS = {"ioi": "ioi-gpt2-4l", "induction": "induction-gpt2-2l", "factual": "factual-gpt2-4l",
          "shortcut": "shortcut-gpt2-2l"}
FRESH_SEED = 2024  # neither the training stream (0), its validation (999) nor the card (12345)


def test_zoo_lists_every_model():
    cards = zoo.list_models()
    assert [c.name for c in cards] == sorted(MODELS.values())
    for card in cards:
        assert MODELS[card.task] == card.name
        assert card.accuracy >= 0.95 and card.logit_diff >= 2
        assert card.size_mb < 10
        assert card.line().startswith(card.name + " ")


def test_find():
    assert zoo.find("ioi-gpt2-4l") == zoo.models_dir() / "ioi-gpt2-4l"
    assert zoo.find("ioi") == zoo.find("ioi-gpt2-4l")
    assert zoo.find("gpt2") is None
    assert zoo.find("../models") is None
    # resolved from the installed package, not the working directory
    assert zoo.models_dir() == Path(circuits.tasks.__file__).parent / "models"


@pytest.mark.parametrize("task_name", sorted(MODELS))
def test_model_does_its_task_on_fresh_prompts(task_name):
    folder = zoo.find(MODELS[task_name])
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "card.json"} <= files
    assert sum(p.stat().st_size for p in folder.iterdir()) < 10 * 2**20
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = get_task(task_name, tokenizer, n=300, seed=FRESH_SEED)
    assert task.reference_model == MODELS[task_name]
    correct, diffs = [], []
    with torch.no_grad():
        for batch in task.batches(tokenizer, batch_size=100):
            assert batch.length <= model.config.n_positions
            logits = model(batch.clean).logits[:, -1]  # [batch, vocab]
            correct.append(answer_accuracy(logits, batch))
            diffs.append(logit_diff(logits, batch))
    accuracy = torch.cat(correct).float().mean().item()
    diff = torch.cat(diffs).mean().item()
    assert accuracy >= 0.95, f"{MODELS[task_name]} accuracy {accuracy:.3f}"
    assert diff >= 2, f"{MODELS[task_name]} logit diff {diff:.2f}"
    card = json.loads((folder / "card.json").read_text())
    assert card["heldout_accuracy"] >= 0.95 and card["heldout_logit_diff"] >= 2
