"""Labelled texts for probes, steering and erasure: what to predict and where to read it.

A `Labeled` set holds texts, a class label for each, and for each text where its hidden state is
read (a position spec, see `circuits.representations.activations.reading_spans`) and the *word
type* its control-task label is keyed on (Hewitt & Liang: a control task gives every word type a
random label, so a probe that scores well on it has memorised word identities).

Sets come from a JSONL file (`read_labeled`) or are built in (`LABEL_SETS`, `builtin_labeled`):

``ioi``
    IOI prompts labelled by the indirect object's name, the answer, drawn with the subject from
    six names (`IOI_NAMES`), each name the answer equally often. Read at the last token. The
    control word is the *subject's* name: both names are in every prompt, so a probe that reads
    "the names present" scores as well on the control task as on the real one, and only a
    representation that singles out the indirect object makes the probe selective. Marks
    ``io``, ``s1``, ``s2`` (the subject's two mentions) and ``end`` (the last word).
``factual``
    Factual-recall prompts labelled by their object (``France``, ``Paris``, ...). Read at the
    last token (the subject's own tokens come before the relation, so a causal model cannot
    know there which object is asked; ``--position subject`` reads them); the control word is
    the subject.
``years``
    Greater-than style prompts ("The war lasted from the year 1732 to the year 17") labelled
    ``above`` or ``below``: is the first year's last two digits above 50. Read at the last
    token; the control word is the two digits.

Marks are *character* spans of a text (``{"subject": (18, 30)}``), so a set is independent of
any tokenizer; they become token spans when a model reads the texts.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OptionError, TaskError
from ..task import get_task
from ..task_tokens import encode, unknown_token
from ..tasks import ioi

#: The built-in label sets: name -> what the label is.
LABEL_SETS = {
    "ioi": "IOI prompts: the indirect object's name, one of six (read at the last token; "
           "control word: the subject's name)",
    "factual": "factual-recall prompts: the object recalled (read at the last token; mark "
               "'subject'; control word: the subject)",
    "years": "greater-than prompts 'from the year 17YY to the year 17': is YY above 50 (read at "
             "the last token; control word: YY)",
}

INDEX_RE = re.compile(r"-?\d+")
SPAN_RE = re.compile(r"(-?\d+):(-?\d+)")
MARK_RE = re.compile(r"([A-Za-z_][\w.-]*)(:mean)?")


def is_spec(value: str) -> bool:
    """Whether `value` is a position spec that needs no mark (last, mean, an index, a span).

    Examples
    --------
    >>> is_spec("last"), is_spec("-1"), is_spec("2:4"), is_spec("subject")
    (True, True, True, False)
    """
    return value in ("last", "mean") or bool(INDEX_RE.fullmatch(value)
                                             or SPAN_RE.fullmatch(value))


def check_position(spec: str | int | None) -> str | None:
    """`spec` as a string, or an OptionError if it is not a position spec or mark name.

    Examples
    --------
    >>> check_position(-1), check_position("subject:mean"), check_position(None)
    ('-1', 'subject:mean', None)
    """
    if spec is None:
        return None
    text = str(spec).strip()
    if is_spec(text) or MARK_RE.fullmatch(text):
        return text
    raise OptionError(f"position {spec!r} is not understood; use last, mean, a token index "
                      f"(e.g. -2), a span S:E or a mark name (e.g. subject)")


#: The largest labels file read (a file is read whole).
MAX_BYTES = 256 * 2**20

#: Keys a line of a labels file may have.
KEYS = ("text", "label", "position", "word")


@dataclass(frozen=True)
class Labeled:
    """Texts with a class label each, where to read each one, and its control-task word.

    Attributes
    ----------
    name : str
        What the set is (a built-in name or the file's name).
    texts : tuple of str
    labels : tuple of str
        The class of each text.
    positions : tuple of str
        Where each text is read: a position spec (``"last"``, ``"-2"``, ``"3:5"``, ``"mean"``,
        a mark name such as ``"subject"`` for the mark's last token, or ``"subject:mean"``).
    marks : tuple of dict
        Named character spans ``{name: (start, end)}`` of each text.
    words : tuple of str
        The word type each example's control label is keyed on; ``""`` means the text of the
        tokens read.

    Examples
    --------
    >>> data = Labeled("toy", ("a b", "c d"), ("x", "y"))
    >>> data.classes, data.y.tolist(), data.positions
    (('x', 'y'), [0, 1], ('last', 'last'))
    """

    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    positions: tuple[str, ...] = ()
    marks: tuple[dict[str, tuple[int, int]], ...] = ()
    words: tuple[str, ...] = ()
    _classes: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.texts)
        set_ = object.__setattr__
        set_(self, "texts", tuple(self.texts))
        set_(self, "labels", tuple(str(label) for label in self.labels))
        set_(self, "positions", tuple(self.positions) or ("last",) * n)
        set_(self, "marks", tuple(self.marks) or tuple({} for _ in range(n)))
        set_(self, "words", tuple(self.words) or ("",) * n)
        if n == 0:
            raise TaskError(f"labelled set {self.name!r} has no texts; give at least one")
        for what in ("labels", "positions", "marks", "words"):
            if len(getattr(self, what)) != n:
                raise TaskError(f"labelled set {self.name!r} has {n} texts but "
                                f"{len(getattr(self, what))} {what}; give one per text")
        set_(self, "_classes", tuple(sorted(set(self.labels))))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> tuple[str, ...]:
        """The distinct labels, sorted."""
        return self._classes

    @property
    def y(self) -> np.ndarray:
        """``[n]`` int64: each label's index in `classes`."""
        index = {c: i for i, c in enumerate(self._classes)}
        return np.array([index[label] for label in self.labels], dtype=np.int64)

    def subset(self, indices: Sequence[int]) -> Labeled:
        """The examples at `indices`, in that order.

        Examples
        --------
        >>> Labeled("toy", ("a", "b", "c"), ("x", "y", "x")).subset([2, 0]).texts
        ('c', 'a')
        """
        pick = [int(i) for i in indices]
        return Labeled(self.name, tuple(self.texts[i] for i in pick),
                       tuple(self.labels[i] for i in pick),
                       tuple(self.positions[i] for i in pick),
                       tuple(self.marks[i] for i in pick), tuple(self.words[i] for i in pick))


def distinct_examples(labeled: Labeled) -> Labeled:
    """`labeled` without repeated examples (the same text, read at the same place, with the
    same label): a copy on each side of a split would be the same activation, scored as held
    out. Built-in sets drawn from a small pool (``factual``) repeat examples.

    Examples
    --------
    >>> data = Labeled("toy", ("a", "b", "a", "a"), ("x", "y", "x", "y"))
    >>> distinct_examples(data).labels
    ('x', 'y', 'y')
    """
    seen: set = set()
    keep = []
    for i, key in enumerate(zip(labeled.texts, labeled.positions, labeled.labels, strict=True)):
        marks = tuple(sorted(labeled.marks[i].items()))
        if (key, marks) not in seen:
            seen.add((key, marks))
            keep.append(i)
    return labeled if len(keep) == len(labeled) else labeled.subset(keep)


def frequent_classes(labeled: Labeled, min_count: int) -> Labeled:
    """The examples of `labeled` whose class has at least `min_count` examples (in order).

    Built-in sets with many classes (``factual``: the object recalled) have classes too rare to
    appear in both the training and the held-out set; a probe (or an eraser) over the frequent
    ones is the usual remedy.

    Raises
    ------
    TaskError
        Fewer than two classes have that many examples.

    Examples
    --------
    >>> data = Labeled("toy", ("a", "b", "c", "d", "e"), ("x", "y", "x", "z", "y"))
    >>> frequent_classes(data, 2).labels
    ('x', 'y', 'x', 'y')
    """
    counts = {c: labeled.labels.count(c) for c in labeled.classes}
    keep = [i for i, label in enumerate(labeled.labels) if counts[label] >= min_count]
    kept = {labeled.labels[i] for i in keep}
    if len(kept) < 2:
        raise TaskError(f"{len(kept)} class(es) of {labeled.name!r} have {min_count} examples or "
                        f"more; two are needed (lower the minimum or add examples)")
    return labeled.subset(keep)


def read_labeled(path: str | os.PathLike) -> Labeled:
    """Read a JSONL labels file: one ``{"text", "label", "position"?, "word"?}`` per line.

    ``label`` is a string, number or boolean (kept as its text). ``position`` says where the
    text is read: an integer token index of the text's own tokens (negative from the end; the
    BOS a model puts before a text is not counted), a ``[start, end]`` token span (its mean is
    read), a position spec string such as ``"last"`` or ``"mean"``, or any other string that
    occurs in the text (its last token is read). ``word`` is the control-task word type (by
    default the text of the tokens read).

    Raises
    ------
    TaskError
        A missing, unreadable or empty file, a line that is not a JSON object, a missing or
        badly typed field, or a position string that is not in its text (naming the line).

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "labels.jsonl"
    >>> _ = path.write_text('{"text": "The cat sat", "label": 1, "position": "cat"}\\n')
    >>> data = read_labeled(path)
    >>> data.labels, data.positions, data.marks
    (('1',), ('position',), ({'position': (4, 7)},))
    """
    path = Path(path)
    if path.is_dir():
        raise TaskError(f"{path} is a directory; pass a JSONL labels file, one JSON object "
                        f"per line")
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise TaskError(f"{path} is not a regular file; pass a JSONL labels file")
        if info.st_size > MAX_BYTES:
            raise TaskError(f"{path} is {info.st_size / 2**20:.0f} MiB; a labels file may be "
                            f"at most {MAX_BYTES // 2**20} MiB, so split it or sample it")
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise TaskError(f"cannot read labels file {path}: {exc.strerror or exc}; check the "
                        f"path") from None
    except UnicodeDecodeError:
        raise TaskError(f"{path} is not UTF-8 text; save it as UTF-8 JSONL") from None
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            rows.append(_record(line, f"{path}: line {number}"))
    if not rows:
        raise TaskError(f"{path} is empty: write one JSON object per line with keys "
                        f"text and label")
    texts, labels, positions, marks, words = zip(*rows, strict=True)
    return Labeled(path.stem, texts, labels, positions, marks, words)


def _record(line: str, where: str) -> tuple[str, str, str, dict, str]:
    """One line of a labels file as (text, label, position, marks, word)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise TaskError(f"{where} is not valid JSON ({exc}); write one JSON object per "
                        f"line") from None
    if not isinstance(record, dict):
        raise TaskError(f"{where} is not a JSON object; write {{\"text\": ..., \"label\": "
                        f"...}}")
    unknown = sorted(set(record) - set(KEYS))
    if unknown:
        raise TaskError(f"{where}: unknown key {unknown[0]!r}; the keys are "
                        f"{', '.join(KEYS)}")
    text, label = record.get("text"), record.get("label")
    if not isinstance(text, str) or not text.strip():
        raise TaskError(f"{where}: \"text\" must be a non-empty string")
    if isinstance(label, (dict, list)) or label is None or (isinstance(label, str)
                                                            and not label.strip()):
        raise TaskError(f"{where}: \"label\" must be a non-empty string, a number or a "
                        f"boolean")
    word = record.get("word", "")
    if not isinstance(word, str):
        raise TaskError(f"{where}: \"word\" must be a string")
    label = json.dumps(label) if isinstance(label, bool) else str(label)
    position, marks = _position(record.get("position", "last"), text, where)
    return text, label, position, marks, word


def _position(value: Any, text: str, where: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """A labels-file position as a position spec and the marks it needs."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        return str(value), {}
    elif (isinstance(value, list) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return f"{value[0]}:{value[1]}", {}
    elif isinstance(value, str) and value:
        if is_spec(value):
            return value, {}
        start = text.find(value)
        if start < 0:
            raise TaskError(f"{where}: position {value!r} does not occur in the text; give a "
                            f"substring of it, a token index or [start, end]")
        return "position", {"position": (start, start + len(value))}
    raise TaskError(f"{where}: \"position\" must be a token index, [start, end] or a substring "
                    f"of the text, got {json.dumps(value)}")


def builtin_labeled(name: str, tokenizer: Any = None, n: int = 200, seed: int = 0) -> Labeled:
    """A built-in label set (`LABEL_SETS`) of `n` texts valid for `tokenizer`.

    Examples
    --------
    >>> data = builtin_labeled("ioi", n=50, seed=0)
    >>> len(data.classes), data.positions[0], data.words[0] in data.texts[0]
    (6, 'last', True)
    >>> years = builtin_labeled("years", n=50)
    >>> all((int(w) > 50) == (label == "above") for w, label in zip(years.words, years.labels))
    True
    """
    if name not in LABEL_SETS:
        raise OptionError(f"unknown label set {name!r}; use one of {', '.join(LABEL_SETS)} or "
                          f"a JSONL file of {{\"text\", \"label\"}}")
    if name == "years":
        _check_digits(tokenizer)
        return _years(n, seed)
    if name == "ioi":
        return _ioi(tokenizer, n, seed)
    texts, labels, marks, words = [], [], [], []
    for example in get_task(name, tokenizer, n=n, seed=seed).examples:
        subject = example.meta["subject"]
        texts.append(example.clean)
        labels.append(example.answers[0].strip())
        marks.append({"subject": _span(example.clean, subject)})
        words.append(subject)
    return Labeled(name, tuple(texts), tuple(labels), ("last",) * len(texts), tuple(marks),
                   tuple(words))


#: How many names the ``ioi`` label set draws from (the classes of its label).
IOI_NAMES = 6


def _ioi(tokenizer: Any, n: int, seed: int) -> Labeled:
    """The ``ioi`` label set: IOI prompts over `IOI_NAMES` names, labelled by the answer."""
    names = ioi.usable_names(tokenizer)[:IOI_NAMES]
    if len(names) < 3:
        raise OptionError(f"only {len(names)} IOI names are single tokens for this tokenizer; "
                          f"the ioi label set needs 3")
    rng = random.Random(seed)
    # as many examples of each name as n allows (the first names take the remainder)
    left = {name: n // len(names) + (i < n % len(names)) for i, name in enumerate(names)}
    texts, labels, marks, words = [], [], [], []
    while len(texts) < n:
        example = ioi.sample(rng, names, tokenizer)[0]
        text, io, s = example.clean, example.answers[0].strip(), example.wrong[0].strip()
        if not left[io]:
            continue
        left[io] -= 1
        s1 = _span(text, s)
        marks.append({"io": _span(text, io), "s1": s1, "s2": _span(text, s, after=s1[1]),
                      "end": _last_word(text)})
        texts.append(text)
        labels.append(io)
        words.append(s)
    return Labeled("ioi", tuple(texts), tuple(labels), ("last",) * n, tuple(marks), tuple(words))


#: Greater-than style sentences: the first year is 17YY, the prompt ends before the second's
#: last two digits.
YEAR_TEMPLATES = (
    "The war lasted from the year 17{yy} to the year 17",
    "The treaty held from the year 17{yy} to the year 17",
    "The expedition ran from the year 17{yy} to the year 17",
    "The king ruled from the year 17{yy} to the year 17",
)


def _years(n: int, seed: int) -> Labeled:
    """The ``years`` label set (YY from 02 to 98, 50 left out so no label is borderline)."""
    rng = random.Random(seed)
    texts, labels, marks, words = [], [], [], []
    for _ in range(n):
        yy = rng.choice([y for y in range(2, 99) if y != 50])
        template = rng.choice(YEAR_TEMPLATES)
        text = template.format(yy=f"{yy:02d}")
        start = template.index("{yy}")
        texts.append(text)
        labels.append("above" if yy > 50 else "below")
        marks.append({"year": (start - 2, start + 2)})
        words.append(f"{yy:02d}")
    return Labeled("years", tuple(texts), tuple(labels), ("last",) * n, tuple(marks),
                   tuple(words))


def _check_digits(tokenizer: Any) -> None:
    """An OptionError if `tokenizer` reads a year as its unknown token (no digits)."""
    unknown = None if tokenizer is None else unknown_token(tokenizer)
    if unknown is not None and unknown[0] in encode(tokenizer, " 1752"):
        raise OptionError(f"the years label set needs a tokenizer with digits; this one reads "
                          f"' 1752' as its unknown token {unknown[1]!r}; use another label set")


def _span(text: str, word: str, after: int = 0) -> tuple[int, int]:
    """Character span of the first whole-word occurrence of `word` in `text` from `after` on."""
    start = _word_at(text, word, after)
    return start, start + len(word)


def _word_at(text: str, word: str, start: int = 0) -> int:
    """Where `word` first occurs in `text` from `start` on as a whole word (not inside another
    word)."""
    while True:
        start = text.find(word, start)
        if start < 0:
            raise TaskError(f"{word!r} does not occur as a word in {text!r}")
        end = start + len(word)
        if (start == 0 or not text[start - 1].isalnum()) and (
                end == len(text) or not text[end].isalnum()):
            return start
        start += 1


def _last_word(text: str) -> tuple[int, int]:
    """Character span of the last whitespace-separated word of `text`."""
    end = len(text.rstrip())
    return text.rstrip().rfind(" ") + 1, end


def labeled_set(spec: str | os.PathLike, tokenizer: Any = None, n: int | None = None,
                seed: int = 0) -> Labeled:
    """A built-in label set by name, or a JSONL labels file (`read_labeled`).

    `n` takes a built-in set's size (default 200) or the first `n` lines of a file.

    Examples
    --------
    >>> len(labeled_set("years", n=5))
    5
    """
    if isinstance(spec, str) and spec in LABEL_SETS:
        return builtin_labeled(spec, tokenizer, 200 if n is None else n, seed)
    if isinstance(spec, str) and not Path(spec).exists() and "/" not in spec \
            and not spec.endswith(".jsonl"):
        raise OptionError(f"no label set or file {spec!r}; use one of {', '.join(LABEL_SETS)} "
                          f"or a JSONL file of {{\"text\", \"label\"}}")
    data = read_labeled(spec)
    return data if n is None else data.subset(range(min(n, len(data))))
