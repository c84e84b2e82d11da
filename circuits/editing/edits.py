"""Edits (a subject, a prompt that names it, a new target), their checks and their token rows,
and applying weight changes to a model: in place for a block, or to a copy."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from circuits.errors import OptionError
from circuits.model import Model
from circuits.task_tokens import prefix_ids

__all__ = ["Edit", "Rows", "key_text", "target_ids", "check_edits", "rows", "contexts",
           "neutral_contexts", "applied", "edited"]


@dataclass(frozen=True)
class Edit:
    """One fact to write: the model should continue `prompt` with `target`.

    Attributes
    ----------
    subject : str
        Occurs in `prompt`; the edit is keyed on its last token.
    prompt : str
        E.g. ``"The landmark Eiffel Tower is located in the city of"``.
    target : str
        The new continuation, e.g. ``"Rome"``; a leading space is added when it has none.
    """

    subject: str
    prompt: str
    target: str


def key_text(edit: Edit) -> str:
    """The prompt up to the end of the subject's last occurrence: in a causal model, edits with
    the same key text have the same key (the MLP input at the subject's last token).

    >>> key_text(Edit("Big Ben", "The landmark Big Ben is located in the city of", "Rome"))
    'The landmark Big Ben'
    """
    return edit.prompt[:edit.prompt.rindex(edit.subject) + len(edit.subject)]


def target_ids(model: Model, edit: Edit) -> list[int]:
    """The target's token ids (with a leading space).

    Examples
    --------
    >>> from circuits import load_model
    >>> tok = load_model("factual-gpt2-4l").tokenizer
    >>> target_ids(load_model("factual-gpt2-4l"), Edit("Big Ben", "Big Ben is in", "Rome")) \\
    ...     == tok(" Rome")["input_ids"]
    True
    """
    text = edit.target if edit.target.startswith(" ") else " " + edit.target
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def check_edits(model: Model, edits: Sequence[Edit]) -> list[list[int]]:
    """Check every edit before any slow work; return each target's token ids.

    Raises
    ------
    OptionError
        No edits, a subject that is empty or not in its prompt, an empty target, or a target
        whose first token is the tokenizer's unknown token.

    Examples
    --------
    >>> from circuits import load_model
    >>> check_edits(load_model("factual-gpt2-4l"), [Edit("Big Ben", "Big Ben is in", "")])
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: edit 1: the target is empty; give the new continuation
    """
    if not edits:
        raise OptionError("no edits given; pass at least one Edit(subject, prompt, target)")
    out = []
    unk = getattr(model.tokenizer, "unk_token_id", None)
    for i, edit in enumerate(edits, 1):
        if not edit.subject.strip() or edit.subject not in edit.prompt:
            raise OptionError(f"edit {i}: the subject {edit.subject!r} does not occur in the "
                              f"prompt {edit.prompt!r}; write the subject into the prompt")
        if not edit.target.strip():
            raise OptionError(f"edit {i}: the target is empty; give the new continuation")
        ids = target_ids(model, edit)
        if not ids or (unk is not None and ids[0] == unk):
            raise OptionError(f"edit {i}: the target {edit.target!r} starts with the "
                              "tokenizer's unknown token; choose a target the vocabulary holds")
        out.append(ids)
    return out


@dataclass(frozen=True)
class Rows:
    """Token rows of one edit's prompt after several context prefixes, padded on the right.

    Attributes
    ----------
    ids, mask : Tensor
        ``[rows, pos]`` token ids and attention mask.
    subject : Tensor
        ``[rows]`` position of the subject's last token.
    answer : Tensor
        ``[rows]`` position whose logits predict the target's first token.
    """

    ids: Tensor
    mask: Tensor
    subject: Tensor
    answer: Tensor


def rows(model: Model, prompts: Sequence[str], subject: str, target: Sequence[int] = ()) -> Rows:
    """Rows of `prompts` (each containing `subject`) followed by all but the last target token.

    Examples
    --------
    >>> from circuits import load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> r = rows(model, ["The landmark Big Ben is located in the city of"], "Big Ben")
    >>> int(r.subject[0]), int(r.answer[0]) == r.ids.shape[1] - 1
    (3, True)
    """
    tok, lead = model.tokenizer, prefix_ids(model.tokenizer)
    seqs, subj, answer = [], [], []
    for prompt in prompts:
        end = prompt.rindex(subject) + len(subject)
        ids = lead + tok(prompt, add_special_tokens=False)["input_ids"]
        subj.append(len(lead) + len(tok(prompt[:end], add_special_tokens=False)["input_ids"]) - 1)
        answer.append(len(ids) - 1)
        seqs.append(ids + list(target[:-1]))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    device = model.device
    return Rows(ids.to(device), mask.to(device), torch.tensor(subj, device=device),
                torch.tensor(answer, device=device))


def contexts(model: Model, n: int = 4, length: int = 5, seed: int = 0) -> list[str]:
    """``"{}"`` and `n` templates ``"<text>. {}"`` whose text the model samples (`length`
    tokens from its EOS token, a seeded `torch.Generator`), so keys and values are averaged
    over contexts the model finds natural (Meng et al., 2022).

    Examples
    --------
    >>> from circuits import load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> contexts(model, 2) == contexts(model, 2)
    True
    >>> contexts(model, 2)[0]
    '{}'
    """
    if n < 1:
        return ["{}"]
    tok = model.tokenizer
    start = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((n, 1), start, dtype=torch.long)
    with torch.no_grad():
        for _ in range(length):
            rows_ = ids.to(model.device)
            logits = model.hf(rows_, attention_mask=torch.ones_like(rows_)).logits[:, -1]
            logits = logits.float().cpu()
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=gen)], 1)
    texts = [tok.decode(row[1:], skip_special_tokens=True).replace("{", "").replace("}", "")
             for row in ids]
    return ["{}"] + [f"{text.strip()}. {{}}" for text in texts]


def neutral_contexts(model: Model, templates: Sequence[str], prompt: str) -> list[str]:
    """The `templates` after which the model still predicts what it predicts after `prompt`
    alone (``"{}"`` always kept).

    A context the model reads as part of the fact (a small model trained on single sentences
    reads another subject in it) would average the key and value over prompts that no longer
    ask the same question; those are dropped.

    Examples
    --------
    >>> from circuits import load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> prompt = "The athlete Maria Sharapova is a professional in the sport of"
    >>> neutral_contexts(model, ["{}", "as a star of the. {}", "know Michael Phelps as a. {}"],
    ...                  prompt)  # the last makes this model answer "basketball"
    ['{}', 'as a star of the. {}']
    """
    if all(t.format(prompt) == prompt for t in templates):  # no prefix: nothing to run
        return list(templates)
    kept = []
    with torch.no_grad():
        plain = int(model.hf(model.tokenize([prompt])).logits[0, -1].argmax())
        for template in templates:
            text = template.format(prompt)
            if text == prompt or int(model.hf(model.tokenize([text])).logits[0, -1].argmax()) \
                    == plain:
                kept.append(template)
    return kept


@contextlib.contextmanager
def applied(model: Model, deltas: Mapping[str, Tensor]) -> Iterator[Model]:
    """Add `deltas` (parameter name -> change) to the model's weights for the block; the
    original values are restored on leaving it, also on error.

    Examples
    --------
    >>> from circuits.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> w = model.hf.transformer.h[0].mlp.c_proj.weight
    >>> before = w.clone()
    >>> with applied(model, {"transformer.h.0.mlp.c_proj.weight": torch.ones_like(w)}):
    ...     bool(torch.equal(w, before + 1))
    True
    >>> bool(torch.equal(w, before))
    True
    """
    saved = {name: value.detach().clone() for name, value in _params(model, deltas).items()}
    try:
        _add(model, deltas)
        yield model
    finally:
        params = dict(model.hf.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def edited(model: Model, deltas: Mapping[str, Tensor]) -> Model:
    """A copy of `model` with `deltas` added to its weights; `model` is unchanged.

    Examples
    --------
    >>> from circuits.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> name = "transformer.h.0.mlp.c_proj.weight"
    >>> copy = edited(model, {name: torch.ones(128, 32)})
    >>> float((copy.hf.get_parameter(name) - model.hf.get_parameter(name)).mean().detach())
    1.0
    """
    out = Model(hf=copy.deepcopy(model.hf), tokenizer=model.tokenizer,
                name=f"{model.name} (edited)")
    _add(out, deltas)
    return out


def _params(model: Model, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The parameters `deltas` names; one line when the model has no such parameter."""
    params = dict(model.hf.named_parameters())
    unknown = [name for name in deltas if name not in params]
    if unknown:
        raise OptionError(f"{model.name} has no parameter {unknown[0]}; the edit was made for "
                          "another model")
    return {name: params[name] for name in deltas}


def _add(model: Model, deltas: Mapping[str, Tensor]) -> None:
    """Add `deltas` to the model's weights in place."""
    with torch.no_grad():
        for name, param in _params(model, deltas).items():
            param.add_(deltas[name].to(param.device, param.dtype))
