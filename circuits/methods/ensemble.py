"""Ensembles: the mean of several methods' normalised scores (``mean:eap,eap-ig``).

The 2025 MIB shared task found that averaging the edge scores of several attribution methods
(EAP, EAP-IG over the inputs, EAP-IG over the activations) ranks edges better than any one of
them. An ensemble is named ``mean:`` and its parts, comma-separated: every part runs once on the
same setup, and each edge's (or node's) score is the mean over the parts of

    ``score_part / max |score_part|``

the maximum taken over the edges that part evaluated. Dividing by the largest magnitude puts
parts with different units on one scale (EAP-IG's scores add up to a metric change, a
baseline's are norms) while keeping each part's signs, its zeros and the ratios between its
scores; ranking normalisation would keep only the order. A part whose scores are all zero adds
zeros.

NaN (an edge a part never evaluated, as ACDC leaves some) counts as no opinion: the mean is over
the parts that evaluated the edge, and the ensemble's score is NaN only where every part's is.

Options given with an ensemble go to every part that takes them (``--steps`` to the EAP-IG
variants); an option no part takes is an error. The parts are all edge-level or all node-level
methods. A part that decides its own circuit (ACDC) contributes its scores only: the ensemble
decides none. The parts keep their progress under their own names, so an interrupted ensemble
resumes part by part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import OptionError
from ..scores import Scores
from ..setup import Setup
from . import COMBINERS, MethodSpec, available, check_metric, check_options, run_method

PREFIX = "mean"


@dataclass(frozen=True)
class EnsembleSpec(MethodSpec):
    """A `MethodSpec` for ``mean:PART,PART,...``; `parts` are the registered methods."""

    parts: tuple[MethodSpec, ...] = ()

    @property
    def options(self) -> tuple[str, ...]:
        """Every option some part takes, in the parts' order."""
        return tuple(dict.fromkeys(o for part in self.parts for o in part.options))


def parse_parts(name: str) -> tuple[str, ...]:
    """The part names of an ensemble name, checked: ``mean:`` and one or more distinct names.

    Examples
    --------
    >>> parse_parts("mean:eap,eap-ig")
    ('eap', 'eap-ig')
    >>> parse_parts("mean:eap,eap")
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: ensemble 'mean:eap,eap' names 'eap' twice; name each method once
    """
    prefix, _, rest = name.partition(":")
    parts = tuple(part.strip() for part in rest.split(","))
    if prefix != PREFIX or not all(parts):
        raise OptionError(f"bad ensemble {name!r}; name it {PREFIX}: and registered methods "
                          "separated by commas, like mean:eap,eap-ig")
    for i, part in enumerate(parts):
        if part in parts[:i]:
            raise OptionError(f"ensemble {name!r} names {part!r} twice; name each method once")
    return parts


def ensemble_spec(name: str) -> EnsembleSpec:
    """The MethodSpec of ensemble `name` (``mean:eap,eap-ig``), or an OptionError: a part that
    is not a registered method, parts of both levels, or a malformed name.

    Examples
    --------
    >>> spec = ensemble_spec("mean:eap,eap-ig")
    >>> spec.level, [part.name for part in spec.parts], "steps" in spec.options
    ('edge', ['eap', 'eap-ig'], True)
    """
    methods = available()
    specs = []
    for part in parse_parts(name):
        if part not in methods:
            hint = ("; an ensemble's parts are registered methods, not ensembles" if ":" in part
                    else "")
            raise OptionError(f"unknown method {part!r} in ensemble {name!r}; choose from "
                              f"{', '.join(methods)}{hint}")
        specs.append(methods[part])
    levels = {spec.level for spec in specs}
    if len(levels) > 1:
        edge = ", ".join(s.name for s in specs if s.level == "edge")
        node = ", ".join(s.name for s in specs if s.level == "node")
        raise OptionError(f"ensemble {name!r} mixes edge-level methods ({edge}) with node-level "
                          f"ones ({node}); average methods of one level")
    params = {p.name: p for spec in reversed(specs) for p in spec.params}  # the first part's win
    parts, edge_engine = tuple(specs), all(s.edge_engine for s in specs)

    def mean_of_parts(setup: Setup, **options: Any) -> tuple[Tensor, dict[str, Any]]:
        return _combine(parts, edge_engine, setup, options)

    return EnsembleSpec(
        name=name, fn=mean_of_parts, level=specs[0].level,
        description=f"mean of the normalised scores of {', '.join(s.name for s in specs)}",
        passes="; ".join(f"{s.name}: {s.passes}" for s in specs), edge_engine=edge_engine,
        gradient_at_clean=any(s.gradient_at_clean for s in specs),
        uses_metric=any(s.uses_metric for s in specs),
        params=tuple(params[o] for o in dict.fromkeys(p.name for s in specs for p in s.params)),
        parts=parts)


def normalised(scores: Scores) -> tuple[Tensor, float]:
    """A part's scores divided by their largest magnitude over what it evaluated (NaN stays
    NaN), and that magnitude (1 where every evaluated score is 0, or none is).

    Examples
    --------
    >>> from circuits.graph import Graph
    >>> values, scale = normalised(Scores(Graph(1, 1), torch.tensor([1.0, -4.0, math.nan]),
    ...                                   "node"))
    >>> values.tolist()[:2], scale
    ([0.25, -1.0], 4.0)
    """
    known = scores.values[scores.evaluated]
    top = float(known.abs().max()) if known.numel() else 0.0
    scale = top if top > 0 else 1.0
    return scores.values / scale, scale


def _combine(parts: tuple[MethodSpec, ...], edge_engine: bool, setup: Setup,
            options: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Run every part once on `setup` with the options it takes and average their normalised
    scores; the extra result ``parts`` holds each part's options, scale and cost."""
    taken = [{k: v for k, v in options.items() if k in part.options} for part in parts]
    for part, given in zip(parts, taken, strict=True):  # every part checked before any runs
        check_options(part.name, given)
        check_metric(part.name, setup.metric)
    # the counter run_method measures the ensemble on; a part counting elsewhere (a node
    # method without the edge engine) has its passes added to it, so the cost is the parts' sum
    outer = setup.engine.passes if edge_engine else setup.node_passes
    prompts = sum(b.size for b in setup.batches)
    values, record = [], {}
    for part, given in zip(parts, taken, strict=True):
        scores = run_method(part.name, setup, **given)
        own = setup.engine.passes if part.edge_engine else setup.node_passes
        if own is not outer:
            outer.add_forward(scores.cost.forward * prompts)
            outer.add_backward(scores.cost.backward * prompts)
        scaled, scale = normalised(scores)
        values.append(scaled)
        record[part.name] = {"options": given, "scale": scale, "cost": scores.cost}
    stack = torch.stack(values)  # [parts, n_src, n_dst] or [parts, n_src]
    counted = (~stack.isnan()).sum(0)
    mean = (stack.nansum(0) / counted.clamp(min=1)).masked_fill(counted == 0, math.nan)
    if parts[0].level == "edge":
        mean = torch.where(setup.graph.valid, mean, torch.zeros(()))  # 0 off the graph's edges
    return mean, {"parts": record}


COMBINERS[PREFIX] = ensemble_spec
