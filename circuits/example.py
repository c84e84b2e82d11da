"""Example: one clean/corrupted prompt pair, checked when it is made.

Also the checks every task input goes through (strings, valid Unicode, list-likes) and
`show`, which names a bad value and its JSON kind in error messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import TaskError


@dataclass(frozen=True)
class Example:
    """One clean/corrupted prompt pair.

    Attributes
    ----------
    clean : str
        The prompt that shows the behavior.
    corrupt : str
        The same prompt with the behavior removed; must differ from the clean prompt and have
        its token length.
    answers : tuple of str
        Tokens that show the behavior (each a single token, e.g. ``" Mary"``).
    wrong : tuple of str
        Tokens the behavior argues against (each a single token, none of them an answer).
    meta : mapping
        Free-form extra data (e.g. the subject string of a factual prompt). Not compared.
    line : int or None
        Source line in a JSONL file, used in error messages. Not compared.
    file : str or None
        The JSONL file, used in error messages. Not compared.
    spans : mapping of str to (int, int)
        Named spans of the prompt for position-resolved circuits (``{"S1": (2, 3), "END": (13,
        14)}``): token positions ``start`` (inclusive) to ``end`` (exclusive) of the prompt as
        tokenized, not counting what the model puts before it (a BOS token). Spans may not
        overlap; tokens in no span belong to the span ``other``. Not compared.

    Raises
    ------
    TaskError
        A field has the wrong type or is not valid Unicode, there is no answer, a token is both
        an answer and a wrong answer, or the two prompts are the same.
    """

    clean: str
    corrupt: str
    answers: tuple[str, ...]
    wrong: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    line: int | None = field(default=None, compare=False)
    file: str | None = field(default=None, compare=False, repr=False)
    spans: Mapping[str, tuple[int, int]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        where = self.where()
        for name in ("clean", "corrupt"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TaskError(f"{where}: {name} must be a string, got {show(value)}; write "
                                f'e.g. "{name}": "When Mary and John went to the store"')
            _check_unicode(where, name, value)
            if not value.strip():
                raise TaskError(f"{where}: the {name} prompt is empty; give a prompt")
        for name in ("answers", "wrong"):
            object.__setattr__(self, name, _strings(where, name, getattr(self, name)))
        if not self.answers:
            raise TaskError(f"{where}: no answers; give at least one answer token")
        both = [text for text in self.answers if text in self.wrong]
        if both:
            raise TaskError(f"{where}: {both[0]!r} is both an answer and a wrong answer, so the "
                            "metric cannot tell them apart; remove it from one of the lists")
        if self.clean == self.corrupt:
            raise TaskError(f"{where}: the clean and corrupted prompts are the same, so patching "
                            "changes nothing and faithfulness is 0/0; change the corrupted prompt")
        if not isinstance(self.meta, Mapping):
            raise TaskError(f"{where}: meta must be a mapping (a JSON object), got "
                            f"{show(self.meta)}")
        object.__setattr__(self, "spans", _spans(where, self.spans))

    def where(self) -> str:
        """Say where the example came from, for error messages."""
        if self.line is None:
            return f"example {_short(self.clean)}"
        return f"line {self.line}" if self.file is None else f"{self.file}: line {self.line}"

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict (``meta`` only when non-empty)."""
        record: dict[str, Any] = {
            "clean": self.clean,
            "corrupt": self.corrupt,
            "answers": list(self.answers),
            "wrong": list(self.wrong),
        }
        if self.meta:
            record["meta"] = dict(self.meta)
        if self.spans:
            record["spans"] = {name: list(span) for name, span in self.spans.items()}
        return record


def show(value: Any) -> str:
    """``5 (a number)``: a value and its JSON kind, cut short, for error messages.

    Examples
    --------
    >>> show(5), show(None), show("x" * 50)
    ('5 (a number)', 'None (null)', "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (a string)")
    """
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "an object", type(None): "null"}
    kind = kinds.get(type(value), f"a {type(value).__name__}")
    return f"{_short(value)} ({kind})"


def _short(value: Any, width: int = 40) -> str:
    """The repr of `value`, cut to about `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_unicode(where: str, name: str, text: str) -> None:
    """Refuse text that cannot be written as UTF-8 (an unpaired surrogate from a bad escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TaskError(f"{where}: {name} holds {text[exc.start]!r}, half of a surrogate pair, "
                        "which is not a character; fix the \\u escape") from None


def _strings(where: str, name: str, value: Any) -> tuple[str, ...]:
    """A single string or a list of strings as a tuple, else a `TaskError`."""
    if isinstance(value, str):
        value = (value,)
    elif isinstance(value, (Mapping, bytes, bytearray)) or not isinstance(value, Iterable):
        raise TaskError(f"{where}: {name} must be a string or a list of strings, got "
                        f'{show(value)}; write e.g. "{name}": [" Mary"]')
    value = tuple(value)
    for text in value:
        if not isinstance(text, str):
            raise TaskError(f"{where}: {name} must be strings, but one is {show(text)}; write "
                            f'e.g. "{name}": [" Mary"]')
        _check_unicode(where, name, text)
    return value


#: The span of the tokens a task's spans leave out (`Example.spans`).
OTHER_SPAN = "other"
_SPAN_NAME = re.compile(r"[A-Za-z0-9_.:+-]{1,40}")


def _spans(where: str, spans: Any) -> dict[str, tuple[int, int]]:
    """`Example.spans` checked: names, whole-number bounds, no overlaps."""
    if not isinstance(spans, Mapping):
        raise TaskError(f"{where}: spans must be an object of name: [start, end], got "
                        f'{show(spans)}; write e.g. "spans": {{"S1": [2, 3], "END": [13, 14]}}')
    out: dict[str, tuple[int, int]] = {}
    for name, span in spans.items():
        if not isinstance(name, str) or not _SPAN_NAME.fullmatch(name) or name == OTHER_SPAN:
            raise TaskError(f"{where}: span name {show(name)} is not allowed; use up to 40 "
                            f"letters, digits or _.:+- (not {OTHER_SPAN!r}, the name of the "
                            "tokens in no span)")
        ok = (isinstance(span, (list, tuple)) and len(span) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
              and 0 <= span[0] < span[1])
        if not ok:
            raise TaskError(f"{where}: span {name!r} is {show(span)}; give [start, end], token "
                            "positions with 0 <= start < end (end excluded)")
        out[name] = (int(span[0]), int(span[1]))
    ordered = sorted(out.items(), key=lambda item: item[1])
    for (a, (_, end)), (b, (start, _)) in zip(ordered, ordered[1:], strict=False):
        if start < end:
            raise TaskError(f"{where}: spans {a!r} and {b!r} overlap; a token belongs to one "
                            "span at most")
    return out


def items_of(what: str, items: Any) -> tuple[Any, ...]:
    """A tuple of the items of a list-like, or a `TaskError` for anything else.

    Examples
    --------
    >>> items_of("task 't'", [1, 2])
    (1, 2)
    >>> items_of("task 't'", "a string")
    Traceback (most recent call last):
    ...
    circuits.errors.TaskError: task 't': examples must be a list of Example objects or dicts, \
got 'a string' (a string); wrap a single example in a list
    """
    if isinstance(items, (str, bytes, Mapping, Example)) or not isinstance(items, Iterable):
        raise TaskError(f"{what}: examples must be a list of Example objects or dicts, got "
                        f"{show(items)}; wrap a single example in a list")
    return tuple(items)
