"""What an ablated node or source carries: one definition for the edge engine and nnsight.

resample
    Its activation on the corrupted prompts of the same batch.
mean
    Its mean activation over reference prompts (the batches' corrupted prompts unless given),
    over prompts and positions, or over prompts only, per position.
zero
    Zeros.

The edge engine ablates source outputs (`circuits.setup.Setup`); node patching ablates the
activations at the nodes' hook sites (`circuits.node_circuits.ablated_values`). Both read their
activations with a function of the prompts and reduce them here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .errors import OptionError

Ablation = Literal["resample", "mean", "zero"]
ABLATIONS: tuple[str, ...] = ("resample", "mean", "zero")

# prompts [b, p] -> activations by name, each [..., b, p, width]
Read = Callable[[Tensor], dict[str, Tensor]]


def check_ablation(ablation: str) -> None:
    """OptionError unless `ablation` is one of `ABLATIONS`."""
    if ablation not in ABLATIONS:
        raise OptionError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")


def mean_activations(read: Read, reference: Sequence[Tensor], per_position: bool = False
                     ) -> dict[str, Tensor]:
    """Each activation's mean over the reference prompts (mean ablation).

    Parameters
    ----------
    read : callable
        ``read(ids [b, p])`` -> activations by name, each ``[..., b, p, width]``.
    reference : sequence of Tensor
        Prompts ``[b, p]`` to average over.
    per_position : bool
        Average over prompts only, per position (the prompts must have one length).

    Returns
    -------
    dict[str, Tensor]
        ``[..., 1, 1, width]`` (``[..., 1, p, width]`` per position).

    Raises
    ------
    OptionError
        No reference prompt, or prompts of several lengths with `per_position`.

    Examples
    --------
    >>> import torch
    >>> def read(ids):
    ...     return {"x": ids.float()[..., None]}  # [b, p, 1]
    >>> ref = [torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6]])]
    >>> mean_activations(read, ref)["x"].flatten().tolist()
    [3.5]
    >>> mean_activations(read, ref, per_position=True)["x"].flatten().tolist()
    [3.0, 4.0]
    """
    if per_position and len({ids.shape[1] for ids in reference}) > 1:
        raise OptionError("per-position mean ablation needs reference prompts of one length; "
                          "use per_position=False or prompts of one token length")
    totals: dict[str, Tensor] = {}
    count = 0
    for ids in reference:
        dims = (-3,) if per_position else (-3, -2)
        for name, act in read(ids).items():
            s = act.sum(dims, keepdim=True)  # [..., 1, p|1, width]
            totals[name] = s if name not in totals else totals[name] + s
        count += ids.shape[0] * (1 if per_position else ids.shape[1])
    if not count:
        raise OptionError("mean ablation needs at least one reference prompt")
    return {name: total / count for name, total in totals.items()}


def zero_activations(widths: dict[str, tuple[int, ...]], dtype: torch.dtype,
                     device: torch.device | str) -> dict[str, Tensor]:
    """Zeros ``[..., 1, 1, width]`` for each activation, given its leading dimensions and width
    (``widths[name] = (*lead, width)``) (zero ablation).

    Examples
    --------
    >>> zero_activations({"a": (3, 4)}, torch.float32, "cpu")["a"].shape
    torch.Size([3, 1, 1, 4])
    """
    return {name: torch.zeros(*shape[:-1], 1, 1, shape[-1], dtype=dtype, device=device)
            for name, shape in widths.items()}
