"""What a token attribution run will cost, worked out before it starts.

Every method registers the prompt passes it runs on a batch (`AttributionMethod.passes`: a
forward of one prompt is one pass, with its backward three), the kind of pass and the longest
prompt it takes. A `Plan` adds them up over the batches of a task, with the passes around the
methods (the clean and corrupted metric, and for a comparison the deletion and insertion
curves of every method), and estimates the most memory one pass takes (`pass_bytes` over the
chunk of rows it runs at once, plus the batch-sized tensors a method keeps). The command line
refuses a plan that needs more than `MAX_PASSES` passes or more memory than is free, and
shows the passes as they run, with the time left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..metrics import Metric, get_metric
from ..model import Model
from .core import model_shape, pass_bytes, rows_per_pass
from .methods import get_method

#: The most prompt passes a run may need: about a day for a small model on a GPU, far longer
#: on a CPU.
MAX_PASSES = 10**9
#: Batch-sized float tensors a method keeps besides its passes (the clean and baseline
#: embeddings, the running sums of integrated gradients, one chunk of its path).
KEPT_EMBEDDINGS = 4


@dataclass(frozen=True)
class Plan:
    """The cost of attributing a task's batches with some methods.

    Attributes
    ----------
    prompts : int
    passes : dict
        Where the passes go -> how many: each method, ``"metric"`` (clean and corrupted metric
        of every prompt) and, for a comparison, ``"curves"`` (deletion and insertion).
    refused : dict
        Method -> (prompts it refuses, why), for the methods that refuse some.
    peak_bytes : int
        The most memory one pass is estimated to take, with what its method keeps.
    peak_of : str
        Which method, on prompts of how many tokens, takes it.
    """

    prompts: int
    passes: dict[str, float]
    refused: dict[str, tuple[int, str]]
    peak_bytes: int
    peak_of: str

    @property
    def total(self) -> float:
        """Every pass of the run."""
        return float(sum(self.passes.values()))


def batch_passes(method: str, b: int, p: int, options: Mapping[str, Any],
                 metric: str | Metric = "logit-diff") -> float:
    """The prompt passes `circuits.attribution.methods.attribute` runs for `method` on ``b``
    prompts of ``p`` tokens: the method's own, and one forward of each clean prompt when the
    metric compares with its logits.

    Examples
    --------
    >>> batch_passes("integrated-gradients", 4, 10, {"steps": 8})  # 8 forward-backwards
    96.0
    >>> batch_passes("occlusion", 4, 10, {}, "kl")  # 11 variants, and the clean logits
    48.0
    """
    spec = get_method(method)
    used = {**spec.defaults, **options}
    return spec.passes(b, p, used) + (0.0 if get_metric(metric).tokens_only else float(b))


def _memory(model: Model, kind: Any, b: int, p: int, rows: float) -> int:
    """The estimated peak of one pass of `kind` over at most `rows` rows of ``p`` tokens, with
    the batch-sized tensors kept beside it."""
    one = pass_bytes(model_shape(model), p, kind)
    at_once = max(1, min(rows_per_pass(model, p, kind), int(rows)))
    kept = KEPT_EMBEDDINGS * b * p * model_shape(model).d_model * 4
    return at_once * one + kept


def make_plan(model: Model, shapes: Sequence[tuple[int, int]], methods: Sequence[str],
              options: Mapping[str, Mapping[str, Any]], metric: str | Metric,
              curves: bool = False) -> Plan:
    """The passes, refusals and memory of running `methods` on batches of `shapes`.

    Parameters
    ----------
    model : Model
    shapes : sequence of (int, int)
        Each batch's prompts and tokens ``(b, p)``.
    methods : sequence of str
    options : mapping
        Method -> its options (defaults filled in for those not given).
    metric : str or Metric
    curves : bool
        A comparison: add the deletion and insertion curves of every method that runs and of
        the random-order reference (``2 b (p + 1)`` forwards a batch each).

    Returns
    -------
    Plan

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> plan = make_plan(tiny_gpt2(), [(4, 10), (2, 20)], ["shapley-exact"], {}, "logit-diff")
    >>> plan.passes["shapley-exact"], plan.refused["shapley-exact"][0]
    (4096.0, 2)
    """
    passes: dict[str, float] = {"metric": float(sum(2 * b for b, _ in shapes))}
    refused: dict[str, tuple[int, str]] = {}
    peak, peak_of = 0, ""
    ran = {"curves": 0.0}
    for method in methods:
        spec = get_method(method)
        total = 0.0
        for b, p in shapes:
            why = spec.refusal(p)
            if why is not None:
                count, first = refused.get(method, (0, why))
                refused[method] = (count + b, first)
                continue
            these = batch_passes(method, b, p, options.get(method, {}), metric)
            total += these
            rows = these / 3 if spec.kind.endswith("backward") else these
            memory = _memory(model, spec.kind, b, p, rows)
            if memory > peak:
                peak, peak_of = memory, f"{method} on prompts of {p} tokens"
            ran["curves"] += 2 * b * (p + 1)
        passes[method] = total
    if curves:
        passes["curves"] = ran["curves"] + sum(2 * b * (p + 1) for b, p in shapes)  # + random
        for b, p in shapes:
            memory = _memory(model, "forward", b, p, 2 * b * (p + 1))
            if memory > peak:
                peak, peak_of = memory, f"the deletion curves on prompts of {p} tokens"
    return Plan(sum(b for b, _ in shapes), passes, refused, peak, peak_of)


def free_memory(device: torch.device | str) -> int | None:
    """Bytes free for tensors on `device`: CUDA's free memory, or on a CPU the kernel's
    ``MemAvailable`` (Linux); None where it cannot be told.

    Examples
    --------
    >>> free_memory("meta") is None
    True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
