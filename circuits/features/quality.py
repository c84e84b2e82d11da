"""How good an SAE is, measured as the field measures it (Bricken et al. 2023, Gao et al. 2024).

Sparsity and fidelity on a sample of tokens: L0 (active features per token), the variance of the
activation the reconstruction explains, the features that never fire (dead) or fire on more than
`DENSE` of the tokens (dense); and what the reconstruction does to the model: the next-token loss
with the SAE spliced in (its reconstruction in place of the activation) against the clean loss
and the loss with the activation zero-ablated, as the fraction of the loss recovered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import OptionError
from ..files import plain
from ..model import Model
from ..tables import text_table
from ..task import prefix_ids
from .corpus import token_batches
from .sae import SAE
from .sites import site_of, spliced
from .train import check_context

#: A feature firing on more than this fraction of the tokens counts as dense.
DENSE = 0.1
#: Tokens `quality` reads from texts by default.
MAX_TOKENS = 32_768


@dataclass(frozen=True)
class Quality:
    """An SAE's quality on a sample of tokens.

    Attributes
    ----------
    site : str
        The site the SAE writes (``mlp.L`` for a transcoder).
    tokens : int
        Token positions measured (the row prefix, a BOS, left out).
    l0 : float
        Mean number of active features per token.
    explained_variance : float
        ``1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` over the tokens.
    dead_fraction : float
        Fraction of the features that never fired on the sample.
    dense_fraction : float
        Fraction of the features that fired on more than `DENSE` of the tokens.
    loss_clean, loss_spliced, loss_zero : float
        Mean next-token cross-entropy (nats): the model as it is, with the SAE's reconstruction
        in place of the activation, and with the activation set to zero.
    """

    site: str
    tokens: int
    l0: float
    explained_variance: float
    dead_fraction: float
    dense_fraction: float
    loss_clean: float
    loss_spliced: float
    loss_zero: float

    @property
    def fraction_recovered(self) -> float:
        """``(loss_zero - loss_spliced) / (loss_zero - loss_clean)``: 1 when splicing the SAE in
        costs nothing, 0 when it is as bad as zeroing the activation (NaN when zeroing costs
        nothing either)."""
        gap = self.loss_zero - self.loss_clean
        return (self.loss_zero - self.loss_spliced) / gap if gap != 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON data: the fields, the fraction recovered and the dense threshold (a non-finite
        number as None)."""
        out = {**asdict(self), "fraction_recovered": self.fraction_recovered, "dense": DENSE}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else plain(v))
                for k, v in out.items()}

    def table(self) -> str:
        """The figures as aligned text, one per line."""
        def num(value: float, digits: int = 4) -> str:
            return f"{value:.{digits}g}" if math.isfinite(value) else "n/a"

        return text_table([
            ("site", self.site),
            ("tokens", f"{self.tokens:,}"),
            ("L0 (active features per token)", num(self.l0)),
            ("explained variance", num(self.explained_variance)),
            ("dead features (never fired)", f"{self.dead_fraction:.1%}"),
            (f"dense features (fire on >{DENSE:.0%} of tokens)", f"{self.dense_fraction:.1%}"),
            ("loss, clean", num(self.loss_clean)),
            ("loss, SAE spliced in", num(self.loss_spliced)),
            ("loss, site zero-ablated", num(self.loss_zero)),
            ("fraction of loss recovered", num(self.fraction_recovered)),
        ])


class _Sums:
    """Running sums over the measured tokens (float64, so long samples stay exact enough)."""

    def __init__(self, d_sae: int, device: torch.device) -> None:
        self.tokens = 0
        self.active = 0.0
        self.err = 0.0
        self.sq = 0.0  # sum of ||y||^2
        self.total = torch.zeros(0, dtype=torch.float64, device=device)  # sum of y
        self.fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def add(self, y: Tensor, y_hat: Tensor, f: Tensor) -> None:
        """Add tokens ``[n, d]`` with their reconstruction and features ``[n, d_sae]``."""
        y, y_hat = y.double(), y_hat.double()
        self.tokens += len(y)
        self.active += float((f > 0).sum())
        self.err += float((y - y_hat).pow(2).sum())
        self.sq += float(y.pow(2).sum())
        total = y.sum(0)
        self.total = total if self.total.numel() == 0 else self.total + total
        self.fired += (f > 0).sum(0).to(self.fired.device)

    def variance(self) -> float:
        """``sum ||y - mean(y)||^2`` over the tokens."""
        return self.sq - float(self.total.pow(2).sum()) / max(1, self.tokens)


def quality(model: Model, sae: SAE, data: Sequence[str] | Iterable[Tensor],
            max_tokens: int = MAX_TOKENS, context: int | None = None,
            batch_size: int = 8, bos: bool | None = None) -> Quality:
    """Measure an SAE on a model.

    Three forwards per batch: clean, with the SAE spliced in at its site, and with the site's
    activation zero-ablated. The row's prefix position (a BOS the tokenizer puts first, which
    training leaves out) keeps its clean activation in both, and is not measured; the loss is
    the mean cross-entropy of every next token after it.

    Parameters
    ----------
    model : Model
    sae : SAE
        Fitting the model's site (`SAE.check_fits`).
    data : sequence of str or iterable of Tensor
        Texts (a corpus, `read_texts`), cut into rows by `token_batches`; or batches of token
        ids ``[b, p]`` (each led by the tokenizer's prefix, as `token_batches` makes them).
    max_tokens : int
        Stop after this many measured tokens of texts (whole batches).
    context : int, optional
        Tokens per row of texts (default: the SAE's training context, else 128 or the model's
        context when shorter).
    batch_size : int
        Rows per batch of texts.
    bos : bool or None
        The rows' prefix (`token_batches`); by default the SAE's training setting, else the
        tokenizer's convention.

    Returns
    -------
    Quality

    Raises
    ------
    OptionError
        The SAE does not fit the model, or the data holds no token to measure.

    Examples
    --------
    >>> from circuits import load_model
    >>> from circuits.features.train import train_sae
    >>> from circuits.features.corpus import read_texts
    >>> model = load_model("ioi-gpt2-4l")
    >>> texts = read_texts("ioi", n=64)
    >>> sae = train_sae(model, texts, "resid.1", 256, k=8, steps=5, batch_size=4, context=32)
    >>> q = quality(model, sae, texts, max_tokens=256, context=32)
    >>> q.tokens, q.l0 <= 8, q.loss_clean < q.loss_zero
    (256, True, True)
    """
    sae.check_fits(model)
    site = site_of(model, sae.out_site)
    bos = sae.meta.get("bos") if bos is None else bos
    prefix = len(prefix_ids(model.tokenizer, bos)) if model.tokenizer is not None else 0
    if isinstance(data, Sequence) and (not data or isinstance(data[0], str)):
        context = check_context(model, context or sae.meta.get("context"), prefix)
        data = token_batches(model, data, context, batch_size, bos)
        limit = max_tokens
    else:
        limit = None
    sums = _Sums(sae.d_sae, model.device)
    losses = torch.zeros(3, dtype=torch.float64)
    counted = 0

    def splice(inp: Tensor, out: Tensor) -> Tensor:
        x = (inp if sae.transcoder else out)[:, prefix:]
        with torch.no_grad():
            f = sae.encode(x.to(sae.W_enc.device))
            y_hat = sae.decode(f).to(out.device)
        sums.add(out[:, prefix:].reshape(-1, out.shape[-1]), y_hat.reshape(-1, out.shape[-1]),
                 f.reshape(-1, f.shape[-1]))
        return torch.cat([out[:, :prefix], y_hat.to(out.dtype)], dim=1)

    def zero(inp: Tensor, out: Tensor) -> Tensor:
        return torch.cat([out[:, :prefix], torch.zeros_like(out[:, prefix:])], dim=1)

    for ids in data:
        ids = ids.to(model.device)
        if ids.shape[1] < prefix + 2:
            continue  # no next token to predict after the prefix
        with torch.no_grad():
            losses[0] += _loss_sum(model, ids, prefix)
            with spliced(model, {site: splice}):
                losses[1] += _loss_sum(model, ids, prefix)
            with spliced(model, {site: zero}):
                losses[2] += _loss_sum(model, ids, prefix)
        counted += ids.shape[0] * (ids.shape[1] - prefix - 1)
        if limit is not None and sums.tokens >= limit:
            break
    if sums.tokens == 0:
        raise OptionError("no tokens to measure the SAE on: give more text (or rows longer than "
                          f"{prefix + 1} tokens)")
    mean = (losses / counted).tolist()
    variance = sums.variance()
    return Quality(
        site=site.name, tokens=sums.tokens, l0=sums.active / sums.tokens,
        explained_variance=1 - sums.err / variance if variance > 0 else math.nan,
        dead_fraction=float((sums.fired == 0).double().mean()),
        dense_fraction=float((sums.fired > DENSE * sums.tokens).double().mean()),
        loss_clean=mean[0], loss_spliced=mean[1], loss_zero=mean[2])


def _loss_sum(model: Model, ids: Tensor, prefix: int) -> float:
    """Summed next-token cross-entropy of the tokens after the prefix (float32 logits)."""
    # an explicit mask: without one transformers warns that the ids might be padded
    logits = model.hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    logits = logits[:, prefix:-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                 ids[:, prefix + 1:].reshape(-1), reduction="sum"))
