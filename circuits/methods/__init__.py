"""Discovery methods: one module each, one signature, one registry.

A method is a function ``fn(setup: Setup, **options) -> Tensor | tuple[Tensor, dict]`` returning
signed scores (``[n_sources, n_destinations]`` for edge methods, ``[n_sources]`` for node
methods; positive = the component carries the behavior) and optionally extra results. It is
registered with `register`; `run_method` adds the bookkeeping (cost, names, options).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..cost import measure
from ..errors import OptionError
from ..model import dtype_name
from ..scores import Level, Scores
from ..setup import Setup

MethodFn = Callable[..., "Tensor | tuple[Tensor, dict[str, Any]]"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: what it scores and what it costs."""

    name: str
    fn: MethodFn
    level: Level
    description: str
    passes: str
    edge_engine: bool = True


METHODS: dict[str, MethodSpec] = {}
_MODULES = (
    "activation_patching", "path_patching", "eap", "eap_ig", "exact", "acdc", "baselines",
)


def register(
    name: str, level: Level, description: str, passes: str, edge_engine: bool = True
) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a method to the registry under `name`."""

    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = MethodSpec(name, fn, level, description, passes, edge_engine)
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


def run_method(name: str, setup: Setup, **options: Any) -> Scores:
    """Run a registered method on a prepared setup and return its Scores with the cost."""
    spec = get_method(name)
    device = setup.model.device
    counter = setup.engine.passes if spec.edge_engine else setup.node_passes
    prompts = sum(b.size for b in setup.batches)
    with measure(counter, device, prompts) as cost:
        out = spec.fn(setup, **options)
    values, extra = out if isinstance(out, tuple) else (out, {})
    graph = setup.graph
    # d_model travels with the scores because MIB's submission format records it; dtype and
    # device because the scores (and the cost) depend on them.
    recorded = {"ablation": setup.ablation, "metric": setup.metric.name,
                "d_model": int(setup.model.hf.config.hidden_size),
                "dtype": dtype_name(setup.model.dtype), "device": str(device), **options}
    return Scores(graph, values, spec.level, name, setup.task, setup.model.name, recorded,
                  cost, extra)
