"""Compare token attribution methods by what the model does when their top tokens are changed.

Three measures, each per prompt and then averaged:

- **Deletion and insertion curves** (after Petsiuk et al., 2018, RISE). Tokens are taken in
  attribution order (highest signed score first; ties by position). Deletion starts from the
  clean prompt and replaces the first k of them with the corrupted prompt's tokens; insertion
  starts from the corrupted prompt and restores them. The metric is read after every step and
  normalised per prompt as ``(m - m(corrupt)) / (m(clean) - m(corrupt))``, so the curves run
  from 1 to 0 (deletion) and 0 to 1 (insertion) on every prompt, task and metric scale; x is
  the fraction k / p of the prompt's p tokens. The area under each curve (trapezoid rule on
  x in [0, 1]) summarises it: lower is better for deletion, higher for insertion. A position
  where the two prompts hold the same token changes nothing when replaced, so a ranking gains
  by putting the tokens the corruption changes (and that matter) first. A prompt whose clean
  and corrupted metric are equal has no scale and is left out of the curves.
- **Known-token accuracy**: the share of prompts where the method's highest-scored context
  token is one the behavior is known to rest on (`circuits.attribution.known`).
- **Agreement**: Spearman's rank correlation of two methods' scores on a prompt, averaged over
  prompts (scipy).

A seeded random ordering is measured alongside the methods as a reference.
"""

from __future__ import annotations

import inspect
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
from ..task import Task
from .known import known_mask, known_token_accuracy

RANDOM = "(random order)"
GRID = np.linspace(0.0, 1.0, 51)  # common x grid the mean curves are drawn on

#: ids ``[n, pos]`` -> last-position logits ``[n, vocab]``: a model's forward, or a stand-in
LogitsFn = Callable[[Tensor], Tensor]


# -- deletion and insertion -----------------------------------------------------------------------
@dataclass(frozen=True)
class Curves:
    """Deletion and insertion curves of one batch under one ranking.

    Attributes
    ----------
    deletion, insertion : Tensor
        ``[b, p + 1]`` the metric as a fraction of ``m(clean) - m(corrupt)`` after k = 0 ... p
        tokens were replaced (deletion) or restored (insertion); NaN rows for prompts whose
        clean and corrupted metric are equal.
    clean, corrupt : Tensor
        ``[b]`` the raw metric of the clean and the corrupted prompt.
    """

    deletion: Tensor
    insertion: Tensor
    clean: Tensor
    corrupt: Tensor

    @property
    def x(self) -> Tensor:
        """``[p + 1]`` the fraction of tokens replaced at each step."""
        p = self.deletion.shape[1] - 1
        return torch.arange(p + 1, dtype=torch.float64) / p

    @property
    def deletion_auc(self) -> Tensor:
        """``[b]`` area under the deletion curve (lower is better)."""
        return area(self.deletion)

    @property
    def insertion_auc(self) -> Tensor:
        """``[b]`` area under the insertion curve (higher is better)."""
        return area(self.insertion)


def area(values: Tensor) -> Tensor:
    """Area under curves sampled at x = 0, 1/p, ..., 1 (trapezoid rule).

    Parameters
    ----------
    values : Tensor
        ``[b, p + 1]``.

    Returns
    -------
    Tensor
        ``[b]`` float64.

    Examples
    --------
    >>> import torch
    >>> area(torch.tensor([[1.0, 0.5, 0.0]]))
    tensor([0.5000], dtype=torch.float64)
    """
    values = values.double()
    return torch.trapezoid(values, dx=1.0 / (values.shape[1] - 1), dim=-1)


def logits_fn(model: Model, chunk: int = 64) -> LogitsFn:
    """The model's last-position logits for token ids, without gradients, `chunk` rows a pass."""
    keep = "logits_to_keep" in inspect.signature(model.hf.forward).parameters
    extra = {"logits_to_keep": 1} if keep else {}

    def run(ids: Tensor) -> Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, ids.shape[0], chunk):
                rows = ids[start : start + chunk].to(model.device)
                out.append(model.hf(input_ids=rows, **extra).logits[:, -1])  # [n, vocab]
        return torch.cat(out)

    return run


def replacement_curves(model: Model | LogitsFn, batch: Batch, scores: Tensor,
                       metric: str | Metric = "logit-diff", chunk: int = 64) -> Curves:
    """Deletion and insertion curves of `batch` with tokens taken in the order of `scores`.

    Parameters
    ----------
    model : Model or callable
        A model, or any function from token ids ``[n, p]`` to last-position logits
        ``[n, vocab]``.
    batch : Batch
        ``[b, p]`` clean and corrupted prompts; a replaced token takes the corrupted prompt's
        token at its position.
    scores : Tensor
        ``[b, p]`` attributions; the highest score is replaced (or restored) first, ties by
        position.
    metric : str or Metric
        What is measured at the last position (default the logit difference).
    chunk : int
        Rows per forward pass.

    Returns
    -------
    Curves

    Examples
    --------
    A stand-in model whose logit difference is the number of clean tokens kept: every curve is
    a straight line, whatever the order.

    >>> import torch
    >>> from circuits.batch import Batch
    >>> def count_clean(ids):
    ...     return torch.stack([(ids == 1).sum(-1).float(), torch.zeros(len(ids))], -1)
    >>> b = Batch(torch.ones(1, 4, dtype=torch.long), torch.full((1, 4), 2),
    ...           torch.tensor([[0]]), torch.tensor([[1]]))
    >>> curves = replacement_curves(count_clean, b, torch.rand(1, 4))
    >>> curves.deletion.tolist(), curves.deletion_auc.tolist()
    ([[1.0, 0.75, 0.5, 0.25, 0.0]], [0.5])
    """
    metric = get_metric(metric)
    run = logits_fn(model, chunk) if isinstance(model, Model) else model
    b, p = batch.clean.shape
    clean, corrupt = batch.clean.cpu(), batch.corrupt.cpu()
    order = scores.detach().float().cpu().argsort(dim=-1, descending=True, stable=True)  # [b, p]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p).expand(b, p))  # [b, p]
    replaced = rank[:, None, :] < torch.arange(p + 1)[None, :, None]  # [b, p+1, p]: k first
    deleted = torch.where(replaced, corrupt[:, None], clean[:, None])  # [b, p+1, p]
    inserted = torch.where(replaced, clean[:, None], corrupt[:, None])
    ids = torch.cat([deleted.reshape(-1, p), inserted.reshape(-1, p)])  # [2 b (p+1), p]
    logits = run(ids)  # [2 b (p+1), vocab]
    rows = torch.arange(b).repeat_interleave(p + 1).repeat(2)  # which prompt each row is
    clean_logits = logits[: b * (p + 1)].reshape(b, p + 1, -1)[:, 0]  # [b, vocab]
    dev = logits.device
    rows_batch = Batch(ids.to(dev), ids.to(dev), batch.answers.to(dev)[rows.to(dev)],
                       batch.wrong.to(dev)[rows.to(dev)], clean_logits[rows.to(dev)])
    values = metric(logits, rows_batch).detach().double().cpu().reshape(2, b, p + 1)
    m_clean, m_corrupt = values[0, :, 0], values[0, :, p]  # [b]
    gap = m_clean - m_corrupt
    scale = torch.where(gap.abs() > 1e-9, gap, torch.full_like(gap, float("nan")))
    normalised = (values - m_corrupt[None, :, None]) / scale[None, :, None]
    return Curves(normalised[0], normalised[1], m_clean, m_corrupt)


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
    values = _spearman_rows(a, b)
    return float(np.mean(values)) if values else float("nan")


def _spearman_rows(a: Tensor, b: Tensor) -> list[float]:
    """Spearman's correlation of each pair of rows where both rankings have an order."""
    from scipy.stats import spearmanr

    return [float(spearmanr(row_a, row_b).statistic)
            for row_a, row_b in zip(a.double().cpu().numpy(), b.double().cpu().numpy(),
                                    strict=True)
            if np.ptp(row_a) > 0 and np.ptp(row_b) > 0]


# -- the comparison -------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodResult:
    """One method's row of a comparison: per-prompt measures over all batches.

    Attributes
    ----------
    method : str
    deletion_auc, insertion_auc : ndarray
        ``[n]`` per prompt (NaN for prompts without a clean-corrupted gap).
    accuracy : ndarray or None
        ``[n]`` known-token hits (1/0, NaN where nothing is known), None when the task knows
        no token.
    seconds : float
        Wall time of the attributions, all prompts measured.
    deletion_curve, insertion_curve : ndarray
        ``[len(GRID)]`` the curves averaged over prompts on the x grid `GRID`.
    measured : int
        Prompts the method ran on.
    note : str
        Why it refused the others (its error message), or "".
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

    def summary(self) -> dict[str, Any]:
        """Means over the prompts measured (NaN-free ones) and seconds per prompt."""
        return {
            "deletion_auc": _mean(self.deletion_auc),
            "insertion_auc": _mean(self.insertion_auc),
            "accuracy": None if self.accuracy is None else _mean(self.accuracy),
            "seconds_per_prompt": self.seconds / self.measured if self.measured else None,
            "prompts": self.measured,
        }


def _mean(values: np.ndarray) -> float:
    """The mean of the non-NaN values (NaN when there are none)."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


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
        ``[m, m]`` mean Spearman correlation between the methods (not the reference).
    options : dict
        The method options used.
    """

    task: str
    model: str
    metric: str
    n_prompts: int
    results: tuple[MethodResult, ...]
    agreement: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The compared methods (the reference left out)."""
        return [r.method for r in self.results if r.method != RANDOM]

    @property
    def has_known(self) -> bool:
        return any(r.accuracy is not None for r in self.results)

    def table(self) -> str:
        """The comparison table as aligned text, then a line per method that refused prompts."""
        from ..report import text_table

        header = ["method", "deletion AUC (lower better)", "insertion AUC (higher better)"]
        header += ["known-token accuracy"] if self.has_known else []
        header += ["s / prompt", "prompts"]
        rows, notes = [], []
        for r in self.results:
            s = r.summary()
            row = [r.method, _fmt(s["deletion_auc"]), _fmt(s["insertion_auc"])]
            row += [_fmt(s["accuracy"])] if self.has_known else []
            row += ["-" if r.method == RANDOM else _fmt(s["seconds_per_prompt"], 4),
                    f"{r.measured}/{self.n_prompts}"]
            rows.append(row)
            if r.note:
                notes.append(f"{r.method}: {r.measured} of {self.n_prompts} prompts: {r.note}")
        return "\n".join([text_table(rows, header=header), *notes])

    def agreement_table(self) -> str:
        """The agreement matrix as aligned text."""
        from ..report import text_table

        names = self.methods
        rows = [[name, *(_fmt(v, 2) for v in self.agreement[i])] for i, name in enumerate(names)]
        return text_table(rows, header=["spearman", *names])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record: summaries, per-prompt values, curves and agreement."""
        def plain(a: np.ndarray | None) -> list[float | None] | None:
            return None if a is None else [None if np.isnan(v) else float(v) for v in a]

        return {
            "task": self.task, "model": self.model, "metric": self.metric,
            "n_prompts": self.n_prompts, "options": self.options,
            "x": GRID.tolist(),
            "methods": [{"method": r.method, **r.summary(),
                         "per_prompt": {"deletion_auc": plain(r.deletion_auc),
                                        "insertion_auc": plain(r.insertion_auc),
                                        "accuracy": plain(r.accuracy)},
                         "deletion_curve": plain(r.deletion_curve),
                         "insertion_curve": plain(r.insertion_curve)}
                        for r in self.results],
            "agreement": {"methods": self.methods,
                          "spearman": [plain(row) for row in self.agreement]},
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
                ax.plot(GRID, getattr(r, f"{kind}_curve"), **style,
                        label=f"{r.method} ({_fmt(s[f'{kind}_auc'])})")
            better = "lower" if kind == "deletion" else "higher"
            ax.set(xlabel="fraction of tokens " + ("replaced" if kind == "deletion"
                                                   else "restored"),
                   ylabel="metric, fraction of clean - corrupted",
                   title=f"{self.task}: {kind} (AUC, {better} is better)", xlim=(0, 1))
            ax.axhline(0, color="0.8", linewidth=0.8)
            ax.legend(fontsize=7)
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


def _on_grid(x: Tensor, curves: Tensor) -> np.ndarray:
    """``[b, len(GRID)]`` curves sampled at x ``[p + 1]``, linearly interpolated onto `GRID`."""
    return np.stack([np.interp(GRID, x.numpy(), row.numpy()) for row in curves])


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
) -> Comparison:
    """Attribute every prompt of `task` with every method and measure the attributions.

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
        ``seconds``.
    metric : str or Metric, optional
        Default: the task's metric.
    options : mapping, optional
        Method name -> the options passed to that method.
    batch_size : int
        Prompts per batch.
    seed : int
        Seeds the random-order reference.
    progress : callable, optional
        Called with a short text as each method starts.

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
    batches = task.batches(model.tokenizer, batch_size=batch_size, device=model.device,
                           max_length=model.context_length)
    knowns = [known_mask(task, model.tokenizer, b) for b in batches]
    run = logits_fn(model, chunk=max(64, batch_size))
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, list[Tensor | None]] = {}
    results = []
    for method in [*methods, RANDOM]:
        if progress is not None:
            progress(method)

        def score(batch: Batch, method: str = method) -> tuple[Tensor, float]:
            if method == RANDOM:
                return torch.rand(batch.clean.shape, generator=generator), 0.0  # [b, p]
            found = attribute(model, batch, method, metric=metric,
                              **dict(options.get(method, {})))
            return found.scores.detach().float().cpu(), float(found.seconds)

        result, scores[method] = _measure(method, score, batches, knowns, run, metric)
        results.append(result)
    agreement = np.array([[_agreement(scores[a], scores[b]) for b in methods] for a in methods])
    return Comparison(task.name, model.name, metric.name, len(task), tuple(results),
                      agreement.reshape(len(methods), len(methods)),
                      {m: dict(options.get(m, {})) for m in methods})


def _measure(method: str, score: Callable[[Batch], tuple[Tensor, float]],
             batches: list[Batch], knowns: list[Tensor | None], run: LogitsFn,
             metric: Metric) -> tuple[MethodResult, list[Tensor | None]]:
    """One method's curves, AUCs and hits on every batch, and its scores per batch (None for
    a batch it refused: prompts too long for it, an option it cannot use)."""
    has_known = any(k is not None for k in knowns)
    seconds, measured, note, per_batch = 0.0, 0, "", []
    deletion, insertion, dele_auc, ins_auc, hits = [], [], [], [], []
    for batch, known in zip(batches, knowns, strict=True):
        try:
            s, took = score(batch)  # [b, p]
        except OptionError as err:
            note, s = str(err), None
        per_batch.append(s)
        hit = np.full(batch.size, np.nan)
        if s is None:
            nan = np.full((batch.size, len(GRID)), np.nan)
            deletion.append(nan)
            insertion.append(nan)
            dele_auc.append(hit)
            ins_auc.append(hit)
            hits.append(hit)
            continue
        seconds, measured = seconds + took, measured + batch.size
        curves = replacement_curves(run, batch, s, metric)
        deletion.append(_on_grid(curves.x, curves.deletion))
        insertion.append(_on_grid(curves.x, curves.insertion))
        dele_auc.append(curves.deletion_auc.numpy())
        ins_auc.append(curves.insertion_auc.numpy())
        hits.append(hit if known is None else known_token_accuracy(s, known).numpy())
    result = MethodResult(
        method, np.concatenate(dele_auc), np.concatenate(ins_auc),
        np.concatenate(hits) if has_known else None, seconds,
        _nanmean_rows(np.concatenate(deletion)), _nanmean_rows(np.concatenate(insertion)),
        measured, note)
    return result, per_batch


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Column means over the rows that hold no NaN (NaN columns when none does)."""
    kept = values[~np.isnan(values).any(1)]
    return kept.mean(0) if len(kept) else np.full(values.shape[1], np.nan)


def _agreement(a: list[Tensor | None], b: list[Tensor | None]) -> float:
    """`rank_agreement` over batches of different lengths, each prompt counted once (batches
    either method refused left out)."""
    values = [v for sa, sb in zip(a, b, strict=True) if sa is not None and sb is not None
              for v in _spearman_rows(sa, sb)]
    return float(np.mean(values)) if values else float("nan")
