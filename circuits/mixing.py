"""Mixing ablated values into destination inputs: the deltas a run has written, and the kernels
that weigh them.

A destination's input is the shared residual plus ``sum over upstream sources s of w[s, d] *
(ablated[s] - out[s])``. `Deltas` keeps each source's delta ``ablated - out`` as the run writes
it and forms those sums (`Deltas.mix`) with the kernels below, chosen per device: `mix` (one
dense, possibly batched, matrix product) everywhere; `mix_rows` (sums of the weighted rows a
destination reads) on a CPU only, where it is about 2x faster for mostly-zero weights at the
GPT-2-small shape, but it reads the weights on the host, a synchronisation a GPU would pay for
every destination. Shapes: deltas ``[n_src, C*b, p, d]`` (C variants, variant-major); weights
``[C, n_src, n_dst]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plans import RunPlan, value_only


class Deltas:
    """``ablated - current`` of every source written so far, ``[n_src, C*b, p, d]``.

    Sources before the run's start (restored from a trace) have the same delta in every
    variant: they are kept once, ``pre`` ``[n_pre, b, p, d]``, and mixed into every variant by
    broadcasting. With gradients the buffer holds detached values: reading rows of one buffer
    that autograd tracks would send a buffer-sized gradient back at every stage (and writing
    rows into a buffer that a product saved for its backward is an in-place change autograd
    refuses). Deltas that gradients must flow through (sources computed in this run) are kept
    as `chained` groups (first row, last row + 1, ``[n, C*b, p, d]``) instead; with gradients
    with respect to the weights (`weights_grad`) every delta is, and there is no buffer.

    With `sums`, the running sum of the deltas is kept after each stage's sources, ``sums[n]``
    ``[C|1, b, p, d]`` over the first n sources: the fully ablated residual minus the current one.
    """

    def __init__(self, ablated: Tensor, like: Tensor, n_sources: int, C: int, plan: RunPlan,
                 tracked: bool) -> None:
        self.ablated, self.C, self.tracked = last(ablated, like.shape[1]), C, tracked
        self.positions = like.shape[1]
        self.weights_grad = plan.gradients
        self.buf = None if self.weights_grad else like.new_empty(n_sources, *like.shape)
        self.filled = torch.zeros(n_sources, dtype=torch.bool)  # buffer rows written
        self.pre: Tensor | None = None
        self.chained: list[tuple[int, int, Tensor]] = []
        self.sums: dict[int, Tensor] | None = {} if plan.sums else None
        # the host reads the weights to sum rows: worth it on a CPU only (see `mix_rows`)
        self.row_sums = plan.allows("row-sums") and like.device.type == "cpu" and not tracked
        self.share = plan.allows("shared-variants")
        # per-position weights: each token's position, for the positions this run computes
        self.where = None if plan.where is None else plan.where[:, -self.positions:]

    def record(self, sources: slice, value: Tensor, through: bool = True) -> None:
        diff = minus(self.ablated[sources], value, self.C)
        if self.weights_grad:
            self.chained.append((sources.start, sources.stop, diff))
            return
        self.buf[sources] = diff.detach() if self.tracked else diff
        self.filled[sources] = True
        if self.tracked and through:
            self.chained.append((sources.start, sources.stop, diff))
        if self.sums is not None:
            self._add_sum(sources, diff.sum(0))

    def record_some(self, which: Tensor, value: Tensor, sources: slice, added: Tensor) -> None:
        """Record a stage whose sources' deltas are not all read: those of `which` (source
        indices) from their outputs `value` ``[n, C*b, p, d]``, and the sum of the deltas of all
        of `sources`, `added` ``[C*b, p, d]``."""
        if len(which):
            self.buf[which] = minus(self.ablated[which], value, self.C)
            self.filled[which] = True
        if self.sums is not None:
            self._add_sum(sources, added)

    def _add_sum(self, sources: slice, added: Tensor) -> None:
        """The running sum past `sources`, given the sum of their deltas ``[C*b, p, d]``."""
        added = added.unflatten(0, (self.C, -1))  # [C, b, p, d]
        before = self.sums.get(sources.start)
        self.sums[sources.stop] = added if before is None else before + added

    def restore(self, cached: Tensor) -> None:
        """Deltas of the sources before a restart, from their cached clean outputs."""
        n = cached.shape[0]
        self.pre = self.ablated[:n] - last(cached, self.positions)  # [n, b, p, d]
        if self.sums is not None:
            self.sums[n] = self.pre.sum(0, keepdim=True)  # [1, b, p, d]

    def total(self, n_up: int, C: int | None = None) -> Tensor:
        """``sum of the deltas of the first n_up sources`` ``[C*b, p, d]`` (C: by default the
        run's variants; 1 for the restored sources alone, which every variant shares)."""
        t = self.sums[n_up]
        return t.expand(self.C if C is None else C, *t.shape[1:]).flatten(0, 1)

    def cut(self) -> None:
        self.positions = 1
        if self.where is not None:
            self.where = self.where[:, -1:]
        if self.buf is not None:
            self.buf = self.buf[..., -1:, :]
        self.chained = [(lo, hi, diff[..., -1:, :]) for lo, hi, diff in self.chained]
        if self.pre is not None:
            self.pre = self.pre[..., -1:, :]
        if self.ablated.shape[2] > 1:
            self.ablated = self.ablated[..., -1:, :]
        if self.sums is not None:
            self.sums = {n: t[..., -1:, :] for n, t in self.sums.items()}

    def mix(self, used: Tensor, w: Tensor, n_up: int, C: int | None = None) -> Tensor:
        """``sum over used sources r of w[:, r] * delta[r]`` ``[n, C, b, p, d]`` (a broadcast
        view where the variants share it): the restored rows, the buffer's rows up to the first
        chained group, then each chained group that has a used row. With ``C=1`` (weights ``[1,
        n_up, n]`` of restored sources only) the result is one variant's."""
        n_pre = 0 if self.pre is None else min(len(self.pre), n_up)
        n_const = min(self.chained[0][0], n_up) if self.chained else n_up
        if C is not None and C != self.C and n_pre < n_up:
            raise ValueError("only the restored sources' deltas are shared by every variant")
        extra = None  # the products below accumulate into it (no separate additions)
        if self.where is not None:
            if n_pre or n_const:
                raise ValueError("per-position weights mix deltas of sources run with them only")
            for lo, hi, diff in self.chained:
                if lo < n_up:
                    extra = mix_at(diff, w[:, lo:hi], self.C, self.where, extra)
            return extra
        if used[n_pre:n_const].any():
            extra = self._mix_buffer(used, w, n_pre, n_const)
        for lo, hi, diff in self.chained:
            if lo >= n_up:
                break
            sel = used[lo:hi]
            if bool(sel.all()):
                extra = mix(diff, w[:, lo:hi], self.C, extra)
            elif sel.any():
                extra = mix(diff[sel], w[:, lo:hi][:, sel], self.C, extra)
        if used[:n_pre].any():
            rows = used_rows(used, 0, n_pre)
            shared = mix_shared(self.pre[rows], w[:, rows], self.C if C is None else C,
                                self.share)
            extra = shared if extra is None else extra + shared
        return extra

    def _mix_buffer(self, used: Tensor, w: Tensor, lo: int, hi: int) -> Tensor:
        """The buffer's rows ``[lo, hi)`` mixed as in `mix`."""
        if self.row_sums and w.shape[0] == 1 and sparse(w[0, lo:hi]):
            # the same weights in every variant, mostly zero: only the rows weighed are read
            return mix_rows(self.buf[lo:hi], w[0, lo:hi], self.C)
        rows = used_rows(used, lo, hi)
        if isinstance(rows, slice) and not bool(self.filled[rows].all()):
            # rows no destination reads on its own (weight 0 here) were never written
            blank = (~self.filled[rows]).nonzero().squeeze(1) + rows.start
            self.buf[blank] = 0
            self.filled[blank] = True
        return mix(self.buf[rows], w[:, rows], self.C)


def used_rows(used: Tensor, lo: int, hi: int) -> slice | Tensor:
    """The used rows in ``[lo, hi)``: all of them as a slice (a view) when more than half are
    used (multiplying zeros is cheaper than a gather's copy), else their indices."""
    n_used = int(used[lo:hi].sum())
    if 2 * n_used < hi - lo:
        return used[lo:hi].nonzero().squeeze(1) + lo
    return slice(lo, hi)



def mix_shared(delta: Tensor, w: Tensor, C: int, share: bool = True) -> Tensor:
    """Like `mix` for deltas the variants share: delta ``[r, b, p, d]``; returns ``[nD, C, b, p,
    d]``, a broadcast view when the weights are the same in every variant. With `share`
    (the "shared-variants" rewrite), destinations whose weights are the same in every variant
    are mixed once (restarts with many variants differ in one destination's weights)."""
    r, b, p, d = delta.shape
    flat = delta.reshape(r, -1)  # [r, b*p*d]
    nD = w.shape[2]
    if w.shape[0] == 1:  # the same in every variant
        return (w[0].T @ flat).view(nD, 1, b, p, d).expand(nD, C, b, p, d)
    same = (w == w[:1]).all(1).all(0) if share else w.new_zeros(nD, dtype=torch.bool)  # [nD]
    if not same.any():
        out = w.transpose(1, 2) @ flat  # [C, nD, b*p*d]
        return out.view(C, nD, b, p, d).transpose(0, 1)
    out = delta.new_empty(nD, C, b * p * d)
    out[same] = (w[0][:, same].T @ flat).unsqueeze(1)
    varies = ~same
    out[varies] = (w[:, :, varies].transpose(1, 2) @ flat).transpose(0, 1)
    return out.view(nD, C, b, p, d)


def minus(ablated: Tensor, value: Tensor, C: int) -> Tensor:
    """``ablated - value`` with ablated ``[n, b|1, p|1, d]`` the same in each of the C variants
    of value ``[n, C*b, p, d]`` (broadcast, not copied)."""
    if C == 1 or ablated.shape[1] == 1:
        return ablated - value
    n, rows, p, d = value.shape
    return (ablated[:, None] - value.view(n, C, rows // C, p, d)).view(n, rows, p, d)


def sparse(w: Tensor) -> bool:
    """Mix weights ``[r, nD]`` shared by the variants with `mix_rows`: they are mostly zero (a
    circuit keeps few edges into each destination)."""
    return 5 * int((w != 0).sum()) < w.numel()


def mix_rows(delta: Tensor, w: Tensor, C: int) -> Tensor:
    """`mix` of weights ``[r, nD]`` shared by the variants as sums of the weighted rows each
    destination reads: a dense product multiplies every zero weight and runs at a fraction of
    the machine's speed on such thin matrices (at the GPT-2-small shape, with 9% of the weights
    nonzero, this is 2x faster). Returns ``[nD, C, b, p, d]``."""
    value_only("row-sums", w)
    r, rows, p, d = delta.shape
    flat = delta.reshape(r, -1)
    out = flat.new_empty(w.shape[1], flat.shape[1])
    pairs = w.T.nonzero()  # [(destination, row)], by destination
    values = w.T[pairs[:, 0], pairs[:, 1]].tolist()
    last = -1
    for (dst, row), value in zip(pairs.tolist(), values, strict=True):
        if dst != last:
            torch.mul(flat[row], value, out=out[dst])
            last = dst
        else:
            out[dst].add_(flat[row], alpha=value)
    empty = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    empty[pairs[:, 0].unique()] = False
    if empty.any():
        out[empty] = 0
    return out.view(-1, C, rows // C, p, d)


def mix(delta: Tensor, w: Tensor, C: int, acc: Tensor | None = None) -> Tensor:
    """``out[D, c, b] = sum over r of w[c, r, D] * delta[r, (c, b)]`` as one (batched) matmul,
    added to `acc` (an earlier result of `mix` of the same shape) inside the product.

    delta : ``[r, C*b, p, d]``; w : ``[C, r, nD]``, or ``[1, r, nD]`` for weights every variant
    shares; returns ``[nD, C, b, p, d]``.
    """
    r, rows, p, d = delta.shape
    if C == 1 or w.shape[0] == 1:
        flat = delta.reshape(r, -1)
        out = (w[0].T @ flat if acc is None
               else torch.addmm(acc.reshape(len(acc), -1), w[0].T, flat))
        return out.view(-1, C, rows // C, p, d)
    per = delta.reshape(r, C, -1).transpose(0, 1)  # [C, r, b*p*d]
    if acc is None:
        out = torch.bmm(w.transpose(1, 2), per)  # [C, nD, b*p*d]
    else:
        out = torch.baddbmm(acc.transpose(0, 1).reshape(C, len(acc), -1), w.transpose(1, 2), per)
    return out.view(C, -1, rows // C, p, d).transpose(0, 1)


def mix_at(delta: Tensor, w: Tensor, C: int, where: Tensor, acc: Tensor | None = None
           ) -> Tensor:
    """`mix` of per-position weights: ``out[D, c, b, p] = sum over r of w[c, r, D, where[b, p]]
    * delta[r, (c, b), p]``; delta ``[r, C*b, p, d]``, w ``[C, r, nD, P]``, where ``[b, p]``
    each token's position; returns ``[nD, C, b, p, d]``, added to `acc`."""
    r, rows, p, d = delta.shape
    per_token = w[..., where.to(w.device)]  # [C, r, nD, b, p]
    out = torch.einsum("crnbp,rcbpd->ncbpd", per_token.to(delta.dtype),
                       delta.view(r, C, rows // C, p, d))
    return out if acc is None else acc + out


def query_heads(kv: Tensor, group: int) -> Tensor:
    """The query heads ``[len(kv) * group]`` of key/value heads `kv`, in order."""
    return (kv[:, None] * group + torch.arange(group)).flatten()


def grad_root(x: Tensor) -> Tensor:
    """`x`, or a leaf copy of it that requires a gradient when nothing upstream does (everything
    before was fixed, folded at weight 1): destination gradients then start there."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def after_prefix(head: Tensor, tail: Tensor) -> Tensor:
    """Keys or values ``[rows, K, f + p, dh]``: the prompts' shared first ones `head` ``[b, K,
    f, dh]`` (the same for every block of b rows) followed by `tail` ``[rows, K, p, dh]``."""
    rows, K, p, dh = tail.shape
    b, f = head.shape[0], head.shape[2]
    out = tail.new_empty(rows, K, f + p, dh)
    out[:, :, :f].view(rows // b, b, K, f, dh).copy_(head)
    out[:, :, f:] = tail
    return out


def last(x: Tensor, p: int) -> Tensor:
    """The last `p` positions of ``[n, b, p', d]`` (as it is when it has one, broadcast)."""
    return x if x.shape[2] in (1, p) else x[:, :, -p:]


def tile(x: Tensor, times: int) -> Tensor:
    """Repeat the batch dimension (dim 1) of ``[n, b|1, p|1, d]`` `times` times."""
    return x if times == 1 or x.shape[1] == 1 else x.repeat(1, times, 1, 1)

