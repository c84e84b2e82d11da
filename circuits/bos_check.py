"""Whether a task's prompts show the behavior better with or without a BOS token before them.

`circuits.discover` records what went before every prompt and warns when the other choice would
show the behavior clearly more strongly (a model trained with a BOS, run without one, or the
other way round).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .errors import TaskError
from .model import Model
from .setup import Setup
from .task import Task, prefix_ids

BOS_MARGIN = 0.1  # how much stronger, relative to the larger, the other choice must show it


def bos_record(model: Model, task: Task, setup: Setup, batch_size: int) -> dict[str, Any]:
    """What went before every prompt: ``bos`` (the task's choice, `Task.bos`) and ``added``
    (those tokens as text). When the tokenizer has a BOS token, also the task's clean metric on
    the discovery prompts as they are (``clean``) and with the other choice (``other``: with
    the BOS where none was added, without what was added; one more forward), and a
    ``warning`` when the other choice shows the behavior clearly more strongly: by more than
    `BOS_MARGIN` of the larger mean and three standard errors of the per-prompt differences."""
    tok, metric = model.tokenizer, task.metric_fn
    prefix = prefix_ids(tok, task.bos)
    added = [str(tok.convert_ids_to_tokens(i)) for i in prefix]
    record: dict[str, Any] = {"bos": task.bos, "added": added}
    bos_token = getattr(tok, "bos_token", None)
    if not isinstance(getattr(tok, "bos_token_id", None), int) or metric.flat_at_clean:
        return record
    try:  # the same prompts in the same order: every length moves by the same prefix
        other = replace(task, bos=not prefix).batches(
            tok, batch_size=batch_size, device=model.device, max_length=model.context_length)
    except TaskError:  # too long for the context with a BOS: nothing to compare
        return record
    now = torch.cat([metric(b.clean_logits, b) for b in setup.batches]).double().cpu()
    then = []
    with torch.no_grad():
        for b in other:
            logits = model.hf(b.clean, attention_mask=torch.ones_like(b.clean)).logits
            then.append(metric(logits[:, -1], b).double().cpu())
    then_all = torch.cat(then)
    if not (now.isfinite().all() and then_all.isfinite().all()):
        return record  # no comparison of numbers that are not numbers
    record.update(metric=metric.name, clean=float(now.mean()), other=float(then_all.mean()))
    gain = (then_all - now) * (1.0 if metric.higher_is_better else -1.0)  # [n]
    if len(gain) < 2:
        return record
    mean, error = float(gain.mean()), float(gain.std()) / len(gain) ** 0.5
    if mean > BOS_MARGIN * max(abs(record["clean"]), abs(record["other"])) and mean > 3 * error:
        name, now_, then_ = metric.name, f"{record['clean']:.3f}", f"{record['other']:.3f}"
        if prefix:
            why = "--bos" if task.bos else "the tokenizer's convention"
            record["warning"] = (
                f"the model shows the behavior more strongly without {' '.join(added)} before "
                f"the prompts: clean {name} {then_} without it against {now_} with it ({why}); "
                "if the model was trained without it, pass --no-bos (bos=False)")
        else:
            why = "--no-bos" if task.bos is False else "the tokenizer adds none"
            record["warning"] = (
                f"the model shows the behavior more strongly with {bos_token} before the "
                f"prompts: clean {name} {then_} with it against {now_} without ({why}); if the "
                "model was trained with it, pass --bos (bos=True)")
    return record
