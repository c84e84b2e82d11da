"""Task files: JSONL, one example per line, read with every check, written to read back unchanged.

`Task.from_jsonl` and `Task.to_jsonl` are the public face; errors name the file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import TaskError
from .example import Example, show


def read_examples(path: str | os.PathLike) -> tuple[tuple[Example, ...], Path]:
    """Read the examples of a JSONL task file, one per line, and the file's `Path`.

    Blank lines are skipped. The file must be UTF-8 (a byte-order mark is allowed); only
    ``\\n`` ends a line. Nothing in the file is executed.

    Parameters
    ----------
    path : path-like
        The JSONL file.

    Returns
    -------
    (tuple of Example, pathlib.Path)

    Raises
    ------
    TaskError
        On a missing, unreadable, non-UTF-8 or empty file, a directory, invalid JSON, a line
        that is not a JSON object, a missing key or a value of the wrong type, and every check
        of `Example` (naming the file and line).

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "t.jsonl"
    >>> write_examples([Example("a b", "c b", (" x",), (" y",))], path)
    >>> examples, _ = read_examples(path)
    >>> examples[0].answers, examples[0].line
    ((' x',), 1)
    """
    text, path = _read_text(path)
    examples = []
    # Only "\n" ends a line: str.splitlines() would also split inside a JSON string at
    # characters such as U+2028 or U+0085, which `write_examples` writes unescaped.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(
                f"{path}: line {number} is not valid JSON ({exc.msg}); write one JSON "
                "object per line"
            ) from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise TaskError(f"{path}: line {number} is not valid JSON ({exc}); write one "
                            "JSON object per line") from None
        except RecursionError:
            raise TaskError(f"{path}: line {number} nests JSON lists or objects too deeply; "
                            "write one flat JSON object per line") from None
        examples.append(example_from_record(record, f"{path}: line {number}", number, str(path)))
    if not examples:
        raise TaskError(
            f"{path} is empty: write one JSON object per line with keys "
            "clean, corrupt, answers, wrong"
        )
    return tuple(examples), path


def write_examples(examples: Iterable[Example], path: str | os.PathLike) -> None:
    """Write examples to a JSONL file that `read_examples` reads back unchanged.

    Parameters
    ----------
    examples : iterable of Example
        The examples, one line each.
    path : path-like
        Output file (overwritten).

    Raises
    ------
    TaskError
        If an example's ``meta`` holds a value JSON cannot write, or the file cannot be
        written (nothing is written then).
    """
    lines = []
    for example in examples:
        try:
            lines.append(json.dumps(example.to_dict(), ensure_ascii=False) + "\n")
        except (TypeError, ValueError) as exc:
            raise TaskError(f"{example.where()}: meta cannot be written as JSON ({exc}); keep "
                            "meta to strings, numbers, lists and dicts") from None
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(lines)
    except OSError as exc:
        raise TaskError(f"cannot write task file {path}: {exc.strerror or exc}; check that "
                        "its folder exists and is writable") from None


def _read_text(path: Any) -> tuple[str, Path]:
    """The text of a task file and its `Path`, or a `TaskError` saying why it cannot be read."""
    if not isinstance(path, (str, os.PathLike)):
        raise TaskError(f"a task file must be a path, got {show(path)}; pass e.g. 'task.jsonl'")
    path = Path(path)
    if path.is_dir():
        raise TaskError(f"{path} is a directory; pass a JSONL file, one JSON object per line")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TaskError(
            f"cannot read task file {path}: {exc.strerror or exc}; check the path"
        ) from None
    except ValueError as exc:  # e.g. a NUL character in the path
        raise TaskError(f"cannot read task file {path!r}: {exc}; check the path") from None
    try:
        return data.decode("utf-8-sig"), path
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TaskError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it "
            "as UTF-8 JSONL, one JSON object per line"
        ) from None


def example_from_record(
    record: Any, where: str, line: int | None = None, file: str | None = None
) -> Example:
    """Turn one JSON record into an `Example`; errors name `where` (file and line)."""
    if not isinstance(record, Mapping):
        raise TaskError(
            f"{where} is {show(record)}, not a JSON object; write "
            '{"clean": ..., "corrupt": ..., "answers": [...], "wrong": [...]}'
        )
    missing = [key for key in ("clean", "corrupt") if key not in record]
    if "answers" not in record and "answer" not in record:
        missing.append("answers")
    if missing:
        raise TaskError(f"{where} is missing key(s) {', '.join(missing)}: add them to the line")
    answers = record["answers"] if "answers" in record else record["answer"]
    wrong = record.get("wrong", record.get("wrongs", ()))
    meta = record.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TaskError(f"{where}: meta must be a JSON object, got {show(meta)}")
    spans = record.get("spans")
    return Example(record["clean"], record["corrupt"], answers, wrong, dict(meta), line, file,
                   {} if spans is None else spans)
