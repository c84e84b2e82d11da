"""Position-resolved circuits: components at token positions or at named spans of the prompt.

In the component graph (`circuits.graph`) an edge joins a source to a destination over every
position at once. The residual stream is kept per position, so every edge of the model lies at
one position: source ``s`` at position ``p`` writes into destination ``d``'s input at ``p``.
Information moves between positions only inside attention: a head's output at ``p`` reads
its keys and values at earlier positions. A position-resolved graph (`PositionGraph`) has a
node per (component, position) and an edge per (edge, position); summing its scores over the
positions gives the component graph's.

Positions are either the token positions themselves (`Positions.tokens`: every prompt must have
one length; labels ``"0"``, ``"1"``, ...) or named spans (`Positions.spans`: ``"spans": {"S1":
[2, 3], "END": [13, 14]}`` in a task's JSONL line, `circuits.example.Example.spans`), which
lets prompts of different lengths add up: a span's edge is the sum over its tokens, and
tokens in no span form the span ``other``. The logits are one destination, read at each
prompt's last token: edges into it start at the position (or span) of that token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from .errors import OptionError, TaskError
from .example import OTHER_SPAN, Example
from .graph import Graph, Node
from .task_tokens import prefix_ids, tokenize_example, unknown_token

__all__ = ["OTHER_SPAN", "PositionGraph", "Positions"]

MAX_POSITIONS = 512  # positions or spans a graph may have (the graph grows with their number)


@dataclass(frozen=True)
class Positions:
    """The positions a position-resolved graph has, and where each token of a prompt falls.

    Attributes
    ----------
    labels : tuple of str
        The positions' names, in prompt order: token indices (``"0"``, ``"1"``, ...) or span
        names (``other`` last, when some token is in no span).
    kind : "tokens" or "spans"
    reach : Tensor
        ``[P, P]`` bool: ``reach[a, b]`` when a query at position ``b`` can read keys and values
        at position ``a`` (a token of ``a`` is not after a token of ``b`` in some prompt).
    ends : Tensor
        ``[P]`` bool: the positions holding some prompt's last token (where the logits are read).
    """

    labels: tuple[str, ...]
    kind: str
    reach: Tensor
    ends: Tensor

    @property
    def n(self) -> int:
        return len(self.labels)

    @classmethod
    def tokens(cls, task: Any, tokenizer: Any, max_length: int | None = None) -> Positions:
        """One position per token; every prompt of `task` must have one token length.

        Examples
        --------
        >>> from circuits.task import Task, Example
        >>> from circuits.testing import tiny_tokenizer
        >>> task = Task("t", [Example("a b c", "c b a", " d", " e")])
        >>> Positions.tokens(task, tiny_tokenizer()).labels
        ('0', '1', '2')
        """
        lengths = sorted({len(row[0]) for row in _rows(task, tokenizer, max_length)})
        if len(lengths) > 1:
            raise TaskError(f"task {task.name!r} has prompts of {lengths[0]} to {lengths[-1]} "
                            "tokens, and a circuit per token position needs one length; name "
                            'spans in the task file ("spans": {"S1": [2, 3], ...}) or keep '
                            "prompts of one length")
        n = lengths[0]
        _check_count(n, "token positions")
        reach = torch.ones(n, n, dtype=torch.bool).triu()
        ends = torch.zeros(n, dtype=torch.bool)
        ends[-1] = True
        return cls(tuple(str(i) for i in range(n)), "tokens", reach, ends)

    @classmethod
    def spans(cls, task: Any, tokenizer: Any, max_length: int | None = None) -> Positions:
        """One position per span named in the task's examples (`Example.spans`), in the order
        of their first tokens, and ``other`` for the tokens of no span.

        Examples
        --------
        >>> from circuits.task import Task, Example
        >>> from circuits.testing import tiny_tokenizer
        >>> ex = Example("a b c d", "d b c a", " e", " f", spans={"X": (1, 2), "END": (3, 4)})
        >>> p = Positions.spans(Task("t", [ex]), tiny_tokenizer())
        >>> p.labels, p.ends.tolist()
        (('X', 'END', 'other'), [False, True, False])
        """
        names: dict[str, int] = {}  # name -> earliest start seen
        for ex in task.examples:
            for name, (start, _) in ex.spans.items():
                names[name] = min(start, names.get(name, start))
        if not names:
            raise TaskError(f"task {task.name!r} names no spans; add \"spans\": {{\"S1\": [2, 3], "
                            "...}} to its examples, or use positions per token")
        order = sorted(names, key=lambda n: (names[n], n))
        prefix = prefix_ids(tokenizer, task.bos)
        rows = []
        for ex, row in zip(task.examples, _rows(task, tokenizer, max_length), strict=True):
            rows.append(span_row(ex, len(row[0]) - len(prefix), len(prefix), order))
        if any(-1 in r for r in rows):
            order.append(OTHER_SPAN)
            rows = [[len(order) - 1 if i < 0 else i for i in r] for r in rows]
        _check_count(len(order), "spans")
        P = len(order)
        reach = torch.zeros(P, P, dtype=torch.bool)
        ends = torch.zeros(P, dtype=torch.bool)
        for r in rows:
            where = torch.tensor(r)
            first = torch.full((P,), len(r)).scatter_reduce(0, where, torch.arange(len(r)),
                                                             "amin")
            last = torch.full((P,), -1).scatter_reduce(0, where, torch.arange(len(r)), "amax")
            reach |= first[:, None] <= last[None, :]
            ends[r[-1]] = True
        return cls(tuple(order), "spans", reach, ends)

    def row(self, example: Example, n_tokens: int, n_prefix: int) -> list[int]:
        """The position index of each of a tokenized prompt's `n_tokens` tokens (its first
        `n_prefix` put before it by the model)."""
        if self.kind == "tokens":
            if n_tokens != self.n:
                raise TaskError(f"{example.where()}: the prompt is {n_tokens} tokens, but this "
                                f"circuit has {self.n} token positions; use prompts of that "
                                "length")
            return list(range(n_tokens))
        names = [n for n in self.labels if n != OTHER_SPAN]
        row = span_row(example, n_tokens - n_prefix, n_prefix, names)
        if -1 in row:
            if OTHER_SPAN not in self.labels:
                raise TaskError(f"{example.where()}: some tokens are in no span, and this "
                                f"circuit has no {OTHER_SPAN!r} span; name spans for every token")
            row = [self.labels.index(OTHER_SPAN) if i < 0 else i for i in row]
        return row

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Positions:
        """The positions a graph file records (`describe`; checked by `circuits.io`)."""
        return cls(tuple(record["labels"]), record["kind"],
                   torch.tensor(record["reach"], dtype=torch.bool),
                   torch.tensor(record["ends"], dtype=torch.bool))

    def describe(self) -> dict[str, Any]:
        """What the graph file records (`PositionGraph.shape`)."""
        return {"labels": list(self.labels), "kind": self.kind,
                "reach": [[int(v) for v in r] for r in self.reach.tolist()],
                "ends": [int(v) for v in self.ends.tolist()]}


def span_row(example: Example, n_prompt: int, n_prefix: int, names: Sequence[str]) -> list[int]:
    """Per token (the `n_prefix` ones put before the prompt first) the index in `names` of its
    span, -1 for tokens in no span; a span past the prompt's end or not in `names` is an
    error."""
    row = [-1] * (n_prefix + n_prompt)
    for name, (start, end) in example.spans.items():
        if end > n_prompt:
            raise TaskError(f"{example.where()}: span {name!r} ends at token {end}, but the "
                            f"prompt is {n_prompt} tokens for this tokenizer; give token "
                            "positions of the prompt (end excluded)")
        if name not in names:
            raise TaskError(f"{example.where()}: span {name!r} is not a position of this "
                            f"circuit ({', '.join(names)}); use those span names")
        index = list(names).index(name)
        for t in range(start, end):
            row[n_prefix + t] = index
    return row


def _rows(task: Any, tokenizer: Any, max_length: int | None) -> list[tuple[list[int], ...]]:
    """Every example of `task` tokenized as `circuits.task.Task.batches` does."""
    unknown, prefix = unknown_token(tokenizer), prefix_ids(tokenizer, task.bos)
    return [tokenize_example(tokenizer, ex, max_length, unknown, prefix) for ex in task.examples]


def _check_count(n: int, what: str) -> None:
    if n > MAX_POSITIONS:
        raise OptionError(f"{n} {what} is more than a position-resolved graph holds "
                          f"({MAX_POSITIONS}); name fewer, wider spans")


class PositionGraph(Graph):
    """A graph of components at positions: source ``a0.h1@S1``, destination ``a0.h1@S1<q>``.

    Every edge of the component graph `base` is here once per position, between the source
    and the destination at that position; the logits are one destination (``logits``), fed at
    the positions in `positions.ends`. A key or value input at position ``a`` is an input of
    the head at every position ``b`` that can read it (`Positions.reach`), which is what
    pruning follows. Indices: source ``s`` at position ``p`` is ``s * P + p``, destination
    ``d`` (not the logits) is ``d * P + p``, the logits last.

    Examples
    --------
    >>> import torch
    >>> p = Positions(("0", "1"), "tokens", torch.ones(2, 2).triu().bool(),
    ...               torch.tensor([False, True]))
    >>> g = PositionGraph(Graph(1, 1), p)
    >>> g.sources[:3], g.destinations[:2], g.destinations[-1]
    (('input@0', 'input@1', 'a0.h0@0'), ('a0.h0@0<q>', 'a0.h0@1<q>'), 'logits')
    >>> g.n_edges == 2 * (Graph(1, 1).n_edges - 3) + 3  # the logits read one position
    True
    """

    def __init__(self, base: Graph, positions: Positions) -> None:
        # the base graph's shape, already checked; its names are rebuilt below per position
        self.n_layers, self.n_heads = base.n_layers, base.n_heads
        self.n_kv_heads, self.parallel = base.n_kv_heads, base.parallel
        self.base, self.positions = base, positions
        P, labels = positions.n, positions.labels
        at = [f"@{label}" for label in labels]
        self.sources = tuple(f"{s}{a}" for s in base.sources for a in at)
        dsts = []
        for d in base.destinations[:-1]:
            name, lt, port = d.partition("<")
            dsts += [f"{name}{a}{lt}{port}" for a in at]
        self.destinations = (*dsts, "logits")
        self.src_stage = base.src_stage.repeat_interleave(P)
        self.dst_stage = torch.cat([base.dst_stage[:-1].repeat_interleave(P), base.dst_stage[-1:]])
        self.dst_port = torch.cat([base.dst_port[:-1].repeat_interleave(P), base.dst_port[-1:]])
        self.dst_head = torch.cat([base.dst_head[:-1].repeat_interleave(P), base.dst_head[-1:]])
        self.src_index = {name: i for i, name in enumerate(self.sources)}
        self.dst_index = {name: i for i, name in enumerate(self.destinations)}

    @property
    def n_positions(self) -> int:
        return self.positions.n

    # -- between the component graph's tensors and this graph's -----------------------------
    def expand(self, values: Tensor) -> Tensor:
        """``[P, n_src, n_dst]`` per-position values of the component graph's edges as this
        graph's ``[n_src * P, n_dst']`` (the logits column from the positions in `ends`)."""
        P, (S, D) = self.n_positions, (self.base.n_sources, self.base.n_destinations)
        if tuple(values.shape) != (P, S, D):
            raise OptionError(f"per-position values must have shape {(P, S, D)}, got "
                              f"{tuple(values.shape)}")
        out = values.new_zeros(S, P, D - 1, P)
        out.diagonal(dim1=1, dim2=3).copy_(values[:, :, :-1].permute(1, 2, 0))
        logits = values[:, :, -1].T * self.positions.ends.to(values.device)  # [S, P]
        return torch.cat([out.reshape(S * P, (D - 1) * P), logits.reshape(S * P, 1)], 1)

    def blocks(self, flat: Tensor) -> Tensor:
        """The inverse of `expand`: this graph's ``[..., n_src', n_dst']`` as ``[..., P,
        n_src, n_dst]`` of the component graph (zero where this graph has no edge)."""
        P, (S, D) = self.n_positions, (self.base.n_sources, self.base.n_destinations)
        lead = flat.shape[:-2]
        grid = flat[..., :-1].reshape(*lead, S, P, D - 1, P).diagonal(dim1=-3, dim2=-1)
        logits = flat[..., -1].reshape(*lead, S, P) * self.positions.ends.to(flat.device)
        out = torch.cat([grid.movedim(-1, -3), logits.movedim(-1, -2)[..., None]], -1)
        return out  # [..., P, S, D]

    # -- the graph's structure ----------------------------------------------------------------
    @cached_property
    def valid(self) -> Tensor:
        """``[n_src, n_dst]`` bool: an edge of `base` at one position (into the logits from the
        positions in `ends`)."""
        return self.expand(self.base.valid.expand(self.n_positions, -1, -1).float()).bool()

    @cached_property
    def feeds(self) -> Tensor:
        """``[n_dst, n_src + 1]`` bool: a query or MLP input feeds its component at its own
        position, a key or value input its heads at every position that reads it, the logits
        the last column."""
        base, P = self.base, self.n_positions
        same = torch.eye(P, dtype=torch.bool)
        parts = []
        for j in range(base.n_destinations - 1):
            across = self.positions.reach if int(base.dst_port[j]) in (1, 2) else same
            row = base.feeds[j, :-1]  # [S]
            parts.append((row[:, None, None] & across[None]).permute(1, 0, 2).reshape(P, -1))
        out = torch.zeros(self.n_destinations, self.n_sources + 1, dtype=torch.bool)
        out[:-1, :-1] = torch.cat(parts)
        out[-1, -1] = True
        return out

    def node(self, name: str) -> Node:
        """The Node of a name: ``a0.h1@S1`` (a destination ``a0.h1@S1<q>`` belongs to it)."""
        if name.split("<", 1)[0] == "logits":
            return Node("logits", "logits", self.n_layers)
        base, at, label = name.split("<", 1)[0].rpartition("@")
        if not at or label not in self.positions.labels:
            raise OptionError(f"{name!r} is not a node of this graph; name a component at a "
                              f"position, e.g. 'a0.h1@{self.positions.labels[-1]}'")
        n = self.base.node(base)
        return Node(f"{n.name}@{label}", n.kind, n.layer, n.head, label)

    def all_nodes(self) -> list[Node]:
        """Every node: each component of `base` (key/value heads included) at each position,
        in the base graph's order, then the logits."""
        return [Node(f"{n.name}@{label}", n.kind, n.layer, n.head, label)
                for n in self.base.all_nodes() if n.kind != "logits"
                for label in self.positions.labels] + [self.node("logits")]

    @property
    def nodes(self) -> list[Node]:
        return [self.node(s) for s in self.sources] + [self.node("logits")]

    def shape(self) -> dict[str, Any]:
        return {**self.base.shape(), "positions": self.positions.describe()}

    def __repr__(self) -> str:
        return (f"PositionGraph({self.base!r}, positions={list(self.positions.labels)}, "
                f"edges={self.n_edges})")

