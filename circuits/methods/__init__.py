"""Discovery methods: one module each, one signature, one registry.

A method is a function ``fn(setup: Setup, **options) -> Tensor | tuple[Tensor, dict]`` returning
signed scores (``[n_sources, n_destinations]`` for edge methods, ``[n_sources]`` for node
methods; positive = the component carries the behavior; NaN where it never evaluated an edge)
and optionally extra results. A method that decides its own circuit (ACDC; registered with
``decides_circuit=True``) returns it as the extra ``"circuit"``, a bool edge mask, which becomes
`Scores.circuit`. It is
registered with `register`; `run_method` checks the options and the metric against the method
and adds the bookkeeping (cost, names, options).

Each option a method takes is declared once, next to the method, as an `Option` (name, kind,
help, default, choices, bounds): `check_options` checks values against it, and ``circuits
discover`` and ``circuits bench`` build their flags from it, so a new option touches only the
method's module.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .. import distributed
from ..cost import measure
from ..errors import OptionError
from ..metrics import Metric
from ..model import dtype_name
from ..outputs import activity
from ..positions import PositionGraph
from ..scores import Level, Scores
from ..setup import Setup

MethodFn = Callable[..., "Tensor | tuple[Tensor, dict[str, Any]]"]
OptionKind = Literal["int", "float", "bool", "choice", "names"]


@dataclass(frozen=True)
class Option:
    """One option of a registered method: what values it takes and how the command line offers it.

    Attributes
    ----------
    name : str
        The method's keyword argument.
    kind : "int", "float", "bool", "choice" or "names"
        ``names``: a sequence of graph names (comma-separated on the command line).
    help : str
        One phrase for ``--help``.
    default : Any
        The method's own default, shown in ``--help``; None also admits None as a value.
    choices : tuple of str
        The values a ``choice`` takes.
    low, high : float, optional
        Inclusive bounds of an ``int`` or ``float``.
    flag : str
        The command-line flag; by default ``--`` and the name with dashes. Where a command has
        a flag of that name already (``--seed``), the command sets the option itself.

    Examples
    --------
    >>> steps = Option("steps", "int", "integration steps", 5, low=1, high=1000)
    >>> steps.cli_flag, steps.parse("7")
    ('--steps', 7)
    >>> steps.check("eap-ig", 0)
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: method 'eap-ig': steps must be a whole number from 1 to 1000, got 0
    """

    name: str
    kind: OptionKind
    help: str
    default: Any = None
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    flag: str = ""

    @property
    def cli_flag(self) -> str:
        """The flag ``circuits discover`` and ``circuits bench`` offer for this option."""
        return self.flag or "--" + self.name.replace("_", "-")

    def _wanted(self) -> str:
        """What a good value is, in words (``a whole number from 1 to 1000``)."""
        if self.kind == "bool":
            return "True or False"
        if self.kind == "choice":
            return f"one of {', '.join(self.choices)}"
        if self.kind == "names":
            return "a list of names"
        what = "a whole number" if self.kind == "int" else "a finite number"
        if self.low is not None and self.high is not None:
            return f"{what} from {self.low:g} to {self.high:g}"
        if self.low is not None:
            return f"{what} >= {self.low:g}"
        return what

    def _fits(self, value: Any) -> bool:
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "names":
            return (isinstance(value, (list, tuple)) and len(value) > 0
                    and all(isinstance(v, str) and v for v in value))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        return ((self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))

    def check(self, method: str, value: Any) -> None:
        """An OptionError when `value` is not one this option takes."""
        if value is None and self.default is None:
            return
        if not self._fits(value):
            raise OptionError(f"method {method!r}: {self.name} must be {self._wanted()}, got "
                              f"{value!r}")

    def parse(self, text: str) -> Any:
        """The value of a command-line word, or an OptionError naming the flag."""
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
        except ValueError:
            raise OptionError(f"{self.cli_flag} must be {self._wanted()}, got {text!r}") from None
        if self.kind == "names":
            return tuple(n for part in text.split(",") if (n := part.strip()))
        return text


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
    params : tuple of Option
        Its options, declared (`Option`): what `check_options` checks and what the command
        line offers.
    positions : bool
        It scores edges at positions (`circuits.positions`): given a Setup with positions, it
        returns ``[P, n_src, n_dst]`` per-position scores, which `run_method` places on the
        position graph.
    additive : bool
        Its scores are weighted sums over the prompts (each batch adds ``weight *`` its part):
        under torch.distributed (`circuits.distributed`) `run_method` gives each rank its share
        of the prompts and adds the ranks' scores.
    shares_prompts : bool
        Under torch.distributed it runs on this rank's share of the prompts itself and combines
        what it needs across the ranks (ACDC: every variant's loss). Additive methods share
        theirs through `run_method`. Either way the ranks' passes add up to the run's cost.
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
    params: tuple[Option, ...] = ()
    positions: bool = False
    additive: bool = False
    shares_prompts: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        """The names of the options the method takes (its parameters after `setup`)."""
        return tuple(inspect.signature(self.fn).parameters)[1:]


METHODS: dict[str, MethodSpec] = {}
_MODULES = (
    "activation_patching", "path_patching", "eap", "eap_ig", "exact", "acdc", "baselines",
    "edge_pruning", "ugs", "ensemble",
)
#: Methods made of registered ones, by the prefix of their name before ':' (``mean:eap,eap-ig``,
#: `circuits.methods.ensemble`): the function that makes such a name's MethodSpec (or raises
#: OptionError). Filled by the modules that define them, as `register` fills `METHODS`.
COMBINERS: dict[str, Callable[[str], MethodSpec]] = {}


def register(
    name: str, level: Level, description: str, passes: str, edge_engine: bool = True,
    gradient_at_clean: bool = False, uses_metric: bool = True, decides_circuit: bool = False,
    params: tuple[Option, ...] = (), positions: bool = False, additive: bool = False,
    shares_prompts: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a method to the registry under `name` (fields as in `MethodSpec`)."""

    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = MethodSpec(name, fn, level, description, passes, edge_engine,
                                   gradient_at_clean, uses_metric, decides_circuit,
                                   tuple(params), positions, additive, shares_prompts)
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
    """The method registered as `name` (or made of registered ones, `COMBINERS`: an ensemble
    ``mean:eap,eap-ig``), or an OptionError listing the known ones."""
    methods = available()
    prefix, colon, _ = name.partition(":") if isinstance(name, str) else ("", "", "")
    if colon and prefix in COMBINERS:
        return COMBINERS[prefix](name)
    if name not in methods:
        raise OptionError(f"unknown method {name!r}; choose one of {', '.join(methods)}")
    return methods[name]


MAX_STEPS = 1000  # integration steps; far past the point where more change the scores


def check_options(name: str, options: dict[str, Any]) -> None:
    """An OptionError, listing the method's options, for any option method `name` does not
    take, or a value its declaration (`Option`) does not admit."""
    spec = get_method(name)
    unknown = [key for key in options if key not in spec.options]
    if not unknown:
        declared = {p.name: p for p in spec.params}
        for key, value in options.items():
            if key in declared:
                declared[key].check(name, value)
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


def check_positions(name: str, positions: bool) -> None:
    """An OptionError, naming the methods that can, when method `name` cannot score edges at
    positions and `positions` asks for it."""
    if not positions or get_method(name).positions:
        return
    able = [m.name for m in available().values() if m.positions]
    raise OptionError(f"method {name!r} does not score edges at positions; with --positions use "
                      f"one of {', '.join(able)}")


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
    check_positions(name, setup.positions is not None)
    device = setup.model.device
    counter = setup.engine.passes if spec.edge_engine else setup.node_passes
    prompts = sum(b.size for b in setup.batches)
    # data parallel: an additive method scores this rank's share of the prompts, and the
    # ranks' weighted sums add up to the whole run's
    split = spec.additive and distributed.world() > 1
    with measure(counter, device, prompts) as cost, activity(f"scoring with {name}"):
        out = spec.fn(setup.shard() if split else setup, **options)
    values, extra = out if isinstance(out, tuple) else (out, {})
    if split:
        values = distributed.all_sum(values)
    if split or (spec.shares_prompts and distributed.world() > 1):
        # each rank counted the passes over its share: the run's are their sum
        passes = distributed.all_sum(torch.tensor([cost.forward, cost.backward]))
        cost.forward, cost.backward = (float(p) for p in passes)
    extra = dict(extra)
    circuit = extra.pop("circuit", None)
    if spec.decides_circuit and circuit is None:
        raise RuntimeError(f"method {name!r} is registered as deciding its circuit but returned "
                           "none (its extra results lack 'circuit')")
    graph = setup.graph
    if isinstance(graph, PositionGraph):
        values = graph.expand(values)
    # d_model travels with the scores because MIB's submission format records it; dtype and
    # device because the scores (and the cost) depend on them; the weights' fingerprint so
    # that a circuit selected from them is evaluated on the same weights.
    recorded = {"ablation": setup.ablation, "metric": setup.metric.name,
                "d_model": int(setup.model.hf.config.hidden_size),
                "dtype": dtype_name(setup.model.dtype), "device": str(device),
                "model_fingerprint": setup.model.fingerprint, **options}
    return Scores(graph, values, spec.level, name, setup.task, setup.model.name, recorded,
                  cost, extra, circuit)
