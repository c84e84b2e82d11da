"""Probes per layer of a model, with their control tasks: the table, the plot and the files.

`probe_layers` reads the residual stream of a `Labeled` set after each chosen layer (at one or
more position specs, `circuits.representations.activations`), splits the examples once
(stratified by label, the same split for every layer and for the control task), and trains
the same probe on the real labels and on control labels (`probe.control_labels`, keyed on each
example's control word). A `ProbeResult` prints as a table, plots as accuracy with its 95%
interval, control accuracy and chance per layer, and saves each layer's probe as safetensors
(`load_probe` reads one back) with a results JSON, all moved into place together.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CircuitFileError, TaskError
from ..files import dumps, write_atomic
from ..model import Model
from ..nodes import NodeSites
from ..outputs import progress_bar, staged
from ..tables import text_table
from .activations import control_words, hidden_states, parse_layers
from .labels import Labeled, check_position, distinct_examples
from .probe import (
    KINDS,
    Kind,
    ProbeFit,
    control_labels,
    fit_probe,
    predict,
    probe_options,
    split,
)

FORMAT = "circuits-probe"
VERSION = 1
RESULTS, TABLE, PLOT = "probe.json", "probe.txt", "probe.png"


@dataclass(frozen=True)
class ProbeRow:
    """One probe: where it read, and how it did on the real and the control labels."""

    position: str
    layer: int
    accuracy: float
    low: float
    high: float
    chance: float
    control_accuracy: float
    control_chance: float
    n_train: int
    n_test: int
    converged: bool

    @property
    def selectivity(self) -> float:
        """Accuracy minus control accuracy (Hewitt & Liang)."""
        return self.accuracy - self.control_accuracy


@dataclass
class ProbeResult:
    """Probes at each layer (and position) of one model on one label set.

    Attributes
    ----------
    model, fingerprint : str
        The model's name and `circuits.model.Model.fingerprint`.
    labels : str
        The label set's name.
    classes : tuple of str
        The labels, in the order of the probes' outputs.
    kind : str
        ``"linear"`` or ``"mlp"``.
    rows : list of ProbeRow
        One per (position, layer), positions in the order given, layers ascending.
    fits : dict
        ``(position, layer) -> ProbeFit`` of the real labels (weights, predictions).
    options : dict
        seed, test fraction, the probe's options, the number of control word types.
    """

    model: str
    fingerprint: str
    labels: str
    classes: tuple[str, ...]
    kind: str
    rows: list[ProbeRow]
    fits: dict[tuple[str, int], ProbeFit] = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def positions(self) -> list[str]:
        """The positions read, in order."""
        return list(dict.fromkeys(r.position for r in self.rows))

    def table(self) -> str:
        """The rows as an aligned text table (position column only with several positions)."""
        several = len(self.positions) > 1
        header = (("position",) if several else ()) + (
            "layer", "accuracy", "95% CI", "control", "selectivity", "chance", "train/test")
        rows = [((r.position,) if several else ()) + (
            f"resid.{r.layer}", f"{r.accuracy:.3f}", f"{r.low:.3f}-{r.high:.3f}",
            f"{r.control_accuracy:.3f}", f"{r.selectivity:+.3f}", f"{r.chance:.3f}",
            f"{r.n_train}/{r.n_test}") for r in self.rows]
        return text_table(rows, header=header)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the weights, as JSON values."""
        return {"format": FORMAT, "version": VERSION, "model": self.model,
                "model_fingerprint": self.fingerprint, "labels": self.labels,
                "classes": list(self.classes), "kind": self.kind, "options": self.options,
                "rows": [{**asdict(r), "selectivity": r.selectivity,
                          "weights": weights_name(self, r)} for r in self.rows]}

    def plot(self, path: str | Path) -> Path:
        """Accuracy with its 95% interval, control accuracy and chance per layer (left) and
        selectivity (right), one row of panels per position, as a PNG written atomically."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        positions = self.positions
        fig = Figure(figsize=(11, 3.6 * len(positions)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(positions), 2, squeeze=False)
        for (left, right), position in zip(axes, positions, strict=True):
            rows = [r for r in self.rows if r.position == position]
            x = [r.layer for r in rows]
            left.fill_between(x, [r.low for r in rows], [r.high for r in rows], color="C0",
                              alpha=0.2, label="95% interval")
            left.plot(x, [r.accuracy for r in rows], marker="o", color="C0", label="accuracy")
            left.plot(x, [r.control_accuracy for r in rows], marker="s", color="C1",
                      label="control task")
            left.plot(x, [r.chance for r in rows], linestyle="--", color="grey",
                      label="chance (majority class)")
            left.plot(x, [r.control_chance for r in rows], linestyle=":", color="C1",
                      label="control chance")
            left.set_ylim(-0.02, 1.02)
            left.set_ylabel("held-out accuracy")
            right.axhline(0.0, color="grey", linewidth=0.8)
            right.plot(x, [r.selectivity for r in rows], marker="o", color="C2")
            right.set_ylabel("selectivity (accuracy - control)")
            for ax in (left, right):
                ax.set_xticks(x, [f"resid.{layer}" for layer in x], rotation=45, ha="right")
                ax.set_xlabel(f"layer (read at {position})")
            left.legend(fontsize=7)
        fig.suptitle(f"{self.kind} probe for {self.labels} on {self.model}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        out = Path(path)
        write_atomic(out, buf.getvalue())
        return out

    def save(self, folder: str | Path) -> list[Path]:
        """Write probe.json, probe.txt, probe.png and one safetensors file of weights per probe
        into `folder`, staged and moved into place together; returns the paths."""
        from safetensors.torch import save

        folder = Path(folder)
        with staged(folder) as staging:
            names = [RESULTS, TABLE, PLOT]
            write_atomic(staging / RESULTS, (dumps(self.to_dict(), indent=1) + "\n").encode())
            write_atomic(staging / TABLE, (self.table() + "\n").encode("utf-8"))
            self.plot(staging / PLOT)
            for row in self.rows:
                fit = self.fits[(row.position, row.layer)]
                meta = {"format": FORMAT, "version": str(VERSION), "model": self.model,
                        "model_fingerprint": self.fingerprint, "labels": self.labels,
                        "classes": json.dumps(list(self.classes)), "kind": self.kind,
                        "layer": str(row.layer), "site": f"resid.{row.layer}",
                        "position": row.position, "accuracy": f"{row.accuracy:.6f}"}
                name = weights_name(self, row)
                tensors = {k: v.contiguous() for k, v in fit.weights.items()}
                write_atomic(staging / name, save(tensors, metadata=meta))
                names.append(name)
        return [folder / name for name in names]


def weights_name(result: ProbeResult, row: ProbeRow) -> str:
    """The file of a row's probe: ``probe-L3.safetensors``, with several positions
    ``probe-L3-P1.safetensors`` (the position's index in `ProbeResult.positions`)."""
    positions = result.positions
    tail = f"-P{positions.index(row.position)}" if len(positions) > 1 else ""
    return f"probe-L{row.layer}{tail}.safetensors"


@dataclass
class SavedProbe:
    """A probe read back from its safetensors file (`load_probe`)."""

    weights: dict[str, Tensor]
    classes: tuple[str, ...]
    kind: str
    layer: int
    position: str
    meta: dict[str, str]

    def predict(self, x: Tensor | np.ndarray) -> np.ndarray:
        """The label (a class name) predicted for each row of `x` [n, d]."""
        return predict(self.weights, x, list(self.classes))


def load_probe(path: str | Path) -> SavedProbe:
    """Read a probe `ProbeResult.save` wrote.

    Raises
    ------
    CircuitFileError
        Not a readable probe file, or non-finite weights.

    Examples
    --------
    >>> import tempfile
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction(n=40)
    >>> result = probe_layers(p.model, p.labeled, layers=[1])
    >>> saved = load_probe(result.save(tempfile.mkdtemp())[3])
    >>> saved.layer, saved.classes, saved.kind
    (1, ('neg', 'pos'), 'linear')
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError, ValueError) as err:
        raise CircuitFileError(f"cannot read probe {path}: {err}; pass a probe-L*.safetensors "
                               "file `circuits probe` wrote") from None
    try:
        if meta.get("format") != FORMAT:
            raise ValueError("it is not a circuits probe")
        classes = tuple(json.loads(meta["classes"]))
        layer = int(meta["layer"])
        kind, position = meta["kind"], meta["position"]
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
    except (KeyError, ValueError, TypeError) as err:
        raise CircuitFileError(f"{path} is not a probe file `circuits probe` wrote ({err})") \
            from None
    if not all(bool(torch.isfinite(w).all()) for w in weights.values()):
        raise CircuitFileError(f"{path} holds non-finite weights; train the probe again")
    return SavedProbe(weights, classes, kind, layer, position, meta)


def probe_layers(model: Model, labeled: Labeled, layers: Sequence[int] | str | None = None,
                 position: str | int | Sequence[str | int] | None = None,
                 kind: Kind = "linear", test_fraction: float = 0.25, seed: int = 0,
                 batch_size: int = 32, **opts: Any) -> ProbeResult:
    """Train a probe and its control-task twin after each of `layers`, read at `position`.

    Parameters
    ----------
    model : Model
        Any model circuits loads, with a tokenizer.
    labeled : Labeled
        Texts with labels (`circuits.representations.labels.labeled_set`); repeated examples
        are dropped (`distinct_examples`), then every class needs at least 2 (one held out).
    layers : sequence of int or str, optional
        `circuits.representations.activations.parse_layers`'s specs; all by default.
    position : str, int or a sequence of them, optional
        Where each text is read (see `circuits.representations.activations`); several give
        one row per position and layer. By default each text's own position.
    kind : {"linear", "mlp"}
    test_fraction : float
        Held out, per class (`probe.split`).
    seed : int
        Seeds the split, the control labels and the MLP.
    batch_size : int
        Texts per forward pass.
    **opts
        The probe's options (`probe.fit_probe`).

    Returns
    -------
    ProbeResult

    Raises
    ------
    OptionError
        A bad layer, position, kind or option.
    TaskError
        A single class, or a class with one example (checked before the model runs).

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction(n=80)
    >>> result = probe_layers(p.model, p.labeled, layers="0-1")
    >>> [round(r.accuracy, 2) for r in result.rows]
    [1.0, 1.0]
    """
    options = probe_options(kind, opts)
    layers = parse_layers(layers, NodeSites.of(model).n_layers)
    several = position is not None and not isinstance(position, (str, int))
    positions = list(dict.fromkeys(check_position(p)
                                   for p in (position if several else [position])))
    given = len(labeled)
    labeled = distinct_examples(labeled)
    if len(labeled.classes) < 2:
        raise TaskError(f"labelled set {labeled.name!r} has one class ({labeled.classes[0]!r}); "
                        "a probe needs two or more")
    y = np.asarray(labeled.labels)
    train, test = split(len(labeled), test_fraction, seed, labels=y)
    rows: list[ProbeRow] = []
    fits: dict[tuple[str, int], ProbeFit] = {}
    types: dict[str, int] = {}
    with progress_bar(len(positions) * len(layers), "probes", unit="layer") as bar:
        for spec in positions:
            words = control_words(model, labeled, spec)
            control = control_labels(words, y, seed)
            name = spec or _own_position(labeled)
            types[name] = len(set(words))
            states = hidden_states(model, labeled, layers, spec, batch_size)  # [L, n, d]
            for x, layer in zip(states, layers, strict=True):
                fit = fit_probe(x[train], y[train], x[test], y[test], kind, seed, **opts)
                accuracy, chance = _control(x, control, train, test, kind, seed, opts)
                fits[(name, layer)] = fit
                rows.append(ProbeRow(name, layer, fit.accuracy, *fit.interval, fit.chance,
                                     accuracy, chance, fit.n_train, fit.n_test, fit.converged))
                bar.update(1)
    slow = [f"resid.{r.layer}" + (f" at {r.position}" if len(positions) > 1 else "")
            for r in rows if not r.converged]
    if slow:
        hint = "a larger max_iter (--max-iter)" + (" or a smaller C" if kind == "linear" else "")
        warnings.warn(f"the {kind} probe did not converge at {', '.join(slow)}; pass {hint} "
                      "for a settled fit", stacklevel=2)
    recorded = {"seed": seed, "test_fraction": test_fraction, "probe": options,
                "control_word_types": types, "n": len(labeled),
                "duplicates_dropped": given - len(labeled)}
    return ProbeResult(model.name, model.fingerprint, labeled.name, labeled.classes, kind,
                       rows, fits, recorded)


def _own_position(labeled: Labeled) -> str:
    """The texts' own position spec, or ``"own"`` when they differ."""
    specs = set(labeled.positions)
    return specs.pop() if len(specs) == 1 else "own"


def _control(x: Tensor, control: np.ndarray, train: np.ndarray, test: np.ndarray, kind: str,
             seed: int, opts: dict[str, Any]) -> tuple[float, float]:
    """Held-out accuracy and majority rate of the probe trained on control labels."""
    held = control[test]
    chance = float(np.unique(held, return_counts=True)[1].max() / len(held))
    if len(np.unique(control[train])) < 2:
        # every training word drew the same label: the probe can only answer it
        return float(np.mean(held == control[train][0])), chance
    fit = fit_probe(x[train], control[train], x[test], held, kind, seed, **opts)
    return fit.accuracy, chance

