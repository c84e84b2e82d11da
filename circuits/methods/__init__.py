"""Discovery methods: one module each, one signature, one registry.

A method is a function ``fn(setup: Setup, **options) -> Tensor | tuple[Tensor, dict]`` returning
signed scores (``[n_sources, n_destinations]`` for edge methods, ``[n_sources]`` for node
methods; positive = the component carries the behavior; NaN where it never evaluated an edge)
and optionally extra results. A method that decides its own circuit (ACDC; registered with
``decides_circuit=True``) returns it as the extra ``"circuit"``, a bool edge mask, which becomes
`Scores.circuit`. It is
registered with `register`; `run_method` checks the options and the metric against the method
and adds the bookkeeping (cost, names, options).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..cost import measure
from ..errors import OptionError
from ..metrics import Metric
from ..model import dtype_name
from ..outputs import activity
from ..scores import Level, Scores
from ..setup import Setup

MethodFn = Callable[..., "Tensor | tuple[Tensor, dict[str, Any]]"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: what it scores, what it costs and which metrics it can use.

    Attributes
    ----------
    gradient_at_clean : bool
        Its scores are gradients of the metric at the clean run alone (EAP, gradient x
        activation). It refuses metrics whose gradient vanishes there (`Metric.flat_at_clean`,
        e.g. ``kl``): every score would be rounding noise.
    uses_metric : bool
        False for baselines whose scores ignore the metric (random scores, activation norms,
        attention rollout).
    decides_circuit : bool
        The method decides its own circuit (ACDC's kept edges) besides scoring; discovery then
        returns that circuit unless another selection is asked for.
    """

    name: str
    fn: MethodFn
    level: Level
    description: str
    passes: str
    edge_engine: bool = True
    gradient_at_clean: bool = False
    uses_metric: bool = True
    decides_circuit: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        """The names of the options the method takes (its parameters after `setup`)."""
        return tuple(inspect.signature(self.fn).parameters)[1:]


METHODS: dict[str, MethodSpec] = {}
_MODULES = (
    "activation_patching", "path_patching", "eap", "eap_ig", "exact", "acdc", "baselines",
)


def register(
    name: str, level: Level, description: str, passes: str, edge_engine: bool = True,
    gradient_at_clean: bool = False, uses_metric: bool = True, decides_circuit: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a method to the registry under `name` (fields as in `MethodSpec`)."""

    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = MethodSpec(name, fn, level, description, passes, edge_engine,
                                   gradient_at_clean, uses_metric, decides_circuit)
        return fn

    return add


def _load_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{module}":
                raise


def available() -> dict[str, MethodSpec]:
    """Every registered method, by name."""
    _load_all()
    return dict(sorted(METHODS.items()))


def get_method(name: str) -> MethodSpec:
    """The method registered as `name`, or an OptionError listing the known ones."""
    methods = available()
    if name not in methods:
        raise OptionError(f"unknown method {name!r}; choose one of {', '.join(methods)}")
    return methods[name]


MAX_STEPS = 1000  # integration steps; far past the point where more change the scores


def _check_value(name: str, key: str, value: Any) -> None:
    """An OptionError for a value of a common option that no method can use."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def integer(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if key == "steps" and not (integer(value) and 1 <= value <= MAX_STEPS):
        raise OptionError(f"method {name!r}: steps must be a whole number from 1 to {MAX_STEPS}, "
                          f"got {value!r}")
    if key == "threshold" and not (number(value) and math.isfinite(value) and value >= 0):
        raise OptionError(f"method {name!r}: threshold must be a finite number >= 0, got "
                          f"{value!r}")
    if key == "seed" and not (integer(value) and 0 <= value < 2**32):
        raise OptionError(f"method {name!r}: seed must be a whole number from 0 to 2**32 - 1, "
                          f"got {value!r}")
    if key == "chunk" and value is not None and not (integer(value) and value >= 1):
        raise OptionError(f"method {name!r}: chunk must be a whole number >= 1, got {value!r}")


def check_options(name: str, options: dict[str, Any]) -> None:
    """An OptionError, listing the method's options, for any option method `name` does not
    take, or a value out of range for a common option (steps, threshold, seed, chunk)."""
    spec = get_method(name)
    unknown = [key for key in options if key not in spec.options]
    if not unknown:
        for key, value in options.items():
            _check_value(name, key, value)
        return
    key = unknown[0]
    close = difflib.get_close_matches(key, spec.options, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    valid = (f"its options are {', '.join(spec.options)}" if spec.options
             else "it takes no options")
    raise OptionError(f"method {name!r} has no option {key!r}; {hint}{valid}")


def check_metric(name: str, metric: Metric) -> None:
    """An OptionError, naming the methods that can use it, when method `name` cannot score with
    `metric` (a method that only takes gradients at the clean run, and a metric that is flat
    there)."""
    spec = get_method(name)
    if not (spec.gradient_at_clean and metric.flat_at_clean):
        return
    usable = [m.name for m in available().values()
              if m.level == spec.level and m.uses_metric and not m.gradient_at_clean]
    raise OptionError(
        f"method {name!r} takes the gradient at the clean run, where metric {metric.name!r} has "
        f"zero gradient, so every score would be rounding noise; with {metric.name!r} use one of "
        f"{', '.join(usable)}, or keep {name!r} with a metric such as logit-diff"
    )


def run_method(name: str, setup: Setup, **options: Any) -> Scores:
    """Run a registered method on a prepared setup and return its Scores with the cost.

    On a terminal, a line on stderr shows which method runs and for how long.

    Raises
    ------
    OptionError
        For an unknown method, an option the method does not take, or a metric it cannot use.
    """
    spec = get_method(name)
    if not isinstance(setup, Setup):
        raise OptionError(f"run_method needs a Setup (circuits.api.make_setup(model, task)), got "
                          f"{type(setup).__name__}")
    check_options(name, options)
    check_metric(name, setup.metric)
    device = setup.model.device
    counter = setup.engine.passes if spec.edge_engine else setup.node_passes
    prompts = sum(b.size for b in setup.batches)
    with measure(counter, device, prompts) as cost, activity(f"scoring with {name}"):
        out = spec.fn(setup, **options)
    values, extra = out if isinstance(out, tuple) else (out, {})
    extra = dict(extra)
    circuit = extra.pop("circuit", None)
    if spec.decides_circuit and circuit is None:
        raise RuntimeError(f"method {name!r} is registered as deciding its circuit but returned "
                           "none (its extra results lack 'circuit')")
    graph = setup.graph
    # d_model travels with the scores because MIB's submission format records it; dtype and
    # device because the scores (and the cost) depend on them; the weights' fingerprint so
    # that a circuit selected from them is evaluated on the same weights.
    recorded = {"ablation": setup.ablation, "metric": setup.metric.name,
                "d_model": int(setup.model.hf.config.hidden_size),
                "dtype": dtype_name(setup.model.dtype), "device": str(device),
                "model_fingerprint": setup.model.fingerprint, **options}
    return Scores(graph, values, spec.level, name, setup.task, setup.model.name, recorded,
                  cost, extra, circuit)
