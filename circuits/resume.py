"""Progress keyed by everything a result depends on: what methods that keep progress save
under (`progress_key`) and how methods that add up per-batch results resume (`resumable_items`).
The files themselves are `circuits.progress.Checkpoint`'s."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from .batch import Batch
from .errors import OptionError
from .progress import RESTART, VERSION, Checkpoint, canonical, weights_key
from .setup import Setup


def progress_key(setup: Setup, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The key a method's progress is saved under and resumed by: everything its result
    depends on.

    The method, its options (those that change the result, bit for bit included), the weights'
    fingerprint (`Model.fingerprint`, the same in every dtype) and the dtype they run in, the
    prompts (clean, corrupted, answers and wrong tokens, batch by batch), the metric, the
    ablation and its reference prompts. Every method that keeps progress saves it with this key
    (`Checkpoint.load_for` refuses progress saved under another), whatever the folder's run
    description (`Checkpoint`'s `run`) says.

    Parameters
    ----------
    setup : Setup
    method : str
        The method's name.
    options : dict
        JSON data: the method's options.

    Returns
    -------
    dict
        JSON data.

    Examples
    --------
    >>> import torch
    >>> from circuits import Setup
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> setup = Setup(tiny_gpt2(), [make_batch(vocab=32)], "logit-diff")
    >>> key = progress_key(setup, "eap-ig", {"steps": 5})
    >>> key["dtype"], key["options"], key["model"] == setup.model.fingerprint
    ('float32', {'steps': 5}, True)
    >>> setup.model.hf.double()  # doctest: +ELLIPSIS
    GPT2LMHeadModel(...)
    >>> progress_key(setup, "eap-ig", {"steps": 5})["dtype"]
    'float64'
    """
    digest = hashlib.sha256()
    for b in setup.batches:
        for t in (b.clean, b.corrupt, b.answers, b.wrong):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.cpu().numpy().tobytes())
    reference = hashlib.sha256()
    for ids in setup.mean_reference or []:
        reference.update(str(tuple(ids.shape)).encode())
        reference.update(ids.cpu().numpy().tobytes())
    return canonical({
        "version": VERSION,
        "method": method,
        "options": options,
        **weights_key(setup.model),
        "prompts": digest.hexdigest()[:16],
        "batch_sizes": [b.size for b in setup.batches],
        "metric": setup.metric.name,
        "ablation": setup.ablation,
        "per_position": setup.per_position,
        "mean_reference": reference.hexdigest()[:16] if setup.mean_reference else None,
    })


def resumable_items(setup: Setup, name: str, sums: dict[str, Tensor],
                    options: dict[str, Any]) -> Iterator[tuple[Batch, Tensor, float]]:
    """``setup.items()`` for a method that adds up per-batch results, kept in `setup.checkpoint`.

    The caller adds each batch's share to the tensors of `sums` *in place*; after each batch
    they are saved (with how many batches are done) under `name`. With progress of the same
    run in the checkpoint, `sums` are set to the saved values and the batches done are not
    yielded again (their ablated outputs are still computed on the way for resample ablation;
    nothing at all when every batch is done), so the totals are bit for bit those of an
    uninterrupted run. Without a checkpoint this is ``setup.items()``.

    Parameters
    ----------
    setup : Setup
    name : str
        The progress name (the method's).
    sums : dict[str, Tensor]
        The running totals, updated in place by the caller.
    options : dict
        JSON data: the method options the sums depend on (checked on resume, with the rest of
        the `progress_key`).

    Yields
    ------
    batch, ablated, weight
        As `Setup.items` does.

    Raises
    ------
    OptionError
        The saved progress was made with another `progress_key` (other options, weights, dtype,
        prompts, ...) or does not fit `sums`.

    Examples
    --------
    >>> import tempfile, torch
    >>> from circuits import Setup
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> batches = [make_batch(vocab=32, seed=0), make_batch(vocab=32, seed=1)]
    >>> setup = Setup(tiny_gpt2(), batches, "logit-diff")
    >>> setup.checkpoint = Checkpoint(tempfile.mkdtemp(), {"demo": 1}, every=0)
    >>> sums = {"n": torch.zeros(1)}
    >>> for batch, _, _ in resumable_items(setup, "demo", sums, {}):
    ...     sums["n"] += batch.size
    >>> setup.checkpoint = Checkpoint(setup.checkpoint.folder, {"demo": 1}, resume=True)
    >>> again = {"n": torch.zeros(1)}
    >>> [b.size for b, _, _ in resumable_items(setup, "demo", again, {})], again["n"].item()
    ([], 8.0)
    """
    checkpoint = setup.checkpoint
    if checkpoint is None:
        yield from setup.items()
        return
    n = len(setup.batches)
    header = progress_key(setup, name, options)
    done = _resume_sums(checkpoint, name, sums, header)
    if done >= n:
        return
    for i, item in enumerate(setup.items()):
        if i < done:
            continue
        yield item
        checkpoint.save(name, sums, {"header": header, "done": i + 1}, force=i + 1 == n)


def _resume_sums(checkpoint: Checkpoint, name: str, sums: dict[str, Tensor],
                 header: dict[str, Any]) -> int:
    """How many batches the saved progress covers (0 without any), its sums copied into
    `sums`."""
    saved = checkpoint.load_for(name, header)
    if saved is None:
        return 0
    tensors, state = saved
    for key, total in sums.items():
        value = tensors.get(key)
        if value is None or value.shape != total.shape or value.dtype != total.dtype:
            raise OptionError(f"the {name} progress in {checkpoint.folder} does not fit this "
                              f"run ({key!r} has another shape); {RESTART}")
        total.copy_(value)
    return int(state["done"])
