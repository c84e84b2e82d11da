"""A toy model of superposition (Elhage et al. 2022, "Toy Models of Superposition").

`n` features pass through a bottleneck of `m < n` dimensions and are read back::

    h  = W x                 # [m], W is [m, n]: feature i is stored along W_i, column i
    x' = ReLU(W^T h + b)     # [n]

Feature i is zero with probability `S` (the sparsity) and otherwise uniform in [0, 1]; the loss
is the importance-weighted squared error ``sum_i I_i (x_i - x'_i)^2`` with ``I_i = decay**i``.
Dense features (S = 0) are stored like principal components: the `m` most important ones, each
along its own orthogonal direction, and the rest dropped. As features grow sparse, two of them
rarely fire together, so the model stores more features than it has dimensions, in directions
that interfere (superposition), and the ReLU with a negative bias filters the small interference
out. The measures the paper plots are methods of `ToyModel`: the norm of each ``W_i``, how much
of feature i's direction other features share, the dimensions per feature, and ``W^T W``.

A `ToyModel` holds several independent instances (one per sparsity) and trains them together:
one batch of tensors ``[batch, instance, feature]`` instead of a loop over models.

Here ``W`` is stored as ``[instance, n, m]``: row ``W[k, i]`` is the paper's column ``W_i`` of
instance k, so ``h = x @ W[k]`` and ``W[k] @ W[k].T`` is the paper's ``W^T W``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from ..errors import OptionError

#: A feature counts as represented when its direction has at least this norm (trained models
#: put each feature near norm 1 or near 0; the paper's bar charts show the same split).
REPRESENTED = 0.5


class ToyModel(torch.nn.Module):
    """Independent toy models of superposition, one per sparsity, trained side by side.

    Parameters
    ----------
    n_features, n_hidden : int
        Features `n` and bottleneck dimensions `m` (``m < n`` for superposition to matter).
    sparsity : sequence of float
        One sparsity ``S`` in [0, 1) per instance: the probability that a feature is zero.
    importance_decay : float
        Feature i has importance ``importance_decay ** i`` in the loss (in (0, 1]).
    seed : int
        Seed of the initial weights (Xavier-normal ``W``, zero ``b``), drawn from a generator of
        their own.

    Attributes
    ----------
    W : torch.nn.Parameter
        ``[instance, n_features, n_hidden]``; ``W[k, i]`` is feature i's direction.
    b : torch.nn.Parameter
        ``[instance, n_features]`` output bias.
    sparsity : Tensor
        ``[instance]``.
    importance : Tensor
        ``[n_features]``.

    Examples
    --------
    >>> toy = ToyModel(20, 5, [0.0, 0.9], seed=0)
    >>> toy.W.shape, toy.b.shape
    (torch.Size([2, 20, 5]), torch.Size([2, 20]))
    >>> x, h = toy.sample(8, seed=0)
    >>> x.shape, h.shape, toy(x).shape
    (torch.Size([8, 2, 20]), torch.Size([8, 2, 5]), torch.Size([8, 2, 20]))
    """

    def __init__(self, n_features: int, n_hidden: int, sparsity: Sequence[float],
                 importance_decay: float = 0.7, seed: int = 0) -> None:
        super().__init__()
        _check(n_features, n_hidden, sparsity, importance_decay)
        gen = torch.Generator().manual_seed(seed)
        k = len(sparsity)
        std = math.sqrt(2.0 / (n_features + n_hidden))  # Xavier normal, as the paper
        self.W = torch.nn.Parameter(torch.randn(k, n_features, n_hidden, generator=gen) * std)
        self.b = torch.nn.Parameter(torch.zeros(k, n_features))
        self.register_buffer("sparsity", torch.tensor([float(s) for s in sparsity]))
        self.register_buffer("importance",
                             importance_decay ** torch.arange(n_features, dtype=torch.float32))

    @property
    def n_features(self) -> int:
        """Number of features `n`."""
        return self.W.shape[1]

    @property
    def n_hidden(self) -> int:
        """Bottleneck width `m`."""
        return self.W.shape[2]

    def features(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``[n, instance, feature]`` inputs: zero with probability S, else U[0, 1]."""
        shape = (n, *self.b.shape)
        on = torch.rand(shape, generator=generator) >= self.sparsity[:, None]
        return torch.rand(shape, generator=generator) * on

    def hidden(self, x: Tensor) -> Tensor:
        """``h = W x`` per instance: ``[..., instance, n]`` -> ``[..., instance, m]``."""
        return torch.einsum("...kn,knm->...km", x, self.W)

    def forward(self, x: Tensor) -> Tensor:
        """``ReLU(W^T W x + b)`` per instance: ``[..., instance, n]`` -> the same shape."""
        return torch.relu(torch.einsum("...km,knm->...kn", self.hidden(x), self.W) + self.b)

    def loss(self, x: Tensor) -> Tensor:
        """Importance-weighted squared error per instance, mean over the batch: ``[instance]``."""
        err = self.importance * (x - self(x)) ** 2  # [batch, instance, n]
        return err.sum(-1).mean(0)

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Draw `n` inputs and their hidden activations (the SAE's training data).

        Parameters
        ----------
        n : int
            Rows to draw.
        seed : int
            Seed of a generator of their own (the global random state is left alone).

        Returns
        -------
        x : Tensor
            ``[n, instance, n_features]`` sparse features.
        h : Tensor
            ``[n, instance, n_hidden]`` activations ``W x``, without gradients.

        Examples
        --------
        >>> toy = ToyModel(4, 2, [0.5], seed=0)
        >>> x, h = toy.sample(3, seed=1)
        >>> torch.allclose(h[:, 0], x[:, 0] @ toy.W[0].detach())
        True
        """
        if n < 1:
            raise OptionError(f"sample needs at least one row (got {n})")
        with torch.no_grad():
            x = self.features(n, torch.Generator().manual_seed(seed))
            return x, self.hidden(x)

    def norms(self) -> Tensor:
        """``||W_i||`` per feature: ``[instance, n_features]`` (about 1 if stored, 0 if not).

        Examples
        --------
        >>> toy = ToyModel(3, 2, [0.0])
        >>> with torch.no_grad():
        ...     _ = toy.W.copy_(torch.tensor([[[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]]]))
        >>> toy.norms()
        tensor([[5., 1., 0.]])
        """
        return self.W.detach().norm(dim=-1)

    def represented(self, threshold: float = REPRESENTED) -> Tensor:
        """Which features the model stores: ``||W_i|| > threshold``, ``[instance, n]`` bool."""
        return self.norms() > threshold

    def gram(self) -> Tensor:
        """The paper's ``W^T W``: ``[instance, n, n]``, entry (i, j) = ``W_i . W_j``."""
        W = self.W.detach()
        return W @ W.transpose(1, 2)

    def superposition(self) -> Tensor:
        """How much other features share feature i's direction: ``sum_{j != i} (Ŵ_i . W_j)^2``.

        ``[instance, n_features]``; 0 for a feature on a direction of its own, about 1 for an
        antipodal pair (``W_j = -W_i``, both of norm 1). Read it for represented features only:
        a feature the model dropped keeps a tiny ``W_i`` whose direction means nothing.

        Examples
        --------
        >>> toy = ToyModel(3, 2, [0.0])
        >>> with torch.no_grad():
        ...     _ = toy.W.copy_(torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]]))
        >>> toy.superposition()
        tensor([[1., 1., 0.]])
        """
        W = self.W.detach()
        unit = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        overlap = (unit @ W.transpose(1, 2)) ** 2  # [instance, i, j]
        return overlap.sum(-1) - overlap.diagonal(dim1=1, dim2=2)

    def dimensions_per_feature(self) -> Tensor:
        """``m / ||W||_F^2`` per instance: 1 when `m` features are stored orthogonally, 1/2 for
        antipodal pairs, lower as more features share the `m` dimensions. ``[instance]``."""
        return self.n_hidden / self.W.detach().pow(2).sum(dim=(1, 2))


def train_toy(n_features: int = 20, n_hidden: int = 5,
              sparsity: float | Sequence[float] = (0.0, 0.7, 0.9, 0.97, 0.99),
              importance_decay: float = 0.7, steps: int = 3000, seed: int = 0,
              batch_size: int = 1024, lr: float = 3e-2) -> ToyModel:
    """Train one toy model of superposition per sparsity, all at once.

    Adam at learning rate `lr`, decayed along a cosine to 0 over `steps` steps of `batch_size`
    fresh draws (the paper trains 10,000 steps at 1e-3; the higher rate with the decay settles
    to the same picture in fewer steps). Every draw comes from a generator seeded by `seed`, so
    training is deterministic and the global random state is left as it was. It runs on one
    CPU thread (see `one_thread`).

    Parameters
    ----------
    n_features, n_hidden : int
        Features `n` and bottleneck width `m`.
    sparsity : float or sequence of float
        Sparsity of each instance, each in [0, 1).
    importance_decay : float
        Importance of feature i is ``importance_decay ** i``, in (0, 1].
    steps, batch_size : int
        Optimiser steps, rows per step.
    seed : int
        Seed of the initial weights and of every batch.
    lr : float
        Peak learning rate.

    Returns
    -------
    ToyModel
        In eval mode; instance k was trained at ``sparsity[k]``.

    Examples
    --------
    >>> toy = train_toy(20, 5, [0.0, 0.9], steps=20)  # the paper's shape; 20 steps: a smoke run
    >>> toy.norms().shape, toy.dimensions_per_feature().shape, toy.gram().shape
    (torch.Size([2, 20]), torch.Size([2]), torch.Size([2, 20, 20]))
    """
    spars = [sparsity] if isinstance(sparsity, (int, float)) else list(sparsity)
    if steps < 1 or batch_size < 1:
        raise OptionError(f"steps and batch_size must be at least 1 (got {steps} and "
                          f"{batch_size})")
    if not (math.isfinite(lr) and lr > 0):
        raise OptionError(f"lr must be a positive number (got {lr})")
    toy = ToyModel(n_features, n_hidden, spars, importance_decay, seed)
    gen = torch.Generator().manual_seed(seed + 1)  # batches drawn apart from the init
    opt = torch.optim.Adam(toy.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    with one_thread():
        for _ in range(steps):
            # instances share no parameters, so the sum trains each on its own loss
            loss = toy.loss(toy.features(batch_size, gen)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return toy.eval()


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside, and restore the thread count after (also on error).

    A toy's tensors hold a few thousand numbers, too few to split across threads: more threads
    only add a synchronisation per operation, and on a busy machine each one waits for a thread
    that is not scheduled (`train_toy` at the paper's shape took 72 s on two threads and 5 s on
    one, with two other processes running).

    Examples
    --------
    >>> before = torch.get_num_threads()
    >>> with one_thread():
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check(n_features: int, n_hidden: int, sparsity: Sequence[float],
           importance_decay: float) -> None:
    """Raise OptionError (one line) for sizes, sparsities or a decay a toy cannot have."""
    if n_features < 1 or n_hidden < 1:
        raise OptionError(f"a toy model needs at least one feature and one hidden dimension "
                          f"(got n_features={n_features}, n_hidden={n_hidden})")
    if len(sparsity) == 0:
        raise OptionError("give at least one sparsity")
    bad = [s for s in sparsity if not (0.0 <= s < 1.0)]
    if bad:
        raise OptionError(f"sparsity is the probability that a feature is zero, in [0, 1) "
                          f"(got {bad[0]})")
    if not (0.0 < importance_decay <= 1.0):
        raise OptionError(f"importance_decay must be in (0, 1] (got {importance_decay})")
