"""A batch of tokenized examples: what the engine runs and what a metric reads."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .errors import TaskError


@dataclass(frozen=True)
class Batch:
    """Tokenized clean and corrupted prompts of one token length, with their answers.

    All examples in a batch share one token length, so the metric reads position -1 of every
    example (tasks bucket examples of different lengths into separate batches).

    Attributes
    ----------
    clean, corrupt : Tensor
        ``[batch, pos]`` token ids.
    answers, wrong : Tensor
        ``[batch, n]`` token ids of the answer(s) that show the behavior and of the wrong
        one(s), padded with ``-1`` where examples have fewer.
    clean_logits : Tensor or None
        ``[batch, vocab]`` the model's clean logits at the last position, filled in by the engine
        for metrics that compare with the clean distribution (``kl``).
    where : Tensor or None
        ``[batch, pos]`` the position (index into `circuits.positions.Positions.labels`) of
        every token, for position-resolved circuits; None otherwise.
    """

    clean: Tensor
    corrupt: Tensor
    answers: Tensor
    wrong: Tensor
    clean_logits: Tensor | None = None
    where: Tensor | None = None

    def __post_init__(self) -> None:
        if self.clean.shape != self.corrupt.shape:
            raise TaskError(
                f"clean {tuple(self.clean.shape)} and corrupt {tuple(self.corrupt.shape)} "
                "token ids must have the same shape; pair each clean prompt with a corrupted "
                "one of the same token length"
            )

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])

    @property
    def length(self) -> int:
        return int(self.clean.shape[1])

    @property
    def shared_prefix(self) -> int:
        """How many leading positions the clean and corrupted prompts share in every example
        (at most ``length - 1``).

        In a causal model every activation at those positions is the same in the clean and the
        corrupted run, so runs that ablate towards the corrupted run's values need not recompute
        them: IOI prompts that differ only in their last name share all but their last few
        tokens.

        >>> import torch
        >>> ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 8]])
        >>> corrupt = torch.tensor([[5, 6, 7, 1], [5, 6, 1, 8]])
        >>> Batch(ids, corrupt, ids[:, :1], ids[:, 1:2]).shared_prefix
        2
        """
        same = (self.clean == self.corrupt).all(0)
        if bool(same.all()):
            return self.length - 1
        return int(same.to(torch.uint8).argmin())

    def rows(self, part: slice) -> Batch:
        """Return the examples of `part` (a slice of the batch's rows), with all they hold.

        >>> import torch
        >>> ids = torch.arange(12).view(3, 4)
        >>> Batch(ids, ids, ids[:, :1], ids[:, 1:2]).rows(slice(1, 3)).answers.tolist()
        [[4], [8]]
        """
        picked = {
            name: (value[part] if isinstance(value, Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return Batch(**picked)

    def with_clean_logits(self, logits: Tensor) -> Batch:
        """Return a copy holding the clean last-position logits ``[batch, vocab]``."""
        return replace(self, clean_logits=logits.detach())

    def to(self, device: torch.device | str) -> Batch:
        """Return a copy with every tensor on `device`."""
        moved = {
            name: (value.to(device) if isinstance(value, Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return Batch(**moved)
