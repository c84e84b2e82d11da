"""Circuits: a subset of the graph's edges, selected from scores, pruned, viewed as networkx.

A `Circuit` is a dense bool mask ``[n_sources, n_destinations]`` over the graph's edges (True =
the edge is kept) together with the scores it was selected from and what is known about it
(task, model, method, options, faithfulness). Small views sit on top: the kept edges and nodes,
and a networkx graph for any graph algorithm.

Selection ranks the edges (or, for node scores, the heads and MLPs) by |score| (or by signed
score), keeps a prefix of that ranking and then *prunes*: every edge that lies on no path from
``input`` to ``logits`` is dropped, and with it every node left without such a path. A head is
entered through any of its q/k/v destinations and left through its source; an MLP through its
input. In a grouped-query graph a key/value head (``a1.kv0``) is a node of its own: its ``<k>``
and ``<v>`` destinations are inputs of every query head of its group. Sizes are always reported
after pruning.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import circuit_writers, html, render
from .errors import OptionError
from .faithfulness import evaluate_mask
from .graph import Edge, Graph
from .masks import all_nodes, edges_of, group_of, n_items, nodes_of, prune, ranks, top_mask
from .outputs import activity
from .scores import Level, Scores
from .selection_stable import SPELLING, check_stable, parse_stable, stable_mask
from .smallest import MAX_SCAN, smallest_prefix

if TYPE_CHECKING:
    import networkx as nx

    from .setup import Setup


# -- the circuit ------------------------------------------------------------------------------
@dataclass
class Circuit:
    """A circuit: the kept edges of a graph, with the scores they were selected from.

    Attributes
    ----------
    graph : Graph
    mask : Tensor
        ``[n_src, n_dst]`` bool, True = edge in the circuit (pruned at construction unless
        the constructor gets ``keep_dangling=True``).
    values : Tensor or None
        The scores: ``[n_src, n_dst]`` (edge level) or ``[n_src]`` (node level); None for a
        circuit given as a bare set of edges.
    level : "edge" or "node"
    method, task, model : str
    options : dict
        How the scores and the selection were made.
    metrics : dict
        Evaluation results (``faithfulness`` etc.), filled by selection or `evaluate`.
    node_info : dict
        What is known about single nodes beyond their score, by node name: for a head found by
        `circuits.api.discover`, ``role``, ``role_score``, ``roles``, ``dla`` and ``attention``
        (see `circuits.annotate`). Empty when nothing was measured.
    curve : dict or None
        The faithfulness curve measured with the circuit (``fractions``, ``n_edges``,
        ``faithfulness``: lists of one length; see `circuits.evaluate.Curve`), or None.

    Examples
    --------
    >>> import torch
    >>> from circuits.graph import Graph
    >>> g = Graph(1, 1)
    >>> c = Circuit(g, g.mask_from_edges(["input->m0", "m0->logits", "a0.h0->logits"]))
    >>> c.n_edges, c.nodes
    (2, ['input', 'm0', 'logits'])
    """

    graph: Graph
    mask: Tensor
    values: Tensor | None = None
    level: Level = "edge"
    method: str = ""
    task: str = ""
    model: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    node_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    curve: dict[str, list[float]] | None = None
    keep_dangling: InitVar[bool] = False

    def __post_init__(self, keep_dangling: bool) -> None:
        g = self.graph
        if tuple(self.mask.shape) != (g.n_sources, g.n_destinations):
            raise OptionError(f"a circuit mask must have shape {(g.n_sources, g.n_destinations)}, "
                              f"got {tuple(self.mask.shape)}; build it with graph.mask_from_edges")
        mask = self.mask.detach().cpu().bool() & g.valid
        self.mask = mask if keep_dangling else prune(g, mask)
        if self.values is not None:
            self.values = self.values.detach().float().cpu()

    @classmethod
    def from_scores(cls, scores: Scores, mask: Tensor, **metrics: Any) -> Circuit:
        """A circuit of `mask` carrying the scores' values, names and options."""
        return cls(scores.graph, mask, scores.values, scores.level, method=scores.method,
                   task=scores.task, model=scores.model, options=dict(scores.options),
                   metrics=dict(metrics))

    # -- views --------------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return int(self.mask.sum())

    @property
    def fraction(self) -> float:
        """Share of the graph's edges in the circuit."""
        return self.n_edges / self.graph.n_edges

    def edges(self) -> list[Edge]:
        """The circuit's edges, source-major."""
        return edges_of(self.graph, self.mask)

    @property
    def edge_names(self) -> list[str]:
        return [e.name for e in self.edges()]

    @property
    def nodes(self) -> list[str]:
        """The circuit's nodes (input, heads, key/value heads, MLPs, logits that some kept edge
        touches), in the order of `all_nodes`."""
        return nodes_of(self.graph, self.mask)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def edge_values(self) -> Tensor | None:
        """``[n_src, n_dst]`` edge scores, or None for node-level or score-less circuits."""
        return self.values if self.level == "edge" else None

    @property
    def node_values(self) -> Tensor | None:
        """``[n_src]`` node scores: given (node level) or summed over outgoing edges (see
        `Scores.per_node`)."""
        scores = self.scores
        return None if scores is None else scores.per_node()

    @property
    def scores(self) -> Scores | None:
        """The scores as a `Scores` object (None for a score-less circuit)."""
        if self.values is None:
            return None
        return Scores(self.graph, self.values, self.level, self.method, self.task, self.model,
                      dict(self.options))

    def to_networkx(self, full: bool = False) -> nx.MultiDiGraph:
        """The circuit as a networkx ``MultiDiGraph``.

        A head is one node, so its q, k and v inputs from one source are three parallel edges;
        they are told apart by their key, which is the destination name (``'a1.h0<q>'``).

        In a grouped-query graph each key/value head is a node too (``'a1.kv0'``, kind ``kv``):
        edges into its shared destinations ``a1.kv0<k>`` and ``a1.kv0<v>`` end there (ports
        ``'k'`` and ``'v'``), and a *group edge* without a score, port ``'group'`` and key
        ``'group'``, joins it to each query head of its group (``a1.kv0 -> a1.h0``); in the
        circuit view only to the heads that are in the circuit.

        Parameters
        ----------
        full : bool
            Include every edge and node of the model graph, flagged with ``in_circuit``
            (default: only the circuit's).

        Returns
        -------
        networkx.MultiDiGraph
            Nodes carry ``kind`` (input/head/kv/mlp/logits), ``layer`` (-1 for input, n_layers
            for logits), ``head`` (the head or key/value head index, -1 for others),
            ``in_circuit`` and, with scores, ``score`` (not on key/value heads). Edges carry
            ``score`` (edge level, not on group edges), ``in_circuit``, ``port`` (``'q'``,
            ``'k'``, ``'v'``, ``'group'`` or ``''``), ``destination`` and ``name``.

        Examples
        --------
        >>> from circuits.graph import Graph
        >>> g = Graph(1, 2, n_kv_heads=1)
        >>> c = Circuit(g, g.mask_from_edges(["input->a0.kv0<k>", "a0.h1->logits"]))
        >>> nxg = c.to_networkx()
        >>> nxg.nodes["a0.kv0"]["kind"], nxg["input"]["a0.kv0"]["a0.kv0<k>"]["port"]
        ('kv', 'k')
        >>> list(nxg.edges("a0.kv0", keys=True))
        [('a0.kv0', 'a0.h1', 'group')]
        """
        import networkx as nx  # heavy to import, and only this view needs it

        g = self.graph
        out = nx.MultiDiGraph(task=self.task, model=self.model, method=self.method,
                              level=self.level)
        in_nodes = set(self.nodes)
        node_values = self.node_values
        for node in all_nodes(g):
            if not full and node.name not in in_nodes:
                continue
            attrs: dict[str, Any] = dict(kind=node.kind, layer=node.layer,
                                         head=-1 if node.head is None else node.head,
                                         in_circuit=node.name in in_nodes)
            if node_values is not None and node.name in g.src_index:
                attrs["score"] = float(node_values[g.src_index[node.name]])
            out.add_node(node.name, **attrs)
        which = g.valid if full else self.mask
        ev = self.edge_values
        for i, j in which.nonzero().tolist():
            e = Edge(g.sources[i], g.destinations[j])
            attrs = dict(in_circuit=bool(self.mask[i, j]), port=e.port or "",
                         destination=e.destination, name=e.name)
            if ev is not None:
                attrs["score"] = float(ev[i, j])
            out.add_edge(e.source, e.target_node, key=e.destination, **attrs)
        for kv in [n for n in out.nodes if out.nodes[n]["kind"] == "kv"]:
            for head in group_of(g, kv):
                if head in out:
                    inside = kv in in_nodes and head in in_nodes
                    out.add_edge(kv, head, key="group", in_circuit=inside, port="group",
                                 destination=head, name=f"{kv}->{head}")
        return out

    # -- verbs --------------------------------------------------------------------------------
    def evaluate(self, setup: Setup) -> dict[str, float]:
        """Faithfulness and metric values of this circuit on `setup`'s prompts; also stored in
        `metrics`. See `circuits.evaluate.evaluate`."""
        result = evaluate_mask(setup, self.mask).as_dict()
        self.metrics.update(result)
        return result

    def save(self, path: str | Path) -> Path:
        """Write the circuit as versioned JSON (see `circuits.io`); returns the path."""
        return circuit_writers.save_circuit(self, path)

    def export(self, path: str | Path, format: str | None = None, **options: Any) -> Path:
        """Write the circuit as ``json``, ``graphml``, ``dot`` or ``mib`` (see `circuits.io`)."""
        return circuit_writers.export(self, path, format=format, **options)

    def render(self, path: str | Path, format: str | None = None, **options: Any) -> Path:
        """Draw the circuit with graphviz to SVG, PNG, PDF or DOT (see `circuits.render`)."""
        return render.render(self, path, format=format, **options)

    def to_html(self, path: str | Path, **options: Any) -> Path:
        """Write a self-contained interactive page (see `circuits.html`)."""
        return html.to_html(self, path, **options)

    def __repr__(self) -> str:
        f = self.metrics.get("faithfulness")
        tail = "" if f is None else f", faithfulness={f:.3f}"
        return (f"Circuit(method={self.method!r}, task={self.task!r}, edges={self.n_edges}, "
                f"nodes={self.n_nodes}{tail})")


# -- selection --------------------------------------------------------------------------------
DECIDED = "method"  # the selection rule that takes the circuit a method decided itself
SELECTION_NAMES = {"threshold": "threshold", "topk": "top_k", "top-k": "top_k",
                   "faithfulness": "faithfulness"}
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_COUNT = re.compile(r"[0-9]{1,18}", re.ASCII)


def parse_selection(text: str) -> dict[str, Any]:
    """``threshold:X``, ``topk:N``, ``faithfulness:F``, ``method`` or
    ``stable:S,topk:N[,resamples:R][,seed:K]`` -> keyword arguments of `select`.

    The value is a plain decimal number (``0.02``, ``1e-3``), no spaces: a finite threshold, a
    non-negative whole number of edges (or nodes), a faithfulness in (0, 1]. ``method`` takes
    the circuit a method decided itself (ACDC's). ``stable`` keeps the edges in the top N of at
    least a share S in (0, 1] of R bootstrap resamples of the prompts
    (`circuits.selection_stable`).

    Parameters
    ----------
    text : str

    Returns
    -------
    dict
        ``{"threshold": x}``, ``{"top_k": n}`` (an int), ``{"faithfulness": f}``,
        ``{"decided": True}`` or ``{"stable": s, "top_k": n}`` (with ``resamples`` and ``seed``
        where given).

    Raises
    ------
    OptionError
        The text is not one of the five forms, or its value is out of range.

    Examples
    --------
    >>> parse_selection("topk:20"), parse_selection("threshold:1e-3"), parse_selection("method")
    ({'top_k': 20}, {'threshold': 0.001}, {'decided': True})
    """
    if not isinstance(text, str):
        raise OptionError(f"a selection is text like 'topk:20', 'threshold:0.01' or "
                          f"'faithfulness:0.8', got {type(text).__name__}")
    shown = repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
    if text == DECIDED:
        return {"decided": True}
    kind, sep, value = text.partition(":")
    if kind == "stable" and sep:
        return parse_stable(text)
    if not sep or kind not in SELECTION_NAMES:
        raise OptionError(f"bad selection {shown}; use threshold:X, topk:N, faithfulness:F, "
                          f"{SPELLING} (no spaces) or {DECIDED}")
    name = SELECTION_NAMES[kind]
    if name == "top_k":
        if not _COUNT.fullmatch(value):
            raise OptionError(f"bad selection {shown}: topk needs a whole number of at most 18 "
                              "digits, like topk:20")
        return {name: int(value)}
    number = float(value) if _DECIMAL.fullmatch(value) else math.nan
    if not math.isfinite(number):
        raise OptionError(f"bad selection {shown}: {name} needs a finite decimal number, like "
                          f"{name}:{'0.01' if name == 'threshold' else '0.8'}")
    if name == "faithfulness" and not 0 < number <= 1:
        raise OptionError(f"bad selection {shown}: faithfulness must be in (0, 1], like "
                          "faithfulness:0.8")
    return {name: number}


def _brief(value: Any) -> str:
    """`value` for a one-line message: its repr when short and on one line, else its type."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit
        text = ""
    if 0 < len(text) <= 40 and "\n" not in text:
        return text
    return f"a value of type {type(value).__name__}"


def _check_selection(scores: Any, threshold: Any, top_k: Any, faithfulness: Any,
                     decided: Any, signed: Any, chunk: Any) -> None:
    """OptionError unless `select`'s arguments have allowed types and values."""
    if not isinstance(scores, Scores):
        raise OptionError(f"select needs a Scores object (from circuits.score), got "
                          f"{type(scores).__name__}")
    if not isinstance(decided, bool):
        raise OptionError(f"decided must be True or False, got {_brief(decided)}")
    given = [name for name, v in (("threshold", threshold), ("top_k", top_k),
                                  ("faithfulness", faithfulness)) if v is not None]
    given += ["decided"] if decided else []
    if len(given) != 1:
        raise OptionError("select needs exactly one of threshold=, top_k=, faithfulness= or "
                          f"decided=True, got {', '.join(given) or 'none'}")
    if decided and scores.circuit is None:
        raise OptionError(f"method {scores.method or '(unnamed)'!r} scores edges but decides no "
                          "circuit of its own; select with threshold, top_k or faithfulness")

    def real(v: Any) -> bool:
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            return False
        try:
            return math.isfinite(v)
        except OverflowError:  # an integer beyond float's range
            return False

    if threshold is not None and not real(threshold):
        raise OptionError(f"threshold must be a finite number, got {_brief(threshold)}")
    if top_k is not None and not (isinstance(top_k, numbers.Integral)
                                  and not isinstance(top_k, bool) and top_k >= 0):
        raise OptionError(f"top_k must be a whole number >= 0, got {_brief(top_k)}")
    if faithfulness is not None and not (real(faithfulness) and 0 < faithfulness <= 1):
        raise OptionError(f"faithfulness must be a number in (0, 1], got {_brief(faithfulness)}")
    if not isinstance(signed, bool):
        raise OptionError(f"signed must be True or False, got {_brief(signed)}")
    if chunk is not None and not (isinstance(chunk, numbers.Integral)
                                  and not isinstance(chunk, bool) and chunk >= 1):
        raise OptionError(f"chunk must be a whole number >= 1, got {_brief(chunk)}")


def select(
    scores: Scores,
    *,
    threshold: float | None = None,
    top_k: int | None = None,
    faithfulness: float | None = None,
    decided: bool = False,
    setup: Setup | None = None,
    signed: bool = False,
    chunk: int | None = None,
    stable: float | None = None,
    resamples: int | None = None,
    seed: int | None = None,
    per_prompt: Tensor | None = None,
) -> Circuit:
    """Select a circuit from scores: by threshold, top-k, the smallest that is faithful enough,
    the circuit the method decided itself, or the top-k edges that are stable under bootstrap
    resamples of the prompts.

    Give exactly one of `threshold`, `top_k`, `faithfulness`, ``decided=True``, or `stable`
    together with `top_k`. The circuit is
    pruned (edges on no input-to-logits path dropped) and its size counted after pruning,
    except the method's own circuit, which is taken exactly as the method decided it. A NaN
    score (an edge the method never evaluated) ranks last and passes no threshold.

    Parameters
    ----------
    scores : Scores
        Edge or node scores.
    threshold : float, optional
        Keep edges (nodes) whose |score| (or score, with `signed`) is at least this; finite.
    top_k : int, optional
        Keep the `top_k` best-ranked edges (nodes), then prune; a whole number >= 0.
    faithfulness : float, optional
        In (0, 1]. The smallest prefix of the ranking whose pruned circuit reaches this
        faithfulness on `setup` (see `circuits.evaluate.smallest_faithful`). The result's
        ``metrics`` hold its faithfulness.
    decided : bool
        Take `Scores.circuit`, the circuit the method decided (ACDC's kept edges).
    setup : Setup, optional
        Needed with `faithfulness`: the prompts, metric and ablation to evaluate on.
    signed : bool
        Rank by signed score (most positive first) instead of |score|.
    chunk : int, optional
        With `faithfulness`: most circuit sizes evaluated in one batched forward.
    stable : float, optional
        In (0, 1], with `top_k`: keep the edges (nodes) in the top `top_k` of at least this
        share of `resamples` bootstrap resamples of the prompts, then prune
        (`circuits.selection_stable`). The per-prompt scores are `per_prompt`, or the method run
        again on each prompt of `setup` alone (eap, eap-ig and the other methods whose scores
        are means over the prompts). The result's options record the rule.
    resamples : int, optional
        With `stable`: how many resamples (100 when None).
    seed : int, optional
        With `stable`: seeds a generator of the resamples' own (0 when None); the caller's
        random state is left as it was.
    per_prompt : Tensor, optional
        With `stable`: ``[n_prompts, *scores.values.shape]`` per-prompt scores to resample.

    Returns
    -------
    Circuit

    Raises
    ------
    OptionError
        `scores` is not a `Scores`, not exactly one rule is given, or a value has the wrong
        type or range (a bool, a non-integral `top_k`, a NaN or infinite number).

    Examples
    --------
    >>> import torch
    >>> from circuits.graph import Graph
    >>> from circuits.scores import Scores
    >>> g = Graph(1, 1)
    >>> v = torch.zeros(g.n_sources, g.n_destinations)
    >>> v[g.edge_index("input->m0")], v[g.edge_index("m0->logits")] = 2.0, -3.0
    >>> select(Scores(g, v), top_k=2).edge_names
    ['input->m0', 'm0->logits']
    >>> select(Scores(g, v), top_k=2, signed=True).edge_names
    []
    """
    if stable is not None:
        check_stable(stable, top_k, resamples, seed)
    elif resamples is not None or seed is not None or per_prompt is not None:
        raise OptionError("resamples=, seed= and per_prompt= belong to a stable selection; "
                          "give stable= and top_k= with them")
    _check_selection(scores, threshold, top_k, faithfulness, decided, signed, chunk)
    g, level = scores.graph, scores.level
    by_abs = not signed
    selection: dict[str, Any] = {"signed": signed}
    if stable is not None:
        mask, record = stable_mask(scores, float(stable), int(top_k), setup=setup,
                                   per_prompt=per_prompt, resamples=resamples, seed=seed,
                                   by_abs=by_abs)
        circuit = Circuit.from_scores(scores, mask)
        circuit.options.update(selection, **record)
        return circuit
    if decided:
        circuit = Circuit(g, scores.circuit, scores.values, scores.level, method=scores.method,
                          task=scores.task, model=scores.model, options=dict(scores.options),
                          keep_dangling=True)
        circuit.options.update(selection, decided=True)
        return circuit
    if faithfulness is not None:
        if setup is None:
            raise OptionError("select(faithfulness=...) needs setup= to evaluate circuits on")
        with activity(f"finding the smallest circuit reaching faithfulness {faithfulness:g}"):
            circuit = smallest_faithful(scores, setup, faithfulness, by_abs=by_abs, chunk=chunk)
        circuit.options.update(selection)
        return circuit
    if top_k is not None:
        top_k = int(top_k)
        # k past the ranking's length keeps everything (and stays within a tensor's int64)
        k = min(top_k, n_items(g, level))
        mask = top_mask(g, ranks(g, scores.values, level, by_abs), k, level)
        selection["top_k"] = top_k
    else:
        threshold = float(threshold)
        key = scores.values.abs() if by_abs else scores.values
        passed = torch.nan_to_num(key, nan=-math.inf) >= threshold
        if level == "edge":
            mask = passed & g.valid
        else:
            mask = g.node_mask_to_edges([s for s, p in zip(g.sources, passed.tolist(),
                                                            strict=True) if p])
        selection["threshold"] = threshold
    circuit = Circuit.from_scores(scores, mask)
    circuit.options.update(selection)
    return circuit


def smallest_faithful(
    scores: Scores,
    setup: Setup,
    target: float,
    by_abs: bool = True,
    chunk: int | None = None,
    max_scan: int = MAX_SCAN,
) -> Circuit:
    """The Circuit of the shortest prefix of the score ranking whose pruned circuit reaches
    `target`: a bisection, then a scan of every shorter prefix in increasing order, each
    distinct pruned circuit evaluated once and at most `max_scan` of them (see
    `circuits.smallest`, which carries out the search on masks).

    Parameters
    ----------
    scores : Scores
    setup : Setup
    target : float
        Faithfulness to reach, at most 1.
    by_abs : bool
        Rank by |score| (default) or signed score.
    chunk : int, optional
        Lengths evaluated per forward.
    max_scan : int
        Most distinct circuits the scan below the bisection's boundary evaluates.

    Returns
    -------
    Circuit
        With ``metrics`` holding its faithfulness and metric values, and ``options`` the
        target, the prefix length ``k``, the bisection's boundary ``k_bisection`` and
        ``smallest``: True when every shorter prefix was evaluated and fell short.

    Examples
    --------
    >>> import torch
    >>> from circuits import Setup, get_task, load_model
    >>> from circuits.scores import Scores
    >>> model = load_model("induction-gpt2-2l")
    >>> task = get_task("induction", model.tokenizer, n=8)
    >>> setup = Setup(model, task.batches(model.tokenizer), task.metric)
    >>> scores = Scores(setup.graph, torch.rand(setup.graph.valid.shape) * setup.graph.valid)
    >>> c = smallest_faithful(scores, setup, 0.5)
    >>> c.metrics["faithfulness"] >= 0.5, c.options["smallest"], c.options["k"] <= \
c.options["k_bisection"]
    (True, True, True)
    """
    found = smallest_prefix(scores, setup, target, by_abs, chunk, max_scan)
    circuit = Circuit.from_scores(scores, found.mask)
    circuit.options.update(target_faithfulness=target, k=found.k, k_bisection=found.k_bisection,
                           smallest=found.smallest)
    base = found.baseline
    circuit.metrics.update(faithfulness=found.faithfulness, metric_circuit=found.metric_circuit,
                           metric_model=base.metric_model, metric_empty=base.metric_empty,
                           n_edges=circuit.n_edges, n_nodes=circuit.n_nodes)
    return circuit


def circuit_from_edges(graph: Graph, edges: Iterable[str], keep_dangling: bool = False,
                       **info: Any) -> Circuit:
    """A score-less circuit from edge names (``'a0.h1->m1'``) or, if every name is a node,
    the circuit induced by those nodes; no names give the empty circuit."""
    names = list(edges)
    if names and all("->" not in n for n in names):
        mask = graph.node_mask_to_edges(names)
    else:
        mask = graph.mask_from_edges(names)
    return Circuit(graph, mask, keep_dangling=keep_dangling, **info)
