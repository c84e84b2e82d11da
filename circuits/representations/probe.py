"""Probes: what a hidden state encodes, read by a classifier trained on it, with control tasks.

`fit_probe` trains a linear probe (scikit-learn's logistic regression) or a small MLP probe
(scikit-learn's MLPClassifier, one hidden layer) on activations and measures it on held-out
ones: the accuracy, its 95% Wilson score interval (`binomial_interval`) and the majority-class
rate of the held-out labels (chance).

Both probes train on activations centred on the training mean and divided by ONE number, the
root mean variance of a dimension (so the average dimension has variance 1): the residual
stream's norm grows by orders of magnitude from layer to layer, which would slow the solvers and
make one L2 strength ``C`` mean different things in different layers. A single scale keeps the
L2 penalty the same in every direction of activation space; scaling each dimension by its own
standard deviation would not, and tilts the regularised direction toward low-variance dimensions
(on `circuits.representations.planted.planted_direction` its cosine with the planted vector
drops from 0.99 to 0.76). The weights a `ProbeFit` gives are folded back into the ORIGINAL
activation space (the scale divides the first layer's weights, the centring moves its bias), so
``x @ weight.T + bias`` are the probe's logits on raw activations and a linear probe's
`ProbeFit.direction` can be compared with a vector in the model.

Control tasks (Hewitt & Liang, 2019): `control_labels` gives each word TYPE a label drawn at
random from the empirical label distribution, so the only way to predict a control label is to
recognise the word. The same probe trained on control labels measures how much the probe can
memorise; the selectivity, accuracy minus control accuracy, is high only for a probe that reads
the property rather than the word. `probe_layers` (in `circuits.representations.probe_report`)
does this per layer of a model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import OptionError, TaskError

Kind = Literal["linear", "mlp"]
KINDS: tuple[str, ...] = ("linear", "mlp")
#: Defaults of each probe's options (`fit_probe`'s ``**opts``).
DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {"C": 1.0, "max_iter": 1000},
    "mlp": {"hidden": 64, "alpha": 1e-4, "max_iter": 500},
}
#: Bounds of the whole-number options (so a typo cannot run for days or fill the memory).
MAX_INT = {"max_iter": 100_000, "hidden": 4096}
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass
class ProbeFit:
    """A probe trained on one training set and measured on one held-out set.

    Attributes
    ----------
    kind : str
        ``"linear"`` or ``"mlp"``.
    accuracy : float
        Fraction of the held-out examples predicted right.
    interval : tuple of float
        The 95% Wilson score interval of `accuracy` (`binomial_interval`).
    chance : float
        The majority-class rate of the held-out labels: what always answering the most
        frequent held-out class scores.
    n_train, n_test : int
        Examples trained on and measured on.
    classes : numpy.ndarray
        The label values the probe predicts, in the order of its output units.
    weights : dict of str to Tensor
        float32, in the original activation space. Linear: ``weight`` [1 or classes, d] and
        ``bias`` [1 or classes] (one row for two classes: the logit of ``classes[1]``). MLP:
        ``hidden.weight`` [h, d], ``hidden.bias`` [h], ``out.weight`` [1 or classes, h],
        ``out.bias``; the hidden layer is a ReLU.
    direction : Tensor or None
        A binary linear probe's unit normal [d] to its decision boundary in activation space,
        pointing toward ``classes[1]``; None otherwise.
    predictions : numpy.ndarray
        The predicted label of each held-out example.
    converged : bool
        Whether the solver stopped before its iteration limit.
    options : dict
        The probe's options (`DEFAULTS` with what was passed).
    """

    kind: str
    accuracy: float
    interval: tuple[float, float]
    chance: float
    n_train: int
    n_test: int
    classes: np.ndarray
    weights: dict[str, Tensor]
    direction: Tensor | None
    predictions: np.ndarray
    converged: bool
    options: dict[str, Any] = field(default_factory=dict)

    def predict(self, x: Tensor | np.ndarray) -> np.ndarray:
        """The label this probe predicts for each row of `x` [n, d] (see `predict`)."""
        return predict(self.weights, x, self.classes)


def binomial_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `correct` / `n` (95% for the default `z`).

    Chosen over the normal approximation, which leaves [0, 1] and collapses to a point at 0 or
    n correct, and over the exact (Clopper-Pearson) interval, which covers more than its level
    says; Wilson's coverage stays close to 95% down to a few dozen examples.

    Parameters
    ----------
    correct : int
        Successes, from 0 to `n`.
    n : int
        Trials, at least 1.
    z : float
        The normal quantile of the level (1.96 for 95%).

    Returns
    -------
    tuple of float
        (low, high), within [0, 1].

    Examples
    --------
    >>> [round(v, 3) for v in binomial_interval(8, 10)]
    [0.49, 0.943]
    >>> [round(v, 4) for v in binomial_interval(10, 10)]  # n / (n + z**2), 1
    [0.7225, 1.0]
    """
    if n < 1 or not 0 <= correct <= n:
        raise OptionError(f"a proportion needs 0 <= correct <= n and n >= 1, got {correct} "
                          f"of {n}")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def split(n: int, test_fraction: float = 0.25, seed: int = 0,
          labels: Sequence[Any] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a random train / held-out split of `n` examples, stratified by `labels`.

    With `labels`, each class puts ``round(test_fraction * count)`` of its examples in the
    held-out set (at least 1, and at least 1 left for training), so both sets see every class
    in the same proportions; without, ``round(test_fraction * n)`` examples are held out.

    Parameters
    ----------
    n : int
        Number of examples, at least 2.
    test_fraction : float
        Fraction held out, strictly between 0 and 1.
    seed : int
        Seeds the shuffle (a private generator: the global random state is left alone).
    labels : sequence, optional
        The class of each example, to stratify by.

    Returns
    -------
    (train, test) : tuple of numpy.ndarray
        Sorted int64 indices; together they are ``range(n)``.

    Raises
    ------
    OptionError
        `test_fraction` out of (0, 1), or `labels` of another length than `n`.
    TaskError
        Fewer than 2 examples, or a class with only 1 (it cannot be in both sets).

    Examples
    --------
    >>> train, test = split(8, 0.25, seed=0, labels=[0, 0, 0, 0, 1, 1, 1, 1])
    >>> len(train), len(test), sorted(int(i) // 4 for i in test)
    (6, 2, [0, 1])
    """
    if not (isinstance(test_fraction, (int, float)) and 0 < test_fraction < 1):
        raise OptionError(f"the test fraction must be between 0 and 1 (exclusive), got "
                          f"{test_fraction!r}")
    if n < 2:
        raise TaskError(f"a held-out split needs at least 2 examples, got {n}")
    rng = np.random.default_rng(seed)
    if labels is None:
        groups = [np.arange(n)]
    else:
        values = np.asarray(labels)
        if len(values) != n:
            raise OptionError(f"{len(values)} labels for {n} examples")
        classes, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        if counts.min() < 2:
            raise TaskError(f"class {classes[counts.argmin()].item()!r} has {counts.min()} "
                            "example; a held-out split needs at least 2 of each class (add "
                            "examples or drop the class)")
        groups = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    test = []
    for group in groups:
        k = min(max(round(test_fraction * len(group)), 1), len(group) - 1)
        test.append(rng.permutation(group)[:k])
    held = np.sort(np.concatenate(test)).astype(np.int64)
    return np.setdiff1d(np.arange(n), held).astype(np.int64), held


def control_labels(words: Sequence[str], labels: Sequence[Any] | np.ndarray,
                   seed: int = 0) -> np.ndarray:
    """Control-task labels (Hewitt & Liang, 2019): every word type gets one label, drawn from
    the empirical distribution of `labels`, and each example takes its word's label.

    A probe predicts control labels above the majority rate only by recognising word types in
    the representation, so its control accuracy measures what the probe can memorise.

    Parameters
    ----------
    words : sequence of str
        The word type of each example (the control label is keyed on it).
    labels : sequence
        The real label of each example (only their distribution is used).
    seed : int
        Seeds the draws (a private generator); types are drawn in sorted order, so the labels
        do not depend on the order of the examples.

    Returns
    -------
    numpy.ndarray
        One control label per example, with the values (and dtype) of `labels`.

    Examples
    --------
    >>> control = control_labels(["a", "b", "a", "c", "b"], [0, 1, 1, 0, 1], seed=0)
    >>> bool(control[0] == control[2]) and bool(control[1] == control[4])
    True
    >>> set(control.tolist()) <= {0, 1}
    True
    """
    values = np.asarray(labels)
    if len(words) != len(values) or len(values) == 0:
        raise OptionError(f"control labels need one word per label, got {len(words)} words "
                          f"and {len(values)} labels")
    classes, counts = np.unique(values, return_counts=True)
    types = sorted(set(words))
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(classes), size=len(types), p=counts / counts.sum())
    of_type = dict(zip(types, classes[drawn], strict=True))
    return np.array([of_type[w] for w in words], dtype=values.dtype)


def fit_probe(x_train: Tensor | np.ndarray, y_train: Sequence[Any] | np.ndarray,
              x_test: Tensor | np.ndarray, y_test: Sequence[Any] | np.ndarray,
              kind: Kind = "linear", seed: int = 0, **opts: Any) -> ProbeFit:
    """Train a probe on (`x_train`, `y_train`) and measure it on (`x_test`, `y_test`).

    Parameters
    ----------
    x_train, x_test : Tensor or numpy.ndarray
        Activations [n, d] (the same d); finite.
    y_train, y_test : sequence
        The label of each row (ints or strings); the training labels need 2 classes or more.
    kind : {"linear", "mlp"}
        ``"linear"``: L2-regularised logistic regression (multinomial for more than two
        classes, lbfgs). ``"mlp"``: one ReLU hidden layer, Adam, L2 penalty.
    seed : int
        Seeds the MLP's initialisation and batches (a private random state; the linear probe's
        solver is deterministic).
    **opts
        linear: ``C`` (inverse L2 strength on the scaled activations, default 1.0),
        ``max_iter`` (1000). mlp: ``hidden`` (units, 64), ``alpha`` (L2 strength, 1e-4),
        ``max_iter`` (epochs, 500).

    Returns
    -------
    ProbeFit

    Raises
    ------
    OptionError
        Unknown kind or option, shapes that do not match, non-finite activations.
    TaskError
        A single class in the training labels.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 5, generator=g)
    >>> y = (x[:, 0] > 0).long()           # the label is written along the first axis
    >>> fit = fit_probe(x[:150], y[:150], x[150:], y[150:])
    >>> fit.accuracy > 0.9, round(float(fit.direction[0]), 1)
    (True, 1.0)
    """
    options = probe_options(kind, opts)
    xa, xb = _matrix(x_train, "training"), _matrix(x_test, "held-out")
    ya, yb = _labels(y_train, len(xa), "training"), _labels(y_test, len(xb), "held-out")
    if xa.shape[1] != xb.shape[1]:
        raise OptionError(f"training activations are {xa.shape[1]}-wide, held-out ones "
                          f"{xb.shape[1]}-wide; probe the same site")
    classes = np.unique(ya)
    if len(classes) < 2:
        raise TaskError(f"the training labels hold one class ({classes[0].item()!r}); a probe "
                        "needs two or more")
    # centre and scale by one number (module docstring); constant activations keep scale 1
    mean = xa.mean(0)
    scale = float(np.sqrt(xa.var(0).mean())) or 1.0
    fitted, weights, converged = _train(kind, (xa - mean) / scale, ya, seed, options)
    weights = _unscale(weights, mean, scale)
    predicted = fitted.predict((xb - mean) / scale)
    correct = int((predicted == yb).sum())
    direction = None
    if kind == "linear" and len(classes) == 2:
        w = weights["weight"][0]
        direction = w / w.norm() if float(w.norm()) > 0 else w
    _, counts = np.unique(yb, return_counts=True)
    return ProbeFit(kind=kind, accuracy=correct / len(yb),
                    interval=binomial_interval(correct, len(yb)),
                    chance=float(counts.max() / len(yb)), n_train=len(ya), n_test=len(yb),
                    classes=classes, weights=weights, direction=direction,
                    predictions=predicted, converged=converged, options=options)


def probe_options(kind: str, opts: dict[str, Any]) -> dict[str, Any]:
    """A probe's options: `DEFAULTS` of `kind` updated with `opts`, each checked.

    Raises
    ------
    OptionError
        An unknown kind or option, or a value out of range.

    Examples
    --------
    >>> probe_options("mlp", {"hidden": 16})
    {'hidden': 16, 'alpha': 0.0001, 'max_iter': 500}
    >>> probe_options("linear", {"C": 0})
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: the probe's C must be a positive finite number, got 0
    """
    if kind not in KINDS:
        raise OptionError(f"unknown probe kind {kind!r}; use one of {', '.join(KINDS)}")
    unknown = sorted(set(opts) - set(DEFAULTS[kind]))
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r} for a {kind} probe; it takes "
                          f"{', '.join(DEFAULTS[kind])}")
    options = {**DEFAULTS[kind], **opts}
    for name, value in options.items():
        if name in ("max_iter", "hidden"):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 1 <= value <= MAX_INT[name]:
                raise OptionError(f"the probe's {name} must be a whole number from 1 to "
                                  f"{MAX_INT[name]:,}, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0 or (name == "C" and value == 0):
            what = "a positive" if name == "C" else "a non-negative"
            raise OptionError(f"the probe's {name} must be {what} finite number, got {value!r}")
    return options


def predict(weights: dict[str, Tensor], x: Tensor | np.ndarray,
            classes: Sequence[Any] | np.ndarray | None = None) -> np.ndarray:
    """The label a probe's `weights` (as `ProbeFit.weights`, or loaded from a saved probe)
    predict for each row of `x` [n, d]: the class of the largest logit, or with one logit
    ``classes[1]`` where it is positive.

    Parameters
    ----------
    weights : dict of str to Tensor
        A linear probe's ``weight``/``bias`` or an MLP probe's ``hidden.*``/``out.*``.
    x : Tensor or numpy.ndarray
        Activations [n, d].
    classes : sequence, optional
        The label of each output; default 0, 1, ...

    Returns
    -------
    numpy.ndarray
        [n] labels.

    Examples
    --------
    >>> import torch
    >>> w = {"weight": torch.tensor([[1.0, 0.0]]), "bias": torch.tensor([-0.5])}
    >>> predict(w, torch.tensor([[1.0, 3.0], [0.0, 3.0]]), ["neg", "pos"]).tolist()
    ['pos', 'neg']
    """
    h = torch.as_tensor(np.asarray(x, dtype=np.float64))  # [n, d]
    if "hidden.weight" in weights:
        h = torch.relu(h @ weights["hidden.weight"].double().T + weights["hidden.bias"].double())
        out, bias = weights["out.weight"], weights["out.bias"]
    else:
        out, bias = weights["weight"], weights["bias"]
    logits = h @ out.double().T + bias.double()  # [n, 1 or classes]
    index = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    labels = np.arange(max(2, logits.shape[1])) if classes is None else np.asarray(classes)
    return labels[index.numpy()]


def _matrix(x: Tensor | np.ndarray, which: str) -> np.ndarray:
    """`x` as a finite float64 [n, d] array with n >= 1."""
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise OptionError(f"the {which} activations must be a non-empty [n, d] matrix, got "
                          f"shape {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise OptionError(f"the {which} activations hold non-finite values (NaN or inf); "
                          "check the model's dtype (float16 overflows) or the inputs")
    return a


def _labels(y: Sequence[Any] | np.ndarray | Tensor, n: int, which: str) -> np.ndarray:
    """`y` as a 1-D array of n labels."""
    a = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if a.ndim != 1 or len(a) != n:
        raise OptionError(f"{len(a) if a.ndim else 0} {which} labels for {n} rows of "
                          "activations; give one label per row")
    return a


def _train(kind: str, x: np.ndarray, y: np.ndarray, seed: int,
           options: dict[str, Any]) -> tuple[Any, dict[str, np.ndarray], bool]:
    """Fit the scikit-learn model on scaled `x`; its weights in that space, and whether it
    converged."""
    # scikit-learn is imported here, not at the top: `import circuits` stays light
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    if kind == "linear":
        model = LogisticRegression(C=float(options["C"]), max_iter=int(options["max_iter"]))
    else:
        model = MLPClassifier(hidden_layer_sizes=(int(options["hidden"]),),
                              alpha=float(options["alpha"]), max_iter=int(options["max_iter"]),
                              random_state=seed)
    # one BLAS thread for the fit (restored after): a probe's matrices are small, and threads
    # that wait on busy cores made a 34-class fit 27 s instead of 1 s on a loaded 2-core machine
    with warnings.catch_warnings(), threadpool_limits(1):
        # reported through ProbeFit.converged instead of a warning per layer
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    converged = int(np.max(model.n_iter_)) < int(options["max_iter"])
    if kind == "linear":
        return model, {"weight": model.coef_, "bias": model.intercept_}, converged
    first, last = model.coefs_[0], model.coefs_[1]  # [d, h], [h, outputs]
    return model, {"hidden.weight": first.T, "hidden.bias": model.intercepts_[0],
                   "out.weight": last.T, "out.bias": model.intercepts_[1]}, converged


def _unscale(weights: dict[str, np.ndarray], mean: np.ndarray,
             scale: float) -> dict[str, Tensor]:
    """Fold the scaling into the first layer: w (x - m) / s + b = (w / s) x + b - w m / s
    (float32 tensors)."""
    first = "hidden" if "hidden.weight" in weights else ""
    w_key, b_key = (f"{first}.weight", f"{first}.bias") if first else ("weight", "bias")
    out = dict(weights)
    out[w_key] = weights[w_key] / scale
    out[b_key] = weights[b_key] - out[w_key] @ mean
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in out.items()}
