"""Steering vectors: directions read from contrastive pairs, added to the residual with a scale.

A *contrast* is two sides of texts, positive and negative (`read_contrast`): the clean and
corrupted prompts of a task, the ``{"positive", "negative"}`` lines of a pairs file, or two
classes of a labelled set (`circuits.representations.labels`). Their residual stream after a
layer, read at a position (the last token by default), gives a direction (`find_direction`):

``mean``
    The difference of the sides' means (contrastive activation addition, Rimsky et al. 2024).
``pca``
    The first principal component of the paired differences ``pos_i - neg_i`` (the reading
    vector of representation engineering, Zou et al. 2023): the top right-singular vector of
    the difference matrix, which is the first component of the differences taken in both orders
    (RepE shuffles the order of each pair for this reason: otherwise centring removes the very
    mean the sides differ by). A labelled set has no pairs: its classes are matched at random.

The direction is a unit vector, signed so that the positive side projects higher. Its scale
has a unit (`UNITS`): by default ``pairs``, the sides' mean separation along the direction, so
scale 1 adds ``(mean(pos) - mean(neg)) . v`` times `v` (for ``mean`` exactly the difference of
means, CAA's multiplier 1); ``residual`` counts in the mean norm of the residual at that layer
and ``raw`` in residual units. Scale 0 is the unsteered model.

`steering_edit` adds the scaled direction at the layer (all positions, or from a position on);
`circuits.representations.steer_report` measures it over a range of scales (`steering_sweep`:
the task's metric, the KL divergence to the unsteered model and the loss on neutral text) and
continues prompts with it (`generate`).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CircuitFileError, OptionError, TaskError
from ..features.sites import FeatureSite
from ..model import Model, check_same_weights
from ..nodes import NodeSites
from ..task import Task, get_task, list_tasks
from .activations import hidden_states
from .effects import add_direction, at_layer
from .labels import LABEL_SETS, Labeled, labeled_set

METHODS = ("mean", "pca")
#: What scale 1 adds: the pairs' mean separation, the mean residual norm, or a unit vector.
UNITS = ("pairs", "residual", "raw")
FORMAT = "circuits-steering-direction/1"
#: Differences whose norm is below this fraction of the states' norm count as none.
TINY = 1e-6
MAX_PAIRS_BYTES = 64 * 2**20


# -- contrastive pairs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Contrast:
    """Two sides of texts a direction is read from.

    Attributes
    ----------
    name : str
        Where the texts came from (``task:ioi``, a file name, ``labels:years``).
    positive, negative : Labeled
        The sides (their labels are ``positive`` and ``negative``; positions and marks as the
        source gave them).
    paired : bool
        Whether the i-th positive and the i-th negative are a pair (a task's prompts, a pairs
        file); a labelled set's classes are not.

    Examples
    --------
    >>> c = read_contrast("years", n=20, classes=("above", "below"))
    >>> c.paired, len(c.positive) + len(c.negative)
    (False, 20)
    """

    name: str
    positive: Labeled
    negative: Labeled
    paired: bool

    def __post_init__(self) -> None:
        if self.paired and len(self.positive) != len(self.negative):
            raise TaskError(f"{self.name}: {len(self.positive)} positive texts but "
                            f"{len(self.negative)} negative ones; pairs need one of each")


def _side(name: str, texts: Sequence[str], label: str, source: Labeled | None = None,
          pick: Sequence[int] = ()) -> Labeled:
    """One side of a contrast: `texts`, or the examples `pick` of `source`, labelled `label`."""
    if source is not None:
        sub = source.subset(pick)
        return Labeled(name, sub.texts, (label,) * len(pick), sub.positions, sub.marks, sub.words)
    return Labeled(name, tuple(texts), (label,) * len(texts))


def _first_record(path: Path) -> dict[str, Any]:
    """The first JSON object of a JSONL file (to tell a task, pairs and labels file apart)."""
    try:
        info = path.stat()
    except OSError as err:
        raise OptionError(f"cannot read pairs file {path} ({err.strerror or err})") from None
    # a device or a FIFO would never end, and pairs are far fewer than this many bytes
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_PAIRS_BYTES:
        raise OptionError(f"pairs file {path} is not a regular file of at most "
                          f"{MAX_PAIRS_BYTES // 2**20} MiB; pass a JSONL file")
    try:
        with path.open(encoding="utf-8-sig") as f:
            line = next((x for x in f if x.strip()), "")
    except (OSError, UnicodeDecodeError) as err:
        raise OptionError(f"cannot read pairs file {path} ({err}); pass a UTF-8 JSONL file") \
            from None
    if not line:
        raise OptionError(f"pairs file {path} is empty; give one JSON object per line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise OptionError(f"pairs file {path}: the first line is not a JSON object; give "
                          "{\"positive\": ..., \"negative\": ...} per line")
    return record


def _pairs_file(path: Path, n: int | None) -> Contrast:
    """A JSONL file of ``{"positive": text, "negative": text}`` lines."""
    pos, neg = [], []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path} line {number}: not JSON ({err.msg})") from None
            texts = [record.get(k) if isinstance(record, dict) else None
                     for k in ("positive", "negative")]
            if not all(isinstance(t, str) and t.strip() for t in texts):
                raise TaskError(f"{path} line {number}: give {{\"positive\": text, "
                                "\"negative\": text}, both non-empty strings")
            pos.append(texts[0])
            neg.append(texts[1])
    pos, neg = pos[:n], neg[:n]
    return Contrast(path.name, _side(path.name, pos, "positive"),
                    _side(path.name, neg, "negative"), True)


def _task_contrast(task: Task) -> Contrast:
    """A task's clean prompts (positive) and corrupted ones (negative), pair by pair."""
    name = f"task:{task.name}"
    clean = [e.clean for e in task.examples]
    corrupt = [e.corrupt for e in task.examples]
    return Contrast(name, _side(name, clean, "positive"), _side(name, corrupt, "negative"), True)


def _labeled_contrast(data: Labeled, classes: Sequence[str] | None) -> Contrast:
    """Two classes of a labelled set: the first positive, the second negative."""
    if classes is None:
        if len(data.classes) != 2:
            raise OptionError(f"labelled set {data.name!r} has {len(data.classes)} classes "
                              f"({', '.join(data.classes[:6])}); name the positive and the "
                              "negative one with classes=(POS, NEG) (--classes POS,NEG)")
        classes = data.classes
    classes = tuple(str(c) for c in classes)
    if len(classes) != 2 or classes[0] == classes[1]:
        raise OptionError(f"classes must be two different labels, positive first, got "
                          f"{','.join(classes)}")
    sides = []
    for c in classes:
        pick = [i for i, label in enumerate(data.labels) if label == c]
        if not pick:
            raise OptionError(f"labelled set {data.name!r} has no text of class {c!r}; its "
                              f"classes are {', '.join(data.classes)}")
        sides.append(pick)
    name = f"labels:{data.name}"
    return Contrast(name, _side(name, (), classes[0], data, sides[0]),
                    _side(name, (), classes[1], data, sides[1]), False)


def read_contrast(spec: str | os.PathLike | Labeled | Task, tokenizer: Any = None,
                  n: int | None = None, seed: int = 0,
                  classes: Sequence[str] | None = None) -> Contrast:
    """The two sides a direction is read from.

    Parameters
    ----------
    spec : str, path-like, Labeled or Task
        A labelled set (two of its classes), a task (clean against corrupted), or one of

        - a built-in task name (``ioi``, ``factual``, ...) or ``task:NAME``: its clean prompts
          against its corrupted ones;
        - a JSONL file: of ``{"positive": ..., "negative": ...}`` pairs, of a task's
          ``{"clean", "corrupt", ...}`` examples, or of labelled texts ``{"text", "label"}``;
        - ``labels:NAME`` or ``labels:FILE``: a labelled set (`labels.labeled_set`), one class
          against another (a bare label-set name that is not a task, e.g. ``years``, too).
    tokenizer : tokenizer, optional
        Builds a built-in task's or label set's prompts for this tokenizer.
    n : int, optional
        At most this many pairs (a task's or label set's size; the first lines of a file).
    seed : int
        A built-in task's or label set's seed.
    classes : (str, str), optional
        A labelled set's positive and negative class (needed with more than two classes).

    Returns
    -------
    Contrast

    Raises
    ------
    OptionError, TaskError
        An unknown name, an unreadable or malformed file, a side with no text.

    Examples
    --------
    >>> c = read_contrast("ioi", n=4)
    >>> c.name, c.paired, c.positive.texts[0] != c.negative.texts[0]
    ('task:ioi', True, True)
    """
    if isinstance(spec, Task):
        return _task_contrast(Task(spec.name, spec.examples[:n] if n else spec.examples))
    if isinstance(spec, Labeled):
        return _labeled_contrast(spec if n is None else spec.subset(range(min(n, len(spec)))),
                                 classes)
    text = str(spec)
    kind, _, rest = text.partition(":")
    if kind == "labels" and rest:
        return _labeled_contrast(labeled_set(rest, tokenizer, n, seed), classes)
    if kind == "task" and rest:
        text = rest
    path = Path(text)
    if path.is_file() or text.endswith(".jsonl"):
        if not path.is_file():
            raise OptionError(f"pairs file {text} does not exist; pass a JSONL file, a task "
                              "name or labels:SET")
        record = _first_record(path)
        if "positive" in record or "negative" in record:
            return _pairs_file(path, n)
        if "clean" in record:
            task = Task.from_jsonl(path)
            return _task_contrast(Task(task.name, task.examples[:n] if n else task.examples))
        if "text" in record and "label" in record:
            return _labeled_contrast(labeled_set(path, tokenizer, n, seed), classes)
        raise OptionError(f"pairs file {path}: lines need \"positive\" and \"negative\" (pairs), "
                          "\"clean\" and \"corrupt\" (a task) or \"text\" and \"label\" (labels)")
    if path.is_dir() and text not in LABEL_SETS and text not in dict(list_tasks()):
        raise OptionError(f"pairs {text} is a folder; pass a JSONL file, a task or labels:SET")
    if text in LABEL_SETS and kind != "task":
        try:
            get_task(text, n=1)
        except OptionError:
            return _labeled_contrast(labeled_set(text, tokenizer, n, seed), classes)
    try:
        return _task_contrast(get_task(text, tokenizer, n=n, seed=seed))
    except OptionError:
        raise OptionError(f"pairs {text!r} is neither a file, a built-in task nor labels:SET "
                          f"(label sets: {', '.join(LABEL_SETS)})") from None


# -- directions -----------------------------------------------------------------------------------
def contrast_direction(positive: Tensor, negative: Tensor, method: str = "mean",
                       paired: bool = True, seed: int = 0) -> Tensor:
    """The unit direction that separates two sides of states, the positive side higher.

    Parameters
    ----------
    positive, negative : Tensor
        ``[n, d]`` and ``[m, d]`` states (``n == m`` when paired: row i of each is a pair).
    method : "mean" or "pca"
        Difference of means, or the first principal component of the paired differences
        (module docstring); unpaired sides are matched at random (seeded) for ``pca``.
    paired : bool
    seed : int

    Returns
    -------
    Tensor
        ``[d]`` float32, unit norm, with ``(mean(positive) - mean(negative)) . v > 0``.

    Raises
    ------
    OptionError
        An unknown method, sides of other widths or counts, non-finite states, sides that do
        not differ, or a principal component that does not separate them.

    Examples
    --------
    >>> pos = torch.tensor([[2.0, 1.0], [4.0, -1.0]])
    >>> neg = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    >>> contrast_direction(pos, neg).tolist(), contrast_direction(pos, neg, "pca").tolist()
    ([1.0, 0.0], [1.0, 0.0])
    """
    if method not in METHODS:
        raise OptionError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
    pos, neg = positive.double(), negative.double()  # float64: a small difference of big states
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1] or not len(pos) \
            or not len(neg):
        raise OptionError(f"the sides must be [n, d] and [m, d] states, got "
                          f"{list(pos.shape)} and {list(neg.shape)}")
    if paired and len(pos) != len(neg):
        raise OptionError(f"{len(pos)} positive but {len(neg)} negative states; pairs need "
                          "one of each")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise OptionError("the states are not all finite (NaN or inf); check the model's "
                          "weights and dtype")
    gap = pos.mean(0) - neg.mean(0)
    size = torch.cat([pos, neg]).norm(dim=1).mean()
    if method == "mean":
        v = gap
    else:
        if not paired:
            k = min(len(pos), len(neg))
            rng = torch.Generator().manual_seed(seed)
            pos = pos[torch.randperm(len(pos), generator=rng)[:k]]
            neg = neg[torch.randperm(len(neg), generator=rng)[:k]]
        v = torch.linalg.svd(pos - neg, full_matrices=False).Vh[0]
    if v.norm() <= TINY * size or gap.norm() <= TINY * size:
        raise OptionError("the two sides' states do not differ at this layer (are their "
                          "texts the same tokens for this tokenizer?); pick another layer or "
                          "position, or pairs that differ in what you steer")
    v = v / v.norm()
    along = float(gap @ v)
    if abs(along) <= TINY * float(gap.norm()):
        raise OptionError("the first principal component of the differences does not separate "
                          "the sides (their means differ orthogonally to it); use method mean")
    return (v if along > 0 else -v).float()


@dataclass(frozen=True)
class Direction:
    """A steering direction at a layer, and what it was read from.

    Attributes
    ----------
    vector : Tensor
        ``[d_model]`` float32, unit norm: the positive side projects higher.
    layer : int
        The residual stream after this decoder layer (site ``resid.L``).
    method : "mean" or "pca"
    separation : float
        The sides' mean separation along `vector`: ``(mean(pos) - mean(neg)) . vector``, the
        size of scale 1 in the unit ``pairs``.
    resid_norm : float
        The mean norm of the states read (both sides): the unit ``residual``.
    accuracy : float
        The fraction of the texts read that fall on their side of the midpoint between the
        sides' mean projections (in-sample: how cleanly the direction splits them).
    source : str
        What the sides were (`Contrast.name`).
    position : str
        Where the texts were read (a position spec; ``"own"`` when each text said).
    n_positive, n_negative : int
    model : str
        The fingerprint of the model the states came from (`Model.fingerprint`).
    model_name : str

    Examples
    --------
    >>> d = Direction(torch.tensor([0.6, 0.8]), layer=1, method="mean", separation=2.0,
    ...               resid_norm=10.0)
    >>> d.steering(1.5).tolist(), d.steering(0.1, unit="residual").tolist()
    ([1.8000000715255737, 2.4000000953674316], [0.6000000238418579, 0.800000011920929])
    """

    vector: Tensor
    layer: int
    method: str
    separation: float
    resid_norm: float
    accuracy: float = float("nan")
    source: str = ""
    position: str = "last"
    n_positive: int = 0
    n_negative: int = 0
    model: str = ""
    model_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def unit_size(self, unit: str = "pairs") -> float:
        """The length of the vector scale 1 adds, in `unit` (`UNITS`)."""
        if unit not in UNITS:
            raise OptionError(f"unit {unit!r} is unknown; use one of {', '.join(UNITS)}")
        return {"pairs": self.separation, "residual": self.resid_norm, "raw": 1.0}[unit]

    def steering(self, scale: float, unit: str = "pairs") -> Tensor:
        """The ``[d_model]`` vector added at scale `scale` in `unit`."""
        return self.vector * (float(scale) * self.unit_size(unit))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the direction as safetensors (tensor ``direction``, the rest as metadata).

        Examples
        --------
        >>> import tempfile
        >>> d = Direction(torch.tensor([1.0, 0.0]), 0, "pca", 2.0, 3.0, source="task:ioi")
        >>> path = d.save(Path(tempfile.mkdtemp()) / "direction.safetensors")
        >>> Direction.load(path).source
        'task:ioi'
        """
        from safetensors.torch import save

        from ..files import write_atomic

        meta = {"format": FORMAT, "layer": str(self.layer), "method": self.method,
                "separation": repr(self.separation), "resid_norm": repr(self.resid_norm),
                "accuracy": repr(self.accuracy), "source": self.source,
                "position": self.position, "n_positive": str(self.n_positive),
                "n_negative": str(self.n_negative), "model": self.model,
                "model_name": self.model_name}
        path = Path(path)
        write_atomic(path, save({"direction": self.vector.float().contiguous().cpu()}, meta))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Model | None = None,
             any_model: bool = False) -> Direction:
        """A direction `save` wrote; with `model`, checked to fit it (width, layer and, unless
        `any_model`, the weights it was read from).

        Raises
        ------
        CircuitFileError
            Not a direction file, or a damaged one.
        OptionError
            It does not fit `model`.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise CircuitFileError(f"direction file {path} does not exist; pass a file "
                                   "`circuits steer` wrote (direction.safetensors)")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                vector = f.get_tensor("direction").float()
            if meta.get("format") != FORMAT:
                raise ValueError("not a direction file")
            direction = cls(vector, int(meta["layer"]), meta["method"],
                            float(meta["separation"]), float(meta["resid_norm"]),
                            float(meta["accuracy"]), meta["source"], meta["position"],
                            int(meta["n_positive"]), int(meta["n_negative"]), meta["model"],
                            meta["model_name"])
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise CircuitFileError(f"{path} is not a steering direction file ({err}); pass a "
                                   "direction.safetensors that `circuits steer` wrote") from None
        if vector.ndim != 1 or not torch.isfinite(vector).all() \
                or abs(float(vector.norm()) - 1) > 1e-3 or direction.method not in METHODS \
                or not (math.isfinite(direction.separation) and direction.separation > 0):
            raise CircuitFileError(f"{path}: the direction is damaged (not a finite unit "
                                   "vector with a positive separation); write it again")
        if model is not None:
            direction.check_fits(model, str(path), any_model)
        return direction

    def check_fits(self, model: Model, what: str = "the direction",
                   any_model: bool = False) -> None:
        """Fail unless `model` has this direction's width and layer (and, unless `any_model`,
        the weights it was read from)."""
        nodes = NodeSites.of(model)
        if len(self.vector) != nodes.d_model or self.layer >= nodes.n_layers:
            raise OptionError(f"{what} is a width-{len(self.vector)} direction at layer "
                              f"{self.layer}, but {model.name!r} has width {nodes.d_model} and "
                              f"{nodes.n_layers} layers; read the direction on this model")
        check_same_weights(model, self.model, "float32", f"{what} was read on "
                           f"{self.model_name!r}", "read the direction on this model, or pass "
                           "--any-model to apply it anyway", any_model)


def find_direction(model: Model, pairs: Contrast | str, layer: int, method: str = "mean",
                   position: str | int | None = None, batch_size: int = 32,
                   seed: int = 0) -> Direction:
    """The steering direction of a contrast at a layer.

    Parameters
    ----------
    model : Model
    pairs : Contrast or str
        The sides, or a spec for `read_contrast`.
    layer : int
        The residual stream after this decoder layer (negative from the end).
    method : "mean" or "pca"
    position : str or int, optional
        Where every text is read (`circuits.representations.activations`); by default where
        each says (the last token unless a labelled set gives positions).
    batch_size : int
    seed : int
        Matches a labelled set's classes for ``pca``.

    Returns
    -------
    Direction

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> d = find_direction(p.model, read_contrast(p.labeled, classes=("pos", "neg")), layer=0)
    >>> float(d.vector @ p.direction) > 0.9
    True
    """
    n_layers = NodeSites.of(model).n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise OptionError(f"layer {layer} is out of range: {model.name!r} has layers 0 to "
                          f"{n_layers - 1}")
    if method not in METHODS:
        raise OptionError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
    layer %= n_layers
    if not isinstance(pairs, Contrast):
        pairs = read_contrast(pairs, model.tokenizer, seed=seed)
    pos = hidden_states(model, pairs.positive, [layer], position, batch_size)[0]
    neg = hidden_states(model, pairs.negative, [layer], position, batch_size)[0]
    v = contrast_direction(pos, neg, method, pairs.paired, seed)
    up, down = pos.double() @ v.double(), neg.double() @ v.double()
    middle = (up.mean() + down.mean()) / 2
    right = int((up > middle).sum() + (down < middle).sum())
    return Direction(v, layer, method, float(up.mean() - down.mean()),
                     float(torch.cat([pos, neg]).norm(dim=1).mean()),
                     right / (len(up) + len(down)), pairs.name,
                     _where_read(pairs, position), len(pos), len(neg),
                     model.fingerprint, model.name)


def _where_read(pairs: Contrast, position: str | int | None) -> str:
    """The position spec the texts were read at (``own`` where they name several)."""
    if position is not None:
        return str(position)
    specs = set(pairs.positive.positions) | set(pairs.negative.positions)
    return specs.pop() if len(specs) == 1 else "own"


# -- applying a direction -------------------------------------------------------------------------
def _from_end(vector: Tensor, start: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Adds a vector from `start` on, a negative `start` counted back from each call's end."""
    def fn(x: Tensor, y: Tensor) -> Tensor:
        at = start if start >= 0 else max(y.shape[1] + start, 0)
        return add_direction(vector.to(y.device), 1.0, at)(x, y)
    return fn


def steering_edit(model: Model, direction: Direction, scale: float, unit: str = "pairs",
                  start: int = 0) -> dict[FeatureSite, Callable[[Tensor, Tensor], Tensor]]:
    """The edit (for `circuits.features.sites.spliced` and the effects) that adds `direction`
    at `scale` to the residual after its layer.

    Parameters
    ----------
    model : Model
    direction : Direction
    scale : float
    unit : str
        What scale 1 adds (`UNITS`).
    start : int
        The first position steered, counting the model's input tokens (a BOS included); a
        negative number counts back from the prompt's end (-1: the last token). 0 steers all.

    Examples
    --------
    >>> from circuits.features.sites import spliced
    >>> from circuits.testing import tiny_gpt2
    >>> m = tiny_gpt2(n_layer=1, n_embd=16)
    >>> d = Direction(torch.eye(16)[0], 0, "mean", 1.0, 1.0, model=m.fingerprint)
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> with spliced(m, steering_edit(m, d, 0.0)):
    ...     same = m.hf(input_ids=ids).logits
    >>> bool(torch.equal(same, m.hf(input_ids=ids).logits))
    True
    """
    direction.check_fits(model, any_model=True)
    return at_layer(model, direction.layer, _from_end(direction.steering(scale, unit), int(start)))
