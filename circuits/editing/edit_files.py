"""The edits a user asks for: ``--fact "SUBJECT | PROMPT | NEW TARGET"`` texts and JSONL files,
checked line by line before a model is loaded, and the checks that need its tokenizer.

A JSONL line is an object with ``"subject"``, ``"prompt"`` (which names the subject) and
``"target"`` (the new continuation), and optionally ``"paraphrases"`` (other prompts that
should give the new target), ``"neighbours"`` (prompts about other subjects whose prediction
should stay) and ``"old"`` (the true target; by default the model's prediction before the
edit). Every mistake is one `OptionError` line naming where it is (``--fact 2``, ``FILE line
3``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from circuits.editing.edits import Edit, target_ids
from circuits.editing.score import FactEdit, factual_context
from circuits.errors import OptionError
from circuits.model import Model
from circuits.task_tokens import prefix_ids

__all__ = ["FACT_HELP", "EDITS_HELP", "parse_fact", "read_edits", "with_context",
           "check_cases", "MAX_BYTES"]

FACT_HELP = "SUBJECT | PROMPT | NEW TARGET"
EDITS_HELP = ('a JSONL file, one edit a line: {"subject", "prompt", "target", "paraphrases"?: '
              '[...], "neighbours"?: [...], "old"?}')
MAX_BYTES = 64 * 2**20  # an edits file past this is not a list of facts
_KEYS = ("subject", "prompt", "target", "paraphrases", "neighbours", "old")


def parse_fact(text: str, where: str = "--fact") -> FactEdit:
    """One edit from ``"SUBJECT | PROMPT | NEW TARGET"``.

    Examples
    --------
    >>> parse_fact("Big Ben | Big Ben is in | Rome").edit
    Edit(subject='Big Ben', prompt='Big Ben is in', target='Rome')
    >>> parse_fact("Big Ben | Rome")
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: --fact 'Big Ben | Rome' has 2 parts; write "SUBJECT | PROMPT | ...
    """
    parts = [p.strip() for p in text.split("|")]
    if len(parts) != 3:
        raise OptionError(f"{where} {text!r} has {len(parts)} parts; write \"{FACT_HELP}\" "
                          "(three parts split by |)")
    return _case({"subject": parts[0], "prompt": parts[1], "target": parts[2]}, where)


def read_edits(path: str | os.PathLike, named: bool = False
               ) -> list[FactEdit] | tuple[list[FactEdit], list[str]]:
    """The edits of a JSONL file (blank lines skipped); with `named`, also where each is
    (``"FILE line N"``), for the messages of later checks.

    Raises
    ------
    OptionError
        The file is missing, not a regular file, too large, not UTF-8 or holds no edit; a
        line is not a JSON object, lacks a field, has an unknown one or one of the wrong type,
        names a subject its prompt does not hold, or has an empty target.

    Examples
    --------
    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "e.jsonl"
    >>> _ = f.write_text('{"subject": "Big Ben", "prompt": "Big Ben is in", "target": "Rome",'
    ...                  ' "neighbours": ["The Louvre is in"]}\\n')
    >>> read_edits(f)[0].neighbours
    ('The Louvre is in',)
    >>> read_edits(f, named=True)[1] == [f"{f} line 1"]
    True
    >>> _ = f.write_text('{"subject": "Big Ben", "prompt": "It is in", "target": "Rome"}\\n')
    >>> read_edits(f)
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: ... line 1: the subject 'Big Ben' does not occur in the prompt ...
    """
    path = Path(path)
    if not path.exists():
        raise OptionError(f"--edits {path} does not exist; pass a JSONL file of edits")
    if not path.is_file():
        raise OptionError(f"--edits {path} is not a regular file; pass a JSONL file of edits")
    if path.stat().st_size > MAX_BYTES:
        raise OptionError(f"--edits {path} is over {MAX_BYTES // 2**20} MiB; a file of edits is "
                          "far smaller, pass the right file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OptionError(f"--edits {path} is not UTF-8 text; save it as UTF-8 JSONL") from None
    cases, names = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise OptionError(f"{where} is not JSON ({err.msg}); write one JSON object a "
                              "line") from None
        cases.append(_case(record, where))
        names.append(where)
    if not cases:
        raise OptionError(f"--edits {path} is empty; write one edit a line: {EDITS_HELP}")
    return (cases, names) if named else cases


def _case(record: Any, where: str) -> FactEdit:
    """A checked edit from a JSON object (or the parts of a --fact)."""
    if not isinstance(record, dict):
        raise OptionError(f"{where} is not a JSON object; write {{\"subject\", \"prompt\", "
                          "\"target\"}")
    unknown = sorted(set(record) - set(_KEYS))
    if unknown:
        raise OptionError(f"{where}: unknown field {unknown[0]!r}; the fields are "
                          f"{', '.join(_KEYS)}")
    for key in ("subject", "prompt", "target"):
        if not isinstance(record.get(key), str):
            raise OptionError(f"{where}: {key!r} is missing or not a string; every edit needs "
                              "subject, prompt and target")
    if record.get("old") is not None and not isinstance(record["old"], str):
        raise OptionError(f"{where}: 'old' must be a string (the true target)")
    lists = {}
    for key in ("paraphrases", "neighbours"):
        value = record.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip()
                                                  for v in value):
            raise OptionError(f"{where}: {key!r} must be a list of non-empty prompts")
        lists[key] = tuple(value)
    edit = Edit(record["subject"], record["prompt"], record["target"])
    if not edit.subject.strip() or edit.subject not in edit.prompt:
        raise OptionError(f"{where}: the subject {edit.subject!r} does not occur in the prompt "
                          f"{edit.prompt!r}; write the subject into the prompt")
    for paraphrase in lists["paraphrases"]:
        if edit.subject not in paraphrase:
            raise OptionError(f"{where}: the paraphrase {paraphrase!r} does not name the "
                              f"subject {edit.subject!r}")
    if not edit.target.strip():
        raise OptionError(f"{where}: the target is empty; give the new continuation")
    old = record.get("old")
    if old is not None and not old.strip():
        raise OptionError(f"{where}: 'old' is empty; give the true target or leave it out")
    return FactEdit(edit, old, lists["neighbours"], lists["paraphrases"])


def with_context(cases: Sequence[FactEdit], tokenizer: Any, seed: int = 0) -> list[FactEdit]:
    """The cases ready to measure: each given paraphrases and neighbours from the factual
    task (`circuits.editing.score.factual_context`) where it has neither and its prompt is one
    of the task's templates (the given `old` is kept), and without the neighbour prompts that
    name another edit's subject (whose answer is meant to change).

    The task's neighbours leave out the subjects of all the edits, and each edit draws them
    with its own seed (`seed` plus its index).

    Examples
    --------
    >>> c = with_context([parse_fact("Big Ben | The landmark Big Ben is located in the city "
    ...                              "of | Rome")], None)[0]
    >>> c.old is None, len(c.paraphrases), len(c.neighbours) > 0
    (True, 1, True)
    >>> a = FactEdit(Edit("A", "A is", "x"), None, ("B is", "C is"))
    >>> with_context([a, FactEdit(Edit("B", "B is", "y"), None, ())], None)[0].neighbours
    ('C is',)
    """
    subjects = {case.edit.subject for case in cases}
    out = []
    for i, case in enumerate(cases):
        found = None if case.paraphrases or case.neighbours else \
            factual_context(tokenizer, case.edit, seed=seed + i, exclude=subjects)
        if found is not None:
            case = FactEdit(case.edit, case.old, found.neighbours, found.paraphrases)
        others = subjects - {case.edit.subject}
        kept = tuple(n for n in case.neighbours if not any(s in n for s in others))
        out.append(FactEdit(case.edit, case.old, kept, case.paraphrases))
    return out


def check_cases(model: Model, cases: Sequence[FactEdit], names: Sequence[str]) -> None:
    """The checks that need the tokenizer, before any work: no target (nor old target) may
    tokenize to nothing or start with the unknown token, the old target must differ from the
    new in its first token, and every prompt with the target must fit the model's context;
    `names` says where each case came from.

    Examples
    --------
    >>> from circuits import load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> check_cases(model, [parse_fact("Big Ben | Big Ben is in | Zanzibar")], ["--fact 1"])
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: --fact 1: the target 'Zanzibar' starts with the tokenizer's ...
    """
    unk = getattr(model.tokenizer, "unk_token_id", None)
    for case, where in zip(cases, names, strict=True):
        firsts = []
        for what, text in (("target", case.edit.target), ("old target", case.old)):
            if text is None:
                continue
            ids = target_ids(model, Edit(case.edit.subject, case.edit.prompt, text))
            if not ids or (unk is not None and ids[0] == unk):
                raise OptionError(f"{where}: the {what} {text!r} starts with the tokenizer's "
                                  "unknown token; choose a target the vocabulary holds")
            firsts.append(ids[0])
        _check_lengths(model, case, len(target_ids(model, case.edit)), where)
        if len(firsts) == 2 and firsts[0] == firsts[1]:
            raise OptionError(f"{where}: the target {case.edit.target!r} and the old target "
                              f"{case.old!r} start with the same token; efficacy compares the "
                              "two, so give targets that differ in their first token")


def _check_lengths(model: Model, case: FactEdit, extra: int, where: str) -> None:
    """One line when a prompt of `case` and `extra` tokens more pass the model's context."""
    limit = model.context_length
    if limit is None:
        return
    for prompt in (case.edit.prompt, *case.paraphrases, *case.neighbours):
        length = len(prefix_ids(model.tokenizer)) + len(
            model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if length + extra > limit:
            raise OptionError(f"{where}: the prompt {prompt[:40]!r}... is {length} tokens, and "
                              f"with the target passes the model's context of {limit}; "
                              "shorten it")
