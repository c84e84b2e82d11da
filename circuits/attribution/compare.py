"""Compare token attribution methods by what the model does when their top tokens are changed.

Three measures, each per prompt and then averaged:

- **Deletion and insertion curves** (`circuits.attribution.curves`): tokens are replaced with
  the corrupted prompt's (deletion) or restored (insertion) in each method's order, and the
  areas under the curves of the metric, as a fraction of clean minus corrupted, summarise
  them. A position where the two prompts hold the same token changes nothing when replaced,
  so a ranking gains by putting the tokens the corruption changes (and that matter) first.
- **Known-token accuracy**: the share of prompts where the method's highest-scored context
  token is one the behavior is known to rest on (`circuits.attribution.known`).
- **Agreement**: Spearman's rank correlation of two methods' scores on a prompt, averaged over
  prompts.

A prompt where the corrupted prompt scores at least as well as the clean one (the corruption
does nothing, or helps) is left out of every measure and counted: its areas are fractions of a
difference that is zero or of the wrong sign, and the methods whose baseline is the corrupted
prompt explain that same difference. A seeded random ordering is measured alongside the
methods as a reference.

The work streams batch by batch: each batch is scored by every method, measured and dropped,
so memory grows with the number of prompts only by a few numbers per prompt and method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from ..batch import Batch
from ..errors import OptionError
from ..metrics import Metric, get_metric
from ..model import Model
from ..tables import text_table
from ..task import Task
from .curves import (
    Curves,
    LogitsFn,
    area,
    has_effect,
    logits_fn,
    metric_ends,
    replacement_curves,
)
from .known import known_masks, known_token_accuracy

RANDOM = "(random order)"
GRID = np.linspace(0.0, 1.0, 51)  # common x grid the mean curves are drawn on
LEFT_OUT = ("the corrupted prompt scores at least as well as the clean one, so the areas "
            "(fractions of clean - corrupted) and the attributions against the corrupted "
            "prompt mean nothing there")


# -- agreement ------------------------------------------------------------------------------------
def rank_agreement(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two attributions per prompt, averaged over prompts.

    Parameters
    ----------
    a, b : Tensor
        ``[n, p]`` scores of the same prompts.

    Returns
    -------
    float
        In [-1, 1]; prompts where either ranking is constant (no order) are left out; NaN when
        none is left.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.1, 0.5, 0.2, 0.9]])
    >>> rank_agreement(x, 10 * x), rank_agreement(x, -x)
    (1.0, -1.0)
    """
    values = spearman_rows(a, b)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _unit_ranks(scores: Tensor) -> np.ndarray:
    """``[n, p]`` each row's average ranks (ties share theirs), centred and scaled to unit
    length: the dot product of two such rows is Spearman's correlation. NaN rows where the
    ranking is constant."""
    from scipy.stats import rankdata

    ranks = rankdata(scores.double().cpu().numpy(), axis=1)  # [n, p]
    ranks = ranks - ranks.mean(1, keepdims=True)
    norm = np.linalg.norm(ranks, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, ranks / np.where(norm > 0, norm, 1.0), np.nan)


def spearman_rows(a: Tensor, b: Tensor) -> np.ndarray:
    """``[n]`` Spearman's correlation of each pair of rows of ``[n, p]`` scores; NaN where
    either ranking is constant.

    Examples
    --------
    >>> import torch
    >>> spearman_rows(torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]),
    ...               torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])).round(9).tolist()
    [-1.0, nan]
    """
    return (_unit_ranks(a) * _unit_ranks(b)).sum(1)


# -- the comparison -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodResult:
    """One method's row of a comparison: per-prompt measures over all batches.

    Attributes
    ----------
    method : str
    deletion_auc, insertion_auc : ndarray
        ``[n]`` per prompt; NaN for prompts left out (no effect of the corruption) or refused.
    accuracy : ndarray or None
        ``[n]`` known-token hits (1/0; NaN where nothing is known, or the prompt is left out or
        refused), None when the task knows no token.
    seconds : float
        Wall time of the attributions, all prompts measured.
    deletion_curve, insertion_curve : ndarray
        ``[len(GRID)]`` the curves averaged over the prompts counted, on the x grid `GRID`
        (NaN when none is).
    measured : int
        Prompts the method ran on.
    note : str
        Why it refused the others (its error message), or "".
    refused : int
        Prompts it refused.
    counted : int
        Prompts its measures are averaged over: those it ran on, less those left out.
    """

    method: str
    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    accuracy: np.ndarray | None
    seconds: float
    deletion_curve: np.ndarray
    insertion_curve: np.ndarray
    measured: int
    note: str = ""
    refused: int = 0
    counted: int = 0

    def summary(self) -> dict[str, Any]:
        """Means over the prompts counted (NaN-free ones) and seconds per prompt."""
        return {
            "deletion_auc": _mean(self.deletion_auc),
            "insertion_auc": _mean(self.insertion_auc),
            "accuracy": None if self.accuracy is None else _mean(self.accuracy),
            "seconds_per_prompt": self.seconds / self.measured if self.measured else None,
            "prompts": self.measured,
            "counted": self.counted,
        }


def _mean(values: np.ndarray) -> float:
    """The mean of the non-NaN values (NaN when there are none)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _plain(values: Any) -> Any:
    """Numbers, arrays and nested lists as JSON-ready lists, NaN as None."""
    if values is None:
        return None
    if isinstance(values, np.ndarray | list | tuple):
        return [_plain(v) for v in values]
    value = float(values)
    return None if np.isnan(value) else value


@dataclass(frozen=True)
class Comparison:
    """Token attribution methods compared on one task and model.

    Attributes
    ----------
    task, model, metric : str
        Names.
    n_prompts : int
        Prompts measured.
    results : tuple of MethodResult
        One per method, then the random-order reference.
    agreement : ndarray
        ``[m, m]`` mean Spearman correlation between the methods (not the reference), over
        the prompts both ran on and that count.
    options : dict
        The method options used.
    gaps : ndarray or None
        ``[n]`` per prompt, the metric of the clean prompt minus that of the corrupted one.
    effective : ndarray or None
        ``[n]`` bool, per prompt: the corruption moves the metric away from the behavior
        (`circuits.attribution.curves.has_effect`). The others are left out of every measure
        (`LEFT_OUT`); None counts every prompt.
    """

    task: str
    model: str
    metric: str
    n_prompts: int
    results: tuple[MethodResult, ...]
    agreement: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)
    gaps: np.ndarray | None = None
    effective: np.ndarray | None = None

    @property
    def methods(self) -> list[str]:
        """The compared methods (the reference left out)."""
        return [r.method for r in self.results if r.method != RANDOM]

    @property
    def has_known(self) -> bool:
        return any(r.accuracy is not None for r in self.results)

    @property
    def left_out(self) -> int:
        """Prompts left out of every measure (`LEFT_OUT`)."""
        return 0 if self.effective is None else int((~self.effective).sum())

    @property
    def counted(self) -> int:
        """Prompts the measures are taken over: all but those left out."""
        return self.n_prompts - self.left_out

    def left_out_line(self) -> str:
        """One line on the prompts left out, "" when none is."""
        if not self.left_out:
            return ""
        if not self.counted:
            which = "the one prompt" if self.n_prompts == 1 else f"all {self.n_prompts} prompts"
            return (f"no prompt to compare the methods on: on {which} the corrupted prompt "
                    f"scores at least as well as the clean one "
                    f"({self.metric}), so there is no effect to explain; use a task, model or "
                    "metric where the corruption lowers the behavior")
        return (f"{self.left_out} of {self.n_prompts} prompts left out: {LEFT_OUT}; the "
                f"measures are over the other {self.counted}")

    def table(self) -> str:
        """The comparison table as aligned text, then a line per method that refused prompts
        and one on the prompts left out; only that line when every prompt is left out."""
        if not self.counted:
            return self.left_out_line()
        header = ["method", "deletion AUC (lower better)", "insertion AUC (higher better)"]
        header += ["known-token accuracy"] if self.has_known else []
        header += ["s / prompt", "prompts"]
        rows, notes = [], []
        for r in self.results:
            s = r.summary()
            row = [r.method, _fmt(s["deletion_auc"]), _fmt(s["insertion_auc"])]
            row += [_fmt(s["accuracy"])] if self.has_known else []
            row += ["-" if r.method == RANDOM else _fmt(s["seconds_per_prompt"], 4),
                    f"{r.counted}/{self.counted}"]
            rows.append(row)
            if r.note:
                notes.append(f"{r.method}: refused {r.refused} of {self.n_prompts} prompts: "
                             f"{r.note}")
        lines = [text_table(rows, header=header), *notes]
        return "\n".join([*lines, self.left_out_line()] if self.left_out else lines)

    def agreement_table(self) -> str:
        """The agreement matrix as aligned text."""
        names = self.methods
        rows = [[name, *(_fmt(v, 2) for v in self.agreement[i])] for i, name in enumerate(names)]
        return text_table(rows, header=["spearman", *names])

    def report(self) -> str:
        """The whole comparison as text: a heading, the table and the agreement; the heading
        and one line when every prompt is left out."""
        head = (f"token attribution on {self.task} ({self.model}, {self.metric}, "
                f"{self.n_prompts} prompts)")
        if not self.counted:
            return f"{head}\n\n{self.left_out_line()}"
        return (f"{head}\n\n{self.table()}\n\nrank agreement (Spearman, mean over prompts)\n"
                f"{self.agreement_table()}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record: summaries, per-prompt values, curves and agreement; every null
        that stands for a prompt left out or refused has its reason beside it."""
        refusals = {r.method: r.note for r in self.results if r.note}
        return {
            "task": self.task, "model": self.model, "metric": self.metric,
            "n_prompts": self.n_prompts, "options": self.options,
            "left_out": {"prompts": self.left_out, "reason": LEFT_OUT if self.left_out else None,
                         "which": ([] if self.effective is None else
                                   np.flatnonzero(~self.effective).tolist())},
            "metric_gap": _plain(self.gaps),
            "x": GRID.tolist(),
            "methods": [{"method": r.method,
                         **{k: v if isinstance(v, int) else _plain(v)
                            for k, v in r.summary().items()},
                         "refused": ({"prompts": r.refused, "reason": r.note} if r.note
                                     else None),
                         "per_prompt": {"deletion_auc": _plain(r.deletion_auc),
                                        "insertion_auc": _plain(r.insertion_auc),
                                        "accuracy": _plain(r.accuracy)},
                         "deletion_curve": _plain(r.deletion_curve),
                         "insertion_curve": _plain(r.insertion_curve)}
                        for r in self.results],
            "agreement": {"methods": self.methods, "spearman": _plain(self.agreement),
                          "refused": {m: refusals[m] for m in self.methods if m in refusals}},
        }

    def plot(self, path: str | Path | IO[bytes]) -> None:
        """Draw the mean deletion and insertion curves and the agreement matrix to a PNG (a
        file name or a binary file object)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(17, 5.2),
                                 gridspec_kw={"width_ratios": [1, 1, 1.1]})
        self.draw(axes)
        fig.suptitle(f"token attribution on {self.task} ({self.model}, {self.metric}, "
                     f"{self.n_prompts} prompts)")
        fig.tight_layout()
        fig.savefig(path, dpi=110, format="png")
        plt.close(fig)

    def draw(self, axes: Sequence[Any]) -> None:
        """Draw the deletion curves, the insertion curves and the agreement matrix on three
        matplotlib axes."""
        for ax, kind in zip(axes[:2], ("deletion", "insertion"), strict=True):
            for r in self.results:
                s = r.summary()
                style = dict(color="0.4", linestyle="--") if r.method == RANDOM else {}
                why = "refused" if r.note and not r.counted else _fmt(s[f"{kind}_auc"])
                ax.plot(GRID, getattr(r, f"{kind}_curve"), **style, label=f"{r.method} ({why})")
            better = "lower" if kind == "deletion" else "higher"
            ax.set(xlabel="fraction of tokens " + ("replaced" if kind == "deletion"
                                                   else "restored"),
                   ylabel="metric, fraction of clean - corrupted",
                   title=f"{self.task}: {kind} (AUC, {better} is better)", xlim=(0, 1))
            ax.axhline(0, color="0.8", linewidth=0.8)
            ax.legend(fontsize=7)
            if self.left_out:
                ax.text(0.5, 0.02, f"{self.left_out} of {self.n_prompts} prompts left out: "
                        "corrupted scores at least as well as clean", transform=ax.transAxes,
                        ha="center", va="bottom", fontsize=7, color="0.3")
        names = self.methods
        ax = axes[2]
        image = ax.imshow(self.agreement, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                value = self.agreement[i, j]
                ax.text(j, i, _fmt(value, 2), ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 else "black")
        ax.set_title(f"{self.task}: rank agreement (Spearman)")
        ax.figure.colorbar(image, ax=ax, fraction=0.046)


def _fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table: fixed digits, ``-`` for None or NaN."""
    return "-" if value is None or np.isnan(value) else f"{value:.{digits}f}"


@dataclass(frozen=True)
class BatchScores:
    """What `compare` hands its `on_batch` callback for each batch, before dropping it.

    Attributes
    ----------
    batch : Batch
    known : Tensor or None
        ``[b, p]`` the known tokens (`circuits.attribution.known.known_mask`).
    scores : dict
        Method name -> ``[b, p]`` scores, or None where the method refused the batch.
    refused : dict
        Method name -> why it refused the batch.
    gaps : Tensor
        ``[b]`` the metric of each clean prompt minus that of its corrupted prompt.
    effective : Tensor
        ``[b]`` bool: the prompts that count (the others are left out, `LEFT_OUT`).
    """

    batch: Batch
    known: Tensor | None
    scores: dict[str, Tensor | None]
    refused: dict[str, str]
    gaps: Tensor
    effective: Tensor


class _Tally:
    """One method's measures, added up batch by batch: per-prompt numbers, curve sums."""

    def __init__(self, method: str) -> None:
        self.method, self.seconds, self.measured, self.refused, self.note = method, 0.0, 0, 0, ""
        self.deletion, self.insertion, self.hits = [], [], []  # per batch, [b] each
        self.curve_sum = np.zeros((2, len(GRID)))
        self.counted = 0

    def refuse(self, size: int, why: str) -> None:
        nan = np.full(size, np.nan)
        self.deletion.append(nan)
        self.insertion.append(nan)
        self.hits.append(nan)
        self.refused += size
        self.note = self.note or why  # the first reason (a later batch may give another)

    def add(self, curves: Curves, hits: np.ndarray, effective: np.ndarray, took: float) -> None:
        self.seconds, self.measured = self.seconds + took, self.measured + len(effective)
        on_grid = np.stack([_on_grid(curves.x, c) for c in (curves.deletion, curves.insertion)])
        whole = effective & ~np.isnan(on_grid).any((0, 2))  # [b]
        self.curve_sum += on_grid[:, whole].sum(1)
        self.counted += int(whole.sum())
        for values, kept in ((curves.deletion_auc.numpy(), self.deletion),
                             (curves.insertion_auc.numpy(), self.insertion),
                             (hits, self.hits)):
            kept.append(np.where(effective, values, np.nan))

    def result(self, has_known: bool) -> MethodResult:
        curves = (self.curve_sum / self.counted if self.counted
                  else np.full(self.curve_sum.shape, np.nan))
        return MethodResult(self.method, np.concatenate(self.deletion),
                            np.concatenate(self.insertion),
                            np.concatenate(self.hits) if has_known else None, self.seconds,
                            curves[0], curves[1], self.measured, self.note, self.refused,
                            self.counted)


def compare(
    task: Task,
    model: Model,
    methods: Sequence[str],
    *,
    attribute: Callable[..., Any],
    metric: str | Metric | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    tick: Callable[[float], None] | None = None,
    on_batch: Callable[[BatchScores], None] | None = None,
    batches: Sequence[Batch] | None = None,
) -> Comparison:
    """Attribute every prompt of `task` with every method and measure the attributions.

    Batch by batch: every method scores the batch, the scores are measured, handed to
    `on_batch` and dropped.

    Parameters
    ----------
    task : Task
        The prompts (clean and corrupted) and their answers.
    model : Model
        The model the attributions and curves are computed on.
    methods : sequence of str
        Method names, passed to `attribute`.
    attribute : callable
        ``attribute(model, batch, method, metric=..., **options) -> TokenAttribution``
        (`circuits.attribution.methods.attribute`); its result has ``scores`` ``[b, p]`` and
        ``seconds``. An `OptionError` refuses the batch for that method. Given `tick`, it is
        also passed ``progress=tick``.
    metric : str or Metric, optional
        Default: the task's metric.
    options : mapping, optional
        Method name -> the options passed to that method.
    batch_size : int
        Prompts per batch.
    seed : int
        Seeds the random-order reference.
    progress : callable, optional
        Called with a method's name as it starts on a batch.
    tick : callable, optional
        Called with the prompt passes run: the curves' and the metric's here, the methods'
        through `attribute` (`circuits.attribution.plan` counts them beforehand).
    on_batch : callable, optional
        Called with each batch's `BatchScores`.
    batches : sequence of Batch, optional
        The task's batches, if already made by ``task.batches(model.tokenizer, batch_size,
        model.device, model.context_length)``; made here otherwise.

    Returns
    -------
    Comparison

    Examples
    --------
    >>> import torch
    >>> from circuits.testing import tiny_gpt2
    >>> from circuits.task import Example, Task
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate("abcdefg")}, "a"))
    >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> model = tiny_gpt2(vocab_size=8)
    >>> model.tokenizer = tok
    >>> task = Task("toy", [Example("a b c d", "a b e d", "f", "g")])
    >>> def position(model, batch, method, metric):  # a stand-in: later tokens score higher
    ...     return type("A", (), dict(scores=torch.arange(4.0).expand(batch.size, 4),
    ...                               seconds=0.0))
    >>> result = compare(task, model, ["position"], attribute=position)
    >>> [r.method for r in result.results], result.has_known
    (['position', '(random order)'], False)
    """
    metric = get_metric(metric if metric is not None else task.metric_fn)
    options = options or {}
    if batches is None:
        batches = task.batches(model.tokenizer, batch_size=batch_size, device=model.device,
                               max_length=model.context_length)
    run = logits_fn(model)
    generator = torch.Generator().manual_seed(seed)
    tallies = {m: _Tally(m) for m in [*methods, RANDOM]}
    pair_sum, pair_count = np.zeros((len(methods),) * 2), np.zeros((len(methods),) * 2)
    gaps, effective, has_known = [], [], False
    extra = {} if tick is None else {"progress": tick}
    for batch, known in zip(batches, known_masks(task, model.tokenizer, batches, batch_size),
                            strict=True):
        has_known = has_known or known is not None
        m_clean, m_corrupt = metric_ends(run, batch, metric)  # [b] each
        counts = has_effect(m_clean, m_corrupt, metric).numpy()  # [b]
        gaps.append((m_clean - m_corrupt).numpy())
        effective.append(counts)
        scores: dict[str, Tensor | None] = {}
        refused: dict[str, str] = {}
        _tick(tick, 2 * batch.size)
        for method, tally in tallies.items():
            if progress is not None:
                progress(method)
            try:
                if method == RANDOM:
                    s, took = torch.rand(batch.clean.shape, generator=generator), 0.0  # [b, p]
                else:
                    found = attribute(model, batch, method, metric=metric, **extra,
                                      **dict(options.get(method, {})))
                    s, took = found.scores.detach().float().cpu(), float(found.seconds)
            except OptionError as err:
                scores[method], refused[method] = None, str(err)
                tally.refuse(batch.size, str(err))
                continue
            scores[method] = s
            curves = replacement_curves(run, batch, s, metric)
            _tick(tick, 2 * batch.size * (batch.length + 1))
            hits = (np.full(batch.size, np.nan) if known is None
                    else known_token_accuracy(s, known).numpy())
            tally.add(curves, hits, counts, took)
        ranks = {m: _unit_ranks(s[torch.from_numpy(counts)]) for m, s in scores.items()
                 if s is not None and m != RANDOM}
        for i, a in enumerate(methods):
            for j, b in enumerate(methods):
                if a in ranks and b in ranks:
                    values = (ranks[a] * ranks[b]).sum(1)
                    values = values[~np.isnan(values)]
                    pair_sum[i, j] += values.sum()
                    pair_count[i, j] += values.size
        if on_batch is not None:
            on_batch(BatchScores(batch, known, scores, refused, m_clean - m_corrupt,
                                 torch.from_numpy(counts)))
    with np.errstate(invalid="ignore", divide="ignore"):
        agreement = np.where(pair_count > 0, pair_sum / np.maximum(pair_count, 1), np.nan)
    return Comparison(task.name, model.name, metric.name, len(task),
                      tuple(t.result(has_known) for t in tallies.values()), agreement,
                      {m: dict(options.get(m, {})) for m in methods},
                      np.concatenate(gaps), np.concatenate(effective))


def _tick(tick: Callable[[float], None] | None, passes: float) -> None:
    """Report `passes` to `tick`, if there is one."""
    if tick is not None:
        tick(passes)


def _on_grid(x: Tensor, curves: Tensor) -> np.ndarray:
    """``[b, len(GRID)]`` curves sampled at x ``[p + 1]``, linearly interpolated onto `GRID`."""
    return np.stack([np.interp(GRID, x.numpy(), row.numpy()) for row in curves])


__all__ = ["GRID", "LEFT_OUT", "RANDOM", "BatchScores", "Comparison", "Curves", "LogitsFn",
           "MethodResult", "area", "compare", "logits_fn", "metric_ends", "rank_agreement",
           "replacement_curves", "spearman_rows"]
