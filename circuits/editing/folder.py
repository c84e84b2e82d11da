"""The edited model as a Hugging Face folder: safetensors weights, config, tokenizer, and a
record of the edits (``edits.json``), written atomically and never over an existing folder.

The folder is written into a new hidden folder beside the output, then renamed to it, with
Ctrl-C held back during the rename: the output either does not exist or holds the whole
model. The source model's weights are changed only in memory, for the write, and restored
(`circuits.editing.edits.applied`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch import Tensor

from circuits.editing.edits import applied
from circuits.errors import OptionError
from circuits.files import write_atomic
from circuits.model import Model
from circuits.outputs import sigint_held

__all__ = ["RECORD", "check_out", "write_edited"]

RECORD = "edits.json"


def check_out(out: str | os.PathLike, source: str | os.PathLike | None = None,
              flag: str = "--out") -> Path:
    """Refuse an output folder that would lose something, before any work: the source model's
    own folder (or one inside it), an existing file, or a folder that is not empty.

    Examples
    --------
    >>> import tempfile
    >>> tmp = Path(tempfile.mkdtemp())
    >>> check_out(tmp / "new") == tmp / "new"
    True
    >>> _ = (tmp / "model").mkdir(); _ = (tmp / "model" / "config.json").write_text("{}")
    >>> check_out(tmp / "model", source=tmp / "model")
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: --out ... is the source model's folder; write the edited model ...
    """
    out = Path(out)
    if source is not None:
        here, there = out.resolve(), Path(source).resolve()
        if here == there or there in here.parents:
            raise OptionError(f"{flag} {out} is the source model's folder; write the edited "
                              "model to a new folder")
    if out.exists() and not out.is_dir():
        raise OptionError(f"{flag} {out} is an existing file; pass a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise OptionError(f"{flag} {out} exists and is not empty; pass a new folder (nothing "
                          "is written over)")
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' progress bars off in the block (its "Writing model shards" bar), as
    they were after."""
    from transformers.utils import logging as hf_logging  # heavy; only when a model is saved

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def write_edited(model: Model, deltas: Mapping[str, Tensor], out: str | os.PathLike,
                 files: Mapping[str, bytes]) -> Path:
    """Write `model` with `deltas` added as a Hugging Face folder `out`, with `files` (name ->
    bytes, e.g. the ``edits.json`` record) beside the weights; `model` is left as it was.

    Parameters
    ----------
    model : Model
    deltas : mapping of str to Tensor
        Parameter name -> change (`circuits.editing.rome.rome`, `~circuits.editing.memit.memit`).
    out : path-like
        A new folder, or an empty one (`check_out`); its parent folders are created.
    files : mapping of str to bytes

    Returns
    -------
    Path
        `out`.

    Examples
    --------
    >>> import tempfile, torch
    >>> from transformers import AutoModelForCausalLM
    >>> from circuits.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> name = "transformer.h.0.mlp.c_proj.weight"
    >>> out = write_edited(model, {name: torch.ones(128, 32)}, Path(tempfile.mkdtemp()) / "m",
    ...                    {"edits.json": b"{}"})
    >>> loaded = AutoModelForCausalLM.from_pretrained(out)
    >>> float((loaded.get_parameter(name) - model.hf.get_parameter(name)).mean().detach())
    1.0
    >>> sorted(p.name for p in out.iterdir() if p.suffix == ".json")[:2]
    ['config.json', 'edits.json']
    """
    out = check_out(out)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir gives the folder the usual permissions (mkdtemp's are the owner's only)
    tmp = parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        with applied(model, deltas), _quiet():
            model.hf.save_pretrained(tmp, safe_serialization=True)
        for file in tmp.iterdir():  # safetensors writes the owner's permissions only
            file.chmod(tmp.stat().st_mode & 0o666)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        for name, data in files.items():
            write_atomic(tmp / name, data)
        check_out(out)  # nothing appeared there meanwhile
        with sigint_held():
            if out.is_dir():
                out.rmdir()  # empty, checked above
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
