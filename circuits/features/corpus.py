"""The texts an SAE is trained and measured on, and the token batches made from them.

`read_texts` reads a corpus: a text file, a JSONL file, a folder of text files, or the clean
prompts of a task. `token_batches` turns the texts into rows of token ids of one length, as
language models are pretrained on: documents one after another with a separator token between
them, cut into rows, tokenised lazily one text at a time so that memory is bounded by a batch.
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CircuitsError, OptionError
from ..model import Model
from ..task import Task, get_task, prefix_ids

#: The most bytes of text `read_texts` reads (1 GiB); a longer corpus is cut with a warning.
MAX_BYTES = 2**30


#: The corpus forms `read_texts` reads, as the commands' --texts help says them.
CORPUS_HELP = ("a text file (documents separated by blank lines), a .jsonl file of "
               "{\"text\": ...}, a folder of .txt files, or a task (its clean prompts)")


def read_texts(spec: str | os.PathLike, max_bytes: int = MAX_BYTES, n: int | None = None,
               seed: int = 0) -> list[str]:
    """The documents of a corpus.

    Parameters
    ----------
    spec : str or path-like
        One of

        - a text file (UTF-8): one document per paragraph, paragraphs separated by blank lines
          (the lines of a paragraph stay together, joined by line breaks);
        - a ``.jsonl`` file whose lines are JSON objects with a ``"text"`` field (one document
          each), or a task file (lines with ``"clean"``): its clean prompts;
        - a folder: every ``*.txt`` file in it and its subfolders, in sorted path order, each
          read as a text file;
        - the name of a built-in task (``circuits tasks``): its clean prompts.
    max_bytes : int
        Read at most this many bytes of text (files beyond are left out with one warning).
    n : int, optional
        A built-in task's number of prompts (its default when None).
    seed : int
        A built-in task's seed.

    Returns
    -------
    list of str
        The non-empty documents, in order.

    Raises
    ------
    OptionError
        A missing path, an unknown task name, a file that is not UTF-8 text (NUL bytes, other
        encodings, a device), a JSONL line without a string ``"text"``, or no text at all.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "corpus.txt"
    >>> _ = path.write_text("The cat sat.\\nIt purred.\\n\\n\\nA dog barked.\\n")
    >>> read_texts(path)
    ['The cat sat.\\nIt purred.', 'A dog barked.']
    >>> len(read_texts("ioi", n=2))  # a built-in task's clean prompts
    2
    """
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise OptionError(f"corpus folder {path} holds no .txt files; put the texts in "
                              "UTF-8 .txt files, documents separated by blank lines")
    elif path.exists():
        files = [path]
    elif path.suffix.lower() in (".txt", ".jsonl", ".json") or os.sep in str(spec):
        raise OptionError(f"corpus {spec} does not exist; pass a text file, a .jsonl file, a "
                          "folder of .txt files or a built-in task name")
    else:
        return _task_texts(str(spec), n, seed)
    texts: list[str] = []
    budget = max_bytes
    for file in files:
        data, cut = _read_bytes(file, budget)
        budget -= len(data)
        texts += _jsonl_texts(file, data) if file.suffix.lower() == ".jsonl" else \
            _paragraphs(_decode(file, data))
        if cut:
            warnings.warn(f"corpus {spec}: read the first {max_bytes:,} bytes of text, up to "
                          f"a line of {file}; the rest is left out", stacklevel=2)
            break
    if not texts:
        raise OptionError(f"corpus {spec} holds no text; put documents in it (separated by "
                          "blank lines in a text file)")
    return texts


def _task_texts(name: str, n: int | None, seed: int) -> list[str]:
    """The clean prompts of a built-in task."""
    try:
        task = get_task(name, n=n, seed=seed)
    except OptionError:
        raise OptionError(f"corpus {name!r} is neither a file, a folder nor a built-in task; "
                          "pass a text or .jsonl file, a folder of .txt files, or a name from "
                          "`circuits tasks`") from None
    return [e.clean for e in task.examples]


def _read_bytes(file: Path, budget: int) -> tuple[bytes, bool]:
    """The bytes of a regular file, and whether they were cut: at most `budget`, ending at a
    line break when cut."""
    try:
        mode = file.stat().st_mode
        if not stat.S_ISREG(mode):
            raise OptionError(f"corpus file {file} is not a regular file; pass a UTF-8 text "
                              "or .jsonl file")
        with file.open("rb") as f:
            data = f.read(budget + 1)
    except OSError as err:
        raise OptionError(f"cannot read corpus file {file} ({err.strerror or err}); check "
                          "the path and its permissions") from None
    if b"\0" in data:
        raise OptionError(f"corpus file {file} holds NUL bytes: it is not a text file; pass "
                          "UTF-8 text")
    if len(data) <= budget:
        return data, False
    return data[:data.rfind(b"\n", 0, budget) + 1], True


def _decode(file: Path, data: bytes) -> str:
    """UTF-8 text (a byte-order mark allowed), or a one-line error naming the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise OptionError(f"corpus file {file} is not UTF-8 text (byte 0x{data[err.start]:02x} "
                          f"on line {line}); save it as UTF-8") from None


def _paragraphs(text: str) -> list[str]:
    """The blank-line-separated paragraphs of `text`, stripped, empty ones left out."""
    paragraphs, lines = [], []
    for line in text.splitlines():
        if line.strip():
            lines.append(line.rstrip())
        elif lines:
            paragraphs.append("\n".join(lines).strip())
            lines = []
    if lines:
        paragraphs.append("\n".join(lines).strip())
    return paragraphs


def _jsonl_texts(file: Path, data: bytes) -> list[str]:
    """The ``"text"`` of each line of a JSONL file, or a task file's clean prompts."""
    text = _decode(file, data)
    records: list[Any] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise OptionError(f"corpus file {file}: line {number} is not a JSON object; write "
                              'one {"text": ...} object per line') from None
        if not records and isinstance(record, dict) and "clean" in record and "text" not in \
                record:
            return _task_file_texts(file)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise OptionError(f'corpus file {file}: line {number} has no string "text" field; '
                              'write one {"text": ...} object per line')
        records.append(record["text"])
    return [t.strip() for t in records if t.strip()]


def _task_file_texts(file: Path) -> list[str]:
    """The clean prompts of a task JSONL file (its errors as one line)."""
    try:
        return [e.clean for e in Task.from_jsonl(file).examples]
    except CircuitsError as err:
        raise OptionError(f"corpus {err}") from None


def token_batches(model: Model, texts: Iterable[str], context: int, batch_size: int,
                  bos: bool | None = None) -> Iterator[torch.Tensor]:
    """Rows of token ids ``[batch, context]`` made from `texts`, streamed.

    The documents are tokenised one at a time and laid end to end, each followed by the
    tokenizer's EOS token (its BOS where it has no EOS), as in pretraining; the stream is cut
    into rows of ``context`` tokens, each row led by the tokens the tokenizer puts before a
    text (`circuits.task.prefix_ids`: a BOS for Llama and Gemma, nothing for GPT-2). The last
    batch may hold fewer rows; a tail shorter than a row is left out. Memory is bounded by a
    batch and the longest document's tokens.

    Parameters
    ----------
    model : Model
        Its tokenizer tokenises; the batches are on its device.
    texts : iterable of str
    context : int
        Tokens per row, the prefix included (more than the prefix's length).
    batch_size : int
        Rows per batch.
    bos : bool or None
        The row prefix: None the tokenizer's convention, True its BOS, False nothing.

    Yields
    ------
    Tensor
        ``[rows, context]`` int64 token ids, ``rows <= batch_size``.

    Examples
    --------
    >>> from circuits import load_model
    >>> model = load_model("ioi-gpt2-4l")
    >>> batches = list(token_batches(model, read_texts("ioi", n=20), context=16, batch_size=8))
    >>> [tuple(b.shape) for b in batches][:2]
    [(8, 16), (8, 16)]
    """
    tokenizer = model.tokenizer
    prefix = prefix_ids(tokenizer, bos)
    width = context - len(prefix)
    if width < 1 or batch_size < 1:
        raise OptionError(f"a row of {context} tokens leaves no room after the tokenizer's "
                          f"{len(prefix)} prefix tokens; pass a longer context"
                          if width < 1 else f"batch_size must be at least 1, got {batch_size}")
    separator = next((t for t in (getattr(tokenizer, "eos_token_id", None),
                                  getattr(tokenizer, "bos_token_id", None))
                      if isinstance(t, int)), None)
    stream: list[int] = []
    start = 0  # the first token of `stream` not yet in a row
    rows: list[list[int]] = []
    for text in texts:
        stream += _encode(tokenizer, text) + ([] if separator is None else [separator])
        while len(stream) - start >= width:
            rows.append(prefix + stream[start:start + width])
            start += width
            if len(rows) == batch_size:
                yield torch.tensor(rows, dtype=torch.long, device=model.device)
                rows = []
        del stream[:start]  # once per document: cutting rows stays linear in the text
        start = 0
    if rows:
        yield torch.tensor(rows, dtype=torch.long, device=model.device)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a whole document without special tokens; a fast tokenizer's backend is
    used directly, since the Hugging Face wrapper warns about documents longer than the
    model's context, which are cut into rows here anyway."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)
