"""Per-batch tensors kept for reuse: in memory up to a byte budget, on disk beyond it.

Methods that loop over the batches many times (ACDC, faithfulness curves and bisection) would
otherwise rerun the same corrupted or clean forward on every loop, or keep every batch's
activations in memory at once, which grows with the number of prompts (about 1.9 GB of ablated
source outputs for 200 GPT-2-small prompts). A `Store` keeps the first values in memory while
they fit in its budget and writes the rest to a temporary directory; those are read back as
memory-mapped, file-backed tensors, one batch at a time, so their pages can be dropped by the
operating system instead of counting against the process.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import OptionError

DEFAULT_BUDGET = 256 * 2**20  # bytes kept in memory by one store: 256 MiB

# A tensor or a (nested) dict of tensors, e.g. a Trace's outputs and per-stage residuals.
Stored = Tensor | dict[object, "Stored"]


@dataclass(frozen=True)
class _OnDisk:
    """Where a spilled value lies, and the device to move it back to."""

    path: Path
    device: torch.device


class Store:
    """A list of `Stored` values, held in memory up to `budget` bytes and on disk beyond it.

    Values are appended in order and read back by index; the ones past the budget are saved
    with `torch.save` and loaded with ``torch.load(..., mmap=True)`` on every read, then moved to
    the device they came from. The temporary directory is deleted by `close`, on leaving a
    ``with`` block, or when the store is garbage-collected.

    Parameters
    ----------
    budget : int
        Bytes of tensor storage kept in memory (on the values' own device); 0 keeps everything
        on disk.

    Examples
    --------
    >>> import torch
    >>> from circuits.store import Store
    >>> with Store(budget=64) as store:
    ...     store.append(torch.zeros(4))  # 16 bytes: in memory
    ...     store.append({"a": torch.ones(32)})  # 128 bytes: over the budget, on disk
    ...     (len(store), store.in_memory, store.on_disk, float(store[1]["a"].sum()))
    (2, 1, 1, 32.0)
    """

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = check_budget(budget)
        self.nbytes = 0  # bytes held in memory
        self._entries: list[Stored | _OnDisk] = []
        self._dir: Path | None = None
        self._cleanup: weakref.finalize | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> Stored:
        entry = self._entries[i]
        if not isinstance(entry, _OnDisk):
            return entry
        value = torch.load(entry.path, mmap=True, weights_only=True, map_location="cpu")
        return _map(value, lambda t: t.to(entry.device))

    def __iter__(self) -> Iterator[Stored]:
        return (self[i] for i in range(len(self)))

    @property
    def in_memory(self) -> int:
        """How many values are held in memory."""
        return len(self._entries) - self.on_disk

    @property
    def on_disk(self) -> int:
        """How many values were spilled to disk."""
        return sum(isinstance(e, _OnDisk) for e in self._entries)

    def append(self, value: Stored) -> None:
        """Keep `value`: in memory if it fits in what is left of the budget, else on disk."""
        size = _nbytes(value)
        if self.nbytes + size <= self.budget:
            self._entries.append(value)
            self.nbytes += size
            return
        path = self._directory() / f"{len(self._entries)}.pt"
        torch.save(_map(value, Tensor.cpu), path)
        self._entries.append(_OnDisk(path, _device(value)))

    def close(self) -> None:
        """Drop every value and delete the temporary directory (if anything was spilled)."""
        self._entries.clear()
        self.nbytes = 0
        if self._cleanup is not None:
            self._cleanup()
        self._dir = self._cleanup = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _directory(self) -> Path:
        """The temporary directory, created on the first spill."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="circuits-store-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        return self._dir


def check_budget(budget: int) -> int:
    """`budget` if it is a valid number of bytes, else an OptionError."""
    if not isinstance(budget, int) or budget < 0:
        raise OptionError(f"memory budget must be a whole number of bytes >= 0, got {budget!r}")
    return budget


def _map(value: Stored, fn: Callable[[Tensor], Tensor]) -> Stored:
    """`value` with `fn` applied to every tensor in it."""
    if isinstance(value, Tensor):
        return fn(value)
    return {k: _map(v, fn) for k, v in value.items()}


def _tensors(value: Stored) -> Iterator[Tensor]:
    """Every tensor in `value`."""
    if isinstance(value, Tensor):
        yield value
    else:
        for v in value.values():
            yield from _tensors(v)


def _nbytes(value: Stored) -> int:
    """Bytes of the distinct storages behind the tensors of `value`."""
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                for t in _tensors(value)}
    return sum(storages.values())


def _device(value: Stored) -> torch.device:
    """The device of the tensors in `value` (the first one's; a value lives on one device)."""
    return next(_tensors(value)).device
