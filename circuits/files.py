"""Files the package writes: strict JSON text and atomic replacement.

`dumps` writes JSON that any parser reads (a NaN or infinite number becomes ``null``);
`write_atomic` moves a finished file into place, so an error never leaves half a file where a
good one was. `plain` turns recorded options into JSON types, and `show_json` renders a JSON value
for a one-line error message.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then rename it into place, so an error
    never leaves a half-written file where a good one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain(value: Any) -> Any:
    """`value` as JSON types; tensors and numbers become lists/floats, other objects their repr
    (options are recorded for reading, never evaluated)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return repr(value)


def _finite(value: Any) -> Any:
    """`value` with every non-finite float (also in dicts, lists, numpy/torch values) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy and torch values
        return _finite(value.tolist())
    return value


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON text of `obj`: every NaN or infinite float becomes ``null``.

    Python's `json` writes ``NaN`` and ``Infinity``, which strict parsers (JavaScript's
    ``JSON.parse``, ``jq``) refuse; this writes ``null`` instead, also inside nested dicts and
    lists and for numpy and torch scalars and tensors (turned into numbers and lists).

    Parameters
    ----------
    obj : Any
        Dicts, lists, tuples, strings, numbers, None, numpy or torch values.
    **kw
        Passed to `json.dumps` (``indent``, ``separators``, ...); ``allow_nan`` is always False.

    Returns
    -------
    str

    Examples
    --------
    >>> import torch
    >>> dumps({"f": float("nan"), "x": [1.5, -float("inf")], "t": torch.tensor(2.0)})
    '{"f": null, "x": [1.5, null], "t": 2.0}'
    """
    return json.dumps(_finite(obj), **{**kw, "allow_nan": False})


def show_json(value: Any) -> str:
    """A short one-line rendering of a JSON value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else "a huge integer"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else {"nan": "NaN", "inf": "Infinity",
                                                         "-inf": "-Infinity"}[repr(value)]
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= 60 else text[:56] + "...'"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
