"""A steering sweep: a direction added over a range of scales, what it buys and what it costs,
and greedy generations with and without it; its table, plot, JSON and markdown report.

`steering_sweep` measures, per scale, the task's metric, the KL divergence of the next-token
distribution to the unsteered model and the loss on neutral text
(`circuits.representations.effects`); `generate` continues prompts greedily with the direction
added, also through the KV cache. The report is markdown (report.md, as `circuits discover`
writes): it reads in a terminal as it is, renders on GitHub and in notebooks, and its generations
sit side by side in a table, one column per scale, where an HTML page would need a browser and
escaping for no gain.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import OptionError
from ..features.sites import site_of, spliced
from ..files import write_atomic
from ..model import Model
from ..tables import markdown_table, text_table
from ..task import Task, get_task
from .effects import NeutralMeter, TaskMeter, add_direction, neutral_texts
from .steer import Direction, steering_edit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_SCALES = 101
UNIT_TEXT = {"pairs": "the pairs' mean separation along the direction",
             "residual": "the mean residual norm at the layer", "raw": "residual units"}


@dataclass
class SteerSweep:
    """What steering costs and buys, per scale.

    Attributes
    ----------
    direction : Direction
    task : str
        The behavior measured.
    metric_name : str
        The task's metric (``logit-diff``, ...), averaged over its clean prompts.
    unit : str
        What scale 1 adds (`circuits.representations.steer.UNITS`).
    start : int
        The first position steered (`circuits.representations.steer.steering_edit`).
    scales : tuple of float
    metric, accuracy, kl, neutral, neutral_kl : list of float
        Per scale: the mean metric; the fraction of prompts whose answer beats every wrong
        token; the mean KL divergence (nats) of the next-token distribution at the clean
        prompts' last position from the unsteered model's; the mean next-token loss (nats) on
        the neutral texts and the mean KL there (every predicted position).
    base_metric, base_accuracy, base_neutral : float
        The unsteered model's metric, accuracy and neutral loss.
    n_prompts, n_neutral : int
        Task prompts and neutral texts measured.
    neutral_source : str
        What the neutral texts were.
    generations : list of dict
        ``{"prompt": str, "scales": [float], "texts": [str]}``: greedy continuations, the
        first at scale 0 (unsteered).
    """

    direction: Direction
    task: str
    metric_name: str
    unit: str
    start: int
    scales: tuple[float, ...]
    metric: list[float]
    accuracy: list[float]
    kl: list[float]
    neutral: list[float]
    neutral_kl: list[float]
    base_metric: float
    base_accuracy: float
    base_neutral: float
    n_prompts: int
    n_neutral: int
    neutral_source: str = ""
    generations: list[dict[str, Any]] = field(default_factory=list)

    def added_norm(self, scale: float) -> float:
        """The norm of the vector added at `scale`."""
        return abs(scale) * self.direction.unit_size(self.unit)

    def rows(self) -> list[tuple[str, ...]]:
        """One row of text per scale: scale, added norm (and relative to the residual norm),
        metric and its change, accuracy, KL, neutral loss and its change, neutral KL."""
        rows = []
        for i, s in enumerate(self.scales):
            added = self.added_norm(s)
            rows.append((f"{s:+g}", f"{added:.3g}",
                         f"{added / self.direction.resid_norm:.2f}",
                         f"{self.metric[i]:+.3f}", f"{self.metric[i] - self.base_metric:+.3f}",
                         f"{self.accuracy[i]:.2f}", f"{self.kl[i]:.3g}", f"{self.neutral[i]:.3f}",
                         f"{self.neutral[i] - self.base_neutral:+.3f}",
                         f"{self.neutral_kl[i]:.3g}"))
        return rows

    HEADER = ("scale", "|added|", "/|resid|", "metric", "change", "acc", "KL", "neutral loss",
              "change", "neutral KL")

    def table(self) -> str:
        """The sweep as aligned text (what ``circuits steer`` prints).

        Examples
        --------
        >>> import torch
        >>> d = Direction(torch.tensor([1.0, 0.0]), 0, "mean", 2.0, 4.0)
        >>> sweep = SteerSweep(d, "t", "logit-diff", "pairs", 0, (0.0, 1.0), [1.0, 3.0],
        ...                    [1.0, 1.0], [0.0, 0.5], [2.0, 2.5], [0.0, 0.1], 1.0, 1.0, 2.0,
        ...                    4, 4)
        >>> print(sweep.table().splitlines()[-1])
        +1     2        0.50      +3.000  +2.000  1.00  0.5  2.500         +0.500  0.1
        """
        return text_table(self.rows(), header=self.HEADER)

    def summary(self) -> str:
        """One line on the direction and the sweep."""
        d = self.direction
        return (f"{d.method} direction at layer {d.layer} from {d.source} ({d.n_positive} vs "
                f"{d.n_negative} texts, read at {d.position}; separation {d.separation:.3g}, "
                f"mean residual norm {d.resid_norm:.3g}, in-sample split accuracy "
                f"{d.accuracy:.2f}); scale 1 = {UNIT_TEXT[self.unit]}; steered from position "
                f"{self.start} on; metric {self.metric_name} of {self.task} "
                f"({self.n_prompts} prompts), unsteered {self.base_metric:+.3f}; neutral loss "
                f"on {self.n_neutral} texts ({self.neutral_source}), unsteered "
                f"{self.base_neutral:.3f}")

    def to_dict(self) -> dict[str, Any]:
        """Everything, as JSON-ready values (the direction's vector is in its own file)."""
        d = self.direction
        return {
            "direction": {"layer": d.layer, "method": d.method, "separation": d.separation,
                          "resid_norm": d.resid_norm, "accuracy": d.accuracy,
                          "source": d.source, "position": d.position,
                          "n_positive": d.n_positive, "n_negative": d.n_negative,
                          "model": d.model, "model_name": d.model_name},
            "task": self.task, "metric": self.metric_name, "unit": self.unit,
            "unit_size": d.unit_size(self.unit), "start": self.start,
            "base": {"metric": self.base_metric, "accuracy": self.base_accuracy,
                     "neutral_loss": self.base_neutral},
            "n_prompts": self.n_prompts, "n_neutral": self.n_neutral,
            "neutral": self.neutral_source,
            "sweep": [{"scale": s, "added_norm": self.added_norm(s), "metric": self.metric[i],
                       "accuracy": self.accuracy[i], "kl": self.kl[i],
                       "neutral_loss": self.neutral[i], "neutral_kl": self.neutral_kl[i]}
                      for i, s in enumerate(self.scales)],
            "generations": self.generations,
        }

    def figure(self) -> Figure:
        """Two panels against the scale: the metric, and the side effects (KL to the unsteered
        model, and the change in neutral loss), as a matplotlib ``Figure`` made without pyplot
        (no backend is switched)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 3.8), layout="constrained")
        left, right = fig.subplots(1, 2)
        xs = list(self.scales)
        left.plot(xs, self.metric, "o-", color="tab:blue", label="steered")
        left.axhline(self.base_metric, color="grey", ls="--", lw=1, label="unsteered")
        left.set_xlabel(f"scale ({self.unit})")
        left.set_ylabel(self.metric_name)
        left.set_title(f"{self.task}: {self.metric_name}")
        left.legend(loc="best", fontsize=8)
        right.plot(xs, self.kl, "o-", color="tab:red", label="KL to unsteered (last position)")
        right.plot(xs, [v - self.base_neutral for v in self.neutral], "s-", color="tab:green",
                   label="neutral loss - unsteered")
        right.axhline(0, color="grey", lw=0.8)
        right.set_xlabel(f"scale ({self.unit})")
        right.set_ylabel("nats")
        right.set_title("side effects")
        right.legend(loc="best", fontsize=8)
        d = self.direction
        fig.suptitle(f"steering {d.model_name or 'the model'} at layer {d.layer} ({d.method} "
                     f"direction from {d.source})", fontsize=10)
        return fig

    def plot(self, path: str | Path) -> Path:
        """Write `figure` as a PNG to `path`, atomically; return the path."""
        path = Path(path)
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png", dpi=110)
        write_atomic(path, buffer.getvalue())
        return path

    def markdown(self, command: str = "", files: tuple[str, ...] = ()) -> str:
        """The report: the direction, the sweep's table, the plot and the generations side by
        side (a table per run: prompt, then one column per scale)."""
        lines = ["# Steering report", ""]
        if command:
            lines += [f"Command: `{command}`", ""]
        lines += [self.summary() + ".", ""]
        lines += [markdown_table(self.HEADER, self.rows()), ""]
        lines += ["`|added|` is the norm of the vector added, `/|resid|` that norm over the "
                  "mean residual norm at the layer; `acc` the fraction of prompts whose answer "
                  "beats every wrong token; KL (nats) is to the unsteered model at the last "
                  "position of the task's clean prompts; the neutral loss is the mean "
                  "next-token loss (nats) on neutral text, its KL over every position.", ""]
        if "steer.png" in files:
            lines += ["![metric and side effects against the scale](steer.png)", ""]
        if self.generations:
            scales = self.generations[0]["scales"]
            header = ["prompt", *(("unsteered" if s == 0 else f"scale {s:+g}") for s in scales)]
            rows = [[_cell(g["prompt"]), *map(_cell, g["texts"])] for g in self.generations]
            lines += ["## Generations (greedy)", "", markdown_table(header, rows), ""]
        if files:
            lines += ["Files: " + ", ".join(f"`{f}`" for f in files), ""]
        return "\n".join(lines)


def _cell(text: str) -> str:
    """A text as one markdown table cell: line breaks shown, HTML and backticks escaped."""
    shown = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    shown = shown.replace("`", "&#96;").replace("\r", "").replace("\n", " ⏎ ")
    return shown if shown.strip() else "(nothing)"


def check_finite(sweep: SteerSweep) -> None:
    """Fail rather than report a NaN or infinite number as a result."""
    numbers = [sweep.base_metric, sweep.base_neutral, *sweep.metric, *sweep.kl, *sweep.neutral,
               *sweep.neutral_kl]
    if not all(math.isfinite(v) for v in numbers):
        raise OptionError("steering gave non-finite numbers (NaN or inf): the scales are too "
                            "large for this model or its dtype; use smaller --scales or float32")


# -- the sweep ------------------------------------------------------------------------------------
SCALES_HELP = ("comma-separated scales (-8,-4,0,4,8) or a range A:B:N (N evenly spaced values "
               "from A to B)")


def parse_scales(spec: str | float | Sequence[float]) -> tuple[float, ...]:
    """The scales a spec names: ``-8,-4,0,4,8``, a range ``A:B:N`` or numbers.

    Examples
    --------
    >>> parse_scales("-2:2:5"), parse_scales("3, -1")
    ((-2.0, -1.0, 0.0, 1.0, 2.0), (-1.0, 3.0))
    """
    if isinstance(spec, str):
        text = spec.strip()
        found = re.fullmatch(r"([^:,]+):([^:,]+):([^:,]+)", text)
        try:
            if found:
                a, b, count = float(found[1]), float(found[2]), found[3].strip()
                if not count.isdigit() or not 2 <= int(count) <= MAX_SCALES:
                    raise OptionError(f"scales {spec!r}: N in A:B:N must be a whole number "
                                      f"from 2 to {MAX_SCALES}")
                k = int(count)
                values = [a + (b - a) * i / (k - 1) for i in range(k)]
            else:
                values = [float(x) for x in text.split(",") if x.strip()] if text else []
        except ValueError:
            raise OptionError(f"scales {spec!r} not understood; give {SCALES_HELP}") from None
    elif isinstance(spec, (int, float)):
        values = [float(spec)]
    else:
        values = [float(x) for x in spec]
    if not values:
        raise OptionError(f"scales {spec!r} name no scale; give {SCALES_HELP}")
    if not all(math.isfinite(v) for v in values):
        raise OptionError(f"scales {spec!r} must be finite numbers")
    values = sorted(set(values))
    if len(values) > MAX_SCALES:
        raise OptionError(f"scales {spec!r} name {len(values)} scales; give at most "
                          f"{MAX_SCALES}")
    return tuple(values)


class _FromPosition:
    """Adds a vector at absolute positions ``>= start``, counting the positions earlier calls
    saw: with the KV cache, generation feeds the prompt once and then one new token a call, so
    a call's own indices are not the tokens' positions."""

    def __init__(self, vector: Tensor, start: int) -> None:
        self.vector, self.start, self.seen = vector, start, 0

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        fn = add_direction(self.vector.to(y.device), 1.0, max(self.start - self.seen, 0))
        self.seen += y.shape[1]
        return fn(x, y)


def generate(model: Model, prompts: Sequence[str], direction: Direction | None = None,
             scale: float = 0.0, tokens: int = 20, unit: str = "pairs",
             start: int = 0) -> list[str]:
    """Greedy continuations of `prompts`, with `direction` added at `scale` (none without one).

    The model generates with its KV cache: the prompt in one call, then one new token a call.
    The direction is added at absolute positions from `start` on (a negative `start` counts
    back from each prompt's end), the generated tokens included.

    Parameters
    ----------
    model : Model
    prompts : sequence of str
        Each continued on its own (no padding).
    direction : Direction, optional
    scale : float
    tokens : int
        New tokens per prompt (fewer where the model ends the text with its EOS).
    unit : str
        What scale 1 adds (`UNITS`).
    start : int
        As `steering_edit` takes it.

    Returns
    -------
    list of str
        The continuation of each prompt (without the prompt).

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> zero = Direction(p.direction, 1, "mean", 0.0, 1.0)  # separation 0: adds nothing
    >>> generate(p.model, ["the word is"], zero, 8.0, 3) == generate(p.model, ["the word is"],
    ...                                                                tokens=3)
    True
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise OptionError(f"tokens must be a whole number of at least 1, got {tokens!r}")
    limit = model.context_length
    out = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise OptionError("a generation prompt is empty; give non-empty prompts")
        ids = model.tokenize([prompt])  # [1, p], after the model's BOS prefix
        if limit is not None and ids.shape[1] + tokens > limit:
            raise OptionError(f"prompt {prompt[:40]!r} is {ids.shape[1]} tokens and {tokens} "
                              f"more would pass the model's context of {limit}; generate "
                              "fewer tokens or shorten the prompt")
        edit = {}
        if direction is not None:
            direction.check_fits(model, any_model=True)
            at = int(start) if start >= 0 else max(ids.shape[1] + int(start), 0)
            edit = {site_of(model, f"resid.{direction.layer}"):
                    _FromPosition(direction.steering(scale, unit), at)}
        eos = getattr(model.hf.generation_config, "eos_token_id", None)
        with spliced(model, edit), torch.no_grad():
            new = model.hf.generate(ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=tokens, min_new_tokens=0, do_sample=False,
                                    num_beams=1, use_cache=True,
                                    pad_token_id=eos if isinstance(eos, int) else 0)
        out.append(model.tokenizer.decode(new[0, ids.shape[1]:].tolist(),
                                          skip_special_tokens=True))
    return out


def steering_sweep(model: Model, direction: Direction, task: Task | str,
                   scales: Sequence[float] | str, neutral: Sequence[str] | None = None,
                   unit: str = "pairs", start: int = 0, n: int | None = None, seed: int = 0,
                   batch_size: int = 32, context: int = 64, prompts: Sequence[str] = (),
                   tokens: int = 20, generate_at: Sequence[float] | None = None) -> SteerSweep:
    """The price and the effect of steering: the task's metric, the KL divergence to the
    unsteered model and the loss on neutral text at each scale, and greedy generations.

    Parameters
    ----------
    model : Model
    direction : Direction
    task : Task or str
        The behavior measured: a Task, a built-in task name or a task JSONL file; its metric is
        averaged over its clean prompts.
    scales : sequence of float or str
        The scales (`parse_scales`).
    neutral : sequence of str, optional
        Neutral texts for the loss (default: the package's sample, `effects.neutral_texts`).
    unit : str
        What scale 1 adds (`UNITS`).
    start : int
        The first position steered (`steering_edit`); on neutral text, where a negative start
        has no prompt end to count from, it steers every position (the text plays the part of
        what is generated).
    n, seed : int
        A built-in task's prompts.
    batch_size, context : int
        Prompts per forward; tokens per row of neutral text.
    prompts : sequence of str
        Prompts to continue unsteered and steered (`generate`), `tokens` new tokens each.
    tokens : int
    generate_at : sequence of float, optional
        The scales generated at (default: the sweep's smallest and largest non-zero scales).

    Returns
    -------
    SteerSweep

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> d = Direction(p.direction, 1, "mean", 1.0, 1.0, model=p.model.fingerprint)
    >>> sweep = steering_sweep(p.model, d, p.task, "-1,0,1", neutral=["the word is ant"] * 20,
    ...                        context=8)
    >>> sweep.metric[0] < sweep.base_metric == sweep.metric[1] < sweep.metric[2], sweep.kl[1]
    (True, 0.0)
    """
    direction.check_fits(model, any_model=True)
    scales = parse_scales(scales)
    if isinstance(task, str):
        task = Task.from_jsonl(task) if Path(task).is_file() or task.endswith(".jsonl") \
            else get_task(task, model.tokenizer, n=n, seed=seed)
    meter = TaskMeter(model, task, batch_size)
    texts = list(neutral) if neutral is not None else neutral_texts()
    neutral_meter = NeutralMeter(model, texts, context)
    columns: dict[str, list[float]] = {k: [] for k in ("metric", "accuracy", "kl", "neutral",
                                                       "neutral_kl")}
    for scale in scales:
        edit = steering_edit(model, direction, scale, unit, start)
        # neutral text has no prompt end: it stands for what is generated, which a negative
        # start steers throughout
        plain = edit if start >= 0 else steering_edit(model, direction, scale, unit, 0)
        effect, loss = meter(edit), neutral_meter(plain)
        for key, value in zip(columns, (effect.metric, effect.accuracy, effect.kl, loss.loss,
                                        loss.kl), strict=True):
            columns[key].append(value)
    metric = task.metric if isinstance(task.metric, str) else task.metric.name
    sweep = SteerSweep(direction, task.name, metric, unit, int(start), scales,
                       base_metric=meter.base.metric, base_accuracy=meter.base.accuracy,
                       base_neutral=neutral_meter.base.loss, n_prompts=len(task),
                       n_neutral=len(texts),
                       neutral_source="the package's neutral sample" if neutral is None
                       else "given texts", **columns)
    check_finite(sweep)
    if prompts:
        sweep.generations = side_by_side(model, prompts, direction,
                                         _generation_scales(scales, generate_at), tokens, unit,
                                         start)
    return sweep


def _generation_scales(scales: Sequence[float], chosen: Sequence[float] | None) -> list[float]:
    """0 (unsteered) and the chosen scales, by default the sweep's extremes other than 0."""
    if chosen is None:
        nonzero = [s for s in scales if s != 0]
        chosen = sorted({min(nonzero), max(nonzero)}) if nonzero else []
    return [0.0, *(float(s) for s in chosen if s != 0)]


def side_by_side(model: Model, prompts: Sequence[str], direction: Direction,
                 scales: Sequence[float], tokens: int = 20, unit: str = "pairs",
                 start: int = 0) -> list[dict[str, Any]]:
    """Greedy continuations of each prompt at each scale (0: unsteered), as
    ``[{"prompt", "scales", "texts"}]``.

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> d = Direction(p.direction, 1, "mean", 1.0, 1.0)
    >>> side_by_side(p.model, ["the word is"], d, [0, 4], tokens=2)[0]["scales"]
    [0.0, 4.0]
    """
    scales = [float(s) for s in scales]
    texts = {s: generate(model, prompts, direction, s, tokens, unit, start) for s in scales}
    return [{"prompt": prompt, "scales": scales, "texts": [texts[s][i] for s in scales]}
            for i, prompt in enumerate(prompts)]
