"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

Where does a model recall a fact about a subject? Three runs per prompt:

clean
    The prompt as it is; ``p_clean`` is the probability of the answer token (summed over the
    example's answers when it has several).
corrupted
    Gaussian noise is added to the subject tokens' embeddings (the output of the model's input
    embedding module): ``noise`` times the standard deviation of those embeddings over every
    subject token of the prompts traced (ROME's 3 by default). ``p_corrupt``.
restored
    The corrupted run with one state put back to its clean value: the hidden state (a decoder
    layer's output) at one layer and token, or the MLP outputs, or the attention outputs (the
    output of the attention output projection), at one token in a window of ``window``
    consecutive layers centred on a layer (layers ``l - window // 2`` to
    ``l + ceil(window / 2) - 1``, cut at the model's ends, as ROME does).

The indirect effect of a state is ``p(restored) - p(corrupted)``; the total effect is
``p_clean - p_corrupt``. Every restoration of a prompt uses the same noise draws; results are
averaged over ``samples`` draws and over the prompts.

Token positions: one prompt keeps its own tokens (subject tokens marked ``*``). Prompts of
several layouts are averaged in ROME's token groups: the first, middle and last subject tokens,
the first token after the subject, the further tokens and the last token (a position counts in
every group it belongs to, e.g. a one-token subject is both first and last). Tokens before the
subject are left out there: by causality their states are the same in the clean and the
corrupted run, so restoring them does nothing (they are not run; their effect is 0).

The subject of each prompt is ``example.meta["subject"]`` (a substring of the clean prompt), or
else the task's rule: a built-in task whose module defines ``subject_positions(example,
tokenizer)`` (the factual task does). A prompt with neither is a `TaskError`.

Every restoration is one row of a batched forward through nnsight, variant-major as in
`circuits.nodes.patch_each`, so any Hugging Face causal LM works (the hook sites come from
`circuits.nodes.NodeSites`); `circuits.reading.trace_runs` runs those forwards.

Bounds
    ``noise`` is at most `MAX_NOISE` (100 standard deviations: ROME's 3 already makes the
    subject unrecognisable, and far beyond 100 the noised embeddings overflow the norms'
    float32 variance), ``samples`` at most `MAX_SAMPLES` (100, ten times ROME's), and the whole
    trace at most `MAX_RUNS` noised runs (prompts x samples x restorations; ten million take
    about half an hour for the 4-layer reference models on a laptop CPU), refused before any
    forward with the number it would need. Forwards hold at most ``rows`` runs, results are
    summed as they come (nothing per prompt is kept), and a run that gives a probability that
    is not finite stops the trace with an `OptionError` rather than writing it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import outputs  # outputs.progress_bar: tests replace it there
from ..errors import OptionError, TaskError
from ..files import write_atomic
from ..model import Model
from ..task import Example, Task
from .subjects import SubjectRule, subject_tokens, task_rule
from .trace_runs import KINDS
from .trace_runs import Plan as _Plan
from .trace_runs import Prompt as _Prompt
from .trace_runs import Sites as _Sites
from .trace_runs import clean_run as _clean_run  # noqa: F401  (kept importable here)
from .trace_runs import noise_draws as noise_draws  # re-exported: the tests draw with it
from .trace_runs import noised_run as _noised_run  # noqa: F401  (kept importable here)
from .trace_runs import trace_group as _trace_group
from .trace_runs import variants as _variants

GROUPS = ("first subject token", "middle subject tokens", "last subject token",
          "first subsequent token", "further tokens", "last token")
TITLES = {"hidden": "hidden state", "mlp": "MLP outputs", "attn": "attention outputs"}
COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
MAX_NOISE = 100.0  # standard deviations of the subject's embeddings
MAX_SAMPLES = 100  # noise draws per prompt
MAX_RUNS = 10_000_000  # noised runs (prompts x samples x restorations) in one trace


@dataclass(frozen=True)
class CausalTrace:
    """The indirect effects of restoring states of a subject-noised run, per layer and token.

    Attributes
    ----------
    effects : dict[str, Tensor]
        Kind (``hidden``, ``mlp``, ``attn``) -> ``[n_layers, n_rows]`` float64 mean indirect
        effect; MLP and attention outputs restored in windows of `window` layers.
    single : dict[str, Tensor]
        The same with one layer restored at a time (for ``hidden`` always the same as
        `effects`; for the others too when `window` is 1).
    labels : tuple of str
        One per row: the prompt's tokens (one prompt) or the token groups that occur.
    counts : tuple of int
        Per row, how many (prompt, position) cells were averaged.
    p_clean, p_corrupt : float
        Mean probability of the answer in the clean and the noised runs.
    window, samples, n_prompts, seed : int
    noise : float
        The noise scale in standard deviations of the subject embeddings.
    noise_std : float
        The standard deviation of the noise added (``noise`` times that of the embeddings).
    model, task : str
    """

    effects: dict[str, Tensor]
    single: dict[str, Tensor]
    labels: tuple[str, ...]
    counts: tuple[int, ...]
    p_clean: float
    p_corrupt: float
    window: int
    noise: float
    noise_std: float
    samples: int
    n_prompts: int
    seed: int
    model: str = ""
    task: str = ""
    kinds: tuple[str, ...] = field(default=KINDS)

    @property
    def total_effect(self) -> float:
        """``p_clean - p_corrupt``: what restoring everything gives back."""
        return self.p_clean - self.p_corrupt

    @property
    def n_layers(self) -> int:
        return int(next(iter(self.effects.values())).shape[0])

    def strongest(self, kind: str, single: bool = False) -> tuple[int, str, float]:
        """The layer, row label and value of the largest indirect effect of `kind`."""
        grid = (self.single if single else self.effects)[_check_kind(kind, self.kinds)]
        flat = int(torch.argmax(grid))
        layer, row = divmod(flat, grid.shape[1])
        return layer, self.labels[row], float(grid[layer, row])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the settings, probabilities and every grid (``[layer][row]``).

        Examples
        --------
        >>> import json
        >>> from circuits import get_task, load_model
        >>> trace = causal_trace(load_model("factual-gpt2-4l"), get_task("factual", n=1),
        ...                      samples=2)
        >>> d = json.loads(json.dumps(trace.to_dict()))
        >>> len(d["effects"]["mlp"]) == d["n_layers"], len(d["effects"]["mlp"][0]) == len(
        ...     d["labels"])
        (True, True)
        """
        return {
            "model": self.model, "task": self.task, "n_prompts": self.n_prompts,
            "n_layers": self.n_layers, "noise": self.noise, "noise_std": self.noise_std,
            "samples": self.samples, "window": self.window, "seed": self.seed,
            "quantity": "probability of the answer", "p_clean": self.p_clean,
            "p_corrupt": self.p_corrupt, "total_effect": self.total_effect,
            "labels": list(self.labels), "counts": list(self.counts),
            "effects": {k: v.tolist() for k, v in self.effects.items()},
            "single": {k: v.tolist() for k, v in self.single.items()},
        }

    def figure(self) -> Any:
        """The classic heatmaps, one panel per kind (x = layer, y = token or token group), as a
        matplotlib ``Figure`` (made without pyplot, so no backend is switched)."""
        from matplotlib.figure import Figure

        n_rows = len(self.labels)
        fig = Figure(figsize=(4.2 * len(self.kinds), 1.2 + 0.32 * n_rows), layout="constrained")
        axes = fig.subplots(1, len(self.kinds), squeeze=False)[0]
        for ax, kind in zip(axes, self.kinds, strict=True):
            grid = self.effects[kind].T.numpy()  # [rows, layers]
            low, high = min(0.0, float(grid.min())), max(float(grid.max()), 1e-9)
            image = ax.imshow(grid, cmap=COLORMAPS[kind], vmin=low, vmax=high, aspect="auto")
            ax.set_xticks(range(self.n_layers))
            ax.set_yticks(range(n_rows), self.labels)
            ax.set_xlabel("layer" if kind == "hidden" or self.window == 1
                          else f"centre of {self.window}-layer window")
            ax.set_title(f"restoring {TITLES[kind]}")
            fig.colorbar(image, ax=ax, shrink=0.9, label="indirect effect on p(answer)")
        fig.suptitle(f"causal trace of {self.task or 'prompts'} on {self.model or 'the model'}: "
                     f"p(answer) clean {self.p_clean:.3f}, subject noised {self.p_corrupt:.3f} "
                     f"({self.n_prompts} prompts x {self.samples} noise samples)", fontsize=10)
        return fig

    def plot(self, path: str | Path) -> Path:
        """Write `figure` as a PNG to `path`, atomically; return the path.

        Examples
        --------
        >>> import tempfile
        >>> from circuits import get_task, load_model
        >>> trace = causal_trace(load_model("factual-gpt2-4l"), get_task("factual", n=2),
        ...                      samples=2)
        >>> trace.plot(Path(tempfile.mkdtemp()) / "trace.png").stat().st_size > 0
        True
        """
        path = Path(path)
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png", dpi=110)
        write_atomic(path, buffer.getvalue())
        return path


# -- the trace --------------------------------------------------------------------------------
def default_window(n_layers: int) -> int:
    """A quarter of the layers, at least 1 and at most ROME's 10 (1 for models of < 8 layers).

    >>> default_window(4), default_window(12), default_window(48)
    (1, 3, 10)
    """
    return max(1, min(10, n_layers // 4))


def causal_trace(
    model: Model,
    task_or_examples: Task | Example | Sequence[Example],
    *,
    noise: float = 3.0,
    samples: int = 10,
    window: int | None = None,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    subject: SubjectRule | None = None,
    rows: int = 2048,
) -> CausalTrace:
    """Trace where a model recalls the answer: noise the subject, restore states one by one.

    Parameters
    ----------
    model : Model
        Any Hugging Face causal LM with its tokenizer.
    task_or_examples : Task, Example or sequence of Example
        The prompts (their clean prompts and answers are used; the corrupted prompts are not).
    noise : float
        Noise scale, in standard deviations of the subject tokens' embeddings (ROME: 3), at most
        `MAX_NOISE`.
    samples : int
        Noise draws per prompt (ROME: 10), at most `MAX_SAMPLES`; every restoration of a prompt
        uses the same draws.
    window : int, optional
        Layers restored together for MLP and attention outputs (`default_window` when None).
    kinds : sequence of str
        Which of ``hidden``, ``mlp``, ``attn`` to trace.
    seed : int
        Seeds the noise; a prompt's draws depend only on the seed and its index.
    subject : callable, optional
        ``subject(example, tokenizer) -> positions`` for examples without ``meta["subject"]``
        (default: the task's rule, see `task_rule`).
    rows : int
        Most rows (prompts x samples x restorations) per forward.

    Returns
    -------
    CausalTrace

    Raises
    ------
    OptionError
        A bad option value, a model without a tokenizer, a trace of more than `MAX_RUNS`
        noised runs, or probabilities that are not finite numbers.
    TaskError
        A prompt without a subject (see `subject_tokens`), or one `Task.batches` refuses.

    Examples
    --------
    >>> from circuits import get_task, load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> trace = causal_trace(model, get_task("factual", n=4), samples=3)
    >>> trace.labels  # no subject of these four has a middle token
    ('first subject token', 'last subject token', 'first subsequent token', 'further tokens', \
'last token')
    >>> tuple(trace.effects["mlp"].shape), trace.total_effect > 0.5
    ((4, 5), True)
    """
    task = _as_task(task_or_examples)
    kinds = _check_options(model, noise, samples, kinds, seed, rows)
    sites = _Sites.of(model)
    L = sites.n_layers
    window = default_window(L) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= L:
        raise OptionError(f"window must be a whole number of layers from 1 to the model's {L}, "
                          f"got {window!r}")
    plan = _Plan.of(kinds, L, window)
    # every prompt runs at least the corrupted run and each restoration at its last token:
    # refuse what is too large on that count before tokenizing, then on the exact one
    _check_runs(len(task.examples) * samples * (1 + len(plan.kind)), len(task.examples),
                samples, "at least ")
    rule = subject or task_rule(task.name)
    prompts = _prepare(model, task, rule)
    groups = _groups(prompts, rows, samples)
    runs = _check_runs(sum(samples * len(group) * len(_variants(plan, group)[0])
                           for group in groups), len(prompts), samples, "about ")
    embed = model.hf.get_input_embeddings()
    with torch.no_grad():
        subject_embeds = torch.cat([embed(p.ids[None])[0, p.subject].float() for p in prompts])
    noise_std = noise * float(subject_embeds.std(unbiased=False))

    totals = _Totals(len(prompts), model.tokenizer)
    with outputs.progress_bar(runs, "causal trace", "run") as bar:
        for group in groups:
            found = _trace_group(model, sites, group, plan, samples, noise_std, seed, rows,
                                 bar.update)
            for prompt, (grids, clean, corrupt) in zip(group, found, strict=True):
                if not (math.isfinite(clean) and math.isfinite(corrupt)
                        and all(bool(g.isfinite().all()) for g in grids.values())):
                    raise OptionError(
                        f"causal tracing gave probabilities that are not finite numbers (prompt "
                        f"{prompt.index + 1}, noise {noise:g} sd in {str(model.dtype)[6:]}); "
                        "trace with less noise, or load the model in float32")
                totals.add(prompt, grids, clean, corrupt)
    labels, counts, merged = totals.result()
    return CausalTrace(
        effects={k: merged[k] for k in kinds},
        single={k: merged[k if k == "hidden" or window == 1 else f"{k}/1"] for k in kinds},
        labels=labels, counts=counts, p_clean=totals.p_clean / len(prompts),
        p_corrupt=totals.p_corrupt / len(prompts), window=window, noise=float(noise),
        noise_std=noise_std, samples=samples, n_prompts=len(prompts), seed=seed,
        model=model.name, task=task.name, kinds=kinds)


def _check_runs(runs: int, n_prompts: int, samples: int, about: str) -> int:
    """`runs`, or an OptionError with the numbers when it is more than `MAX_RUNS`."""
    if runs > MAX_RUNS:
        raise OptionError(f"this causal trace needs {about}{runs:,} noised runs ({n_prompts} "
                          f"prompts x {samples} noise samples x {about}"
                          f"{runs // (samples * n_prompts)} restorations each), more than the "
                          f"{MAX_RUNS:,} a trace may take; trace fewer prompts or noise samples")
    return runs


def _as_task(given: Any) -> Task:
    if isinstance(given, Task):
        return given
    if isinstance(given, Example):
        given = [given]
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise OptionError(f"causal_trace takes a Task, an Example or a list of Examples, got a "
                          f"{type(given).__name__}; load a task with get_task or Task.from_jsonl")
    return Task("prompts", tuple(given))


def _check_options(model: Model, noise: Any, samples: Any, kinds: Sequence[str], seed: Any,
                   rows: Any) -> tuple[str, ...]:
    """The kinds as a tuple, after checking every option (OptionError on a bad one)."""
    if getattr(model, "tokenizer", None) is None:
        raise OptionError(f"{getattr(model, 'name', 'the model')} has no tokenizer; causal "
                          "tracing finds the subject in the prompt text, so load the model with "
                          "its tokenizer")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not (
            0 <= noise <= MAX_NOISE):
        raise OptionError(f"noise must be a number of standard deviations from 0 to "
                          f"{MAX_NOISE:g} (ROME uses 3), got {noise!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or not (
            1 <= samples <= MAX_SAMPLES):
        raise OptionError(f"samples must be a whole number from 1 to {MAX_SAMPLES} (ROME uses "
                          f"10), got {samples!r}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise OptionError(f"rows must be a whole number of at least 1, got {rows!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise OptionError(f"seed must be a whole number from 0 to {2**32 - 1}, got {seed!r}")
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(dict.fromkeys(kinds))
    if not kinds:
        raise OptionError(f"kinds is empty; trace at least one of {', '.join(KINDS)}")
    for kind in kinds:
        _check_kind(kind, KINDS)
    return kinds


def _check_kind(kind: str, known: Sequence[str]) -> str:
    if kind not in known:
        raise OptionError(f"unknown kind {kind!r}; use one of {', '.join(known)}")
    return kind


def _prepare(model: Model, task: Task, rule: SubjectRule | None) -> list[_Prompt]:
    """Tokenize and check every example (as `Task.batches` does) and find its subject."""
    prompts = []
    for i, example in enumerate(task.examples):
        batch = replace(task, examples=(example,)).batches(
            model.tokenizer, device=model.device, max_length=model.context_length)[0]
        positions = subject_tokens(example, model.tokenizer, rule, bos=task.bos)
        p = batch.length
        if positions[-1] >= p or positions[0] < 0 or positions != list(
                range(positions[0], positions[-1] + 1)):
            raise TaskError(f"{example.where()}: the subject's tokens {positions} are not one run "
                            f"of positions of the {p}-token prompt; check the subject")
        prompts.append(_Prompt(i, batch.clean[0], batch.answers[0], positions))
    return prompts


def _groups(prompts: list[_Prompt], rows: int, samples: int) -> list[list[_Prompt]]:
    """Prompts of one token length, at most ``rows // (16 * samples)`` together (so a forward
    holds at least 16 restorations), in a fixed order."""
    size = max(1, rows // (16 * samples))
    by_length: dict[int, list[_Prompt]] = {}
    for prompt in prompts:
        by_length.setdefault(len(prompt.ids), []).append(prompt)
    return [group[i:i + size] for _, group in sorted(by_length.items())
            for i in range(0, len(group), size)]


class _Totals:
    """The results summed as prompts come: a single prompt's own grids, or ROME's token groups
    (sums and counts per group) and the probabilities."""

    def __init__(self, n_prompts: int, tokenizer: Any) -> None:
        self.single = n_prompts == 1
        self.tokenizer = tokenizer
        self.sums: dict[str, Tensor] = {}  # key -> [n_layers, rows]
        self.counts = [0] * len(GROUPS)
        self.labels: tuple[str, ...] = ()
        self.p_clean = self.p_corrupt = 0.0

    def add(self, q: _Prompt, grid: dict[str, Tensor], clean: float = 0.0,
            corrupt: float = 0.0) -> None:
        """Add one prompt's ``[n_layers, p]`` grids and its clean and noised probabilities."""
        self.p_clean += clean
        self.p_corrupt += corrupt
        if self.single:
            self.labels = tuple(self.tokenizer.decode([int(t)]) + ("*" if i in q.subject else "")
                                for i, t in enumerate(q.ids))
            self.sums = dict(grid)
            self.counts = [1] * len(self.labels)
            return
        for g, positions in enumerate(_group_positions(q.subject, len(q.ids))):
            self.counts[g] += len(positions)
            for k, values in grid.items():
                if k not in self.sums:
                    self.sums[k] = torch.zeros(values.shape[0], len(GROUPS), dtype=torch.float64)
                self.sums[k][:, g] += values[:, positions].sum(1)

    def result(self) -> tuple[tuple[str, ...], tuple[int, ...], dict[str, Tensor]]:
        """Labels, counts and ``[n_layers, rows]`` mean grids (the token groups that occur)."""
        if self.single:
            return self.labels, tuple(self.counts), self.sums
        kept = [g for g in range(len(GROUPS)) if self.counts[g]]
        counts = torch.tensor([self.counts[g] for g in kept], dtype=torch.float64)
        merged = {k: s[:, kept] / counts for k, s in self.sums.items()}
        return tuple(GROUPS[g] for g in kept), tuple(self.counts[g] for g in kept), merged


def _group_positions(subject: list[int], p: int) -> list[list[int]]:
    """Per entry of `GROUPS`, the positions of a ``p``-token prompt in it.

    >>> _group_positions([2, 3, 4], 9)
    [[2], [3], [4], [5], [6, 7], [8]]
    >>> _group_positions([1], 3)
    [[1], [], [1], [2], [], [2]]
    """
    first, last = subject[0], subject[-1]
    after = [last + 1] if last + 1 < p else []
    return [[first], list(range(first + 1, last)), [last], after,
            list(range(last + 2, p - 1)), [p - 1]]
