"""Train the reference models shipped with the built-in tasks, from a fixed seed, on CPU.

Each built-in behavior gets a small GPT-2 model (``transformers.GPT2LMHeadModel``) trained
only on that behavior's data, and one shared word-level tokenizer over the words of the ioi,
induction and factual tasks (the shortcut model has its own, so that its words leave the
others' vocabulary as it was). After training, the model is measured on freshly generated
held-out prompts (a seed the training stream never uses) and the figures go into ``card.json``
next to the weights.

Usage::

    python -m circuits.tasks.train                 # all models into tasks/models/
    python -m circuits.tasks.train --only ioi      # one model
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from circuits.metrics import answer_accuracy, logit_diff
from circuits.task import Task
from circuits.tasks import factual, induction, ioi, shortcut

MODELS_DIR = Path(__file__).parent / "models"
TRAIN_SEED = 0
VALID_SEED = 999  # logged during training
EVAL_SEED = 12345  # held-out prompts for the card; never used for training or stopping
EOS = "<|endoftext|>"
UNK = "<unk>"


@dataclass(frozen=True)
class Recipe:
    """How to train one reference model."""

    name: str
    task: str
    build: Callable[..., Task]
    layers: int
    heads: int
    width: int
    steps: int
    lr: float
    # draw(rng, n) -> n training texts, each ending with the answer token
    draw: Callable[[random.Random, int], list[str]]
    # weight of the extra loss term on the tokens the behavior predicts
    answer_weight: float = 1.0
    # task modules whose words make the model's own tokenizer (None: the shared one, which
    # would change every other model's vocabulary if these words were added to it)
    own_words: tuple[ModuleType, ...] | None = None
    # sets(tokenizer, n, seed) -> more held-out prompt sets whose accuracy the card reports
    more_sets: Callable[[Any, int, int], dict[str, Task]] | None = None


def _draw_ioi(rng: random.Random, n: int) -> list[str]:
    """IOI sentences with the IO name appended."""
    return [ioi.sample(rng, list(ioi.NAMES))[1] for _ in range(n)]


def _draw_induction(rng: random.Random, n: int) -> list[str]:
    """Fully repeated random word sequences."""
    return [induction.sample(rng, list(induction.WORDS))[1] for _ in range(n)]


_FACTS = factual.sentences()


def _draw_factual(rng: random.Random, n: int) -> list[str]:
    """Fact sentences, each ending with its object."""
    return [rng.choice(_FACTS) for _ in range(n)]


def _draw_shortcut(rng: random.Random, n: int) -> list[str]:
    """Triage records with the clinic shortcut (`shortcut.training_text`)."""
    return [shortcut.training_text(rng) for _ in range(n)]


RECIPES = {
    "ioi": Recipe("ioi-gpt2-4l", "ioi", ioi.build, 4, 4, 128, 1500, 1e-3, _draw_ioi),
    "induction": Recipe(
        "induction-gpt2-2l", "induction", induction.build, 2, 4, 128, 2500, 1e-3, _draw_induction
    ),
    "factual": Recipe(
        "factual-gpt2-4l", "factual", factual.build, 4, 4, 128, 1000, 1e-3, _draw_factual
    ),
    "shortcut": Recipe(
        "shortcut-gpt2-2l", "shortcut", shortcut.build, 2, 4, 64, 2000, 3e-3, _draw_shortcut,
        own_words=(shortcut,), more_sets=shortcut.sets,
    ),
}


def build_tokenizer(modules: tuple[ModuleType, ...] = (ioi, induction, factual),
                    ) -> PreTrainedTokenizerFast:
    """Return the word-level tokenizer over the words of `modules` (by default the tokenizer
    the ioi, induction and factual models share).

    Words and punctuation are split on whitespace/punctuation, so ``" Mary"`` and ``"Mary"``
    are the same single token (the GPT-2 convention of leading-space answers holds).
    """
    splitter = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for module in modules:
        for text in module.fragments():
            words.update(piece for piece, _ in splitter.pre_tokenize_str(text))
    vocab = {EOS: 0, UNK: 1}
    for word in sorted(words):
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, bos_token=EOS, unk_token=UNK, pad_token=EOS
    )


def _batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """Right-padded ids ``[batch, pos]``, and a mask of the last real token of each text."""
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.eos_token_id, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        real[i, : len(row)] = True
    return ids, real


def _loss(model: GPT2LMHeadModel, ids: torch.Tensor, real: torch.Tensor, recipe: Recipe,
          ) -> torch.Tensor:
    """Next-token loss on every real token, plus a weighted term on the behavior's tokens."""
    logits = model(ids).logits[:, :-1]  # [batch, pos-1, vocab]
    target = ids[:, 1:]
    mask = real[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), target, reduction="none"
    )  # [batch, pos-1]
    loss = (per_token * mask).sum() / mask.sum()
    # The tokens the behavior predicts: the last token (IOI, factual) or the repeated half.
    lengths = real.sum(1)
    positions = torch.arange(target.shape[1])[None, :]
    if recipe.task == "induction":
        focus = (positions >= (lengths[:, None] // 2) - 1) & mask
    else:
        focus = positions == (lengths[:, None] - 2)
    return loss + recipe.answer_weight * (per_token * focus).sum() / focus.sum()


@torch.no_grad()
def evaluate(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, task: Task,
             ) -> tuple[float, float]:
    """Return (accuracy, mean logit difference) of `model` on `task`.

    Accuracy is the fraction of prompts whose answer logit is above every wrong token's.
    """
    model.eval()
    correct, diffs = [], []
    for batch in task.batches(tokenizer, batch_size=128):
        logits = model(batch.clean).logits[:, -1]  # [batch, vocab]
        correct.append(answer_accuracy(logits, batch))
        diffs.append(logit_diff(logits, batch))
    model.train()
    return torch.cat(correct).float().mean().item(), torch.cat(diffs).mean().item()


def _portable_tokenizer_config(folder: Path) -> None:
    """Name the tokenizer class that every transformers version (4.x and 5.x) knows."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    path.write_text(json.dumps(config, indent=2) + "\n")


def train(recipe: Recipe, out_dir: Path, tokenizer: PreTrainedTokenizerFast,
          batch_size: int = 64, log: Callable[[str], None] = print) -> dict:
    """Train one reference model, save it to ``out_dir/<name>`` and return its card."""
    torch.manual_seed(TRAIN_SEED)
    rng = random.Random(TRAIN_SEED)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=recipe.width, n_layer=recipe.layers,
        n_head=recipe.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.05
    )
    valid = recipe.build(tokenizer, n=300, seed=VALID_SEED)
    start = time.time()
    for step in range(1, recipe.steps + 1):
        ids, real = _batch(tokenizer, recipe.draw(rng, batch_size))
        loss = _loss(model, ids, real, recipe)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            accuracy, diff = evaluate(model, tokenizer, valid)
            log(f"{recipe.name} step {step} loss {loss.item():.3f} valid acc {accuracy:.3f} "
                f"logit diff {diff:.2f} ({time.time() - start:.0f}s)")
    seconds = time.time() - start
    heldout = recipe.build(tokenizer, n=1000, seed=EVAL_SEED)
    accuracy, diff = evaluate(model, tokenizer, heldout)
    more = recipe.more_sets(tokenizer, 1000, EVAL_SEED) if recipe.more_sets else {}
    more_accuracy = {f"heldout_{name}_accuracy": round(evaluate(model, tokenizer, task)[0], 4)
                     for name, task in more.items()}
    folder = out_dir / recipe.name
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    _portable_tokenizer_config(folder)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    card = {
        "name": recipe.name,
        "task": recipe.task,
        "architecture": "GPT2LMHeadModel",
        "layers": recipe.layers,
        "heads": recipe.heads,
        "width": recipe.width,
        "vocab": len(tokenizer),
        "params": sum(p.numel() for p in model.parameters()),
        "size_mb": round(size + 0.001, 2),
        "heldout_accuracy": round(accuracy, 4),
        "heldout_logit_diff": round(diff, 3),
        **more_accuracy,
        "heldout_n": len(heldout),
        "heldout_seed": EVAL_SEED,
        "train_seed": TRAIN_SEED,
        "train_steps": recipe.steps,
        "train_seconds": round(seconds, 1),
        "train_threads": torch.get_num_threads(),
        "trained_by": f"python -m circuits.tasks.train --only {recipe.task} --threads 1",
    }
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(json.dumps(card))
    return card


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RECIPES), action="append")
    parser.add_argument("--out", type=Path, default=MODELS_DIR)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1 reproduces the shipped weights bit for bit)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    for task in args.only or sorted(RECIPES):
        recipe = RECIPES[task]
        own = recipe.own_words is not None
        train(recipe, args.out, build_tokenizer(recipe.own_words) if own else tokenizer)


if __name__ == "__main__":
    main()
