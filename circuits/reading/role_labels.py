"""What `head_roles` finds: role scores per head, and the labels they justify.

`circuits.reading.roles.head_roles` measures the scores (`HeadRoles`, drawn by `plot_roles`); a
label (`Label`) is a claim, made only where the scores are strong enough.

Labels
    A score is a measurement; a label is a claim. `HeadRoles.labels` names a head by a role only
    where the evidence is strong (the thresholds are `LABEL_MIN`, `MIXED_GAP` and `DLA_SHARE`):

    * a role labels a head only at a score of at least ``LABEL_MIN = 0.4``: the role's pattern
      takes at least 40% of the head's attention (chance is about 0.03 to 0.1 on the repeated
      sequences), or 40% of tokens are copied;
    * ``name-mover`` also needs the head to raise the answer in direct logit attribution on the
      task: its contrastive term (clean minus corrupted prompts, `circuits.reading.dla`, logit
      difference) positive and at least ``DLA_SHARE = 5%`` of the metric's clean minus
      corrupted difference; a head whose direct effect is the same on both prompts pushes a
      prior, not the answer;
    * ``copying`` describes what a head's OV circuit does with whatever it attends to, which
      induction heads and name movers also do: it labels a head only when no attention role
      does;
    * two attention roles that both qualify and lie within ``MIXED_GAP = 0.1`` of each other
      give ``mixed``;
    * otherwise the head is unlabelled (role ``""``), however high its direct logit attribution:
      a weak attention role would describe it wrongly.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..files import write_atomic
from ..tables import text_table

ROLES = ("previous-token", "duplicate-token", "first-token", "induction", "copying",
         "name-mover")
#: Roles from the most specific to the least: how `HeadRoles.best` breaks ties.
SPECIFIC = ("name-mover", "induction", "duplicate-token", "previous-token", "copying",
            "first-token")
LABEL_MIN = 0.4  # a role labels a head only at this score or above
MIXED_GAP = 0.1  # two qualifying attention roles closer than this: "mixed"
DLA_SHARE = 0.05  # name-mover: contrastive DLA at least this share of the metric's difference


@dataclass(frozen=True)
class Label:
    """What `HeadRoles.labels` calls a head.

    Attributes
    ----------
    role : str
        A role of `ROLES`, ``"mixed"``, or ``""`` when no role is strong enough.
    score : float
        The role's score (the strongest of the mixed ones; the head's highest score when
        unlabelled).
    mixed : tuple of str
        With ``"mixed"``: the close roles, strongest first.
    """

    role: str
    score: float
    mixed: tuple[str, ...] = ()

    def __str__(self) -> str:
        """``"induction 0.93"``, ``"mixed (induction, previous-token) 0.62"`` or ``"-"``."""
        if not self.role:
            return "-"
        name = f"mixed ({', '.join(self.mixed)})" if self.mixed else self.role
        return f"{name} {self.score:.2f}"


@dataclass(frozen=True)
class HeadRoles:
    """Role scores of every head of a model (`circuits.reading.roles` defines the roles).

    Attributes
    ----------
    scores : dict[str, Tensor]
        Role name -> ``[n_layers, n_heads]`` float32 scores in [0, 1], in `ROLES` order; a
        role the model or the call cannot measure is absent.
    length : int
        ``T``, the length of each half of the repeated random sequences as used.
    n : int
        Random sequences (and tokens, and task prompts) asked for.
    seed : int
    task : str or None
        The task's name, when name-mover scores were measured on one.
    dla : Tensor or None
        ``[n_layers, n_heads]``: each head's contrastive direct logit attribution (clean minus
        corrupted, logit difference) on the task's first ``n`` prompts; None without a task or
        where it cannot be read. `labels` needs it for ``name-mover``.
    dla_total : float or None
        The metric's clean minus corrupted difference on those prompts.
    """

    scores: dict[str, Tensor]
    length: int = 0
    n: int = 0
    seed: int = 0
    task: str | None = field(default=None)
    dla: Tensor | None = field(default=None, compare=False)
    dla_total: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_layers, n_heads)``."""
        first = next(iter(self.scores.values()))
        return int(first.shape[0]), int(first.shape[1])

    def heads(self) -> Iterator[tuple[str, int, int]]:
        """``(name, layer, head)`` of every head, layer by layer."""
        n_layers, n_heads = self.shape
        for layer in range(n_layers):
            for head in range(n_heads):
                yield f"a{layer}.h{head}", layer, head

    def best(self) -> dict[str, tuple[str, float]]:
        """Each head's strongest role and its score, however weak: a measurement, not a label
        (`labels` says what a head can be called).

        Scores equal to two decimals (as the table shows them) go to the more specific role, in
        the order of `SPECIFIC`: name movers and induction heads also copy, and copying is a
        fraction that often reaches exactly 1. A head whose every score shows as 0.00 gets
        ``("none", its highest score)``.

        Returns
        -------
        dict
            ``"a{l}.h{h}"`` -> ``(role, score)``.

        Examples
        --------
        >>> import torch
        >>> roles = HeadRoles({"first-token": torch.tensor([[0.2, 0.9]]),
        ...                    "induction": torch.tensor([[0.7, 0.1]])})
        >>> roles.best()
        {'a0.h0': ('induction', 0.699999988079071), 'a0.h1': ('first-token', 0.8999999761581421)}
        """
        out = {}
        for name, layer, head in self.heads():
            def rank(role: str, layer: int = layer, head: int = head) -> tuple[float, int]:
                order = SPECIFIC.index(role) if role in SPECIFIC else len(SPECIFIC)
                return round(float(self.scores[role][layer, head]), 2), -order

            role = max(self.scores, key=rank)
            score = float(self.scores[role][layer, head])
            out[name] = (role if round(score, 2) > 0 else "none", score)
        return out

    def labels(self) -> dict[str, Label]:
        """What each head can be called: its role where the evidence is strong, ``"mixed"``
        where two are close, ``""`` otherwise (the rule is in the module docstring).

        Returns
        -------
        dict
            ``"a{l}.h{h}"`` -> `Label`.

        Examples
        --------
        >>> import torch
        >>> roles = HeadRoles({"previous-token": torch.tensor([[0.9, 0.5, 0.1]]),
        ...                    "first-token": torch.tensor([[0.0, 0.45, 0.12]])})
        >>> [str(label) for label in roles.labels().values()]
        ['previous-token 0.90', 'mixed (previous-token, first-token) 0.50', '-']
        """
        out = {}
        for name, layer, head in self.heads():
            scores = {r: float(s[layer, head]) for r, s in self.scores.items()}
            strong = [r for r, v in scores.items()
                      if v >= LABEL_MIN and self._backed(r, layer, head)]
            attention = [r for r in strong if r != "copying"]
            ranked = sorted(attention or strong, key=lambda r: (-round(scores[r], 2),
                                                                 SPECIFIC.index(r)))
            if not ranked:
                out[name] = Label("", max(scores.values(), default=0.0))
            elif len(ranked) > 1 and scores[ranked[0]] - scores[ranked[1]] < MIXED_GAP:
                close = tuple(r for r in ranked if scores[ranked[0]] - scores[r] < MIXED_GAP)
                out[name] = Label("mixed", scores[ranked[0]], close)
            else:
                out[name] = Label(ranked[0], scores[ranked[0]])
        return out

    def _backed(self, role: str, layer: int, head: int) -> bool:
        """Whether direct logit attribution backs `role` (only ``name-mover`` needs it)."""
        if role != "name-mover":
            return True
        if self.dla is None or self.dla_total is None:
            return False
        term = float(self.dla[layer, head])
        return term > 0 and term >= DLA_SHARE * abs(self.dla_total)

    def to_dict(self) -> dict[str, Any]:
        """The scores as plain JSON types: shape, settings, ``scores`` (role -> rows of
        layers), ``best`` (head -> its strongest role and score), ``labels`` (head -> `Label`
        as ``role``, ``score`` and ``mixed``), and with a task ``dla`` (rows of layers) and
        ``dla_total``.

        Examples
        --------
        >>> import torch
        >>> d = HeadRoles({"induction": torch.tensor([[0.5]])}, length=4, n=2).to_dict()
        >>> d["scores"], d["best"], d["labels"]
        ({'induction': [[0.5]]}, {'a0.h0': {'role': 'induction', 'score': 0.5}}, \
{'a0.h0': {'role': 'induction', 'score': 0.5, 'mixed': []}})
        """
        n_layers, n_heads = self.shape
        out = {
            "n_layers": n_layers, "n_heads": n_heads, "roles": list(self.scores),
            "length": self.length, "n": self.n, "seed": self.seed, "task": self.task,
            "scores": {r: [[round(float(x), 4) for x in row] for row in s.tolist()]
                       for r, s in self.scores.items()},
            "best": {name: {"role": role, "score": round(score, 4)}
                     for name, (role, score) in self.best().items()},
            "labels": {name: {"role": label.role, "score": round(label.score, 4),
                              "mixed": list(label.mixed)}
                       for name, label in self.labels().items()},
        }
        if self.dla is not None:
            out["dla"] = [[round(float(x), 6) for x in row] for row in self.dla.tolist()]
            out["dla_total"] = self.dla_total
        return out

    def table(self) -> str:
        """A text table: one row per head, its score in each role, its contrastive direct logit
        attribution (with a task) and its label (``-``: none).

        Examples
        --------
        >>> import torch
        >>> print(HeadRoles({"induction": torch.tensor([[0.5, 0.25]])}).table())
        head   induction  label
        -----  ---------  --------------
        a0.h0  0.50       induction 0.50
        a0.h1  0.25       -
        """
        labels = self.labels()
        dla = [] if self.dla is None else ["dla (clean - corrupted)"]
        rows = [(name, *(f"{float(s[layer, head]):.2f}" for s in self.scores.values()),
                 *([f"{float(self.dla[layer, head]):+.3f}"] if dla else []), str(labels[name]))
                for name, layer, head in self.heads()]
        return text_table(rows, header=("head", *self.scores, *dla, "label"))


# -- the figure --------------------------------------------------------------------------------
def plot_roles(roles: HeadRoles, path: str | Path) -> Path:
    """Draw one heatmap per role (layers down, heads across, colour scale [0, 1]) to a PNG.

    Parameters
    ----------
    roles : HeadRoles
    path : str or Path
        The PNG file, written whole to a temporary name and moved into place.

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile, torch
    >>> roles = HeadRoles({"induction": torch.tensor([[0.1, 0.9]])})
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     plot_roles(roles, f"{folder}/heads.png").stat().st_size > 0
    True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layers, n_heads = roles.shape
    columns = min(len(roles.scores), 3)
    rows = math.ceil(len(roles.scores) / columns)
    width = max(2.5, 0.45 * n_heads + 1.2)
    height = max(2.2, 0.4 * n_layers + 1.0)
    fig = Figure(figsize=(columns * width + 1.2, rows * height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    annotate = n_layers * n_heads <= 144  # values in the cells while they stay legible
    for ax, (role, scores) in zip(axes.flat, roles.scores.items(), strict=False):
        values = scores.float().numpy()
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(role)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        if annotate:
            for layer in range(n_layers):
                for head in range(n_heads):
                    value = values[layer, head]
                    ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if value > 0.6 else "white")
    for ax in list(axes.flat)[len(roles.scores):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.7, label="score")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    out = Path(path)
    write_atomic(out, buf.getvalue())
    return out
