"""Fit an eraser on a labelled set, check it with probes on held-out examples, and price it.

`erase_concept` fits LEACE (`circuits.representations.erase`) on a labelled set's residual
stream at one layer. Half the examples (stratified by label) fit the eraser; a linear probe
(`circuits.representations.probe.fit_probe`) trained on that half is measured on a held-out
quarter before erasure (the control: it should beat chance) and after (LEACE's promise:
chance); a second probe trained on the last quarter, erased, shows whether the erasure holds on
examples the eraser never saw (its leftover is of order sqrt(d / n) in whitened units, so it
needs examples many times the width, and states in a few tight clusters make a small leftover
easy to separate). The cost (`price`) is the task's metric, accuracy and KL to the unedited
model (`~.effects.TaskMeter`) and the loss and KL on neutral text (`~.effects.NeutralMeter`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OptionError, TaskError
from ..model import Model, dtype_name
from ..nodes import NodeSites
from ..tables import text_table
from ..task import Task
from .activations import hidden_states, parse_layers
from .effects import NeutralMeter, TaskMeter
from .erase import Eraser, check_at, cross_covariance, erase_edit, fit_eraser
from .labels import Labeled, distinct_examples
from .probe import ProbeFit, fit_probe, split

#: Each class needs this many examples: the fit, probe-training and probe-test sets each get some.
MIN_PER_CLASS = 4


# -- fit, check and price an erasure --------------------------------------------------------------
@dataclass
class Erasure:
    """An eraser fitted at one layer, checked by probes on held-out examples, and its cost.

    Attributes
    ----------
    eraser : Eraser
    labels : str
        The labelled set's name.
    position : str
        Where the concept was read (the position spec, or ``"own"``: each text's own).
    at : str
        Where the eraser was applied in the forward (`erase_edit`).
    before, after : ProbeFit
        A linear probe trained on the eraser's examples and measured on the test examples,
        without erasure (the control: it should beat chance) and with (LEACE's promise: chance).
    after_fresh : ProbeFit
        A probe trained on erased examples the eraser never saw, measured on the test examples.
    covariance : tuple of float
        Frobenius norm of ``Cov(x, z)`` on the examples the eraser did not see, before and after.
    moved : float
        Mean ``||x - x'||²`` over those examples over their mean ``||x - μ||²``.
    cost : dict
        `price`'s.
    """

    eraser: Eraser
    labels: str
    position: str
    at: str
    before: ProbeFit
    after: ProbeFit
    after_fresh: ProbeFit
    covariance: tuple[float, float]
    moved: float
    cost: dict[str, Any]

    @property
    def readable_before(self) -> bool:
        """The control: the probe beat chance before erasure (its interval lies above it)."""
        return self.before.interval[0] > self.before.chance

    @property
    def erased(self) -> bool:
        """After erasure the probe does not beat chance: chance is within (or above) its
        interval."""
        return _at_chance(self.after)

    @property
    def generalises(self) -> bool:
        """A probe trained on erased examples the eraser never saw does not beat chance."""
        return _at_chance(self.after_fresh)

    def verdict(self) -> str:
        """One line: did erasure work, does it hold on new examples, does the check mean
        anything."""
        layer = f"layer {self.eraser.layer}"
        if not self.readable_before:
            return (f"the concept is not linearly readable at {layer} even before erasure "
                    f"(probe {_pct(self.before.accuracy)}, chance {_pct(self.before.chance)}): "
                    "the check after erasure says nothing; try another layer or position")
        fell = (f"a linear probe at {layer} fell from {_pct(self.before.accuracy)} to "
                f"{_pct(self.after.accuracy)}")
        if not self.erased:
            return (f"NOT erased: {fell}, above chance ({_pct(self.after.chance)}): the class "
                    "means agree, but the probe's threshold still splits the classes")
        if self.generalises:
            return (f"erased: {fell}, within its interval of chance ({_pct(self.after.chance)}), "
                    f"and a probe trained on new erased examples reads "
                    f"{_pct(self.after_fresh.accuracy)}, also at chance")
        return (f"erased on the eraser's examples only: {fell} (chance "
                f"{_pct(self.after.chance)}), but a probe trained on new erased examples still "
                f"reads {_pct(self.after_fresh.accuracy)}: fit on more examples (the leftover "
                f"shrinks as sqrt(width / examples): width {self.eraser.width}, "
                f"{self.eraser.meta.get('n_fit', '?')} examples)")

    def table(self) -> str:
        """The report: the probes before and after (with intervals and chance), and the cost."""
        def probe(fit: ProbeFit) -> str:
            lo, hi = fit.interval
            return f"{_pct(fit.accuracy)} [{_pct(lo)}, {_pct(hi)}]"

        c = self.cost
        rows = [("linear probe, held-out", probe(self.before), probe(self.after)),
                ("  trained on new examples", "", probe(self.after_fresh)),
                ("chance (majority class)", _pct(self.before.chance), _pct(self.after.chance)),
                ("|Cov(x, z)|, new examples", f"{self.covariance[0]:.4g}",
                 f"{self.covariance[1]:.4g}")]
        if c.get("metric") is not None:
            rows += [(f"task metric ({c['task']})", f"{c['metric']:.4f}",
                      f"{c['metric_erased']:.4f}"),
                     ("task accuracy", _pct(c["accuracy"]), _pct(c["accuracy_erased"])),
                     ("KL to unedited, last position", "0", f"{c['kl']:.4g}")]
        rows += [("loss on neutral text (nats)", f"{c['loss']:.4f}", f"{c['loss_erased']:.4f}"),
                 ("KL to unedited, neutral text", "0", f"{c['neutral_kl']:.4g}")]
        return text_table(rows, header=("", "before", "after"))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: the settings, the probes, the cost and the verdict."""
        def probe(fit: ProbeFit) -> dict[str, Any]:
            return {"accuracy": fit.accuracy, "interval": list(fit.interval),
                    "chance": fit.chance, "n_train": fit.n_train, "n_test": fit.n_test,
                    "converged": fit.converged}

        e = self.eraser
        return {"labels": self.labels, "layer": e.layer, "site": f"resid.{e.layer}",
                "position": self.position, "at": self.at, "classes": list(e.classes),
                "model": e.meta.get("model"), "fingerprint": e.meta.get("fingerprint"),
                "n_fit": int(e.meta.get("n_fit", 0)), "rank": e.rank,
                "shrinkage": e.meta.get("shrinkage") == "true",
                "probe_before": probe(self.before), "probe_after": probe(self.after),
                "probe_after_fresh": probe(self.after_fresh),
                "covariance_before": self.covariance[0], "covariance_after": self.covariance[1],
                "moved": self.moved, "cost": dict(self.cost),
                "readable_before": self.readable_before, "erased": self.erased,
                "generalises": self.generalises, "verdict": self.verdict()}


def _at_chance(fit: ProbeFit) -> bool:
    """Whether chance is within or above the probe's interval."""
    return fit.interval[0] <= fit.chance


def _pct(v: float) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{100 * v:.1f}%"


def check_labeled(labeled: Labeled) -> None:
    """A one-line TaskError when `labeled` has one class or too few examples of one."""
    counts = Counter(labeled.labels)
    if len(counts) < 2:
        raise TaskError(f"{labeled.name}: every example has the label {labeled.classes[0]!r}; "
                        "erasure needs two or more classes")
    small = min(counts, key=counts.__getitem__)
    if counts[small] < MIN_PER_CLASS:
        raise TaskError(f"{labeled.name}: class {small!r} has {counts[small]} example(s); "
                        f"erasure needs at least {MIN_PER_CLASS} of each class (to fit the "
                        "eraser and to train and test probes on others); add examples or --n")


def three_way(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified indices of classes `y`: half to fit the eraser, a quarter to train a fresh
    probe, a quarter to test the probes."""
    fit, rest = split(len(y), 0.5, seed=seed, labels=y)
    fresh, test = split(len(rest), 0.5, seed=seed + 1, labels=y[rest])
    return fit, rest[fresh], rest[test]


def erase_concept(model: Model, labeled: Labeled, layer: int | str,
                  position: str | int | None = None, at: str | int = "all",
                  task: Task | None = None, neutral: Sequence[str] | None = None,
                  seed: int = 0, shrinkage: bool = True, batch_size: int = 32) -> Erasure:
    """Fit a LEACE eraser of `labeled`'s label at `layer`, check it and measure its cost.

    The split, the probes and the cost are the module docstring's.

    Parameters
    ----------
    model : Model
    labeled : Labeled
        Texts with a class label each (`circuits.representations.labels.labeled_set`); repeated
        examples are dropped (`labels.distinct_examples`: a copy on each side of the split
        would be scored as unseen), then at least `MIN_PER_CLASS` of each class.
    layer : int or str
        One decoder layer (negative from the end): the eraser edits the residual after it.
    position : str or int, optional
        Where the concept is read (`circuits.representations.activations`); by default each
        text's own.
    at, task, neutral
        Where the eraser applies (`erase_edit`), and what it costs (`price`).
    seed : int
        Seeds the split and the probes.
    shrinkage : bool
        Shrink the covariance estimate (`fit_eraser`).
    batch_size : int

    Returns
    -------
    Erasure

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> result = erase_concept(p.model, p.labeled, layer=1, task=p.task,
    ...                        neutral=["a new word is the word"] * 4, batch_size=100)
    >>> result.readable_before, result.erased
    (True, True)
    >>> result.cost["metric_erased"] < result.cost["metric"]  # the task read the concept
    True
    """
    layers = parse_layers(layer, NodeSites.of(model).n_layers)
    if len(layers) != 1:
        raise OptionError(f"erase at one layer; got {layer!r} ({len(layers)} layers)")
    at = check_at(at)
    labeled = distinct_examples(labeled)
    check_labeled(labeled)
    y = labeled.y
    fit, fresh, test = three_way(y, seed)
    x = hidden_states(model, labeled, layers, position, batch_size)[0]  # [n, d]
    meta = {"model": model.name, "fingerprint": model.fingerprint,
            "dtype": dtype_name(model.dtype), "labels": labeled.name,
            "position": str(position) if position is not None else "own"}
    eraser = fit_eraser(x[fit], y[fit], labeled.classes, layers[0], shrinkage, meta)
    erased = eraser(x)
    before = fit_probe(x[fit], y[fit], x[test], y[test], seed=seed)
    after = fit_probe(erased[fit], y[fit], erased[test], y[test], seed=seed)
    after_fresh = fit_probe(erased[fresh], y[fresh], erased[test], y[test], seed=seed)
    new = np.concatenate([fresh, test])
    k = len(labeled.classes)
    covariance = (float(cross_covariance(x[new], y[new], k).norm()),
                  float(cross_covariance(erased[new], y[new], k).norm()))
    spread = float(((x[new] - x[new].mean(0)) ** 2).sum(1).mean())
    moved = float(((x[new] - erased[new]) ** 2).sum(1).mean()) / max(spread, 1e-30)
    cost = price(model, eraser, at, task, neutral, batch_size)
    return Erasure(eraser, labeled.name, meta["position"], at, before, after, after_fresh,
                   covariance, moved, cost)


def price(model: Model, eraser: Eraser, at: str | int = "all", task: Task | None = None,
          neutral: Sequence[str] | None = None, batch_size: int = 32) -> dict[str, Any]:
    """What erasing costs, without and with the eraser (`erase_edit`'s `at`) in the forward.

    Returns a dict: ``task`` (its name), ``metric`` and ``metric_erased``, ``accuracy`` and
    ``accuracy_erased``, ``kl`` (mean KL(unedited || erased) of the next-token distribution at
    the last position of the task's prompts), all None without a `task`; ``loss`` and
    ``loss_erased`` (nats) and ``neutral_kl`` over every position of the `neutral` documents
    (by default the package's sample, `circuits.representations.effects.neutral_texts`).

    Examples
    --------
    >>> import torch
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> eraser = fit_eraser(torch.randn(40, 32), torch.arange(40) % 2, layer=1)
    >>> cost = price(p.model, eraser, task=p.task, neutral=["the word is cat"] * 8)
    >>> cost["task"], cost["kl"] > 0, cost["neutral_kl"] > 0
    ('planted-direction', True, True)
    """
    edit = erase_edit(model, eraser, at)
    cost: dict[str, Any] = dict.fromkeys(("task", "metric", "metric_erased", "accuracy",
                                          "accuracy_erased", "kl"))
    if task is not None:
        meter = TaskMeter(model, task, batch_size)
        edited = meter(edit)
        cost.update(task=task.name, metric=meter.base.metric, metric_erased=edited.metric,
                    accuracy=meter.base.accuracy, accuracy_erased=edited.accuracy, kl=edited.kl)
    texts = NeutralMeter(model, neutral)
    erased = texts(edit)
    cost.update(loss=texts.base.loss, loss_erased=erased.loss, neutral_kl=erased.kl)
    return cost
