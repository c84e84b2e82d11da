"""What an edit of the residual stream does: to a task's metric, to the next-token distribution
and to the loss on neutral text.

An *edit* is what `circuits.features.sites.spliced` takes: ``{site: fn(input, output) -> new
output}``; steering adds a direction at a layer (`add_direction`), erasure projects a concept out.
`TaskMeter` runs a task's clean prompts once unedited and then under any number of edits;
`NeutralMeter` does the same for the next-token loss on neutral text. Both compare every edited
run with the unedited one on the same tokens (KL of the next-token distributions).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

from ..errors import OptionError
from ..features.corpus import token_batches
from ..features.sites import FeatureSite, site_of, spliced
from ..metrics import answer_accuracy, kl_divergence
from ..model import Model
from ..task import Task

Edit = Mapping[FeatureSite, Callable[[Tensor, Tensor], Tensor]]


def add_direction(direction: Tensor, scale: float, start: int = 0
                  ) -> Callable[[Tensor, Tensor], Tensor]:
    """An edit function adding ``scale * direction`` to the positions from `start` on.

    Positions count in the forward's own sequence (a forward over whole prompts; a generation
    step with a key-value cache sees only its new tokens).

    Examples
    --------
    >>> import torch
    >>> fn = add_direction(torch.ones(2), 3.0, start=1)
    >>> fn(None, torch.zeros(1, 2, 2)).tolist()
    [[[0.0, 0.0], [3.0, 3.0]]]
    """
    def fn(_: Tensor, y: Tensor) -> Tensor:
        add = (scale * direction).to(y.device, y.dtype)
        if start <= 0:
            return y + add
        out = y.clone()
        out[:, start:] += add
        return out
    return fn


def at_layer(model: Model, layer: int, fn: Callable[[Tensor, Tensor], Tensor]) -> Edit:
    """The edit applying `fn` to the residual stream after decoder layer `layer`."""
    return {site_of(model, f"resid.{layer}"): fn}


@dataclass(frozen=True)
class TaskEffect:
    """A task run under one edit.

    Attributes
    ----------
    metric : float
        The task's metric, mean over its prompts.
    accuracy : float
        The fraction of prompts whose answer has a higher logit than every wrong token.
    kl : float
        Mean KL(unedited || edited) of the next-token distribution at the last position.
    metric_per, kl_per : Tensor
        ``[n]`` per prompt.
    """

    metric: float
    accuracy: float
    kl: float
    metric_per: Tensor
    kl_per: Tensor

    def row(self) -> dict[str, float]:
        """The means as a plain dict (for tables and JSON)."""
        return {"metric": self.metric, "accuracy": self.accuracy, "kl": self.kl}


class TaskMeter:
    """A task's clean prompts, run once unedited (`base`) and then under any edit.

    Parameters
    ----------
    model : Model
    task : Task
    batch_size : int

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> meter = TaskMeter(p.model, p.task)
    >>> same = meter(at_layer(p.model, 1, add_direction(p.direction, 0.0)))
    >>> same.metric == meter.base.metric, same.kl
    (True, 0.0)
    """

    def __init__(self, model: Model, task: Task, batch_size: int = 32):
        if model.tokenizer is None:
            raise OptionError("the model has no tokenizer; load it from a folder that has one")
        self.model, self.task = model, task
        self.batches = task.batches(model.tokenizer, batch_size, device=model.device,
                                    max_length=model.context_length)
        self._base = [self._logits(b.clean, None) for b in self.batches]
        # metrics that compare with the clean run (kl) read the unedited logits from the batch
        self.batches = [dataclasses.replace(b, clean_logits=logits)
                        for b, logits in zip(self.batches, self._base, strict=True)]
        self.base = self(None)

    def _logits(self, ids: Tensor, edit: Edit | None) -> Tensor:
        """Last-position logits ``[b, vocab]`` of `ids` under `edit`."""
        with torch.no_grad(), spliced(self.model, edit or {}):
            return self.model.hf(input_ids=ids, attention_mask=torch.ones_like(ids)
                                 ).logits[:, -1].float()

    def __call__(self, edit: Edit | None) -> TaskEffect:
        """The task under `edit` (None: unedited)."""
        metric, acc, kl = [], [], []
        for batch, base in zip(self.batches, self._base, strict=True):
            logits = base if edit is None else self._logits(batch.clean, edit)
            metric.append(self.task.metric_fn(logits, batch).double().cpu())
            acc.append(answer_accuracy(logits, batch).double().cpu())
            kl.append(kl_divergence(base, logits).double().clamp_min(0).cpu())
        metric_per, kl_per = torch.cat(metric), torch.cat(kl)
        return TaskEffect(float(metric_per.mean()), float(torch.cat(acc).mean()),
                          float(kl_per.mean()), metric_per, kl_per)


def neutral_texts() -> list[str]:
    """The package's own sample of neutral English text (paragraphs), used when no other text
    is given.

    Examples
    --------
    >>> len(neutral_texts()) >= 10
    True
    """
    text = resources.files(__package__).joinpath("neutral.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


@dataclass(frozen=True)
class NeutralEffect:
    """Neutral text under one edit: mean next-token loss (nats) and mean KL(unedited || edited)
    over every predicted position."""

    loss: float
    kl: float


class NeutralMeter:
    """Next-token loss on neutral text, unedited (`base`) and under any edit.

    Parameters
    ----------
    model : Model
    texts : sequence of str
        The neutral text (documents); by default `neutral_texts`.
    context : int
        Tokens per row.
    max_rows : int
        At most this many rows of `context` tokens are used.

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> meter = NeutralMeter(p.model, ["the word is ant the word is cup"] * 4, context=8)
    >>> meter(None).loss == meter.base.loss
    True
    """

    def __init__(self, model: Model, texts: Sequence[str] | None = None, context: int = 64,
                 max_rows: int = 64, batch_size: int = 8):
        self.model = model
        limit = model.context_length
        context = min(context, limit) if limit else context
        rows = []
        for ids in token_batches(model, texts or neutral_texts(), context, batch_size):
            rows.append(ids)
            if sum(len(r) for r in rows) >= max_rows:
                break
        if not rows:
            raise OptionError(f"the neutral text is shorter than one row of {context} tokens; "
                              f"give more text")
        self.rows = rows
        self.base = self(None)

    def __call__(self, edit: Edit | None) -> NeutralEffect:
        """Loss and KL under `edit` (None: unedited, KL 0)."""
        loss = kl = 0.0
        count = 0
        for ids in self.rows:
            with torch.no_grad():
                mask = torch.ones_like(ids)
                base = self.model.hf(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                if edit is None:
                    logits = base
                else:
                    with spliced(self.model, edit):
                        logits = self.model.hf(input_ids=ids, attention_mask=mask
                                               ).logits[:, :-1].float()
            target = ids[:, 1:]
            loss += float(torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), target.flatten(), reduction="sum"))
            kl += float(kl_divergence(base, logits).clamp_min(0).sum())
            count += target.numel()
        return NeutralEffect(loss / count, kl / count)
