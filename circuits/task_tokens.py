"""From a task's text to token ids: the prefix put before every prompt, token counts, and the
checked, padded tensors of one `Batch` (what `Task.batches` builds).
"""

from __future__ import annotations

from typing import Any

import torch

from .batch import Batch
from .errors import OptionError, TaskError
from .example import Example, show


def encode(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    """Token ids of `text`, without special tokens unless `special` (HF tokenizers and
    `tokenizers` objects)."""
    out = tokenizer.encode(text, add_special_tokens=special)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def prefix_ids(tokenizer: Any, bos: bool | None = None) -> list[int]:
    """The token ids put before every prompt: by default what the tokenizer itself adds before
    a text (a BOS token for Llama and Gemma, nothing for GPT-2).

    The tokenizer's convention is read off one text encoded with and without its special
    tokens: what comes before the text's own tokens. Tokens it adds after a text (an EOS) are
    never used.

    Parameters
    ----------
    tokenizer : tokenizer
        A Hugging Face tokenizer or a ``tokenizers`` tokenizer.
    bos : bool or None
        None: the tokenizer's convention; False: nothing; True: the tokenizer's BOS token.

    Returns
    -------
    list of int

    Raises
    ------
    OptionError
        `bos` is True and the tokenizer has no BOS token, or `bos` is not a bool or None.

    Examples
    --------
    >>> from circuits import load_model
    >>> tok = load_model("ioi-gpt2-4l").tokenizer
    >>> prefix_ids(tok), prefix_ids(tok, bos=True), tok.bos_token_id
    ([], [0], 0)
    """
    if bos is False:
        return []
    if bos is True:
        token = getattr(tokenizer, "bos_token_id", None)
        if not isinstance(token, int):
            raise OptionError("bos=True (--bos) asks for the tokenizer's BOS token, but this "
                              "tokenizer has none; drop it")
        return [token]
    if bos is not None:
        raise OptionError(f"bos must be True, False or None (the tokenizer's convention), got "
                          f"{show(bos)}")
    probe = "Hello world"
    plain, full = encode(tokenizer, probe), encode(tokenizer, probe, special=True)
    for start in range(len(full) - len(plain) + 1 if plain else 0):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    # the text is split otherwise after the special tokens: keep the leading special ones
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    lead = []
    for token in full:
        if token not in special:
            break
        lead.append(token)
    return lead


def is_single_token(tokenizer: Any, text: str) -> bool:
    """Return whether `text` encodes to exactly one token for `tokenizer`.

    Parameters
    ----------
    tokenizer : tokenizer
        A Hugging Face tokenizer or a ``tokenizers`` tokenizer.
    text : str
        Usually a word with its leading space, e.g. ``" Mary"``.

    Returns
    -------
    bool
    """
    return len(encode(tokenizer, text)) == 1


def n_tokens(tokenizer: Any, text: str) -> int:
    """Return the number of tokens `text` encodes to (no special tokens).

    Parameters
    ----------
    tokenizer : tokenizer
        A Hugging Face tokenizer or a ``tokenizers`` tokenizer.
    text : str
        Any text.

    Returns
    -------
    int
    """
    return len(encode(tokenizer, text))


def unknown_token(tokenizer: Any) -> tuple[int, str] | None:
    """The id and text of the tokenizer's unknown token, or None when it has none."""
    token_id = getattr(tokenizer, "unk_token_id", None)  # transformers tokenizers
    if isinstance(token_id, int):
        return token_id, str(tokenizer.unk_token)
    text = getattr(getattr(tokenizer, "model", None), "unk_token", None)  # `tokenizers` ones
    to_id = getattr(tokenizer, "token_to_id", None)
    if isinstance(text, str) and text and callable(to_id):
        token_id = to_id(text)
        if isinstance(token_id, int):
            return token_id, text
    return None


def tokenize_example(
    tokenizer: Any,
    example: Example,
    max_length: int | None = None,
    unknown: tuple[int, str] | None = None,
    prefix: list[int] | None = None,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids of one example's clean and corrupt (each after `prefix`), answers and wrong,
    after checking them."""
    where = example.where()
    clean = encode(tokenizer, example.clean)
    corrupt = encode(tokenizer, example.corrupt)
    if len(clean) != len(corrupt):
        raise TaskError(
            f"{where}: clean has {len(clean)} tokens but corrupt has {len(corrupt)}; "
            "make the corrupted prompt the same token length for this tokenizer"
        )
    if not clean:
        raise TaskError(f"{where}: the prompts are no tokens for this tokenizer; give a prompt")
    prefix = prefix or []
    clean, corrupt = prefix + clean, prefix + corrupt
    if max_length is not None and len(clean) > max_length:
        lead = f", {len(prefix)} of them put before the prompt (the BOS)" if prefix else ""
        raise TaskError(
            f"{where}: the prompts are {len(clean)} tokens{lead} but the model reads at most "
            f"{max_length} (its context length); shorten the prompts or drop the example"
        )
    if clean == corrupt:
        raise TaskError(
            f"{where}: the clean and corrupted prompts are the same tokens for this tokenizer "
            "(unknown words?), so patching changes nothing; change the corrupted prompt"
        )
    ids: dict[str, list[int]] = {"answers": [], "wrong": []}
    for kind in ("answers", "wrong"):
        for text in getattr(example, kind):
            token = encode(tokenizer, text)
            if len(token) != 1:
                raise TaskError(
                    f"{where}: {kind} {text!r} is {len(token)} tokens for this "
                    "tokenizer, not one; use a single-token word (often with a leading space)"
                )
            if unknown is not None and token[0] == unknown[0] and text.strip() != unknown[1]:
                raise TaskError(
                    f"{where}: {kind} {text!r} is not in this tokenizer's vocabulary (it becomes "
                    f"the unknown token {unknown[1]!r}); use a word the model knows"
                )
            ids[kind].append(token[0])
    both = set(ids["answers"]) & set(ids["wrong"])
    if both:
        token = both.pop()
        answer = example.answers[ids["answers"].index(token)]
        wrong = example.wrong[ids["wrong"].index(token)]
        raise TaskError(
            f"{where}: answer {answer!r} and wrong answer {wrong!r} are the same token for this "
            "tokenizer, so the metric cannot tell them apart; remove one of them"
        )
    return clean, corrupt, ids["answers"], ids["wrong"]


def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Stack ragged id lists into ``[batch, n]`` padded with -1."""
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def to_batch(
    rows: list[tuple[list[int], list[int], list[int], list[int]]], device: torch.device | str,
    where: list[list[int]] | None = None,
) -> Batch:
    """Build one `Batch` from tokenized rows of equal length (and the position of each of their
    tokens, for position-resolved circuits)."""
    clean = torch.tensor([r[0] for r in rows], dtype=torch.long, device=device)  # [batch, pos]
    corrupt = torch.tensor([r[1] for r in rows], dtype=torch.long, device=device)
    answers = _pad([r[2] for r in rows]).to(device)  # [batch, n]
    wrong = _pad([r[3] for r in rows]).to(device)
    at = None if where is None else torch.tensor(where, dtype=torch.long, device=device)
    return Batch(clean, corrupt, answers, wrong, where=at)
