"""Concept erasure with LEACE: remove what a layer linearly says about a label.

LEACE (Belrose et al., 2023) is the affine map ``x' = x - W⁺ P W (x - μ)``, with ``W =
Σ_xx^(-1/2)`` the whitening of the hidden states, ``P`` the orthogonal projection onto the
column space of ``W Σ_xz`` (``z`` the one-hot concept) and ``μ`` the mean of ``x``. Afterwards
``Cov(x', z) = 0``, so no linear predictor trained with a convex loss beats a constant one, and
of all affine maps that do this it moves ``x`` the least in mean squared distance. The
``concept-erasure`` package fits it (`fit_eraser`); `erase_edit` and `erasing` splice it into
the forward at one layer. `circuits.representations.erase_report` fits it on a labelled set,
checks it with probes and prices it.

The eraser applies at ``"all"`` positions by default: a concept read at one token is usually
carried at others too, and later layers can move it back from any of them by attention, so
erasing at the read position alone can leave the behavior intact while the probe there says the
concept is gone. ``"last"`` or a negative index erases only there: a smaller edit, the one the
probe checks exactly.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CircuitFileError, OptionError, TaskError
from ..features.sites import FeatureSite, site_of, spliced
from ..files import write_atomic
from ..model import Model, check_same_weights
from ..nodes import NodeSites
from .labels import INDEX_RE

FORMAT = "circuits-leace-eraser"
VERSION = "1"


@dataclass(frozen=True)
class Eraser:
    """A fitted LEACE eraser of one layer's residual stream.

    The map is ``x' = x - ((x - mean) @ proj_right.T) @ proj_left.T``: the identity minus a
    low-rank (at most classes - 1) oblique projection, stored as its two factors.

    Attributes
    ----------
    proj_left : Tensor
        ``[d, r]`` float32.
    proj_right : Tensor
        ``[r, d]`` float32.
    mean : Tensor
        ``[d]`` the mean hidden state of the examples it was fitted on.
    layer : int
        The decoder layer whose output (site ``resid.L``) it erases.
    classes : tuple of str
        The concept's classes, in the order of the one-hot columns.
    meta : dict of str to str
        What it was fitted on: ``model``, ``fingerprint``, ``dtype``, ``labels``, ``position``,
        ``n_fit``, ``shrinkage`` (strings, as safetensors metadata holds them).

    Examples
    --------
    >>> import tempfile
    >>> eraser = fit_eraser(torch.randn(40, 8), torch.arange(40) % 2, ["no", "yes"], layer=3)
    >>> path = eraser.save(Path(tempfile.mkdtemp()) / "eraser.safetensors")
    >>> loaded = Eraser.load(path)
    >>> loaded.layer, loaded.classes, loaded.rank, torch.equal(loaded.mean, eraser.mean)
    (3, ('no', 'yes'), 1, True)
    """

    proj_left: Tensor
    proj_right: Tensor
    mean: Tensor
    layer: int
    classes: tuple[str, ...]
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """The hidden size ``d``."""
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        """Directions it removes: ``proj_left``'s non-zero columns (the package zeroes those of
        singular values below its tolerance)."""
        return int((self.proj_left.norm(dim=0) > 0).sum())

    def __call__(self, x: Tensor) -> Tensor:
        """Erase the concept from ``x`` ``[..., d]`` (computed in float32, returned in x's
        dtype)."""
        h = x.float()
        mean, left, right = (t.to(h.device) for t in (self.mean, self.proj_left,
                                                       self.proj_right))
        return (h - ((h - mean) @ right.T) @ left.T).to(x.dtype)

    def to(self, device: torch.device | str) -> Eraser:
        """The same eraser with its tensors on `device`."""
        return Eraser(self.proj_left.to(device), self.proj_right.to(device),
                      self.mean.to(device), self.layer, self.classes, dict(self.meta))

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file: ``proj_left``, ``proj_right``, ``mean`` and the layer,
        classes and `meta` as its metadata; returns the path."""
        from safetensors.torch import save

        tensors = {"proj_left": self.proj_left, "proj_right": self.proj_right,
                   "mean": self.mean}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise OptionError("the eraser has non-finite values; it was not saved (check the "
                              "hidden states for overflow, e.g. run in float32)")
        metadata = {**{str(k): str(v) for k, v in self.meta.items()}, "format": FORMAT,
                    "version": VERSION, "layer": str(self.layer),
                    "classes": json.dumps(list(self.classes))}
        path = Path(path)
        write_atomic(path, save(tensors, metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Eraser:
        """An eraser written by `save`.

        Raises
        ------
        CircuitFileError
            Not a readable eraser file: missing, not safetensors, missing or misshapen tensors.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CircuitFileError(f"{path}: no such eraser file; give the eraser.safetensors "
                                   "that `circuits erase` wrote")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
        except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
            raise CircuitFileError(f"{path}: cannot read an eraser ({type(err).__name__}: "
                                   f"{err})") from None
        if meta.get("format") != FORMAT:
            raise CircuitFileError(f"{path}: not an eraser file (no format {FORMAT!r} in its "
                                   "metadata); give the eraser.safetensors `circuits erase` wrote")
        try:
            left, right, mean = tensors["proj_left"], tensors["proj_right"], tensors["mean"]
            layer, classes = int(meta.pop("layer")), tuple(json.loads(meta.pop("classes")))
        except (KeyError, ValueError, TypeError) as err:
            raise CircuitFileError(f"{path}: the eraser file lacks {err}; write it again with "
                                   "`circuits erase`") from None
        d = mean.shape[0] if mean.dim() == 1 else -1
        if left.dim() != 2 or right.shape != left.T.shape or left.shape[0] != d:
            raise CircuitFileError(f"{path}: proj_left {tuple(left.shape)}, proj_right "
                                   f"{tuple(right.shape)} and mean {tuple(mean.shape)} are not "
                                   "[d, r], [r, d] and [d]")
        if not all(torch.isfinite(t).all() for t in (left, right, mean)):
            raise CircuitFileError(f"{path}: the eraser holds non-finite values; write it again "
                                   "with `circuits erase`")
        for key in ("format", "version"):
            meta.pop(key, None)
        return cls(left, right, mean, layer, classes, meta)

    def check_fits(self, model: Model, any_model: bool = False) -> str | None:
        """Refuse a model this eraser was not fitted on: another width, too few layers, or
        (unless `any_model`) other weights than its recorded fingerprint; returns the warning
        of `circuits.model.check_same_weights` where the weights could not be checked."""
        nodes = NodeSites.of(model)
        if self.width != nodes.d_model or self.layer >= nodes.n_layers:
            raise OptionError(f"the eraser is for layer {self.layer} of a {self.width}-wide "
                              f"model; {model.name} has {nodes.n_layers} layers of width "
                              f"{nodes.d_model}; use the model it was fitted on")
        return check_same_weights(model, self.meta.get("fingerprint"), self.meta.get("dtype"),
                                  f"the eraser was fitted on {self.meta.get('model', '?')!r}",
                                  "use that model, or fit the eraser again on this one",
                                  any_model)


def one_hot(y: Sequence[int] | np.ndarray | Tensor, k: int) -> Tensor:
    """``[n, k]`` float64 one-hot rows of class indices `y`."""
    index = torch.as_tensor(np.asarray(y), dtype=torch.long)
    return torch.nn.functional.one_hot(index, k).double()


def fit_eraser(x: Tensor, y: Sequence[int] | np.ndarray | Tensor,
               classes: Sequence[str] | None = None, layer: int = 0, shrinkage: bool = True,
               meta: Mapping[str, Any] | None = None) -> Eraser:
    """Fit a LEACE eraser of the classes `y` from hidden states `x` (``concept-erasure``).

    Parameters
    ----------
    x : Tensor
        ``[n, d]`` hidden states, finite.
    y : sequence of int
        The class index of each row, 0 to ``len(classes) - 1``; at least two classes.
    classes : sequence of str, optional
        The class names (default: ``"0"``, ``"1"``, ...).
    layer : int
        The layer `x` was read at (recorded).
    shrinkage : bool
        Estimate ``Σ_xx`` with the package's optimal linear shrinkage (needed when ``n`` is
        not much larger than ``d``, where the sample covariance is singular or noisy); False
        uses the plain sample covariance, for which the result is exactly the closed form.
    meta : mapping, optional
        Recorded in `Eraser.meta` (values as strings).

    Returns
    -------
    Eraser
        Fitted in float64, stored in float32. The trace of the covariance is not constrained
        (the package's ``constrain_cov_trace``): that mixes in another projection, which can
        leave some covariance with the concept, and LEACE with the sample covariance never
        raises the trace anyway.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(200) % 2
    >>> x = torch.randn(200, 4, generator=g) + 3.0 * y[:, None] * torch.tensor([1., 0, 0, 0])
    >>> erased = fit_eraser(x, y)(x)
    >>> means = [erased[y == c].mean(0) for c in (0, 1)]   # the class means now agree
    >>> bool(torch.allclose(means[0], means[1], atol=1e-4))
    True
    """
    from concept_erasure import LeaceFitter  # imported here: only erasure needs the package

    x = torch.as_tensor(x)
    ys = np.asarray(y, dtype=np.int64)
    if x.dim() != 2 or len(ys) != x.shape[0]:
        raise OptionError(f"fit_eraser takes x [n, d] and one class per row; got x "
                          f"{tuple(x.shape)} and {len(ys)} classes")
    if not torch.isfinite(x).all():
        raise OptionError("the hidden states have non-finite values; no eraser can be fitted "
                          "(run the model in float32)")
    names = tuple(str(c) for c in classes) if classes is not None else \
        tuple(str(i) for i in range(int(ys.max()) + 1))
    if len(np.unique(ys)) < 2 or ys.min() < 0 or ys.max() >= len(names):
        raise TaskError(f"erasure needs examples of two or more classes (indices 0 to "
                        f"{len(names) - 1}); got {sorted(set(ys.tolist()))}")
    fitter = LeaceFitter(x.shape[1], len(names), affine=True, constrain_cov_trace=False,
                         shrinkage=shrinkage, dtype=torch.float64)
    fitter.update(x.double(), one_hot(ys, len(names)))
    eraser = fitter.eraser
    info = {str(k): str(v) for k, v in (meta or {}).items()}
    info.setdefault("n_fit", str(len(ys)))
    info.setdefault("shrinkage", str(shrinkage).lower())
    return Eraser(eraser.proj_left.float(), eraser.proj_right.float(), eraser.bias.float(),
                  int(layer), names, info)


def cross_covariance(x: Tensor, y: Sequence[int] | np.ndarray, k: int) -> Tensor:
    """``[d, k]`` the sample cross-covariance ``Cov(x, z)`` of hidden states and the one-hot
    classes: what LEACE sets to zero.

    Examples
    --------
    >>> x = torch.tensor([[0.0], [2.0]])
    >>> cross_covariance(x, [0, 1], 2)
    tensor([[-1.,  1.]], dtype=torch.float64)
    """
    z = one_hot(y, k)
    h = torch.as_tensor(x).double()
    return (h - h.mean(0)).T @ (z - z.mean(0)) / max(len(z) - 1, 1)


def check_at(at: str | int) -> str:
    """`at` as ``"all"``, ``"last"`` or a negative token index, or a one-line OptionError.

    Examples
    --------
    >>> check_at("all"), check_at(-2)
    ('all', '-2')
    """
    text = str(at).strip()
    if text in ("all", "last") or (INDEX_RE.fullmatch(text) and int(text) < 0):
        return text
    raise OptionError(f"erase at {at!r} is not understood; use all (every position), last or "
                      "a negative token index such as -2 (counted from the end, the same in "
                      "every prompt whatever its prefix)")


def erase_edit(model: Model, eraser: Eraser, at: str | int = "all"
               ) -> dict[FeatureSite, Callable[[Tensor, Tensor], Tensor]]:
    """The edit that applies `eraser` to its layer's residual stream in the forward, as
    `circuits.features.sites.spliced` and `circuits.representations.effects` take it.

    Parameters
    ----------
    model : Model
    eraser : Eraser
    at : str or int
        ``"all"`` positions (default; module docstring), ``"last"`` or a negative index: that
        position of every row (rows of one token length, as tasks batch them).

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> eraser = fit_eraser(torch.randn(40, 32), torch.arange(40) % 2, layer=1)
    >>> [site.name for site in erase_edit(p.model, eraser)]
    ['resid.1']
    """
    at = check_at(at)
    site = site_of(model, f"resid.{eraser.layer}")
    if eraser.width != site.width:
        raise OptionError(f"the eraser is {eraser.width}-wide but {site.name} of {model.name} "
                          f"is {site.width}-wide; fit it on this model")
    placed = eraser.to(model.device)

    def edit(_: Tensor, y: Tensor) -> Tensor:  # y [b, p, d]
        if at == "all":
            return placed(y)
        i = -1 if at == "last" else int(at)
        if y.shape[1] < -i:
            return y
        out = y.clone()
        out[:, i] = placed(y[:, i])
        return out

    return {site: edit}


@contextlib.contextmanager
def erasing(model: Model, eraser: Eraser, at: str | int = "all") -> Iterator[None]:
    """Inside the block, the model's forward erases the concept at the eraser's layer.

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> p = planted_direction()
    >>> eraser = fit_eraser(torch.randn(40, 32), torch.arange(40) % 2, layer=0)
    >>> ids = torch.tensor([[2, 3, 4, 10]])
    >>> with erasing(p.model, eraser):
    ...     erased = p.model.hf(input_ids=ids).logits
    >>> bool((erased != p.model.hf(input_ids=ids).logits).any())
    True
    """
    with spliced(model, erase_edit(model, eraser, at)):
        yield
